//! Per-service manifests: the optional `NAME.toml` beside `NAME.wasm`,
//! parsed and validated into what a service is allowed. Errors name the key
//! and what was expected; unknown keys are errors, not silently ignored.
//!
//! ```toml
//! route = "/api/orders"          # default "/NAME"
//! [env]                          # the guest's whole environment
//! GREETING = "hello"
//! [limits]
//! timeout = "30s"
//! memory = "128MiB"
//! concurrency = 64
//! body = "16MiB"
//! [outbound]
//! allow = ["http://127.0.0.1:9000", "https://api.example.com"]
//! [instance]
//! reuse = 1                      # requests per instance; 1 = fresh each time
//! concurrent = 1                 # at once in one instance (WASI 0.3 only)
//! [keyvalue]
//! buckets = ["default"]          # the buckets it may open; "*" = any
//! [config]                       # wasi:config values
//! api_url = "https://api.example.com"
//! [secrets]                      # wasi:config values read at deploy time
//! db_password = { env = "ORDERS_DB_PASSWORD" }
//! signing_key = { file = "/run/secrets/signing" }
//! [messaging]
//! publish = ["orders.*"]         # topics it may publish to
//! subscribe = ["payments.*"]     # topics it may be triggered by (none without it)
//! [http]
//! request_id_header = true       # always show x-request-id and traceparent
//! expose_errors = true           # WHARF_EXPOSE_ERRORS=1: error details in 500s
//! [[trigger.message]]            # and [[trigger.schedule]]: see `triggers`
//! topic = "payments.done"
//! path = "/on-payment"
//! ```

use std::collections::BTreeMap;

use serde::Deserialize;

use std::sync::Arc;

use crate::base::limits::{LimitsTable, PartialLimits, parse_size};
use crate::capabilities::at_rest::AtRestKeys;
use crate::capabilities::keyvalue::KeyValueChoice;
use crate::capabilities::keyvalue::KeyValueGrant;
use crate::capabilities::messaging::MessagingGrant;
use crate::capabilities::messaging::choice::BrokerChoice;
use crate::capabilities::messaging::limits::PartialMessagingLimits;
use crate::capabilities::messaging::rabbitmq::QueueType;
use crate::capabilities::messaging::topic::TopicPattern;
use crate::capabilities::nats::Replicas;
use crate::capabilities::outbound::{AllowRule, OutboundPolicy};
use crate::capabilities::tls::BackendTls;
use crate::capabilities::wasi_config::{ConfigValues, SecretSource, SecretSources};
use crate::deploy::router::Route;
use crate::deploy::source::cluster_config::ClusterConfig;
use crate::deploy::spec::{HostPolicy, HttpOptions, ServiceConfig};
use crate::deploy::triggers::{TriggerTable, Triggers};
use crate::guest::engine::Tiers;

/// A manifest as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ManifestFile {
    route: Option<String>,
    #[serde(default)]
    env: BTreeMap<String, String>,
    #[serde(default)]
    limits: LimitsTable,
    #[serde(default)]
    outbound: OutboundTable,
    #[serde(default)]
    instance: InstanceTable,
    #[serde(default)]
    keyvalue: KeyValueTable,
    #[serde(default)]
    config: BTreeMap<String, String>,
    /// Raw values: a wrong shape must be reported without echoing the value
    /// (serde's own messages quote it), see [`secret_source`].
    #[serde(default)]
    secrets: BTreeMap<String, toml::Value>,
    #[serde(default)]
    messaging: MessagingTable,
    #[serde(default)]
    trigger: TriggerTable,
    #[serde(default)]
    http: HttpTable,
}

