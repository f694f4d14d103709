//! Encryption at rest around any key-value backend: values are sealed (see
//! [`at_rest`](crate::capabilities::at_rest)) before the backend stores
//! them and opened when read, so the backend — the embedded store's file,
//! Redis, NATS — holds no value in the clear. Keys (and bucket names) stay
//! readable: they are how values are found and listed.
//!
//! A backend cannot add to a number it cannot read, so increments become a
//! compare-and-swap loop on the sealed value; this host's concurrent
//! increments of one key are coalesced into one swap. Quotas count the sealed size
//! ([`SEAL_OVERHEAD`](crate::capabilities::at_rest::SEAL_OVERHEAD) more per
//! value).

use std::sync::Arc;
use std::time::Duration;

use crate::capabilities::BackendStatus;
use crate::capabilities::at_rest::Sealer;
use crate::capabilities::keyvalue::coalesce::IncrementQueues;
use crate::capabilities::keyvalue::store::{
    BackendError, BackendResult, KeyCursor, KeyPage, KeyRef, KeyValueStore, Resealed, add_checked,
    parse_counter,
};

/// Keys read per page while resealing a bucket.
const RESEAL_PAGE: usize = 100;
/// Keys named in a reseal's report of values that do not open.
const UNOPENED_SHOWN: usize = 10;

/// How many times an increment retries a swap another writer won.
const INCREMENT_ATTEMPTS: u32 = 64;

/// A backend whose values are sealed with `sealer`.
pub struct Sealed<S> {
    inner: Arc<S>,
    sealer: Arc<Sealer>,
    /// This host's increments of each key, waiting for the swap in flight.
    increments: Arc<IncrementQueues>,
}

impl<S: KeyValueStore> Sealed<S> {
    /// `inner`, storing only sealed values.
    pub fn new(inner: S, sealer: Arc<Sealer>) -> Sealed<S> {
        Sealed {
            inner: Arc::new(inner),
            sealer,
            increments: Arc::new(IncrementQueues::default()),
        }
    }

    fn seal(&self, at: KeyRef<'_>, value: &[u8]) -> BackendResult<Vec<u8>> {
        seal(&self.sealer, at, value)
    }

    fn open(&self, at: KeyRef<'_>, sealed: Option<Vec<u8>>) -> BackendResult<Option<Vec<u8>>> {
        open(&self.sealer, at, sealed)
    }
}

/// `value` sealed for `at`.
fn seal(sealer: &Sealer, at: KeyRef<'_>, value: &[u8]) -> BackendResult<Vec<u8>> {
    sealer
        .seal(&context(at), value)
        .map_err(BackendError::Other)
}

/// The value `sealed` holds, if it opens for `at`.
fn open(
    sealer: &Sealer,
    at: KeyRef<'_>,
    sealed: Option<Vec<u8>>,
) -> BackendResult<Option<Vec<u8>>> {
    sealed
        .map(|sealed| sealer.open(&context(at), &sealed))
        .transpose()
        .map_err(BackendError::Other)
}

/// One compare-and-swap adding all of `deltas` to the sealed counter at
/// `at`, retried while other hosts win the race; the value before them.
async fn swap_sealed_increments<S: KeyValueStore>(
    inner: &S,
    sealer: &Sealer,
    at: KeyRef<'_>,
    deltas: &[i64],
    quota: u64,
) -> BackendResult<i64> {
    for attempt in 0..INCREMENT_ATTEMPTS {
        let (sealed, version) = inner.read_versioned(at).await?;
        let current = match open(sealer, at, sealed)? {
            Some(value) => parse_counter(&value)?,
            None => 0,
        };
        let mut next = current;
        for delta in deltas {
            next = add_checked(next, *delta)?;
        }
        let sealed = seal(sealer, at, next.to_string().as_bytes())?;
        if inner.swap(at, &version, &sealed, quota).await? {
            return Ok(current);
        }
        // Another host won: back off a little, more each time.
        tokio::time::sleep(Duration::from_micros(100 * u64::from(attempt + 1))).await;
    }
    Err(BackendError::Other(format!(
        "the counter kept changing under {INCREMENT_ATTEMPTS} attempts to increment it"
    )))
}

/// What a value is bound to: its bucket and key.
fn context(at: KeyRef<'_>) -> Vec<u8> {
    let mut context = Vec::with_capacity(9 + at.bucket.len() + 1 + at.key.len());
    context.extend_from_slice(b"wharf-kv\0");
    context.extend_from_slice(at.bucket.as_bytes());
    context.push(0);
    context.extend_from_slice(at.key.as_bytes());
    context
}

impl<S: KeyValueStore> KeyValueStore for Sealed<S> {
    type Version = S::Version;

