//! The NATS JetStream key-value backend (`nats://…`), for clusters: a NATS
//! server is a Wharf cluster's backbone, and its KV buckets are replicated
//! streams.
//!
//! A Wharf bucket `NAME` is the JetStream KV bucket `wharf-kv-NAME`,
//! created on first write with one version per key and the service's
//! value-size limit (which the server enforces). The byte quota is Wharf's
//! to enforce: a stream's own `max_bytes` makes NATS 2.9 silently drop the
//! oldest keys once it is full, whatever the discard policy — an
//! acknowledged write must never vanish, so the stream has no byte limit and
//! a write is refused when the bucket's stored size (JetStream's count,
//! message overhead included, read at most every [`SIZE_FRESH_FOR`]) plus
//! the new value would pass the quota. Concurrent writers can overshoot it
//! by what they write within that interval. JetStream keys allow only `[-/_=.a-zA-Z0-9]`, so
//! keys are escaped: letters, digits, `-` and `_` stay, every other byte is
//! `=XX` in hex (`a.b` is stored as `a=2Eb`) — unambiguous, and listed keys
//! are unescaped. `increment` and compare-and-swap use the key's revision:
//! an update that names the revision it read fails if another host wrote in
//! between, and `increment` retries then, so it is atomic across hosts.
//!
//! The client connects in the background and reconnects by itself: a host
//! whose NATS is down at start still starts, and operations fail with
//! "unavailable" until NATS is back.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Result;
use async_nats::jetstream::{self, kv};
use futures_util::StreamExt as _;

use crate::capabilities::BackendStatus;
use crate::capabilities::keyvalue::coalesce::IncrementQueues;
use crate::capabilities::keyvalue::store::{
    BackendError, BackendResult, KeyCursor, KeyPage, KeyRef, KeyValueStore, add_checked,
    parse_counter,
};
use crate::capabilities::nats::{KeyValueSpec, NatsConnection, Replicas};
use crate::capabilities::tls::BackendTls;

/// Attempts at an increment before giving up under contention (from other
/// hosts: this host's increments of one key are coalesced).
const INCREMENT_ATTEMPTS: usize = 64;

/// How long an operation waits for the client to be connected.
const CONNECT_WAIT: Duration = Duration::from_secs(1);

/// How long a bucket's stored size is trusted before it is read again.
pub const SIZE_FRESH_FOR: Duration = Duration::from_millis(250);

/// The NATS JetStream KV backend.
pub struct NatsKv {
    /// The shared connection.
    connection: Arc<NatsConnection>,
    jetstream: jetstream::Context,
    /// Buckets opened so far.
    buckets: Mutex<HashMap<String, kv::Store>>,
    /// Each bucket's stored size as last read, written to since, and when.
    sizes: Mutex<HashMap<String, (u64, std::time::Instant)>>,
    /// Increments waiting, per (bucket, key), for the swap in flight.
    increments: Arc<IncrementQueues>,
    /// The limits buckets are created with.
    max_value_size: i32,
    /// How many servers keep a copy of each bucket.
    replicas: Replicas,
}

/// A JetStream key for a guest's key.
pub(crate) fn escape_key(key: &str) -> String {
    let mut escaped = String::with_capacity(key.len());
    for byte in key.bytes() {
        if byte.is_ascii_alphanumeric() || byte == b'-' || byte == b'_' {
            escaped.push(byte as char);
        } else {
            escaped.push_str(&format!("={byte:02X}"));
        }
    }
    escaped
}

/// The guest's key for a JetStream key; `None` if it is not one Wharf made.
pub(crate) fn unescape_key(escaped: &str) -> Option<String> {
    let mut bytes = Vec::with_capacity(escaped.len());
    let mut rest = escaped.as_bytes();
    while let Some((&byte, tail)) = rest.split_first() {
        if byte == b'=' {
            let hex = std::str::from_utf8(tail.get(..2)?).ok()?;
            bytes.push(u8::from_str_radix(hex, 16).ok()?);
            rest = &tail[2..];
        } else {
            bytes.push(byte);
            rest = tail;
        }
    }
    String::from_utf8(bytes).ok()
}

