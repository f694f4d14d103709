//! Where a version of a service comes from: the services directory (each
//! `NAME.wasm` with its `NAME.toml`: [`files`]), kept in step by the
//! [`watcher`]; the admin API ([`upload`], written through the directory);
//! the cluster's index, which keeps every host's directory the same
//! ([`cluster`], joined as [`cluster_config`] says); and what a manifest or
//! `wharf.toml` says ([`manifest`]).

pub mod cluster;
pub mod cluster_config;
pub mod files;
pub mod manifest;
pub(crate) mod upload;
pub mod watcher;
