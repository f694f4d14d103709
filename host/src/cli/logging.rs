//! The log: `serve`'s (text or JSON lines, with the dashboard's ring of
//! recent lines) and `dev`'s (what the service prints and one line per
//! request, without the noise of a production log).

use std::io::{IsTerminal as _, Write as _};
use std::sync::OnceLock;

use anyhow::{Context as _, Result};
use tracing_appender::non_blocking::{NonBlocking, NonBlockingBuilder, WorkerGuard};
use tracing_subscriber::EnvFilter;

/// Lines the log may hold before a writer waits for the log's thread:
/// at 50,000 requests/s, seconds of a stalled stderr.
const BUFFERED_LINES: usize = 256 * 1024;

/// The log's writer, once `serve`'s log is started: what [`announce`]
/// writes through, so its lines keep their place among the log's.
static WRITER: OnceLock<NonBlocking> = OnceLock::new();

/// Keeps the log's thread; dropping it writes out every line still queued.
pub struct LogGuard {
    _worker: WorkerGuard,
}

/// How log lines are written.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// Starts `serve`'s log: `filter`, else `RUST_LOG`, else `info`.
///
/// A line is formatted where it is logged, then handed to the log's own
/// thread, which writes what has queued up in one go: a request never
/// waits for stderr (a pipe to a service manager, a terminal, a file),
/// and a busy host makes one write per batch of lines rather than one per
/// line. No line is dropped: should stderr stall for long enough to fill
/// the queue, writers wait.
pub fn init(filter: Option<&str>, format: LogFormat) -> Result<LogGuard> {
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::util::SubscriberInitExt as _;
    let filter = match filter {
        Some(filter) => EnvFilter::try_new(filter).context("invalid --log filter")?,
        None => EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
    };
    let (writer, worker) = NonBlockingBuilder::default()
        .lossy(false)
        .buffered_lines_limit(BUFFERED_LINES)
        .thread_name("wharf-log")
        .finish(std::io::BufWriter::with_capacity(
            64 << 10,
            std::io::stderr(),
        ));
    let text = (format == LogFormat::Text).then(|| {
        tracing_subscriber::fmt::layer()
            .with_writer(writer.clone())
            .with_ansi(std::io::stderr().is_terminal())
    });
    let json = (format == LogFormat::Json).then(|| {
        tracing_subscriber::fmt::layer()
            .with_writer(writer.clone())
            .json()
            .flatten_event(true)
    });
    let _ = WRITER.set(writer);
    tracing_subscriber::registry()
        .with(filter)
        .with(text)
        .with(json)
        // The dashboard's log lines and deploy history.
        .with(wharf::admin::LogRingLayer)
        .init();
    Ok(LogGuard { _worker: worker })
}

/// Writes one of the command's own lines (`wharf: listening on …`) to
/// stderr, in its place among the log's lines.
pub fn announce(line: &str) {
    match WRITER.get() {
        Some(writer) => {
            let _ = writer.clone().write_all(format!("{line}\n").as_bytes());
        }
        None => eprintln!("{line}"),
    }
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