fn other(err: impl std::fmt::Display) -> BackendError {
    let text = err.to_string();
    if text.contains("maximum bytes") || text.contains("insufficient resources") {
        BackendError::Quota(format!("nats: {text}"))
    } else if text.contains("timed out")
        || text.contains("no responders")
        || text.contains("disconnected")
    {
        BackendError::Unavailable(format!("nats: {text}"))
    } else {
        BackendError::Other(format!("nats: {text}"))
    }
}

impl NatsKv {
    /// A backend on the NATS server(s) at `url` (comma-separated), buckets
    /// created with values up to `max_value_size` bytes, each kept by
    /// `replicas` servers, over TLS as `tls` says, authenticated by the
    /// NATS `credentials` file's text if any. Connects in the background;
    /// must be called inside a Tokio runtime.
    pub async fn connect(
        url: &str,
        max_value_size: u64,
        replicas: Replicas,
        tls: &BackendTls,
        credentials: Option<&str>,
    ) -> Result<NatsKv> {
        let connection = NatsConnection::shared(url, credentials, tls).await?;
        Ok(NatsKv {
            jetstream: connection.jetstream().clone(),
            connection,
            buckets: Mutex::new(HashMap::new()),
            sizes: Mutex::new(HashMap::new()),
            increments: Arc::new(IncrementQueues::default()),
            max_value_size: i32::try_from(max_value_size).unwrap_or(i32::MAX),
            replicas,
        })
    }

    /// Waits a moment for the client to be connected (it connects in the
    /// background, and a request may come first); fails clearly if it is
    /// not, rather than holding the request.
    async fn connected(&self) -> BackendResult<()> {
        self.connection
            .connected(CONNECT_WAIT)
            .await
            .map_err(|why| BackendError::Unavailable(format!("nats: {why}")))
    }

    fn cached(&self, bucket: &str) -> Option<kv::Store> {
        self.buckets
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(bucket)
            .cloned()
    }

    fn remember(&self, bucket: &str, store: &kv::Store) {
        self.buckets
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(bucket.to_string(), store.clone());
    }

    /// The store for `bucket`, if it exists (reads of a bucket nobody wrote
    /// to find nothing, and create nothing).
    async fn lookup(&self, bucket: &str) -> BackendResult<Option<kv::Store>> {
        if let Some(store) = self.cached(bucket) {
            return Ok(Some(store));
        }
        self.connected().await?;
        match self
            .jetstream
            .get_key_value(format!("wharf-kv-{bucket}"))
            .await
        {
            Ok(store) => {
                // A bucket made with fewer copies (by an older host, or
                // before the cluster grew) is raised once, when first used.
                if let Ok(mut stream) = self
                    .jetstream
                    .get_stream(format!("KV_wharf-kv-{bucket}"))
                    .await
                {
                    let wanted = self.connection.replicas(self.replicas);
                    self.connection.keep_copies(&mut stream, wanted).await;
                }
                self.remember(bucket, &store);
                Ok(Some(store))
            }
            Err(err) if format!("{err:?}").contains("not found") => Ok(None),
            Err(err) => Err(other(format!("{err}: {err:?}"))),
        }
    }

    /// The store for `bucket`, created (with the value limit) if it does
    /// not exist.
    async fn bucket(&self, bucket: &str) -> BackendResult<kv::Store> {
        if let Some(store) = self.lookup(bucket).await? {
            return Ok(store);
        }
        let name = format!("wharf-kv-{bucket}");
        let spec = KeyValueSpec {
            max_value_size: self.max_value_size,
            replicas: self.connection.replicas(self.replicas),
            ..KeyValueSpec::default()
        };
        let store = self
            .connection
            .key_value(&name, spec)
            .await
            .map_err(other)?;
        self.remember(bucket, &store);
        Ok(store)
    }

    /// Refuses a write of `adding` bytes that would take `bucket` past
    /// `quota`, then counts it.
    async fn check_quota(&self, bucket: &str, adding: usize, quota: u64) -> BackendResult<()> {
        let cached = self
            .sizes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(bucket)
            .copied()
            .filter(|(_, at)| at.elapsed() < SIZE_FRESH_FOR);
        let stored = match cached {
            Some((size, _)) => size,
            None => {
                let mut stream = self
                    .jetstream
                    .get_stream(format!("KV_wharf-kv-{bucket}"))
                    .await
                    .map_err(other)?;
                let size = stream.info().await.map_err(other)?.state.bytes;
                self.sizes
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(bucket.to_string(), (size, std::time::Instant::now()));
                size
            }
        };
        let after = stored.saturating_add(adding as u64);
        if after > quota {
            return Err(BackendError::Quota(format!(
                "bucket {bucket:?} holds about {stored} bytes; {adding} more would pass its quota of {quota}"
            )));
        }
        if let Some(entry) = self
            .sizes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get_mut(bucket)
        {
            entry.0 = after;
        }
        Ok(())
    }
}

