//! The vocabulary every layer shares: the body type of every response and
//! the host's own small responses, bounded reads of the files settings name,
//! header names, resource limits and the
//! admission gates that enforce concurrency, W3C trace context, and the
//! metrics every layer records into.
//!
//! Uses: no other layer. Used by: all of them.

pub mod admission;
pub mod files;
pub mod headers;
pub mod limits;
pub mod metrics;
pub mod random;
pub mod redact;
pub mod respond;
pub mod trace;
