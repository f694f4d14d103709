//! Turning a component's bytes into a ready [`Deployment`]: validation,
//! compilation, pre-instantiation and a trial instantiation, so a bad
//! component is rejected here with a clear reason — never on its first request.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context as _, Result, anyhow, bail};
use sha2::{Digest as _, Sha256};

use crate::base::admission::Gate;
use crate::base::limits::Limits;
use crate::base::metrics::{KeyValueMetrics, ServiceMetrics};
use crate::capabilities::Backends;
use crate::capabilities::config::ConfigValues;
use crate::capabilities::keyvalue::KeyValueGrant;
use crate::capabilities::keyvalue::{KeyValueAccess, KeyValueLimits};
use crate::capabilities::messaging::{MessagingAccess, MessagingGrant};
use crate::capabilities::outbound::OutboundPolicy;
use crate::deploy::cache::CodeCaches;
use crate::deploy::deployer::EVENTS;
use crate::deploy::router::Route;
use crate::deploy::tiering::{self, Compiled};
use crate::deploy::triggers::Triggers;
use crate::guest::engine::{MemoryInit, Runtime, Tier};
use crate::guest::source_map::SourceMapper;
use crate::guest::{Guest, GuestExports, GuestPolicy};

/// The longest service name accepted.
pub const MAX_NAME_LEN: usize = 63;

/// Names no service may have, in any letter case, and why: a service's files
/// are `NAME.wasm` and `NAME.toml`, so a service named `wharf` would
/// overwrite (or delete) the host-wide `wharf.toml`. Compared without case
/// because file systems and host names may fold it.
pub const RESERVED_NAMES: &[(&str, &str)] = &[
    (
        "wharf",
        "its manifest would be wharf.toml, the host-wide settings file",
    ),
    (
        "messages",
        "http://messages.internal is where services publish messages",
    ),
];

/// Checks a service name: 1–63 lower-case ASCII letters, digits, `-` or
/// `_`, starting with a letter or digit, and not one of the
/// [`RESERVED_NAMES`]. Lower-case is the one canonical form (files, uploads,
/// the cluster index and `NAME.internal` hosts all decide from it). Names
/// appear in URLs, host names and file names, so nothing else is accepted.
pub fn validate_name(name: &str) -> Result<(), String> {
    if let Some((reserved, why)) = RESERVED_NAMES
        .iter()
        .find(|(reserved, _)| name.eq_ignore_ascii_case(reserved))
    {
        return Err(format!(
            "{name:?} is reserved and cannot name a service: {why} (the name {reserved:?} is taken in any letter case)"
        ));
    }
    if name.bytes().any(|b| b.is_ascii_uppercase()) {
        // One canonical form: `Hello` and `hello` would otherwise be two
        // services that `http://Hello.internal` (a case-insensitive host)
        // cannot tell apart.
        return Err(format!(
            "{name:?} is not a valid service name: names are lower-case (rename it {:?})",
            name.to_ascii_lowercase()
        ));
    }
    let valid_chars = name
        .chars()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_');
    let starts_well = name
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_alphanumeric());
    if name.is_empty() || name.len() > MAX_NAME_LEN || !valid_chars || !starts_well {
        return Err(format!(
            "{name:?} is not a valid service name: use 1-{MAX_NAME_LEN} lower-case letters, digits, '-' or '_', starting with a letter or digit"
        ));
    }
    Ok(())
}

