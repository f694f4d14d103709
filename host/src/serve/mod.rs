//! The front door: the accept loop and per-connection HTTP/1.1 and HTTP/2
//! (`server`), TLS (`tls`), cutting off clients that stop reading (`stall`),
//! and routing each request to its service and running it there
//! (`dispatch`): request ids, trace context, the path the service sees, the
//! access log, and `NAME.internal` calls coming back in — and the services
//! started by messages and schedules instead of requests (`trigger_runner`).
//!
//! Uses: `deploy`, `guest`, `capabilities`, `base`. Used by: the host.

pub(crate) mod dispatch;
pub(crate) mod server;
mod stall;
pub mod tls;
pub mod trigger_runner;
