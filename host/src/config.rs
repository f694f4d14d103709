//! Host-wide configuration: where services come from, the default limits,
//! engine sizing and shutdown behaviour. Built by the CLI or by an embedder.

use std::path::PathBuf;
use std::time::Duration;

use crate::engine::EngineOptions;
use crate::limits::Limits;

/// How long shutdown waits for in-flight requests by default.
pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

/// Configuration of a [`Host`](crate::Host).
#[derive(Debug, Clone)]
pub struct Config {
    /// The directory whose `NAME.wasm` files are the services. `None` for a
    /// host whose services are deployed only through the API.
    pub services_dir: Option<PathBuf>,
    /// Keep watching the directory and apply changes while running.
    pub watch: bool,
    /// Limits for services that do not set their own.
    pub limits: Limits,
    /// Engine and instance-pool sizing.
    pub engine: EngineOptions,
    /// How long a graceful shutdown waits for in-flight requests.
    pub drain_timeout: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            services_dir: None,
            watch: true,
            limits: Limits::default(),
            engine: EngineOptions::default(),
            drain_timeout: DEFAULT_DRAIN_TIMEOUT,
        }
    }
}

impl Config {
    /// A configuration serving the services in `dir`, watched for changes,
    /// with default limits.
    pub fn for_dir(dir: impl Into<PathBuf>) -> Config {
        Config {
            services_dir: Some(dir.into()),
            ..Config::default()
        }
    }

    /// Sets whether the directory is watched for changes.
    pub fn watch(mut self, watch: bool) -> Config {
        self.watch = watch;
        self
    }

    /// Sets the default limits.
    pub fn limits(mut self, limits: Limits) -> Config {
        self.limits = limits;
        self
    }
}
