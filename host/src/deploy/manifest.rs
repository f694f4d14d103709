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
//! subscribe = ["payments.*"]     # if given: the only topics it may be triggered by
//! [[trigger.message]]            # and [[trigger.schedule]]: see `triggers`
//! topic = "payments.done"
//! path = "/on-payment"
//! ```

use std::collections::BTreeMap;

use serde::Deserialize;

use std::sync::Arc;

use crate::base::limits::{Limits, LimitsTable, PartialLimits};
use crate::capabilities::config::{ConfigValues, SecretSource};
use crate::capabilities::keyvalue::KeyValueGrant;
use crate::capabilities::keyvalue::backend::BackendChoice;
use crate::capabilities::messaging::MessagingGrant;
use crate::capabilities::messaging::broker::BrokerChoice;
use crate::capabilities::messaging::topic::TopicPattern;
use crate::capabilities::outbound::{AllowRule, OutboundPolicy};
use crate::deploy::ServiceConfig;
use crate::deploy::cluster::ClusterConfig;
use crate::deploy::router::Route;
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
    #[serde(default)]
    secrets: BTreeMap<String, SecretTable>,
    #[serde(default)]
    messaging: MessagingTable,
    #[serde(default)]
    trigger: TriggerTable,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct MessagingTable {
    #[serde(default)]
    publish: Vec<String>,
    subscribe: Option<Vec<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyValueTable {
    #[serde(default)]
    buckets: Vec<String>,
}

/// Where one secret comes from: exactly one of the two keys.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct SecretTable {
    env: Option<String>,
    file: Option<String>,
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
            .as_ref()
            .map(|entries| {
                entries
                    .iter()
                    .map(|entry| TopicPattern::parse(entry))
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|why| format!("messaging.subscribe: {why}"))
            })
            .transpose()?;
        let triggers = file.trigger.validate(readable.as_deref())?;
        let mut secrets = BTreeMap::new();
        for (name, source) in file.secrets {
            if file.config.contains_key(&name) {
                return Err(format!(
                    "secrets.{name}: {name:?} is also in [config]; a key is either plain or secret"
                ));
            }
            let source = match (source.env, source.file) {
                (Some(env), None) if !env.is_empty() => SecretSource::Env(env),
                (None, Some(file)) if !file.is_empty() => SecretSource::File(file.into()),
                _ => {
                    return Err(format!(
                        "secrets.{name}: give exactly one of env = \"VARIABLE\" or file = \"/path\""
                    ));
                }
            };
            secrets.insert(name, source);
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
        })
    }

    /// The service configuration this manifest gives service `name`, over
    /// the host's default limits. Reads the secrets (blocking: a secret may
    /// be a file); a missing one is an error naming it, and nothing else of
    /// it.
    pub fn service_config(&self, name: &str, defaults: Limits) -> Result<ServiceConfig, String> {
        let mut secrets = BTreeMap::new();
        for (key, source) in &self.secrets {
            let value = source
                .resolve()
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
/// [messaging]
/// backend = "nats://HOST:PORT"         # or "embedded" (default), "amqp://…"
/// [engine]
/// tiers = "tiered"                     # or "cranelift", "winch" (see `--tiers`)
/// keep_resident = "8MiB"               # see `--keep-resident`
/// [cluster]
/// url = "nats://HOST:PORT"             # join this cluster (see `--cluster`)
/// name = "prod"                        # default "default"
/// credentials = "nats.creds"           # relative to this file's directory
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
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct HostMessagingTable {
    backend: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct HostKeyValueTable {
    backend: Option<String>,
}

/// What `wharf.toml` sets.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HostSettings {
    /// Default limits.
    pub limits: PartialLimits,
    /// The key-value backend, if chosen here.
    pub keyvalue: Option<BackendChoice>,
    /// The message broker, if chosen here.
    pub messaging: Option<BrokerChoice>,
    /// The cluster to join, if named here.
    pub cluster: Option<ClusterConfig>,
    /// Which compilers to use, if chosen here.
    pub tiers: Option<Tiers>,
    /// Memory kept resident per instance slot of a large guest, if set here.
    pub keep_resident: Option<u64>,
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

impl HostFile {
    /// Parses and validates the file's text.
    pub(crate) fn parse(text: &str) -> Result<HostSettings, String> {
        let file: HostFile = toml::from_str(text).map_err(|err| toml_error(text, &err))?;
        let keyvalue = parse_key(file.keyvalue.backend, "keyvalue.backend", str::parse)?;
        let messaging = parse_key(file.messaging.backend, "messaging.backend", str::parse)?;
        let cluster = file
            .cluster
            .map(|table| {
                let mut cluster = ClusterConfig::new(table.url);
                if let Some(name) = table.name {
                    cluster.name = name;
                }
                cluster.credentials = table.credentials;
                cluster
                    .validate()
                    .map(|()| cluster)
                    .map_err(|why| format!("cluster: {why}"))
            })
            .transpose()?;
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
            cluster,
            tiers,
            keep_resident,
        })
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

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
            .service_config("orders", Limits::default())
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
        let config = plain.service_config("orders", Limits::default()).unwrap();
        assert_eq!((config.reuse, config.concurrent), (1, 1));
    }

    #[test]
    fn empty_manifest_means_defaults() {
        let config = Manifest::parse("")
            .unwrap()
            .service_config("svc", Limits::default())
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
        ] {
            let err = Manifest::parse(text).unwrap_err();
            assert!(err.contains(needle), "{text:?}: {err}");
            assert!(!err.contains('\n'), "one line: {err}");
        }
    }
    #[test]
    fn host_file_sets_default_limits() {
        let settings = HostFile::parse("[limits]\ntimeout = \"10s\"").unwrap();
        assert_eq!(settings.limits.timeout, Some(Duration::from_secs(10)));
        let settings = HostFile::parse("[keyvalue]\nbackend = \"redis://127.0.0.1:1\"").unwrap();
        assert_eq!(
            settings.keyvalue,
            Some(BackendChoice::Redis("redis://127.0.0.1:1".into()))
        );
        assert!(
            HostFile::parse("[keyvalue]\nbackend = \"mongo://x\"")
                .unwrap_err()
                .contains("keyvalue.backend")
        );
        assert!(
            HostFile::parse("[limit]\n")
                .unwrap_err()
                .contains("unknown field `limit`")
        );
        assert!(
            HostFile::parse("[limits]\nbody = \"0\"")
                .unwrap_err()
                .contains("limits.body")
        );
    }

    #[test]
    fn host_file_names_the_cluster() {
        let settings = HostFile::parse(
            "[cluster]\nurl = \"nats://nats.example:4222\"\nname = \"prod\"\ncredentials = \"nats.creds\"\n",
        )
        .unwrap();
        let cluster = settings.cluster.unwrap();
        assert_eq!(cluster.url, "nats://nats.example:4222");
        assert_eq!(cluster.name, "prod");
        assert_eq!(cluster.credentials, Some("nats.creds".into()));
        assert_eq!(cluster.host_id, None);
        let unnamed = HostFile::parse("[cluster]\nurl = \"nats://nats.example:4222\"\n").unwrap();
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
            let err = HostFile::parse(text).unwrap_err();
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
