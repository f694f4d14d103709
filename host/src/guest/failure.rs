//! Why a request got no response from its guest, what the client is told,
//! and how a wasmtime error becomes one of those reasons.

use std::time::Duration;

use http::{HeaderValue, StatusCode};
use wasmtime::Trap;

use crate::base::limits::format_size;
use crate::base::metrics::{RejectReason, ServiceMetrics};
use crate::base::respond::{self, Body};
use crate::guest::state::HostState;

/// Why a request did not get a response from its guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    /// The guest ran past its time limit and was stopped.
    Timeout(Duration),
    /// The guest used up its CPU budget and was stopped.
    CpuLimit(Duration),
    /// The guest tried to grow its memory past the cap and then trapped.
    MemoryLimit(u64),
    /// The guest overflowed its stack.
    StackOverflow,
    /// The guest trapped (a panic, an invalid operation, ...).
    Trap(String),
    /// The guest called `exit`.
    Exited(i32),
    /// The guest returned without setting a response.
    NoResponse,
    /// The guest answered with a wasi:http error instead of a response.
    ErrorResponse(String),
    /// The service already runs as many requests as it may.
    Busy(String),
    /// No instance could be created right now (the pool is full).
    Overloaded(String),
    /// The request body is larger than the service accepts: its declared
    /// length (if it declared one) and the limit.
    BodyTooLarge(Option<u64>, u64),
    /// The guest's messaging handler returned an error.
    Handler(String),
    /// The component has no wasi:http handler (it only takes messages).
    NoHttpHandler,
    /// Something failed in the host itself.
    Host(String),
}

impl Failure {
    /// The status the client gets.
    pub fn status(&self) -> StatusCode {
        match self {
            Failure::Timeout(_) | Failure::CpuLimit(_) => StatusCode::GATEWAY_TIMEOUT,
            Failure::Busy(_) | Failure::Overloaded(_) => StatusCode::SERVICE_UNAVAILABLE,
            Failure::BodyTooLarge(..) => StatusCode::PAYLOAD_TOO_LARGE,
            Failure::NoHttpHandler => StatusCode::NOT_FOUND,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// A one-line reason, safe to show the client.
    pub fn reason(&self) -> String {
        match self {
            Failure::Timeout(limit) => format!(
                "the service exceeded its time limit of {}",
                humantime::format_duration(*limit)
            ),
            Failure::CpuLimit(budget) => format!(
                "the service exceeded its CPU budget of {}",
                humantime::format_duration(*budget)
            ),
            Failure::MemoryLimit(cap) => format!(
                "the service exceeded its memory limit of {}",
                format_size(*cap)
            ),
            Failure::StackOverflow => "the service overflowed its stack".to_string(),
            Failure::Trap(trap) => format!("the service crashed: {trap}"),
            Failure::Exited(code) => format!("the service exited with code {code}"),
            Failure::NoResponse => "the service returned without sending a response".to_string(),
            Failure::ErrorResponse(code) => format!("the service failed the request: {code}"),
            Failure::Busy(why) => format!("the service is at its concurrency limit: {why}"),
            Failure::Overloaded(why) => format!("the host is at capacity: {why}"),
            Failure::BodyTooLarge(Some(length), limit) => format!(
                "the request body of {length} bytes is over the service's limit of {}",
                format_size(*limit)
            ),
            Failure::BodyTooLarge(None, limit) => format!(
                "the request body is over the service's limit of {}",
                format_size(*limit)
            ),
            Failure::Handler(why) => format!("the message handler failed: {why}"),
            Failure::NoHttpHandler => {
                "the service takes messages only; it has no wasi:http handler".to_string()
            }
            Failure::Host(why) => format!("internal error: {why}"),
        }
    }

    /// Whether the guest itself crashed (as opposed to running out of time or
    /// being refused): what a retry on a fresh instance may cure.
    pub(crate) fn is_guest_crash(&self) -> bool {
        matches!(
            self,
            Failure::MemoryLimit(_)
                | Failure::StackOverflow
                | Failure::Trap(_)
                | Failure::Exited(_)
                | Failure::NoResponse
        )
    }

    /// Counts this failure in the service's metrics.
    pub(crate) fn record(&self, metrics: &ServiceMetrics) {
        match self {
            Failure::Timeout(_) => metrics.timed_out(),
            Failure::CpuLimit(_) => metrics.cpu_limited(),
            Failure::MemoryLimit(_)
            | Failure::StackOverflow
            | Failure::Trap(_)
            | Failure::Exited(_)
            | Failure::NoResponse => metrics.trapped(),
            Failure::Busy(_) => metrics.rejected(RejectReason::Busy),
            Failure::Overloaded(_) => metrics.rejected(RejectReason::Overloaded),
            Failure::BodyTooLarge(..) => metrics.rejected(RejectReason::BodyTooLarge),
            Failure::ErrorResponse(_)
            | Failure::Handler(_)
            | Failure::NoHttpHandler
            | Failure::Host(_) => {}
        }
    }

    /// The error response for this failure.
    pub fn into_response(self) -> http::Response<Body> {
        let mut response = respond::text(self.status(), &self.reason());
        if let Failure::Busy(_) | Failure::Overloaded(_) = self {
            response
                .headers_mut()
                .insert(http::header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        response
    }
}

/// Classifies a wasmtime error raised while instantiating or running a guest.
pub(crate) fn classify(err: &wasmtime::Error, state: &HostState, timeout: Duration) -> Failure {
    if let Some(trap) = err.downcast_ref::<Trap>() {
        return match trap {
            Trap::Interrupt if state.cpu().exceeded() => Failure::CpuLimit(state.cpu().budget()),
            Trap::Interrupt => Failure::Timeout(timeout),
            Trap::StackOverflow => Failure::StackOverflow,
            _ if state.limiter.memory_denied() => Failure::MemoryLimit(state.limiter.memory_cap()),
            Trap::UnreachableCodeReached => {
                Failure::Trap("unreachable code reached (a panic or abort)".to_string())
            }
            other => Failure::Trap(other.to_string()),
        };
    }
    if let Some(exit) = err.downcast_ref::<wasmtime_wasi::I32Exit>() {
        return Failure::Exited(exit.0);
    }
    if err.is::<wasmtime::PoolConcurrencyLimitError>() {
        return Failure::Overloaded(format!("{err}"));
    }
    if state.limiter.memory_denied() {
        return Failure::MemoryLimit(state.limiter.memory_cap());
    }
    Failure::Trap(first_line(&format!("{err:#}")))
}

pub(crate) fn first_line(text: &str) -> String {
    text.lines().next().unwrap_or_default().to_string()
}
