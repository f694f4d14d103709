//! The Redis key-value backend (`redis://…`), for hosts that share state.
//!
//! Each bucket is one Redis hash, `wharf:kv:{BUCKET}`, with its byte count
//! (keys and values) in `wharf:kv-bytes:{BUCKET}`. Every write is one Lua
//! script, so the quota check, the write and the count change together and
//! nothing is half-written; `increment` is `HINCRBY` inside such a script
//! (atomic across every host sharing the server), and compare-and-swap
//! compares the stored value inside one. Keys are listed with `HSCAN`,
//! whose cursor is the page cursor.
//!
//! The connection is redis-rs's connection manager, created lazily: a host
//! whose Redis is down at start still starts, operations fail with
//! "unavailable" until Redis is back, and the manager reconnects with
//! exponential backoff. A background task pings the server every couple of
//! seconds for readiness and metrics.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context as _, Result};
use redis::aio::ConnectionManager;
use redis::{AsyncCommands as _, Script};

use crate::base::redact::url as redact;
use crate::capabilities::BackendStatus;
use crate::capabilities::keyvalue::store::{
    BackendError, BackendResult, KeyCursor, KeyPage, KeyRef, KeyValueStore,
};
use crate::capabilities::tls::{BackendTls, check_backend_url, ensure_crypto_provider};

/// How often the server is pinged for the status.
const HEALTH_EVERY: Duration = Duration::from_secs(2);

// The scripts count an entry as its field, its value and 64 bytes: the
// per-entry overhead, `ENTRY_OVERHEAD` (a test checks they agree).

/// Writes a value if the bucket stays within its quota.
/// KEYS: hash, bytes. ARGV: field, value, quota. Returns 1, or -1 over quota.
const SET: &str = r"
local old = redis.call('HSTRLEN', KEYS[1], ARGV[1])
local had = redis.call('HEXISTS', KEYS[1], ARGV[1])
local delta = string.len(ARGV[2]) - old
if had == 0 then delta = delta + string.len(ARGV[1]) + 64 end
local total = tonumber(redis.call('GET', KEYS[2]) or '0')
if delta > 0 and total + delta > tonumber(ARGV[3]) then return -1 end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
if delta ~= 0 then redis.call('INCRBY', KEYS[2], delta) end
return 1
";

/// Deletes a value and its bytes. KEYS: hash, bytes. ARGV: field.
const DELETE: &str = r"
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 0 then return 0 end
local size = redis.call('HSTRLEN', KEYS[1], ARGV[1]) + string.len(ARGV[1]) + 64
redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('DECRBY', KEYS[2], size)
return 1
";

/// Increments a counter within the quota. KEYS: hash, bytes. ARGV: field,
/// delta, quota. Returns {1, value}, {-1} over quota, {-2} not a number.
const INCREMENT: &str = r"
local current = redis.call('HGET', KEYS[1], ARGV[1])
local old = 0
local number = 0
if current then
  number = tonumber(current)
  if number == nil or string.find(current, '^%-?%d+$') == nil then return {-2} end
  old = string.len(current)
else
  old = -string.len(ARGV[1]) - 64
end
local value = redis.call('HINCRBY', KEYS[1], ARGV[1], ARGV[2])
local delta = string.len(tostring(value)) - old
local total = tonumber(redis.call('GET', KEYS[2]) or '0')
if delta > 0 and total + delta > tonumber(ARGV[3]) then
  if current then redis.call('HSET', KEYS[1], ARGV[1], current) else redis.call('HDEL', KEYS[1], ARGV[1]) end
  return {-1}
end
if delta ~= 0 then redis.call('INCRBY', KEYS[2], delta) end
return {1, value}
";

/// Sets a value only if it still equals the expected one. KEYS: hash,
/// bytes. ARGV: field, expected present (0/1), expected, value, quota.
/// Returns 1 swapped, 0 changed meanwhile, -1 over quota.
const SWAP: &str = r"
local current = redis.call('HGET', KEYS[1], ARGV[1])
if ARGV[2] == '0' then
  if current then return 0 end
elseif current ~= ARGV[3] then
  return 0
end
local old = 0
if current then old = string.len(current) else old = -string.len(ARGV[1]) - 64 end
local delta = string.len(ARGV[4]) - old
local total = tonumber(redis.call('GET', KEYS[2]) or '0')
if delta > 0 and total + delta > tonumber(ARGV[5]) then return -1 end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[4])
if delta ~= 0 then redis.call('INCRBY', KEYS[2], delta) end
return 1
";

/// The Redis backend.
pub struct RedisKv {
    connection: ConnectionManager,
    /// Where it connects, without credentials, for people.
    shown_url: String,
    status: Arc<Mutex<(bool, String)>>,
    set: Script,
    delete: Script,
    increment: Script,
    swap: Script,
}

