//! Operating hosts: the admin endpoint (`admin`) with health, readiness,
//! Prometheus metrics, the service list and the deploy API, behind its
//! guard (`guard`: host names, the token, a brake on guessing); the live
//! page it serves (`dashboard`); and `check`, which tells whether a file
//! will deploy without serving it.
//!
//! Uses: the host and every layer below it. Used by: the CLI and embedders,
//! through the crate root's `admin` and `check`.

pub mod admin;
pub mod check;
pub mod dashboard;
pub mod guard;