/// `[http]`: how requests are presented to the guest.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct HttpTable {
    request_id_header: Option<bool>,
    expose_errors: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct MessagingTable {
    #[serde(default)]
    publish: Vec<String>,
    #[serde(default)]
    subscribe: Vec<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyValueTable {
    #[serde(default)]
    buckets: Vec<String>,
}

/// Where secret `name` comes from, from its raw value in `[secrets]`:
/// `{ env = "VARIABLE" }` or `{ file = "/absolute/path" }`. The error names
/// the key and the expected shape but never the value, which may be the
/// secret itself written where its source belongs.
fn secret_source(name: &str, value: &toml::Value) -> Result<SecretSource, String> {
    let shape = || {
        format!(
            "secrets.{name}: give a table with exactly one of env = \"VARIABLE\" or file = \"/absolute/path\" (a secret's value never goes in the manifest; the value given is not shown)"
        )
    };
    let Some(table) = value.as_table() else {
        return Err(shape());
    };
    if table.len() != 1 {
        return Err(shape());
    }
    match table.iter().next() {
        Some((key, toml::Value::String(variable))) if key == "env" && !variable.is_empty() => {
            Ok(SecretSource::Env(variable.clone()))
        }
        Some((key, toml::Value::String(path))) if key == "file" && !path.is_empty() => {
            let path = std::path::PathBuf::from(path);
            if !path.is_absolute() {
                return Err(format!(
                    "secrets.{name}: the file is not named by an absolute path; name it by its full path, inside a directory the operator handed out for secrets (the path given is not shown)"
                ));
            }
            Ok(SecretSource::File(path))
        }
        _ => Err(shape()),
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct InstanceTable {
    reuse: Option<i64>,
    concurrent: Option<i64>,
}

/// Most requests one instance may serve in reuse mode.
pub const MAX_REUSE: u32 = 100_000;

/// Most requests one instance of a WASI 0.3 service may serve at once.
pub const MAX_CONCURRENT: u32 = 1_000;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct OutboundTable {
    #[serde(default)]
    allow: Vec<String>,
}

/// A validated manifest.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Manifest {
    /// The mount point, if not `/NAME`.
    pub route: Option<Route>,
    /// Environment variables for the guest, sorted by name.
    pub env: Vec<(String, String)>,
    /// Limits set by the manifest; the rest come from the host's defaults.
    pub limits: PartialLimits,
    /// Where the service may send HTTP requests.
    pub outbound: OutboundPolicy,
    /// Requests one instance may serve in turn, if set.
    pub reuse: Option<u32>,
    /// Requests one instance may serve at once, if set.
    pub concurrent: Option<u32>,
    /// The key-value buckets the service may open.
    pub keyvalue: KeyValueGrant,
    /// Plain `wasi:config` values.
    pub config: BTreeMap<String, String>,
    /// `wasi:config` secrets: where each is read from at deploy time.
    pub secrets: BTreeMap<String, SecretSource>,
    /// The topics the service may publish to.
    pub messaging: MessagingGrant,
    /// What triggers it besides HTTP (groups not yet defaulted).
    pub triggers: Triggers,
    /// How requests are presented to it.
    pub http: HttpOptions,
}

/// Renders a TOML error as one line: `line N: message`.
pub(crate) fn toml_error(text: &str, err: &toml::de::Error) -> String {
    let message = err.message().trim();
    match err.span() {
        Some(span) => {
            let line = text[..span.start.min(text.len())].matches('\n').count() + 1;
            format!("line {line}: {message}")
        }
        None => message.to_string(),
    }
}

impl Manifest {
    /// Parses and validates a manifest's text.
    pub fn parse(text: &str) -> Result<Manifest, String> {
        let file: ManifestFile = toml::from_str(text).map_err(|err| toml_error(text, &err))?;
        let route = file
            .route
            .as_deref()
            .map(|r| Route::parse(r).map_err(|why| format!("route: {why}")))
            .transpose()?;
        for (key, value) in &file.env {
            if key.is_empty() || key.contains(['=', '\0']) {
                return Err(format!(
                    "env: {key:?} is not a valid variable name (non-empty, no '=' or NUL)"
                ));
            }
            if value.contains('\0') {
                return Err(format!("env.{key}: the value contains a NUL character"));
            }
        }
        let limits = file.limits.validate()?;
        if limits.kv_bucket_quota.is_some() || limits.kv_max_buckets.is_some() {
            return Err(
                "limits: kv_bucket_quota and kv_max_buckets are the host's to set ([limits] and [keyvalue] quotas in wharf.toml): a bucket's quota is the same for every service that writes to it".into(),
            );
        }
        let rules = file
            .outbound
            .allow
            .iter()
            .map(|entry| AllowRule::parse(entry).map_err(|why| format!("outbound.allow: {why}")))
            .collect::<Result<Vec<_>, _>>()?;
        let reuse = file
            .instance
            .reuse
            .map(|n| match u32::try_from(n) {
                Ok(n) if (1..=MAX_REUSE).contains(&n) => Ok(n),
                _ => Err(format!(
                    "instance.reuse: {n} is not a whole number from 1 to {MAX_REUSE}"
                )),
            })
            .transpose()?;
        let concurrent = file
            .instance
            .concurrent
            .map(|n| match u32::try_from(n) {
                Ok(n) if (1..=MAX_CONCURRENT).contains(&n) => Ok(n),
                _ => Err(format!(
                    "instance.concurrent: {n} is not a whole number from 1 to {MAX_CONCURRENT}"
                )),
            })
            .transpose()?;
        if let Some(concurrent) = concurrent {
            let reuse = reuse.unwrap_or(1);
            if concurrent > reuse {
                return Err(format!(
                    "instance.concurrent: {concurrent} is more than instance.reuse ({reuse}), the requests an instance serves in all; raise reuse too"
                ));
            }
        }
        let keyvalue = KeyValueGrant::parse(&file.keyvalue.buckets)
            .map_err(|why| format!("keyvalue.buckets: {why}"))?;
        let messaging = MessagingGrant::parse(&file.messaging.publish)
            .map_err(|why| format!("messaging.publish: {why}"))?;
        let readable = file
            .messaging
            .subscribe
            .iter()
            .map(|entry| TopicPattern::parse(entry))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|why| format!("messaging.subscribe: {why}"))?;
        let triggers = file.trigger.validate(&readable)?;
        let messaging = messaging.with_subscriptions(readable);
        let mut secrets = BTreeMap::new();
        for (name, value) in &file.secrets {
            if file.config.contains_key(name) {
                return Err(format!(
                    "secrets.{name}: {name:?} is also in [config]; a key is either plain or secret"
                ));
            }
            secrets.insert(name.clone(), secret_source(name, value)?);
        }
        Ok(Manifest {
            route,
            env: file.env.into_iter().collect(),
            limits,
            outbound: OutboundPolicy::new(rules),
            reuse,
            concurrent,
            keyvalue,
            config: file.config,
            secrets,
            messaging,
            triggers,
            http: HttpOptions {
                request_id_header: file.http.request_id_header.unwrap_or(false),
                expose_errors: file.http.expose_errors.unwrap_or(false),
            },
        })
    }

    /// The service configuration this manifest gives service `name` under
    /// the host's `policy`. Reads the secrets (blocking: a secret may be a
    /// file), only from what the policy hands out; a missing one is an error
    /// naming it, and nothing else of it.
    pub fn service_config(&self, name: &str, policy: &HostPolicy) -> Result<ServiceConfig, String> {
        let defaults = policy.defaults;
        let mut secrets = BTreeMap::new();
        for (key, source) in &self.secrets {
            let value = source
                .resolve(&policy.secrets)
                .map_err(|why| format!("secrets.{key}: {why}"))?;
            secrets.insert(key.clone(), value);
        }
        let mut triggers = self.triggers.clone();
        triggers.resolve(name)?;
        Ok(ServiceConfig {
            route: self
                .route
                .clone()
                .unwrap_or_else(|| Route::for_service(name)),
            env: self.env.clone(),
            limits: self.limits.apply(defaults),
            outbound: self.outbound.clone(),
            reuse: self.reuse.unwrap_or(1),
            concurrent: self.concurrent.unwrap_or(1),
            keyvalue: self.keyvalue.clone(),
            config: Arc::new(ConfigValues::new(self.config.clone(), secrets)),
            messaging: self.messaging.clone(),
            triggers,
            bucket_quotas: Arc::new(policy.bucket_quotas.clone()),
            http: self.http,
        })
    }
}

/// The host-wide settings file, `wharf.toml` in the services directory:
/// defaults for every service, and the host's backends.
///
/// ```toml
/// [limits]
/// timeout = "10s"
/// memory = "256MiB"
/// concurrency = 32
/// body = "4MiB"
/// [keyvalue]
/// backend = "redis://HOST:PORT"        # or "embedded" (default), "nats://…"
/// quotas = { carts = "10MiB" }         # single buckets; others: [limits] kv_bucket_quota
/// [messaging]
/// backend = "nats://HOST:PORT"         # or "embedded" (default), "amqp://…"
/// max_pending = 1000000                # deliveries waiting
/// max_bytes = "1GiB"                   # stored in all, dead letters included
/// max_group_bytes = "256MiB"           # waiting for one group
/// max_dead_letters = 10000             # per group; the oldest dropped past it
/// max_dead_bytes = "64MiB"             # per group; likewise
/// publish_rate = 5000                  # messages/s per service (default "unlimited")
/// publish_bytes = "64MiB"              # bytes/s per service, or "unlimited"
/// [engine]
/// tiers = "tiered"                     # or "cranelift", "winch" (see `--tiers`)
/// keep_resident = "8MiB"               # see `--keep-resident`
/// [cluster]
/// url = "nats://HOST:PORT"             # join this cluster (see `--cluster`)
/// name = "prod"                        # default "default"
/// credentials = "nats.creds"           # relative to this file's directory
/// [secrets]                            # what manifests may name as secret sources
/// dirs = ["/run/secrets"]              # files inside these (relative: to this file's directory)
/// env = ["ORDERS_*", "DB_PASSWORD"]    # these variables (a trailing * is a prefix)
/// ```
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct HostFile {
    #[serde(default)]
    limits: LimitsTable,
    #[serde(default)]
    keyvalue: HostKeyValueTable,
    #[serde(default)]
    messaging: HostMessagingTable,
    #[serde(default)]
    engine: HostEngineTable,
    cluster: Option<HostClusterTable>,
    #[serde(default)]
    secrets: HostSecretsTable,
    tls: Option<HostTlsTable>,
    encryption: Option<HostEncryptionTable>,
    #[serde(default)]
    admin: HostAdminTable,
}

/// `[admin]`: how the admin endpoint is served.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct HostAdminTable {
    /// Refuse to serve it without TLS (`--tls-cert`, `--tls-key`).
    tls_required: Option<bool>,
}