fn hash_key(bucket: &str) -> String {
    format!("wharf:kv:{{{bucket}}}")
}

fn bytes_key(bucket: &str) -> String {
    format!("wharf:kv-bytes:{{{bucket}}}")
}

/// The Redis client for `url`, over TLS for `rediss://`.
fn client(url: &str, tls: &BackendTls) -> Result<redis::Client> {
    let invalid = || format!("invalid Redis URL {}", redact(url));
    if !check_backend_url(url, "rediss:", tls)? {
        return redis::Client::open(url).with_context(invalid);
    }
    ensure_crypto_provider();
    let pem = tls.pem()?;
    let certificates = redis::TlsCertificates {
        client_tls: pem
            .identity
            .map(|(client_cert, client_key)| redis::ClientTlsConfig {
                client_cert,
                client_key,
            }),
        root_cert: pem.ca,
    };
    redis::Client::build_with_tls(url, certificates).with_context(invalid)
}

/// Maps a Redis error: connection trouble is "unavailable", the rest other.
fn failed(err: redis::RedisError) -> BackendError {
    if err.is_io_error()
        || err.is_connection_dropped()
        || err.is_timeout()
        || err.is_connection_refusal()
    {
        BackendError::Unavailable(format!("redis: {err}"))
    } else {
        BackendError::Other(format!("redis: {err}"))
    }
}

impl RedisKv {
    /// A backend for the server at `url`: `rediss://` reaches it over TLS,
    /// trusting `tls`'s CA bundle (else the system's roots) and presenting
    /// its client certificate, if any. Connects lazily: a server that is
    /// down now is retried with backoff. Must be called inside a Tokio
    /// runtime, which runs the connection and the health checks.
    pub fn connect(url: &str, tls: &BackendTls) -> Result<RedisKv> {
        let client = client(url, tls)?;
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(2)))
            .set_response_timeout(Some(Duration::from_secs(5)))
            .set_min_delay(Duration::from_millis(50))
            .set_max_delay(Duration::from_secs(2))
            .set_number_of_retries(3);
        let connection = ConnectionManager::new_lazy_with_config(client, config)
            .context("setting up the Redis connection")?;
        let status = Arc::new(Mutex::new((false, "connecting".to_string())));
        tokio::spawn(health(
            Arc::downgrade(&status),
            connection.clone(),
            redact(url),
        ));
        Ok(RedisKv {
            connection,
            shown_url: redact(url),
            status,
            set: Script::new(SET),
            delete: Script::new(DELETE),
            increment: Script::new(INCREMENT),
            swap: Script::new(SWAP),
        })
    }

    fn connection(&self) -> ConnectionManager {
        self.connection.clone()
    }
}

impl KeyValueStore for RedisKv {
    /// The value read: the swap script compares the stored value with it.
    type Version = Option<Vec<u8>>;

