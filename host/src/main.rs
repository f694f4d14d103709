//! The `wharf` command line: `wharf serve [DIR]`, and `check`, `deploy`,
//! `rm` and `status` for the developer's loop and CI.

use std::io::IsTerminal as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context as _, Result};
use clap::{Parser, Subcommand};
use tracing_subscriber::EnvFilter;
use wharf::admin::AdminToken;
use wharf::base::limits::{self, Limits, PartialLimits};
use wharf::capabilities::keyvalue::KeyValueChoice;
use wharf::capabilities::messaging::{BrokerChoice, MessagingLimits, PartialMessagingLimits};
use wharf::capabilities::wasi_config::SecretSources;
use wharf::deploy::source::cluster::ClusterConfig;
use wharf::guest::engine::{EngineOptions, Tiers};
use wharf::ops::client::{AdminClient, DEFAULT_ADMIN_URL, DeployOutcome, render_status};
use wharf::ops::scaffold::{self, Language};
use wharf::{Config, Host};

mod cli;

/// Wharf: a serverless WebAssembly microservice host.
///
/// Every NAME.wasm component in the services directory that exports
/// wasi:http/incoming-handler is served at /NAME. Drop a file in to deploy
/// it, replace it to upgrade, delete it to remove it — while Wharf runs.
#[derive(Parser, Debug)]
#[command(name = "wharf", version, about, long_about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Serve every component in a directory over HTTP, following changes.
    Serve(Box<ServeArgs>),
    /// Create a ready-to-build service project (source, WIT, build file
    /// and a commented manifest).
    New(NewArgs),
    /// Tell, without serving it, whether a file will deploy and why not;
    /// exits 1 if it will not.
    Check(CheckArgs),
    /// Deploy a component to a running host through its admin API.
    Deploy(DeployArgs),
    /// Remove a service from a running host through its admin API.
    Rm(RmArgs),
    /// Show a running host's services: generation, requests/s, errors,
    /// in-flight requests and the last deploy's result.
    Status(StatusArgs),
    /// Develop a service project: build it, serve it, rebuild and hot-swap
    /// it on every save, and show its log.
    Dev(cli::dev::DevArgs),
}

#[derive(clap::Args, Debug)]
struct NewArgs {
    /// The service name (lowercase letters, digits and '-'): it serves at
    /// /NAME.
    name: String,
    /// The language: js, ts, python or rust.
    #[arg(long, default_value = "js", value_parser = |s: &str| s.parse::<Language>())]
    lang: Language,
    /// Where to create it [default: ./NAME].
    #[arg(long, value_name = "DIR")]
    dir: Option<PathBuf>,
}

#[derive(clap::Args, Debug)]
struct CheckArgs {
    /// The component file.
    file: PathBuf,
    /// Its manifest [default: NAME.toml beside the file, if there is one].
    #[arg(long, value_name = "FILE")]
    manifest: Option<PathBuf>,
    /// The service name [default: the file's name without .wasm].
    #[arg(long, value_name = "NAME")]
    name: Option<String>,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

/// Where the admin API is and how to authenticate to it.
#[derive(clap::Args, Debug)]
struct AdminArgs {
    /// The host's admin endpoint [default: WHARF_ADMIN_URL, else
    /// http://127.0.0.1:9090].
    #[arg(long, value_name = "URL")]
    to: Option<String>,
    /// File holding the admin bearer token [default: WHARF_ADMIN_TOKEN].
    #[arg(long, value_name = "FILE")]
    token_file: Option<PathBuf>,
}

#[derive(clap::Args, Debug)]
struct DeployArgs {
    /// The component file.
    file: PathBuf,
    /// Its manifest [default: NAME.toml beside the file, if there is one].
    #[arg(long, value_name = "FILE")]
    manifest: Option<PathBuf>,
    /// The service name [default: the file's name without .wasm].
    #[arg(long, value_name = "NAME")]
    name: Option<String>,
    #[command(flatten)]
    admin: AdminArgs,
}

#[derive(clap::Args, Debug)]
struct RmArgs {
    /// The service to remove.
    name: String,
    #[command(flatten)]
    admin: AdminArgs,
}

#[derive(clap::Args, Debug)]
struct StatusArgs {
    /// Seconds over which requests/s is measured.
    #[arg(long, value_name = "SECONDS", default_value_t = 1.0)]
    window: f64,
    /// Print the host's service list as JSON instead.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    admin: AdminArgs,
}

/// How log lines are written.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

#[derive(clap::Args, Debug)]
struct ServeArgs {
    /// The services directory: each NAME.wasm in it is served at /NAME.
    /// [default: ./services, created if it does not exist]
    dir: Option<PathBuf>,

