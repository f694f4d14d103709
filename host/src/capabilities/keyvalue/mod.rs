//! `wasi:keyvalue` for guests: buckets of byte values that outlive requests,
//! instances, reloads and restarts, behind the grant in a service's manifest.
//!
//! ```toml
//! [keyvalue]
//! buckets = ["default", "carts"]   # "*": any bucket; default: none
//! ```
//!
//! Both versions guests are built against today are provided, over the same
//! backend: `wasi:keyvalue@0.2.0-draft` (wasmtime's `-Skeyvalue`, wasmCloud)
//! and `@0.2.0-draft2` (Spin 4: text cursors, compare-and-swap, signed
//! increments). A guest opens only the buckets its manifest names (anything
//! else is `access-denied`); services naming the same bucket share it. Keys
//! and values are bounded by `limits.kv_key_size` and
//! `limits.kv_value_size`; a bucket by its quota — the host's
//! `kv_bucket_quota` or its own under `[keyvalue] quotas` in `wharf.toml`,
//! the same whoever writes, counting [`ENTRY_OVERHEAD`] bytes per entry
//! besides keys and values; and a service by `kv_max_buckets` distinct
//! buckets. Over a limit the guest gets an error, never the host a crash. Every operation is bounded
//! by the request's deadline, so a backend that hangs cannot hold a
//! request past its time limit.
//!
//! The backends (one per host, chosen in `wharf.toml` or with `--kv`:
//! [`choice`]) live beside this module, each implementing the contract in
//! [`store`]: [`embedded`] (SQLite, the default), [`redis`] and [`nats`]. Counters are stored as decimal text, so `get` after `increment`
//! reads `"42"`. Keys and values never appear in logs.

mod bindings;
pub mod choice;
mod coalesce;
pub mod embedded;
pub mod nats;
pub mod redis;
pub mod sealed;
pub mod store;

pub use choice::KeyValueChoice;
pub use store::{KeyValueStore, Store};

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::sync::Arc;
use std::time::Instant;

use wasmtime::component::{HasData, Linker, ResourceTable};

use crate::base::metrics::{KeyValueMetrics, KeyValueOp};
use crate::capabilities::keyvalue::store::{BackendError, CasVersion, KeyCursor, KeyPage, KeyRef};

/// Keys a `list-keys` call returns at most per page.
pub const PAGE_SIZE: usize = 1000;

/// Longest bucket name.
pub const MAX_BUCKET_NAME: usize = 64;

/// The bucket the empty name opens.
pub const DEFAULT_BUCKET: &str = "default";

/// Checks a bucket name: 1–64 ASCII letters, digits, `-` or `_` (names that
/// every backend can use as they are).
pub fn validate_bucket_name(name: &str) -> Result<(), String> {
    let valid = !name.is_empty()
        && name.len() <= MAX_BUCKET_NAME
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if valid {
        Ok(())
    } else {
        Err(format!(
            "{name:?} is not a valid bucket name: use 1-{MAX_BUCKET_NAME} letters, digits, '-' or '_'"
        ))
    }
}

/// The buckets a service may open: its manifest's `[keyvalue] buckets`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KeyValueGrant {
    /// `"*"` was listed: any bucket.
    any: bool,
    /// The buckets listed by name.
    buckets: BTreeSet<String>,
}

impl KeyValueGrant {
    /// A grant from a manifest's list; an error names the bad entry.
    pub fn parse(entries: &[String]) -> Result<KeyValueGrant, String> {
        let mut grant = KeyValueGrant::default();
        for entry in entries {
            if entry == "*" {
                grant.any = true;
            } else {
                validate_bucket_name(entry)?;
                grant.buckets.insert(entry.clone());
            }
        }
        Ok(grant)
    }

    /// Whether `bucket` may be opened.
    pub fn allows(&self, bucket: &str) -> bool {
        self.any || self.buckets.contains(bucket)
    }

