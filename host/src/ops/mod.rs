//! Operating hosts: the admin endpoint (`admin`) with health, readiness,
//! Prometheus metrics, the service list and the deploy API; its client
//! (`client`, behind `wharf deploy`, `rm` and `status`); and `check`, which
//! tells whether a file will deploy without serving it.
//!
//! Uses: the host and every layer below it. Used by: the CLI and embedders.

pub mod admin;
pub mod check;
pub mod client;
