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
//! ## Layers
//!
//! The source tree is the architecture: one folder per layer, named for what
//! a request or a deploy passes through. A layer may use the layers below it
//! and never one above it (a unit test, `layers_import_only_downwards`, reads
//! every `crate::` path and fails the build's tests if one points up):
//!
//! | layer | what it does |
//! | --- | --- |
//! | `main.rs` | the `wharf` command line |
//! | [`ops`] | the admin API over a [`Host`]: health, readiness, metrics, the service list, deploys |
//! | `host.rs`, `config.rs` | the embedding API: [`Host`], [`Config`], [`Serving`] |
//! | [`serve`] | the front door: listener, connections, TLS, slow clients, routing a request to its service; the other doors: message triggers and schedules |
//! | [`deploy`] | from files to deployments: watcher, sources, manifests and triggers, compile, code cache, registry, routes; the cluster's index kept in step with the files |
//! | [`guest`] | running a request in a guest: engine, store state, instances and reuse, invocation, bodies, stdio |
//! | [`capabilities`] | what a guest may reach, each behind its manifest grant: outbound HTTP and `NAME.internal` calls, key-value, config, messaging — each with its backends |
//! | [`base`] | the vocabulary every layer shares: body and host responses, header names, limits, admission gates, trace context, metrics |
//!
//! Two choices differ from a plain "front to back" order, on purpose:
//!
//! - **Capabilities sit below the guest layer.** Each capability is written
//!   the way wasmtime's own WASI crates are: its policy, its context and its
//!   host functions, generic over the store. The guest layer composes them
//!   into the per-request store ([`guest::state::HostState`]) and the linker,
//!   so adding a capability never makes the guest layer's types reach up.
//! - **`ops` sits above the embedding API.** The admin endpoint (and what
//!   grows beside it) is an application *of* a [`Host`], like the CLI:
//!   it needs readiness, deploys and the service list together, which only
//!   the host has. The request path (`serve`) never depends on it.
//!
//! Metrics and trace context live in [`base`], not `ops`, because every layer
//! records into them; `ops` only presents them.

pub mod base;
pub mod capabilities;
pub mod config;
pub mod deploy;
pub mod guest;
mod host;
pub mod ops;
pub mod serve;

#[cfg(test)]
mod layers;

pub use base::headers::{
    FORWARDED_PREFIX_HEADER, GENERATION_HEADER, HOPS_HEADER, REQUEST_ID_HEADER,
};
pub use base::limits::Limits;
pub use base::respond::Body;
pub use config::Config;
pub use deploy::Deployment;
pub use deploy::source::watcher::LoadReport;
pub use host::{Host, Serving};
/// The admin endpoint; also at [`ops::admin`].
pub use ops::admin;
