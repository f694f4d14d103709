//! Cranelift's code for single functions, kept between compiles: wasmtime's
//! incremental compilation cache, stored in one SQLite file of the
//! compiled-code cache's directory.
//!
//! Every JavaScript service built with one ComponentizeJS carries the same
//! SpiderMonkey (about 19,600 functions); only its data segments and a few
//! bindings differ. Cranelift hashes each function it is about to compile
//! (its IR and the compiler's settings) and looks the hash up here first:
//! a hit skips code generation for that function. Measured on the 2-core
//! VM: the first JavaScript service took 7.6 s to optimise, a second one
//! 2.3-2.5 s, an edited and redeployed one about the same. (Winch, which
//! serves a new component first, cannot use such a cache.)
//!
//! Cranelift stores what it compiled while a compile runs; those entries
//! are kept in memory (where later functions of the same compile find them
//! too) and written in one transaction when the compile ends
//! ([`FunctionCache::flush`]), with the last-used time of every entry the
//! compile found. The file is bounded: past [`MAX_BYTES`] the entries used
//! longest ago are deleted. An entry Cranelift cannot decode (another
//! Cranelift version wrote it) is compiled anew, so the file needs no
//! version of its own; the directory is the cache's, written only by the
//! host's user, like the compiled code beside it.

use std::borrow::Cow;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, Result};
use rusqlite::{Connection, OptionalExtension as _, params};
use wasmtime::CacheStore;

use crate::capabilities::sqlite;

/// The most the cache file may hold (a SpiderMonkey's functions take about
/// 35 MiB, a CPython's more) before the entries used longest ago go.
pub const MAX_BYTES: u64 = 256 << 20;

/// Name of the cache file in the compiled-code cache's directory.
const FILE_NAME: &str = "functions.sqlite3";

/// Entries of one compile held in memory at most; beyond it, Cranelift's
/// further results are not kept (the compile itself is unaffected).
const MAX_PENDING_BYTES: usize = 256 << 20;

/// Cranelift's per-function code, on disk, shared by every optimising
/// engine of a runtime (and by the hosts sharing its cache directory).
#[derive(Debug)]
pub struct FunctionCache {
    path: PathBuf,
    connection: Mutex<Connection>,
    /// What this process's compiles stored and found since the last flush.
    pending: Mutex<Pending>,
    /// Functions found in the cache since it was opened.
    found_total: AtomicU64,
}

#[derive(Debug, Default)]
struct Pending {
    stored: HashMap<Vec<u8>, Vec<u8>>,
    stored_bytes: usize,
    found: Vec<Vec<u8>>,
}

