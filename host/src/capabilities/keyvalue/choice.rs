//! Which key-value backend a host uses, as configured (`--kv`, or
//! `backend` under `[keyvalue]` in `wharf.toml`): the one place backends are
//! chosen and opened.

use std::sync::Arc;

use crate::capabilities::at_rest::Sealer;
use crate::capabilities::keyvalue::embedded::Embedded;
use crate::capabilities::keyvalue::nats::NatsKv;
use crate::capabilities::keyvalue::redis::RedisKv;
use crate::capabilities::keyvalue::sealed::Sealed;
use crate::capabilities::keyvalue::store::KeyValueStore;
use crate::capabilities::keyvalue::store::Store;
use crate::capabilities::nats::Replicas;
use crate::capabilities::tls::BackendTls;

/// Which backend a host uses, as configured (`--kv`, or `backend` under
/// `[keyvalue]` in `wharf.toml`).
#[derive(Clone, Default, PartialEq, Eq)]
pub enum KeyValueChoice {
    /// SQLite in the data directory (in memory without one).
    #[default]
    Embedded,
    /// A Redis server: `redis://[:password@]host:port[/db]` (or `rediss://`).
    Redis(String),
    /// NATS JetStream: `nats://host:port[,nats://…]`.
    Nats(String),
}

/// Shows the address without its credentials.
impl std::fmt::Debug for KeyValueChoice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            KeyValueChoice::Embedded => f.write_str("Embedded"),
            KeyValueChoice::Redis(url) => write!(f, "Redis({:?})", crate::base::redact::url(url)),
            KeyValueChoice::Nats(url) => write!(f, "Nats({:?})", crate::base::redact::url(url)),
        }
    }
}

impl std::str::FromStr for KeyValueChoice {
    type Err = String;

    fn from_str(text: &str) -> Result<KeyValueChoice, String> {
        let text = text.trim();
        if text == "embedded" {
            Ok(KeyValueChoice::Embedded)
        } else if text.starts_with("redis://") || text.starts_with("rediss://") {
            Ok(KeyValueChoice::Redis(text.to_string()))
        } else if text.starts_with("nats://") || text.starts_with("tls://") {
            Ok(KeyValueChoice::Nats(text.to_string()))
        } else {
            Err(format!(
                "{text:?} is not a key-value backend: use \"embedded\", \"redis://HOST:PORT\" or \"nats://HOST:PORT\""
            ))
        }
    }
}

impl KeyValueChoice {
    /// Opens the chosen backend: the embedded store at `data_dir` (in memory
    /// without one); Redis and NATS connect in the background, so a server
    /// that is down now does not stop the host from starting. `replicas`
    /// is how many NATS servers keep each bucket; `tls` secures the
    /// connection, `nats_credentials` (a NATS credentials file's text)
    /// authenticates to NATS; with a `sealer`, values are encrypted before
    /// the backend stores them.
    pub async fn open(
        &self,
        data_dir: Option<&std::path::Path>,
        max_value_size: u64,
        replicas: Replicas,
        tls: &BackendTls,
        nats_credentials: Option<&str>,
        sealer: Option<Arc<Sealer>>,
    ) -> anyhow::Result<Store> {
        Ok(match self {
            KeyValueChoice::Embedded => {
                let path = data_dir.map(|dir| dir.join("keyvalue.sqlite3"));
                let store =
                    tokio::task::spawn_blocking(move || Embedded::open(path.as_deref())).await??;
                store_of(store, sealer)
            }
            KeyValueChoice::Redis(url) => store_of(RedisKv::connect(url, tls)?, sealer),
            KeyValueChoice::Nats(url) => store_of(
                NatsKv::connect(url, max_value_size, replicas, tls, nats_credentials).await?,
                sealer,
            ),
        })
    }
}

/// `backend` as a [`Store`], sealing its values if there is a `sealer`.
fn store_of(backend: impl KeyValueStore, sealer: Option<Arc<Sealer>>) -> Store {
    match sealer {
        Some(sealer) => Store::new(Sealed::new(backend, sealer)),
        None => Store::new(backend),
    }
}
