//! The cluster's component store: a version's bytes, named by digest, so
//! each is uploaded once whichever host publishes it; fetched, checked
//! against its digest and installed through the ordinary deploy path.

use std::path::Path;
use std::sync::Arc;

use anyhow::{Context as _, Result, anyhow, bail};
use tokio::io::AsyncReadExt as _;

use super::records::IndexEntry;
use super::{Cluster, Stores};
use crate::deploy::install::deployer::Deployer;
use crate::deploy::source::upload::{self, Staged, StagingFile};
use crate::deploy::spec::{MAX_COMPONENT_FILE, ServiceSpec, digest_of};

/// Longest manifest the index carries.
const MAX_MANIFEST: usize = 1 << 20;

impl Cluster {
    /// Fetches `version`'s component from the cluster's store, checked
    /// against its digest. Fails while NATS cannot serve it (a failover):
    /// the caller tries again.
    pub(super) async fn fetch(&self, stores: &Stores, version: &IndexEntry) -> Result<Arc<[u8]>> {
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
        Ok(Arc::from(wasm))
    }

    /// Puts `wasm`, the component of `version`, in place as `name`.
    pub(super) async fn install(
        &self,
        deployer: &Arc<Deployer>,
        dir: &Path,
        name: &str,
        version: &IndexEntry,
        wasm: Arc<[u8]>,
    ) -> Result<()> {
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
}

impl Stores {
    /// Uploads `wasm` as the component `digest`, unless the store has it.
    pub(super) async fn upload_component(
        &self,
        name: &str,
        digest: &str,
        wasm: &[u8],
    ) -> Result<()> {
        if self.objects.info(digest).await.is_err() {
            self.objects
                .put(digest, &mut &wasm[..])
                .await
                .with_context(|| format!("uploading {name}'s component"))?;
        }
        Ok(())
    }
}