/// One compare-and-swap adding all of `deltas` to `key`; the value
/// before them.
async fn swap_increments(store: &kv::Store, key: &str, deltas: &[i64]) -> BackendResult<i64> {
    let escaped = escape_key(key);
    for attempt in 0..INCREMENT_ATTEMPTS {
        if attempt > 0 {
            // Another host won the race: back off a little, at random.
            let pause = fastrand::u64(0..=(attempt as u64).min(10));
            tokio::time::sleep(Duration::from_millis(pause)).await;
        }
        let entry = store.entry(escaped.clone()).await.map_err(other)?;
        let (current, revision) = match &entry {
            Some(entry) if entry.operation == kv::Operation::Put => {
                (parse_counter(&entry.value)?, Some(entry.revision))
            }
            Some(entry) => (0, Some(entry.revision)),
            None => (0, None),
        };
        let mut next = current;
        for delta in deltas {
            next = add_checked(next, *delta)?;
        }
        let value: bytes::Bytes = next.to_string().into_bytes().into();
        let written = match revision {
            Some(revision) => store
                .update(&escaped, value, revision)
                .await
                .map(drop)
                .map_err(|e| e.to_string()),
            None => store
                .create(&escaped, value)
                .await
                .map(drop)
                .map_err(|e| e.to_string()),
        };
        match written {
            Ok(()) => return Ok(current),
            Err(text) if lost_race(&text) => continue,
            Err(text) => return Err(other(text)),
        }
    }
    Err(BackendError::Other(format!(
        "the counter changed under {INCREMENT_ATTEMPTS} attempts in a row; try again"
    )))
}

/// Whether a failed create or update failed because another writer got
/// there first (the key exists, or its revision moved on).
fn lost_race(error: &str) -> bool {
    error.contains("wrong last sequence") || error.contains("exists")
}

impl KeyValueStore for NatsKv {
    /// The entry's revision (0: absent): a swap is an update at it.
    type Version = u64;

