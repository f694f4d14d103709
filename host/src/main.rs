//! The `wharf` command line: `wharf serve [DIR] [--listen ADDR]`.

use std::io::IsTerminal as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context as _, Result};
use clap::{Parser, Subcommand};
use tracing_subscriber::EnvFilter;
use wharf::engine::EngineOptions;
use wharf::limits::{self, Limits, PartialLimits};
use wharf::{Config, Host};

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
    Serve(ServeArgs),
}

#[derive(clap::Args, Debug)]
struct ServeArgs {
    /// The services directory: each NAME.wasm in it is served at /NAME.
    #[arg(default_value = "services")]
    dir: PathBuf,

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

    /// Directory of the compiled-code cache [default: the platform cache
    /// directory, e.g. ~/.cache/wharf].
    #[arg(long, value_name = "DIR", conflicts_with = "no_cache")]
    cache_dir: Option<PathBuf>,

    /// Compile every component at load, without reading or writing the
    /// compiled-code cache.
    #[arg(long)]
    no_cache: bool,

    /// Follow NAME.wasm symlinks that point outside the services directory
    /// (rejected by default).
    #[arg(long)]
    allow_external_symlinks: bool,

    /// Log filter, e.g. "info", "warn", "wharf=debug" (overrides RUST_LOG).
    #[arg(long, value_name = "FILTER")]
    log: Option<String>,
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve(args) => {
            init_logging(args.log.as_deref())?;
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .context("starting the async runtime")?;
            runtime.block_on(serve(args))
        }
    }
}

fn init_logging(filter: Option<&str>) -> Result<()> {
    let filter = match filter {
        Some(filter) => EnvFilter::try_new(filter).context("invalid --log filter")?,
        None => EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
    };
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    Ok(())
}

async fn serve(args: ServeArgs) -> Result<()> {
    let cache_dir = if args.no_cache {
        None
    } else {
        args.cache_dir.clone().or_else(wharf::cache::default_dir)
    };
    let config = Config {
        services_dir: Some(args.dir.clone()),
        watch: !args.no_watch,
        allow_external_symlinks: args.allow_external_symlinks,
        limits: Limits::default(),
        limit_overrides: PartialLimits {
            timeout: args.timeout,
            memory: args.memory,
            concurrency: args.concurrency,
            body: args.body_limit,
        },
        engine: EngineOptions {
            max_instances: args.max_instances,
            cache_dir,
            ..EngineOptions::default()
        },
        drain_timeout: args.drain_timeout,
        client_timeout: args.client_timeout,
    };
    let host = Host::new(config)
        .await
        .with_context(|| format!("cannot serve {}", args.dir.display()))?;
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    let address = listener.local_addr().context("reading the bound address")?;
    eprintln!("wharf: listening on http://{address}");
    host.serve(listener, shutdown_signal()).await?;
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
