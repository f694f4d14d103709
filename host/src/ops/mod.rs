//! Operating hosts: the admin endpoint (`admin`) with health, readiness,
//! Prometheus metrics, the service list and the deploy API; the live page
//! it serves (`dashboard`); its client
//! (`client`, behind `wharf deploy`, `rm` and `status`); `check`, which
//! tells whether a file will deploy without serving it; and `scaffold`, the
//! project templates of `wharf new`.
//!
//! Uses: the host and every layer below it. Used by: the CLI and embedders.

pub mod admin;
pub mod check;
pub mod client;
pub mod dashboard;
pub mod guard;
pub mod scaffold;
