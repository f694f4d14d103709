//! Each host's heartbeat (its address, version and what it serves,
//! renewed every few seconds, expiring after [`HOST_TTL`](super::HOST_TTL))
//! and the cluster as the admin endpoint shows it: the hosts, the index,
//! and every host not serving the index's version.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::{Context as _, Result};
use async_nats::jetstream::kv;
use bytes::Bytes;
use futures_util::StreamExt as _;
use serde::Serialize;

use super::records::{FailedVersion, HostBeat, IndexEntry, ServedVersion};
use super::{Cluster, now_ms};
use crate::deploy::install::deployer::Deployer;

/// How often a host renews its heartbeat.
const HEARTBEAT_EVERY: Duration = Duration::from_secs(2);

impl Cluster {
    /// Renews this host's heartbeat every [`HEARTBEAT_EVERY`] for as long
    /// as the host runs.
    pub(super) fn beat(self: Arc<Self>, deployer: Arc<Deployer>) {
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(HEARTBEAT_EVERY);
            loop {
                tick.tick().await;
                if let Err(err) = self.heartbeat(&deployer).await {
                    tracing::debug!("cluster heartbeat: {err:#}");
                }
            }
        });
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

    pub(super) fn set_failure(&self, name: &str, failure: Option<FailedVersion>) {
        let mut failed = self.failed.lock().unwrap_or_else(|e| e.into_inner());
        match failure {
            Some(failure) => failed.insert(name.to_string(), failure),
            None => failed.remove(name),
        };
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
