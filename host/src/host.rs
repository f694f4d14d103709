//! The embedding API: a [`Host`] owns the runtime, the registry and the
//! directory watcher, hands requests to services in-process, and serves
//! them over HTTP.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock, Weak};
use std::time::Duration;

use anyhow::{Context as _, Result};
use bytes::Bytes;
use tokio::net::TcpListener;
use tokio::sync::Mutex as AsyncMutex;

use crate::base::metrics::{BackendGauge, Metrics};
use crate::base::respond::Body;
use crate::capabilities::BackendStatus;
use crate::capabilities::Backends;
use crate::capabilities::at_rest::Sealer;
use crate::capabilities::keyvalue::store::Resealed;
use crate::capabilities::messaging::choice::BrokerSettings;
use crate::capabilities::messaging::{Broker, MessagingHub};
use crate::config::{Config, Settled};
use crate::deploy::compile::cache::CodeCaches;
use crate::deploy::install::deployer::Deployer;
use crate::deploy::install::registry::{Registry, Rejection, Snapshot};
use crate::deploy::source::cluster::Cluster;
use crate::deploy::source::files::SourceOptions;
use crate::deploy::source::manifest::HostSettings;
use crate::deploy::source::upload::{self, InstallError, Upload, UploadOutcome};
use crate::deploy::source::watcher::{self, DirWatcher, LoadReport, WatchOptions};
use crate::deploy::{Deployment, ServiceConfig, ServiceSpec, validate_name};
use crate::guest::engine::Runtime;
use crate::serve::dispatch::Dispatcher;
use crate::serve::trigger_runner::TriggerProgress;

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

/// Longest wait in [`Host::load`] for message triggers to join their groups.
const TRIGGER_JOIN_WAIT: Duration = Duration::from_secs(15);

