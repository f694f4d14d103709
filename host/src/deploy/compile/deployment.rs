//! One deployed version of a service, [`Deployment`]: its compiled guest,
//! its settings and how it was compiled. Built by [`link`](super::link);
//! installed by the deployer.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::anyhow;

use crate::base::admission::Gate;
use crate::base::limits::Limits;
use crate::base::metrics::ServiceMetrics;
use crate::deploy::router::Route;
use crate::deploy::spec::ServiceConfig;
use crate::guest::Guest;
use crate::guest::engine::{MemoryInit, Tier};

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
    pub(in crate::deploy) generation: u64,
    /// `sha256:<hex>` of the component bytes.
    pub(in crate::deploy) digest: String,
    /// The file this version was loaded from, if any.
    pub(in crate::deploy) source: Option<PathBuf>,
    /// When this version was deployed.
    pub(in crate::deploy) loaded_at: SystemTime,
    /// The configuration it was deployed with (route, env, limits, ...).
    pub(in crate::deploy) config: ServiceConfig,
    /// The manifest's text, if it had one.
    pub(in crate::deploy) manifest: Option<Arc<str>>,
    /// How the compiled code was obtained.
    pub(in crate::deploy) compile: CompileInfo,
    /// The compiled guest that runs its requests.
    pub(in crate::deploy) guest: Arc<Guest>,
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

    /// Instances kept for reuse right now: idle ones of a WASI 0.2
    /// service, live ones (workers) of a WASI 0.3 service.
    pub fn warm_instances(&self) -> usize {
        self.guest.warm_instances()
    }

    /// Requests of this service running now (admitted, not yet answered),
    /// across its versions.
    pub fn requests_in_flight(&self) -> u64 {
        self.guest.metrics().running()
    }

    /// The request slots of this version.
    pub fn admission(&self) -> &Gate {
        self.guest.admission()
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
