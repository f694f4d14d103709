//! The process-wide wasmtime runtime: the engines (pooling allocator, epoch
//! interruption, memory initialisation by guest size), the linker with every
//! WASI interface guests may import, and the epoch ticker that drives
//! deadlines.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{Context as _, Result};
use wasmtime::component::Linker;
use wasmtime::{Config, Engine, InstanceAllocationStrategy, PoolingAllocationConfig};

use crate::base::admission::Gate;
use crate::base::limits::MAX_MEMORY;
use crate::capabilities::{config, keyvalue, messaging};
use crate::guest::state::HostState;

/// How often the epoch advances. A guest running wasm code notices its
/// deadline (and yields to other requests) within one tick.
pub const EPOCH_TICK: Duration = Duration::from_millis(1);

/// Knobs for the engine, fixed for the life of the process.
#[derive(Debug, Clone)]
pub struct EngineOptions {
    /// Use the pooling instance allocator (falls back to on-demand allocation
    /// with a warning if the machine cannot reserve the pool).
    pub pooling: bool,
    /// Instances that may exist at once across all services; the size of the
    /// pool. Requests beyond it get 503.
    pub max_instances: u32,
    /// Root of the compiled-code cache; `None` disables it. (The deploy
    /// layer opens the cache; it is here because it is fixed per process
    /// like the rest of the engine's settings.)
    pub cache_dir: Option<PathBuf>,
    /// The most linear memory any one service on this host may have (its
    /// `limits.memory` included): a version asking for more is refused
    /// here, whatever other hosts of a cluster accept.
    pub max_service_memory: u64,
}

impl Default for EngineOptions {
    fn default() -> Self {
        EngineOptions {
            pooling: true,
            max_instances: 1000,
            cache_dir: default_cache_dir(),
            max_service_memory: MAX_MEMORY,
        }
    }
}

/// Guests at least this large (in bytes of component) get their linear
/// memory initialised copy-on-write; smaller ones by copying.
///
/// Measured with `wrk -t1 -c32` on a 2-core VM, one fresh instance per
/// request: a small Rust guest does about 17k requests/s with copying and
/// about 11k copy-on-write (mapping and unmapping the image for every
/// instance costs page-table work and TLB shootdowns; copying a few KiB of
/// data segments is cheaper). A 12 MiB JavaScript guest does about 500/s
/// copy-on-write and about 360/s copying its multi-megabyte heap image (and
/// about 1.2k copy-on-write with [`LARGE_GUEST_KEEP_RESIDENT`]).
pub const COPY_ON_WRITE_FROM: usize = 1 << 20;

/// Memory regions of ended instances the pooling allocator collects before
/// returning them to the system in one go.
///
/// Returning memory one instance at a time costs one `madvise`, and one
/// TLB-shootdown IPI to every core running the process, per request;
/// batching cuts that to a fraction: a small guest does 9.0k requests/s
/// unbatched, 11.7k with batches of 4, 14.5k with 16 and 16.4k with 64. The
/// price: memory an ended instance used (say a guest that filled its memory
/// cap and trapped) stays resident until the batch of its server thread
/// fills — within a few dozen requests under any traffic, but an idle host
/// keeps at most this many regions per thread until requests come.
pub const DECOMMIT_BATCH: usize = 64;

/// Linear memory kept resident (reset in place, not returned to the system)
/// per instance slot of a large guest.
pub const LARGE_GUEST_KEEP_RESIDENT: usize = 32 << 20;

/// How an engine initialises a new instance's linear memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MemoryInit {
    /// Copy the data segments into fresh memory: cheapest for small images.
    Copy,
    /// Map the precomputed memory image copy-on-write: only touched pages
    /// cost anything, which wins for multi-megabyte images.
    CopyOnWrite,
}

impl MemoryInit {
    /// The choice for a component of `size` bytes.
    pub fn for_component_size(size: usize) -> MemoryInit {
        if size >= COPY_ON_WRITE_FROM {
            MemoryInit::CopyOnWrite
        } else {
            MemoryInit::Copy
        }
    }

    /// A short name for logs.
    pub fn as_str(self) -> &'static str {
        match self {
            MemoryInit::Copy => "copy",
            MemoryInit::CopyOnWrite => "copy-on-write",
        }
    }
}

/// Which engine compiles and runs a component: how it initialises memory,
/// and whether it speaks the component model's async ABI.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EngineKind {
    /// How instances' linear memory is initialised.
    pub init: MemoryInit,
    /// Whether the engine runs components that use the component model's
    /// async functions, streams and futures (WASI 0.3). Only those get it:
    /// every store of such an engine sets up the concurrency machinery,
    /// which cost a WASI 0.2 hello 10% of its requests/s (14.6k -> 13.2k
    /// with `wrk -t1 -c32` on the 2-core VM) though it never used it.
    pub concurrent: bool,
}

