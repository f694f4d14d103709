//! `wharf serve`: every component in a directory over HTTP, following
//! changes, with the admin endpoint beside it if asked for.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context as _, Result};
use wharf::admin::AdminToken;
use wharf::cluster::ClusterConfig;
use wharf::limits::{self, Limits, PartialLimits};
use wharf::messaging::{BrokerChoice, MessagingLimits, PartialMessagingLimits, QueueType};
use wharf::{
    AtRestKeys, BackendTls, Config, EngineOptions, Host, KeyValueChoice, Replicas, SecretSources,
    Tiers,
};

use super::logging::{LogFormat, announce};
use super::shutdown_signal;

#[derive(clap::Args, Debug)]
pub struct ServeArgs {
    /// The services directory: each NAME.wasm in it is served at /NAME.
    /// [default: ./services, created if it does not exist]
    pub dir: Option<PathBuf>,

    /// Address to listen on; port 0 picks a free port (the real address is
    /// printed as "listening on http://HOST:PORT").
    #[arg(long, short, default_value = "127.0.0.1:8080", value_name = "ADDR")]
    pub listen: SocketAddr,

    /// Load the directory once at start and do not follow later changes.
    #[arg(long)]
    pub no_watch: bool,

    /// Wall-clock limit per request for services whose manifest sets none
    /// (e.g. 30s, 500ms); past it the guest is stopped and the client gets
    /// 504. [default: 30s, or DIR/wharf.toml]
    #[arg(long, value_name = "DURATION", value_parser = limits::parse_duration)]
    pub timeout: Option<Duration>,

    /// Cap on each instance's linear memory for services whose manifest
    /// sets none (e.g. 128MiB, 1GiB). [default: 128MiB, or DIR/wharf.toml]
    #[arg(long, value_name = "SIZE", value_parser = limits::parse_memory)]
    pub memory: Option<u64>,

    /// Requests one service may run at once, for services whose manifest
    /// sets none; more wait briefly, then get 503. [default: 64, or
    /// DIR/wharf.toml]
    #[arg(long, value_name = "N", value_parser = limits::parse_concurrency)]
    pub concurrency: Option<u32>,

    /// CPU time one request may use, for services whose manifest sets none
    /// (e.g. 5s, 200ms); past it the guest is stopped and the client gets
    /// 504. [default: 5s, or DIR/wharf.toml]
    #[arg(long, value_name = "DURATION", value_parser = limits::parse_duration)]
    pub cpu: Option<Duration>,

    /// Largest request body, for services whose manifest sets none; larger
    /// ones get 413. [default: 16MiB, or DIR/wharf.toml]
    #[arg(long, value_name = "SIZE", value_parser = limits::parse_size)]
    pub body_limit: Option<u64>,

