//! How a version is installed: the [`deployer`] orders the build and the
//! install of each service so the newest change always wins; the
//! [`registry`] swaps deployments in atomically (requests in flight keep
//! theirs); the last version that deployed is kept across restarts
//! ([`last_good`]).

pub(crate) mod deployer;
pub(crate) mod last_good;
pub mod registry;
