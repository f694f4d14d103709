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

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use anyhow::{Context as _, Result, anyhow, bail};
use async_nats::jetstream::{self, kv, object_store};
use bytes::Bytes;
use futures_util::StreamExt as _;
use serde::{Deserialize, Serialize};
use tokio::io::AsyncReadExt as _;

use crate::capabilities::nats::{KeyValueSpec, NatsConnection};
use crate::deploy::deployer::Deployer;
use crate::deploy::deployment::{ServiceSpec, digest_of, validate_name};
use crate::deploy::source::{MAX_COMPONENT_FILE, remove_service};
use crate::deploy::upload::{self, Staged, StagingFile};

/// How long a host's heartbeat entry lives without being renewed.
pub const HOST_TTL: Duration = Duration::from_secs(15);
/// How often a host renews its heartbeat.
const HEARTBEAT_EVERY: Duration = Duration::from_secs(2);
/// How often local changes are checked against the index even without a
/// registry change (to retry publishes that failed while NATS was down).
const RECHECK_EVERY: Duration = Duration::from_secs(5);
/// How long a claimed schedule tick is remembered.
const TICK_MEMORY: Duration = Duration::from_secs(3600);
/// Longest manifest the index carries.
const MAX_MANIFEST: usize = 1 << 20;

/// How a host joins a cluster (`--cluster`, or `[cluster]` in `wharf.toml`).
#[derive(Clone, PartialEq, Eq)]
pub struct ClusterConfig {
    /// The NATS server(s): `nats://host:port[,nats://…]`.
    pub url: String,
    /// The cluster's name: clusters sharing a NATS server stay apart.
    pub name: String,
    /// A NATS credentials file, if the server needs one.
    pub credentials: Option<PathBuf>,
    /// This host's name in the cluster (default: the machine's host name
    /// and the process id).
    pub host_id: Option<String>,
}

/// Shows the address without its credentials.
impl std::fmt::Debug for ClusterConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterConfig")
            .field("url", &crate::base::redact::url(&self.url))
            .field("name", &self.name)
            .field("credentials", &self.credentials)
            .field("host_id", &self.host_id)
            .finish()
    }
}

impl ClusterConfig {
    /// A cluster named `default` on `url`.
    pub fn new(url: impl Into<String>) -> ClusterConfig {
        ClusterConfig {
            url: url.into(),
            name: "default".into(),
            credentials: None,
            host_id: None,
        }
    }

    /// Checks the name: it becomes part of JetStream bucket names.
    pub fn validate(&self) -> Result<(), String> {
        let valid = !self.name.is_empty()
            && self.name.len() <= 32
            && self
                .name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        if !valid {
            return Err(format!(
                "cluster name {:?}: use 1-32 letters, digits, '-' or '_'",
                self.name
            ));
        }
        if !self.url.starts_with("nats://") && !self.url.starts_with("tls://") {
            return Err(format!(
                "cluster URL {:?}: expected nats://HOST:PORT[,…]",
                self.url
            ));
        }
        Ok(())
    }
}

/// One service's version in the index.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
struct IndexEntry {
    digest: String,
    manifest: Option<String>,
    size: u64,
    published_by: String,
    published_ms: u64,
}

/// A host's heartbeat.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HostBeat {
    /// The host's name in the cluster.
    pub id: String,
    /// Where it serves (as it was told to advertise).
    pub address: String,
    /// Wharf's version.
    pub version: String,
    /// When this beat was sent (ms since the epoch).
    pub heartbeat_ms: u64,
    /// When the host started (ms since the epoch).
    pub started_ms: u64,
    /// Whether it has caught up with the index.
    pub caught_up: bool,
    /// Requests running on it now.
    pub in_flight: u64,
    /// What it serves: service → the cluster generation and digest.
    pub services: BTreeMap<String, ServedVersion>,
    /// The cluster's versions it could not deploy: service → why.
    #[serde(default)]
    pub failed: BTreeMap<String, FailedVersion>,
}

/// A cluster version one host could not deploy (it keeps what it had).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct FailedVersion {
    /// The index revision it could not deploy.
    pub generation: u64,
    /// Why: the deploy's error.
    pub reason: String,
}

