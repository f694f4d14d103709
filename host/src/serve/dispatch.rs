//! Routing a client's request to its service and running it there: the
//! request id, trace context and forwarding headers, the path the service
//! sees, the generation header and the access log — and the way back in for
//! guests' calls to `http://NAME.internal`.

use std::future::Future;
use std::hash::{BuildHasher, Hasher};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Instant;

use bytes::Bytes;
use http::uri::PathAndQuery;
use http::{HeaderValue, StatusCode, Uri};
use http_body_util::BodyExt;
use wasmtime_wasi_http::WasiBody;
use wasmtime_wasi_http::p2::bindings::http::types::Scheme;
use wasmtime_wasi_http::p2::body::HyperIncomingBody;

use crate::base::headers::{
    FORWARDED_PREFIX_HEADER, GENERATION_HEADER, REQUEST_ID_HEADER, strip_host_headers,
};
use crate::base::metrics::Metrics;
use crate::base::respond::{self, Body};
use crate::base::trace::{TRACEPARENT, TraceContext};
use crate::capabilities::call::CallContext;
use crate::capabilities::outbound::InternalCalls;
use crate::deploy::Deployment;
use crate::deploy::install::deployer::Deployer;
use crate::guest::invoke::{self, RequestMeta};

/// Routes requests to the deployed services and runs them: the request path
/// shared by every listener, every server thread and in-process callers.
pub(crate) struct Dispatcher {
    /// The live services (through its registry) and the runtime they run on.
    deployer: Arc<Deployer>,
    /// Issues the ids of requests that come without one.
    request_ids: RequestIds,
    /// Set when a graceful shutdown begins.
    draining: AtomicBool,
    /// Tells those who wait for it (the trigger runtime) that a graceful
    /// shutdown began.
    drain_signal: tokio::sync::watch::Sender<bool>,
    /// Delivers guests' `*.internal` calls back into this dispatcher.
    internal: Arc<dyn InternalCalls>,
}

impl Dispatcher {
    /// A dispatcher over `deployer`'s services; service-to-service calls may
    /// go `max_hops` deep.
    pub(crate) fn new(deployer: Arc<Deployer>, max_hops: u32) -> Arc<Dispatcher> {
        Arc::new_cyclic(|weak: &Weak<Dispatcher>| Dispatcher {
            deployer,
            request_ids: RequestIds::new(),
            draining: AtomicBool::new(false),
            drain_signal: tokio::sync::watch::Sender::new(false),
            internal: Arc::new(InternalRouter {
                dispatcher: weak.clone(),
                max_hops,
            }),
        })
    }

    /// The deployer whose registry holds the services.
    pub(crate) fn deployer(&self) -> &Arc<Deployer> {
        &self.deployer
    }

    /// The host's metrics.
    pub(crate) fn metrics(&self) -> &Metrics {
        self.deployer.metrics()
    }

    /// Whether a graceful shutdown has begun.
    pub(crate) fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    /// Marks the host as shutting down (readiness turns false).
    pub(crate) fn set_draining(&self) {
        self.draining.store(true, Ordering::Relaxed);
        self.drain_signal.send_replace(true);
    }

    /// A receiver that turns true when a graceful shutdown begins.
    pub(crate) fn watch_draining(&self) -> tokio::sync::watch::Receiver<bool> {
        self.drain_signal.subscribe()
    }

    /// Runs a request a trigger made (a message POSTed to its path, a
    /// scheduled run) on `deployment`: as a client's request, continuing
    /// the trace and request id of whatever caused it.
    pub(crate) async fn run_triggered(
        &self,
        deployment: &Arc<Deployment>,
        mut request: http::Request<HyperIncomingBody>,
        cause: Cause,
    ) -> http::Response<Body> {
        let started = Instant::now();
        let request_id = cause
            .request_id
            .unwrap_or_else(|| self.request_ids.take(&http::HeaderMap::new()));
        let trace = TraceContext::child_of(cause.trace.as_ref());
        let path = request.uri().path().to_string();
        prepare_headers(&mut request, "/", Some(&request_id));
        request
            .headers_mut()
            .insert(TRACEPARENT, trace.header_value());
        let meta = RequestMeta {
            request_id,
            scheme: Scheme::Http,
            hops: 0,
            deadline: None,
            trace,
            internal: Some(self.internal.clone()),
        };
        self.run(deployment, request, meta, path, started).await
    }