    /// Address to listen on; port 0 picks a free port (the real address is
    /// printed as "listening on http://HOST:PORT").
    #[arg(long, short, default_value = "127.0.0.1:8080", value_name = "ADDR")]
    listen: SocketAddr,

    /// Load the directory once at start and do not follow later changes.
    #[arg(long)]
    no_watch: bool,

    /// Wall-clock limit per request for services whose manifest sets none
    /// (e.g. 30s, 500ms); past it the guest is stopped and the client gets
    /// 504. [default: 30s, or DIR/wharf.toml]
    #[arg(long, value_name = "DURATION", value_parser = limits::parse_duration)]
    timeout: Option<Duration>,

    /// Cap on each instance's linear memory for services whose manifest
    /// sets none (e.g. 128MiB, 1GiB). [default: 128MiB, or DIR/wharf.toml]
    #[arg(long, value_name = "SIZE", value_parser = limits::parse_memory)]
    memory: Option<u64>,

    /// Requests one service may run at once, for services whose manifest
    /// sets none; more wait briefly, then get 503. [default: 64, or
    /// DIR/wharf.toml]
    #[arg(long, value_name = "N", value_parser = limits::parse_concurrency)]
    concurrency: Option<u32>,

    /// CPU time one request may use, for services whose manifest sets none
    /// (e.g. 5s, 200ms); past it the guest is stopped and the client gets
    /// 504. [default: 5s, or DIR/wharf.toml]
    #[arg(long, value_name = "DURATION", value_parser = limits::parse_duration)]
    cpu: Option<Duration>,

    /// Largest request body, for services whose manifest sets none; larger
    /// ones get 413. [default: 16MiB, or DIR/wharf.toml]
    #[arg(long, value_name = "SIZE", value_parser = limits::parse_size)]
    body_limit: Option<u64>,