/// The version of one service a host serves.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ServedVersion {
    /// The index revision of this version, if the host knows it.
    pub generation: Option<u64>,
    /// The component's digest.
    pub digest: String,
}

/// What this host knows of one service's version in the index.
#[derive(Debug, Clone)]
struct Synced {
    /// The index revision.
    revision: u64,
    digest: String,
    manifest: Option<String>,
    /// The local generation of the deployment seen when this was recorded:
    /// a deployment with another generation is a local change.
    local_generation: Option<u64>,
}

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

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Largest NATS credentials file read.
pub const MAX_CREDENTIALS_FILE: u64 = 64 << 10;

impl Cluster {
    /// Connects to the cluster's NATS (in the background: a host whose NATS
    /// is down still starts, and joins when it is up).
    pub async fn connect(config: ClusterConfig) -> Result<Arc<Cluster>> {
        config.validate().map_err(|why| anyhow!(why))?;
        let credentials = match &config.credentials {
            Some(path) => {
                let path = path.clone();
                Some(
                    tokio::task::spawn_blocking(move || {
                        crate::base::files::read_bounded_text(&path, MAX_CREDENTIALS_FILE)
                    })
                    .await
                    .context("reading NATS credentials")?
                    .map_err(|why| anyhow!(why))
                    .context("reading NATS credentials")?,
                )
            }
            None => None,
        };
        let connection = NatsConnection::shared(&config.url, credentials.as_deref())
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
                    .jetstream
                    .create_object_store(object_store::Config {
                        bucket: bucket("components"),
                        storage: jetstream::stream::StorageType::File,
                        ..Default::default()
                    })
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
            ..KeyValueSpec::default()
        };
        self.connection
            .key_value(&bucket, spec)
            .await
            .map_err(|why| anyhow!(why))
    }

    /// Starts keeping `dir` and the index together, and the heartbeat.
    pub(crate) fn start(self: &Arc<Self>, deployer: Arc<Deployer>, dir: PathBuf) {
        let cluster = self.clone();
        let sync_deployer = deployer.clone();
        tokio::spawn(async move {
            loop {
                if let Err(err) = cluster.sync(&sync_deployer, &dir).await {
                    if cluster.caught_up.swap(false, Ordering::AcqRel) {
                        tracing::warn!(cluster = %cluster.config.name, "lost the cluster index ({err:#}); serving the versions this host has, and catching up when NATS is back");
                    } else {
                        tracing::debug!("cluster sync: {err:#}");
                    }
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        });
        let cluster = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(HEARTBEAT_EVERY);
            loop {
                tick.tick().await;
                if let Err(err) = cluster.heartbeat(&deployer).await {
                    tracing::debug!("cluster heartbeat: {err:#}");
                }
            }
        });
    }

    /// One session with the index: the catch-up pass, then following its
    /// changes and the local ones until something fails.
    async fn sync(&self, deployer: &Arc<Deployer>, dir: &Path) -> Result<()> {
        let stores = self.stores().await?;
        // Watch first, so nothing published during the catch-up is missed.
        let mut updates = stores
            .index
            .watch_all()
            .await
            .context("watching the index")?;
        let mut keys = stores.index.keys().await.context("listing the index")?;
        let mut names = Vec::new();
        while let Some(key) = keys.next().await {
            names.push(key.context("listing the index")?);
        }
        for name in &names {
            if let Some(entry) = stores.index.entry(name.as_str()).await? {
                self.apply(deployer, dir, stores, entry).await;
            }
        }
        // Local services the index does not list: deleted in the cluster
        // while this host was away (a tombstone), or new.
        let local: Vec<String> = deployer
            .registry()
            .snapshot()
            .services()
            .map(|d| d.name().to_string())
            .filter(|name| !names.contains(name))
            .collect();
        for name in local {
            match stores.index.entry(name.as_str()).await? {
                Some(entry) if entry.operation != kv::Operation::Put => {
                    self.apply(deployer, dir, stores, entry).await;
                }
                _ => {}
            }
        }
        self.publish_local(deployer, dir, stores).await?;
        self.joined.store(true, Ordering::Release);
        if !self.caught_up.swap(true, Ordering::AcqRel) {
            tracing::info!(cluster = %self.config.name, host = %self.host_id, services = names.len(), "caught up with the cluster index");
        }
        let mut changes = deployer.registry().watch_changes();
        let mut recheck = tokio::time::interval(RECHECK_EVERY);
        loop {
            tokio::select! {
                update = updates.next() => match update {
                    Some(Ok(entry)) => self.apply(deployer, dir, stores, entry).await,
                    Some(Err(err)) => bail!("watching the index: {err}"),
                    None => bail!("the index watch ended"),
                },
                changed = changes.changed() => {
                    if changed.is_err() {
                        return Ok(());
                    }
                    self.publish_local(deployer, dir, stores).await?;
                }
                _ = recheck.tick() => self.publish_local(deployer, dir, stores).await?,
            }
        }
    }

    /// Applies one index entry to this host.
    async fn apply(&self, deployer: &Arc<Deployer>, dir: &Path, stores: &Stores, entry: kv::Entry) {
        let name = entry.key.clone();
        if validate_name(&name).is_err() {
            tracing::warn!(service = %name, "ignoring an index entry that is not a service name");
            return;
        }
        let known = self.synced_of(&name);
        if known.as_ref().is_some_and(|s| s.revision >= entry.revision) {
            return;
        }
        let current = deployer.registry().snapshot().service(&name).cloned();
        if entry.operation != kv::Operation::Put {
            self.forget(&name);
            self.set_failure(&name, None);
            if current.is_some() {
                tracing::info!(service = %name, generation = entry.revision, "removed in the cluster");
                let _turn = deployer.lock_files(&name).await;
                let (dir, owned) = (dir.to_path_buf(), name.clone());
                match tokio::task::spawn_blocking(move || remove_service(&dir, &owned)).await {
                    Ok(Ok(_)) => {}
                    Ok(Err(err)) => {
                        tracing::warn!(service = %name, "cannot remove its files: {err:#}")
                    }
                    Err(err) => tracing::warn!(service = %name, "cannot remove its files: {err}"),
                }
                deployer.undeploy(&name, "removed in the cluster");
            }
            return;
        }
        let version: IndexEntry = match serde_json::from_slice(&entry.value) {
            Ok(version) => version,
            Err(err) => {
                tracing::warn!(service = %name, "ignoring an index entry that cannot be read: {err}");
                return;
            }
        };
        if let Some(current) = &current
            && current.digest() == version.digest
            && current.manifest() == version.manifest.as_deref()
        {
            self.set_failure(&name, None);
            self.record(&name, entry.revision, &version, Some(current.generation()));
            return;
        }
        // Recorded before installing, so the deploy it causes is not taken
        // for a local change; the current generation marks what was here.
        self.record(
            &name,
            entry.revision,
            &version,
            current.as_ref().map(|d| d.generation()),
        );
        match self.install(deployer, dir, stores, &name, &version).await {
            Ok(()) => {
                self.set_failure(&name, None);
                tracing::info!(service = %name, generation = entry.revision, digest = %version.digest, published_by = %version.published_by, "deployed from the cluster")
            }
            Err(err) => {
                let reason = format!("{err:#}");
                tracing::warn!(service = %name, generation = entry.revision, "cannot deploy the cluster's version; keeping the one this host has: {reason}");
                self.set_failure(
                    &name,
                    Some(FailedVersion {
                        generation: entry.revision,
                        reason,
                    }),
                );
            }
        }
    }

    /// Fetches `version`'s component and puts it in place as `name`.
    async fn install(
        &self,
        deployer: &Arc<Deployer>,
        dir: &Path,
        stores: &Stores,
        name: &str,
        version: &IndexEntry,
    ) -> Result<()> {
        let mut object = stores
            .objects
            .get(version.digest.as_str())
            .await
            .with_context(|| format!("fetching component {}", version.digest))?;
        let mut wasm = Vec::with_capacity(version.size.min(MAX_COMPONENT_FILE) as usize);
        (&mut object)
            .take(MAX_COMPONENT_FILE + 1)
            .read_to_end(&mut wasm)
            .await
            .context("reading the component")?;
        if digest_of(&wasm) != version.digest {
            bail!(
                "the component fetched does not have digest {}",
                version.digest
            );
        }
        let wasm: Arc<[u8]> = Arc::from(wasm);
        let config = upload::service_config(deployer, name, version.manifest.as_deref())
            .await
            .map_err(|reason| anyhow!(reason))?;
        let spec = ServiceSpec {
            name: name.to_string(),
            config,
            wasm: wasm.clone(),
            source: Some(dir.join(format!("{name}.wasm"))),
            digest: Some(version.digest.clone()),
            manifest: version.manifest.as_deref().map(Arc::from),
        };
        let _turn = deployer.lock_files(name).await;
        let (staging_dir, owned, text) = (
            dir.to_path_buf(),
            name.to_string(),
            version.manifest.clone(),
        );
        let (component, manifest) = tokio::task::spawn_blocking(move || -> Result<_> {
            let stage = |what, limit, bytes: &[u8]| -> Result<Staged> {
                let mut file = StagingFile::create(&staging_dir, &owned, what, limit)?;
                file.write(bytes)?;
                file.finish()
            };
            let component = stage("component", MAX_COMPONENT_FILE, &wasm)?;
            let manifest = text
                .map(|text| stage("manifest", MAX_MANIFEST as u64, text.as_bytes()))
                .transpose()?;
            Ok((component, manifest))
        })
        .await??;
        upload::install(deployer, dir, spec, component, manifest).await?;
        Ok(())
    }

    /// Publishes every local change the index does not have yet.
    async fn publish_local(
        &self,
        deployer: &Arc<Deployer>,
        dir: &Path,
        stores: &Stores,
    ) -> Result<()> {
        let snapshot = deployer.registry().snapshot_full();
        for deployment in snapshot.services() {
            let name = deployment.name();
            let manifest = deployment.manifest().map(str::to_string);
            let known = self.synced_of(name);
            match &known {
                Some(s) if s.digest == deployment.digest() && s.manifest == manifest => {
                    if s.local_generation != Some(deployment.generation()) {
                        self.set_local_generation(name, deployment.generation());
                    }
                    continue;
                }
                // The cluster's version could not be installed here: what
                // runs is the old one, not a local change.
                Some(s) if s.local_generation == Some(deployment.generation()) => continue,
                _ => {}
            }
            if deployer.is_held(name) {
                continue;
            }
            self.publish(deployer, stores, dir, deployment, manifest, known)
                .await?;
        }
        // Services removed here that the index still has.
        let gone: Vec<(String, Synced)> = self
            .synced
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter(|(name, s)| s.local_generation.is_some() && snapshot.service(name).is_none())
            .map(|(name, s)| (name.clone(), s.clone()))
            .collect();
        for (name, _) in gone {
            if deployer.is_held(&name) {
                continue;
            }
            stores
                .index
                .delete(name.as_str())
                .await
                .with_context(|| format!("deleting {name} from the index"))?;
            tracing::info!(service = %name, "removal published to the cluster");
            self.forget(&name);
        }
        Ok(())
    }

    /// Publishes `deployment` as its service's next version, unless another
    /// host published first.
    async fn publish(
        &self,
        deployer: &Arc<Deployer>,
        stores: &Stores,
        dir: &Path,
        deployment: &crate::deploy::Deployment,
        manifest: Option<String>,
        known: Option<Synced>,
    ) -> Result<()> {
        let name = deployment.name().to_string();
        let path = deployment
            .source()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| dir.join(format!("{name}.wasm")));
        let wasm = match tokio::fs::read(&path).await {
            Ok(wasm) => wasm,
            // Changed or gone meanwhile: the registry will say what next.
            Err(_) => return Ok(()),
        };
        let digest = digest_of(&wasm);
        if digest != deployment.digest() {
            return Ok(());
        }
        if stores.objects.info(digest.as_str()).await.is_err() {
            stores
                .objects
                .put(digest.as_str(), &mut wasm.as_slice())
                .await
                .with_context(|| format!("uploading {name}'s component"))?;
        }
        let version = IndexEntry {
            digest: digest.clone(),
            manifest,
            size: wasm.len() as u64,
            published_by: self.host_id.clone(),
            published_ms: now_ms(),
        };
        let value = Bytes::from(serde_json::to_vec(&version)?);
        let published = match &known {
            Some(s) => stores
                .index
                .update(name.as_str(), value, s.revision)
                .await
                .map_err(|e| e.to_string()),
            None => stores
                .index
                .create(name.as_str(), value)
                .await
                .map_err(|e| e.to_string()),
        };
        match published {
            Ok(revision) => {
                tracing::info!(service = %name, generation = revision, digest = %digest, "published to the cluster");
                self.record(&name, revision, &version, Some(deployment.generation()));
            }
            Err(why) => {
                // Another host published first: its version comes through
                // the watch and replaces this one here too.
                tracing::info!(service = %name, "another host published {name} first; taking the cluster's version ({why})");
                if let Some(entry) = stores.index.entry(name.as_str()).await? {
                    // Forget what was known, so the winner is applied even
                    // if its revision was seen before.
                    self.forget(&name);
                    Box::pin(self.apply(deployer, dir, stores, entry)).await;
                }
            }
        }
        Ok(())
    }

    /// Renews this host's heartbeat.
    async fn heartbeat(&self, deployer: &Arc<Deployer>) -> Result<()> {
        let address = self
            .address
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let stores = self.stores().await?;
        let synced = self
            .synced
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let services = deployer
            .registry()
            .snapshot()
            .services()
            .map(|d| {
                let generation = synced
                    .get(d.name())
                    .filter(|s| s.digest == d.digest() && s.manifest.as_deref() == d.manifest())
                    .map(|s| s.revision);
                (
                    d.name().to_string(),
                    ServedVersion {
                        generation,
                        digest: d.digest().to_string(),
                    },
                )
            })
            .collect();
        let beat = HostBeat {
            id: self.host_id.clone(),
            address,
            version: env!("CARGO_PKG_VERSION").to_string(),
            heartbeat_ms: now_ms(),
            started_ms: self
                .started
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64),
            caught_up: self.is_caught_up(),
            failed: self
                .failed
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone(),
            in_flight: deployer
                .registry()
                .snapshot()
                .services()
                .map(|d| d.metrics().running())
                .sum(),
            services,
        };
        stores
            .hosts
            .put(
                self.host_id.as_str(),
                Bytes::from(serde_json::to_vec(&beat)?),
            )
            .await
            .context("renewing the heartbeat")?;
        Ok(())
    }

    /// Claims one schedule tick for this host: true for exactly one host
    /// of the cluster (none while NATS is unreachable: a tick is skipped
    /// rather than run twice).
    pub async fn claim_tick(&self, service: &str, trigger: usize, due_ms: u64) -> bool {
        let Ok(stores) = self.stores().await else {
            return false;
        };
        let key = format!("{service}.{trigger}.{due_ms}");
        stores
            .ticks
            .create(key.as_str(), Bytes::from(self.host_id.clone()))
            .await
            .is_ok()
    }

    /// The cluster as the admin endpoint shows it: every live host's
    /// heartbeat and, per service, the index's generation and digest.
    pub async fn view(&self) -> Result<ClusterView> {
        let stores = self.stores().await?;
        let mut hosts = Vec::new();
        let mut keys = stores.hosts.keys().await?;
        while let Some(key) = keys.next().await {
            let key = key?;
            if let Some(value) = stores.hosts.get(key.as_str()).await?
                && let Ok(beat) = serde_json::from_slice::<HostBeat>(&value)
            {
                hosts.push(beat);
            }
        }
        hosts.sort_by(|a, b| a.id.cmp(&b.id));
        let mut services = BTreeMap::new();
        let mut keys = stores.index.keys().await?;
        while let Some(key) = keys.next().await {
            let key = key?;
            if let Some(entry) = stores.index.entry(key.as_str()).await?
                && entry.operation == kv::Operation::Put
                && let Ok(version) = serde_json::from_slice::<IndexEntry>(&entry.value)
            {
                services.insert(
                    key,
                    ServedVersion {
                        generation: Some(entry.revision),
                        digest: version.digest,
                    },
                );
            }
        }
        let diverged = divergences(&hosts, &services);
        Ok(ClusterView {
            name: self.config.name.clone(),
            host: self.host_id.clone(),
            hosts,
            services,
            diverged,
        })
    }

    fn set_failure(&self, name: &str, failure: Option<FailedVersion>) {
        let mut failed = self.failed.lock().unwrap_or_else(|e| e.into_inner());
        match failure {
            Some(failure) => failed.insert(name.to_string(), failure),
            None => failed.remove(name),
        };
    }

    fn synced_of(&self, name: &str) -> Option<Synced> {
        self.synced
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(name)
            .cloned()
    }

    fn record(
        &self,
        name: &str,
        revision: u64,
        version: &IndexEntry,
        local_generation: Option<u64>,
    ) {
        self.synced
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(
                name.to_string(),
                Synced {
                    revision,
                    digest: version.digest.clone(),
                    manifest: version.manifest.clone(),
                    local_generation,
                },
            );
    }

    fn set_local_generation(&self, name: &str, generation: u64) {
        if let Some(s) = self
            .synced
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get_mut(name)
        {
            s.local_generation = Some(generation);
        }
    }

    fn forget(&self, name: &str) {
        self.synced
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(name);
    }
}

