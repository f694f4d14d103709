//! From files to deployments: the directory watcher (`watcher`) reads each
//! service's component and manifest (`source`, `manifest`), a deploy compiles
//! it — or loads it from the compiled-code cache (`cache`) — links and probes
//! it (`deployment`, with Winch first and Cranelift in the background:
//! `tiering`), and the registry swaps it in atomically (`registry`,
//! with the route table from `router`); `deployer` orders all of this per
//! service so the newest change always wins. A manifest's triggers
//! (`triggers`) are checked here and run by the `serve` layer.
//!
//! Uses: `guest`, `capabilities`, `base`. Used by: `serve`, the host, `ops`.

pub mod cache;
pub mod cluster;
mod compiler;
pub(crate) mod deployer;
pub(crate) mod deployment;
mod last_good;
pub mod manifest;
pub mod registry;
pub mod router;
pub(crate) mod source;
pub(crate) mod tiering;
pub mod triggers;
pub(crate) mod upload;
pub mod watcher;

pub use compiler::CompileTimes;
pub use deployer::EVENTS;
pub use deployment::{
    CompileInfo, Deployment, EXPOSE_ERRORS_VARIABLE, HttpOptions, MAX_NAME_LEN, RESERVED_NAMES,
    ServiceConfig, ServiceSpec, check_header, digest_of, validate_name,
};
