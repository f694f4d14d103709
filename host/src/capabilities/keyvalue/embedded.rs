//! The embedded key-value backend: SQLite in the data directory, so state
//! survives restarts and reloads with nothing installed.
//!
//! Why SQLite rather than redb: its write-ahead log with `synchronous =
//! NORMAL` is exactly the durability contract Wharf documents — a commit is
//! appended to the WAL with `write()` before it is acknowledged, so it
//! survives `kill -9` of the host (the operating system has it), while only
//! the WAL's checkpoints are fsynced, so a power loss may lose the commits
//! since the last checkpoint (at most about a thousand pages). redb's
//! non-fsyncing modes keep recent commits in the process, which a `kill -9`
//! loses. SQLite is also a single, inspectable file with decades of
//! crash-recovery testing.
//!
//! One connection, owned by one thread: operations arrive on a channel, and
//! the thread runs every operation waiting at that moment in one
//! transaction (each in its own savepoint, so one failing leaves the others
//! alone) and acknowledges them only after the commit — group commit, which
//! is what lets 32 concurrent counters run at tens of thousands of updates a
//! second without fsync per write.

use std::path::{Path, PathBuf};
use std::sync::mpsc;

use anyhow::{Context as _, Result};
use rusqlite::{Connection, OptionalExtension as _, params};
use tokio::sync::oneshot;

use crate::capabilities::BackendStatus;
use crate::capabilities::keyvalue::ENTRY_OVERHEAD;
use crate::capabilities::keyvalue::store::{
    BackendError, BackendResult, KeyCursor, KeyPage, KeyRef, KeyValueStore, add_checked,
    parse_counter,
};
use crate::capabilities::sqlite::{self, in_savepoint, in_transaction};

/// Most operations committed in one transaction.
const MAX_BATCH: usize = 512;

/// One operation for the store thread.
enum Op {
    Get {
        bucket: String,
        key: String,
    },
    Set {
        bucket: String,
        key: String,
        value: Vec<u8>,
        quota: u64,
    },
    Delete {
        bucket: String,
        key: String,
    },
    Exists {
        bucket: String,
        key: String,
    },
    List {
        bucket: String,
        cursor: KeyCursor,
        limit: usize,
    },
    Increment {
        bucket: String,
        key: String,
        delta: i64,
        quota: u64,
    },
    Swap {
        bucket: String,
        key: String,
        expected: Option<Vec<u8>>,
        value: Vec<u8>,
        quota: u64,
    },
}

/// What an operation answers.
enum Reply {
    Value(Option<Vec<u8>>),
    Done,
    Bool(bool),
    Page(KeyPage),
    Number(i64),
}

type Job = (Op, oneshot::Sender<BackendResult<Reply>>);

/// The embedded store: a handle on its thread.
pub struct Embedded {
    jobs: mpsc::Sender<Job>,
    path: Option<PathBuf>,
}

impl Embedded {
    /// Opens (creating if needed) the store at `path`, or an in-memory one
    /// if `path` is `None` (nothing survives the process), and starts its
    /// thread.
    pub fn open(path: Option<&Path>) -> Result<Embedded> {
        let connection = sqlite::open(path, "key-value store")?;
        connection
            .execute_batch(
                "CREATE TABLE IF NOT EXISTS kv (
                     bucket TEXT NOT NULL,
                     key TEXT NOT NULL,
                     value BLOB NOT NULL,
                     PRIMARY KEY (bucket, key)
                 ) WITHOUT ROWID;
                 CREATE TABLE IF NOT EXISTS buckets (
                     bucket TEXT PRIMARY KEY,
                     bytes INTEGER NOT NULL
                 ) WITHOUT ROWID;",
            )
            .context("preparing the key-value store")?;
        count_entry_overhead(&connection).context("upgrading the key-value store")?;
        let checkpoints = sqlite::checkpoint_in_background(&connection, path, "key-value store")?;
        let (jobs, receiver) = mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name("wharf-kv-embedded".into())
            .spawn(move || {
                let _checkpoints = checkpoints;
                run(connection, receiver)
            })
            .context("starting the key-value store thread")?;
        Ok(Embedded {
            jobs,
            path: path.map(Path::to_path_buf),
        })
    }

    async fn call(&self, op: Op) -> BackendResult<Reply> {
        let (reply, answer) = oneshot::channel();
        self.jobs
            .send((op, reply))
            .map_err(|_| BackendError::Unavailable("the store thread has stopped".into()))?;
        answer
            .await
            .map_err(|_| BackendError::Unavailable("the store thread has stopped".into()))?
    }
}

