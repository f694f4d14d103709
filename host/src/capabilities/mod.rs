//! What a guest may reach beyond its own memory, each capability behind the
//! grant in its manifest and nothing granted by default: outbound HTTP
//! (`outbound`, which also carries in-process calls to other services at
//! `http://NAME.internal`), key-value buckets (`keyvalue`, with its embedded,
//! Redis and NATS backends) and configuration and secrets (`config`).
//!
//! Each capability is one module (with its backends beside it) holding its
//! policy, its per-request context and its host-side implementation, generic
//! over the store the way wasmtime's WASI crates are; the guest layer puts
//! the contexts into its store and the bindings into its linker.
//!
//! Uses: `base`. Used by: `guest` and everything above it.

pub mod config;
pub mod keyvalue;
pub mod outbound;

/// The host's capability backends, shared by every deployment.
#[derive(Clone, Default)]
pub struct Backends {
    /// The key-value backend; `None` on a host built without one, where
    /// opening any bucket is `access-denied`.
    pub keyvalue: Option<keyvalue::backend::Backend>,
}

impl Backends {
    /// Whether each backend is reachable, for readiness and metrics.
    pub fn statuses(&self) -> Vec<(&'static str, keyvalue::backend::BackendStatus)> {
        self.keyvalue
            .iter()
            .map(|backend| ("keyvalue", backend.status()))
            .collect()
    }
}
