//! The embedding API: a [`Host`] owns the runtime, the registry and the
//! directory watcher, hands requests to services in-process, and serves
//! them over HTTP.

use std::future::Future;
use std::hash::{BuildHasher, Hasher};
use std::path::Path;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, Weak};
use std::time::Instant;

use anyhow::{Context as _, Result};
use bytes::Bytes;
use http::uri::PathAndQuery;
use http::{HeaderValue, StatusCode, Uri};
use http_body_util::BodyExt;
use tokio::net::TcpListener;
use tokio::sync::Mutex as AsyncMutex;
use wasmtime_wasi_http::WasiBody;
use wasmtime_wasi_http::p2::bindings::http::types::Scheme;
use wasmtime_wasi_http::p2::body::HyperIncomingBody;

use crate::config::Config;
use crate::deploy::{Deployment, ServiceConfig, ServiceSpec, validate_name};
use crate::deployer::Deployer;
use crate::engine::Runtime;
use crate::invoke::{self, RequestMeta};
use crate::metrics::Metrics;
use crate::outbound::{CallContext, HOPS_HEADER, InternalCalls};
use crate::registry::{Registry, Snapshot};
use crate::respond::{self, Body};
use crate::source::SourceOptions;
use crate::trace::{TRACEPARENT, TraceContext};
use crate::watcher::{self, DirWatcher, LoadReport, WatchOptions};

/// Header carrying the request id, kept if the client sent a sane one.
pub const REQUEST_ID_HEADER: &str = "x-request-id";
/// Header telling a service the route prefix that was removed from the path.
pub const FORWARDED_PREFIX_HEADER: &str = "x-forwarded-prefix";

/// A Wharf host: services deployed from a directory (and kept in step with
/// it), served over HTTP or called in-process. Cheap to clone; all clones
/// share one host, which stops watching when the last clone is dropped.
///
/// ```no_run
/// # async fn demo() -> anyhow::Result<()> {
/// let host = wharf::Host::new(wharf::Config::for_dir("services")).await?;
/// let request = http::Request::get("/hello").body(String::new())?;
/// let response = host.handle(request).await;
/// assert_eq!(response.status(), 200);
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct Host {
    inner: Arc<Inner>,
}

struct Inner {
    config: Config,
    deployer: Arc<Deployer>,
    /// The directory watcher, if watching; taken on shutdown.
    watcher: AsyncMutex<Option<DirWatcher>>,
    /// How the initial load went; set once it is done.
    load_report: OnceLock<LoadReport>,
    /// Set when a graceful shutdown begins.
    draining: AtomicBool,
    request_ids: RequestIds,
    /// Delivers guests' `*.internal` calls back into this host.
    internal: Arc<dyn InternalCalls>,
}

impl Host {
    /// Builds a host and loads its services: creates the engine, loads every
    /// service in the configured directory (in parallel, returning once all
    /// valid ones are deployed) and, if configured, starts watching it.
    pub async fn new(config: Config) -> Result<Host> {
        let host = Host::create(config).await?;
        host.load().await?;
        Ok(host)
    }

    /// Builds a host without loading any service yet: the engine, registry
    /// and metrics exist, [`is_ready`](Host::is_ready) is false until
    /// [`load`](Host::load) finishes. For serving health checks during a long
    /// initial load.
    pub async fn create(config: Config) -> Result<Host> {
        let engine_options = config.engine.clone();
        let runtime = tokio::task::spawn_blocking(move || Runtime::new(&engine_options))
            .await
            .context("engine setup task failed")??;
        let deployer = Arc::new(Deployer::new(
            Arc::new(runtime),
            Arc::new(Registry::new()),
            Arc::new(Metrics::new()),
            config.limit_overrides.apply(config.limits),
        ));
        let max_hops = config.max_call_depth;
        let inner = Arc::new_cyclic(|weak: &Weak<Inner>| Inner {
            config,
            deployer,
            watcher: AsyncMutex::new(None),
            load_report: OnceLock::new(),
            draining: AtomicBool::new(false),
            request_ids: RequestIds::new(),
            internal: Arc::new(InternalRouter {
                host: weak.clone(),
                max_hops,
            }),
        });
        tokio::spawn(sweep_idle_instances(Arc::downgrade(&inner)));
        Ok(Host { inner })
    }