/// `[encryption]`: the keys values are sealed with at rest; paths relative
/// to the services directory.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct HostEncryptionTable {
    key: std::path::PathBuf,
    #[serde(default)]
    previous: Vec<std::path::PathBuf>,
}

/// `[tls]`: how the host's connections to its backends are secured; paths
/// relative to the services directory.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct HostTlsTable {
    ca: Option<std::path::PathBuf>,
    cert: Option<std::path::PathBuf>,
    key: Option<std::path::PathBuf>,
}

/// `[secrets]`: the operator's hand-out of secret sources.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct HostSecretsTable {
    #[serde(default)]
    dirs: Vec<std::path::PathBuf>,
    #[serde(default)]
    env: Vec<String>,
}

/// `[engine]`: read when the host starts.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct HostEngineTable {
    tiers: Option<String>,
    keep_resident: Option<String>,
}

/// `[cluster]`: the host's name in it is not here, since one file often
/// serves many hosts (a Kubernetes ConfigMap); it comes from
/// `--cluster-host-id` or defaults to `HOSTNAME-PID`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct HostClusterTable {
    url: String,
    name: Option<String>,
    credentials: Option<std::path::PathBuf>,
    /// Copies of the cluster's own streams: a number or "auto".
    replicas: Option<toml::Value>,
    /// TLS to the cluster's NATS, instead of `[tls]`.
    tls: Option<HostTlsTable>,
}

