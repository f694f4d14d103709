//! What the cluster keeps in JetStream, and what a host remembers of it:
//! the index's entries, the hosts' heartbeats, and per service the index
//! version this host last saw.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// One service's version in the index.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub(super) struct IndexEntry {
    pub(super) digest: String,
    pub(super) manifest: Option<String>,
    pub(super) size: u64,
    pub(super) published_by: String,
    pub(super) published_ms: u64,
}

/// A host's heartbeat.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HostBeat {
    /// The host's name in the cluster.
    pub id: String,
    /// Where it serves (as it was told to advertise).
    pub address: String,
    /// Wharf's version.
    pub version: String,
    /// When this beat was sent (ms since the epoch).
    pub heartbeat_ms: u64,
    /// When the host started (ms since the epoch).
    pub started_ms: u64,
    /// Whether it has caught up with the index.
    pub caught_up: bool,
    /// Requests running on it now.
    pub in_flight: u64,
    /// What it serves: service → the cluster generation and digest.
    pub services: BTreeMap<String, ServedVersion>,
    /// The cluster's versions it could not deploy: service → why.
    #[serde(default)]
    pub failed: BTreeMap<String, FailedVersion>,
}

/// A cluster version one host could not deploy (it keeps what it had).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct FailedVersion {
    /// The index revision it could not deploy.
    pub generation: u64,
    /// Why: the deploy's error.
    pub reason: String,
}

/// The version of one service a host serves.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ServedVersion {
    /// The index revision of this version, if the host knows it.
    pub generation: Option<u64>,
    /// The component's digest.
    pub digest: String,
}

/// What this host knows of one service's version in the index.
#[derive(Debug, Clone)]
pub(super) struct Synced {
    /// The index revision.
    pub(super) revision: u64,
    pub(super) digest: String,
    pub(super) manifest: Option<String>,
    /// The local generation of the deployment seen when this was recorded:
    /// a deployment with another generation is a local change.
    pub(super) local_generation: Option<u64>,
}
