//! What every capability knows of the request it acts for: its id, how
//! deep in a chain of service calls it is, its deadline and its trace. The
//! guest layer makes one per request; outbound calls, messages and
//! key-value operations are bounded and labelled by it.

use std::sync::Arc;
use std::time::Instant;

use crate::base::trace::TraceContext;

/// Facts about the calling request that bound and label its outgoing calls.
#[derive(Debug, Clone)]
pub(crate) struct CallContext {
    /// The request id, propagated to every call.
    pub request_id: Arc<str>,
    /// Hops that led to the calling request (0 for a client's request).
    pub hops: u32,
    /// When the calling request's time is up; callees get no more.
    pub deadline: Instant,
    /// The calling request's span.
    pub trace: TraceContext,
}
