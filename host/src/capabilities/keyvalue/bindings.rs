//! The generated `wasi:keyvalue` bindings, one set per version, and their
//! host side: thin translations onto [`KeyValueView`]'s operations.

use wasmtime::component::{Linker, Resource};

use crate::capabilities::keyvalue::store::KeyCursor;
use crate::capabilities::keyvalue::{BucketHandle, CasHandle, KeyValue, KeyValueView, Refusal};

mod draft {
    wasmtime::component::bindgen!({
        path: "../wit/keyvalue-0.2.0-draft",
        world: "wasi:keyvalue/imports@0.2.0-draft",
        imports: { default: async | trappable },
        with: {
            "wasi:keyvalue/store.bucket": crate::capabilities::keyvalue::BucketHandle,
        },
    });
}

mod draft2 {
    wasmtime::component::bindgen!({
        path: "../wit/keyvalue-0.2.0-draft2",
        world: "wasi:keyvalue/imports@0.2.0-draft2",
        imports: { default: async | trappable },
        with: {
            "wasi:keyvalue/store.bucket": crate::capabilities::keyvalue::BucketHandle,
            "wasi:keyvalue/atomics.cas": crate::capabilities::keyvalue::CasHandle,
        },
    });
}

use draft::wasi::keyvalue as v1;
use draft2::wasi::keyvalue as v2;

/// Adds every interface of both versions to `linker`.
pub(super) fn add_to_linker<T: Send + 'static>(
    linker: &mut Linker<T>,
    get: fn(&mut T) -> KeyValueView<'_>,
) -> wasmtime::Result<()> {
    v1::store::add_to_linker::<T, KeyValue>(linker, get)?;
    v1::atomics::add_to_linker::<T, KeyValue>(linker, get)?;
    v1::batch::add_to_linker::<T, KeyValue>(linker, get)?;
    v2::store::add_to_linker::<T, KeyValue>(linker, get)?;
    v2::atomics::add_to_linker::<T, KeyValue>(linker, get)?;
    v2::batch::add_to_linker::<T, KeyValue>(linker, get)?;
    Ok(())
}

macro_rules! refusal_into {
    ($version:ident) => {
        impl From<Refusal> for $version::store::Error {
            fn from(refusal: Refusal) -> Self {
                match refusal {
                    Refusal::NoSuchStore => $version::store::Error::NoSuchStore,
                    Refusal::AccessDenied => $version::store::Error::AccessDenied,
                    Refusal::Other(why) => $version::store::Error::Other(why),
                }
            }
        }
    };
}

refusal_into!(v1);
refusal_into!(v2);

type Answer<T, E> = wasmtime::Result<Result<T, E>>;

/// The parts of the store and batch interfaces both versions share,
/// implemented once per version.
macro_rules! common {
    ($version:ident) => {
        impl $version::store::Host for KeyValueView<'_> {
            async fn open(
                &mut self,
                identifier: String,
            ) -> Answer<Resource<BucketHandle>, $version::store::Error> {
                match KeyValueView::open(self, identifier) {
                    Ok(bucket) => Ok(Ok(self.table.push(bucket)?)),
                    Err(refusal) => Ok(Err(refusal.into())),
                }
            }
        }

        impl $version::store::HostBucket for KeyValueView<'_> {
            async fn get(
                &mut self,
                bucket: Resource<BucketHandle>,
                key: String,
            ) -> Answer<Option<Vec<u8>>, $version::store::Error> {
                Ok(KeyValueView::get(self, &bucket, key)
                    .await
                    .map_err(Into::into))
            }

            async fn set(
                &mut self,
                bucket: Resource<BucketHandle>,
                key: String,
                value: Vec<u8>,
            ) -> Answer<(), $version::store::Error> {
                Ok(KeyValueView::set(self, &bucket, key, value)
                    .await
                    .map_err(Into::into))
            }

            async fn delete(
                &mut self,
                bucket: Resource<BucketHandle>,
                key: String,
            ) -> Answer<(), $version::store::Error> {
                Ok(KeyValueView::delete(self, &bucket, key)
                    .await
                    .map_err(Into::into))
            }

            async fn exists(
                &mut self,
                bucket: Resource<BucketHandle>,
                key: String,
            ) -> Answer<bool, $version::store::Error> {
                Ok(KeyValueView::exists(self, &bucket, key)
                    .await
                    .map_err(Into::into))
            }

            async fn list_keys(
                &mut self,
                bucket: Resource<BucketHandle>,
                cursor: Option<list_cursor!($version)>,
            ) -> Answer<$version::store::KeyResponse, $version::store::Error> {
                let cursor = to_cursor!($version)(cursor);
                Ok(KeyValueView::list_keys(self, &bucket, cursor)
                    .await
                    .map(|page| $version::store::KeyResponse {
                        keys: page.keys,
                        cursor: page.next.and_then(from_cursor!($version)),
                    })
                    .map_err(Into::into))
            }

            async fn drop(&mut self, bucket: Resource<BucketHandle>) -> wasmtime::Result<()> {
                self.table.delete(bucket)?;
                Ok(())
            }
        }

        impl $version::batch::Host for KeyValueView<'_> {
            async fn get_many(
                &mut self,
                bucket: Resource<BucketHandle>,
                keys: Vec<String>,
            ) -> Answer<Vec<Option<(String, Vec<u8>)>>, $version::store::Error> {
                let mut found = Vec::with_capacity(keys.len());
                for key in keys {
                    match KeyValueView::get(self, &bucket, key.clone()).await {
                        Ok(value) => found.push(value.map(|value| (key, value))),
                        Err(refusal) => return Ok(Err(refusal.into())),
                    }
                }
                Ok(Ok(found))
            }

            async fn set_many(
                &mut self,
                bucket: Resource<BucketHandle>,
                key_values: Vec<(String, Vec<u8>)>,
            ) -> Answer<(), $version::store::Error> {
                for (key, value) in key_values {
                    if let Err(refusal) = KeyValueView::set(self, &bucket, key, value).await {
                        return Ok(Err(refusal.into()));
                    }
                }
                Ok(Ok(()))
            }

            async fn delete_many(
                &mut self,
                bucket: Resource<BucketHandle>,
                keys: Vec<String>,
            ) -> Answer<(), $version::store::Error> {
                for key in keys {
                    if let Err(refusal) = KeyValueView::delete(self, &bucket, key).await {
                        return Ok(Err(refusal.into()));
                    }
                }
                Ok(Ok(()))
            }
        }
    };
}