struct Inner {
    /// How far the message triggers have got joining their groups.
    triggers: TriggerProgress,
    /// The cluster this host belongs to, if any.
    cluster: Option<Arc<Cluster>>,
    /// Whether the admin endpoint must be served over TLS.
    admin_tls_required: bool,
    config: Config,
    /// The services directory as an absolute, canonical path, resolved once
    /// at creation: file events, symlink checks and admin writes all compare
    /// against this one value, whatever form the configuration gave.
    services_dir: Option<PathBuf>,
    /// The request path: routes requests to the deployed services.
    dispatcher: Arc<Dispatcher>,
    /// The directory watcher, if watching; taken on shutdown.
    watcher: AsyncMutex<Option<DirWatcher>>,
    /// How the initial load went; set once it is done.
    load_report: OnceLock<LoadReport>,
    /// When the host was created.
    started: std::time::Instant,
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
        let services_dir = config.services_dir.as_deref().map(resolve_dir);
        if let (Some(services), Some(data)) = (&services_dir, &config.data_dir)
            && resolve_dir(data).starts_with(services)
        {
            anyhow::bail!(
                "the data directory {} is inside the services directory {}; put it elsewhere",
                data.display(),
                services.display()
            );
        }
        let from_file = match &services_dir {
            Some(dir) => {
                let dir = dir.clone();
                tokio::task::spawn_blocking(move || {
                    crate::deploy::source::files::read_host_file(&dir)
                })
                .await
                .context("reading wharf.toml failed")??
                .unwrap_or_default()
            }
            None => HostSettings::default(),
        };
        let settled = config.settle(from_file, crate::deploy::source::cluster::default_host_id)?;
        let metrics = Arc::new(Metrics::for_host(
            settled.cluster.as_ref().and_then(|c| c.host_id.as_deref()),
        ));
        let backends = open_backends(&settled, config.data_dir.as_deref(), &metrics).await?;
        let engine_options = settled.engine.clone();
        let (runtime, caches) = tokio::task::spawn_blocking(move || {
            let runtime = Runtime::new(&engine_options)?;
            let caches = CodeCaches::open(engine_options.cache_dir.as_deref(), &runtime);
            anyhow::Ok((runtime, caches))
        })
        .await
        .context("engine setup task failed")??;
        let deployer = Arc::new(Deployer::new(
            Arc::new(runtime),
            caches,
            backends,
            Arc::new(Registry::new()),
            metrics,
            settled.policy,
            config.data_dir.as_deref(),
        )?);
        let dispatcher = Dispatcher::new(deployer, config.max_call_depth);
        let cluster = match &settled.cluster {
            Some(cluster_config) => {
                let cluster = Cluster::connect(cluster_config.clone()).await?;
                tracing::info!(cluster = %cluster.name(), host = %cluster.host_id(), url = %crate::base::redact::url(&cluster_config.url), "joining the cluster");
                Some(cluster)
            }
            None => None,
        };
        let broker = dispatcher.deployer().backends().messaging.clone();
        let triggers = crate::serve::trigger_runner::start(&dispatcher, broker, cluster.clone());
        let inner = Arc::new(Inner {
            triggers,
            cluster,
            admin_tls_required: settled.admin_tls_required,
            config,
            services_dir,
            dispatcher,
            watcher: AsyncMutex::new(None),
            load_report: OnceLock::new(),
            started: std::time::Instant::now(),
        });
        tokio::spawn(sweep_idle_instances(Arc::downgrade(&inner)));
        Ok(Host { inner })
    }

    /// Loads every service in the configured directory, in parallel, and
    /// returns once all valid ones are deployed; then, if configured, keeps
    /// watching it. Without a directory it just marks the host ready.
    pub async fn load(&self) -> Result<LoadReport> {
        let config = &self.inner.config;
        let (report, watcher) = match &self.inner.services_dir {
            Some(dir) => {
                let options = WatchOptions {
                    source: SourceOptions {
                        dir: dir.clone(),
                        allow_external_symlinks: config.allow_external_symlinks,
                    },
                    base_limits: config.limits,
                    limit_overrides: config.limit_overrides,
                    secret_sources: config.secret_sources.clone(),
                };
                let (report, watcher) = watcher::load_and_watch(
                    options,
                    self.inner.dispatcher.deployer().clone(),
                    config.watch,
                )
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
        // A group gets the messages published after it joined: loaded
        // means the triggers have joined (or found the broker down).
        let version = *self
            .inner
            .dispatcher
            .deployer()
            .registry()
            .watch_changes()
            .borrow();
        if !self
            .inner
            .triggers
            .settled(version, TRIGGER_JOIN_WAIT)
            .await
        {
            tracing::warn!(
                "message triggers are still joining their groups after {}s; serving anyway",
                TRIGGER_JOIN_WAIT.as_secs()
            );
        }
        *self.inner.watcher.lock().await = watcher;
        if let (Some(cluster), Some(dir)) = (&self.inner.cluster, &self.inner.services_dir) {
            cluster.start(self.inner.dispatcher.deployer().clone(), dir.clone());
        }
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

    /// Whether the admin endpoint must be served over TLS (`[admin]
    /// tls_required`, `--admin-tls-required`): whoever serves it refuses
    /// to without a certificate.
    pub fn admin_tls_required(&self) -> bool {
        self.inner.admin_tls_required
    }

    /// The services directory, absolute and canonical (symlinks resolved),
    /// if the host has one.
    pub fn services_dir(&self) -> Option<PathBuf> {
        self.inner.services_dir.clone()
    }

    /// How the initial load of the services directory went (empty before
    /// it is done).
    pub fn load_report(&self) -> LoadReport {
        self.inner.load_report.get().cloned().unwrap_or_default()
    }

    /// Whether the host has loaded its services and is not shutting down.
    pub fn is_ready(&self) -> bool {
        self.inner.load_report.get().is_some()
            && !self.inner.dispatcher.is_draining()
            && self.inner.cluster.as_ref().is_none_or(|c| c.has_joined())
    }

    /// How long ago the host was created.
    pub fn uptime(&self) -> std::time::Duration {
        self.inner.started.elapsed()
    }

    /// The cluster this host belongs to, if any.
    pub fn cluster(&self) -> Option<&Arc<Cluster>> {
        self.inner.cluster.as_ref()
    }

    /// Whether a graceful shutdown has begun.
    pub fn is_draining(&self) -> bool {
        self.inner.dispatcher.is_draining()
    }

    /// The deployed services at this moment.
    pub fn services(&self) -> Arc<Snapshot> {
        self.inner.dispatcher.deployer().registry().snapshot_full()
    }

    /// Why the last version of `name` offered was refused, if it was.
    pub fn rejection(&self, name: &str) -> Option<Rejection> {
        self.registry().rejection(name)
    }

    /// Every service whose last offered version was refused, with why.
    pub fn rejections(&self) -> std::collections::BTreeMap<String, Rejection> {
        self.registry().rejections()
    }

    /// Client connections open now, on every server thread.
    pub fn open_connections(&self) -> i64 {
        self.metrics().open_connections()
    }

    /// The registry, for rejections and bookkeeping.
    pub(crate) fn registry(&self) -> &Registry {
        self.inner.dispatcher.deployer().registry()
    }

    /// The host's metrics.
    pub(crate) fn metrics(&self) -> &Metrics {
        self.inner.dispatcher.deployer().metrics()
    }

    /// Whether each of the host's backends (key-value, ...) is reachable,
    /// with the capability it serves.
    pub fn backend_statuses(&self) -> Vec<(&'static str, BackendStatus)> {
        self.inner.dispatcher.deployer().backends().statuses()
    }

    /// The host's message broker: what services publish to and message
    /// triggers consume from, with its dead letters.
    pub fn broker(&self) -> Option<&Broker> {
        self.messaging().map(|hub| hub.broker())
    }

    /// Seals every value of `buckets` — by default, every bucket a
    /// deployed service names — again with the current encryption key
    /// (`wharf rekey`), so a previous key can then be retired. Values
    /// written meanwhile are kept. Each bucket's report, by name; a bucket
    /// that failed stops the run with its error. With no key, or no
    /// key-value backend, an error says so.
    pub async fn rekey(&self, buckets: &[String]) -> Result<Vec<(String, Resealed)>> {
        let store = self
            .inner
            .dispatcher
            .deployer()
            .backends()
            .keyvalue
            .clone()
            .context("this host has no key-value store")?;
        let buckets: std::collections::BTreeSet<String> = if buckets.is_empty() {
            self.services()
                .services()
                .flat_map(|d| d.config().keyvalue.entries())
                .filter(|bucket| bucket != "*")
                .collect()
        } else {
            buckets.iter().cloned().collect()
        };
        let mut reports = Vec::new();
        for bucket in buckets {
            let report = store
                .reseal(&bucket)
                .await
                .map_err(|err| anyhow::anyhow!("bucket {bucket:?}: {err}"))?;
            tracing::info!(bucket = %bucket, keys = report.keys, resealed = report.resealed, unopened = report.unopened, "rekeyed a bucket");
            reports.push((bucket, report));
        }
        Ok(reports)
    }

    /// The host's messaging (its broker, reply inboxes and metrics).
    pub(crate) fn messaging(&self) -> Option<&Arc<MessagingHub>> {
        self.inner
            .dispatcher
            .deployer()
            .backends()
            .messaging
            .as_ref()
    }

    /// Every metric in the Prometheus text exposition format.
    pub fn metrics_text(&self) -> String {
        let gauges: Vec<BackendGauge> = self
            .backend_statuses()
            .into_iter()
            .map(|(capability, status)| BackendGauge {
                capability,
                backend: status.kind,
                up: status.up,
            })
            .collect();
        self.metrics().set_backends(&gauges);
        let instances = self.inner.dispatcher.deployer().runtime().instances();
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
            config: ServiceConfig::defaults(name, self.inner.dispatcher.deployer().defaults()),
            source: None,
            digest: None,
            manifest: None,
        };
        self.inner.dispatcher.deployer().deploy(spec).await
    }

    /// Removes service `name`; returns whether it was deployed.
    pub fn undeploy(&self, name: &str) -> bool {
        self.inner
            .dispatcher
            .deployer()
            .undeploy(name, "removed through the API")
            .is_some()
    }

    pub(crate) fn deployer(&self) -> &Arc<Deployer> {
        self.inner.dispatcher.deployer()
    }

    /// Deploys an upload received into staged files in the services
    /// directory (see [`upload::deploy_upload`]), waiting up to `wait` for it
    /// to serve.
    pub(crate) async fn deploy_upload(
        &self,
        name: &str,
        upload: Upload,
        wait: Duration,
    ) -> Result<UploadOutcome, InstallError> {
        let Some(dir) = self.services_dir() else {
            return Err(InstallError::Storing(
                "this host has no services directory to deploy into".into(),
            ));
        };
        upload::deploy_upload(self.deployer(), &dir, name, upload, wait).await
    }

    /// Removes service `name`, its files and its deployment; whether there
    /// was anything to remove.
    pub(crate) async fn remove_service(&self, name: &str) -> Result<bool> {
        match self.services_dir() {
            Some(dir) => upload::remove(self.deployer(), &dir, name).await,
            None => Ok(self.undeploy(name)),
        }
    }

    /// The settings a manifest's text (`None`: none) gives service `name`
    /// on this host, or why it is refused.
    pub(crate) async fn service_config(
        &self,
        name: &str,
        manifest: Option<&str>,
    ) -> Result<ServiceConfig, String> {
        upload::service_config(self.deployer(), name, manifest).await
    }

    /// Instance slots in use now, and how many there are.
    pub(crate) fn instance_slots(&self) -> (usize, usize) {
        let instances = self.deployer().runtime().instances();
        (instances.in_use(), instances.capacity())
    }

    /// Handles one request in-process, with no socket: routes it, runs the
    /// service and returns its response (or the host's error response).
    pub async fn handle<B>(&self, request: http::Request<B>) -> http::Response<Body>
    where
        B: http_body::Body<Data = Bytes> + Send + 'static,
        B::Error: std::fmt::Display,
    {
        self.inner.dispatcher.handle(request).await
    }

    /// timeout) and stops watching the directory.
    pub async fn serve(
        &self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()> + Send,
    ) -> Result<()> {
        self.serve_with(listener, None, shutdown).await
    }

    /// [`serve`](Host::serve), over TLS when an acceptor is given (see
    /// [`tls::acceptor`](crate::serve::tls::acceptor)): HTTP/2 and HTTP/1.1 by ALPN.
    pub async fn serve_with(
        &self,
        listener: TcpListener,
        tls: Option<tokio_rustls::TlsAcceptor>,
        shutdown: impl Future<Output = ()> + Send,
    ) -> Result<()> {
        let config = &self.inner.config;
        if let (Some(cluster), Ok(address)) = (&self.inner.cluster, listener.local_addr()) {
            cluster.advertise(&format!("http://{address}"));
        }
        crate::serve::server::run(
            self.inner.dispatcher.clone(),
            crate::serve::server::Incoming::Listener(listener),
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
    /// single-threaded runtime. One listening socket accepts, and hands the
    /// connections to the threads in turn: a connection and the requests on
    /// it stay on one thread, with no cross-thread wakeups on the request
    /// path. Returns once listening; [`Serving::shutdown`] drains and stops
    /// every thread.
    pub fn serve_threads(
        &self,
        addr: std::net::SocketAddr,
        threads: usize,
        tls: Option<tokio_rustls::TlsAcceptor>,
    ) -> Result<Serving> {
        let listener = crate::serve::server::bind(addr)?;
        let local_addr = listener.local_addr()?;
        if let Some(cluster) = &self.inner.cluster {
            let scheme = if tls.is_some() { "https" } else { "http" };
            cluster.advertise(&format!("{scheme}://{local_addr}"));
        }
        let config = &self.inner.config;
        let threads = crate::serve::server::ServerThreads::start(
            listener,
            threads,
            &self.inner.dispatcher,
            tls,
            config.client_timeout,
            config.drain_timeout,
        )?;
        Ok(Serving {
            local_addr,
            threads,
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

/// Opens the host's capability backends, as `settled` chose them.
async fn open_backends(
    settled: &Settled,
    data_dir: Option<&Path>,
    metrics: &Arc<Metrics>,
) -> Result<Backends> {
    let sealer = match settled.encryption.clone() {
        Some(keys) => Some(Arc::new(
            tokio::task::spawn_blocking(move || Sealer::load(&keys))
                .await
                .context("loading the encryption keys")?
                .context("loading the encryption keys")?,
        )),
        None => None,
    };
    // Both backends on the cluster's NATS use its one credentials file:
    // read each file once.
    let keyvalue_credentials = match &settled.keyvalue_credentials {
        Some(path) => Some(crate::capabilities::read_credentials(path).await?),
        None => None,
    };
    let messaging_credentials = match &settled.messaging_credentials {
        Some(path) if settled.keyvalue_credentials.as_ref() == Some(path) => {
            keyvalue_credentials.clone()
        }
        Some(path) => Some(crate::capabilities::read_credentials(path).await?),
        None => None,
    };
    let keyvalue = settled
        .keyvalue
        .open(
            data_dir,
            settled.policy.defaults.kv_value_size,
            settled.keyvalue_replicas,
            &settled.keyvalue_tls,
            keyvalue_credentials.as_deref(),
            sealer.clone(),
        )
        .await
        .context("opening the key-value backend")?;
    tracing::info!(backend = keyvalue.kind(), detail = %keyvalue.status().detail, "key-value backend");
    let limits = settled.messaging_limits;
    let broker = settled
        .messaging
        .open(
            data_dir,
            BrokerSettings {
                limits,
                replicas: settled.messaging_replicas,
                queues: settled.messaging_queues,
                tls: settled.messaging_tls.clone(),
                credentials: messaging_credentials,
                partitions: settled.messaging_partitions,
                sealer: sealer.filter(|_| settled.messaging_encrypt),
            },
        )
        .await
        .context("opening the message broker")?;
    tracing::info!(broker = broker.kind(), detail = %broker.status().detail, "message broker");
    Ok(Backends {
        keyvalue: Some(keyvalue),
        messaging: Some(MessagingHub::new(broker, limits, metrics.clone())?),
    })
}

/// `dir` as an absolute, canonical path; if it cannot be resolved (it does
/// not exist yet), at least absolute, so later errors name a full path.
fn resolve_dir(dir: &Path) -> PathBuf {
    std::fs::canonicalize(dir)
        .unwrap_or_else(|_| std::path::absolute(dir).unwrap_or_else(|_| dir.to_path_buf()))
}

/// Every second, drops warm instances that have idled past
/// [`IDLE_TIMEOUT`](crate::guest::instance::IDLE_TIMEOUT), for as long as the host
/// exists, so a service that stops receiving traffic gives its memory and
/// instance slots back.
async fn sweep_idle_instances(host: Weak<Inner>) {
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(inner) = host.upgrade() else { return };
        for deployment in inner.dispatcher.deployer().registry().snapshot().services() {
            deployment.guest().sweep_idle();
        }
    }
}

/// Server threads started by [`Host::serve_threads`].
pub struct Serving {
    local_addr: std::net::SocketAddr,
    threads: crate::serve::server::ServerThreads,
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
        let stopped = self.threads.stop().await;
        self.host.stop_watching().await;
        stopped
    }
}