fn unexpected() -> BackendError {
    BackendError::Other("the store answered another operation".into())
}

fn sql(err: rusqlite::Error) -> BackendError {
    BackendError::Other(format!("the embedded store failed: {err}"))
}

/// The store thread: runs batches of operations until every handle is gone.
fn run(mut connection: Connection, jobs: mpsc::Receiver<Job>) {
    while let Ok(first) = jobs.recv() {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match jobs.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        let results = run_batch(&mut connection, &batch);
        for ((_, reply), result) in batch.into_iter().zip(results) {
            // The caller may have given up (its request ended).
            let _ = reply.send(result);
        }
    }
}

/// Runs `batch` in one transaction, each operation in its own savepoint;
/// the answers count only once the commit succeeded.
fn run_batch(connection: &mut Connection, batch: &[Job]) -> Vec<BackendResult<Reply>> {
    let failed_all = |err: rusqlite::Error| {
        let reason = err.to_string();
        batch
            .iter()
            .map(|_| {
                Err(BackendError::Other(format!(
                    "the embedded store failed: {reason}"
                )))
            })
            .collect()
    };
    let outcome = in_transaction(connection, |connection| {
        batch
            .iter()
            // A failed operation leaves nothing behind.
            .map(|(op, _)| in_savepoint(connection, sql, |connection| apply(connection, op)))
            .collect::<Vec<_>>()
    });
    match outcome {
        Ok(results) => results,
        Err(err) => failed_all(err),
    }
}

/// The bytes `key` and `value` count against a bucket's quota: both, and
/// the per-entry overhead.
fn footprint(key: &str, value_len: usize) -> i64 {
    (key.len() + value_len) as i64 + ENTRY_OVERHEAD as i64
}

/// The store's format: 1 counted keys and values only; 2 also counts
/// [`ENTRY_OVERHEAD`] per entry.
const FORMAT: i64 = 2;

/// Recounts every bucket's bytes with the per-entry overhead, once, for a
/// store written before it was counted.
fn count_entry_overhead(connection: &Connection) -> rusqlite::Result<()> {
    let format: i64 = connection.query_row("PRAGMA user_version", [], |row| row.get(0))?;
    if format >= FORMAT {
        return Ok(());
    }
    connection.execute_batch(&format!(
        "BEGIN;
         DELETE FROM buckets;
         INSERT INTO buckets (bucket, bytes)
             SELECT bucket, SUM(length(CAST(key AS BLOB)) + length(value) + {ENTRY_OVERHEAD})
             FROM kv GROUP BY bucket;
         PRAGMA user_version = {FORMAT};
         COMMIT;"
    ))
}

fn stored_len(connection: &Connection, bucket: &str, key: &str) -> rusqlite::Result<Option<i64>> {
    connection
        .prepare_cached("SELECT length(value) FROM kv WHERE bucket = ?1 AND key = ?2")?
        .query_row(params![bucket, key], |row| row.get(0))
        .optional()
}

fn bucket_bytes(connection: &Connection, bucket: &str) -> rusqlite::Result<i64> {
    Ok(connection
        .prepare_cached("SELECT bytes FROM buckets WHERE bucket = ?1")?
        .query_row(params![bucket], |row| row.get(0))
        .optional()?
        .unwrap_or(0))
}

/// Writes `key` = `value`, keeping the bucket's byte count, unless the write
/// would take the bucket past `quota`.
fn write(
    connection: &Connection,
    bucket: &str,
    key: &str,
    value: &[u8],
    quota: u64,
) -> BackendResult<()> {
    let old = stored_len(connection, bucket, key).map_err(sql)?;
    let delta = footprint(key, value.len()) - old.map_or(0, |len| footprint(key, len as usize));
    let total = bucket_bytes(connection, bucket).map_err(sql)?;
    if delta > 0 && (total + delta) as u64 > quota {
        return Err(BackendError::Quota(format!(
            "bucket {bucket:?} would hold {} bytes, over its quota of {quota}",
            total + delta
        )));
    }
    connection
        .prepare_cached(
            "INSERT INTO kv (bucket, key, value) VALUES (?1, ?2, ?3)
             ON CONFLICT (bucket, key) DO UPDATE SET value = excluded.value",
        )
        .map_err(sql)?
        .execute(params![bucket, key, value])
        .map_err(sql)?;
    adjust(connection, bucket, delta)
}

fn adjust(connection: &Connection, bucket: &str, delta: i64) -> BackendResult<()> {
    if delta == 0 {
        return Ok(());
    }
    connection
        .prepare_cached(
            "INSERT INTO buckets (bucket, bytes) VALUES (?1, ?2)
             ON CONFLICT (bucket) DO UPDATE SET bytes = bytes + excluded.bytes",
        )
        .map_err(sql)?
        .execute(params![bucket, delta])
        .map_err(sql)
        .map(drop)
}

