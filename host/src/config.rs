//! Host-wide configuration: where services come from, the default limits,
//! engine sizing and shutdown behaviour. Built by the CLI or by an embedder.

use crate::deploy::source::cluster::ClusterConfig;
use std::path::PathBuf;
use std::time::Duration;

use crate::base::limits::{Limits, PartialLimits};
use crate::capabilities::keyvalue::KeyValueChoice;
use crate::capabilities::messaging::{BrokerChoice, MessagingLimits, PartialMessagingLimits};
use crate::capabilities::wasi_config::SecretSources;
use crate::guest::engine::EngineOptions;

/// How long shutdown waits for in-flight requests by default.
pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(30);
/// Most service-to-service hops by default.
pub const DEFAULT_MAX_CALL_DEPTH: u32 = 10;
/// How long a client may stall by default.
pub const DEFAULT_CLIENT_TIMEOUT: Duration = Duration::from_secs(30);

/// Configuration of a [`Host`](crate::Host).
#[derive(Debug, Clone)]
pub struct Config {
    /// The directory whose `NAME.wasm` files are the services. `None` for a
    /// host whose services are deployed only through the API.
    pub services_dir: Option<PathBuf>,
    /// Keep watching the directory and apply changes while running.
    pub watch: bool,
    /// Follow `NAME.wasm` symlinks that point outside the directory (by
    /// default they are rejected).
    pub allow_external_symlinks: bool,
    /// Limits for services that do not set their own: the base under the
    /// directory's `wharf.toml`.
    pub limits: Limits,
    /// Limits that override the directory's `wharf.toml` (the command-line
    /// flags); a service's own manifest still overrides these.
    pub limit_overrides: PartialLimits,
    /// Engine and instance-pool sizing.
    pub engine: EngineOptions,
    /// Where the host keeps its own state: the last good version of each
    /// service (served if its file is broken at start) and the embedded
    /// key-value store and message queue. `None` keeps none (the embedded store then lives in
    /// memory). Must not be inside the services directory.
    pub data_dir: Option<PathBuf>,
    /// The key-value backend; `None`: the one `wharf.toml` names, else the
    /// embedded store.
    pub keyvalue: Option<KeyValueChoice>,
    /// The message broker; `None`: the one `wharf.toml` names, else the
    /// embedded broker.
    pub messaging: Option<BrokerChoice>,
    /// What bounds the broker's queues and each service's publishing, under
    /// the directory's `wharf.toml` (`[messaging]`).
    pub messaging_limits: MessagingLimits,
    /// Messaging bounds that override the directory's `wharf.toml` (the
    /// command-line flags).
    pub messaging_overrides: PartialMessagingLimits,
    /// How long a graceful shutdown waits for in-flight requests.
    pub drain_timeout: Duration,
    /// How long a client may stall: sending its request headers, idling
    /// between keep-alive requests, or not reading a response.
    pub client_timeout: Duration,
    /// Most service-to-service hops one client request may cause; a deeper
    /// call gets 508 Loop Detected.
    pub max_call_depth: u32,
    /// The cluster this host joins, if any: its services come from the
    /// cluster's index, and key-value and messaging default to its NATS.
    /// `None`: the one `wharf.toml` names, if any.
    pub cluster: Option<ClusterConfig>,
    /// The directories and environment variables services' manifests may
    /// name as secret sources, besides those `wharf.toml` hands out
    /// (`--secret-dir`, `--secret-env`). Nothing by default.
    pub secret_sources: SecretSources,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            services_dir: None,
            watch: true,
            allow_external_symlinks: false,
            limits: Limits::default(),
            limit_overrides: PartialLimits::default(),
            engine: EngineOptions::default(),
            data_dir: None,
            keyvalue: None,
            messaging: None,
            messaging_limits: MessagingLimits::default(),
            messaging_overrides: PartialMessagingLimits::default(),
            drain_timeout: DEFAULT_DRAIN_TIMEOUT,
            client_timeout: DEFAULT_CLIENT_TIMEOUT,
            max_call_depth: DEFAULT_MAX_CALL_DEPTH,
            cluster: None,
            secret_sources: SecretSources::default(),
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

    /// Sets the compiled-code cache root; `None` disables the cache.
    pub fn cache_dir(mut self, dir: Option<PathBuf>) -> Config {
        self.engine.cache_dir = dir;
        self
    }

    /// Sets which compilers turn components into native code (see
    /// [`Tiers`](crate::guest::engine::Tiers)).
    pub fn tiers(mut self, tiers: crate::guest::engine::Tiers) -> Config {
        self.engine.tiers = Some(tiers);
        self
    }

    /// Sets the data directory (see [`Config::data_dir`]).
    pub fn data_dir(mut self, dir: Option<PathBuf>) -> Config {
        self.data_dir = dir;
        self
    }

    /// Sets the default limits.
    pub fn limits(mut self, limits: Limits) -> Config {
        self.limits = limits;
        self
    }
}

/// The data directory used when none is configured, for a host serving
/// `services_dir`: under the platform's data directory (`~/.local/share` on
/// Linux), one per services directory (named after it, with a hash of its
/// canonical path), so two hosts serving different directories never share
/// state.
pub fn default_data_dir(services_dir: &std::path::Path) -> Option<PathBuf> {
    use sha2::Digest as _;
    let canonical = std::fs::canonicalize(services_dir)
        .or_else(|_| std::path::absolute(services_dir))
        .ok()?;
    let hash = sha2::Sha256::digest(canonical.as_os_str().as_encoded_bytes());
    let label: String = canonical
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("root")
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_'))
        .take(32)
        .collect();
    let key = format!(
        "{label}-{:02x}{:02x}{:02x}{:02x}",
        hash[0], hash[1], hash[2], hash[3]
    );
    dirs::data_dir().map(|dir| dir.join("wharf").join(key))
}