/// The cursor type each version's `list-keys` takes.
macro_rules! list_cursor {
    (v1) => {
        u64
    };
    (v2) => {
        String
    };
}

/// The first page is `Number(0)` or `Text("")`, so the backend answers in
/// the kind of cursor the version carries.
macro_rules! to_cursor {
    (v1) => {
        |cursor: Option<u64>| KeyCursor::Number(cursor.unwrap_or(0))
    };
    (v2) => {
        |cursor: Option<String>| KeyCursor::Text(cursor.unwrap_or_default())
    };
}

/// Turns a backend's next-page cursor into the version's type. A text
/// cursor that a numeric version cannot carry (never: backends answer in
/// the kind they are asked) ends the listing.
macro_rules! from_cursor {
    (v1) => {
        |cursor| match cursor {
            KeyCursor::Number(n) => Some(n),
            KeyCursor::Text(text) => text.parse().ok(),
        }
    };
    (v2) => {
        |cursor| match cursor {
            KeyCursor::Number(n) => Some(n.to_string()),
            KeyCursor::Text(text) => Some(text),
        }
    };
}

common!(v1);
common!(v2);

impl v1::atomics::Host for KeyValueView<'_> {
    async fn increment(
        &mut self,
        bucket: Resource<BucketHandle>,
        key: String,
        delta: u64,
    ) -> Answer<u64, v1::store::Error> {
        let Ok(delta) = i64::try_from(delta) else {
            return Ok(Err(v1::store::Error::Other(
                "the increment is larger than a 64-bit signed integer".into(),
            )));
        };
        Ok(KeyValueView::increment(self, &bucket, key, delta)
            .await
            .and_then(|value| {
                u64::try_from(value)
                    .map_err(|_| Refusal::Other(format!("the counter is negative ({value})")))
            })
            .map_err(Into::into))
    }
}

impl v2::atomics::Host for KeyValueView<'_> {
    async fn increment(
        &mut self,
        bucket: Resource<BucketHandle>,
        key: String,
        delta: i64,
    ) -> Answer<i64, v2::store::Error> {
        Ok(KeyValueView::increment(self, &bucket, key, delta)
            .await
            .map_err(Into::into))
    }

    async fn swap(
        &mut self,
        cas: Resource<CasHandle>,
        value: Vec<u8>,
    ) -> Answer<(), v2::atomics::CasError> {
        let handle = self.table.delete(cas)?;
        match KeyValueView::swap(self, &handle, value).await {
            Ok(true) => Ok(Ok(())),
            Ok(false) => {
                // Another write came first: a fresh handle on what is there
                // now, to try again with.
                let bucket = self.table.push(BucketHandle {
                    name: handle.bucket.clone(),
                })?;
                let fresh = KeyValueView::read_for_swap(self, &bucket, handle.key.clone()).await;
                self.table.delete(bucket)?;
                match fresh {
                    Ok(fresh) => Ok(Err(v2::atomics::CasError::CasFailed(
                        self.table.push(fresh)?,
                    ))),
                    Err(refusal) => Ok(Err(v2::atomics::CasError::StoreError(refusal.into()))),
                }
            }
            Err(refusal) => Ok(Err(v2::atomics::CasError::StoreError(refusal.into()))),
        }
    }
}

impl v2::atomics::HostCas for KeyValueView<'_> {
    async fn new(
        &mut self,
        bucket: Resource<BucketHandle>,
        key: String,
    ) -> Answer<Resource<CasHandle>, v2::store::Error> {
        match KeyValueView::read_for_swap(self, &bucket, key).await {
            Ok(handle) => Ok(Ok(self.table.push(handle)?)),
            Err(refusal) => Ok(Err(refusal.into())),
        }
    }

    async fn current(
        &mut self,
        cas: Resource<CasHandle>,
    ) -> Answer<Option<Vec<u8>>, v2::store::Error> {
        Ok(Ok(self.table.get(&cas)?.current.clone()))
    }

    async fn drop(&mut self, cas: Resource<CasHandle>) -> wasmtime::Result<()> {
        self.table.delete(cas)?;
        Ok(())
    }
}
