//! What a key-value backend does, whichever engine it is: the operations
//! both `wasi:keyvalue` versions need, on byte values in named buckets.
//!
//! The backends are a closed set — embedded SQLite, Redis, NATS JetStream —
//! dispatched through the [`Backend`] enum rather than a trait object, so an
//! operation is a plain `async fn` call with no boxing on the request path.

use std::sync::Arc;

use crate::capabilities::keyvalue::embedded::Embedded;
use crate::capabilities::keyvalue::nats::NatsKv;
use crate::capabilities::keyvalue::redis::RedisKv;

/// Where a page of keys starts. Each backend understands the cursors it
/// hands out, and answers in the kind it is asked in: a number for
/// `wasi:keyvalue@0.2.0-draft` (`option<u64>`; the first page is
/// `Number(0)`), text for `@0.2.0-draft2` (`option<string>`; the first page
/// is `Text("")`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyCursor {
    /// A numeric cursor (an offset, or Redis's scan cursor).
    Number(u64),
    /// A text cursor (the last key of the previous page, or a scan cursor
    /// written as text).
    Text(String),
}

/// One page of keys.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KeyPage {
    /// The keys, in the backend's order.
    pub keys: Vec<String>,
    /// Where the next page starts; `None` on the last page.
    pub next: Option<KeyCursor>,
}

/// What a compare-and-swap compares: the value read, or the backend's
/// revision of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Version {
    /// The value itself (absent: `None`).
    Value(Option<Vec<u8>>),
    /// A revision number (0: absent).
    Revision(u64),
}

/// Why a backend operation failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BackendError {
    /// The write would take the bucket past its byte quota.
    Quota(String),
    /// The operation does not apply to the stored value (incrementing text).
    Invalid(String),
    /// The backend cannot be reached right now.
    Unavailable(String),
    /// Anything else.
    Other(String),
}

impl std::fmt::Display for BackendError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BackendError::Quota(why) => write!(f, "quota exceeded: {why}"),
            BackendError::Invalid(why) => write!(f, "{why}"),
            BackendError::Unavailable(why) => {
                write!(f, "the key-value backend is unavailable: {why}")
            }
            BackendError::Other(why) => write!(f, "{why}"),
        }
    }
}

/// The result of a backend operation.
pub type BackendResult<T> = Result<T, BackendError>;

/// Whether a backend is reachable, for readiness and metrics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendStatus {
    /// The backend's kind: `embedded`, `redis` or `nats`.
    pub kind: &'static str,
    /// Whether the last check reached it.
    pub up: bool,
    /// What the last check found, for people.
    pub detail: String,
}

/// Parses the number an increment works on: a decimal integer as text, the
/// form every backend stores counters in (so a `get` reads `"42"`).
pub(crate) fn parse_counter(value: &[u8]) -> BackendResult<i64> {
    std::str::from_utf8(value)
        .ok()
        .and_then(|text| text.trim().parse::<i64>().ok())
        .ok_or_else(|| {
            BackendError::Invalid(
                "the value is not a whole number, so it cannot be incremented".into(),
            )
        })
}

/// `current + delta`, refusing to wrap.
pub(crate) fn add_checked(current: i64, delta: i64) -> BackendResult<i64> {
    current
        .checked_add(delta)
        .ok_or_else(|| BackendError::Invalid("the increment overflows a 64-bit integer".into()))
}

/// Which backend a host uses, as configured (`--kv`, or `backend` under
/// `[keyvalue]` in `wharf.toml`).
#[derive(Clone, Default, PartialEq, Eq)]
pub enum BackendChoice {
    /// SQLite in the data directory (in memory without one).
    #[default]
    Embedded,
    /// A Redis server: `redis://[:password@]host:port[/db]` (or `rediss://`).
    Redis(String),
    /// NATS JetStream: `nats://host:port[,nats://…]`.
    Nats(String),
}

/// Shows the address without its credentials.
impl std::fmt::Debug for BackendChoice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BackendChoice::Embedded => f.write_str("Embedded"),
            BackendChoice::Redis(url) => write!(f, "Redis({:?})", crate::base::redact::url(url)),
            BackendChoice::Nats(url) => write!(f, "Nats({:?})", crate::base::redact::url(url)),
        }
    }
}

impl std::str::FromStr for BackendChoice {
    type Err = String;