/// The cluster as one host sees it.
#[derive(Debug, Clone, Serialize)]
pub struct ClusterView {
    /// The cluster's name.
    pub name: String,
    /// The host answering.
    pub host: String,
    /// Every host with a live heartbeat.
    pub hosts: Vec<HostBeat>,
    /// The index: service → generation and digest.
    pub services: BTreeMap<String, ServedVersion>,
    /// Every host not serving a service at the index's generation: while it
    /// catches up (no reason), or because it could not deploy it.
    pub diverged: Vec<Divergence>,
}

/// One host serving another version of a service than the index has.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Divergence {
    /// The service.
    pub service: String,
    /// The host.
    pub host: String,
    /// The index's generation of the service.
    pub generation: u64,
    /// What the host serves instead, if anything.
    pub serving: Option<ServedVersion>,
    /// Why, if the host could not deploy the index's version.
    pub reason: Option<String>,
}

/// The hosts that do not serve each service at the index's generation.
fn divergences(hosts: &[HostBeat], index: &BTreeMap<String, ServedVersion>) -> Vec<Divergence> {
    let mut diverged = Vec::new();
    for (service, wanted) in index {
        let Some(generation) = wanted.generation else {
            continue;
        };
        for host in hosts {
            let serving = host.services.get(service);
            if serving.is_some_and(|s| s.generation == Some(generation)) {
                continue;
            }
            let reason = host
                .failed
                .get(service)
                .filter(|f| f.generation == generation)
                .map(|f| f.reason.clone());
            diverged.push(Divergence {
                service: service.clone(),
                host: host.id.clone(),
                generation,
                serving: serving.cloned(),
                reason,
            });
        }
    }
    diverged
}

/// `HOSTNAME-PID`: unique among the processes of a machine, readable.
pub(crate) fn default_host_id() -> String {
    let hostname = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|name| name.trim().to_string())
        .filter(|name| !name.is_empty())
        .unwrap_or_else(|| "host".into());
    let hostname: String = hostname
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '-'
            }
        })
        .collect();
    format!("{hostname}-{}", std::process::id())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cluster_names_and_urls_are_checked() {
        assert!(
            ClusterConfig::new("nats://cluster-nats.example")
                .validate()
                .is_ok()
        );
        let mut bad = ClusterConfig::new("nats://cluster-nats.example");
        bad.name = "a.b".into();
        assert!(bad.validate().is_err());
        assert!(ClusterConfig::new("http://x").validate().is_err());
    }

    #[test]
    fn host_ids_are_key_safe() {
        let id = default_host_id();
        assert!(
            id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-'),
            "{id}"
        );
    }
}
