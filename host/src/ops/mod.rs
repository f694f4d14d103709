//! Operating a running host: the admin endpoint (`admin`) with health,
//! readiness, Prometheus metrics, the service list and the deploy API.
//!
//! Uses: the host and every layer below it. Used by: the CLI and embedders.

pub mod admin;