    fn kind(&self) -> &'static str {
        "nats"
    }

    /// Whether the client is connected now.
    fn status(&self) -> BackendStatus {
        let (up, detail) = self.connection.state();
        BackendStatus {
            kind: "nats",
            up,
            detail,
        }
    }

    async fn get(&self, at: KeyRef<'_>) -> BackendResult<Option<Vec<u8>>> {
        let KeyRef { bucket, key } = at;
        let Some(store) = self.lookup(bucket).await? else {
            return Ok(None);
        };
        store
            .get(escape_key(key))
            .await
            .map(|value| value.map(|bytes| bytes.to_vec()))
            .map_err(other)
    }

    async fn set(&self, at: KeyRef<'_>, value: &[u8], quota: u64) -> BackendResult<()> {
        let KeyRef { bucket, key } = at;
        let store = self.bucket(bucket).await?;
        self.check_quota(bucket, key.len() + value.len(), quota)
            .await?;
        store
            .put(escape_key(key), value.to_vec().into())
            .await
            .map(drop)
            .map_err(other)
    }

    async fn delete(&self, at: KeyRef<'_>) -> BackendResult<()> {
        let KeyRef { bucket, key } = at;
        let Some(store) = self.lookup(bucket).await? else {
            return Ok(());
        };
        store.delete(escape_key(key)).await.map_err(other)
    }

    async fn exists(&self, at: KeyRef<'_>) -> BackendResult<bool> {
        let KeyRef { bucket, key } = at;
        Ok(self.get(KeyRef { bucket, key }).await?.is_some())
    }

    /// Every key, sorted, paged by offset (numeric cursors) or by the last
    /// key of the previous page (text cursors).
    async fn list_keys(&self, bucket: &str, from: KeyCursor, max: usize) -> BackendResult<KeyPage> {
        let Some(store) = self.lookup(bucket).await? else {
            return Ok(KeyPage::default());
        };
        let mut keys: Vec<String> = match store.keys().await {
            Ok(stream) => {
                stream
                    .filter_map(|key| async move { key.ok().and_then(|k| unescape_key(&k)) })
                    .collect()
                    .await
            }
            // A bucket with no keys has nothing to list.
            Err(err) if err.to_string().contains("no keys") => Vec::new(),
            Err(err) => return Err(other(err)),
        };
        keys.sort();
        let start = match &from {
            KeyCursor::Number(offset) => usize::try_from(*offset).unwrap_or(usize::MAX),
            KeyCursor::Text(after) => keys.partition_point(|key| key <= after),
        };
        let page: Vec<String> = keys.iter().skip(start).take(max).cloned().collect();
        let more = start + page.len() < keys.len();
        let next = match (more, &from) {
            (false, _) => None,
            (true, KeyCursor::Text(_)) => page.last().cloned().map(KeyCursor::Text),
            (true, KeyCursor::Number(_)) => Some(KeyCursor::Number((start + page.len()) as u64)),
        };
        Ok(KeyPage { keys: page, next })
    }

    /// Reads the counter with its revision and writes the sum naming that
    /// revision; a write from elsewhere in between makes the update fail,
    /// and the increment starts over.
    /// Adds `delta` atomically. Increments of one key on this host are
    /// coalesced: while one compare-and-swap is in flight, later increments
    /// queue, and the next swap applies all of them at once, giving each
    /// caller the value it would have seen had they run one by one. The
    /// swap names the revision it read, so hosts never lose an update; it
    /// retries (with jittered backoff) when another host wrote first.
    async fn increment(&self, at: KeyRef<'_>, delta: i64, quota: u64) -> BackendResult<i64> {
        let KeyRef { bucket, key } = at;
        let store = self.bucket(bucket).await?;
        self.check_quota(bucket, key.len() + 20, quota).await?;
        let id = (bucket.to_string(), key.to_string());
        let owned_key = key.to_string();
        self.increments
            .add(id, delta, move |deltas: Vec<i64>| {
                let (store, key) = (store.clone(), owned_key.clone());
                async move { swap_increments(&store, &key, &deltas).await }
            })
            .await
    }

    async fn read_versioned(&self, at: KeyRef<'_>) -> BackendResult<(Option<Vec<u8>>, u64)> {
        let KeyRef { bucket, key } = at;
        let Some(store) = self.lookup(bucket).await? else {
            return Ok((None, 0));
        };
        let entry = store.entry(escape_key(key)).await.map_err(other)?;
        Ok(match entry {
            Some(entry) if entry.operation == kv::Operation::Put => {
                (Some(entry.value.to_vec()), entry.revision)
            }
            Some(entry) => (None, entry.revision),
            None => (None, 0),
        })
    }

    async fn swap(
        &self,
        at: KeyRef<'_>,
        expected: &u64,
        value: &[u8],
        quota: u64,
    ) -> BackendResult<bool> {
        let KeyRef { bucket, key } = at;
        let revision = expected;
        let store = self.bucket(bucket).await?;
        self.check_quota(bucket, key.len() + value.len(), quota)
            .await?;
        let escaped = escape_key(key);
        let value: bytes::Bytes = value.to_vec().into();
        let written = if *revision == 0 {
            store
                .create(&escaped, value)
                .await
                .map(drop)
                .map_err(|e| e.to_string())
        } else {
            store
                .update(&escaped, value, *revision)
                .await
                .map(drop)
                .map_err(|e| e.to_string())
        };
        match written {
            Ok(()) => Ok(true),
            Err(text) if lost_race(&text) => Ok(false),
            Err(text) => Err(other(text)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_escape_and_unescape() {
        for key in ["plain", "a.b", "cart/42", "a=b", "ünïcode", "sp ace", "-_"] {
            let escaped = escape_key(key);
            assert!(
                escaped
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_=".contains(&b)),
                "{escaped}"
            );
            assert_eq!(unescape_key(&escaped).as_deref(), Some(key));
        }
        assert_eq!(escape_key("a.b"), "a=2Eb");
        assert_eq!(unescape_key("bad=Z"), None);
    }
}