fn read(connection: &Connection, bucket: &str, key: &str) -> BackendResult<Option<Vec<u8>>> {
    connection
        .prepare_cached("SELECT value FROM kv WHERE bucket = ?1 AND key = ?2")
        .map_err(sql)?
        .query_row(params![bucket, key], |row| row.get(0))
        .optional()
        .map_err(sql)
}

fn apply(connection: &Connection, op: &Op) -> BackendResult<Reply> {
    match op {
        Op::Get { bucket, key } => read(connection, bucket, key).map(Reply::Value),
        Op::Exists { bucket, key } => Ok(Reply::Bool(
            stored_len(connection, bucket, key).map_err(sql)?.is_some(),
        )),
        Op::Set {
            bucket,
            key,
            value,
            quota,
        } => write(connection, bucket, key, value, *quota).map(|()| Reply::Done),
        Op::Delete { bucket, key } => {
            let Some(len) = stored_len(connection, bucket, key).map_err(sql)? else {
                return Ok(Reply::Done);
            };
            connection
                .prepare_cached("DELETE FROM kv WHERE bucket = ?1 AND key = ?2")
                .map_err(sql)?
                .execute(params![bucket, key])
                .map_err(sql)?;
            adjust(connection, bucket, -footprint(key, len as usize)).map(|()| Reply::Done)
        }
        Op::List {
            bucket,
            cursor,
            limit,
        } => list(connection, bucket, cursor, *limit),
        Op::Increment {
            bucket,
            key,
            delta,
            quota,
        } => {
            let current = match read(connection, bucket, key)? {
                Some(value) => parse_counter(&value)?,
                None => 0,
            };
            let next = add_checked(current, *delta)?;
            write(connection, bucket, key, next.to_string().as_bytes(), *quota)?;
            Ok(Reply::Number(next))
        }
        Op::Swap {
            bucket,
            key,
            expected,
            value,
            quota,
        } => {
            if read(connection, bucket, key)? != *expected {
                return Ok(Reply::Bool(false));
            }
            write(connection, bucket, key, value, *quota)?;
            Ok(Reply::Bool(true))
        }
    }
}

/// A page of keys in key order. A numeric cursor is an offset; a text
/// cursor is the last key of the previous page (empty: from the start).
fn list(
    connection: &Connection,
    bucket: &str,
    cursor: &KeyCursor,
    limit: usize,
) -> BackendResult<Reply> {
    let fetch = (limit + 1) as i64;
    let mut keys: Vec<String> = match cursor {
        KeyCursor::Number(offset) => {
            let mut statement = connection
                .prepare_cached(
                    "SELECT key FROM kv WHERE bucket = ?1 ORDER BY key LIMIT ?2 OFFSET ?3",
                )
                .map_err(sql)?;
            statement
                .query_map(params![bucket, fetch, *offset as i64], |row| row.get(0))
                .and_then(Iterator::collect)
                .map_err(sql)?
        }
        KeyCursor::Text(after) => {
            let mut statement = connection
                .prepare_cached(
                    "SELECT key FROM kv WHERE bucket = ?1 AND key > ?2 ORDER BY key LIMIT ?3",
                )
                .map_err(sql)?;
            statement
                .query_map(params![bucket, after, fetch], |row| row.get(0))
                .and_then(Iterator::collect)
                .map_err(sql)?
        }
    };
    let more = keys.len() > limit;
    keys.truncate(limit);
    let next = match (more, cursor) {
        (false, _) => None,
        (true, KeyCursor::Text(_)) => keys.last().cloned().map(KeyCursor::Text),
        (true, KeyCursor::Number(offset)) => Some(KeyCursor::Number(offset + limit as u64)),
    };
    Ok(Reply::Page(KeyPage { keys, next }))
}

impl KeyValueStore for Embedded {
    /// The value read: a swap compares the stored value with it.
    type Version = Option<Vec<u8>>;