    /// Loads every service in the configured directory, in parallel, and
    /// returns once all valid ones are deployed; then, if configured, keeps
    /// watching it. Without a directory it just marks the host ready.
    pub async fn load(&self) -> Result<LoadReport> {
        let config = &self.inner.config;
        let (report, watcher) = match &config.services_dir {
            Some(dir) => {
                let options = WatchOptions {
                    source: SourceOptions {
                        dir: dir.clone(),
                        allow_external_symlinks: config.allow_external_symlinks,
                    },
                    base_limits: config.limits,
                    limit_overrides: config.limit_overrides,
                };
                let (report, watcher) =
                    watcher::load_and_watch(options, self.inner.deployer.clone(), config.watch)
                        .await?;
                tracing::info!(
                    dir = %dir.display(),
                    deployed = report.deployed,
                    rejected = report.rejected,
                    elapsed_ms = report.elapsed.as_millis() as u64,
                    "services loaded"
                );
                (report, watcher)
            }
            None => (LoadReport::default(), None),
        };
        *self.inner.watcher.lock().await = watcher;
        if self.inner.load_report.set(report.clone()).is_err() {
            anyhow::bail!("the host was already loaded");
        }
        Ok(report)
    }

    /// A host serving the services in `dir`, watching it for changes.
    pub async fn from_dir(dir: impl AsRef<Path>) -> Result<Host> {
        Host::new(Config::for_dir(dir.as_ref())).await
    }

    /// The configuration the host was built with.
    pub fn config(&self) -> &Config {
        &self.inner.config
    }

    /// How the initial load of the services directory went (empty before
    /// it is done).
    pub fn load_report(&self) -> LoadReport {
        self.inner.load_report.get().cloned().unwrap_or_default()
    }

    /// Whether the host has loaded its services and is not shutting down.
    pub fn is_ready(&self) -> bool {
        self.inner.load_report.get().is_some() && !self.inner.draining.load(Ordering::Relaxed)
    }

    /// Whether a graceful shutdown has begun.
    pub fn is_draining(&self) -> bool {
        self.inner.draining.load(Ordering::Relaxed)
    }

    /// Marks the host as shutting down (readiness turns false).
    pub(crate) fn set_draining(&self) {
        self.inner.draining.store(true, Ordering::Relaxed);
    }

    /// The deployed services at this moment.
    pub fn services(&self) -> Arc<Snapshot> {
        self.inner.deployer.registry().snapshot_full()
    }

    /// The registry, for rejections and bookkeeping.
    pub fn registry(&self) -> &Registry {
        self.inner.deployer.registry()
    }

    /// The host's metrics.
    pub fn metrics(&self) -> &Metrics {
        self.inner.deployer.metrics()
    }

    /// Every metric in the Prometheus text exposition format.
    pub fn metrics_text(&self) -> String {
        let instances = self.inner.deployer.runtime().instances();
        self.metrics().render(
            self.services().len(),
            instances.in_use(),
            instances.capacity(),
        )
    }

    /// Deploys a component from bytes as service `name` at `/name`, with the
    /// host's default limits, replacing any current version. Not backed by a
    /// file: if the host watches a directory that later holds `name.wasm`,
    /// the file wins.
    pub async fn deploy(&self, name: &str, wasm: impl Into<Arc<[u8]>>) -> Result<Arc<Deployment>> {
        validate_name(name).map_err(anyhow::Error::msg)?;
        let spec = ServiceSpec {
            name: name.to_string(),
            wasm: wasm.into(),
            config: ServiceConfig::defaults(name, self.inner.deployer.defaults()),
            source: None,
            digest: None,
        };
        self.inner.deployer.deploy(spec).await
    }

    /// Removes service `name`; returns whether it was deployed.
    pub fn undeploy(&self, name: &str) -> bool {
        self.inner
            .deployer
            .undeploy(name, "removed through the API")
            .is_some()
    }

    pub(crate) fn deployer(&self) -> &Arc<Deployer> {
        &self.inner.deployer
    }