/// `[messaging]`: the broker and its bounds.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct HostMessagingTable {
    backend: Option<String>,
    /// Copies of each NATS stream: a number or "auto".
    replicas: Option<toml::Value>,
    /// RabbitMQ's kind of group queue: "quorum" or "classic".
    queues: Option<String>,
    /// Partitions of each Kafka topic Wharf creates.
    partitions: Option<i64>,
    /// Whether message bodies are sealed with `[encryption] key` (default:
    /// whenever there is a key).
    encrypt: Option<bool>,
    /// The file the broker signs in with (Kafka SASL properties, a NATS
    /// `.creds`), relative to this file.
    credentials: Option<std::path::PathBuf>,
    max_pending: Option<i64>,
    max_bytes: Option<String>,
    max_group_bytes: Option<String>,
    max_dead_letters: Option<i64>,
    max_dead_bytes: Option<String>,
    /// Messages per second per service, or "unlimited".
    publish_rate: Option<toml::Value>,
    /// Bytes per second per service (`"64MiB"`), or "unlimited".
    publish_bytes: Option<String>,
    /// TLS to the broker, instead of `[tls]`.
    tls: Option<HostTlsTable>,
}

impl HostMessagingTable {
    /// The bounds set; errors name the key.
    fn limits(&self) -> Result<PartialMessagingLimits, String> {
        let count = |key: &str, value: Option<i64>| -> Result<Option<u64>, String> {
            value
                .map(|n| {
                    u64::try_from(n).ok().filter(|n| *n > 0).ok_or_else(|| {
                        format!("messaging.{key}: {n} is not a whole number above 0")
                    })
                })
                .transpose()
        };
        let size = |key: &str, value: &Option<String>| {
            parse_key(value.clone(), &format!("messaging.{key}"), parse_size)
        };
        let publish_rate = match &self.publish_rate {
            None => None,
            Some(toml::Value::String(text)) if text == "unlimited" => Some(None),
            Some(toml::Value::Integer(n)) => {
                Some(Some(count("publish_rate", Some(*n))?.unwrap_or_default()))
            }
            Some(_) => {
                return Err(
                    "messaging.publish_rate: give messages per second per service (a whole number) or \"unlimited\"".into(),
                );
            }
        };
        let publish_bytes = match self.publish_bytes.as_deref() {
            None => None,
            Some("unlimited") => Some(None),
            Some(text) => Some(Some(
                parse_size(text).map_err(|why| format!("messaging.publish_bytes: {why}"))?,
            )),
        };
        Ok(PartialMessagingLimits {
            max_pending: count("max_pending", self.max_pending)?,
            max_bytes: size("max_bytes", &self.max_bytes)?,
            max_group_bytes: size("max_group_bytes", &self.max_group_bytes)?,
            max_dead_letters: count("max_dead_letters", self.max_dead_letters)?,
            max_dead_bytes: size("max_dead_bytes", &self.max_dead_bytes)?,
            publish_rate,
            publish_bytes,
        })
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct HostKeyValueTable {
    backend: Option<String>,
    /// Copies of each NATS bucket: a number or "auto".
    replicas: Option<toml::Value>,
    /// Quotas of single buckets, by name.
    #[serde(default)]
    quotas: BTreeMap<String, String>,
    /// TLS to the key-value backend, instead of `[tls]`.
    tls: Option<HostTlsTable>,
}

/// What `wharf.toml` sets.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HostSettings {
    /// Default limits.
    pub limits: PartialLimits,
    /// The key-value backend, if chosen here.
    pub keyvalue: Option<KeyValueChoice>,
    /// The message broker, if chosen here.
    pub messaging: Option<BrokerChoice>,
    /// Copies of each NATS key-value bucket (`[keyvalue] replicas`).
    pub keyvalue_replicas: Option<Replicas>,
    /// Copies of each NATS message stream (`[messaging] replicas`).
    pub messaging_replicas: Option<Replicas>,
    /// RabbitMQ's kind of group queue (`[messaging] queues`).
    pub messaging_queues: Option<QueueType>,
    /// Partitions of each Kafka topic Wharf creates (`[messaging]
    /// partitions`).
    pub messaging_partitions: Option<u32>,
    /// The broker's credentials file (`[messaging] credentials`), resolved.
    pub messaging_credentials: Option<std::path::PathBuf>,
    /// Whether message bodies are sealed (`[messaging] encrypt`), if set.
    pub messaging_encrypt: Option<bool>,
    /// Whether the admin endpoint must use TLS (`[admin] tls_required`),
    /// if set.
    pub admin_tls_required: Option<bool>,
    /// The cluster to join, if named here.
    pub cluster: Option<ClusterConfig>,
    /// Which compilers to use, if chosen here.
    pub tiers: Option<Tiers>,
    /// Memory kept resident per instance slot of a large guest, if set here.
    pub keep_resident: Option<u64>,
    /// What `[secrets]` hands out (directories made canonical).
    pub secrets: SecretSources,
    /// The broker's bounds set under `[messaging]`.
    pub messaging_limits: PartialMessagingLimits,
    /// Quotas of single buckets (`[keyvalue] quotas`).
    pub bucket_quotas: BTreeMap<String, u64>,
    /// TLS to the backends (`[tls]`), paths resolved.
    pub tls: Option<BackendTls>,
    /// TLS to the key-value backend (`[keyvalue.tls]`), if it differs.
    pub keyvalue_tls: Option<BackendTls>,
    /// TLS to the broker (`[messaging.tls]`), if it differs.
    pub messaging_tls: Option<BackendTls>,
    /// The keys of encryption at rest (`[encryption]`), paths resolved.
    pub encryption: Option<AtRestKeys>,
}

/// Parses the value of `key`, if set, naming the key in the error.
fn parse_key<T>(
    value: Option<String>,
    key: &str,
    parse: impl FnOnce(&str) -> Result<T, String>,
) -> Result<Option<T>, String> {
    value
        .map(|text| parse(&text).map_err(|why| format!("{key}: {why}")))
        .transpose()
}

/// Parses a `replicas` setting: a number or "auto".
fn parse_replicas(value: Option<toml::Value>, key: &str) -> Result<Option<Replicas>, String> {
    let text = match value {
        None => return Ok(None),
        Some(toml::Value::Integer(n)) => n.to_string(),
        Some(toml::Value::String(text)) => text,
        Some(other) => other.to_string(),
    };
    text.parse()
        .map(Some)
        .map_err(|why| format!("{key}: {why}"))
}

impl HostFile {
    /// Parses and validates the file's text; relative paths in it are
    /// resolved against `dir` (the file's directory), once, here. Blocking:
    /// secret directories are made canonical.
    pub(crate) fn parse(text: &str, dir: &std::path::Path) -> Result<HostSettings, String> {
        let file: HostFile = toml::from_str(text).map_err(|err| toml_error(text, &err))?;
        let secrets = SecretSources::new(
            file.secrets.dirs.iter().map(|path| dir.join(path)),
            file.secrets.env,
        )
        .map_err(|why| format!("secrets: {why}"))?;
        let mut bucket_quotas = BTreeMap::new();
        for (bucket, quota) in &file.keyvalue.quotas {
            crate::capabilities::keyvalue::validate_bucket_name(bucket)
                .map_err(|why| format!("keyvalue.quotas: {why}"))?;
            let quota =
                parse_size(quota).map_err(|why| format!("keyvalue.quotas.{bucket}: {why}"))?;
            bucket_quotas.insert(bucket.clone(), quota);
        }
        let keyvalue = parse_key(file.keyvalue.backend, "keyvalue.backend", str::parse)?;
        let keyvalue_replicas = parse_replicas(file.keyvalue.replicas, "keyvalue.replicas")?;
        let messaging_replicas =
            parse_replicas(file.messaging.replicas.clone(), "messaging.replicas")?;
        let messaging_queues = parse_key(
            file.messaging.queues.clone(),
            "messaging.queues",
            str::parse,
        )?;
        let messaging_limits = file.messaging.limits()?;
        let messaging_partitions = file
            .messaging
            .partitions
            .map(|n| {
                u32::try_from(n)
                    .ok()
                    .filter(|n| (1..=10_000).contains(n))
                    .ok_or_else(|| {
                        format!("messaging.partitions: {n} is not a number from 1 to 10000")
                    })
            })
            .transpose()?;
        let messaging_credentials = file.messaging.credentials.map(|path| dir.join(path));
        let messaging_encrypt = file.messaging.encrypt;
        let messaging = parse_key(file.messaging.backend, "messaging.backend", str::parse)?;
        let resolve_tls = |table: Option<HostTlsTable>, section: &str| {
            table
                .map(|table| {
                    let tls = BackendTls {
                        ca: table.ca.map(|path| dir.join(path)),
                        cert: table.cert.map(|path| dir.join(path)),
                        key: table.key.map(|path| dir.join(path)),
                    };
                    tls.validate().map(|()| tls)
                })
                .transpose()
                .map_err(|why| format!("{section}{why}"))
        };
        let cluster = file
            .cluster
            .map(|table| {
                let mut cluster = ClusterConfig::new(table.url);
                if let Some(name) = table.name {
                    cluster.name = name;
                }
                cluster.credentials = table.credentials.map(|path| dir.join(path));
                if let Some(replicas) = parse_replicas(table.replicas, "cluster.replicas")? {
                    cluster.replicas = replicas;
                }
                cluster.tls = resolve_tls(table.tls, "cluster.")?.unwrap_or_default();
                cluster
                    .validate()
                    .map(|()| cluster)
                    .map_err(|why| format!("cluster: {why}"))
            })
            .transpose()?;
        let tls = resolve_tls(file.tls, "")?;
        let keyvalue_tls = resolve_tls(file.keyvalue.tls, "keyvalue.")?;
        let messaging_tls = resolve_tls(file.messaging.tls, "messaging.")?;
        let encryption = file.encryption.map(|table| AtRestKeys {
            key: dir.join(table.key),
            previous: table.previous.iter().map(|path| dir.join(path)).collect(),
        });
        let tiers = parse_key(file.engine.tiers, "engine.tiers", str::parse)?;
        let keep_resident = parse_key(
            file.engine.keep_resident,
            "engine.keep_resident",
            crate::base::limits::parse_memory,
        )?;
        Ok(HostSettings {
            limits: file.limits.validate()?,
            keyvalue,
            messaging,
            keyvalue_replicas,
            messaging_replicas,
            messaging_queues,
            messaging_partitions,
            messaging_credentials,
            messaging_encrypt,
            admin_tls_required: file.admin.tls_required,
            tls,
            keyvalue_tls,
            messaging_tls,
            encryption,
            cluster,
            tiers,
            keep_resident,
            secrets,
            messaging_limits,
            bucket_quotas,
        })
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::base::limits::Limits;

    impl HostFile {
        /// Parses a `wharf.toml` said to be in `/srv`.
        fn parse_here(text: &str) -> Result<HostSettings, String> {
            HostFile::parse(text, std::path::Path::new("/srv"))
        }
    }

    #[test]
    fn regression_secret_values_never_appear_in_manifest_errors() {
        for text in [
            "[secrets]\ndb_password = \"hunter2\"",
            "[secrets]\ndb_password = { value = \"hunter2\" }",
            "[secrets]\ndb_password = { env = \"hunter2\", file = \"/hunter2\" }",
            "[secrets]\ndb_password = [\"hunter2\"]",
            "[secrets]\ndb_password = { file = \"hunter2\" }",
            "[secrets]\ndb_password = { env = 12345 }",
        ] {
            let err = Manifest::parse(text).unwrap_err();
            assert!(err.contains("secrets.db_password"), "{text}: {err}");
            assert!(
                !err.contains("hunter2") && !err.contains("12345"),
                "{text}: {err}"
            );
        }
        let manifest =
            Manifest::parse("[secrets]\na = { env = \"A\" }\nb = { file = \"/run/b\" }").unwrap();
        assert_eq!(manifest.secrets["a"], SecretSource::Env("A".into()));
        assert_eq!(manifest.secrets["b"], SecretSource::File("/run/b".into()));
    }

    #[test]
    fn host_file_hands_out_secret_sources() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("secrets")).unwrap();
        let settings = HostFile::parse(
            "[secrets]\ndirs = [\"secrets\"]\nenv = [\"APP_*\"]\n",
            dir.path(),
        )
        .unwrap();
        let canonical = std::fs::canonicalize(dir.path().join("secrets")).unwrap();
        assert_eq!(settings.secrets.dirs(), [canonical]);
        assert!(settings.secrets.allows_env("APP_TOKEN"));
        let err = HostFile::parse("[secrets]\ndirs = [\"missing\"]\n", dir.path()).unwrap_err();
        assert!(err.contains("secrets: secret directory"), "{err}");
    }