    fn kind(&self) -> &'static str {
        "embedded"
    }

    /// Always up while its thread runs.
    fn status(&self) -> BackendStatus {
        BackendStatus {
            kind: "embedded",
            up: true,
            detail: match &self.path {
                Some(path) => format!("SQLite at {}", path.display()),
                None => "in memory (not persisted)".into(),
            },
        }
    }

    async fn get(&self, at: KeyRef<'_>) -> BackendResult<Option<Vec<u8>>> {
        let KeyRef { bucket, key } = at;
        match self
            .call(Op::Get {
                bucket: bucket.into(),
                key: key.into(),
            })
            .await?
        {
            Reply::Value(value) => Ok(value),
            _ => Err(unexpected()),
        }
    }

    async fn set(&self, at: KeyRef<'_>, value: &[u8], quota: u64) -> BackendResult<()> {
        let KeyRef { bucket, key } = at;
        let op = Op::Set {
            bucket: bucket.into(),
            key: key.into(),
            value: value.to_vec(),
            quota,
        };
        self.call(op).await.map(drop)
    }

    async fn delete(&self, at: KeyRef<'_>) -> BackendResult<()> {
        let KeyRef { bucket, key } = at;
        self.call(Op::Delete {
            bucket: bucket.into(),
            key: key.into(),
        })
        .await
        .map(drop)
    }

    async fn exists(&self, at: KeyRef<'_>) -> BackendResult<bool> {
        let KeyRef { bucket, key } = at;
        match self
            .call(Op::Exists {
                bucket: bucket.into(),
                key: key.into(),
            })
            .await?
        {
            Reply::Bool(found) => Ok(found),
            _ => Err(unexpected()),
        }
    }

    async fn list_keys(&self, bucket: &str, from: KeyCursor, max: usize) -> BackendResult<KeyPage> {
        match self
            .call(Op::List {
                bucket: bucket.into(),
                cursor: from,
                limit: max,
            })
            .await?
        {
            Reply::Page(page) => Ok(page),
            _ => Err(unexpected()),
        }
    }

    async fn increment(&self, at: KeyRef<'_>, delta: i64, quota: u64) -> BackendResult<i64> {
        let KeyRef { bucket, key } = at;
        match self
            .call(Op::Increment {
                bucket: bucket.into(),
                key: key.into(),
                delta,
                quota,
            })
            .await?
        {
            Reply::Number(value) => Ok(value),
            _ => Err(unexpected()),
        }
    }

    async fn read_versioned(
        &self,
        at: KeyRef<'_>,
    ) -> BackendResult<(Option<Vec<u8>>, Option<Vec<u8>>)> {
        let value = self.get(at).await?;
        Ok((value.clone(), value))
    }

    async fn swap(
        &self,
        at: KeyRef<'_>,
        expected: &Option<Vec<u8>>,
        value: &[u8],
        quota: u64,
    ) -> BackendResult<bool> {
        let KeyRef { bucket, key } = at;
        let op = Op::Swap {
            bucket: bucket.into(),
            key: key.into(),
            expected: expected.clone(),
            value: value.to_vec(),
            quota,
        };
        match self.call(op).await? {
            Reply::Bool(swapped) => Ok(swapped),
            _ => Err(unexpected()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn operations_and_quota() {
        let store = Embedded::open(None).unwrap();
        // Each entry counts its key, its value and the overhead.
        let quota = 100 + ENTRY_OVERHEAD;
        store
            .set(
                KeyRef {
                    bucket: "b",
                    key: "k",
                },
                b"v",
                quota,
            )
            .await
            .unwrap();
        assert_eq!(
            store
                .get(KeyRef {
                    bucket: "b",
                    key: "k"
                })
                .await
                .unwrap(),
            Some(b"v".to_vec())
        );
        assert!(
            store
                .exists(KeyRef {
                    bucket: "b",
                    key: "k"
                })
                .await
                .unwrap()
        );
        assert_eq!(
            store
                .get(KeyRef {
                    bucket: "other",
                    key: "k"
                })
                .await
                .unwrap(),
            None
        );
        let err = store
            .set(
                KeyRef {
                    bucket: "b",
                    key: "big",
                },
                &[0; 90],
                quota,
            )
            .await
            .unwrap_err();
        assert!(matches!(err, BackendError::Quota(_)), "{err}");
        // Deleting frees the entry whole; the count follows.
        store
            .delete(KeyRef {
                bucket: "b",
                key: "k",
            })
            .await
            .unwrap();
        store
            .set(
                KeyRef {
                    bucket: "b",
                    key: "big",
                },
                &[0; 90],
                quota,
            )
            .await
            .unwrap();
        assert_eq!(
            store
                .increment(
                    KeyRef {
                        bucket: "b",
                        key: "n"
                    },
                    5,
                    1000
                )
                .await
                .unwrap(),
            5
        );
        assert_eq!(
            store
                .increment(
                    KeyRef {
                        bucket: "b",
                        key: "n"
                    },
                    -2,
                    1000
                )
                .await
                .unwrap(),
            3
        );
        assert!(matches!(
            store
                .increment(
                    KeyRef {
                        bucket: "b",
                        key: "big"
                    },
                    1,
                    1000
                )
                .await
                .unwrap_err(),
            BackendError::Invalid(_)
        ));
    }

    #[tokio::test]
    async fn regression_many_small_entries_count_what_they_cost() {
        let store = Embedded::open(None).unwrap();
        // 1 KiB of quota: all hundred two-byte entries would have fit when
        // only keys and values counted; with the per-entry overhead, 15 do.
        let mut written = 0;
        for i in 10..110 {
            if store
                .set(
                    KeyRef {
                        bucket: "b",
                        key: &format!("{i}"),
                    },
                    b"v",
                    1024,
                )
                .await
                .is_err()
            {
                break;
            }
            written += 1;
        }
        assert_eq!(written, 1024 / (2 + ENTRY_OVERHEAD) as usize);
    }

    #[test]
    fn a_store_from_before_the_overhead_is_recounted_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kv.sqlite3");
        {
            let connection = sqlite::open(Some(&path), "test").unwrap();
            connection
                .execute_batch(
                    "CREATE TABLE kv (bucket TEXT NOT NULL, key TEXT NOT NULL, value BLOB NOT NULL, PRIMARY KEY (bucket, key)) WITHOUT ROWID;
                     CREATE TABLE buckets (bucket TEXT PRIMARY KEY, bytes INTEGER NOT NULL) WITHOUT ROWID;
                     INSERT INTO kv VALUES ('b', 'k1', x'0102'), ('b', 'k2', x'03');
                     INSERT INTO buckets VALUES ('b', 7);",
                )
                .unwrap();
        }
        drop(Embedded::open(Some(&path)).unwrap());
        let connection = sqlite::open(Some(&path), "test").unwrap();
        let bytes: i64 = connection
            .query_row("SELECT bytes FROM buckets WHERE bucket = 'b'", [], |row| {
                row.get(0)
            })
            .unwrap();
        assert_eq!(bytes, 7 + 2 * ENTRY_OVERHEAD as i64);
    }

    #[tokio::test]
    async fn pages_by_offset_and_by_key() {
        let store = Embedded::open(None).unwrap();
        for i in 0..5 {
            store
                .set(
                    KeyRef {
                        bucket: "b",
                        key: &format!("k{i}"),
                    },
                    b"v",
                    1 << 20,
                )
                .await
                .unwrap();
        }
        let page = store.list_keys("b", KeyCursor::Number(0), 2).await.unwrap();
        assert_eq!(page.keys, ["k0", "k1"]);
        assert_eq!(page.next, Some(KeyCursor::Number(2)));
        let page = store.list_keys("b", KeyCursor::Number(2), 2).await.unwrap();
        assert_eq!(page.keys, ["k2", "k3"]);
        let page = store
            .list_keys("b", KeyCursor::Text(String::new()), 2)
            .await
            .unwrap();
        assert_eq!(page.next, Some(KeyCursor::Text("k1".into())));
        let page = store
            .list_keys("b", KeyCursor::Text("k3".into()), 2)
            .await
            .unwrap();
        assert_eq!((page.keys, page.next), (vec!["k4".to_string()], None));
    }

    #[tokio::test]
    async fn swap_compares_values() {
        let store = Embedded::open(None).unwrap();
        let (value, version) = store
            .read_versioned(KeyRef {
                bucket: "b",
                key: "k",
            })
            .await
            .unwrap();
        assert_eq!(value, None);
        assert!(
            store
                .swap(
                    KeyRef {
                        bucket: "b",
                        key: "k"
                    },
                    &version,
                    b"1",
                    100
                )
                .await
                .unwrap()
        );
        assert!(
            !store
                .swap(
                    KeyRef {
                        bucket: "b",
                        key: "k"
                    },
                    &version,
                    b"2",
                    100
                )
                .await
                .unwrap()
        );
        assert_eq!(
            store
                .get(KeyRef {
                    bucket: "b",
                    key: "k"
                })
                .await
                .unwrap(),
            Some(b"1".to_vec())
        );
    }

    #[test]
    fn writes_survive_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kv.sqlite3");
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async {
            let store = Embedded::open(Some(&path)).unwrap();
            store
                .set(
                    KeyRef {
                        bucket: "b",
                        key: "k",
                    },
                    b"kept",
                    100,
                )
                .await
                .unwrap();
        });
        runtime.block_on(async {
            let store = Embedded::open(Some(&path)).unwrap();
            assert_eq!(
                store
                    .get(KeyRef {
                        bucket: "b",
                        key: "k"
                    })
                    .await
                    .unwrap(),
                Some(b"kept".to_vec())
            );
        });
    }
}
