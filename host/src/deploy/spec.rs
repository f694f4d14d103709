//! The vocabulary of the deploy pipeline, which every room of it shares:
//! what one version of a service is ([`ServiceSpec`]: its name, component
//! and settings), what it may do ([`ServiceConfig`]), what the host decides
//! for every service ([`HostPolicy`]), service names, component headers and
//! digests, and the log target of every deploy event.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Result, bail};
use sha2::{Digest as _, Sha256};

use crate::base::limits::Limits;
use crate::capabilities::keyvalue::KeyValueGrant;
use crate::capabilities::messaging::MessagingGrant;
use crate::capabilities::outbound::OutboundPolicy;
use crate::capabilities::wasi_config::{ConfigValues, SecretSources};
use crate::deploy::router::Route;
use crate::deploy::triggers::Triggers;

/// The log target of every deploy event line (deploy, replace, reject,
/// remove, superseded, compiling), whichever module writes it.
pub const EVENTS: &str = "wharf::deploy";

/// Largest component file read, from disk, an upload or a peer.
pub const MAX_COMPONENT_FILE: u64 = 1 << 30;

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
/// `RESERVED_NAMES`. Lower-case is the one canonical form (files, uploads,
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

/// What the host decides for every service, whatever its manifest says: the
/// limits of a service that sets none, and what the operator hands out
/// (secret sources) for manifests to pick from.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HostPolicy {
    /// Limits for what a manifest does not set.
    pub defaults: Limits,
    /// The directories and variables manifests may name as secret sources.
    pub secrets: SecretSources,
    /// Quotas of single buckets (`[keyvalue] quotas`), over the default
    /// `limits.kv_bucket_quota`.
    pub bucket_quotas: BTreeMap<String, u64>,
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
