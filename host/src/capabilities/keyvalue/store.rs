//! The key-value contract: what a backend does for Wharf, whichever engine
//! it is — the operations both `wasi:keyvalue` versions need, on byte
//! values in named buckets — and [`Store`], a backend of any kind as the
//! capability uses it.
//!
//! A new backend is one file implementing [`KeyValueStore`] and one line in
//! [`KeyValueChoice::open`](crate::capabilities::keyvalue::choice::KeyValueChoice::open).
//! What every backend must do:
//!
//! - keep byte values under string keys, per bucket, and answer for buckets
//!   that were never written to as for empty ones (creating nothing);
//! - count every entry as its key, its value and
//!   [`ENTRY_OVERHEAD`](crate::capabilities::keyvalue::ENTRY_OVERHEAD) bytes
//!   against the quota a write names, refusing a write that would pass it
//!   ([`BackendError::Quota`]) — shrinking is always allowed;
//! - store counters as decimal text and increment them atomically
//!   ([`parse_counter`], [`add_checked`]);
//! - page keys with the cursor kind it is asked in ([`KeyCursor`]);
//! - compare-and-swap on whatever it can compare cheaply (its
//!   [`KeyValueStore::Version`]: the value, or a revision);
//! - say [`BackendError::Unavailable`] when its server cannot be reached, so
//!   the guest gets a clear error and readiness shows it.

use std::any::Any;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use crate::capabilities::BackendStatus;

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

/// Where one entry lives: its bucket and its key. Every operation on an
/// entry takes one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyRef<'a> {
    /// The bucket.
    pub bucket: &'a str,
    /// The key in it.
    pub key: &'a str,
}

/// One page of keys.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KeyPage {
    /// The keys, in the backend's order.
    pub keys: Vec<String>,
    /// Where the next page starts; `None` on the last page.
    pub next: Option<KeyCursor>,
}

/// What resealing a bucket with the current key did (see
/// [`KeyValueStore::reseal`]).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct Resealed {
    /// Keys looked at.
    pub keys: u64,
    /// Values sealed again with the current key.
    pub resealed: u64,
    /// Values already sealed with it (or written meanwhile, which seals
    /// with it).
    pub current: u64,
    /// Values that do not open with any key the host has: left as they
    /// are.
    pub unopened: u64,
    /// The first few keys of those, to look into.
    pub unopened_keys: Vec<String>,
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