    /// How long shutdown (Ctrl-C, SIGTERM) waits for in-flight requests.
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = limits::parse_duration)]
    pub drain_timeout: Duration,

    /// How long a client may stall — sending request headers, idling between
    /// keep-alive requests, or not reading a response — before it is cut off.
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = limits::parse_duration)]
    pub client_timeout: Duration,

    /// Instances that may run at once across all services (the size of the
    /// instance pool); requests beyond it get 503.
    #[arg(long, value_name = "N", default_value_t = 1000)]
    pub max_instances: u32,

    /// The most linear memory any one service may have on this host (e.g.
    /// 512MiB): a version whose limits.memory asks for more is refused
    /// here. [default: 4GiB]
    #[arg(long, value_name = "SIZE", value_parser = limits::parse_memory)]
    pub max_service_memory: Option<u64>,

    /// Which compilers turn components into native code: "tiered" serves a
    /// new component from Winch's quickly compiled code and swaps in
    /// Cranelift's optimised code when it is ready; "cranelift" waits for
    /// optimised code; "winch" never optimises (for tests). [default:
    /// engine.tiers in DIR/wharf.toml, else tiered]
    #[arg(long, value_name = "TIERS")]
    pub tiers: Option<Tiers>,

    /// Linear memory kept resident (reset in place rather than returned to
    /// the system) per instance slot of a large guest, such as a JavaScript
    /// or Python interpreter: more is faster per request, and costs up to
    /// this much memory per instance running at once. [default:
    /// engine.keep_resident in DIR/wharf.toml, else 8MiB]
    #[arg(long, value_name = "SIZE", value_parser = limits::parse_memory)]
    pub keep_resident: Option<u64>,

    /// Directory of the compiled-code cache [default: the platform cache
    /// directory, e.g. ~/.cache/wharf].
    #[arg(long, value_name = "DIR", conflicts_with = "no_cache")]
    pub cache_dir: Option<PathBuf>,

    /// Where Wharf keeps its own state: the last version of each service
    /// that deployed, served at start if the service's file is broken
    /// [default: the platform data directory, one per services directory,
    /// e.g. ~/.local/share/wharf/services-1a2b3c4d]. Not inside DIR.
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,

    /// The key-value backend guests' wasi:keyvalue buckets live in:
    /// "embedded" (SQLite in the data directory), "redis://HOST:PORT" or
    /// "nats://HOST:PORT". [default: keyvalue.backend in DIR/wharf.toml, else
    /// embedded]
    #[arg(long, value_name = "BACKEND")]
    pub kv: Option<KeyValueChoice>,

    /// The message broker services publish to and are triggered from:
    /// "embedded" (SQLite in the data directory), "nats://HOST:PORT[,…]"
    /// (JetStream), "amqp://USER:PASSWORD@HOST:PORT/VHOST[,…]" (RabbitMQ;
    /// several nodes are tried in turn) or "kafka://HOST:PORT[,HOST:PORT…]"
    /// (Apache Kafka; kafkas:// over TLS).
    /// [default: messaging.backend in DIR/wharf.toml, else embedded]
    #[arg(long, value_name = "BROKER")]
    pub broker: Option<BrokerChoice>,

    /// Messages the broker holds undelivered before it refuses publishes
    /// (per consumer group on RabbitMQ). [default: 1000000, or
    /// messaging.max_pending in DIR/wharf.toml]
    #[arg(long, value_name = "N")]
    pub max_pending_messages: Option<u64>,

    /// Join the cluster on these NATS JetStream servers
    /// ("nats://HOST:PORT[,…]"): the services come from the cluster's
    /// index, and key-value and messaging default to its NATS.
    #[arg(long, value_name = "URL")]
    pub cluster: Option<String>,

    /// The cluster's name (clusters sharing a NATS server stay apart).
    #[arg(
        long,
        value_name = "NAME",
        default_value = "default",
        requires = "cluster"
    )]
    pub cluster_name: String,

    /// A NATS credentials file for the cluster.
    #[arg(long, value_name = "FILE", requires = "cluster")]
    pub cluster_credentials: Option<PathBuf>,

    /// This host's name in the cluster [default: HOSTNAME-PID].
    #[arg(long, value_name = "ID", requires = "cluster")]
    pub cluster_host_id: Option<String>,

    /// How many NATS servers keep a copy of every bucket, stream and object
    /// store Wharf creates: "auto" (as many as the NATS cluster has
    /// servers, at most 3) or 1-5. [default: replicas under [cluster],
    /// [keyvalue] and [messaging] in DIR/wharf.toml, else auto]
    #[arg(long, value_name = "N")]
    pub replicas: Option<Replicas>,

    /// The CA bundle (PEM) that signed the backends' certificates: NATS,
    /// Redis (rediss://) and RabbitMQ (amqps://) are then reached over TLS
    /// only, verified against it. [default: tls.ca in DIR/wharf.toml]
    #[arg(long, value_name = "FILE")]
    pub backend_tls_ca: Option<PathBuf>,

    /// A client certificate (PEM) for backends that require mutual TLS,
    /// with --backend-tls-key. [default: tls.cert in DIR/wharf.toml]
    #[arg(long, value_name = "FILE", requires = "backend_tls_key")]
    pub backend_tls_cert: Option<PathBuf>,

    /// The private key (PEM) of --backend-tls-cert. [default: tls.key in
    /// DIR/wharf.toml]
    #[arg(long, value_name = "FILE", requires = "backend_tls_cert")]
    pub backend_tls_key: Option<PathBuf>,

    /// A key file (64 hex digits) to encrypt key-value values with at rest:
    /// whichever backend stores them holds them sealed (AES-256-GCM).
    /// [default: encryption.key in DIR/wharf.toml, else not encrypted]
    #[arg(long, value_name = "FILE")]
    pub encryption_key: Option<PathBuf>,

    /// The kind of queue RabbitMQ keeps each consumer group in: "quorum"
    /// (replicated on a majority of the RabbitMQ cluster), "classic" (one
    /// node) or "auto" (quorum when --broker lists several nodes).
    /// [default: messaging.queues in DIR/wharf.toml, else auto]
    #[arg(long, value_name = "KIND")]
    pub queue_type: Option<QueueType>,

    /// Compile every component at load, without reading or writing the
    /// compiled-code cache.
    #[arg(long)]
    pub no_cache: bool,

    /// Follow NAME.wasm symlinks that point outside the services directory
    /// (rejected by default).
    #[arg(long)]
    pub allow_external_symlinks: bool,

    /// A directory whose files services' manifests may name as secrets
    /// ([secrets] NAME = { file = "/DIR/…" }); repeatable. Nothing is handed
    /// out by default (see also [secrets] dirs in DIR/wharf.toml).
    #[arg(long = "secret-dir", value_name = "DIR")]
    pub secret_dirs: Vec<PathBuf>,

    /// An environment variable services' manifests may name as a secret
    /// ([secrets] NAME = { env = "…" }); a trailing * hands out a prefix
    /// (ORDERS_*); repeatable. None by default.
    #[arg(long = "secret-env", value_name = "NAME")]
    pub secret_env: Vec<String>,

    /// Serve the admin endpoint (health, readiness, metrics, service list,
    /// deploy API) on this address, e.g. 127.0.0.1:9090. Off by default.
    #[arg(long, value_name = "ADDR")]
    pub admin: Option<SocketAddr>,

    /// File holding the bearer token that admin deploys and removals need
    /// (default: the WHARF_ADMIN_TOKEN environment variable; without either,
    /// admin writes are disabled).
    #[arg(long, value_name = "FILE")]
    pub admin_token_file: Option<PathBuf>,

    /// A host name the admin endpoint answers to besides IP addresses and
    /// localhost (a browser can be steered to a loopback endpoint through
    /// any other name); repeatable, e.g. --admin-host wharf-admin.prod.svc.
    #[arg(long = "admin-host", value_name = "NAME")]
    pub admin_hosts: Vec<String>,

    /// Serve HTTPS (HTTP/2 and HTTP/1.1 by ALPN) with this PEM certificate
    /// chain; needs --tls-key.
    #[arg(long, value_name = "FILE", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,

    /// The PEM private key for --tls-cert.
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,

    /// Refuse to start the admin endpoint without --tls-cert and
    /// --tls-key, so its token and dashboard never travel in the clear
    /// (with them, it speaks HTTPS only either way). [default:
    /// admin.tls_required in DIR/wharf.toml, else false]
    #[arg(long)]
    pub admin_tls_required: bool,

    /// Most service-to-service hops one request may cause (calls to
    /// http://NAME.internal); deeper calls get 508 Loop Detected.
    #[arg(long, value_name = "N", default_value_t = 10)]
    pub max_call_depth: u32,

    /// Server threads: each runs its own single-threaded runtime and accepts
    /// from its own SO_REUSEPORT socket on ADDR [default: one per CPU].
    #[arg(long, value_name = "N")]
    pub threads: Option<usize>,

    /// Log line format.
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    /// Log filter, e.g. "info", "warn", "wharf=debug" (overrides RUST_LOG).
    #[arg(long, value_name = "FILTER")]
    pub log: Option<String>,
}

