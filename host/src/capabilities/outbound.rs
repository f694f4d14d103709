//! Outbound HTTP from guests: the allow-list that decides where a service may
//! send requests, and the wasi:http hooks that enforce it, deliver calls to
//! `http://NAME.internal` in-process, cut call loops, and propagate request
//! ids and trace context. Nothing is allowed unless a manifest says so.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;

use http::uri::Scheme;
use http::{HeaderValue, StatusCode};
use wasmtime_wasi_http::{Error as HttpError, RequestOptions, WasiBody, WasiHttpHooks};

use crate::base::headers::{HOPS_HEADER, REQUEST_ID_HEADER};
use crate::base::respond;
use crate::base::trace::{TRACEPARENT, TraceContext};

/// One allow-list entry: `scheme://host[:port]`, where host may be `*` (any
/// host) or `*.suffix` (any subdomain), and port may be `*`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AllowRule {
    scheme: String,
    host: HostPattern,
    /// `None` means any port.
    port: Option<u16>,
    text: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum HostPattern {
    Any,
    Exact(String),
    Suffix(String),
}

impl AllowRule {
    /// Parses an entry such as `https://api.example.com` or `http://*.internal`.
    pub fn parse(text: &str) -> Result<AllowRule, String> {
        let (scheme, rest) = text
            .split_once("://")
            .ok_or_else(|| format!("{text:?} needs a scheme, like \"https://{text}\""))?;
        let scheme = scheme.to_ascii_lowercase();
        if scheme != "http" && scheme != "https" {
            return Err(format!("{text:?}: scheme must be http or https"));
        }
        let authority = rest.strip_suffix('/').unwrap_or(rest);
        if authority.is_empty() || authority.contains(['/', '?', '#', '@']) {
            return Err(format!(
                "{text:?} must be scheme://host[:port], without path, query or user"
            ));
        }
        let (host, port) =
            split_host_port(authority).ok_or_else(|| format!("{text:?} has an invalid port"))?;
        let default_port = if scheme == "https" { 443 } else { 80 };
        let port = match port {
            None => Some(default_port),
            Some("*") => None,
            Some(port) => Some(
                port.parse::<u16>()
                    .map_err(|_| format!("{text:?} has an invalid port {port:?}"))?,
            ),
        };
        let host = host.to_ascii_lowercase();
        let host = if host == "*" {
            HostPattern::Any
        } else if let Some(suffix) = host.strip_prefix("*.") {
            if suffix.is_empty() || suffix.contains('*') {
                return Err(format!("{text:?} has an invalid host pattern"));
            }
            HostPattern::Suffix(format!(".{suffix}"))
        } else if host.contains('*') {
            return Err(format!(
                "{text:?}: a wildcard may only be the whole host or its first label (\"*.example.com\")"
            ));
        } else {
            HostPattern::Exact(host)
        };
        Ok(AllowRule {
            scheme,
            host,
            port,
            text: text.to_string(),
        })
    }

    /// Whether a request to `scheme://host:port` is allowed by this rule.
    pub fn allows(&self, scheme: &str, host: &str, port: u16) -> bool {
        if !self.scheme.eq_ignore_ascii_case(scheme) {
            return false;
        }
        if self.port.is_some_and(|allowed| allowed != port) {
            return false;
        }
        let host = host.to_ascii_lowercase();
        match &self.host {
            HostPattern::Any => true,
            HostPattern::Exact(exact) => *exact == host,
            HostPattern::Suffix(suffix) => host.ends_with(suffix.as_str()),
        }
    }

    /// The entry as written.
    pub fn as_str(&self) -> &str {
        &self.text
    }
}

/// Splits `host:port` (with `[v6]:port` support). `None` if malformed.
fn split_host_port(authority: &str) -> Option<(&str, Option<&str>)> {
    if let Some(rest) = authority.strip_prefix('[') {
        let (host, after) = rest.split_once(']')?;
        return match after {
            "" => Some((host, None)),
            _ => Some((host, Some(after.strip_prefix(':')?))),
        };
    }
    match authority.rsplit_once(':') {
        Some((host, port)) if !host.contains(':') => Some((host, Some(port))),
        Some(_) => None,
        None => Some((authority, None)),
    }
}