    #[test]
    fn full_manifest() {
        let manifest = Manifest::parse(
            r#"
            route = "/api/orders"
            [env]
            GREETING = "hello"
            [limits]
            timeout = "5s"
            memory = "64MiB"
            concurrency = 8
            body = "1MiB"
            [outbound]
            allow = ["http://127.0.0.1:9000", "https://api.example.com"]
            [instance]
            reuse = 128
            concurrent = 16
            "#,
        )
        .unwrap();
        let config = manifest
            .service_config("orders", &HostPolicy::default())
            .unwrap();
        assert_eq!(config.route.as_str(), "/api/orders");
        assert_eq!(config.env, [("GREETING".to_string(), "hello".to_string())]);
        assert_eq!(config.limits.timeout, Duration::from_secs(5));
        assert_eq!(config.limits.memory, 64 << 20);
        assert_eq!(config.limits.concurrency, 8);
        assert_eq!(config.limits.body, 1 << 20);
        assert_eq!(config.outbound.rules().len(), 2);
        assert_eq!(config.reuse, 128);
        assert_eq!(config.concurrent, 16);
        let plain = Manifest::parse("").unwrap();
        let config = plain
            .service_config("orders", &HostPolicy::default())
            .unwrap();
        assert_eq!((config.reuse, config.concurrent), (1, 1));
    }