    /// Whether no bucket at all is granted.
    pub fn is_empty(&self) -> bool {
        !self.any && self.buckets.is_empty()
    }

    /// The grant as listed (`"*"` first if present), for the service list.
    pub fn entries(&self) -> Vec<String> {
        self.any
            .then(|| "*".to_string())
            .into_iter()
            .chain(self.buckets.iter().cloned())
            .collect()
    }
}

/// The bytes every entry counts against its bucket's quota besides its key
/// and value: what a store spends to keep one (measured on the embedded
/// store: 68,652 small entries took 5.7 MB on disk for 952 KB of keys and
/// values, about 70 bytes each).
pub const ENTRY_OVERHEAD: u64 = 64;

/// The sizes one service's key-value use is bounded by.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyValueLimits {
    /// Longest key, in bytes.
    pub key_size: u64,
    /// Largest value, in bytes.
    pub value_size: u64,
    /// Most bytes (keys, values and [`ENTRY_OVERHEAD`] per entry) a bucket
    /// may hold: the host's default, the same for every writer.
    pub bucket_quota: u64,
    /// Quotas of single buckets, over `bucket_quota` (the host's).
    pub bucket_quotas: Arc<BTreeMap<String, u64>>,
    /// Most distinct buckets the service may open.
    pub max_buckets: u32,
}

impl KeyValueLimits {
    /// The quota of `bucket`: its own if the host set one, else the
    /// default. Never the writer's: every service writing to a bucket is
    /// held to the same number.
    pub fn quota_of(&self, bucket: &str) -> u64 {
        self.bucket_quotas
            .get(bucket)
            .copied()
            .unwrap_or(self.bucket_quota)
    }
}

/// What one deployed service may do with the host's key-value backend.
pub struct KeyValueAccess {
    backend: Store,
    grant: KeyValueGrant,
    limits: KeyValueLimits,
    metrics: Arc<KeyValueMetrics>,
    /// The buckets this deployment has opened: at most
    /// `limits.max_buckets`, so `buckets = ["*"]` cannot mean unlimited
    /// buckets (each with its own quota).
    opened: std::sync::Mutex<BTreeSet<String>>,
    /// The service, for the lines that explain a refusal.
    service: Arc<str>,
    /// Buckets whose refusal has been logged (once each per deployment).
    refusals_logged: std::sync::Mutex<BTreeSet<String>>,
}

impl KeyValueAccess {
    /// Access for `service` to `backend` within `grant` and `limits`,
    /// counted in `metrics`.
    pub fn new(
        service: Arc<str>,
        backend: Store,
        grant: KeyValueGrant,
        limits: KeyValueLimits,
        metrics: Arc<KeyValueMetrics>,
    ) -> KeyValueAccess {
        KeyValueAccess {
            backend,
            grant,
            limits,
            metrics,
            opened: std::sync::Mutex::new(BTreeSet::new()),
            service,
            refusals_logged: std::sync::Mutex::new(BTreeSet::new()),
        }
    }

    /// Logs, once per bucket, that `bucket` is not granted and how to grant
    /// it: the guest only gets `access-denied`, which says nothing of why.
    fn explain_refusal(&self, bucket: &str) {
        let first = self
            .refusals_logged
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(bucket.to_string());
        if first {
            tracing::warn!(
                service = %self.service,
                bucket,
                "bucket {bucket:?} is not granted to service {0}: add it to buckets under [keyvalue] in {0}.toml",
                self.service
            );
        }
    }

    /// Counts `bucket` among the opened ones, unless that would pass the
    /// most the service may open.
    fn note_opened(&self, bucket: &str) -> Result<(), Refusal> {
        let mut opened = self.opened.lock().unwrap_or_else(|e| e.into_inner());
        if opened.contains(bucket) {
            return Ok(());
        }
        let most = self.limits.max_buckets as usize;
        if opened.len() >= most {
            return Err(Refusal::Other(format!(
                "this service has opened {most} buckets, the most this host lets one service open ([limits] kv_max_buckets in wharf.toml)"
            )));
        }
        opened.insert(bucket.to_string());
        Ok(())
    }
}