/// A key-value backend: the contract a new backend implements. Every
/// operation is bounded by the caller's deadline; the backend need not time
/// itself out.
pub trait KeyValueStore: Send + Sync + 'static {
    /// What [`read_versioned`](KeyValueStore::read_versioned) hands out and
    /// [`swap`](KeyValueStore::swap) compares: the value itself, a revision
    /// number, whatever the backend can check in one step.
    type Version: Send + Sync + 'static;

    /// The backend's kind, for logs and metrics (`embedded`, `redis`, …).
    fn kind(&self) -> &'static str;

    /// Whether the backend is reachable now.
    fn status(&self) -> BackendStatus;

    /// The value of `key`, if any.
    fn get(&self, at: KeyRef<'_>) -> impl Future<Output = BackendResult<Option<Vec<u8>>>> + Send;

    /// Sets `key` to `value`, unless that takes the bucket past `quota`.
    fn set(
        &self,
        at: KeyRef<'_>,
        value: &[u8],
        quota: u64,
    ) -> impl Future<Output = BackendResult<()>> + Send;

    /// Removes `key` (absent is fine).
    fn delete(&self, at: KeyRef<'_>) -> impl Future<Output = BackendResult<()>> + Send;

    /// Whether `key` has a value.
    fn exists(&self, at: KeyRef<'_>) -> impl Future<Output = BackendResult<bool>> + Send;

    /// A page of up to `max` keys from the cursor `from` (`Number(0)` or
    /// `Text("")` for the first page).
    fn list_keys(
        &self,
        bucket: &str,
        from: KeyCursor,
        max: usize,
    ) -> impl Future<Output = BackendResult<KeyPage>> + Send;

    /// Adds `delta` to the counter at `key` (0 if absent), atomically,
    /// unless the bucket would pass `quota`; the new value.
    fn increment(
        &self,
        at: KeyRef<'_>,
        delta: i64,
        quota: u64,
    ) -> impl Future<Output = BackendResult<i64>> + Send;

    /// The value of `key` and its version, for a later swap.
    fn read_versioned(
        &self,
        at: KeyRef<'_>,
    ) -> impl Future<Output = BackendResult<(Option<Vec<u8>>, Self::Version)>> + Send;

    /// Sets `key` to `value` if it is still at `expected` (and the bucket
    /// stays within `quota`); whether it was.
    fn swap(
        &self,
        at: KeyRef<'_>,
        expected: &Self::Version,
        value: &[u8],
        quota: u64,
    ) -> impl Future<Output = BackendResult<bool>> + Send;

    /// Seals every value of `bucket` that a previous key sealed again with
    /// the current one, without losing a concurrent write (`wharf rekey`).
    /// Only a backend that seals has anything to do; the others say so.
    fn reseal(&self, bucket: &str) -> impl Future<Output = BackendResult<Resealed>> + Send {
        let _ = bucket;
        async {
            Err(BackendError::Invalid(
                "values are not encrypted on this host ([encryption] key): there is nothing to rekey"
                    .into(),
            ))
        }
    }
}

/// A boxed future, for the operations of a [`Store`].
type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// A version read from one [`Store`], for a swap on the same store.
pub struct CasVersion(Box<dyn Any + Send + Sync>);

/// [`KeyValueStore`] with its types erased, so a [`Store`] can hold any
/// backend. Implemented for every backend; nothing else implements it.
trait ErasedStore: Send + Sync {
    fn kind(&self) -> &'static str;
    fn status(&self) -> BackendStatus;
    fn get<'a>(&'a self, at: KeyRef<'a>) -> BoxFuture<'a, BackendResult<Option<Vec<u8>>>>;
    fn set<'a>(
        &'a self,
        at: KeyRef<'a>,
        value: &'a [u8],
        quota: u64,
    ) -> BoxFuture<'a, BackendResult<()>>;
    fn delete<'a>(&'a self, at: KeyRef<'a>) -> BoxFuture<'a, BackendResult<()>>;
    fn exists<'a>(&'a self, at: KeyRef<'a>) -> BoxFuture<'a, BackendResult<bool>>;
    fn list_keys<'a>(
        &'a self,
        bucket: &'a str,
        from: KeyCursor,
        max: usize,
    ) -> BoxFuture<'a, BackendResult<KeyPage>>;
    fn increment<'a>(
        &'a self,
        at: KeyRef<'a>,
        delta: i64,
        quota: u64,
    ) -> BoxFuture<'a, BackendResult<i64>>;
    fn read_versioned<'a>(
        &'a self,
        at: KeyRef<'a>,
    ) -> BoxFuture<'a, BackendResult<(Option<Vec<u8>>, CasVersion)>>;
    fn swap<'a>(
        &'a self,
        at: KeyRef<'a>,
        expected: &'a CasVersion,
        value: &'a [u8],
        quota: u64,
    ) -> BoxFuture<'a, BackendResult<bool>>;
    fn reseal<'a>(&'a self, bucket: &'a str) -> BoxFuture<'a, BackendResult<Resealed>>;
}

impl<S: KeyValueStore> ErasedStore for S {
    fn reseal<'a>(&'a self, bucket: &'a str) -> BoxFuture<'a, BackendResult<Resealed>> {
        Box::pin(KeyValueStore::reseal(self, bucket))
    }