impl EngineKind {
    /// Every kind, in a fixed order.
    pub const ALL: [EngineKind; 4] = [
        EngineKind::new(MemoryInit::Copy, false),
        EngineKind::new(MemoryInit::CopyOnWrite, false),
        EngineKind::new(MemoryInit::Copy, true),
        EngineKind::new(MemoryInit::CopyOnWrite, true),
    ];

    /// The kind for `init` and `concurrent`.
    pub const fn new(init: MemoryInit, concurrent: bool) -> EngineKind {
        EngineKind { init, concurrent }
    }

    /// Its position in [`EngineKind::ALL`].
    pub fn index(self) -> usize {
        usize::from(self.concurrent) * 2 + usize::from(self.init == MemoryInit::CopyOnWrite)
    }
}

/// The platform's default location of the compiled-code cache
/// (`~/.cache/wharf` on Linux), if the platform has one.
pub fn default_cache_dir() -> Option<PathBuf> {
    dirs::cache_dir().map(|dir| dir.join("wharf"))
}

/// One engine with its linker.
pub struct Flavour {
    engine: Engine,
    linker: Linker<HostState>,
}

impl Flavour {
    fn new(options: &EngineOptions, kind: EngineKind, pooling: bool) -> Result<Flavour> {
        let engine = Engine::new(&engine_config(kind, pooling.then_some(options)))
            .map_err(anyhow::Error::from)
            .context("creating the wasmtime engine")?;
        let linker = build_linker(&engine, kind.concurrent)?;
        Ok(Flavour { engine, linker })
    }

    /// The engine.
    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// The linker holding every interface Wharf provides to guests.
    pub fn linker(&self) -> &Linker<HostState> {
        &self.linker
    }
}

/// The wasmtime engines and linkers shared by every deployment, plus the
/// epoch ticker. There are four engines, identical but for how they
/// initialise linear memory ([`MemoryInit`]) and whether they run WASI 0.3
/// components ([`EngineKind`]); each deployment uses the one that suits
/// it. Dropping the runtime stops the ticker thread.
pub struct Runtime {
    /// Indexed by [`EngineKind::index`].
    flavours: Vec<Flavour>,
    pooling: bool,
    max_service_memory: u64,
    /// Slots for live instances across both engines: never more than a
    /// pool holds.
    instances: Gate,
    _ticker: EpochTicker,
}

impl Runtime {
    /// Builds the engines and linkers and starts the epoch ticker.
    pub fn new(options: &EngineOptions) -> Result<Runtime> {
        let build = |pooling| -> Result<Vec<Flavour>> {
            EngineKind::ALL
                .iter()
                .map(|kind| Flavour::new(options, *kind, pooling))
                .collect()
        };
        let (flavours, pooling) = if options.pooling {
            match build(true) {
                Ok(flavours) => (flavours, true),
                Err(err) => {
                    tracing::warn!(
                        error = %format!("{err:#}"),
                        "pooling allocator unavailable on this machine; allocating instances on demand"
                    );
                    (build(false)?, false)
                }
            }
        } else {
            (build(false)?, false)
        };
        let ticker = EpochTicker::start(flavours.iter().map(|f| f.engine.clone()).collect())?;
        Ok(Runtime {
            flavours,
            pooling,
            max_service_memory: options.max_service_memory.min(MAX_MEMORY),
            instances: Gate::new(options.max_instances as usize, "instance slots"),
            _ticker: ticker,
        })
    }

    /// The engine and linker of `kind`.
    pub fn flavour(&self, kind: EngineKind) -> &Flavour {
        &self.flavours[kind.index()]
    }

    /// Whether instances come from the pooling allocator.
    pub fn pooling(&self) -> bool {
        self.pooling
    }

    /// The most linear memory one service may have on this host.
    pub fn max_service_memory(&self) -> u64 {
        self.max_service_memory
    }

    /// The host-wide instance slots.
    pub fn instances(&self) -> &Gate {
        &self.instances
    }
}