    fn kind(&self) -> &'static str {
        "redis"
    }

    /// The last health check's result.
    fn status(&self) -> BackendStatus {
        let (up, detail) = self
            .status
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        BackendStatus {
            kind: "redis",
            up,
            detail: format!("{}: {detail}", self.shown_url),
        }
    }

    async fn get(&self, at: KeyRef<'_>) -> BackendResult<Option<Vec<u8>>> {
        let KeyRef { bucket, key } = at;
        self.connection()
            .hget(hash_key(bucket), key)
            .await
            .map_err(failed)
    }

    async fn set(&self, at: KeyRef<'_>, value: &[u8], quota: u64) -> BackendResult<()> {
        let KeyRef { bucket, key } = at;
        let outcome: i64 = self
            .set
            .key(hash_key(bucket))
            .key(bytes_key(bucket))
            .arg(key)
            .arg(value)
            .arg(quota)
            .invoke_async(&mut self.connection())
            .await
            .map_err(failed)?;
        match outcome {
            -1 => Err(BackendError::Quota(format!(
                "bucket {bucket:?} is at its quota of {quota} bytes"
            ))),
            _ => Ok(()),
        }
    }

    async fn delete(&self, at: KeyRef<'_>) -> BackendResult<()> {
        let KeyRef { bucket, key } = at;
        let _: i64 = self
            .delete
            .key(hash_key(bucket))
            .key(bytes_key(bucket))
            .arg(key)
            .invoke_async(&mut self.connection())
            .await
            .map_err(failed)?;
        Ok(())
    }

    async fn exists(&self, at: KeyRef<'_>) -> BackendResult<bool> {
        let KeyRef { bucket, key } = at;
        self.connection()
            .hexists(hash_key(bucket), key)
            .await
            .map_err(failed)
    }

    /// A page from `HSCAN`: its cursor is the page cursor (a number for
    /// draft guests, the same number as text for draft2 ones). Redis may
    /// return a key on two pages if the hash changes while it is scanned.
    async fn list_keys(&self, bucket: &str, from: KeyCursor, max: usize) -> BackendResult<KeyPage> {
        let text = matches!(from, KeyCursor::Text(_));
        let start: u64 = match &from {
            KeyCursor::Number(n) => *n,
            KeyCursor::Text(t) if t.is_empty() => 0,
            KeyCursor::Text(t) => t.parse().map_err(|_| {
                BackendError::Invalid(format!("{t:?} is not a cursor this store gave"))
            })?,
        };
        let (next, pairs): (u64, Vec<(String, redis::Value)>) = redis::cmd("HSCAN")
            .arg(hash_key(bucket))
            .arg(start)
            .arg("COUNT")
            .arg(max)
            .query_async(&mut self.connection())
            .await
            .map_err(failed)?;
        let keys = pairs.into_iter().map(|(key, _)| key).collect();
        let next = (next != 0).then(|| {
            if text {
                KeyCursor::Text(next.to_string())
            } else {
                KeyCursor::Number(next)
            }
        });
        Ok(KeyPage { keys, next })
    }

    async fn increment(&self, at: KeyRef<'_>, delta: i64, quota: u64) -> BackendResult<i64> {
        let KeyRef { bucket, key } = at;
        let outcome: Vec<i64> = self
            .increment
            .key(hash_key(bucket))
            .key(bytes_key(bucket))
            .arg(key)
            .arg(delta)
            .arg(quota)
            .invoke_async(&mut self.connection())
            .await
            .map_err(|err| {
                if err.to_string().contains("overflow") {
                    BackendError::Invalid("the increment overflows a 64-bit integer".into())
                } else {
                    failed(err)
                }
            })?;
        match outcome.as_slice() {
            [1, value] => Ok(*value),
            [-1] => Err(BackendError::Quota(format!(
                "bucket {bucket:?} is at its quota of {quota} bytes"
            ))),
            [-2] => Err(BackendError::Invalid(
                "the value is not a whole number, so it cannot be incremented".into(),
            )),
            other => Err(BackendError::Other(format!("unexpected reply {other:?}"))),
        }
    }

    async fn read_versioned(
        &self,
        at: KeyRef<'_>,
    ) -> BackendResult<(Option<Vec<u8>>, Option<Vec<u8>>)> {
        let value = KeyValueStore::get(self, at).await?;
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
        let outcome: i64 = self
            .swap
            .key(hash_key(bucket))
            .key(bytes_key(bucket))
            .arg(key)
            .arg(if expected.is_some() { "1" } else { "0" })
            .arg(expected.as_deref().unwrap_or_default())
            .arg(value)
            .arg(quota)
            .invoke_async(&mut self.connection())
            .await
            .map_err(failed)?;
        match outcome {
            -1 => Err(BackendError::Quota(format!(
                "bucket {bucket:?} is at its quota of {quota} bytes"
            ))),
            swapped => Ok(swapped == 1),
        }
    }
}

/// Pings the server every [`HEALTH_EVERY`] while the backend exists, and
/// logs when it goes down or comes back.
async fn health(
    status: std::sync::Weak<Mutex<(bool, String)>>,
    mut connection: ConnectionManager,
    shown_url: String,
) {
    loop {
        let ping: redis::RedisResult<String> = tokio::time::timeout(
            Duration::from_secs(2),
            redis::cmd("PING").query_async(&mut connection),
        )
        .await
        .unwrap_or_else(|_| Err((redis::ErrorKind::Io, "ping timed out").into()));
        let now = match ping {
            Ok(_) => (true, "connected".to_string()),
            Err(err) => (false, format!("down: {err}")),
        };
        // The backend is gone when its status is: stop.
        let Some(status) = status.upgrade() else {
            return;
        };
        let before = std::mem::replace(
            &mut *status.lock().unwrap_or_else(|e| e.into_inner()),
            now.clone(),
        );
        if before.0 != now.0 {
            if now.0 {
                tracing::info!(backend = "redis", url = %shown_url, "key-value backend connected");
            } else {
                tracing::warn!(backend = "redis", url = %shown_url, "key-value backend {}", now.1);
            }
        }
        drop(status);
        tokio::time::sleep(HEALTH_EVERY).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_scripts_count_the_entry_overhead() {
        let overhead = crate::capabilities::keyvalue::ENTRY_OVERHEAD.to_string();
        for script in [SET, DELETE, INCREMENT, SWAP] {
            assert!(
                script.contains(&format!(" {overhead} "))
                    || script.contains(&format!(" {overhead}\n")),
                "{script}"
            );
        }
    }

    #[test]
    fn urls_are_shown_without_passwords() {
        assert_eq!(
            redact("redis://:secret@cache.example/0"),
            "redis://:***@cache.example/0"
        );
        assert_eq!(redact("redis://cache.example"), "redis://cache.example");
    }
}