/// How a service is run: its mount point and what it is allowed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceConfig {
    /// Where the service is mounted.
    pub route: Route,
    /// Environment variables the guest sees (and nothing else of the host's).
    pub env: Vec<(String, String)>,
    /// Time, memory, concurrency and body limits.
    pub limits: Limits,
    /// Where the guest may send HTTP requests.
    pub outbound: OutboundPolicy,
    /// Requests one instance may serve in turn (1: a fresh instance for
    /// every request, the default).
    pub reuse: u32,
    /// Requests one instance of a WASI 0.3 service may serve at once (1,
    /// the default: one at a time).
    pub concurrent: u32,
    /// The key-value buckets it may open.
    pub keyvalue: KeyValueGrant,
    /// What `wasi:config` gives it (secrets resolved).
    pub config: Arc<ConfigValues>,
    /// The topics it may publish to.
    pub messaging: MessagingGrant,
    /// What triggers it besides HTTP requests.
    pub triggers: Triggers,
    /// The host's quotas of single buckets (over `limits.kv_bucket_quota`).
    pub bucket_quotas: Arc<BTreeMap<String, u64>>,
    /// How requests are presented to it (`[http]`).
    pub http: HttpOptions,
}

/// How requests are presented to a guest: its manifest's `[http]`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HttpOptions {
    /// Show `x-request-id` and `traceparent` on every request, not only
    /// when the client sent them (the host keeps correlating its logs and
    /// propagating the trace on the guest's calls either way).
    pub request_id_header: bool,
    /// Tell the guest it may put error details in its 500s: the variable
    /// `WHARF_EXPOSE_ERRORS=1` (never by default; `wharf dev` sets it).
    pub expose_errors: bool,
}

/// The variable that tells a guest error details may go in its answers.
pub const EXPOSE_ERRORS_VARIABLE: &str = "WHARF_EXPOSE_ERRORS";

impl ServiceConfig {
    /// The configuration of a service without a manifest: mounted at
    /// `/NAME`, empty environment, the host's default limits, no outbound.
    pub fn defaults(name: &str, limits: Limits) -> ServiceConfig {
        ServiceConfig {
            route: Route::for_service(name),
            env: Vec::new(),
            limits,
            outbound: OutboundPolicy::default(),
            reuse: 1,
            concurrent: 1,
            keyvalue: KeyValueGrant::default(),
            config: Arc::default(),
            messaging: MessagingGrant::default(),
            triggers: Triggers::default(),
            bucket_quotas: Arc::default(),
            http: HttpOptions::default(),
        }
    }
}

/// Everything needed to deploy one version of a service.
#[derive(Debug, Clone)]
pub struct ServiceSpec {
    /// The service name (the file stem for directory services).
    pub name: String,
    /// The component's bytes.
    pub wasm: Arc<[u8]>,
    /// How to run it.
    pub config: ServiceConfig,
    /// The file it came from, if any.
    pub source: Option<PathBuf>,
    /// `sha256:<hex>` of `wasm`, if already known (computed otherwise).
    pub digest: Option<String>,
    /// The manifest's text, if the service has one: kept so that a version
    /// deployed from the directory can be saved as its last good one.
    pub manifest: Option<Arc<str>>,
}

/// How the compiled code was obtained.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CompileInfo {
    /// Time spent waiting for a compile lane (behind other compiles).
    pub queued: Duration,
    /// Time spent compiling, or loading the compiled code from the cache.
    pub duration: Duration,
    /// Whether the compiled code came from the cache.
    pub cache_hit: bool,
    /// How the engine initialises the guest's memory (chosen by its size).
    pub memory_init: MemoryInit,
    /// When optimised code replaced the baseline code this version was
    /// first served from; `None` if it never ran baseline code.
    pub optimised_at: Option<SystemTime>,
}

/// One deployed version of a service: immutable once built. Requests hold an
/// `Arc<Deployment>` for their whole life, so a replaced version stays alive
/// until its last request finishes.
pub struct Deployment {
    /// Which version of the service this is.
    generation: u64,
    /// `sha256:<hex>` of the component bytes.
    digest: String,
    /// The file this version was loaded from, if any.
    source: Option<PathBuf>,
    /// When this version was deployed.
    loaded_at: SystemTime,
    /// The configuration it was deployed with (route, env, limits, ...).
    config: ServiceConfig,
    /// The manifest's text, if it had one.
    manifest: Option<Arc<str>>,
    /// How the compiled code was obtained.
    compile: CompileInfo,
    /// The compiled guest that runs its requests.
    guest: Arc<Guest>,
}