impl FunctionCache {
    /// Opens (creating it and `dir` if needed) the cache file in `dir`. A damaged file
    /// is replaced by an empty one: its entries are only an optimisation.
    /// Any other failure (a busy or unreadable file) is an error, and the
    /// file is left alone.
    pub fn open(dir: &Path) -> Result<FunctionCache> {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("creating the cache directory {}", dir.display()))?;
        let path = dir.join(FILE_NAME);
        let connection = match open_file(&path) {
            Ok(connection) => connection,
            Err(err) if is_damaged(&err) => {
                tracing::warn!(
                    file = %path.display(),
                    reason = %err,
                    "the function cache is damaged; starting an empty one"
                );
                for suffix in ["", "-wal", "-shm"] {
                    let _ = std::fs::remove_file(format!("{}{suffix}", path.display()));
                }
                open_file(&path)
                    .with_context(|| format!("creating the function cache {}", path.display()))?
            }
            Err(err) => {
                return Err(err)
                    .with_context(|| format!("opening the function cache {}", path.display()));
            }
        };
        Ok(FunctionCache {
            path,
            connection: Mutex::new(connection),
            pending: Mutex::default(),
            found_total: AtomicU64::new(0),
        })
    }

    /// How many functions compiles have found here (instead of compiling
    /// them) since the cache was opened.
    pub fn found(&self) -> u64 {
        self.found_total.load(Ordering::Relaxed)
    }

    fn connection(&self) -> MutexGuard<'_, Connection> {
        // Every statement completes or fails whole: nothing to repair.
        self.connection.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn pending(&self) -> MutexGuard<'_, Pending> {
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Writes what the compiles since the last flush stored, and when they
    /// found entries, to the file in one transaction, then trims the file
    /// to [`MAX_BYTES`]. Failures are logged: the cache is an optimisation.
    pub fn flush(&self) {
        let pending = std::mem::take(&mut *self.pending());
        if pending.stored.is_empty() && pending.found.is_empty() {
            return;
        }
        let started = std::time::Instant::now();
        let written = self.write(&pending).and_then(|()| self.trim(MAX_BYTES));
        tracing::debug!(
            stored = pending.stored.len(),
            stored_bytes = pending.stored_bytes,
            found = pending.found.len(),
            elapsed_ms = started.elapsed().as_millis() as u64,
            "function cache written"
        );
        if let Err(err) = written {
            tracing::warn!(
                file = %self.path.display(),
                reason = %format!("{err:#}"),
                "cannot update the function cache"
            );
        }
    }

    fn write(&self, pending: &Pending) -> Result<()> {
        let now = unix_seconds();
        let connection = self.connection();
        sqlite::in_transaction(&connection, |connection| -> rusqlite::Result<()> {
            let mut insert = connection.prepare_cached(
                "INSERT OR REPLACE INTO functions (key, code, used) VALUES (?1, ?2, ?3)",
            )?;
            for (key, code) in &pending.stored {
                insert.execute(params![key, code, now])?;
            }
            let mut touch =
                connection.prepare_cached("UPDATE functions SET used = ?2 WHERE key = ?1")?;
            for key in &pending.found {
                touch.execute(params![key, now])?;
            }
            Ok(())
        })
        .and_then(|written| written)
        .context("writing the compile's functions")?;
        // Move the pages from the log into the file and empty the log: a
        // compile's write is tens of MiB, which would otherwise sit on
        // disk twice.
        connection
            .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
            .context("checkpointing the function cache")
    }

    /// Deletes the entries used longest ago until the file holds at most
    /// three quarters of `max_bytes`, if it holds more than `max_bytes`.
    fn trim(&self, max_bytes: u64) -> Result<()> {
        let connection = self.connection();
        let total: i64 = connection
            .query_row(
                "SELECT COALESCE(SUM(LENGTH(code)), 0) FROM functions",
                [],
                |row| row.get(0),
            )
            .context("measuring the function cache")?;
        let total = u64::try_from(total).unwrap_or(0);
        if total <= max_bytes {
            return Ok(());
        }
        let excess = total - max_bytes / 4 * 3;
        sqlite::in_transaction(&connection, |connection| -> rusqlite::Result<()> {
            let mut oldest = connection
                .prepare_cached("SELECT key, LENGTH(code) FROM functions ORDER BY used")?;
            let mut rows = oldest.query([])?;
            let mut freed = 0u64;
            let mut doomed: Vec<Vec<u8>> = Vec::new();
            while freed < excess {
                let Some(row) = rows.next()? else { break };
                doomed.push(row.get(0)?);
                freed += u64::try_from(row.get::<_, i64>(1)?).unwrap_or(0);
            }
            drop(rows);
            let mut delete = connection.prepare_cached("DELETE FROM functions WHERE key = ?1")?;
            for key in &doomed {
                delete.execute([key])?;
            }
            Ok(())
        })
        .and_then(|trimmed| trimmed)
        .context("deleting the entries used longest ago")?;
        connection
            .execute_batch("PRAGMA incremental_vacuum;")
            .context("returning the freed pages to the file system")
    }

    fn lookup(&self, key: &[u8]) -> Result<Option<Vec<u8>>> {
        let connection = self.connection();
        let mut select = connection.prepare_cached("SELECT code FROM functions WHERE key = ?1")?;
        Ok(select.query_row([key], |row| row.get(0)).optional()?)
    }
}

impl CacheStore for FunctionCache {
    fn get(&self, key: &[u8]) -> Option<Cow<'_, [u8]>> {
        if let Some(code) = self.pending().stored.get(key) {
            self.found_total.fetch_add(1, Ordering::Relaxed);
            return Some(Cow::Owned(code.clone()));
        }
        match self.lookup(key) {
            Ok(Some(code)) => {
                self.found_total.fetch_add(1, Ordering::Relaxed);
                self.pending().found.push(key.to_vec());
                Some(Cow::Owned(code))
            }
            Ok(None) => None,
            Err(err) => {
                tracing::debug!(reason = %format!("{err:#}"), "function cache lookup failed");
                None
            }
        }
    }

    fn insert(&self, key: &[u8], value: Vec<u8>) -> bool {
        let mut pending = self.pending();
        if pending.stored_bytes + value.len() > MAX_PENDING_BYTES {
            return false;
        }
        pending.stored_bytes += value.len();
        pending.stored.insert(key.to_vec(), value);
        true
    }
}

fn open_file(path: &Path) -> rusqlite::Result<Connection> {
    let connection = Connection::open(path)?;
    // Another host sharing the directory may be writing: wait for it.
    connection.busy_timeout(std::time::Duration::from_secs(5))?;
    // auto_vacuum before the rest: it can only be chosen while the file is
    // empty, and switching to the write-ahead log writes to it.
    connection.execute_batch(
        "PRAGMA auto_vacuum = INCREMENTAL;
         PRAGMA journal_mode = WAL;
         PRAGMA synchronous = NORMAL;
         CREATE TABLE IF NOT EXISTS functions (
             id INTEGER PRIMARY KEY,
             key BLOB NOT NULL UNIQUE,
             code BLOB NOT NULL,
             used INTEGER NOT NULL
         );
         CREATE INDEX IF NOT EXISTS functions_by_use ON functions (used);",
    )?;
    Ok(connection)
}