    fn kind(&self) -> &'static str {
        self.inner.kind()
    }

    fn status(&self) -> BackendStatus {
        let mut status = self.inner.status();
        status.detail = format!(
            "{}; values encrypted (key {})",
            status.detail,
            self.sealer.key_id()
        );
        status
    }

    async fn get(&self, at: KeyRef<'_>) -> BackendResult<Option<Vec<u8>>> {
        let sealed = self.inner.get(at).await?;
        self.open(at, sealed)
    }

    async fn set(&self, at: KeyRef<'_>, value: &[u8], quota: u64) -> BackendResult<()> {
        let sealed = self.seal(at, value)?;
        self.inner.set(at, &sealed, quota).await
    }

    async fn delete(&self, at: KeyRef<'_>) -> BackendResult<()> {
        self.inner.delete(at).await
    }

    async fn exists(&self, at: KeyRef<'_>) -> BackendResult<bool> {
        self.inner.exists(at).await
    }

    async fn list_keys(&self, bucket: &str, from: KeyCursor, max: usize) -> BackendResult<KeyPage> {
        self.inner.list_keys(bucket, from, max).await
    }

    /// A read, an open, a seal and a compare-and-swap (a backend cannot
    /// add to a number it cannot read); this host's concurrent increments
    /// of one key share one such swap.
    async fn increment(&self, at: KeyRef<'_>, delta: i64, quota: u64) -> BackendResult<i64> {
        let id = (at.bucket.to_string(), at.key.to_string());
        let (inner, sealer) = (self.inner.clone(), self.sealer.clone());
        let (bucket, key) = id.clone();
        self.increments
            .add(id, delta, move |deltas: Vec<i64>| {
                let (inner, sealer) = (inner.clone(), sealer.clone());
                let (bucket, key) = (bucket.clone(), key.clone());
                async move {
                    let at = KeyRef {
                        bucket: &bucket,
                        key: &key,
                    };
                    swap_sealed_increments(&*inner, &sealer, at, &deltas, quota).await
                }
            })
            .await
    }

    async fn read_versioned(
        &self,
        at: KeyRef<'_>,
    ) -> BackendResult<(Option<Vec<u8>>, Self::Version)> {
        let (sealed, version) = self.inner.read_versioned(at).await?;
        Ok((self.open(at, sealed)?, version))
    }

    async fn swap(
        &self,
        at: KeyRef<'_>,
        expected: &Self::Version,
        value: &[u8],
        quota: u64,
    ) -> BackendResult<bool> {
        let sealed = self.seal(at, value)?;
        self.inner.swap(at, expected, &sealed, quota).await
    }

    async fn reseal(&self, bucket: &str) -> BackendResult<Resealed> {
        let mut report = Resealed::default();
        let mut from = KeyCursor::Text(String::new());
        loop {
            let page = self.inner.list_keys(bucket, from, RESEAL_PAGE).await?;
            for key in &page.keys {
                report.keys += 1;
                let at = KeyRef { bucket, key };
                let (sealed, version) = self.inner.read_versioned(at).await?;
                let Some(sealed) = sealed else { continue };
                if self.sealer.is_current(&sealed) {
                    report.current += 1;
                    continue;
                }
                let Ok(Some(value)) = self.open(at, Some(sealed)) else {
                    report.unopened += 1;
                    if report.unopened_keys.len() < UNOPENED_SHOWN {
                        report.unopened_keys.push(key.clone());
                    }
                    continue;
                };
                let resealed = self.seal(at, &value)?;
                // The same size as before: no quota to pass (the largest
                // every backend stores as a number). A swap lost to a
                // concurrent write leaves that write, sealed with the
                // current key.
                if self
                    .inner
                    .swap(at, &version, &resealed, i64::MAX as u64)
                    .await?
                {
                    report.resealed += 1;
                } else {
                    report.current += 1;
                }
            }
            match page.next {
                Some(next) => from = next,
                None => return Ok(report),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::capabilities::at_rest::AtRestKeys;
    use crate::capabilities::keyvalue::embedded::Embedded;

    fn sealer(dir: &std::path::Path) -> Arc<Sealer> {
        let path = dir.join("k.key");
        std::fs::write(&path, "11".repeat(32)).unwrap();
        Arc::new(
            Sealer::load(&AtRestKeys {
                key: path,
                previous: Vec::new(),
            })
            .unwrap(),
        )
    }

    #[tokio::test]
    async fn values_are_sealed_in_the_backend_and_counters_still_count() {
        let dir = tempfile::tempdir().unwrap();
        let store = Sealed::new(Embedded::open(None).unwrap(), sealer(dir.path()));
        let at = KeyRef {
            bucket: "b",
            key: "k",
        };
        store.set(at, b"secret value", 1 << 20).await.unwrap();
        assert_eq!(store.get(at).await.unwrap().unwrap(), b"secret value");
        let raw = store.inner.get(at).await.unwrap().unwrap();
        assert!(
            !raw.windows(6).any(|w| w == b"secret"),
            "stored in the clear"
        );

        let counter = KeyRef {
            bucket: "b",
            key: "n",
        };
        let adds = (0..20).map(|_| store.increment(counter, 2, 1 << 20));
        let mut results: Vec<i64> = futures_util::future::join_all(adds)
            .await
            .into_iter()
            .map(Result::unwrap)
            .collect();
        // Each increment saw its own value: none was lost to a race.
        results.sort_unstable();
        assert_eq!(results, (1..=20).map(|n| n * 2).collect::<Vec<_>>());
        assert_eq!(store.get(counter).await.unwrap().unwrap(), b"40");
        store.set(at, b"text", 1 << 20).await.unwrap();
        assert!(matches!(
            store.increment(at, 1, 1 << 20).await,
            Err(BackendError::Invalid(_))
        ));
    }
}
