//! W3C trace context (`traceparent`): continuing a caller's trace or
//! starting one, with a new span id for every hop.

use std::fmt::Write as _;

use http::HeaderValue;

/// The `traceparent` header name.
pub const TRACEPARENT: &str = "traceparent";

/// One span of a trace: the trace it belongs to and its own id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceContext {
    trace_id: u128,
    span_id: u64,
    flags: u8,
}

impl TraceContext {
    /// Parses a version-00 `traceparent` value; `None` if it is malformed or
    /// has an all-zero id (which the spec says to ignore).
    pub fn parse(value: &str) -> Option<TraceContext> {
        let mut parts = value.trim().split('-');
        let (version, trace, span, flags) =
            (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
        // Version 00 has exactly four fields; later versions may add more,
        // which a 00 reader ignores.
        if version.len() != 2 || version == "ff" || (version == "00" && parts.next().is_some()) {
            return None;
        }
        if trace.len() != 32 || span.len() != 16 || flags.len() != 2 {
            return None;
        }
        let is_lower_hex = |s: &str| s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
        if ![version, trace, span, flags].into_iter().all(is_lower_hex) {
            return None;
        }
        let trace_id = u128::from_str_radix(trace, 16).ok()?;
        let span_id = u64::from_str_radix(span, 16).ok()?;
        let flags = u8::from_str_radix(flags, 16).ok()?;
        (trace_id != 0 && span_id != 0).then_some(TraceContext {
            trace_id,
            span_id,
            flags,
        })
    }

    /// A new span: in `parent`'s trace if there is one, else in a new,
    /// sampled trace.
    pub fn child_of(parent: Option<&TraceContext>) -> TraceContext {
        let (trace_id, flags) = match parent {
            Some(parent) => (parent.trace_id, parent.flags),
            None => (nonzero_u128(), 0x01),
        };
        TraceContext {
            trace_id,
            span_id: nonzero_u64(),
            flags,
        }
    }

    /// The trace id as 32 hex digits.
    #[cfg(test)]
    pub fn trace_id(&self) -> String {
        format!("{:032x}", self.trace_id)
    }

    /// The span id as 16 hex digits.
    #[cfg(test)]
    pub fn span_id(&self) -> String {
        format!("{:016x}", self.span_id)
    }

    /// The `traceparent` value naming this span.
    pub fn header_value(&self) -> HeaderValue {
        let mut text = String::with_capacity(55);
        // Writing to a String cannot fail.
        let _ = write!(
            text,
            "00-{:032x}-{:016x}-{:02x}",
            self.trace_id, self.span_id, self.flags
        );
        HeaderValue::try_from(text).unwrap_or_else(|_| HeaderValue::from_static(""))
    }
}

fn nonzero_u64() -> u64 {
    loop {
        let n = fastrand::u64(..);
        if n != 0 {
            return n;
        }
    }
}

fn nonzero_u128() -> u128 {
    loop {
        let n = fastrand::u128(..);
        if n != 0 {
            return n;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn parses_the_spec_example_and_round_trips() {
        let context = TraceContext::parse(SAMPLE).unwrap();
        assert_eq!(context.trace_id(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(context.span_id(), "00f067aa0ba902b7");
        assert_eq!(context.header_value(), SAMPLE);
    }

    #[test]
    fn rejects_malformed_values() {
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00-xyz-00f067aa0ba902b7-01",
        ] {
            assert!(TraceContext::parse(bad).is_none(), "{bad}");
        }
        // A future version may carry more fields.
        assert!(
            TraceContext::parse("01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-more")
                .is_some()
        );
    }

    #[test]
    fn children_keep_the_trace_and_get_a_new_span() {
        let parent = TraceContext::parse(SAMPLE).unwrap();
        let child = TraceContext::child_of(Some(&parent));
        assert_eq!(child.trace_id(), parent.trace_id());
        assert_ne!(child.span_id(), parent.span_id());
        let root = TraceContext::child_of(None);
        assert_ne!(root.trace_id(), parent.trace_id());
        assert!(TraceContext::parse(root.header_value().to_str().unwrap()).is_some());
    }
}
