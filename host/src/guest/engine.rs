//! The process-wide wasmtime runtime: the engines (pooling allocator, epoch
//! interruption, memory initialisation by guest size), the linker with every
//! WASI interface guests may import, and the epoch ticker that drives
//! deadlines.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};
use tokio::sync::OwnedSemaphorePermit;
use wasmtime::component::{Component, Linker};
use wasmtime::{
    Config, Enabled, Engine, InstanceAllocationStrategy, PoolingAllocationConfig, Strategy,
};

use crate::base::admission::{Gate, Refused};
use crate::base::limits::MAX_MEMORY;
use crate::capabilities::{keyvalue, messaging, wasi_config};
use crate::guest::function_cache::FunctionCache;
use crate::guest::scheduler::EPOCH_TICK;
use crate::guest::state::HostState;

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
    /// layer opens the cache of whole components; the runtime opens the
    /// function cache in it, see [`FunctionCache`].)
    pub cache_dir: Option<PathBuf>,
    /// The most linear memory any one service on this host may have (its
    /// `limits.memory` included): a version asking for more is refused
    /// here, whatever other hosts of a cluster accept.
    pub max_service_memory: u64,
    /// Which compilers turn components into native code; see [`Tiers`].
    /// `None`: what the services directory's `wharf.toml` says, else
    /// [`Tiers::Tiered`].
    pub tiers: Option<Tiers>,
    /// How long a background (Cranelift) compile waits before it starts:
    /// a burst of deploys settles first, and tests watch the baseline tier.
    pub optimise_delay: Duration,
    /// Linear memory kept resident per pool slot of a large guest (see
    /// `LARGE_GUEST_KEEP_RESIDENT`, 8 MiB). `None`: what `wharf.toml` says, else
    /// that default.
    pub keep_resident: Option<u64>,
}

impl Default for EngineOptions {
    fn default() -> Self {
        EngineOptions {
            pooling: true,
            max_instances: 1000,
            cache_dir: default_cache_dir(),
            max_service_memory: MAX_MEMORY,
            tiers: None,
            optimise_delay: Duration::ZERO,
            keep_resident: None,
        }
    }
}

/// Which compilers a host uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Tiers {
    /// A component not in the compiled-code cache is compiled with Winch,
    /// wasmtime's baseline compiler (several times faster to compile, slower
    /// code), and served at once; Cranelift compiles it again in the
    /// background and the optimised code replaces the baseline code without
    /// downtime. The default.
    #[default]
    Tiered,
    /// Cranelift only: a component serves once its optimised code is ready.
    Cranelift,
    /// Winch only, never optimised and never cached: for tests of the
    /// baseline tier.
    Winch,
}

impl Tiers {
    /// The name used by `--tiers` and `wharf.toml`.
    pub fn as_str(self) -> &'static str {
        match self {
            Tiers::Tiered => "tiered",
            Tiers::Cranelift => "cranelift",
            Tiers::Winch => "winch",
        }
    }

    /// The tier a component not in the cache is compiled to first.
    pub fn first(self) -> Tier {
        match self {
            Tiers::Tiered | Tiers::Winch => Tier::Baseline,
            Tiers::Cranelift => Tier::Optimised,
        }
    }
}

impl std::str::FromStr for Tiers {
    type Err = String;

    fn from_str(text: &str) -> Result<Tiers, String> {
        match text.trim().to_ascii_lowercase().as_str() {
            "tiered" => Ok(Tiers::Tiered),
            "cranelift" => Ok(Tiers::Cranelift),
            "winch" => Ok(Tiers::Winch),
            other => Err(format!(
                "{other:?} is not a compiler tier setting: use \"tiered\" (Winch first, Cranelift in the background), \"cranelift\" or \"winch\""
            )),
        }
    }
}

/// Which compiler produced a component's native code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tier {
    /// Winch: compiled in a single pass, quickly, to slower code.
    Baseline,
    /// Cranelift: the optimising compiler.
    Optimised,
}