    /// Handles one request in-process, with no socket: routes it, runs the
    /// service and returns its response (or the host's error response).
    pub async fn handle<B>(&self, request: http::Request<B>) -> http::Response<Body>
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
        let request_id = self.inner.request_ids.take(request.headers());
        // Hop counts are the host's to keep, not a client's to claim.
        request.headers_mut().remove(HOPS_HEADER);
        let parent = request
            .headers()
            .get(TRACEPARENT)
            .and_then(|v| v.to_str().ok())
            .and_then(TraceContext::parse);
        let trace = TraceContext::child_of(parent.as_ref());

        let routed = {
            let snapshot = self.inner.deployer.registry().snapshot();
            snapshot
                .route(request.uri().path())
                .map(|(deployment, rest)| (deployment.clone(), rest.to_string()))
        };
        let Some((deployment, rest)) = routed else {
            let path = request.uri().path().to_string();
            let mut response = not_found(&self.inner.deployer.registry().snapshot(), &path);
            set_request_id(&mut response, &request_id);
            return response;
        };
        let path = request.uri().path().to_string();
        let uri = match rewrite_uri(request.uri(), &rest) {
            Ok(uri) => uri,
            Err(reason) => return respond::text(StatusCode::BAD_REQUEST, &reason),
        };
        *request.uri_mut() = uri;
        prepare_headers(&mut request, deployment.route().as_str(), &request_id);
        request
            .headers_mut()
            .insert(TRACEPARENT, trace.header_value());
        let meta = RequestMeta {
            request_id,
            scheme,
            hops: 0,
            deadline: None,
            trace,
            internal: Some(self.inner.internal.clone()),
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
        let deployment = self
            .inner
            .deployer
            .registry()
            .snapshot()
            .service(name)
            .cloned();
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
            internal: Some(self.inner.internal.clone()),
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
            invoke::invoke(self.inner.deployer.runtime(), deployment, request, &meta).await;
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

    /// Serves HTTP on `listener` until `shutdown` completes, then stops
    /// accepting, lets in-flight requests finish (up to the configured drain
    /// timeout) and stops watching the directory.
    pub async fn serve(
        &self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()> + Send,
    ) -> Result<()> {
        self.serve_with(listener, None, shutdown).await
    }

    /// [`serve`](Host::serve), over TLS when an acceptor is given (see
    /// [`tls::acceptor`](crate::tls::acceptor)): HTTP/2 and HTTP/1.1 by ALPN.
    pub async fn serve_with(
        &self,
        listener: TcpListener,
        tls: Option<tokio_rustls::TlsAcceptor>,
        shutdown: impl Future<Output = ()> + Send,
    ) -> Result<()> {
        let config = &self.inner.config;
        crate::server::run(
            self.clone(),
            listener,
            tls,
            shutdown,
            config.client_timeout,
            config.drain_timeout,
        )
        .await?;
        self.stop_watching().await;
        Ok(())
    }

    /// Serves on `addr` with `threads` server threads, each running its own
    /// single-threaded runtime and accepting from its own `SO_REUSEPORT`
    /// socket: connections and the requests on them stay on one thread, with
    /// no cross-thread wakeups on the request path. Returns once listening;
    /// [`Serving::shutdown`] drains and stops every thread.
    pub fn serve_threads(
        &self,
        addr: std::net::SocketAddr,
        threads: usize,
        tls: Option<tokio_rustls::TlsAcceptor>,
    ) -> Result<Serving> {
        let listeners = crate::server::reuseport_listeners(addr, threads)?;
        let local_addr = listeners[0].local_addr()?;
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let mut handles = Vec::with_capacity(listeners.len());
        for (index, listener) in listeners.into_iter().enumerate() {
            let host = self.clone();
            let tls = tls.clone();
            let mut stop = stop_rx.clone();
            let config = self.inner.config.clone();
            let handle = std::thread::Builder::new()
                .name(format!("wharf-server-{index}"))
                .spawn(move || -> Result<()> {
                    let runtime = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                        .context("starting a server thread's runtime")?;
                    runtime.block_on(async move {
                        let listener = TcpListener::from_std(listener)?;
                        let shutdown = async move {
                            let _ = stop.wait_for(|stop| *stop).await;
                        };
                        crate::server::run(
                            host,
                            listener,
                            tls,
                            shutdown,
                            config.client_timeout,
                            config.drain_timeout,
                        )
                        .await
                    })
                })
                .context("starting a server thread")?;
            handles.push(handle);
        }
        Ok(Serving {
            local_addr,
            stop: stop_tx,
            threads: handles,
            host: self.clone(),
        })
    }

    /// Stops applying directory changes; the current services stay deployed.
    pub async fn stop_watching(&self) {
        if let Some(watcher) = self.inner.watcher.lock().await.take() {
            watcher.stop().await;
        }
    }
}

/// Every second, drops warm instances that have idled past
/// [`IDLE_TIMEOUT`](crate::instance::IDLE_TIMEOUT), for as long as the host
/// exists, so a service that stops receiving traffic gives its memory and
/// instance slots back.
async fn sweep_idle_instances(host: Weak<Inner>) {
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(inner) = host.upgrade() else { return };
        for deployment in inner.deployer.registry().snapshot().services() {
            deployment.warm().sweep();
        }
    }
}

