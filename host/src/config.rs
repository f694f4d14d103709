//! Host-wide configuration: where services come from, the default limits,
//! engine sizing and shutdown behaviour. Built by the CLI or by an embedder.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Result, bail, ensure};

use crate::base::limits::{Limits, MAX_DURATION, PartialLimits, format_size};
use crate::capabilities::at_rest::AtRestKeys;
use crate::capabilities::keyvalue::KeyValueChoice;
use crate::capabilities::messaging::rabbitmq::QueueType;
use crate::capabilities::messaging::{BrokerChoice, MessagingLimits, PartialMessagingLimits};
use crate::capabilities::nats::Replicas;
use crate::capabilities::tls::BackendTls;
use crate::capabilities::wasi_config::SecretSources;
use crate::deploy::source::cluster::ClusterConfig;
use crate::deploy::source::manifest::HostSettings;
use crate::deploy::spec::HostPolicy;
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
    /// How many NATS servers keep a copy of every bucket, stream and object
    /// store Wharf creates (`--replicas`); `None`: what `wharf.toml` says
    /// per section, else as many as the NATS cluster has servers, at most
    /// three.
    pub replicas: Option<Replicas>,
    /// What kind of queue RabbitMQ keeps each group in (`--queue-type`);
    /// `None`: what `wharf.toml` says, else quorum queues.
    pub queues: Option<QueueType>,
    /// TLS to the backends (`--backend-tls-*`); `None`: `[tls]` in
    /// `wharf.toml`, else none.
    pub backend_tls: Option<BackendTls>,
    /// The keys values are encrypted with at rest (`--encryption-key`);
    /// `None`: `[encryption]` in `wharf.toml`, else values are stored as
    /// they are.
    pub encryption: Option<AtRestKeys>,
    /// The directories and environment variables services' manifests may
    /// name as secret sources, besides those `wharf.toml` hands out
    /// (`--secret-dir`, `--secret-env`). Nothing by default.
    pub secret_sources: SecretSources,
    /// Whether the admin endpoint must be served over TLS
    /// (`--admin-tls-required`); `None`: `[admin] tls_required` in
    /// `wharf.toml`, else not.
    pub admin_tls_required: Option<bool>,
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
            replicas: None,
            queues: None,
            backend_tls: None,
            encryption: None,
            secret_sources: SecretSources::default(),
            admin_tls_required: None,
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

/// What a host runs with: its [`Config`] merged over the services
/// directory's `wharf.toml`, checked (see [`Config::settle`]).
#[derive(Debug, Clone)]
pub(crate) struct Settled {
    /// The cluster to join, with this host's id in it.
    pub cluster: Option<ClusterConfig>,
    /// The engine's settings.
    pub engine: EngineOptions,
    /// What manifests are measured against.
    pub policy: HostPolicy,
    /// The key-value backend.
    pub keyvalue: KeyValueChoice,
    /// The message broker.
    pub messaging: BrokerChoice,
    /// Copies of each NATS key-value bucket.
    pub keyvalue_replicas: Replicas,
    /// Copies of each NATS message stream.
    pub messaging_replicas: Replicas,
    /// RabbitMQ's kind of group queue.
    pub messaging_queues: QueueType,
    /// Partitions of each Kafka topic Wharf creates (`None`: the default).
    pub messaging_partitions: Option<u32>,
    /// TLS to the key-value backend: `[keyvalue.tls]`, else the flags or
    /// `[tls]`.
    pub keyvalue_tls: BackendTls,
    /// TLS to the broker: `[messaging.tls]`, else the flags or `[tls]`.
    pub messaging_tls: BackendTls,
    /// The NATS credentials file the key-value backend signs in with: the
    /// cluster's, when the backend is the cluster's NATS.
    pub keyvalue_credentials: Option<PathBuf>,
    /// The credentials file the broker signs in with: `[messaging]
    /// credentials` (Kafka SASL, NATS), else the cluster's when the broker
    /// is the cluster's NATS.
    pub messaging_credentials: Option<PathBuf>,
    /// The keys of encryption at rest, if values are encrypted.
    pub encryption: Option<AtRestKeys>,
    /// Whether message bodies are sealed with those keys (`[messaging]
    /// encrypt`; by default, whenever there are keys).
    pub messaging_encrypt: bool,
    /// Whether the admin endpoint must be served over TLS.
    pub admin_tls_required: bool,
    /// The broker's bounds.
    pub messaging_limits: MessagingLimits,
}