    /// Hands a message to `deployment`'s exported messaging handler,
    /// continuing the publisher's trace and request id, and logs it like a
    /// request (method `MESSAGE`, the topic as path).
    pub(crate) async fn deliver_message(
        &self,
        deployment: &Arc<Deployment>,
        message: &crate::capabilities::messaging::message::Message,
        cause: Cause,
    ) -> Result<(), invoke::Failure> {
        let started = Instant::now();
        let request_id = cause
            .request_id
            .unwrap_or_else(|| self.request_ids.take(&http::HeaderMap::new()));
        let meta = RequestMeta {
            request_id,
            scheme: Scheme::Http,
            hops: 0,
            deadline: None,
            trace: TraceContext::child_of(cause.trace.as_ref()),
            internal: Some(self.internal.clone()),
        };
        let result =
            invoke::deliver_message(self.deployer.runtime(), deployment.guest(), message, &meta)
                .await;
        let status = match &result {
            Ok(()) => 200,
            Err(failure) => failure.status().as_u16(),
        };
        let elapsed = started.elapsed();
        deployment.metrics().observe(status, elapsed);
        tracing::info!(
            target: "wharf::access",
            service = %deployment.name(),
            generation = deployment.generation(),
            method = "MESSAGE",
            path = %message.topic,
            status,
            duration_ms = format_args!("{:.2}", elapsed.as_secs_f64() * 1000.0),
            request_id = %meta.request_id,
            hops = 0,
        );
        result
    }

    /// Handles one request given in-process, with any body type.
    pub(crate) async fn handle<B>(&self, request: http::Request<B>) -> http::Response<Body>
    where
        B: http_body::Body<Data = Bytes> + Send + 'static,
        B::Error: std::fmt::Display,
    {
        let request = request.map(|body| {
            body.map_err(|err| wasmtime_wasi_http::Error::InternalError(Some(err.to_string())))
                .boxed_unsync()
        });
        self.dispatch(request, Scheme::Http).await
    }

    /// Routes a client's request by path and runs it.
    pub(crate) async fn dispatch(
        &self,
        mut request: http::Request<HyperIncomingBody>,
        scheme: Scheme,
    ) -> http::Response<Body> {
        let started = Instant::now();
        let sent_request_id = request.headers().contains_key(REQUEST_ID_HEADER);
        let sent_trace = request.headers().contains_key(TRACEPARENT);
        let request_id = self.request_ids.take(request.headers());
        // Hop counts and delivery headers are the host's to set, not a
        // client's to claim.
        strip_host_headers(request.headers_mut());
        let parent = request
            .headers()
            .get(TRACEPARENT)
            .and_then(|v| v.to_str().ok())
            .and_then(TraceContext::parse);
        let trace = TraceContext::child_of(parent.as_ref());

        let routed = {
            let snapshot = self.deployer.registry().snapshot();
            snapshot
                .route(request.uri().path())
                .map(|(deployment, rest)| (deployment.clone(), rest.to_string()))
        };
        let Some((deployment, rest)) = routed else {
            let path = request.uri().path().to_string();
            let mut response = not_found(&path);
            set_request_id(&mut response, &request_id);
            return response;
        };
        let path = request.uri().path().to_string();
        let uri = match rewrite_uri(request.uri(), &rest) {
            Ok(uri) => uri,
            Err(reason) => return respond::text(StatusCode::BAD_REQUEST, &reason),
        };
        *request.uri_mut() = uri;
        // The guest sees the request as the client sent it: the request id
        // and trace context only if the client sent them (the trace as this
        // hop's child span) or the manifest asks for them. Logs and the
        // guest's own calls carry both either way.
        let asked = deployment.config().http.request_id_header;
        prepare_headers(
            &mut request,
            deployment.route().as_str(),
            (sent_request_id || asked).then_some(&*request_id),
        );
        if sent_trace || asked {
            request
                .headers_mut()
                .insert(TRACEPARENT, trace.header_value());
        }
        let meta = RequestMeta {
            request_id,
            scheme,
            hops: 0,
            deadline: None,
            trace,
            internal: Some(self.internal.clone()),
        };
        self.run(&deployment, request, meta, path, started).await
    }

