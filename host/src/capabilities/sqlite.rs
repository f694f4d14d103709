//! What the embedded SQLite stores (key-value and messaging) share: a
//! group-committed batch in one transaction, each operation in its own
//! savepoint.
//!
//! rusqlite's `Transaction` and `Savepoint` parse `BEGIN`, `SAVEPOINT`,
//! `RELEASE` and `COMMIT` anew every time; at tens of thousands of
//! operations a second that parsing shows in profiles, so the statements
//! here are prepared once per connection (its statement cache) and reused.

use std::path::Path;
use std::sync::mpsc;
use std::time::Duration;

use anyhow::{Context as _, Result};
use rusqlite::Connection;

/// How often the write-ahead log is checkpointed into the database.
const CHECKPOINT_EVERY: Duration = Duration::from_millis(250);

/// Checkpoints a database's write-ahead log on a thread of its own for as
/// long as it lives (the store's thread holds it).
///
/// SQLite checkpoints on the committing connection by default, every 1,000
/// pages, and a checkpoint fsyncs: the store thread, and every operation
/// queued behind it, waited tens of milliseconds for the disk now and then
/// — the key-value counter's p99 was 51 ms. Checkpointing from another
/// connection, passively (never waiting for the writer, never making it
/// wait), moves the fsync off the path of every operation.
pub(crate) struct Checkpoints {
    _stop: mpsc::Sender<()>,
}

/// Turns off `connection`'s own checkpoints and starts checkpointing the
/// database at `path` in the background (none for an in-memory database,
/// which has no log to checkpoint).
pub(crate) fn checkpoint_in_background(
    connection: &Connection,
    path: Option<&Path>,
    what: &str,
) -> Result<Option<Checkpoints>> {
    let Some(path) = path else {
        return Ok(None);
    };
    let checkpointer = Connection::open(path)
        .with_context(|| format!("opening the {what} {} to checkpoint it", path.display()))?;
    connection
        .execute_batch("PRAGMA wal_autocheckpoint = 0;")
        .with_context(|| format!("setting up the {what}"))?;
    let (stop, stopped) = mpsc::channel::<()>();
    let name = what.to_string();
    std::thread::Builder::new()
        .name("wharf-sqlite-checkpoint".into())
        .spawn(move || {
            // Until the store (the sender's holder) is gone.
            while let Err(mpsc::RecvTimeoutError::Timeout) = stopped.recv_timeout(CHECKPOINT_EVERY)
            {
                if let Err(err) = checkpointer.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(()))
                {
                    tracing::warn!(store = %name, error = %err, "checkpointing the write-ahead log failed");
                }
            }
        })
        .with_context(|| format!("starting the {what}'s checkpoint thread"))?;
    Ok(Some(Checkpoints { _stop: stop }))
}

/// Opens (creating it and its directory if needed) the database at `path`,
/// or an in-memory one if `path` is `None`, in write-ahead-log mode with
/// `synchronous = NORMAL` (see the stores' module docs for what that
/// keeps); `what` names it in errors.
pub(crate) fn open(path: Option<&Path>, what: &str) -> Result<Connection> {
    let connection = match path {
        Some(path) => {
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent)
                    .with_context(|| format!("creating {}", parent.display()))?;
            }
            Connection::open(path)
                .with_context(|| format!("opening the {what} {}", path.display()))?
        }
        None => {
            Connection::open_in_memory().with_context(|| format!("opening an in-memory {what}"))?
        }
    };
    connection
        .execute_batch("PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL;")
        .with_context(|| format!("setting up the {what}"))?;
    Ok(connection)
}

/// Runs `operation` inside a savepoint of `connection`'s open transaction:
/// kept if it returns `Ok`, rolled back (leaving nothing behind) if it
/// returns `Err`. `sql_error` turns a failure of the savepoint statements
/// themselves into the caller's error type.
pub(crate) fn in_savepoint<T, E>(
    connection: &Connection,
    sql_error: impl Fn(rusqlite::Error) -> E,
    operation: impl FnOnce(&Connection) -> Result<T, E>,
) -> Result<T, E> {
    let run = |sql: &str| run_cached(connection, sql);
    run("SAVEPOINT op").map_err(&sql_error)?;
    match operation(connection) {
        Ok(value) => {
            run("RELEASE op").map_err(&sql_error)?;
            Ok(value)
        }
        Err(err) => {
            // If even the rollback fails, the batch's commit fails too and
            // every operation in it reports an error.
            let _ = run("ROLLBACK TO op");
            let _ = run("RELEASE op");
            Err(err)
        }
    }
}

/// Runs `batch` in one transaction of `connection` and returns what it
/// returned once committed; an error if the transaction could not begin or
/// commit (then nothing of it was kept).
pub(crate) fn in_transaction<T>(
    connection: &Connection,
    batch: impl FnOnce(&Connection) -> T,
) -> rusqlite::Result<T> {
    run_cached(connection, "BEGIN")?;
    let results = batch(connection);
    match run_cached(connection, "COMMIT") {
        Ok(()) => Ok(results),
        Err(err) => {
            let _ = run_cached(connection, "ROLLBACK");
            Err(err)
        }
    }
}

/// Runs one parameterless statement through the statement cache.
fn run_cached(connection: &Connection, sql: &str) -> rusqlite::Result<()> {
    connection
        .prepare_cached(sql)
        .and_then(|mut statement| statement.execute([]))
        .map(|_| ())
}