impl Tier {
    /// The compiler's name, for logs and the service list.
    pub fn as_str(self) -> &'static str {
        match self {
            Tier::Baseline => "winch",
            Tier::Optimised => "cranelift",
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

/// [`DECOMMIT_BATCH`] for large guests, whose ended instances each hold
/// megabytes until decommitted: with 8 the JavaScript benchmark peaked at
/// 313 MiB RSS instead of 460, at the same requests/s (`wrk -t1 -c32`,
/// fresh and reused JS hello).
pub const LARGE_GUEST_DECOMMIT_BATCH: usize = 8;

/// Linear memory kept resident (reset in place, not returned to the system)
/// per instance slot of a large guest, by default: at most this much RSS per
/// pool slot such a guest has used. 8 and 32 MiB measured the same
/// requests/s for the JS hello: wasmtime resets at most 32 runs of dirty
/// pages in place and decommits the rest, which an interpreter's scattered
/// writes reach well below 8 MiB.
pub const LARGE_GUEST_KEEP_RESIDENT: usize = 8 << 20;

/// Linear memory kept resident per instance slot of a small guest. Only the
/// pages a request dirtied are reset (found with the `PAGEMAP_SCAN` ioctl,
/// Linux 6.7+), so a fresh instance starts without page faults: the Rust
/// hello went from 4 faults and about 17.5k requests/s to none and 21.5k.
pub const SMALL_GUEST_KEEP_RESIDENT: usize = 1 << 20;

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
/// whether it speaks the component model's async ABI, and which compiler
/// it uses.
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
    /// The compiler.
    pub tier: Tier,
}

impl EngineKind {
    /// Every kind, in a fixed order.
    pub const ALL: [EngineKind; 8] = {
        use MemoryInit::{Copy, CopyOnWrite};
        use Tier::{Baseline, Optimised};
        [
            EngineKind::new(Copy, false, Optimised),
            EngineKind::new(CopyOnWrite, false, Optimised),
            EngineKind::new(Copy, true, Optimised),
            EngineKind::new(CopyOnWrite, true, Optimised),
            EngineKind::new(Copy, false, Baseline),
            EngineKind::new(CopyOnWrite, false, Baseline),
            EngineKind::new(Copy, true, Baseline),
            EngineKind::new(CopyOnWrite, true, Baseline),
        ]
    };

    /// The kind for `init`, `concurrent` and `tier`.
    pub const fn new(init: MemoryInit, concurrent: bool, tier: Tier) -> EngineKind {
        EngineKind {
            init,
            concurrent,
            tier,
        }
    }

    /// The same kind with another compiler.
    pub const fn with_tier(self, tier: Tier) -> EngineKind {
        EngineKind::new(self.init, self.concurrent, tier)
    }

