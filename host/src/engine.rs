//! The process-wide wasmtime runtime: the engine (pooling allocator, epoch
//! interruption), the linker with every WASI interface guests may import, and
//! the epoch ticker thread that drives deadlines.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{Context as _, Result};
use wasmtime::component::Linker;
use wasmtime::{Config, Engine, InstanceAllocationStrategy, PoolingAllocationConfig};

use crate::admission::Gate;
use crate::cache::CodeCache;
use crate::limits::MAX_MEMORY;
use crate::state::HostState;

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
    /// Root of the compiled-code cache; `None` disables it.
    pub cache_dir: Option<PathBuf>,
}

impl Default for EngineOptions {
    fn default() -> Self {
        EngineOptions {
            pooling: true,
            max_instances: 1000,
            cache_dir: crate::cache::default_dir(),
        }
    }
}

/// The wasmtime engine and linker shared by every deployment, plus the epoch
/// ticker. Dropping the runtime stops the ticker thread.
pub struct Runtime {
    engine: Engine,
    linker: Linker<HostState>,
    pooling: bool,
    cache: Option<CodeCache>,
    /// Slots for live instances: never more than the pool holds.
    instances: Gate,
    _ticker: EpochTicker,
}

impl Runtime {
    /// Builds the engine and linker and starts the epoch ticker.
    pub fn new(options: &EngineOptions) -> Result<Runtime> {
        let (engine, pooling) = if options.pooling {
            match Engine::new(&engine_config(Some(options))) {
                Ok(engine) => (engine, true),
                Err(err) => {
                    tracing::warn!(
                        error = %err,
                        "pooling allocator unavailable on this machine; allocating instances on demand"
                    );
                    (build_engine(None)?, false)
                }
            }
        } else {
            (build_engine(None)?, false)
        };
        let linker = build_linker(&engine)?;
        let cache = options.cache_dir.as_deref().and_then(|root| {
            match CodeCache::open(root, &engine) {
                Ok(cache) => Some(cache),
                Err(err) => {
                    tracing::warn!(reason = %format!("{err:#}"), "compiled-code cache disabled");
                    None
                }
            }
        });
        let ticker = EpochTicker::start(engine.clone())?;
        Ok(Runtime {
            engine,
            linker,
            pooling,
            cache,
            instances: Gate::new(options.max_instances as usize, "instance slots"),
            _ticker: ticker,
        })
    }

    /// The shared engine.
    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// The linker holding every interface Wharf provides to guests.
    pub fn linker(&self) -> &Linker<HostState> {
        &self.linker
    }

    /// Whether instances come from the pooling allocator.
    pub fn pooling(&self) -> bool {
        self.pooling
    }

    /// The host-wide instance slots.
    pub fn instances(&self) -> &Gate {
        &self.instances
    }

    /// The compiled-code cache, if enabled.
    pub fn cache(&self) -> Option<&CodeCache> {
        self.cache.as_ref()
    }
}

fn build_engine(pool: Option<&EngineOptions>) -> Result<Engine> {
    Engine::new(&engine_config(pool))
        .map_err(anyhow::Error::from)
        .context("creating the wasmtime engine")
}

fn engine_config(pool: Option<&EngineOptions>) -> Config {
    let mut config = Config::new();
    config.wasm_component_model(true);
    config.epoch_interruption(true);
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
        pooling.max_memory_size(MAX_MEMORY as usize);
        config.allocation_strategy(InstanceAllocationStrategy::Pooling(pooling));
    }
    config
}

fn build_linker(engine: &Engine) -> Result<Linker<HostState>> {
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
    Ok(linker)
}

/// A thread that advances the engine's epoch every [`EPOCH_TICK`]; stopped and
/// joined on drop.
struct EpochTicker {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl EpochTicker {
    fn start(engine: Engine) -> Result<EpochTicker> {
        let stop = Arc::new(AtomicBool::new(false));
        let thread = std::thread::Builder::new()
            .name("wharf-epoch".into())
            .spawn({
                let stop = stop.clone();
                move || {
                    while !stop.load(Ordering::Relaxed) {
                        std::thread::sleep(EPOCH_TICK);
                        engine.increment_epoch();
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
