//! Many hosts as one cluster on NATS JetStream: every host runs every
//! service, and the cluster's services live in JetStream.
//!
//! - **The index** (key-value bucket `wharf_CLUSTER_index`): one key per
//!   service, its value the service's current version — the component's
//!   digest and the manifest's text. The key's revision is the cluster-wide
//!   generation: monotonic, assigned by JetStream.
//! - **The components** (object store `wharf_CLUSTER_components`), named by
//!   digest, so a version is uploaded once whichever host publishes it.
//! - **The hosts** (bucket `wharf_CLUSTER_hosts`, entries expiring after
//!   [`HOST_TTL`]): each host's heartbeat — address, version, and what it
//!   serves.
//! - **Schedule ticks** (bucket `wharf_CLUSTER_ticks`): a host runs a tick
//!   only if it is the first to create the tick's key, so each tick runs on
//!   exactly one host.
//!
//! On one host the services directory is the truth; in a cluster the index
//! is, and each host's directory is its copy. The sync keeps the two
//! together through the ordinary deploy path (files written
//! all-or-nothing, then deployed with the usual zero-downtime swap):
//!
//! - a version published to the index is fetched and installed on every
//!   host (a host that cannot load it keeps its previous version, and its
//!   heartbeat shows the divergence);
//! - a local change — a file dropped into a host's directory, an admin
//!   `PUT` or `DELETE` — is published to the index as a compare-and-set on
//!   the revision this host last knew: of two hosts publishing at once, one
//!   wins, and the other installs the winner, so every host ends on the
//!   same digest;
//! - a host joining (or rejoining after an outage) makes its directory
//!   match the index before it says it is ready: versions the index has
//!   replace local ones, services the index deleted are deleted, and local
//!   services the index never had are published.
//!
//! While NATS is unreachable a host keeps serving what it has (its files
//! and compiled-code cache are local); local changes are published, and the
//! index's applied, when it is back.
//!
//! The module's files, one job each (how a host joins is
//! [`cluster_config`](crate::deploy::source::cluster_config), beside it):
//! `index` (following the index and publishing to it), `components` (the
//! object store of component bytes), `heartbeats` (each host's beat and
//! the cluster's view), `records` (what is kept in JetStream) and `ticks`
//! (schedule ticks, each claimed by one host).

mod components;
mod heartbeats;
mod index;
mod records;
mod ticks;

pub(crate) use crate::deploy::source::cluster_config::default_host_id;
pub use crate::deploy::source::cluster_config::{ClusterConfig, MAX_CREDENTIALS_FILE};
pub use heartbeats::{ClusterView, Divergence};
pub use records::{FailedVersion, HostBeat, ServedVersion};

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use anyhow::{Context as _, Result, anyhow};
use async_nats::jetstream::{self, kv, object_store};

use crate::capabilities::nats::{KeyValueSpec, NatsConnection};
use crate::deploy::install::deployer::Deployer;
use records::Synced;

/// How long creating the cluster's stores waits for NATS before it fails
/// (and is tried again on the next sync).
const CONNECT_WAIT: Duration = Duration::from_secs(5);

/// How long a host's heartbeat entry lives without being renewed.
pub const HOST_TTL: Duration = Duration::from_secs(15);
/// How long a claimed schedule tick is remembered.
const TICK_MEMORY: Duration = Duration::from_secs(3600);

/// The JetStream buckets of one cluster.
struct Stores {
    index: kv::Store,
    hosts: kv::Store,
    ticks: kv::Store,
    objects: object_store::ObjectStore,
}

/// This host's membership of a cluster.
pub struct Cluster {
    config: ClusterConfig,
    host_id: String,
    /// The shared connection to the cluster's NATS.
    connection: Arc<NatsConnection>,
    jetstream: jetstream::Context,
    stores: tokio::sync::OnceCell<Stores>,
    synced: Mutex<HashMap<String, Synced>>,
    /// The cluster's versions this host could not deploy, for the heartbeat.
    failed: Mutex<BTreeMap<String, FailedVersion>>,
    caught_up: AtomicBool,
    /// Whether it has caught up once since it started: what readiness
    /// waits for. Losing NATS later does not make a host unready — it
    /// keeps serving what it has, and a load balancer should keep it.
    joined: AtomicBool,
    started: SystemTime,
    /// Where this host serves, for the heartbeat.
    address: Mutex<String>,
}

