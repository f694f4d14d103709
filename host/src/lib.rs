//! # Wharf
//!
//! A serverless WebAssembly microservice host. Every `NAME.wasm` component in
//! a directory that exports `wasi:http/incoming-handler` (the `wasi:http/proxy`
//! world) is a service mounted at `/NAME`; each request runs in a fresh,
//! sandboxed instance, and the directory is watched so that dropping,
//! replacing or deleting a file deploys, replaces or removes its service
//! while the host keeps serving.
//!
//! The crate is a library first: the `wharf` binary is a thin CLI over it.
//!
//! ```no_run
//! use wharf::{Config, Host};
//!
//! # async fn demo() -> anyhow::Result<()> {
//! // Load ./services, keep watching it, and serve it on a free port until Ctrl-C.
//! let host = Host::new(Config::for_dir("services")).await?;
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
//! host.serve(listener, async { let _ = tokio::signal::ctrl_c().await; }).await?;
//!
//! // Or hand it a request directly, without any socket.
//! let response = host.handle(http::Request::get("/hello").body(String::new())?).await;
//! println!("{}", response.status());
//! # Ok(()) }
//! ```
//!
//! A host's settings are a [`Config`]: public fields with documented
//! defaults, builders for the common ones; a setting left `None` comes from
//! the services directory's `wharf.toml`.
//!
//! ```no_run
//! use std::time::Duration;
//! use wharf::messaging::BrokerChoice;
//! use wharf::{Config, Host, KeyValueChoice, Limits, SecretSources};
//!
//! # async fn demo() -> anyhow::Result<()> {
//! let mut config = Config::for_dir("services")
//!     .cache_dir(wharf::default_cache_dir())
//!     .data_dir(wharf::default_data_dir("services".as_ref()))
//!     .limits(Limits { timeout: Duration::from_secs(10), ..Limits::default() });
//! // Addresses from the environment: the operator's servers, not fixed ones.
//! config.keyvalue = Some(KeyValueChoice::Redis(std::env::var("REDIS_URL")?));
//! config.messaging = Some(BrokerChoice::Nats(std::env::var("NATS_URL")?));
//! config.secret_sources = SecretSources::new(["/run/secrets".into()], ["ORDERS_*".into()])
//!     .map_err(anyhow::Error::msg)?;
//! let host = Host::new(config).await?;
//! # Ok(()) }
//! ```
//!
//! Inside, the source tree is the architecture: one private module per
//! layer (`base`, `capabilities`, `guest`, `deploy`, `serve`, then the host
//! and `ops`), each using only the layers below it, which a unit test
//! checks. `docs/architecture.md` in the repository draws it, with the
//! request path and the deploy path.

pub(crate) mod base;
pub(crate) mod capabilities;
mod config;
pub(crate) mod deploy;
pub(crate) mod guest;
mod host;
pub(crate) mod ops;
pub(crate) mod serve;

#[cfg(test)]
mod layers;

pub use base::headers::{
    FORWARDED_PREFIX_HEADER, GENERATION_HEADER, HOPS_HEADER, REQUEST_ID_HEADER,
};
pub use base::respond::Body;
pub use capabilities::BackendStatus;
pub use capabilities::at_rest::AtRestKeys;
pub use capabilities::keyvalue::KeyValueChoice;
pub use capabilities::keyvalue::store::Resealed;
pub use capabilities::nats::Replicas;
pub use capabilities::tls::BackendTls;
pub use capabilities::wasi_config::SecretSources;
pub use config::{
    Config, DEFAULT_CLIENT_TIMEOUT, DEFAULT_DRAIN_TIMEOUT, DEFAULT_MAX_CALL_DEPTH, default_data_dir,
};
pub use deploy::install::registry::{Rejection, Snapshot};
pub use deploy::source::watcher::LoadReport;
pub use deploy::{CompileInfo, Deployment, digest_of, validate_name};
pub use guest::engine::{EngineOptions, Tier, Tiers, default_cache_dir};
pub use host::{Host, Serving};
pub use limits::{Limits, PartialLimits};
pub use serve::tls::acceptor as tls_acceptor;

/// Limits on what one request or one service may use, and the parsers of
/// the sizes and durations that set them (`128MiB`, `30s`), as the CLI,
/// manifests and `wharf.toml` write them.
pub mod limits {
    pub use crate::base::limits::{
        Limits, MAX_DURATION, MAX_MEMORY, PartialLimits, format_size, parse_concurrency,
        parse_duration, parse_memory, parse_size,
    };
}

/// Messaging: the broker behind `wasi:messaging` and message triggers,
/// how it is chosen and bounded, and its dead letters (see
/// [`Host::broker`]).
pub mod messaging {
    pub use crate::capabilities::messaging::choice::BrokerSettings;
    pub use crate::capabilities::messaging::rabbitmq::QueueType;
    pub use crate::capabilities::messaging::{
        Broker, BrokerChoice, BrokerError, BrokerStatus, DEFAULT_MAX_PENDING, DeadLetter,
        DeadLetterQuery, MAX_DEAD_LETTER_PAGE, Message, MessagingLimits, PartialMessagingLimits,
    };
}

/// Many hosts as one cluster on NATS JetStream: how a host joins, and the
/// cluster as one host sees it (see [`Host::cluster`]).
pub mod cluster {
    pub use crate::deploy::source::cluster::{
        Cluster, ClusterConfig, ClusterView, Divergence, FailedVersion, HostBeat,
        MAX_CREDENTIALS_FILE, ServedVersion,
    };
}

/// The admin endpoint: health, readiness, metrics, the service list, the
/// deploy API and the live dashboard, for any [`Host`].
///
/// ```no_run
/// # async fn demo(host: wharf::Host) -> anyhow::Result<()> {
/// let listener = tokio::net::TcpListener::bind("127.0.0.1:9090").await?;
/// let token = wharf::admin::AdminToken::new("a long random secret")?;
/// let guard = wharf::admin::AdminGuard::new(Some(token), &[]);
/// wharf::admin::serve_guarded(host, listener, guard, std::future::pending()).await?;
/// # Ok(()) }
/// ```
pub mod admin {
    pub use crate::ops::admin::{MAX_TOKEN_FILE, serve, serve_guarded, serve_guarded_tls};
    pub use crate::ops::dashboard::LogRingLayer;
    pub use crate::ops::guard::{AdminGuard, AdminToken};
}

/// Telling whether a component will deploy, and why not, without serving
/// it (`wharf check`).
pub mod check {
    pub use crate::ops::check::{CheckReport, ImportCheck, check, check_file, sibling_manifest};
}