/// Whether `err` says the file is not a database or is damaged (rather
/// than, say, busy or unreadable for its permissions).
fn is_damaged(err: &rusqlite::Error) -> bool {
    matches!(
        err.sqlite_error_code(),
        Some(rusqlite::ErrorCode::NotADatabase | rusqlite::ErrorCode::DatabaseCorrupt)
    )
}

fn unix_seconds() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |since| {
            i64::try_from(since.as_secs()).unwrap_or(i64::MAX)
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_are_found_before_and_after_they_are_written() {
        let dir = tempfile::tempdir().unwrap();
        let cache = FunctionCache::open(dir.path()).unwrap();
        assert!(cache.get(b"key").is_none());
        assert!(cache.insert(b"key", b"code".to_vec()));
        assert_eq!(cache.get(b"key").as_deref(), Some(&b"code"[..]));
        cache.flush();
        drop(cache);

        let reopened = FunctionCache::open(dir.path()).unwrap();
        let auto_vacuum: i64 = reopened
            .connection()
            .query_row("PRAGMA auto_vacuum", [], |row| row.get(0))
            .unwrap();
        assert_eq!(auto_vacuum, 2, "incremental: trimming can shrink the file");
        assert_eq!(reopened.get(b"key").as_deref(), Some(&b"code"[..]));
        assert!(reopened.get(b"other").is_none());
    }

    #[test]
    fn trimming_deletes_the_entries_used_longest_ago() {
        let dir = tempfile::tempdir().unwrap();
        let cache = FunctionCache::open(dir.path()).unwrap();
        for (n, used) in [(1u8, 100), (2, 300), (3, 200)] {
            cache
                .connection()
                .execute(
                    "INSERT INTO functions (key, code, used) VALUES (?1, ?2, ?3)",
                    params![vec![n], vec![0u8; 1000], used],
                )
                .unwrap();
        }
        // 3,000 bytes against a bound of 2,000: down to 1,500, the oldest
        // two go.
        cache.trim(2000).unwrap();
        assert!(cache.get(&[1]).is_none());
        assert!(cache.get(&[3]).is_none());
        assert!(cache.get(&[2]).is_some());
        cache.trim(2000).unwrap();
        assert!(cache.get(&[2]).is_some(), "under the bound nothing goes");
    }

    /// A component whose one core module holds `data` in its memory and
    /// the same functions whatever `data` is.
    fn component_with_data(data: &str) -> Vec<u8> {
        wat::parse_str(format!(
            r#"(component
                 (core module $m
                   (memory 1)
                   (data (i32.const 0) "{data}")
                   (func (export "load") (param i32) (result i32)
                     (i32.mul (i32.load8_u (local.get 0)) (i32.const 7))))
                 (core instance $i (instantiate $m)))"#
        ))
        .unwrap()
    }

    fn entries(dir: &Path) -> i64 {
        Connection::open(dir.join(FILE_NAME))
            .unwrap()
            .query_row("SELECT COUNT(*) FROM functions", [], |row| row.get(0))
            .unwrap()
    }

    #[test]
    fn a_second_component_with_the_same_functions_reuses_their_code() {
        use crate::guest::engine::{EngineKind, EngineOptions, MemoryInit, Runtime, Tier};
        let dir = tempfile::tempdir().unwrap();
        let runtime = Runtime::new(&EngineOptions {
            pooling: false,
            cache_dir: Some(dir.path().to_path_buf()),
            ..EngineOptions::default()
        })
        .unwrap();
        let kind = EngineKind::new(MemoryInit::Copy, false, Tier::Optimised);
        let functions = runtime.function_cache().unwrap();
        runtime
            .compile(kind, &component_with_data("first"))
            .unwrap();
        let stored = entries(dir.path());
        assert!(stored > 0, "Cranelift's functions are stored");

        // Another component, the same functions: found, not compiled.
        let before = functions.found();
        runtime
            .compile(kind, &component_with_data("second"))
            .unwrap();
        let found = functions.found() - before;
        assert!(
            found * 2 >= stored as u64,
            "found {found} of the {stored} functions stored"
        );

        // Winch's engines do not use the cache, and still compile.
        let baseline = EngineKind::new(MemoryInit::Copy, false, Tier::Baseline);
        runtime
            .compile(baseline, &component_with_data("third"))
            .unwrap();
    }

    #[test]
    fn a_cache_file_that_cannot_be_opened_is_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        let in_the_way = dir.path().join(FILE_NAME);
        std::fs::create_dir(&in_the_way).unwrap();
        std::fs::write(in_the_way.join("kept"), b"something").unwrap();
        let err = FunctionCache::open(dir.path()).unwrap_err();
        assert!(
            format!("{err:#}").contains("opening the function cache"),
            "{err:#}"
        );
        assert!(in_the_way.join("kept").is_file());
    }

    #[test]
    fn a_damaged_cache_file_is_replaced() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(FILE_NAME), b"not a database, not at all").unwrap();
        let cache = FunctionCache::open(dir.path()).unwrap();
        assert!(cache.insert(b"key", b"code".to_vec()));
        cache.flush();
        assert_eq!(cache.get(b"key").as_deref(), Some(&b"code"[..]));
    }
}