impl std::fmt::Debug for Deployment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Deployment")
            .field("name", &self.name())
            .field("generation", &self.generation)
            .field("digest", &self.digest)
            .field("route", &self.config.route)
            .finish_non_exhaustive()
    }
}

impl Deployment {
    /// The service name.
    pub fn name(&self) -> &str {
        self.guest.name()
    }

    /// Which version of the service this is: 1 for the first deployment,
    /// one more for each replacement.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    pub(crate) fn set_generation(&mut self, generation: u64) {
        self.generation = generation;
    }

    pub(crate) fn set_queued(&mut self, queued: Duration) {
        self.compile.queued = queued;
    }

    /// The manifest's text, if the service has one.
    pub fn manifest(&self) -> Option<&str> {
        self.manifest.as_deref()
    }

    /// `sha256:<hex>` of the component bytes.
    pub fn digest(&self) -> &str {
        &self.digest
    }

    /// The file this version was loaded from, if any.
    pub fn source(&self) -> Option<&std::path::Path> {
        self.source.as_deref()
    }

    /// When this version was deployed.
    pub fn loaded_at(&self) -> SystemTime {
        self.loaded_at
    }

    /// The mount point.
    pub fn route(&self) -> &Route {
        &self.config.route
    }

    /// The limits every request of this version runs under.
    pub fn limits(&self) -> &Limits {
        &self.config.limits
    }

    /// The whole run configuration.
    pub fn config(&self) -> &ServiceConfig {
        &self.config
    }

    /// How the code was compiled.
    pub fn compile_info(&self) -> CompileInfo {
        self.compile
    }

    /// The same version run by `guest`, compiled as `compile` says: its
    /// optimised code replacing the baseline code it was first served from.
    pub(crate) fn with_guest(&self, guest: Arc<Guest>, compile: CompileInfo) -> Deployment {
        Deployment {
            generation: self.generation,
            digest: self.digest.clone(),
            source: self.source.clone(),
            loaded_at: self.loaded_at,
            config: self.config.clone(),
            manifest: self.manifest.clone(),
            compile,
            guest,
        }
    }

    /// Which compiler produced the code that serves this version.
    pub fn tier(&self) -> Tier {
        self.guest.engine_kind().tier
    }

    /// The compiled guest that runs this version's requests.
    pub fn guest(&self) -> &Arc<Guest> {
        &self.guest
    }

    /// The service's request metrics.
    pub fn metrics(&self) -> &Arc<ServiceMetrics> {
        self.guest.metrics()
    }

    /// Whether requests may run on reused instances: the manifest asked for
    /// reuse and the guest has not shown it fails on a reused instance.
    pub fn reuses_instances(&self) -> bool {
        self.guest.reuses_instances()
    }

    /// Instances kept idle for reuse right now.
    pub fn warm_instances(&self) -> usize {
        self.guest.warm_instances()
    }

    /// The request slots of this version.
    pub fn admission(&self) -> &Gate {
        self.guest.admission()
    }
}

/// `sha256:<hex>` of some bytes.
pub fn digest_of(bytes: &[u8]) -> String {
    hex_digest(Sha256::digest(bytes).as_slice())
}

/// `sha256:<hex>` for a SHA-256 hash already computed.
pub(crate) fn hex_digest(hash: &[u8]) -> String {
    use std::fmt::Write as _;
    let mut text = String::with_capacity(7 + 64);
    text.push_str("sha256:");
    for byte in hash {
        // Writing to a String cannot fail.
        let _ = write!(text, "{byte:02x}");
    }
    text
}