    /// Runs a service-to-service call on service `name`, in-process.
    async fn dispatch_internal(
        &self,
        name: &str,
        mut request: http::Request<HyperIncomingBody>,
        context: CallContext,
    ) -> http::Response<Body> {
        let started = Instant::now();
        let deployment = self.deployer.registry().snapshot().service(name).cloned();
        let Some(deployment) = deployment else {
            return respond::text(
                StatusCode::NOT_FOUND,
                &format!("no service named {name:?} is deployed"),
            );
        };
        let parent = request
            .headers()
            .get(TRACEPARENT)
            .and_then(|v| v.to_str().ok())
            .and_then(TraceContext::parse);
        let trace = TraceContext::child_of(parent.as_ref().or(Some(&context.trace)));
        request
            .headers_mut()
            .insert(TRACEPARENT, trace.header_value());
        let path = request.uri().path().to_string();
        let meta = RequestMeta {
            request_id: context.request_id,
            scheme: Scheme::Http,
            hops: context.hops,
            deadline: Some(context.deadline),
            trace,
            internal: Some(self.internal.clone()),
        };
        self.run(&deployment, request, meta, path, started).await
    }

    /// Runs a routed request, then counts and logs it.
    async fn run(
        &self,
        deployment: &Arc<Deployment>,
        request: http::Request<HyperIncomingBody>,
        meta: RequestMeta,
        path: String,
        started: Instant,
    ) -> http::Response<Body> {
        let method = request.method().clone();
        let mut response =
            invoke::invoke(self.deployer.runtime(), deployment.guest(), request, &meta).await;
        if response.status() == StatusCode::INTERNAL_SERVER_ERROR
            && deployment.config().http.expose_errors
            && let Some(map) = deployment.guest().source_map()
        {
            response = map_error_body(response, map).await;
        }
        response.headers_mut().insert(
            GENERATION_HEADER,
            HeaderValue::from(deployment.generation()),
        );
        let elapsed = started.elapsed();
        deployment
            .metrics()
            .observe(response.status().as_u16(), elapsed);
        tracing::info!(
            target: "wharf::access",
            service = %deployment.name(),
            generation = deployment.generation(),
            method = %method,
            path = %path,
            status = response.status().as_u16(),
            duration_ms = format_args!("{:.2}", elapsed.as_secs_f64() * 1000.0),
            request_id = %meta.request_id,
            hops = meta.hops,
        );
        set_request_id(&mut response, &meta.request_id);
        response
    }
}

/// Largest error body whose stack frames are mapped to the original source.
const MAX_MAPPED_ERROR: usize = 64 << 10;

/// `response` (a 500 with error details, shown because the manifest asks
/// for them) with the stack frames in its body moved to the original
/// source through the component's source map, as the log shows them. A
/// body too large, or not text, is passed on as it was.
async fn map_error_body(
    response: http::Response<Body>,
    map: &crate::guest::source_map::SourceMapper,
) -> http::Response<Body> {
    let (mut parts, body) = response.into_parts();
    let collected = http_body_util::Limited::new(body, MAX_MAPPED_ERROR)
        .collect()
        .await;
    let bytes = match collected {
        Ok(collected) => collected.to_bytes(),
        Err(_) => {
            return http::Response::from_parts(
                parts,
                respond::full("the error's details were too large to show"),
            );
        }
    };
    let mapped = match std::str::from_utf8(&bytes) {
        Ok(text) => Bytes::from(map.rewrite(text).into_owned()),
        Err(_) => bytes,
    };
    parts.headers.remove(http::header::CONTENT_LENGTH);
    http::Response::from_parts(parts, respond::full(mapped))
}

/// What caused a triggered run: the request id and trace it continues.
#[derive(Debug, Clone, Default)]
pub(crate) struct Cause {
    /// The causing request's id (a new one is issued without it).
    pub request_id: Option<Arc<str>>,
    /// The causing span (a new trace starts without it).
    pub trace: Option<TraceContext>,
}

/// Delivers `*.internal` calls to the host that made them.
struct InternalRouter {
    /// Weak: the dispatcher owns the router, not the other way round.
    dispatcher: Weak<Dispatcher>,
    max_hops: u32,
}

impl InternalCalls for InternalRouter {
    fn call(
        &self,
        service: &str,
        request: http::Request<WasiBody>,
        context: CallContext,
    ) -> Pin<Box<dyn Future<Output = http::Response<WasiBody>> + Send>> {
        let dispatcher = self.dispatcher.upgrade();
        let service = service.to_string();
        Box::pin(async move {
            match dispatcher {
                Some(dispatcher) => {
                    dispatcher
                        .dispatch_internal(&service, request, context)
                        .await
                }
                None => respond::text(StatusCode::SERVICE_UNAVAILABLE, "the host is shutting down"),
            }
        })
    }