/// Server threads started by [`Host::serve_threads`].
pub struct Serving {
    local_addr: std::net::SocketAddr,
    stop: tokio::sync::watch::Sender<bool>,
    threads: Vec<std::thread::JoinHandle<Result<()>>>,
    host: Host,
}

impl Serving {
    /// The address being served (with the real port if 0 was asked for).
    pub fn local_addr(&self) -> std::net::SocketAddr {
        self.local_addr
    }

    /// Stops accepting, lets in-flight requests finish (up to the drain
    /// timeout), waits for every server thread, then stops watching the
    /// directory.
    pub async fn shutdown(self) -> Result<()> {
        let _ = self.stop.send(true);
        let threads = self.threads;
        let results = tokio::task::spawn_blocking(move || {
            threads
                .into_iter()
                .map(|thread| {
                    thread
                        .join()
                        .unwrap_or_else(|_| Err(anyhow::anyhow!("a server thread panicked")))
                })
                .collect::<Vec<_>>()
        })
        .await
        .context("joining the server threads")?;
        self.host.stop_watching().await;
        results.into_iter().collect()
    }
}

/// Delivers `*.internal` calls to the host that made them.
struct InternalRouter {
    /// Weak: the host owns the router, not the other way round.
    host: Weak<Inner>,
    max_hops: u32,
}

impl InternalCalls for InternalRouter {
    fn call(
        &self,
        service: &str,
        request: http::Request<WasiBody>,
        context: CallContext,
    ) -> Pin<Box<dyn Future<Output = http::Response<WasiBody>> + Send>> {
        let host = self.host.upgrade().map(|inner| Host { inner });
        let service = service.to_string();
        Box::pin(async move {
            match host {
                Some(host) => host.dispatch_internal(&service, request, context).await,
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

/// Adds the forwarding headers, and a Host header if the request has no
/// authority at all (HTTP/1.0, in-process calls), which wasi:http requires.
fn prepare_headers(request: &mut http::Request<HyperIncomingBody>, route: &str, request_id: &str) {
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
    if let Ok(value) = HeaderValue::from_str(request_id) {
        headers.insert(REQUEST_ID_HEADER, value);
    }
}

/// Most service routes listed in a 404 body.
const LISTED_ROUTES: usize = 20;

fn not_found(snapshot: &Snapshot, path: &str) -> http::Response<Body> {
    let mut routes: Vec<&str> = snapshot.services().map(|d| d.route().as_str()).collect();
    routes.sort_unstable();
    let listed = if routes.is_empty() {
        "no services are deployed".to_string()
    } else if routes.len() > LISTED_ROUTES {
        format!(
            "services: {} and {} more",
            routes[..LISTED_ROUTES].join(", "),
            routes.len() - LISTED_ROUTES
        )
    } else {
        format!("services: {}", routes.join(", "))
    };
    let shown: String = path.chars().take(200).collect();
    respond::text(
        StatusCode::NOT_FOUND,
        &format!("no service at {shown}; {listed}"),
    )
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