    #[test]
    fn empty_manifest_means_defaults() {
        let config = Manifest::parse("")
            .unwrap()
            .service_config("svc", &HostPolicy::default())
            .unwrap();
        assert_eq!(config, ServiceConfig::defaults("svc", Limits::default()));
    }

    #[test]
    fn errors_name_the_key_and_line() {
        for (text, needle) in [
            ("rout = \"/x\"", "line 1: unknown field `rout`"),
            ("route = \"x\"", "route: route \"x\" must start with \"/\""),
            (
                "route = 5",
                "line 1: invalid type: integer `5`, expected a string",
            ),
            ("[limits]\ntimeout = \"forever\"", "limits.timeout:"),
            ("[limits]\nmemory = \"10GiB\"", "limits.memory:"),
            ("[limits]\nconcurrency = -1", "limits.concurrency:"),
            ("[limits]\ngpu = 1", "line 2: unknown field `gpu`"),
            (
                "[limits]\ncpu = 1",
                "line 2: invalid type: integer `1`, expected a string",
            ),
            ("[limits]\ncpu = \"lots\"", "limits.cpu:"),
            (
                "[env]\nPORT = 80",
                "line 2: invalid type: integer `80`, expected a string",
            ),
            (
                "[env]\n\"A=B\" = \"x\"",
                "env: \"A=B\" is not a valid variable name",
            ),
            (
                "[outbound]\nallow = [\"example.com\"]",
                "outbound.allow: \"example.com\" needs a scheme",
            ),
            ("[outbound]\ndeny = []", "unknown field `deny`"),
            ("route = ", "line 1:"),
            (
                "[instance]\nreuse = 0",
                "instance.reuse: 0 is not a whole number",
            ),
            ("[instance]\nreused = 2", "unknown field `reused`"),
            (
                "[instance]\nreuse = 8\nconcurrent = 0",
                "instance.concurrent: 0 is not a whole number from 1 to 1000",
            ),
            (
                "[instance]\nconcurrent = 4",
                "instance.concurrent: 4 is more than instance.reuse (1)",
            ),
            (
                "[limits]\nkv_bucket_quota = \"100GiB\"",
                "the host's to set",
            ),
            ("[limits]\nkv_max_buckets = 100000", "the host's to set"),
        ] {
            let err = Manifest::parse(text).unwrap_err();
            assert!(err.contains(needle), "{text:?}: {err}");
            assert!(!err.contains('\n'), "one line: {err}");
        }
    }
    #[test]
    fn host_file_sets_default_limits() {
        let settings = HostFile::parse_here("[limits]\ntimeout = \"10s\"").unwrap();
        assert_eq!(settings.limits.timeout, Some(Duration::from_secs(10)));
        let settings =
            HostFile::parse_here("[keyvalue]\nbackend = \"redis://127.0.0.1:1\"").unwrap();
        assert_eq!(
            settings.keyvalue,
            Some(KeyValueChoice::Redis("redis://127.0.0.1:1".into()))
        );
        assert!(
            HostFile::parse_here("[keyvalue]\nbackend = \"mongo://x\"")
                .unwrap_err()
                .contains("keyvalue.backend")
        );
        assert!(
            HostFile::parse_here("[limit]\n")
                .unwrap_err()
                .contains("unknown field `limit`")
        );
        assert!(
            HostFile::parse_here("[limits]\nbody = \"0\"")
                .unwrap_err()
                .contains("limits.body")
        );
    }