/// Checks the binary header: a WebAssembly component, not a core module or
/// something else entirely.
pub fn check_header(bytes: &[u8]) -> Result<()> {
    const MAGIC: &[u8; 4] = b"\0asm";
    if bytes.is_empty() {
        bail!("the file is empty");
    }
    if bytes.len() < 8 || &bytes[..4] != MAGIC {
        bail!("not a WebAssembly binary (no \\0asm header)");
    }
    // Bytes 4..8: a core module has version 1 and layer 0; a component has
    // layer 1 (the version field is its pre-standard revision).
    let layer = u16::from_le_bytes([bytes[6], bytes[7]]);
    match layer {
        0 => bail!(
            "this is a core WebAssembly module, not a component; build for wasm32-wasip2 or wrap it with `wasm-tools component new`"
        ),
        1 => Ok(()),
        other => bail!("unknown WebAssembly binary layer {other}"),
    }
}

/// The reason a component does not link, with advice when it was built for
/// a WASI 0.3 release candidate (`@0.3.0-rc-…`): wasmtime 48 implements
/// the released 0.3.0, and the candidates' interfaces differ from it.
pub(crate) fn explain_link_error(error: &str) -> anyhow::Error {
    let candidate = error
        .split('`')
        .find(|name| name.contains("@0.3.0-rc"))
        .map(str::to_string);
    match candidate {
        Some(interface) => anyhow!(
            "{error}: {interface} is from a WASI 0.3 release candidate; this Wharf serves the released WASI 0.3.0 (wasi:http/handler@0.3.0) and WASI 0.2: rebuild it for 0.3.0 (e.g. with the wasip3 crate 0.9) or for 0.2"
        ),
        None => anyhow!("{error}"),
    }
}

/// Compiles and links a service. Blocking and CPU-heavy: call it from a
/// blocking thread, never from an async worker.
pub(crate) fn build(
    runtime: &Runtime,
    caches: &CodeCaches,
    backends: &Backends,
    spec: ServiceSpec,
    metrics: Arc<ServiceMetrics>,
    keyvalue_metrics: Option<Arc<KeyValueMetrics>>,
) -> Result<Deployment> {
    check_header(&spec.wasm)?;
    let digest = spec.digest.unwrap_or_else(|| digest_of(&spec.wasm));
    let started = Instant::now();
    let Compiled {
        component,
        kind,
        cache_hit,
        baseline_refused,
    } = tiering::compile_first(runtime, caches, &spec.wasm, &digest)?;
    if let Some(reason) = baseline_refused {
        tracing::warn!(
            target: EVENTS,
            service = %spec.name,
            reason = %reason,
            "Winch cannot compile {}; compiled with Cranelift instead",
            spec.name
        );
    }
    let flavour = runtime.flavour(kind);
    let compile = CompileInfo {
        queued: Duration::ZERO,
        duration: started.elapsed(),
        cache_hit,
        memory_init: kind.init,
        optimised_at: None,
    };
    let instance_pre = flavour
        .linker()
        .instantiate_pre(&component)
        .map_err(|err| explain_link_error(&format!("{err:#}")))
        .context("the component needs imports Wharf does not provide")?;
    let exports = GuestExports::find(&instance_pre).map_err(anyhow::Error::msg)?;
    if spec.config.concurrent > 1 && exports.http3.is_none() {
        bail!(
            "instance.concurrent: {} needs a WASI 0.3 component (wasi:http/handler@0.3.0); this one is not, and serves one request per instance at a time",
            spec.config.concurrent
        );
    }
    check_triggers(&spec.config.triggers, &exports)?;
    let limits = spec.config.limits;
    let keyvalue = match (&backends.keyvalue, keyvalue_metrics) {
        (Some(backend), Some(keyvalue_metrics)) => Some(Arc::new(KeyValueAccess::new(
            Arc::from(spec.name.as_str()),
            backend.clone(),
            spec.config.keyvalue.clone(),
            KeyValueLimits {
                key_size: limits.kv_key_size,
                value_size: limits.kv_value_size,
                bucket_quota: limits.kv_bucket_quota,
                bucket_quotas: spec.config.bucket_quotas.clone(),
                max_buckets: limits.kv_max_buckets,
            },
            keyvalue_metrics,
        ))),
        _ => None,
    };
    let name: Arc<str> = spec.name.into();
    let messaging = backends.messaging.as_ref().map(|hub| {
        Arc::new(MessagingAccess::new(
            hub.clone(),
            spec.config.messaging.clone(),
            name.clone(),
        ))
    });
    let source_map = SourceMapper::find(&name, &spec.wasm).map(Arc::new);
    let mut env = spec.config.env.clone();
    if spec.config.http.expose_errors {
        env.retain(|(key, _)| key != EXPOSE_ERRORS_VARIABLE);
        env.push((EXPOSE_ERRORS_VARIABLE.to_string(), "1".to_string()));
    }
    let policy = GuestPolicy {
        name,
        env,
        limits,
        outbound: spec.config.outbound.clone(),
        keyvalue,
        config: spec.config.config.clone(),
        messaging,
        reuse: spec.config.reuse,
        concurrent: spec.config.concurrent,
        source_map,
    };
    Ok(Deployment {
        generation: 0,
        digest,
        source: spec.source,
        loaded_at: SystemTime::now(),
        config: spec.config,
        manifest: spec.manifest,
        compile,
        guest: Arc::new(Guest::new(policy, kind, instance_pre, exports, metrics)),
    })
}