    fn kind(&self) -> &'static str {
        KeyValueStore::kind(self)
    }

    fn status(&self) -> BackendStatus {
        KeyValueStore::status(self)
    }

    fn get<'a>(&'a self, at: KeyRef<'a>) -> BoxFuture<'a, BackendResult<Option<Vec<u8>>>> {
        Box::pin(KeyValueStore::get(self, at))
    }

    fn set<'a>(
        &'a self,
        at: KeyRef<'a>,
        value: &'a [u8],
        quota: u64,
    ) -> BoxFuture<'a, BackendResult<()>> {
        Box::pin(KeyValueStore::set(self, at, value, quota))
    }

    fn delete<'a>(&'a self, at: KeyRef<'a>) -> BoxFuture<'a, BackendResult<()>> {
        Box::pin(KeyValueStore::delete(self, at))
    }

    fn exists<'a>(&'a self, at: KeyRef<'a>) -> BoxFuture<'a, BackendResult<bool>> {
        Box::pin(KeyValueStore::exists(self, at))
    }

    fn list_keys<'a>(
        &'a self,
        bucket: &'a str,
        from: KeyCursor,
        max: usize,
    ) -> BoxFuture<'a, BackendResult<KeyPage>> {
        Box::pin(KeyValueStore::list_keys(self, bucket, from, max))
    }

    fn increment<'a>(
        &'a self,
        at: KeyRef<'a>,
        delta: i64,
        quota: u64,
    ) -> BoxFuture<'a, BackendResult<i64>> {
        Box::pin(KeyValueStore::increment(self, at, delta, quota))
    }

    fn read_versioned<'a>(
        &'a self,
        at: KeyRef<'a>,
    ) -> BoxFuture<'a, BackendResult<(Option<Vec<u8>>, CasVersion)>> {
        Box::pin(async move {
            let (value, version) = KeyValueStore::read_versioned(self, at).await?;
            Ok((value, CasVersion(Box::new(version))))
        })
    }

    fn swap<'a>(
        &'a self,
        at: KeyRef<'a>,
        expected: &'a CasVersion,
        value: &'a [u8],
        quota: u64,
    ) -> BoxFuture<'a, BackendResult<bool>> {
        Box::pin(async move {
            // A version only ever comes from this store's own
            // read_versioned (the capability keeps the two together).
            let Some(expected) = expected.0.downcast_ref::<S::Version>() else {
                return Err(BackendError::Other(
                    "a compare-and-swap with a version from another store".into(),
                ));
            };
            KeyValueStore::swap(self, at, expected, value, quota).await
        })
    }
}

/// A key-value store of any backend, as the capability uses it: cheap to
/// clone, shared by every deployment.
#[derive(Clone)]
pub struct Store(Arc<dyn ErasedStore>);

impl Store {
    /// The store of `backend`.
    pub fn new(backend: impl KeyValueStore) -> Store {
        Store(Arc::new(backend))
    }

    /// The backend's kind, for logs and metrics.
    pub fn kind(&self) -> &'static str {
        self.0.kind()
    }

    /// Whether the backend is reachable.
    pub fn status(&self) -> BackendStatus {
        self.0.status()
    }

    /// The value of `key`, if any.
    pub async fn get(&self, at: KeyRef<'_>) -> BackendResult<Option<Vec<u8>>> {
        self.0.get(at).await
    }

    /// Sets `key` to `value`, unless that takes the bucket past `quota`.
    pub async fn set(&self, at: KeyRef<'_>, value: &[u8], quota: u64) -> BackendResult<()> {
        self.0.set(at, value, quota).await
    }

    /// Removes `key` (absent is fine).
    pub async fn delete(&self, at: KeyRef<'_>) -> BackendResult<()> {
        self.0.delete(at).await
    }

    /// Whether `key` has a value.
    pub async fn exists(&self, at: KeyRef<'_>) -> BackendResult<bool> {
        self.0.exists(at).await
    }

    /// A page of up to `max` keys from the cursor `from`.
    pub async fn list_keys(
        &self,
        bucket: &str,
        from: KeyCursor,
        max: usize,
    ) -> BackendResult<KeyPage> {
        self.0.list_keys(bucket, from, max).await
    }

    /// Adds `delta` to the counter at `key`, atomically; the new value.
    pub async fn increment(&self, at: KeyRef<'_>, delta: i64, quota: u64) -> BackendResult<i64> {
        self.0.increment(at, delta, quota).await
    }

    /// The value of `key` and its version, for a later [`swap`](Store::swap).
    pub async fn read_versioned(
        &self,
        at: KeyRef<'_>,
    ) -> BackendResult<(Option<Vec<u8>>, CasVersion)> {
        self.0.read_versioned(at).await
    }

    /// Sets `key` to `value` if it is still at `expected`; whether it was.
    pub async fn swap(
        &self,
        at: KeyRef<'_>,
        expected: &CasVersion,
        value: &[u8],
        quota: u64,
    ) -> BackendResult<bool> {
        self.0.swap(at, expected, value, quota).await
    }

    /// Seals `bucket`'s values again with the current key (see
    /// [`KeyValueStore::reseal`]).
    pub async fn reseal(&self, bucket: &str) -> BackendResult<Resealed> {
        self.0.reseal(bucket).await
    }
}