/// Now, in milliseconds since the epoch (as the index and beats keep it).
fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl Cluster {
    /// Connects to the cluster's NATS (in the background: a host whose NATS
    /// is down still starts, and joins when it is up).
    pub async fn connect(config: ClusterConfig) -> Result<Arc<Cluster>> {
        config.validate().map_err(|why| anyhow!(why))?;
        let credentials = match &config.credentials {
            Some(path) => Some(crate::capabilities::read_credentials(path).await?),
            None => None,
        };
        let connection = NatsConnection::shared(&config.url, credentials.as_deref(), &config.tls)
            .await
            .context("joining the cluster")?;
        let host_id = config.host_id.clone().unwrap_or_else(default_host_id);
        Ok(Arc::new(Cluster {
            host_id,
            jetstream: connection.jetstream().clone(),
            connection,
            stores: tokio::sync::OnceCell::new(),
            synced: Mutex::new(HashMap::new()),
            failed: Mutex::new(BTreeMap::new()),
            caught_up: AtomicBool::new(false),
            joined: AtomicBool::new(false),
            started: SystemTime::now(),
            address: Mutex::new(String::new()),
            config,
        }))
    }

    /// Sets the address the heartbeat advertises.
    pub fn advertise(&self, address: &str) {
        *self.address.lock().unwrap_or_else(|e| e.into_inner()) = address.to_string();
    }

    /// This host's name in the cluster.
    pub fn host_id(&self) -> &str {
        &self.host_id
    }

    /// The cluster's name.
    pub fn name(&self) -> &str {
        &self.config.name
    }

    /// Whether this host has made its services match the index since it
    /// (re)connected, and follows it now.
    pub fn is_caught_up(&self) -> bool {
        self.caught_up.load(Ordering::Acquire)
    }

    /// Whether this host has caught up with the index at least once since
    /// it started (until then it is not ready).
    pub fn has_joined(&self) -> bool {
        self.joined.load(Ordering::Acquire)
    }

    async fn stores(&self) -> Result<&Stores> {
        self.stores
            .get_or_try_init(|| async {
                // How many copies "auto" means depends on the servers the
                // connected one reports.
                self.connection
                    .connected(CONNECT_WAIT)
                    .await
                    .map_err(|why| anyhow!(why))?;
                let name = &self.config.name;
                let bucket = |what: &str| format!("wharf_{name}_{what}");
                let index = self
                    .key_value(bucket("index"), 5, Duration::ZERO)
                    .await
                    .context("creating the cluster index")?;
                let hosts = self
                    .key_value(bucket("hosts"), 1, HOST_TTL)
                    .await
                    .context("creating the cluster's host list")?;
                let ticks = self
                    .key_value(bucket("ticks"), 1, TICK_MEMORY)
                    .await
                    .context("creating the cluster's schedule ticks")?;
                let objects = self
                    .object_store(bucket("components"))
                    .await
                    .context("creating the cluster's component store")?;
                Ok::<Stores, anyhow::Error>(Stores {
                    index,
                    hosts,
                    ticks,
                    objects,
                })
            })
            .await
    }

    /// The key-value bucket `bucket`, created if missing.
    async fn key_value(
        &self,
        bucket: String,
        history: i64,
        max_age: Duration,
    ) -> Result<kv::Store> {
        let spec = KeyValueSpec {
            history,
            max_age,
            replicas: self.connection.replicas(self.config.replicas),
            ..KeyValueSpec::default()
        };
        self.connection
            .key_value(&bucket, spec)
            .await
            .map_err(|why| anyhow!(why))
    }

    /// The object store `bucket`, created if missing, keeping as many copies
    /// as configured (an existing one is raised to that).
    async fn object_store(&self, bucket: String) -> Result<object_store::ObjectStore> {
        let replicas = self.connection.replicas(self.config.replicas);
        // Created (or an existing one raised to `replicas` copies) as the
        // stream an object store is, as JetStream's object store layer
        // defines it, but with direct reads (answered by any copy, even one
        // still catching up, to which a component another host just
        // published is "not found") only when there is one copy.
        self.connection
            .stream(jetstream::stream::Config {
                name: format!("OBJ_{bucket}"),
                subjects: vec![format!("$O.{bucket}.C.>"), format!("$O.{bucket}.M.>")],
                max_bytes: -1,
                storage: jetstream::stream::StorageType::File,
                num_replicas: replicas,
                discard: jetstream::stream::DiscardPolicy::New,
                allow_rollup: true,
                allow_direct: replicas == 1,
                ..Default::default()
            })
            .await
            .map_err(|why| anyhow!(why))?;
        Ok(self.jetstream.get_object_store(&bucket).await?)
    }

    /// Starts keeping `dir` and the index together, and the heartbeat.
    pub(crate) fn start(self: &Arc<Self>, deployer: Arc<Deployer>, dir: PathBuf) {
        self.clone().follow_index(deployer.clone(), dir);
        self.clone().beat(deployer);
    }
}
