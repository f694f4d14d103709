//! From files to deployments, as a pipeline of rooms:
//!
//! | room | what it does |
//! | --- | --- |
//! | [`source`] | where a version comes from: the services directory (`files`, watched by `watcher`), the admin API (`upload`), the cluster's index in NATS JetStream (`cluster`), and what their manifests say (`manifest`) |
//! | [`compile`] | how a version is built: compiled (`compiler`, in lanes), or loaded from the code cache (`cache`), Winch first and Cranelift in the background (`tiering`), then linked and probed (`link`) into a [`Deployment`] |
//! | [`install`] | how it is installed: the `deployer` orders build and install per service so the newest change wins, the `registry` swaps it in atomically, and the last good version is kept (`last_good`) |
//!
//! Beside them, what every room shares: [`spec`] (what a version is and
//! may do), [`router`] (routes) and [`triggers`] (a manifest's triggers,
//! run by the `serve` layer).
//!
//! Uses: `guest`, `capabilities`, `base`. Used by: `serve`, the host, `ops`.

pub mod compile;
pub mod install;
pub mod router;
pub mod source;
pub mod spec;
pub mod triggers;

pub use compile::deployment::{CompileInfo, Deployment};
pub use spec::{EVENTS, ServiceConfig, ServiceSpec, digest_of, validate_name};