impl Config {
    /// Merges the configuration over `file` (what `wharf.toml` says) and
    /// checks the result. Each setting is the configuration's if it has
    /// one, else the file's, else — for key-value and messaging in a
    /// cluster — the cluster's NATS, else the default; `host_id` names this
    /// host in a cluster that names none. Pure: reads nothing.
    pub(crate) fn settle(
        &self,
        file: HostSettings,
        host_id: impl FnOnce() -> String,
    ) -> Result<Settled> {
        let defaults = self.limit_overrides.apply(self.limits);
        for (what, duration) in [
            ("the default timeout", defaults.timeout),
            ("the default cpu limit", defaults.cpu),
            ("the drain timeout", self.drain_timeout),
            ("the client timeout", self.client_timeout),
        ] {
            ensure!(
                duration <= MAX_DURATION,
                "{what} ({}) is longer than the longest Wharf takes, {}",
                humantime::format_duration(duration),
                humantime::format_duration(MAX_DURATION)
            );
        }
        if defaults.memory > self.engine.max_service_memory {
            bail!(
                "the default memory limit ({}) is more than --max-service-memory ({}): no service without its own limits.memory could deploy",
                format_size(defaults.memory),
                format_size(self.engine.max_service_memory)
            );
        }
        let tls = self.backend_tls.clone().or(file.tls).unwrap_or_default();
        let cluster = self.cluster.clone().or(file.cluster).map(|mut cluster| {
            cluster.host_id.get_or_insert_with(host_id);
            if !cluster.tls.is_set() {
                cluster.tls = tls.clone();
            }
            if let Some(replicas) = self.replicas {
                cluster.replicas = replicas;
            }
            cluster
        });
        if cluster.is_some() && self.services_dir.is_none() {
            bail!(
                "a cluster host needs a services directory: the cluster's services are kept there"
            );
        }
        let mut engine = self.engine.clone();
        engine.tiers = engine.tiers.or(file.tiers);
        engine.keep_resident = engine.keep_resident.or(file.keep_resident);
        // In a cluster, state and messages default to the cluster's NATS,
        // so every host shares them.
        let cluster_nats = cluster.as_ref().map(|cluster| cluster.url.clone());
        let keyvalue = self
            .keyvalue
            .clone()
            .or(file.keyvalue)
            .or_else(|| cluster_nats.clone().map(KeyValueChoice::Nats))
            .unwrap_or_default();
        let messaging = self
            .messaging
            .clone()
            .or(file.messaging)
            .or_else(|| cluster_nats.map(BrokerChoice::Nats))
            .unwrap_or_default();
        // A backend on the cluster's own NATS signs in as the cluster does.
        let cluster_credentials = |url: &str| {
            cluster
                .as_ref()
                .filter(|cluster| cluster.url.trim() == url.trim())
                .and_then(|cluster| cluster.credentials.clone())
        };
        let keyvalue_credentials = match &keyvalue {
            KeyValueChoice::Nats(url) => cluster_credentials(url),
            _ => None,
        };
        let messaging_credentials = file.messaging_credentials.or(match &messaging {
            BrokerChoice::Nats(url) => cluster_credentials(url),
            _ => None,
        });
        // Copies: the flag, else the section's own, else the cluster's.
        let cluster_replicas = cluster.as_ref().map(|cluster| cluster.replicas);
        let replicas = |section: Option<Replicas>| {
            self.replicas
                .or(section)
                .or(cluster_replicas)
                .unwrap_or_default()
        };
        let keyvalue_replicas = replicas(file.keyvalue_replicas);
        let messaging_replicas = replicas(file.messaging_replicas);
        let messaging_limits = self
            .messaging_overrides
            .apply(file.messaging_limits.apply(self.messaging_limits));
        let encryption = self.encryption.clone().or(file.encryption);
        if file.messaging_encrypt == Some(true) && encryption.is_none() {
            bail!(
                "messaging.encrypt: sealing message bodies needs a key: add [encryption] key = \"FILE\" or pass --encryption-key"
            );
        }
        let messaging_encrypt = encryption.is_some() && file.messaging_encrypt != Some(false);
        Ok(Settled {
            cluster,
            engine,
            policy: HostPolicy {
                defaults,
                secrets: self.secret_sources.merged(&file.secrets),
                bucket_quotas: file.bucket_quotas,
            },
            keyvalue,
            messaging,
            keyvalue_replicas,
            messaging_replicas,
            messaging_queues: self.queues.or(file.messaging_queues).unwrap_or_default(),
            messaging_partitions: file.messaging_partitions,
            keyvalue_tls: file.keyvalue_tls.unwrap_or_else(|| tls.clone()),
            messaging_tls: file.messaging_tls.unwrap_or_else(|| tls.clone()),
            keyvalue_credentials,
            messaging_credentials,
            encryption,
            messaging_encrypt,
            admin_tls_required: self
                .admin_tls_required
                .or(file.admin_tls_required)
                .unwrap_or(false),
            messaging_limits,
        })
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

#[cfg(test)]
mod tests {
    use super::*;

    fn host_id() -> String {
        "test-host".into()
    }

    #[test]
    fn the_configuration_wins_over_the_file_and_the_file_over_defaults() {
        let file = HostSettings {
            keyvalue: Some(KeyValueChoice::Redis("redis://file".into())),
            messaging: Some(BrokerChoice::Nats("nats://file".into())),
            tiers: Some(crate::guest::engine::Tiers::Winch),
            keep_resident: Some(1 << 20),
            ..HostSettings::default()
        };
        let settled = Config::default().settle(file.clone(), host_id).unwrap();
        assert_eq!(
            settled.keyvalue,
            KeyValueChoice::Redis("redis://file".into())
        );
        assert_eq!(settled.messaging, BrokerChoice::Nats("nats://file".into()));
        assert_eq!(
            settled.engine.tiers,
            Some(crate::guest::engine::Tiers::Winch)
        );
        assert_eq!(settled.engine.keep_resident, Some(1 << 20));

        let mut config = Config {
            keyvalue: Some(KeyValueChoice::Embedded),
            ..Config::default()
        };
        config.engine.tiers = Some(crate::guest::engine::Tiers::Cranelift);
        let settled = config.settle(file, host_id).unwrap();
        assert_eq!(settled.keyvalue, KeyValueChoice::Embedded);
        assert_eq!(settled.messaging, BrokerChoice::Nats("nats://file".into()));
        assert_eq!(
            settled.engine.tiers,
            Some(crate::guest::engine::Tiers::Cranelift)
        );

        let settled = Config::default()
            .settle(HostSettings::default(), host_id)
            .unwrap();
        assert_eq!(settled.keyvalue, KeyValueChoice::default());
        assert_eq!(settled.messaging, BrokerChoice::default());
        assert_eq!(settled.cluster, None);
    }

    #[test]
    fn regression_backends_on_the_clusters_nats_sign_in_with_its_credentials() {
        // The key-value backend and the broker defaulted to the cluster's
        // NATS but connected without its credentials file, so a NATS that
        // requires one refused them while the cluster itself joined.
        let mut cluster = ClusterConfig::new("nats://cluster:4222");
        cluster.credentials = Some("/srv/wharf.creds".into());
        let file = HostSettings {
            cluster: Some(cluster),
            ..HostSettings::default()
        };
        let settled = Config::for_dir("services")
            .settle(file.clone(), host_id)
            .unwrap();
        let creds = Some(PathBuf::from("/srv/wharf.creds"));
        assert_eq!(settled.keyvalue_credentials, creds);
        assert_eq!(settled.messaging_credentials, creds);
        // A backend on another NATS does not get them.
        let mut config = Config::for_dir("services");
        config.keyvalue = Some(KeyValueChoice::Nats("nats://elsewhere:4222".into()));
        let settled = config.settle(file, host_id).unwrap();
        assert_eq!(settled.keyvalue_credentials, None);
        assert_eq!(settled.messaging_credentials, creds);
    }

    #[test]
    fn message_bodies_are_sealed_whenever_there_is_a_key_unless_turned_off() {
        let keys = AtRestKeys {
            key: "/srv/wharf.key".into(),
            previous: Vec::new(),
        };
        let with_key = HostSettings {
            encryption: Some(keys.clone()),
            ..HostSettings::default()
        };
        let settled = Config::default().settle(with_key.clone(), host_id).unwrap();
        assert!(settled.messaging_encrypt);
        let off = HostSettings {
            messaging_encrypt: Some(false),
            ..with_key
        };
        assert!(
            !Config::default()
                .settle(off, host_id)
                .unwrap()
                .messaging_encrypt
        );
        // No key, nothing to seal with; asked for anyway, a clear error —
        // unless the key comes from the command line.
        let settled = Config::default()
            .settle(HostSettings::default(), host_id)
            .unwrap();
        assert!(!settled.messaging_encrypt);
        let asked = HostSettings {
            messaging_encrypt: Some(true),
            ..HostSettings::default()
        };
        let err = Config::default()
            .settle(asked.clone(), host_id)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("messaging.encrypt") && err.contains("key"),
            "{err}"
        );
        let config = Config {
            encryption: Some(keys),
            ..Config::default()
        };
        assert!(config.settle(asked, host_id).unwrap().messaging_encrypt);
    }

    #[test]
    fn a_backends_own_tls_wins_over_the_shared_one() {
        let shared = BackendTls {
            ca: Some("shared.pem".into()),
            ..BackendTls::default()
        };
        let own = BackendTls {
            ca: Some("redis.pem".into()),
            ..BackendTls::default()
        };
        let file = HostSettings {
            keyvalue_tls: Some(own.clone()),
            ..HostSettings::default()
        };
        let mut config = Config::for_dir("services");
        config.backend_tls = Some(shared.clone());
        let settled = config.settle(file, host_id).unwrap();
        assert_eq!(settled.keyvalue_tls, own);
        assert_eq!(settled.messaging_tls, shared);
    }

    #[test]
    fn a_cluster_brings_its_nats_and_a_host_id() {
        let file = HostSettings {
            cluster: Some(ClusterConfig::new("nats://cluster:4222")),
            ..HostSettings::default()
        };
        let settled = Config::for_dir("services")
            .settle(file.clone(), host_id)
            .unwrap();
        let cluster = settled.cluster.unwrap();
        assert_eq!(cluster.host_id.as_deref(), Some("test-host"));
        assert_eq!(
            settled.keyvalue,
            KeyValueChoice::Nats("nats://cluster:4222".into())
        );
        assert_eq!(
            settled.messaging,
            BrokerChoice::Nats("nats://cluster:4222".into())
        );
        // A host id given is kept; a cluster needs a directory.
        let mut named = ClusterConfig::new("nats://other:4222");
        named.host_id = Some("mine".into());
        let mut config = Config::for_dir("services");
        config.cluster = Some(named);
        let settled = config.settle(file.clone(), host_id).unwrap();
        assert_eq!(settled.cluster.unwrap().host_id.as_deref(), Some("mine"));
        let err = Config::default().settle(file, host_id).unwrap_err();
        assert!(
            err.to_string().contains("needs a services directory"),
            "{err}"
        );
    }

    #[test]
    fn limits_merge_flags_over_the_file_and_are_checked() {
        let file = HostSettings {
            messaging_limits: PartialMessagingLimits {
                max_pending: Some(10),
                max_bytes: Some(1000),
                ..PartialMessagingLimits::default()
            },
            ..HostSettings::default()
        };
        let mut config = Config::default();
        config.messaging_overrides.max_pending = Some(5);
        let settled = config.settle(file, host_id).unwrap();
        assert_eq!(settled.messaging_limits.max_pending, 5);
        assert_eq!(settled.messaging_limits.max_bytes, 1000);

        let config = Config {
            drain_timeout: MAX_DURATION * 2,
            ..Config::default()
        };
        let err = config.settle(HostSettings::default(), host_id).unwrap_err();
        assert!(err.to_string().contains("the drain timeout"), "{err}");
        let mut config = Config::default();
        config.engine.max_service_memory = 1 << 20;
        let err = config.settle(HostSettings::default(), host_id).unwrap_err();
        assert!(err.to_string().contains("--max-service-memory"), "{err}");
    }
}
