//! What a guest may reach beyond its own memory, each capability behind the
//! grant in its manifest and nothing granted by default: outbound HTTP
//! (`outbound`, which also carries in-process calls to other services at
//! `http://NAME.internal` and publishing at `http://messages.internal`),
//! key-value buckets (`keyvalue`, with its embedded, Redis and NATS
//! backends), configuration and secrets (`config`) and messaging
//! (`messaging`, with its embedded, NATS JetStream, RabbitMQ and Kafka
//! brokers).
//!
//! Each capability is one module (with its backends beside it) holding its
//! policy, its per-request context and its host-side implementation, generic
//! over the store the way wasmtime's WASI crates are; the guest layer puts
//! the contexts into its store and the bindings into its linker.
//!
//! Uses: `base`. Used by: `guest` and everything above it.

pub mod at_rest;
pub(crate) mod call;
pub mod keyvalue;
pub mod messaging;
pub mod nats;
pub mod outbound;
pub(crate) mod sqlite;
pub mod tls;
pub mod wasi_config;

use std::sync::Arc;

use anyhow::Context as _;

/// Largest credentials file read (a NATS `.creds`, Kafka SASL properties).
pub const MAX_CREDENTIALS_FILE: u64 = 64 << 10;

/// The text of the credentials file at `path` (a regular file of at most
/// [`MAX_CREDENTIALS_FILE`] bytes), read off the async threads.
pub async fn read_credentials(path: &std::path::Path) -> anyhow::Result<String> {
    let shown = path.display().to_string();
    let path = path.to_path_buf();
    tokio::task::spawn_blocking(move || {
        crate::base::files::read_bounded_text(&path, MAX_CREDENTIALS_FILE)
    })
    .await
    .with_context(|| format!("reading the credentials file {shown}"))?
    .map_err(anyhow::Error::msg)
    .with_context(|| format!("reading the credentials file {shown}"))
}

/// Whether a backend (a key-value store, a broker) is reachable, for
/// readiness and metrics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendStatus {
    /// The backend's kind: `embedded`, `redis`, `nats`, `rabbitmq`.
    pub kind: &'static str,
    /// Whether the last check reached it.
    pub up: bool,
    /// What the last check found, for people (addresses without
    /// credentials).
    pub detail: String,
}

/// The host's capability backends, shared by every deployment.
#[derive(Clone, Default)]
pub struct Backends {
    /// The key-value store; `None` on a host built without one, where
    /// opening any bucket is `access-denied`.
    pub keyvalue: Option<keyvalue::Store>,
    /// The message broker; `None` on a host built without one, where every
    /// publish is refused and message triggers never fire.
    pub messaging: Option<Arc<messaging::MessagingHub>>,
}

impl Backends {
    /// Whether each backend is reachable, for readiness and metrics.
    pub fn statuses(&self) -> Vec<(&'static str, BackendStatus)> {
        let keyvalue = self
            .keyvalue
            .iter()
            .map(|backend| ("keyvalue", backend.status()));
        let messaging = self.messaging.iter().map(|hub| ("messaging", hub.status()));
        keyvalue.chain(messaging).collect()
    }
}