/// A service's outbound allow-list. Empty means no outbound HTTP at all.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OutboundPolicy {
    rules: Vec<AllowRule>,
}

impl OutboundPolicy {
    /// A policy allowing exactly what the rules allow.
    pub fn new(rules: Vec<AllowRule>) -> OutboundPolicy {
        OutboundPolicy { rules }
    }

    /// The rules, in manifest order.
    pub fn rules(&self) -> &[AllowRule] {
        &self.rules
    }

    /// Whether `uri` (absolute, with scheme and host) may be requested.
    pub fn allows(&self, uri: &http::Uri) -> bool {
        let (Some(scheme), Some(host)) = (uri.scheme_str(), uri.host()) else {
            return false;
        };
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let port = uri
            .port_u16()
            .unwrap_or(if uri.scheme() == Some(&Scheme::HTTPS) {
                443
            } else {
                80
            });
        self.rules
            .iter()
            .any(|rule| rule.allows(scheme, host, port))
    }
}

/// Host-name suffix that routes a request to another service in-process.
pub const INTERNAL_SUFFIX: &str = ".internal";

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

/// In-process delivery of `http://NAME.internal/...` requests to service NAME.
pub(crate) trait InternalCalls: Send + Sync {
    /// Runs `request` on service `service` and returns its response (a host
    /// error response if it is not deployed or fails).
    fn call(
        &self,
        service: &str,
        request: http::Request<WasiBody>,
        context: CallContext,
    ) -> Pin<Box<dyn Future<Output = http::Response<WasiBody>> + Send>>;

    /// Most hops a chain of calls may take before it is cut with 508.
    fn max_hops(&self) -> u32;
}

/// The [`WasiHttpHooks`] of one request: checks every outgoing request
/// against the service's policy, delivers `*.internal` requests in-process,
/// and propagates the request id and trace context.
pub(crate) struct OutboundHooks {
    policy: Arc<OutboundPolicy>,
    service: Arc<str>,
    context: CallContext,
    internal: Option<Arc<dyn InternalCalls>>,
}

impl OutboundHooks {
    /// Hands the hooks to the next request of a reused instance.
    pub(crate) fn begin_request(&mut self, context: CallContext) {
        self.context = context;
    }

    pub(crate) fn new(
        policy: Arc<OutboundPolicy>,
        service: Arc<str>,
        context: CallContext,
        internal: Option<Arc<dyn InternalCalls>>,
    ) -> OutboundHooks {
        OutboundHooks {
            policy,
            service,
            context,
            internal,
        }
    }
}

type SendResult = Result<
    (
        http::Response<WasiBody>,
        Box<dyn Future<Output = Result<(), HttpError>> + Send>,
    ),
    HttpError,
>;

fn done() -> Box<dyn Future<Output = Result<(), HttpError>> + Send> {
    Box::new(std::future::ready(Ok(())))
}