/// The key-value state of one request's store.
pub struct KeyValueCtx {
    /// `None`: the host has no backend, so nothing can be opened.
    access: Option<Arc<KeyValueAccess>>,
    /// Every operation ends by then.
    deadline: Instant,
}

impl KeyValueCtx {
    /// The context of a request that must end by `deadline`.
    pub fn new(access: Option<Arc<KeyValueAccess>>, deadline: Instant) -> KeyValueCtx {
        KeyValueCtx { access, deadline }
    }

    /// Hands the context to the next request of a reused instance.
    pub fn begin_request(&mut self, deadline: Instant) {
        self.deadline = deadline;
    }
}

/// An open bucket, as a guest holds it.
pub struct BucketHandle {
    name: String,
}

/// A value read for a later compare-and-swap (`draft2`).
pub struct CasHandle {
    bucket: String,
    key: String,
    current: Option<Vec<u8>>,
    version: CasVersion,
}

/// The key-value context and resource table of one store, which the host
/// functions work on.
pub struct KeyValueView<'a> {
    /// The request's key-value context.
    pub ctx: &'a mut KeyValueCtx,
    /// The store's resources (buckets and compare-and-swap handles live here).
    pub table: &'a mut ResourceTable,
}

/// Marks [`KeyValueView`] as the data the generated bindings work on.
pub struct KeyValue;

impl HasData for KeyValue {
    type Data<'a> = KeyValueView<'a>;
}

/// Adds both `wasi:keyvalue` versions to `linker`, reaching each store's
/// key-value context through `get`.
pub fn add_to_linker<T: Send + 'static>(
    linker: &mut Linker<T>,
    get: fn(&mut T) -> KeyValueView<'_>,
) -> wasmtime::Result<()> {
    bindings::add_to_linker(linker, get)
}

/// What a failed operation tells the guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// The bucket name is not one any store can have.
    NoSuchStore,
    /// The manifest does not grant the bucket (or there is no backend).
    AccessDenied,
    /// Anything else, described.
    Other(String),
}

/// Runs one backend operation within the request's `deadline`, counting it
/// (never logging keys or values).
async fn run<T>(
    (access, deadline): (Arc<KeyValueAccess>, Instant),
    op: KeyValueOp,
    work: impl Future<Output = Result<T, BackendError>>,
) -> Result<T, Refusal> {
    let started = Instant::now();
    let result = match tokio::time::timeout_at(deadline.into(), work).await {
        Ok(result) => result,
        Err(_) => Err(BackendError::Unavailable(
            "the request's time limit passed before the key-value backend answered".into(),
        )),
    };
    access
        .metrics
        .observe(op, result.is_ok(), started.elapsed());
    result.map_err(|err| Refusal::Other(err.to_string()))
}

impl<'a> KeyValueView<'a> {
    fn access(&self) -> Result<&Arc<KeyValueAccess>, Refusal> {
        self.ctx.access.as_ref().ok_or(Refusal::AccessDenied)
    }

    /// Opens `name` if the grant allows it. The empty name, which
    /// `wasmtime serve -Skeyvalue` and wasmCloud's examples open, is the
    /// bucket [`DEFAULT_BUCKET`], granted like any other.
    pub(crate) fn open(&mut self, name: String) -> Result<BucketHandle, Refusal> {
        let name = if name.is_empty() {
            DEFAULT_BUCKET.to_string()
        } else {
            name
        };
        if validate_bucket_name(&name).is_err() {
            return Err(Refusal::NoSuchStore);
        }
        let access = self.access()?;
        if !access.grant.allows(&name) {
            access.explain_refusal(&name);
            return Err(Refusal::AccessDenied);
        }
        access.note_opened(&name)?;
        Ok(BucketHandle { name })
    }