    #[test]
    fn host_file_bounds_the_broker() {
        let settings = HostFile::parse_here(
            "[messaging]\nmax_bytes = \"10MiB\"\nmax_dead_letters = 5\npublish_rate = 100\npublish_bytes = \"unlimited\"\n",
        )
        .unwrap();
        let limits = settings.messaging_limits;
        assert_eq!(limits.max_bytes, Some(10 << 20));
        assert_eq!(limits.max_dead_letters, Some(5));
        assert_eq!(limits.publish_rate, Some(Some(100)));
        assert_eq!(limits.publish_bytes, Some(None));
        for (text, needle) in [
            ("[messaging]\nmax_pending = 0\n", "messaging.max_pending"),
            ("[messaging]\nmax_bytes = \"lots\"\n", "messaging.max_bytes"),
            (
                "[messaging]\npublish_rate = \"fast\"\n",
                "messaging.publish_rate",
            ),
        ] {
            let err = HostFile::parse_here(text).unwrap_err();
            assert!(err.contains(needle), "{text:?}: {err}");
        }
    }

    #[test]
    fn host_file_names_the_encryption_keys_relative_to_itself() {
        let settings = HostFile::parse_here(
            "[encryption]\nkey = \"keys/now.key\"\nprevious = [\"/etc/old.key\"]\n",
        )
        .unwrap();
        assert_eq!(
            settings.encryption,
            Some(AtRestKeys {
                key: "/srv/keys/now.key".into(),
                previous: vec!["/etc/old.key".into()],
            })
        );
        let err = HostFile::parse_here("[encryption]\nprevious = []\n").unwrap_err();
        assert!(err.contains("missing field `key`"), "{err}");
        let settings = HostFile::parse_here("[messaging]\nencrypt = false\n").unwrap();
        assert_eq!(settings.messaging_encrypt, Some(false));
        let err = HostFile::parse_here("[messaging]\nencrypt = \"yes\"\n").unwrap_err();
        assert!(err.contains("line 2") && err.contains("boolean"), "{err}");
        let settings = HostFile::parse_here("[admin]\ntls_required = true\n").unwrap();
        assert_eq!(settings.admin_tls_required, Some(true));
        assert!(HostFile::parse_here("[admin]\ntls = true\n").is_err());
    }

