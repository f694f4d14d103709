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

pub mod admin;
pub mod admission;
mod body;
pub mod cache;
pub mod config;
pub mod deploy;
mod deployer;
pub mod engine;
mod host;
mod instance;
pub mod invoke;
pub mod limits;
pub mod manifest;
pub mod metrics;
pub mod outbound;
pub mod registry;
pub mod respond;
pub mod router;
mod server;
mod source;
mod stall;
mod state;
pub mod stdio;
pub mod tls;
pub mod trace;
mod watcher;

pub use config::Config;
pub use deploy::Deployment;
pub use host::{FORWARDED_PREFIX_HEADER, Host, REQUEST_ID_HEADER, Serving};
pub use invoke::GENERATION_HEADER;
pub use limits::Limits;
pub use respond::Body;
pub use watcher::LoadReport;