    fn check_key(&self, key: &str) -> Result<(), Refusal> {
        let limit = self.access()?.limits.key_size;
        if key.is_empty() {
            return Err(Refusal::Other("keys may not be empty".into()));
        }
        if key.len() as u64 > limit {
            return Err(Refusal::Other(format!(
                "the key is {} bytes, over the limit of {limit}",
                key.len()
            )));
        }
        Ok(())
    }

    fn check_value(&self, value: &[u8]) -> Result<(), Refusal> {
        let limit = self.access()?.limits.value_size;
        if value.len() as u64 > limit {
            return Err(Refusal::Other(format!(
                "the value is {} bytes, over the limit of {limit}",
                value.len()
            )));
        }
        Ok(())
    }

    /// The access and deadline an operation runs with.
    fn session(&self) -> Result<(Arc<KeyValueAccess>, Instant), Refusal> {
        Ok((self.access()?.clone(), self.ctx.deadline))
    }

    fn bucket_name(
        &self,
        bucket: &wasmtime::component::Resource<BucketHandle>,
    ) -> Result<String, Refusal> {
        self.table
            .get(bucket)
            .map(|b| b.name.clone())
            .map_err(|err| Refusal::Other(format!("bad bucket handle: {err}")))
    }

    pub(crate) async fn get(
        &mut self,
        bucket: &wasmtime::component::Resource<BucketHandle>,
        key: String,
    ) -> Result<Option<Vec<u8>>, Refusal> {
        let name = self.bucket_name(bucket)?;
        self.check_key(&key)?;
        let session = self.session()?;
        let backend = session.0.backend.clone();
        run(
            session,
            KeyValueOp::Get,
            backend.get(KeyRef {
                bucket: &name,
                key: &key,
            }),
        )
        .await
    }

    pub(crate) async fn set(
        &mut self,
        bucket: &wasmtime::component::Resource<BucketHandle>,
        key: String,
        value: Vec<u8>,
    ) -> Result<(), Refusal> {
        let name = self.bucket_name(bucket)?;
        self.check_key(&key)?;
        self.check_value(&value)?;
        let session = self.session()?;
        let (backend, quota) = (session.0.backend.clone(), session.0.limits.quota_of(&name));
        run(
            session,
            KeyValueOp::Set,
            backend.set(
                KeyRef {
                    bucket: &name,
                    key: &key,
                },
                &value,
                quota,
            ),
        )
        .await
    }

    pub(crate) async fn delete(
        &mut self,
        bucket: &wasmtime::component::Resource<BucketHandle>,
        key: String,
    ) -> Result<(), Refusal> {
        let name = self.bucket_name(bucket)?;
        self.check_key(&key)?;
        let session = self.session()?;
        let backend = session.0.backend.clone();
        run(
            session,
            KeyValueOp::Delete,
            backend.delete(KeyRef {
                bucket: &name,
                key: &key,
            }),
        )
        .await
    }

    pub(crate) async fn exists(
        &mut self,
        bucket: &wasmtime::component::Resource<BucketHandle>,
        key: String,
    ) -> Result<bool, Refusal> {
        let name = self.bucket_name(bucket)?;
        self.check_key(&key)?;
        let session = self.session()?;
        let backend = session.0.backend.clone();
        run(
            session,
            KeyValueOp::Exists,
            backend.exists(KeyRef {
                bucket: &name,
                key: &key,
            }),
        )
        .await
    }

    pub(crate) async fn list_keys(
        &mut self,
        bucket: &wasmtime::component::Resource<BucketHandle>,
        cursor: KeyCursor,
    ) -> Result<KeyPage, Refusal> {
        let name = self.bucket_name(bucket)?;
        let session = self.session()?;
        let backend = session.0.backend.clone();
        run(
            session,
            KeyValueOp::ListKeys,
            backend.list_keys(&name, cursor, PAGE_SIZE),
        )
        .await
    }