    /// Its position in [`EngineKind::ALL`].
    pub fn index(self) -> usize {
        usize::from(self.tier == Tier::Baseline) * 4
            + usize::from(self.concurrent) * 2
            + usize::from(self.init == MemoryInit::CopyOnWrite)
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
    fn new(
        options: &EngineOptions,
        kind: EngineKind,
        pooling: bool,
        functions: Option<&Arc<FunctionCache>>,
    ) -> Result<Flavour> {
        // The baseline tier serves a component only until its optimised
        // code is ready (seconds), so its engines allocate instances on
        // demand rather than reserve a second pool's address space.
        let pooling = pooling && kind.tier == Tier::Optimised;
        let mut config = engine_config(kind, pooling.then_some(options));
        // Winch has no use for it (wasmtime refuses it there).
        if let Some(functions) = functions.filter(|_| kind.tier == Tier::Optimised) {
            config
                .enable_incremental_compilation(functions.clone())
                .map_err(anyhow::Error::from)
                .context("enabling the function cache")?;
        }
        let engine = Engine::new(&config)
            .map_err(anyhow::Error::from)
            .with_context(|| format!("creating the wasmtime engine ({})", kind.tier.as_str()))?;
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
/// epoch ticker. There are eight engines, identical but for how they
/// initialise linear memory ([`MemoryInit`]), whether they run WASI 0.3
/// components, and which compiler they use ([`EngineKind`]); each
/// deployment uses the one that suits it. The ticker thread stops once the
/// runtime and every instance it handed a slot to are gone.
pub struct Runtime {
    /// Indexed by [`EngineKind::index`].
    flavours: Vec<Flavour>,
    max_service_memory: u64,
    tiers: Tiers,
    optimise_delay: Duration,
    /// Slots for live instances across both engines: never more than a
    /// pool holds.
    instances: Gate,
    ticker: Arc<EpochTicker>,
    /// Cranelift's per-function code between compiles, if the compiled-code
    /// cache is on.
    functions: Option<Arc<FunctionCache>>,
}

/// A live instance's claim on its runtime: one of the host-wide instance
/// slots, and the epoch ticker kept running for as long as the instance
/// lives. A guest still running when its host is dropped (a detached 0.3
/// worker, a delivery in flight) is still stopped at its deadline, never
/// left spinning on a thread without epochs.
pub(crate) struct InstanceSlot {
    _permit: OwnedSemaphorePermit,
    _ticking: Arc<EpochTicker>,
}

impl Runtime {
    /// Builds the engines and linkers and starts the epoch ticker.
    pub fn new(options: &EngineOptions) -> Result<Runtime> {
        let functions = options.cache_dir.as_deref().and_then(|dir| {
            FunctionCache::open(dir)
                .map(Arc::new)
                .inspect_err(|err| {
                    tracing::warn!(reason = %format!("{err:#}"), "function cache disabled");
                })
                .ok()
        });
        let build = |pooling| -> Result<Vec<Flavour>> {
            EngineKind::ALL
                .iter()
                .map(|kind| Flavour::new(options, *kind, pooling, functions.as_ref()))
                .collect()
        };
        let flavours = if options.pooling {
            match build(true) {
                Ok(flavours) => flavours,
                Err(err) => {
                    tracing::warn!(
                        error = %format!("{err:#}"),
                        "pooling allocator unavailable on this machine; allocating instances on demand"
                    );
                    build(false)?
                }
            }
        } else {
            build(false)?
        };
        let ticker = EpochTicker::start(flavours.iter().map(|f| f.engine.clone()).collect())?;
        Ok(Runtime {
            flavours,
            max_service_memory: options.max_service_memory.min(MAX_MEMORY),
            tiers: options.tiers.unwrap_or_default(),
            optimise_delay: options.optimise_delay,
            instances: Gate::new(options.max_instances as usize, "instance slots"),
            ticker: Arc::new(ticker),
            functions,
        })
    }

    /// Cranelift's per-function cache, if the compiled-code cache is on.
    #[cfg(test)]
    pub(crate) fn function_cache(&self) -> Option<&Arc<FunctionCache>> {
        self.functions.as_ref()
    }

    /// Compiles `wasm` on `kind`'s engine, then writes what Cranelift
    /// stored in the function cache meanwhile. Blocking and CPU-heavy.
    pub fn compile(&self, kind: EngineKind, wasm: &[u8]) -> Result<Component> {
        let engine = self.flavour(kind).engine();
        let Some(functions) = &self.functions else {
            return Component::new(engine, wasm).map_err(anyhow::Error::from);
        };
        let found_before = functions.found();
        let compiled = Component::new(engine, wasm).map_err(anyhow::Error::from);
        tracing::debug!(
            compiler = kind.tier.as_str(),
            functions_found = functions.found() - found_before,
            "compiled, reusing functions from the function cache"
        );
        functions.flush();
        compiled
    }

    /// The engine and linker of `kind`.
    pub fn flavour(&self, kind: EngineKind) -> &Flavour {
        &self.flavours[kind.index()]
    }

    /// The most linear memory one service may have on this host.
    pub fn max_service_memory(&self) -> u64 {
        self.max_service_memory
    }

    /// Which compilers turn components into native code.
    pub fn tiers(&self) -> Tiers {
        self.tiers
    }

    /// How long a background compile waits before it starts.
    pub fn optimise_delay(&self) -> Duration {
        self.optimise_delay
    }

    /// The host-wide instance slots.
    pub fn instances(&self) -> &Gate {
        &self.instances
    }

    /// Waits, until `deadline` at the latest, for a free instance slot.
    pub(crate) async fn instance_slot(&self, deadline: Instant) -> Result<InstanceSlot, Refused> {
        let permit = self.instances.enter(deadline).await?;
        Ok(InstanceSlot {
            _permit: permit,
            _ticking: self.ticker.clone(),
        })
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
    config.strategy(match kind.tier {
        Tier::Baseline => Strategy::Winch,
        Tier::Optimised => Strategy::Cranelift,
    });
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
        // Reset kept-resident memory by scanning for the pages an instance
        // dirtied (Linux 6.7+), not by copying the whole resident window:
        // the JS benchmark's peak RSS went from 1.4 GiB to 460 MiB and the
        // fresh JS hello's p99 from 330 to 53 ms. Where the ioctl is
        // missing, wasmtime copies the window as before.
        pooling.pagemap_scan(Enabled::Auto);
        // Function tables are small and reset on every request: keeping
        // their first pages resident avoids refaulting them (+4-13%).
        pooling.table_keep_resident(256 << 10);
        match init {
            MemoryInit::Copy => {
                pooling.decommit_batch_size(DECOMMIT_BATCH);
                // Without the ioctl the whole window would be reset per
                // request, which costs more than the faults it saves
                // (15.5k -> 8.3k requests/s with 2 MiB kept).
                if pagemap_scan_available() {
                    pooling.linear_memory_keep_resident(SMALL_GUEST_KEEP_RESIDENT);
                }
            }
            MemoryInit::CopyOnWrite => {
                // Large guests (an interpreter with a pre-initialised heap)
                // write to many image pages per request. Each first write to
                // a copy-on-write page is a fault plus a TLB-shootdown IPI to
                // the other cores; kept pages are reset in place instead.
                pooling.decommit_batch_size(LARGE_GUEST_DECOMMIT_BATCH);
                let keep = options
                    .keep_resident
                    .map_or(LARGE_GUEST_KEEP_RESIDENT, |bytes| {
                        usize::try_from(bytes).unwrap_or(usize::MAX)
                    });
                pooling.linear_memory_keep_resident(keep);
            }
        }
        config.allocation_strategy(InstanceAllocationStrategy::Pooling(pooling));
    }
    config
}

/// Whether the kernel has the `PAGEMAP_SCAN` ioctl (Linux 6.7 and later),
/// which wasmtime uses to reset only the pages an instance dirtied. Read
/// once per process.
fn pagemap_scan_available() -> bool {
    static AVAILABLE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *AVAILABLE.get_or_init(|| {
        if !cfg!(target_os = "linux") {
            return false;
        }
        let Ok(release) = std::fs::read_to_string("/proc/sys/kernel/osrelease") else {
            return false;
        };
        let mut numbers = release
            .trim()
            .split(|c: char| !c.is_ascii_digit())
            .map(|n| n.parse::<u32>().unwrap_or(0));
        let (major, minor) = (numbers.next().unwrap_or(0), numbers.next().unwrap_or(0));
        (major, minor) >= (6, 7)
    })
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
    wasi_config::add_to_linker(&mut linker, HostState::config)
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
    fn every_engine_kind_has_its_own_index() {
        for (position, kind) in EngineKind::ALL.iter().enumerate() {
            assert_eq!(kind.index(), position, "{kind:?}");
        }
    }

    #[test]
    fn tier_settings_parse_and_name_the_choices_when_wrong() {
        assert_eq!("tiered".parse(), Ok(Tiers::Tiered));
        assert_eq!(" Cranelift ".parse(), Ok(Tiers::Cranelift));
        assert_eq!("winch".parse(), Ok(Tiers::Winch));
        let wrong = "fast".parse::<Tiers>().unwrap_err();
        assert!(wrong.contains("\"cranelift\""), "{wrong}");
        assert_eq!(Tiers::default().first(), Tier::Baseline);
        assert_eq!(Tiers::Cranelift.first(), Tier::Optimised);
    }

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
