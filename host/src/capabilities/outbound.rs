//! Outbound HTTP from guests: the allow-list that decides where a service may
//! send requests, and the wasi:http hooks that enforce it, deliver calls to
//! `http://NAME.internal` in-process, cut call loops, and propagate request
//! ids and trace context. Nothing is allowed unless a manifest says so.
//!
//! An outgoing request's authority is normalised once ([`Target`]: scheme and
//! host lower-cased, a trailing dot dropped, the port made explicit, any
//! user-info dropped), and both decisions are made from that one value:
//! whether the allow-list permits it, and whether it is delivered in-process
//! (`NAME.internal`) or sent to the network — where it is sent to exactly the
//! normalised authority that was checked. `messages.internal` is the one
//! host outside the allow-list: a POST there publishes a message, governed
//! by the `[messaging]` grant (see `messaging::over_http`).

use std::pin::Pin;
use std::sync::Arc;

use http::uri::Scheme;
use http::{HeaderValue, StatusCode};
use wasmtime_wasi_http::{Error as HttpError, RequestOptions, WasiBody, WasiHttpHooks};

use crate::base::headers::{HOPS_HEADER, REQUEST_ID_HEADER, strip_host_headers};
use crate::base::respond;
use crate::base::trace::{TRACEPARENT, TraceContext};
use crate::capabilities::call::CallContext;
use crate::capabilities::messaging::MessagingAccess;
use crate::capabilities::messaging::over_http::{self, MESSAGES_HOST};

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
            let suffix = normalise_host(suffix);
            if suffix.is_empty() || suffix.contains('*') {
                return Err(format!("{text:?} has an invalid host pattern"));
            }
            HostPattern::Suffix(format!(".{suffix}"))
        } else if host.contains('*') {
            return Err(format!(
                "{text:?}: a wildcard may only be the whole host or its first label (\"*.example.com\")"
            ));
        } else {
            HostPattern::Exact(normalise_host(&host))
        };
        Ok(AllowRule {
            scheme,
            host,
            port,
            text: text.to_string(),
        })
    }

    /// Whether a request to `target` is allowed by this rule.
    pub fn allows(&self, target: &Target) -> bool {
        if self.scheme != target.scheme || self.port.is_some_and(|port| port != target.port) {
            return false;
        }
        match &self.host {
            HostPattern::Any => true,
            HostPattern::Exact(exact) => *exact == target.host,
            HostPattern::Suffix(suffix) => target.host.ends_with(suffix.as_str()),
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

/// Lower-cases a host name and drops one trailing dot (`API.Example.com.` is
/// `api.example.com`): the forms DNS treats as one name are one string here.
fn normalise_host(host: &str) -> String {
    let host = host.strip_suffix('.').unwrap_or(host);
    host.to_ascii_lowercase()
}

/// Where an outgoing request is addressed, normalised once: the value both
/// the allow-list and the routing decision are made from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// `http` or `https`.
    scheme: String,
    /// Lower-case host without a trailing dot; an IPv6 address without its
    /// brackets.
    host: String,
    /// The port, explicit or the scheme's default.
    port: u16,
}

impl Target {
    /// Normalises the authority of an absolute `uri`; an error says what is
    /// wrong with it.
    pub fn of(uri: &http::Uri) -> Result<Target, String> {
        let scheme = match uri.scheme() {
            Some(scheme) if *scheme == Scheme::HTTP => "http",
            Some(scheme) if *scheme == Scheme::HTTPS => "https",
            Some(other) => return Err(format!("scheme {other} is not http or https")),
            None => return Err("the URL has no scheme".to_string()),
        };
        let host = uri.host().ok_or("the URL has no host")?;
        let host = host
            .strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .unwrap_or(host);
        let host = normalise_host(host);
        if host.is_empty() {
            return Err("the URL has an empty host".to_string());
        }
        let valid = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | ':');
        if let Some(bad) = host.chars().find(|c| !valid(*c)) {
            return Err(format!("the host contains the character {bad:?}"));
        }
        if !host.contains(':') && host.split('.').any(str::is_empty) {
            return Err(format!("the host {host:?} has an empty label"));
        }
        let port = uri
            .port_u16()
            .unwrap_or(if scheme == "https" { 443 } else { 80 });
        Ok(Target {
            scheme: scheme.to_string(),
            host,
            port,
        })
    }

    /// The scheme, `http` or `https`.
    pub fn scheme(&self) -> &str {
        &self.scheme
    }

    /// The normalised host.
    pub fn host(&self) -> &str {
        &self.host
    }

    /// The port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The service a `NAME.internal` target names; `None` for any other host.
    pub fn internal_service(&self) -> Option<&str> {
        self.host
            .strip_suffix(INTERNAL_SUFFIX)
            .filter(|name| !name.is_empty())
    }

    /// `host:port` as a network client connects to it (IPv6 in brackets).
    pub fn authority(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

/// Where an outgoing request goes, decided once from its [`Target`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Not allowed (or not a usable URL): the guest gets `HTTP-request-denied`.
    Denied(String),
    /// Delivered in-process to the named service; never to the network.
    InProcess(String),
    /// A publish to `messages.internal`: governed by the service's
    /// `[messaging]` grant, not the allow-list, and never sent anywhere.
    Publish,
    /// Sent to the network, to exactly this URI (the original one with its
    /// authority replaced by the normalised one that was checked).
    Network(http::Uri),
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

    /// Decides where a request to `uri` goes: denied, in-process, or to the
    /// network at the normalised authority.
    pub fn decide(&self, uri: &http::Uri) -> Decision {
        let target = match Target::of(uri) {
            Ok(target) => target,
            Err(why) => return Decision::Denied(why),
        };
        if target.host == MESSAGES_HOST {
            return Decision::Publish;
        }
        if !self.rules.iter().any(|rule| rule.allows(&target)) {
            return Decision::Denied("not in the service's [outbound] allow list".to_string());
        }
        if let Some(service) = target.internal_service() {
            return Decision::InProcess(service.to_string());
        }
        if target.host.ends_with(INTERNAL_SUFFIX) {
            // ".internal" alone, or with an empty label: nothing to call.
            return Decision::Denied(format!("{} names no service", target.host));
        }
        let mut parts = uri.clone().into_parts();
        parts.authority = match target.authority().parse() {
            Ok(authority) => Some(authority),
            Err(err) => return Decision::Denied(format!("invalid authority: {err}")),
        };
        match http::Uri::from_parts(parts) {
            Ok(uri) => Decision::Network(uri),
            Err(err) => Decision::Denied(format!("invalid URL: {err}")),
        }
    }

    /// Whether `uri` (absolute, with scheme and host) may be requested.
    pub fn allows(&self, uri: &http::Uri) -> bool {
        !matches!(self.decide(uri), Decision::Denied(_))
    }
}

/// Host-name suffix that routes a request to another service in-process.
pub const INTERNAL_SUFFIX: &str = ".internal";

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
    /// Publishes for `messages.internal` requests.
    messaging: Option<Arc<MessagingAccess>>,
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
        messaging: Option<Arc<MessagingAccess>>,
    ) -> OutboundHooks {
        OutboundHooks {
            policy,
            service,
            context,
            internal,
            messaging,
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
        let decision = self.policy.decide(request.uri());
        if let Decision::Denied(why) = &decision {
            tracing::warn!(
                service = %self.service,
                request_id = %self.context.request_id,
                method = %request.method(),
                uri = %request.uri(),
                "outbound request denied: {why}"
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

        let uri = match decision {
            Decision::Denied(_) => return Box::new(async { Err(HttpError::HttpRequestDenied) }),
            Decision::InProcess(target) => return self.call_in_process(target, request),
            Decision::Publish => {
                let (access, context) = (self.messaging.clone(), self.context.clone());
                return Box::new(async move {
                    Ok((over_http::publish(access, request, context).await, done()))
                });
            }
            Decision::Network(uri) => uri,
        };
        *request.uri_mut() = uri;
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

impl OutboundHooks {
    /// Delivers a request to service `target` in this host. Never touches
    /// the network: without an in-process route (a deploy probe) the guest
    /// gets 503.
    fn call_in_process(
        &self,
        target: String,
        mut request: http::Request<WasiBody>,
    ) -> Box<dyn Future<Output = SendResult> + Send> {
        let Some(internal) = self.internal.clone() else {
            let response = respond::text(
                StatusCode::SERVICE_UNAVAILABLE,
                "service calls are not available while the service starts up",
            );
            return Box::new(async move { Ok((response, done())) });
        };
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
        // The caller may not claim what only the host says of a request.
        strip_host_headers(request.headers_mut());
        request
            .headers_mut()
            .insert(HOPS_HEADER, HeaderValue::from(hops));
        let context = CallContext {
            hops,
            ..self.context.clone()
        };
        Box::new(async move {
            let response = internal.call(&target, request, context).await;
            Ok((response, done()))
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
    fn regression_allow_list_bypass_through_letter_case() {
        // The allow check lower-cased the host but the in-process route was
        // case-sensitive, so OPS-ADMIN.INTERNAL went to DNS and the network.
        let p = policy(&["http://*.internal"]);
        for uri in [
            "http://OPS-ADMIN.INTERNAL/x",
            "http://Ops-Admin.Internal/x",
            "http://ops-admin.internal./x",
            "http://user@OPS-ADMIN.INTERNAL/x",
        ] {
            assert_eq!(
                p.decide(&uri.parse().unwrap()),
                Decision::InProcess("ops-admin".into()),
                "{uri}"
            );
        }
    }

    #[test]
    fn network_requests_go_to_the_normalised_authority() {
        let p = policy(&["https://api.example.com"]);
        let Decision::Network(uri) =
            p.decide(&"https://user:pw@API.Example.COM./v1?q".parse().unwrap())
        else {
            panic!("allowed");
        };
        assert_eq!(uri.to_string(), "https://api.example.com:443/v1?q");
        let p = policy(&["http://[::1]:8080"]);
        let Decision::Network(uri) = p.decide(&"http://[::1]:8080/".parse().unwrap()) else {
            panic!("allowed");
        };
        assert_eq!(uri.authority().unwrap().as_str(), "[::1]:8080");
    }

    #[test]
    fn internal_without_a_name_is_denied() {
        let p = policy(&["http://*"]);
        assert!(matches!(
            p.decide(&"http://.internal/".parse().unwrap()),
            Decision::Denied(_)
        ));
        assert!(matches!(
            p.decide(&"ftp://x.internal/".parse().unwrap()),
            Decision::Denied(_)
        ));
    }

    #[test]
    fn messages_internal_publishes_whatever_the_allow_list_and_case() {
        for uri in [
            "http://messages.internal/orders.created",
            "http://MESSAGES.Internal./orders.created",
            "https://messages.internal:8443/x",
        ] {
            assert_eq!(
                OutboundPolicy::default().decide(&uri.parse().unwrap()),
                Decision::Publish,
                "{uri}"
            );
        }
        // A service named "messages" is reserved, so this never reaches one.
        assert_eq!(
            policy(&["http://*.internal"]).decide(&"http://messages.internal/t".parse().unwrap()),
            Decision::Publish
        );
    }

    #[test]
    fn rule_hosts_are_normalised_like_request_hosts() {
        let p = policy(&["https://API.example.com."]);
        assert!(allows(&p, "https://api.example.com/"));
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

#[cfg(test)]
mod properties {
    use proptest::prelude::*;

    use super::*;

    const RULES: &[&str] = &[
        "http://*.internal",
        "http://127.0.0.1:9000",
        "https://api.example.com",
        "http://*.example.org:*",
    ];

    /// Authorities drawn from an alphabet that mixes case, dots, ports,
    /// user-info and the `.internal` suffix, so they hit every rule's edges.
    fn authority() -> impl Strategy<Value = String> {
        let label = prop_oneof![
            Just("internal".to_string()),
            Just("INTERNAL".to_string()),
            Just("Internal".to_string()),
            Just("example".to_string()),
            Just("EXAMPLE".to_string()),
            Just("org".to_string()),
            Just("com".to_string()),
            Just("api".to_string()),
            Just("127".to_string()),
            Just("0".to_string()),
            "[a-zA-Z0-9_-]{0,6}",
        ];
        (
            proptest::option::of("[a-z@:]{0,4}@"),
            proptest::collection::vec(label, 1..5),
            any::<bool>(),
            proptest::option::of(prop_oneof![
                Just(80u16),
                Just(443),
                Just(9000),
                any::<u16>()
            ]),
        )
            .prop_map(|(user, labels, trailing_dot, port)| {
                let mut text = user.unwrap_or_default();
                text.push_str(&labels.join("."));
                if trailing_dot {
                    text.push('.');
                }
                if let Some(port) = port {
                    text.push_str(&format!(":{port}"));
                }
                text
            })
    }

    /// The rule that allows `target`, decided independently of `decide`.
    fn allowed_by_some_rule(target: &Target) -> bool {
        RULES.iter().any(|rule| {
            let (scheme, rest) = rule.split_once("://").unwrap();
            let (host, port) = match rest.rsplit_once(':') {
                Some((host, "*")) => (host, None),
                Some((host, port)) => (host, Some(port.parse::<u16>().unwrap())),
                None => (rest, Some(if scheme == "https" { 443 } else { 80 })),
            };
            let host_ok = match host.strip_prefix('*') {
                Some(suffix) => target.host.ends_with(suffix) && target.host.len() > suffix.len(),
                None => target.host == host,
            };
            scheme == target.scheme && port.is_none_or(|p| p == target.port) && host_ok
        })
    }

    proptest! {
        #[test]
        fn allowed_implies_it_goes_exactly_where_the_rule_says(
            scheme in prop_oneof![Just("http"), Just("https"), Just("HTTP")],
            authority in authority(),
        ) {
            let text = format!("{scheme}://{authority}/path?q=1");
            let Ok(uri) = text.parse::<http::Uri>() else { return Ok(()) };
            let policy = OutboundPolicy::new(RULES.iter().map(|r| AllowRule::parse(r).unwrap()).collect());
            let decision = policy.decide(&uri);
            let target = Target::of(&uri);
            match decision {
                Decision::Denied(_) => {}
                Decision::Publish => {
                    prop_assert_eq!(target.unwrap().host, MESSAGES_HOST);
                }
                Decision::InProcess(service) => {
                    let target = target.unwrap();
                    prop_assert!(allowed_by_some_rule(&target), "{}", text);
                    prop_assert_eq!(format!("{service}.internal"), target.host.clone());
                }
                Decision::Network(sent) => {
                    let target = target.unwrap();
                    prop_assert!(allowed_by_some_rule(&target), "{}", text);
                    // Never a .internal name on the network, whatever its case.
                    prop_assert!(!target.host.ends_with(".internal"), "{}", text);
                    // What is sent is exactly what was checked.
                    let sent_target = Target::of(&sent).unwrap();
                    prop_assert_eq!(&sent_target, &target);
                    prop_assert_eq!(sent.authority().unwrap().as_str(), target.authority());
                    prop_assert_eq!(sent.path_and_query(), uri.path_and_query());
                }
            }
        }
    }
}
