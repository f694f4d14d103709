//! Keeping the services directory and the cluster's index together: the
//! catch-up pass, following the index's changes, and publishing local ones
//! as a compare-and-set on the revision last known.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use async_nats::jetstream::kv;
use bytes::Bytes;
use futures_util::StreamExt as _;

use super::records::{FailedVersion, IndexEntry, Synced};
use super::{Cluster, Stores, now_ms};
use crate::deploy::Deployment;
use crate::deploy::install::deployer::Deployer;
use crate::deploy::source::files::remove_service;
use crate::deploy::spec::{digest_of, validate_name};

/// How often local changes are checked against the index even without a
/// registry change (to retry publishes that failed while NATS was down).
const RECHECK_EVERY: Duration = Duration::from_secs(5);

impl Cluster {
    /// Keeps the directory and the index together, reconnecting after a
    /// failure, for as long as the host runs.
    pub(super) fn follow_index(self: Arc<Self>, deployer: Arc<Deployer>, dir: std::path::PathBuf) {
        tokio::spawn(async move {
            loop {
                if let Err(err) = self.sync(&deployer, &dir).await {
                    if self.caught_up.swap(false, Ordering::AcqRel) {
                        tracing::warn!(cluster = %self.config.name, "lost the cluster index ({err:#}); serving the versions this host has, and catching up when NATS is back");
                    } else {
                        tracing::debug!("cluster sync: {err:#}");
                    }
                    tokio::time::sleep(Duration::from_secs(1)).await;
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
                self.apply(deployer, dir, stores, entry).await?;
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
                    self.apply(deployer, dir, stores, entry).await?;
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
                    Some(Ok(entry)) => self.apply(deployer, dir, stores, entry).await?,
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

    /// Applies one index entry to this host. Fails only when the entry's
    /// component cannot be fetched now (NATS failing over): the session
    /// ends and the next one applies the entry again. A version this host
    /// cannot load is kept as a failure, not retried.
    async fn apply(
        &self,
        deployer: &Arc<Deployer>,
        dir: &Path,
        stores: &Stores,
        entry: kv::Entry,
    ) -> Result<()> {
        let name = entry.key.clone();
        if validate_name(&name).is_err() {
            tracing::warn!(service = %name, "ignoring an index entry that is not a service name");
            return Ok(());
        }
        let known = self.synced_of(&name);
        if known.as_ref().is_some_and(|s| s.revision >= entry.revision) {
            return Ok(());
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
            return Ok(());
        }
        let version: IndexEntry = match serde_json::from_slice(&entry.value) {
            Ok(version) => version,
            Err(err) => {
                tracing::warn!(service = %name, "ignoring an index entry that cannot be read: {err}");
                return Ok(());
            }
        };
        if let Some(current) = &current
            && current.digest() == version.digest
            && current.manifest() == version.manifest.as_deref()
        {
            self.set_failure(&name, None);
            self.record(&name, entry.revision, &version, Some(current.generation()));
            return Ok(());
        }
        let wasm = match self.fetch(stores, &version).await {
            Ok(wasm) => wasm,
            Err(err) => {
                return Err(err.context(format!("fetching {name}'s version {}", entry.revision)));
            }
        };
        // Recorded before installing, so the deploy it causes is not taken
        // for a local change; the current generation marks what was here.
        self.record(
            &name,
            entry.revision,
            &version,
            current.as_ref().map(|d| d.generation()),
        );
        match self.install(deployer, dir, &name, &version, wasm).await {
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
        deployment: &Deployment,
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
        stores.upload_component(&name, &digest, &wasm).await?;
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
                    Box::pin(self.apply(deployer, dir, stores, entry)).await?;
                }
            }
        }
        Ok(())
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