    fn max_hops(&self) -> u32 {
        self.max_hops
    }
}

fn set_request_id(response: &mut http::Response<Body>, request_id: &str) {
    if let Ok(value) = HeaderValue::from_str(request_id) {
        response.headers_mut().insert(REQUEST_ID_HEADER, value);
    }
}

/// The path the service sees: `rest` plus the original query.
fn rewrite_uri(original: &Uri, rest: &str) -> Result<Uri, String> {
    let path_and_query = match original.query() {
        Some(query) => format!("{rest}?{query}"),
        None => rest.to_string(),
    };
    let mut parts = original.clone().into_parts();
    parts.path_and_query = Some(
        PathAndQuery::try_from(path_and_query)
            .map_err(|err| format!("invalid request path: {err}"))?,
    );
    Uri::from_parts(parts).map_err(|err| format!("invalid request URI: {err}"))
}

/// Adds the forwarding headers, the request id if given, and a Host header
/// if the request has no authority at all (HTTP/1.0, in-process calls),
/// which wasi:http requires.
fn prepare_headers(
    request: &mut http::Request<HyperIncomingBody>,
    route: &str,
    request_id: Option<&str>,
) {
    let has_authority =
        request.uri().authority().is_some() || request.headers().contains_key(http::header::HOST);
    let headers = request.headers_mut();
    if !has_authority {
        headers.insert(http::header::HOST, HeaderValue::from_static("localhost"));
    }
    if route != "/"
        && let Ok(value) = HeaderValue::from_str(route)
    {
        headers.insert(FORWARDED_PREFIX_HEADER, value);
    }
    if let Some(value) = request_id.and_then(|id| HeaderValue::from_str(id).ok()) {
        headers.insert(REQUEST_ID_HEADER, value);
    }
}

/// The 404 for a path no service is mounted at. It names only the path the
/// client sent: the list of routes is the admin API's to give, not an
/// anonymous client's to read.
fn not_found(path: &str) -> http::Response<Body> {
    let shown: String = path.chars().take(200).collect();
    respond::text(StatusCode::NOT_FOUND, &format!("no service at {shown}"))
}

/// Issues request ids: the client's own if it sent a sane one, otherwise a
/// process-unique 16-hex-digit id.
struct RequestIds {
    base: u64,
    next: AtomicU64,
}

/// Longest client-supplied request id kept.
const MAX_REQUEST_ID: usize = 128;

impl RequestIds {
    fn new() -> RequestIds {
        // A random starting point keeps ids from different runs apart.
        let base = std::collections::hash_map::RandomState::new()
            .build_hasher()
            .finish();
        RequestIds {
            base,
            next: AtomicU64::new(0),
        }
    }

    fn take(&self, headers: &http::HeaderMap) -> Arc<str> {
        if let Some(given) = headers
            .get(REQUEST_ID_HEADER)
            .and_then(|v| v.to_str().ok())
            .filter(|v| !v.is_empty() && v.len() <= MAX_REQUEST_ID)
            .filter(|v| v.bytes().all(|b| b.is_ascii_graphic()))
        {
            return Arc::from(given);
        }
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        // Multiplying by an odd constant is a bijection: ids never repeat
        // within 2^64 requests but do not look sequential.
        let id = self.base ^ n.wrapping_mul(0x9E37_79B9_7F4A_7C15);
        Arc::from(format!("{id:016x}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uri_rewrite_keeps_query_and_authority() {
        let uri: Uri = "http://example.com/hello/a/b?x=1".parse().unwrap();
        let rewritten = rewrite_uri(&uri, "/a/b").unwrap();
        assert_eq!(rewritten.to_string(), "http://example.com/a/b?x=1");
        let uri: Uri = "/hello?q".parse().unwrap();
        assert_eq!(rewrite_uri(&uri, "/").unwrap().to_string(), "/?q");
    }

    #[test]
    fn request_ids_are_kept_or_generated() {
        let ids = RequestIds::new();
        let mut headers = http::HeaderMap::new();
        let a = ids.take(&headers);
        let b = ids.take(&headers);
        assert_eq!(a.len(), 16);
        assert_ne!(a, b);
        headers.insert(REQUEST_ID_HEADER, HeaderValue::from_static("client-id-1"));
        assert_eq!(&*ids.take(&headers), "client-id-1");
        headers.insert(REQUEST_ID_HEADER, HeaderValue::from_static("has space"));
        assert_ne!(&*ids.take(&headers), "has space");
    }
}