fn engine_config(kind: EngineKind, pool: Option<&EngineOptions>) -> Config {
    let init = kind.init;
    let mut config = Config::new();
    config.wasm_component_model(true);
    // WASI 0.3 components use the component model's async functions,
    // streams and futures; the other engines do without its machinery.
    config.wasm_component_model_async(kind.concurrent);
    config.concurrency_support(kind.concurrent);
    config.epoch_interruption(true);
    config.memory_init_cow(init == MemoryInit::CopyOnWrite);
    if let Some(options) = pool {
        let mut pooling = PoolingAllocationConfig::new();
        // Each request instantiates a component that may hold several core
        // instances (a Rust guest has about four, a JS or Python one more),
        // so the core-instance pool is sized a few times the component pool.
        let instances = options.max_instances;
        pooling.total_component_instances(instances);
        pooling.total_core_instances(instances.saturating_mul(4));
        pooling.total_memories(instances.saturating_mul(2));
        pooling.total_tables(instances.saturating_mul(4));
        pooling.total_stacks(instances);
        pooling.max_memories_per_module(2);
        pooling.max_tables_per_module(4);
        // Interpreters compiled to wasm (SpiderMonkey, CPython) have large
        // function tables and instance metadata.
        pooling.table_elements(100_000);
        pooling.max_core_instance_size(8 << 20);
        pooling.max_component_instance_size(8 << 20);
        pooling.max_memory_size(options.max_service_memory.min(MAX_MEMORY) as usize);
        pooling.decommit_batch_size(DECOMMIT_BATCH);
        // Function tables are small and reset on every request: keeping
        // their first pages resident avoids refaulting them (+4-13%).
        pooling.table_keep_resident(256 << 10);
        // Small guests' linear memory is not kept resident: wasmtime resets
        // kept pages in place, and it treats a Rust guest's whole 1 MiB
        // shadow stack as dirty even when a request barely touched it, so
        // resetting cost more than the page faults it saves (measured:
        // 15.5k -> 8.3k requests/s with 2 MiB kept).
        if init == MemoryInit::CopyOnWrite {
            // Large guests (an interpreter with a pre-initialised heap) write
            // to many image pages per request. Each first write to a
            // copy-on-write page is a fault plus a TLB-shootdown IPI to the
            // other cores (47% of the time in a profile of the JS hello).
            // Keeping the first pages resident resets them with memcpy from
            // the image instead: 500 -> 1190 requests/s for the JS hello.
            // The cost is up to this much RSS per pool slot in use.
            pooling.linear_memory_keep_resident(LARGE_GUEST_KEEP_RESIDENT);
        }
        config.allocation_strategy(InstanceAllocationStrategy::Pooling(pooling));
    }
    config
}

fn build_linker(engine: &Engine, concurrent: bool) -> Result<Linker<HostState>> {
    let mut linker = Linker::new(engine);
    // All of WASIp2 (cli, clocks, random, io, filesystem, sockets): real
    // components import far more than the proxy world, and linking an
    // interface grants nothing by itself — each store's WasiCtx decides.
    wasmtime_wasi::p2::add_to_linker_async(&mut linker)
        .map_err(anyhow::Error::from)
        .context("linking WASI")?;
    wasmtime_wasi_http::p2::add_only_http_to_linker_async(&mut linker)
        .map_err(anyhow::Error::from)
        .context("linking wasi:http")?;
    // The same for WASI 0.3 (wasi:*@0.3.0), for the engines that run it.
    if concurrent {
        wasmtime_wasi::p3::add_to_linker(&mut linker)
            .map_err(anyhow::Error::from)
            .context("linking WASI 0.3")?;
        wasmtime_wasi_http::p3::add_to_linker(&mut linker)
            .map_err(anyhow::Error::from)
            .context("linking wasi:http 0.3")?;
    }
    // Key-value and configuration: linked for every guest (so components
    // built for Spin, wasmCloud or `wasmtime serve` instantiate); what a
    // guest may reach is its manifest's grant, checked per call.
    keyvalue::add_to_linker(&mut linker, HostState::keyvalue)
        .map_err(anyhow::Error::from)
        .context("linking wasi:keyvalue")?;
    config::add_to_linker(&mut linker, HostState::config)
        .map_err(anyhow::Error::from)
        .context("linking wasi:config")?;
    messaging::add_to_linker(&mut linker, HostState::messaging)
        .map_err(anyhow::Error::from)
        .context("linking wasi:messaging and wasmcloud:messaging")?;
    Ok(linker)
}

/// A thread that advances the engines' epochs every [`EPOCH_TICK`]; stopped
/// and joined on drop.
struct EpochTicker {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl EpochTicker {
    fn start(engines: Vec<Engine>) -> Result<EpochTicker> {
        let stop = Arc::new(AtomicBool::new(false));
        let thread = std::thread::Builder::new()
            .name("wharf-epoch".into())
            .spawn({
                let stop = stop.clone();
                move || {
                    while !stop.load(Ordering::Relaxed) {
                        std::thread::sleep(EPOCH_TICK);
                        for engine in &engines {
                            engine.increment_epoch();
                        }
                    }
                }
            })
            .context("starting the epoch ticker thread")?;
        Ok(EpochTicker {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for EpochTicker {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            // The thread only sleeps and increments; it cannot panic.
            let _ = thread.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_guests_copy_and_large_ones_map_copy_on_write() {
        assert_eq!(MemoryInit::for_component_size(64 << 10), MemoryInit::Copy);
        assert_eq!(
            MemoryInit::for_component_size(COPY_ON_WRITE_FROM - 1),
            MemoryInit::Copy
        );
        assert_eq!(
            MemoryInit::for_component_size(COPY_ON_WRITE_FROM),
            MemoryInit::CopyOnWrite
        );
        assert_eq!(
            MemoryInit::for_component_size(13 << 20),
            MemoryInit::CopyOnWrite
        );
    }
}
