//! The `wharf` command line, one module per subcommand (as wasmtime's
//! `src/commands/`): `serve`, `new`, `check`, `deploy`, `rm`, `rekey`,
//! `status` and `dev`, with the admin API's client and the project templates beside
//! them. It uses only the library's public API.

use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result};
use clap::{Parser, Subcommand};

mod check;
mod client;
mod deploy;
mod dev;
mod logging;
mod new;
mod rekey;
mod rm;
mod scaffold;
mod serve;
mod status;

/// Wharf: a serverless WebAssembly microservice host.
///
/// Every NAME.wasm component in the services directory that exports
/// wasi:http/incoming-handler is served at /NAME. Drop a file in to deploy
/// it, replace it to upgrade, delete it to remove it — while Wharf runs.
#[derive(Parser, Debug)]
#[command(name = "wharf", version, about, long_about)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Serve every component in a directory over HTTP, following changes.
    Serve(Box<serve::ServeArgs>),
    /// Create a ready-to-build service project (source, WIT, build file
    /// and a commented manifest).
    New(new::NewArgs),
    /// Tell, without serving it, whether a file will deploy and why not;
    /// exits 1 if it will not.
    Check(check::CheckArgs),
    /// Deploy a component to a running host through its admin API.
    Deploy(deploy::DeployArgs),
    /// Remove a service from a running host through its admin API.
    Rm(rm::RmArgs),
    /// Seal every stored value of a running host again with its current
    /// encryption key, so a previous key can be retired.
    Rekey(rekey::RekeyArgs),
    /// Show a running host's services: generation, requests/s, errors,
    /// in-flight requests and the last deploy's result.
    Status(status::StatusArgs),
    /// Develop a service project: build it, serve it, rebuild and hot-swap
    /// it on every save, and show its log.
    Dev(dev::DevArgs),
}

/// Runs the command `cli` names.
pub fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Serve(args) => {
            // Kept to the end, so every queued line is written out.
            let _log = logging::init(args.log.as_deref(), args.log_format)?;
            // Requests are served on their own threads (--threads); this
            // runtime runs loading, the watcher, the admin endpoint and the
            // message triggers and schedules, whose handlers are guests
            // too: as many workers as server threads, so a flood of
            // messages can use every core the way a flood of requests does.
            let workers = serve::server_threads(args.threads);
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(workers)
                .enable_all()
                .build()
                .context("starting the async runtime")?;
            runtime.block_on(serve::run(*args))
        }
        Command::New(args) => new::run(args),
        Command::Check(args) => client_runtime()?.block_on(check::run(args)),
        Command::Deploy(args) => client_runtime()?.block_on(deploy::run(args)),
        Command::Rm(args) => client_runtime()?.block_on(rm::run(args)),
        Command::Rekey(args) => client_runtime()?.block_on(rekey::run(args)),
        Command::Status(args) => client_runtime()?.block_on(status::run(args)),
        Command::Dev(args) => {
            logging::init_dev()?;
            client_runtime()?.block_on(dev::run(args, shutdown_signal()))
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
fn service_name(file: &Path, name: Option<&str>) -> Result<String> {
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
fn manifest_for(file: &Path, manifest: Option<PathBuf>) -> Option<PathBuf> {
    manifest.or_else(|| wharf::check::sibling_manifest(file))
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