    fn from_str(text: &str) -> Result<BackendChoice, String> {
        let text = text.trim();
        if text == "embedded" {
            Ok(BackendChoice::Embedded)
        } else if text.starts_with("redis://") || text.starts_with("rediss://") {
            Ok(BackendChoice::Redis(text.to_string()))
        } else if text.starts_with("nats://") || text.starts_with("tls://") {
            Ok(BackendChoice::Nats(text.to_string()))
        } else {
            Err(format!(
                "{text:?} is not a key-value backend: use \"embedded\", \"redis://HOST:PORT\" or \"nats://HOST:PORT\""
            ))
        }
    }
}

impl BackendChoice {
    /// Opens the chosen backend: the embedded store at `data_dir` (in memory
    /// without one); Redis and NATS connect in the background, so a server
    /// that is down now does not stop the host from starting.
    pub async fn open(
        &self,
        data_dir: Option<&std::path::Path>,
        max_value_size: u64,
    ) -> anyhow::Result<Backend> {
        Ok(match self {
            BackendChoice::Embedded => {
                let path = data_dir.map(|dir| dir.join("keyvalue.sqlite3"));
                let store =
                    tokio::task::spawn_blocking(move || Embedded::open(path.as_deref())).await??;
                Backend::Embedded(Arc::new(store))
            }
            BackendChoice::Redis(url) => Backend::Redis(RedisKv::connect(url)?),
            BackendChoice::Nats(url) => Backend::Nats(NatsKv::connect(url, max_value_size).await?),
        })
    }
}

/// A key-value backend.
#[derive(Clone)]
pub enum Backend {
    /// SQLite in the data directory.
    Embedded(Arc<Embedded>),
    /// A Redis server.
    Redis(Arc<RedisKv>),
    /// NATS JetStream key-value buckets.
    Nats(Arc<NatsKv>),
}

macro_rules! dispatch {
    ($self:ident, $backend:ident => $call:expr) => {
        match $self {
            Backend::Embedded($backend) => $call,
            Backend::Redis($backend) => $call,
            Backend::Nats($backend) => $call,
        }
    };
}

impl Backend {
    /// The backend's kind, for logs and metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Backend::Embedded(_) => "embedded",
            Backend::Redis(_) => "redis",
            Backend::Nats(_) => "nats",
        }
    }

    /// Whether the backend is reachable.
    pub fn status(&self) -> BackendStatus {
        dispatch!(self, backend => backend.status())
    }

    /// The value of `key`, if any.
    pub async fn get(&self, bucket: &str, key: &str) -> BackendResult<Option<Vec<u8>>> {
        dispatch!(self, backend => backend.get(bucket, key).await)
    }

    /// Sets `key` to `value`, unless that takes the bucket past `quota`
    /// bytes (keys and values counted).
    pub async fn set(
        &self,
        bucket: &str,
        key: &str,
        value: &[u8],
        quota: u64,
    ) -> BackendResult<()> {
        dispatch!(self, backend => backend.set(bucket, key, value, quota).await)
    }

    /// Removes `key` (absent is fine).
    pub async fn delete(&self, bucket: &str, key: &str) -> BackendResult<()> {
        dispatch!(self, backend => backend.delete(bucket, key).await)
    }

    /// Whether `key` has a value.
    pub async fn exists(&self, bucket: &str, key: &str) -> BackendResult<bool> {
        dispatch!(self, backend => backend.exists(bucket, key).await)
    }

    /// A page of up to `limit` keys from `cursor` (`Number(0)` or `Text("")`
    /// for the first page).
    pub async fn list_keys(
        &self,
        bucket: &str,
        cursor: KeyCursor,
        limit: usize,
    ) -> BackendResult<KeyPage> {
        dispatch!(self, backend => backend.list_keys(bucket, cursor, limit).await)
    }

    /// Adds `delta` to the counter at `key` (0 if absent), atomically; the
    /// new value.
    pub async fn increment(
        &self,
        bucket: &str,
        key: &str,
        delta: i64,
        quota: u64,
    ) -> BackendResult<i64> {
        dispatch!(self, backend => backend.increment(bucket, key, delta, quota).await)
    }

    /// The value of `key` and its version, for a later [`swap`](Backend::swap).
    pub async fn read_versioned(
        &self,
        bucket: &str,
        key: &str,
    ) -> BackendResult<(Option<Vec<u8>>, Version)> {
        dispatch!(self, backend => backend.read_versioned(bucket, key).await)
    }

    /// Sets `key` to `value` if it is still at `expected`; whether it was.
    pub async fn swap(
        &self,
        bucket: &str,
        key: &str,
        expected: &Version,
        value: &[u8],
        quota: u64,
    ) -> BackendResult<bool> {
        dispatch!(self, backend => backend.swap(bucket, key, expected, value, quota).await)
    }
}