    /// How long shutdown (Ctrl-C, SIGTERM) waits for in-flight requests.
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = limits::parse_duration)]
    drain_timeout: Duration,

    /// How long a client may stall — sending request headers, idling between
    /// keep-alive requests, or not reading a response — before it is cut off.
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = limits::parse_duration)]
    client_timeout: Duration,

    /// Instances that may run at once across all services (the size of the
    /// instance pool); requests beyond it get 503.
    #[arg(long, value_name = "N", default_value_t = 1000)]
    max_instances: u32,

    /// The most linear memory any one service may have on this host (e.g.
    /// 512MiB): a version whose limits.memory asks for more is refused
    /// here. [default: 4GiB]
    #[arg(long, value_name = "SIZE", value_parser = limits::parse_memory)]
    max_service_memory: Option<u64>,

    /// Which compilers turn components into native code: "tiered" serves a
    /// new component from Winch's quickly compiled code and swaps in
    /// Cranelift's optimised code when it is ready; "cranelift" waits for
    /// optimised code; "winch" never optimises (for tests). [default:
    /// engine.tiers in DIR/wharf.toml, else tiered]
    #[arg(long, value_name = "TIERS")]
    tiers: Option<Tiers>,

    /// Linear memory kept resident (reset in place rather than returned to
    /// the system) per instance slot of a large guest, such as a JavaScript
    /// or Python interpreter: more is faster per request, and costs up to
    /// this much memory per instance running at once. [default:
    /// engine.keep_resident in DIR/wharf.toml, else 8MiB]
    #[arg(long, value_name = "SIZE", value_parser = limits::parse_memory)]
    keep_resident: Option<u64>,

    /// Directory of the compiled-code cache [default: the platform cache
    /// directory, e.g. ~/.cache/wharf].
    #[arg(long, value_name = "DIR", conflicts_with = "no_cache")]
    cache_dir: Option<PathBuf>,

    /// Where Wharf keeps its own state: the last version of each service
    /// that deployed, served at start if the service's file is broken
    /// [default: the platform data directory, one per services directory,
    /// e.g. ~/.local/share/wharf/services-1a2b3c4d]. Not inside DIR.
    #[arg(long, value_name = "DIR")]
    data_dir: Option<PathBuf>,

    /// The key-value backend guests' wasi:keyvalue buckets live in:
    /// "embedded" (SQLite in the data directory), "redis://HOST:PORT" or
    /// "nats://HOST:PORT". [default: keyvalue.backend in DIR/wharf.toml, else
    /// embedded]
    #[arg(long, value_name = "BACKEND")]
    kv: Option<KeyValueChoice>,

    /// The message broker services publish to and are triggered from:
    /// "embedded" (SQLite in the data directory), "nats://HOST:PORT"
    /// (JetStream) or "amqp://USER:PASSWORD@HOST:PORT/VHOST" (RabbitMQ).
    /// [default: messaging.backend in DIR/wharf.toml, else embedded]
    #[arg(long, value_name = "BROKER")]
    broker: Option<BrokerChoice>,

    /// Messages the broker holds undelivered before it refuses publishes
    /// (per consumer group on RabbitMQ). [default: 1000000, or
    /// messaging.max_pending in DIR/wharf.toml]
    #[arg(long, value_name = "N")]
    max_pending_messages: Option<u64>,

    /// Join the cluster on these NATS JetStream servers
    /// ("nats://HOST:PORT[,…]"): the services come from the cluster's
    /// index, and key-value and messaging default to its NATS.
    #[arg(long, value_name = "URL")]
    cluster: Option<String>,

    /// The cluster's name (clusters sharing a NATS server stay apart).
    #[arg(
        long,
        value_name = "NAME",
        default_value = "default",
        requires = "cluster"
    )]
    cluster_name: String,

    /// A NATS credentials file for the cluster.
    #[arg(long, value_name = "FILE", requires = "cluster")]
    cluster_credentials: Option<PathBuf>,

    /// This host's name in the cluster [default: HOSTNAME-PID].
    #[arg(long, value_name = "ID", requires = "cluster")]
    cluster_host_id: Option<String>,

    /// Compile every component at load, without reading or writing the
    /// compiled-code cache.
    #[arg(long)]
    no_cache: bool,

    /// Follow NAME.wasm symlinks that point outside the services directory
    /// (rejected by default).
    #[arg(long)]
    allow_external_symlinks: bool,

    /// A directory whose files services' manifests may name as secrets
    /// ([secrets] NAME = { file = "/DIR/…" }); repeatable. Nothing is handed
    /// out by default (see also [secrets] dirs in DIR/wharf.toml).
    #[arg(long = "secret-dir", value_name = "DIR")]
    secret_dirs: Vec<PathBuf>,

    /// An environment variable services' manifests may name as a secret
    /// ([secrets] NAME = { env = "…" }); a trailing * hands out a prefix
    /// (ORDERS_*); repeatable. None by default.
    #[arg(long = "secret-env", value_name = "NAME")]
    secret_env: Vec<String>,

    /// Serve the admin endpoint (health, readiness, metrics, service list,
    /// deploy API) on this address, e.g. 127.0.0.1:9090. Off by default.
    #[arg(long, value_name = "ADDR")]
    admin: Option<SocketAddr>,

    /// File holding the bearer token that admin deploys and removals need
    /// (default: the WHARF_ADMIN_TOKEN environment variable; without either,
    /// admin writes are disabled).
    #[arg(long, value_name = "FILE")]
    admin_token_file: Option<PathBuf>,

    /// A host name the admin endpoint answers to besides IP addresses and
    /// localhost (a browser can be steered to a loopback endpoint through
    /// any other name); repeatable, e.g. --admin-host wharf-admin.prod.svc.
    #[arg(long = "admin-host", value_name = "NAME")]
    admin_hosts: Vec<String>,

    /// Serve HTTPS (HTTP/2 and HTTP/1.1 by ALPN) with this PEM certificate
    /// chain; needs --tls-key.
    #[arg(long, value_name = "FILE", requires = "tls_key")]
    tls_cert: Option<PathBuf>,

    /// The PEM private key for --tls-cert.
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    tls_key: Option<PathBuf>,

    /// Most service-to-service hops one request may cause (calls to
    /// http://NAME.internal); deeper calls get 508 Loop Detected.
    #[arg(long, value_name = "N", default_value_t = 10)]
    max_call_depth: u32,

    /// Server threads: each runs its own single-threaded runtime and accepts
    /// from its own SO_REUSEPORT socket on ADDR [default: one per CPU].
    #[arg(long, value_name = "N")]
    threads: Option<usize>,

    /// Log line format.
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,

    /// Log filter, e.g. "info", "warn", "wharf=debug" (overrides RUST_LOG).
    #[arg(long, value_name = "FILTER")]
    log: Option<String>,
}