/// The services directory when none is given.
const DEFAULT_DIR: &str = "services";

/// The server threads to run: `--threads`, else one per core.
pub fn server_threads(flag: Option<usize>) -> usize {
    flag.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
        .max(1)
}

/// The services directory to serve: the one given, or `./services`, which
/// is created if it does not exist (a given one must exist: a typo should
/// not silently serve an empty new directory).
fn services_dir(given: Option<&PathBuf>) -> Result<PathBuf> {
    if let Some(dir) = given {
        return Ok(dir.clone());
    }
    let dir = PathBuf::from(DEFAULT_DIR);
    if !dir.exists() {
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("creating the services directory ./{DEFAULT_DIR}"))?;
        tracing::info!(
            dir = %std::path::absolute(&dir).unwrap_or_else(|_| dir.clone()).display(),
            "created the services directory; drop NAME.wasm files into it to serve them"
        );
    }
    Ok(dir)
}

pub async fn run(args: ServeArgs) -> Result<()> {
    let dir = services_dir(args.dir.as_ref())?;
    let cache_dir = if args.no_cache {
        None
    } else {
        args.cache_dir.clone().or_else(wharf::default_cache_dir)
    };
    let config = Config {
        services_dir: Some(dir.clone()),
        data_dir: args
            .data_dir
            .clone()
            .or_else(|| wharf::default_data_dir(&dir)),
        keyvalue: args.kv.clone(),
        messaging: args.broker.clone(),
        messaging_limits: MessagingLimits::default(),
        messaging_overrides: PartialMessagingLimits {
            max_pending: args.max_pending_messages,
            ..PartialMessagingLimits::default()
        },
        cluster: args.cluster.clone().map(|url| ClusterConfig {
            url,
            name: args.cluster_name.clone(),
            credentials: args.cluster_credentials.clone(),
            host_id: args.cluster_host_id.clone(),
            replicas: Replicas::Auto,
            tls: BackendTls::default(),
        }),
        backend_tls: (args.backend_tls_ca.is_some() || args.backend_tls_cert.is_some()).then(
            || BackendTls {
                ca: args.backend_tls_ca.clone(),
                cert: args.backend_tls_cert.clone(),
                key: args.backend_tls_key.clone(),
            },
        ),
        encryption: args.encryption_key.clone().map(|key| AtRestKeys {
            key,
            previous: Vec::new(),
        }),
        replicas: args.replicas,
        queues: args.queue_type,
        admin_tls_required: args.admin_tls_required.then_some(true),
        watch: !args.no_watch,
        allow_external_symlinks: args.allow_external_symlinks,
        limits: Limits::default(),
        limit_overrides: PartialLimits {
            timeout: args.timeout,
            memory: args.memory,
            concurrency: args.concurrency,
            body: args.body_limit,
            cpu: args.cpu,
            ..PartialLimits::default()
        },
        engine: EngineOptions {
            max_instances: args.max_instances,
            cache_dir,
            max_service_memory: args.max_service_memory.unwrap_or(limits::MAX_MEMORY),
            tiers: args.tiers,
            keep_resident: args.keep_resident,
            ..EngineOptions::default()
        },
        drain_timeout: args.drain_timeout,
        client_timeout: args.client_timeout,
        max_call_depth: args.max_call_depth,
        secret_sources: SecretSources::new(args.secret_dirs.clone(), args.secret_env.clone())
            .map_err(anyhow::Error::msg)
            .context("--secret-dir/--secret-env")?,
    };
    if let Some(data_dir) = &config.data_dir {
        tracing::info!(dir = %data_dir.display(), "data directory");
    }
    let host = Host::create(config).await.context("starting the host")?;
    let tls = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => Some(wharf::tls_acceptor(cert, key)?),
        _ => None,
    };
    let token = match &args.admin_token_file {
        Some(path) => Some(AdminToken::from_file(path)?),
        None => match std::env::var("WHARF_ADMIN_TOKEN") {
            Ok(token) if !token.trim().is_empty() => Some(AdminToken::new(&token)?),
            _ => None,
        },
    };
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|stop| *stop).await;
    };
    // The admin endpoint is up during the initial load, so /readyz can say
    // "not yet"; it stops after the public listener has drained.
    let (admin_stop_tx, admin_stop_rx) = tokio::sync::watch::channel(false);
    let admin = match args.admin {
        Some(addr) => {
            if tls.is_none() && host.admin_tls_required() {
                anyhow::bail!(
                    "the admin endpoint must use TLS ([admin] tls_required in wharf.toml, or --admin-tls-required): give --tls-cert and --tls-key"
                );
            }
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("cannot listen on {addr} for the admin endpoint"))?;
            let address = listener.local_addr().context("reading the admin address")?;
            let scheme = if tls.is_some() { "https" } else { "http" };
            announce(&format!("wharf: admin listening on {scheme}://{address}"));
            if token.is_none() {
                tracing::info!(
                    "admin deploys are disabled: no --admin-token-file or WHARF_ADMIN_TOKEN"
                );
            }
            let guard = wharf::admin::AdminGuard::new(token, &args.admin_hosts);
            let (host, stop) = (host.clone(), stopped(admin_stop_rx));
            Some(match tls.clone() {
                // With a certificate the admin endpoint speaks HTTPS only:
                // its token and dashboard never travel in the clear.
                Some(tls) => tokio::spawn(wharf::admin::serve_guarded_tls(
                    host, listener, guard, tls, stop,
                )),
                None => tokio::spawn(wharf::admin::serve_guarded(host, listener, guard, stop)),
            })
        }
        None => None,
    };
    tokio::spawn(async move {
        shutdown_signal().await;
        let _ = stop_tx.send(true);
    });

    host.load()
        .await
        .with_context(|| format!("cannot serve {}", dir.display()))?;
    let threads = server_threads(args.threads);
    let scheme = if tls.is_some() { "https" } else { "http" };
    let serving = host.serve_threads(args.listen, threads, tls)?;
    announce(&format!(
        "wharf: listening on {scheme}://{}",
        serving.local_addr()
    ));
    stopped(stop_rx.clone()).await;
    serving.shutdown().await?;
    let _ = admin_stop_tx.send(true);
    if let Some(admin) = admin {
        let _ = admin.await;
    }
    announce("wharf: stopped");
    Ok(())
}