    #[test]
    fn host_file_kafka_settings_are_checked_and_resolved() {
        let settings = HostFile::parse_here(
            "[messaging]\nbackend = \"kafkas://k1:9093,k2:9093\"\npartitions = 6\ncredentials = \"kafka.properties\"\n",
        )
        .unwrap();
        assert_eq!(
            settings.messaging,
            Some(BrokerChoice::Kafka("kafkas://k1:9093,k2:9093".into()))
        );
        assert_eq!(settings.messaging_partitions, Some(6));
        assert_eq!(
            settings.messaging_credentials,
            Some("/srv/kafka.properties".into())
        );
        for bad in ["partitions = 0", "partitions = -3", "partitions = 100000"] {
            let err = HostFile::parse_here(&format!("[messaging]\n{bad}\n")).unwrap_err();
            assert!(err.contains("messaging.partitions"), "{bad}: {err}");
        }
    }

    #[test]
    fn host_file_tls_can_differ_per_backend() {
        let settings = HostFile::parse_here(
            "[tls]\nca = \"ca.pem\"\n[keyvalue.tls]\nca = \"redis-ca.pem\"\n[cluster]\nurl = \"tls://n:4222\"\n[cluster.tls]\nca = \"nats-ca.pem\"\ncert = \"c.pem\"\nkey = \"k.pem\"\n",
        )
        .unwrap();
        let ca = |name: &str| BackendTls {
            ca: Some(format!("/srv/{name}").into()),
            ..BackendTls::default()
        };
        assert_eq!(settings.tls, Some(ca("ca.pem")));
        assert_eq!(settings.keyvalue_tls, Some(ca("redis-ca.pem")));
        assert_eq!(settings.messaging_tls, None);
        let cluster = settings.cluster.unwrap().tls;
        assert_eq!(cluster.ca, Some("/srv/nats-ca.pem".into()));
        assert_eq!(cluster.key, Some("/srv/k.pem".into()));
        let err = HostFile::parse_here("[messaging.tls]\ncert = \"c.pem\"\n").unwrap_err();
        assert!(
            err.contains("messaging.tls: cert and key go together"),
            "{err}"
        );
    }

    #[test]
    fn host_file_names_the_cluster() {
        let settings = HostFile::parse_here(
            "[cluster]\nurl = \"nats://nats.example:4222\"\nname = \"prod\"\ncredentials = \"nats.creds\"\n",
        )
        .unwrap();
        let cluster = settings.cluster.unwrap();
        assert_eq!(cluster.url, "nats://nats.example:4222");
        assert_eq!(cluster.name, "prod");
        assert_eq!(cluster.credentials, Some("/srv/nats.creds".into()));
        assert_eq!(cluster.host_id, None);
        let unnamed =
            HostFile::parse_here("[cluster]\nurl = \"nats://nats.example:4222\"\n").unwrap();
        assert_eq!(unnamed.cluster.unwrap().name, "default");
        for (text, needle) in [
            ("[cluster]\nurl = \"http://x\"\n", "cluster: cluster URL"),
            (
                "[cluster]\nurl = \"nats://x\"\nname = \"a.b\"\n",
                "cluster: cluster name",
            ),
            ("[cluster]\nname = \"prod\"\n", "missing field `url`"),
            (
                "[cluster]\nurl = \"nats://x\"\nhost_id = \"h1\"\n",
                "unknown field `host_id`",
            ),
        ] {
            let err = HostFile::parse_here(text).unwrap_err();
            assert!(err.contains(needle), "{text:?}: {err}");
        }
    }
}

#[cfg(test)]
mod properties {
    use proptest::prelude::*;

    use super::*;

    proptest! {
        #[test]
        fn parsing_arbitrary_text_never_panics(text in any::<String>()) {
            let _ = Manifest::parse(&text);
        }

        #[test]
        fn parsing_manifest_shaped_text_never_panics_and_errors_are_one_line(
            route in "[ -~]{0,12}",
            timeout in "[ -~]{0,8}",
            memory in "[ -~]{0,8}",
            concurrency in any::<i64>(),
            allow in "[ -~]{0,24}",
            key in "[A-Za-z=_]{0,6}",
        ) {
            let text = format!(
                "route = {route:?}\n[env]\n{key:?} = \"v\"\n[limits]\ntimeout = {timeout:?}\nmemory = {memory:?}\nconcurrency = {concurrency}\n[outbound]\nallow = [{allow:?}]\n"
            );
            if let Err(err) = Manifest::parse(&text) {
                prop_assert!(!err.contains('\n'), "{}", err);
            }
        }
    }
}