/// The services directory when none is given.
const DEFAULT_DIR: &str = "services";

fn main() -> Result<()> {
    // Errors that are expected on the request path (a client's malformed
    // body, a guest's failed read) must not capture a backtrace each: with
    // RUST_BACKTRACE=1, anyhow and wasmtime errors did, and the first one
    // formatted loaded the debug info for good (175 MiB of RSS). Panics keep
    // their backtraces (they follow RUST_BACKTRACE alone); set
    // RUST_LIB_BACKTRACE=1 to have error backtraces too.
    if std::env::var_os("RUST_LIB_BACKTRACE").is_none() {
        // SAFETY: no other thread exists yet, so nothing reads the
        // environment concurrently.
        unsafe { std::env::set_var("RUST_LIB_BACKTRACE", "0") };
    }
    let cli = Cli::parse();
    match cli.command {
        Command::Serve(args) => {
            init_logging(args.log.as_deref(), args.log_format)?;
            // Requests are served on their own threads (--threads); this
            // runtime runs loading, the watcher, the admin endpoint and the
            // message triggers and schedules, whose handlers are guests
            // too: as many workers as server threads, so a flood of
            // messages can use every core the way a flood of requests does.
            let workers = server_threads(args.threads);
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(workers)
                .enable_all()
                .build()
                .context("starting the async runtime")?;
            runtime.block_on(serve(*args))
        }
        Command::New(args) => new_project(args),
        Command::Check(args) => client_runtime()?.block_on(check(args)),
        Command::Deploy(args) => client_runtime()?.block_on(deploy(args)),
        Command::Rm(args) => client_runtime()?.block_on(remove(args)),
        Command::Status(args) => client_runtime()?.block_on(status(args)),
        Command::Dev(args) => {
            init_dev_logging()?;
            client_runtime()?.block_on(cli::dev::run(args, shutdown_signal()))
        }
    }
}

/// The runtime of the commands that are not `serve`.
fn client_runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
}

/// The service name for `file`: `name` if given, else the file's stem.
fn service_name(file: &std::path::Path, name: Option<&str>) -> Result<String> {
    match name {
        Some(name) => Ok(name.to_string()),
        None => file
            .file_stem()
            .and_then(|stem| stem.to_str())
            .map(str::to_string)
            .with_context(|| {
                format!(
                    "{}: no service name in the file name; give --name",
                    file.display()
                )
            }),
    }
}

/// `manifest` if given, else `NAME.toml` beside `file` if present.
fn manifest_for(file: &std::path::Path, manifest: Option<PathBuf>) -> Option<PathBuf> {
    manifest.or_else(|| wharf::ops::check::sibling_manifest(file))
}

fn new_project(args: NewArgs) -> Result<()> {
    let dir = args.dir.unwrap_or_else(|| PathBuf::from(&args.name));
    let project = scaffold::create(&args.name, args.lang, &dir)?;
    println!(
        "created {} ({} files)\n\nnext:\n  {}",
        project.dir.display(),
        project.files.len(),
        project.next_steps
    );
    Ok(())
}

async fn check(args: CheckArgs) -> Result<()> {
    let name = service_name(&args.file, args.name.as_deref())?;
    let manifest = manifest_for(&args.file, args.manifest);
    let report =
        wharf::ops::check::check_file(&args.file, manifest.as_deref(), Some(&name)).await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        if let Some(manifest) = &manifest {
            println!("manifest: {}", manifest.display());
        }
        print!("{}", report.render());
    }
    if !report.deploys() {
        std::process::exit(1);
    }
    Ok(())
}

fn admin_client(args: &AdminArgs) -> Result<AdminClient> {
    let url = args
        .to
        .clone()
        .or_else(|| std::env::var("WHARF_ADMIN_URL").ok())
        .unwrap_or_else(|| DEFAULT_ADMIN_URL.to_string());
    let token = match &args.token_file {
        Some(path) => Some(
            wharf::base::files::read_bounded_text(path, wharf::admin::MAX_TOKEN_FILE)
                .map_err(anyhow::Error::msg)
                .context("reading the admin token")?
                .trim()
                .to_string(),
        ),
        None => std::env::var("WHARF_ADMIN_TOKEN")
            .ok()
            .map(|t| t.trim().to_string())
            .filter(|t| !t.is_empty()),
    };
    AdminClient::new(&url, token)
}