impl WasiHttpHooks for OutboundHooks {
    fn send_request(
        &mut self,
        mut request: http::Request<WasiBody>,
        options: Option<RequestOptions>,
        fut: Box<dyn Future<Output = Result<(), HttpError>> + Send>,
    ) -> Box<dyn Future<Output = SendResult> + Send> {
        // The request body's own completion is not reported separately.
        drop(fut);
        if !self.policy.allows(request.uri()) {
            tracing::warn!(
                service = %self.service,
                request_id = %self.context.request_id,
                method = %request.method(),
                uri = %request.uri(),
                "outbound request denied: not in the service's [outbound] allow list"
            );
            return Box::new(async { Err(HttpError::HttpRequestDenied) });
        }
        let headers = request.headers_mut();
        if !headers.contains_key(REQUEST_ID_HEADER)
            && let Ok(value) = HeaderValue::from_str(&self.context.request_id)
        {
            headers.insert(REQUEST_ID_HEADER, value);
        }
        if !headers.contains_key(TRACEPARENT) {
            let span = TraceContext::child_of(Some(&self.context.trace));
            headers.insert(TRACEPARENT, span.header_value());
        }

        let internal_target = request
            .uri()
            .host()
            .and_then(|host| host.strip_suffix(INTERNAL_SUFFIX))
            .map(str::to_owned);
        if let (Some(target), Some(internal)) = (internal_target, self.internal.clone()) {
            let hops = self.context.hops + 1;
            if hops > internal.max_hops() {
                tracing::warn!(
                    service = %self.service,
                    request_id = %self.context.request_id,
                    target = %target,
                    hops,
                    "service call chain too deep; answering 508"
                );
                let response = respond::text(
                    StatusCode::LOOP_DETECTED,
                    &format!(
                        "call chain longer than {} hops; stopped at {target}",
                        internal.max_hops()
                    ),
                );
                return Box::new(async move { Ok((response, done())) });
            }
            request
                .headers_mut()
                .insert(HOPS_HEADER, HeaderValue::from(hops));
            let context = CallContext {
                hops,
                ..self.context.clone()
            };
            return Box::new(async move {
                let response = internal.call(&target, request, context).await;
                Ok((response, done()))
            });
        }

        tracing::debug!(
            service = %self.service,
            request_id = %self.context.request_id,
            uri = %request.uri(),
            "outbound request"
        );
        Box::new(async move {
            use http_body_util::BodyExt;
            let (response, io) = wasmtime_wasi_http::default_send_request(request, options).await?;
            Ok((
                response.map(BodyExt::boxed_unsync),
                Box::new(io) as Box<dyn Future<Output = _> + Send>,
            ))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(rules: &[&str]) -> OutboundPolicy {
        OutboundPolicy::new(rules.iter().map(|r| AllowRule::parse(r).unwrap()).collect())
    }

    fn allows(policy: &OutboundPolicy, uri: &str) -> bool {
        policy.allows(&uri.parse().unwrap())
    }

    #[test]
    fn empty_policy_denies_everything() {
        let p = OutboundPolicy::default();
        assert!(!allows(&p, "http://example.com/"));
    }

    #[test]
    fn exact_host_and_default_port() {
        let p = policy(&["https://api.example.com"]);
        assert!(allows(&p, "https://api.example.com/v1"));
        assert!(allows(&p, "https://API.example.com:443/"));
        assert!(!allows(&p, "http://api.example.com/"));
        assert!(!allows(&p, "https://api.example.com:8443/"));
        assert!(!allows(&p, "https://evil.com/?api.example.com"));
        assert!(!allows(&p, "https://api.example.com.evil.com/"));
    }

    #[test]
    fn explicit_and_any_port() {
        let p = policy(&["http://127.0.0.1:9000", "http://localhost:*"]);
        assert!(allows(&p, "http://127.0.0.1:9000/x"));
        assert!(!allows(&p, "http://127.0.0.1:9001/x"));
        assert!(allows(&p, "http://localhost:1234/"));
        assert!(allows(&p, "http://localhost/"));
    }

    #[test]
    fn wildcard_hosts() {
        let p = policy(&["http://*.internal"]);
        assert!(allows(&p, "http://users.internal/a"));
        assert!(!allows(&p, "http://internal/a"));
        assert!(!allows(&p, "http://usersinternal/a"));
        let any = policy(&["https://*"]);
        assert!(allows(&any, "https://anything.example/"));
        assert!(!allows(&any, "http://anything.example/"));
    }

    #[test]
    fn ipv6_hosts() {
        let p = policy(&["http://[::1]:8080"]);
        assert!(allows(&p, "http://[::1]:8080/"));
        assert!(!allows(&p, "http://[::2]:8080/"));
    }

    #[test]
    fn bad_entries_are_explained() {
        for (entry, needle) in [
            ("example.com", "needs a scheme"),
            ("ftp://example.com", "scheme must be http or https"),
            ("http://example.com/path", "without path"),
            ("http://user@example.com", "without path"),
            ("http://example.com:http", "invalid port"),
            ("http://ex*mple.com", "wildcard"),
            ("http://*.", "invalid host pattern"),
        ] {
            let err = AllowRule::parse(entry).unwrap_err();
            assert!(err.contains(needle), "{entry}: {err}");
        }
    }
}