    pub(crate) async fn increment(
        &mut self,
        bucket: &wasmtime::component::Resource<BucketHandle>,
        key: String,
        delta: i64,
    ) -> Result<i64, Refusal> {
        let name = self.bucket_name(bucket)?;
        self.check_key(&key)?;
        let session = self.session()?;
        let (backend, quota) = (session.0.backend.clone(), session.0.limits.quota_of(&name));
        run(
            session,
            KeyValueOp::Increment,
            backend.increment(
                KeyRef {
                    bucket: &name,
                    key: &key,
                },
                delta,
                quota,
            ),
        )
        .await
    }

    pub(crate) async fn read_for_swap(
        &mut self,
        bucket: &wasmtime::component::Resource<BucketHandle>,
        key: String,
    ) -> Result<CasHandle, Refusal> {
        let name = self.bucket_name(bucket)?;
        self.check_key(&key)?;
        let session = self.session()?;
        let backend = session.0.backend.clone();
        let (current, version) = run(
            session,
            KeyValueOp::CasRead,
            backend.read_versioned(KeyRef {
                bucket: &name,
                key: &key,
            }),
        )
        .await?;
        Ok(CasHandle {
            bucket: name,
            key,
            current,
            version,
        })
    }

    /// Swaps in `value` if `cas` still holds; `Ok(false)` if another write
    /// came first.
    pub(crate) async fn swap(&mut self, cas: &CasHandle, value: Vec<u8>) -> Result<bool, Refusal> {
        self.check_value(&value)?;
        let session = self.session()?;
        let (backend, quota) = (
            session.0.backend.clone(),
            session.0.limits.quota_of(&cas.bucket),
        );
        run(
            session,
            KeyValueOp::Swap,
            backend.swap(
                KeyRef {
                    bucket: &cas.bucket,
                    key: &cas.key,
                },
                &cas.version,
                &value,
                quota,
            ),
        )
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(max_buckets: u32) -> KeyValueLimits {
        KeyValueLimits {
            key_size: 64,
            value_size: 64,
            bucket_quota: 1000,
            bucket_quotas: Arc::new(BTreeMap::from([("carts".to_string(), 10)])),
            max_buckets,
        }
    }

    #[test]
    fn regression_a_buckets_quota_is_the_buckets_not_the_writers() {
        let limits = limits(4);
        assert_eq!(limits.quota_of("carts"), 10);
        assert_eq!(limits.quota_of("other"), 1000);
    }

    #[test]
    fn regression_a_wildcard_grant_opens_a_bounded_number_of_buckets() {
        let access = KeyValueAccess::new(
            Arc::from("svc"),
            Store::new(embedded::Embedded::open(None).unwrap()),
            KeyValueGrant::parse(&["*".into()]).unwrap(),
            limits(2),
            crate::base::metrics::Metrics::new().keyvalue("svc", "embedded"),
        );
        assert!(access.note_opened("a").is_ok());
        assert!(access.note_opened("b").is_ok());
        assert!(access.note_opened("a").is_ok(), "opening one again is free");
        let err = access.note_opened("c").unwrap_err();
        assert!(
            matches!(&err, Refusal::Other(why) if why.contains("kv_max_buckets")),
            "{err:?}"
        );
    }

    #[test]
    fn grants_and_bucket_names() {
        let grant = KeyValueGrant::parse(&["default".into(), "carts".into()]).unwrap();
        assert!(grant.allows("carts") && !grant.allows("other"));
        assert!(
            KeyValueGrant::parse(&["*".into()])
                .unwrap()
                .allows("anything")
        );
        assert!(KeyValueGrant::default().is_empty());
        assert!(
            KeyValueGrant::parse(&["a b".into()])
                .unwrap_err()
                .contains("bucket name")
        );
        assert!(validate_bucket_name(&"x".repeat(65)).is_err());
        assert!(validate_bucket_name("").is_err());
        assert_eq!(
            KeyValueGrant::parse(&["b".into(), "*".into(), "a".into()])
                .unwrap()
                .entries(),
            ["*", "a", "b"]
        );
    }
}