/// Checks that the component can be triggered the way its manifest says:
/// a message trigger without a path needs a messaging export, a schedule
/// an HTTP one, and a component without an HTTP export is only of use with
/// message triggers.
fn check_triggers(triggers: &Triggers, exports: &GuestExports) -> Result<()> {
    for (index, trigger) in triggers.messages.iter().enumerate() {
        if trigger.path.is_none() && exports.messages.is_none() {
            bail!(
                "trigger.message[{index}].path: missing; the component exports no messaging handler, so messages must be POSTed to a path of its wasi:http handler"
            );
        }
        if trigger.path.is_some() && !exports.serves_http() {
            bail!(
                "trigger.message[{index}].path: the component exports no wasi:http handler to POST messages to; drop the path to use its messaging export"
            );
        }
    }
    if !triggers.schedules.is_empty() && !exports.serves_http() {
        bail!(
            "trigger.schedule[0]: scheduled runs are POSTed to the component's wasi:http handler, and it exports none"
        );
    }
    if !exports.serves_http() && triggers.messages.is_empty() {
        bail!(
            "the component exports only a messaging handler, and its manifest has no [[trigger.message]] to call it"
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_names() {
        for good in ["hello", "orders-v2", "a_b", "9lives", "a"] {
            assert!(validate_name(good).is_ok(), "{good}");
        }
        for bad in ["", ".hidden", "-x", "a.b", "a b", "ü", &"x".repeat(64)] {
            assert!(validate_name(bad).is_err(), "{bad}");
        }
        for reserved in ["wharf", "WHARF", "Wharf"] {
            assert!(
                validate_name(reserved).unwrap_err().contains("reserved"),
                "{reserved}"
            );
        }
    }

    #[test]
    fn regression_names_differing_only_in_case_are_one_name() {
        for upper in ["Hello", "HELLO", "MyService"] {
            let err = validate_name(upper).unwrap_err();
            assert!(err.contains("lower-case"), "{upper}: {err}");
            assert!(err.contains(&format!("{:?}", upper.to_ascii_lowercase())));
        }
    }

    #[test]
    fn headers_are_told_apart() {
        assert!(check_header(b"").unwrap_err().to_string().contains("empty"));
        assert!(
            check_header(b"garbage!")
                .unwrap_err()
                .to_string()
                .contains("not a WebAssembly binary")
        );
        let core = [0, b'a', b's', b'm', 1, 0, 0, 0];
        assert!(
            check_header(&core)
                .unwrap_err()
                .to_string()
                .contains("core WebAssembly module")
        );
        let component = [0, b'a', b's', b'm', 0x0d, 0, 1, 0];
        assert!(check_header(&component).is_ok());
    }

    #[test]
    fn digests_are_sha256() {
        assert_eq!(
            digest_of(b"abc"),
            "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
