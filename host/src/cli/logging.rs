//! The log: `serve`'s (text or JSON lines, with the dashboard's ring of
//! recent lines) and `dev`'s (what the service prints and one line per
//! request, without the noise of a production log).

use std::io::IsTerminal as _;

use anyhow::{Context as _, Result};
use tracing_subscriber::EnvFilter;

/// How log lines are written.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// Starts `serve`'s log: `filter`, else `RUST_LOG`, else `info`.
pub fn init(filter: Option<&str>, format: LogFormat) -> Result<()> {
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
        .with(wharf::admin::LogRingLayer)
        .init();
    Ok(())
}

/// Starts `dev`'s log: what the service prints, one line per request,
/// deploys and every warning.
pub fn init_dev() -> Result<()> {
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