async fn deploy(args: DeployArgs) -> Result<()> {
    let name = service_name(&args.file, args.name.as_deref())?;
    let manifest = manifest_for(&args.file, args.manifest);
    let client = admin_client(&args.admin)?;
    let outcome = client
        .deploy(&name, &args.file, manifest.as_deref(), |waited| {
            eprintln!(
                "wharf: {name}: the host is compiling it ({}s so far)",
                waited.as_secs()
            );
        })
        .await
        .with_context(|| format!("deploying {name}"))?;
    match outcome {
        DeployOutcome::Serving {
            generation,
            digest,
            route,
        } => println!("{name}: serving at {route}, generation {generation}, {digest}"),
        DeployOutcome::Accepted(why) => println!("{name}: {}", why.trim()),
    }
    Ok(())
}

async fn remove(args: RmArgs) -> Result<()> {
    let client = admin_client(&args.admin)?;
    let answer = client
        .remove(&args.name)
        .await
        .with_context(|| format!("removing {}", args.name))?;
    println!("{}", answer.trim());
    Ok(())
}

async fn status(args: StatusArgs) -> Result<()> {
    let client = admin_client(&args.admin)?;
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&client.services().await?)?
        );
        return Ok(());
    }
    anyhow::ensure!(
        args.window.is_finite() && (0.0..=60.0).contains(&args.window),
        "--window: give 0 to 60 seconds"
    );
    let services = client.status(Duration::from_secs_f64(args.window)).await?;
    print!("{}", render_status(&services));
    Ok(())
}

/// The server threads to run: `--threads`, else one per core.
fn server_threads(flag: Option<usize>) -> usize {
    flag.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
        .max(1)
}

fn init_logging(filter: Option<&str>, format: LogFormat) -> Result<()> {
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::util::SubscriberInitExt as _;
    let filter = match filter {
        Some(filter) => EnvFilter::try_new(filter).context("invalid --log filter")?,
        None => EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
    };
    let text = (format == LogFormat::Text).then(|| {
        tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .with_ansi(std::io::stderr().is_terminal())
    });
    let json = (format == LogFormat::Json).then(|| {
        tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .json()
            .flatten_event(true)
    });
    tracing_subscriber::registry()
        .with(filter)
        .with(text)
        .with(json)
        // The dashboard's log lines and deploy history.
        .with(wharf::ops::dashboard::LogRingLayer)
        .init();
    Ok(())
}

/// `wharf dev`'s log: what the service prints, one line per request, deploys
/// and every warning, without the noise of a production log.
fn init_dev_logging() -> Result<()> {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        EnvFilter::new("warn,wharf::guest=info,wharf::access=info,wharf::deploy=info")
    });
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(false)
        .without_time()
        .compact()
        .init();
    Ok(())
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

async fn serve(args: ServeArgs) -> Result<()> {
    let dir = services_dir(args.dir.as_ref())?;
    let cache_dir = if args.no_cache {
        None
    } else {
        args.cache_dir
            .clone()
            .or_else(wharf::deploy::build::cache::default_dir)
    };
    let config = Config {
        services_dir: Some(dir.clone()),
        data_dir: args
            .data_dir
            .clone()
            .or_else(|| wharf::config::default_data_dir(&dir)),
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
        }),
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
        (Some(cert), Some(key)) => Some(wharf::serve::tls::acceptor(cert, key)?),
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
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("cannot listen on {addr} for the admin endpoint"))?;
            let address = listener.local_addr().context("reading the admin address")?;
            eprintln!("wharf: admin listening on http://{address}");
            if token.is_none() {
                tracing::info!(
                    "admin deploys are disabled: no --admin-token-file or WHARF_ADMIN_TOKEN"
                );
            }
            Some(tokio::spawn(wharf::admin::serve_guarded(
                host.clone(),
                listener,
                wharf::admin::AdminGuard::new(token, &args.admin_hosts),
                stopped(admin_stop_rx),
            )))
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
    eprintln!("wharf: listening on {scheme}://{}", serving.local_addr());
    stopped(stop_rx.clone()).await;
    serving.shutdown().await?;
    let _ = admin_stop_tx.send(true);
    if let Some(admin) = admin {
        let _ = admin.await;
    }
    eprintln!("wharf: stopped");
    Ok(())
}

/// Resolves on Ctrl-C or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(err) = tokio::signal::ctrl_c().await {
            tracing::error!(error = %err, "cannot listen for Ctrl-C");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(err) => {
                tracing::error!(error = %err, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = terminate => {},
    }
    tracing::info!("shutdown requested");
}
