//! The last version of each service that deployed successfully from the
//! services directory, kept in the data directory, so that a restart finds
//! a service whose file is broken (a writer died mid-copy, a bad manifest)
//! still served — the promise a live replacement makes, kept across a
//! restart too.
//!
//! Layout: `<data dir>/last-good/NAME.wasm`, `NAME.toml` (if the service had
//! a manifest) and `NAME.digest`, the component's digest, written last: an
//! entry counts only when the digest file names the component that is there.
//! Each file is written to a temporary name, fsynced and renamed. Entries are
//! written only when the deployed version changes, and removed when the
//! service's file is removed.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context as _, Result};

use crate::base::files::read_shared;
use crate::deploy::digest_of;
use crate::deploy::spec::MAX_COMPONENT_FILE;

/// A service's last good version, as stored.
#[derive(Debug, Clone)]
pub(crate) struct Saved {
    /// The component.
    pub wasm: Arc<[u8]>,
    /// The manifest's text, if the service had one.
    pub manifest: Option<String>,
    /// `sha256:<hex>` of `wasm`.
    pub digest: String,
    /// When it was saved.
    pub saved_at: std::time::SystemTime,
}

/// The store of last good versions.
#[derive(Debug, Clone)]
pub(crate) struct LastGood {
    dir: PathBuf,
}

impl LastGood {
    /// The store under `data_dir` (created on first write).
    pub(crate) fn new(data_dir: &Path) -> LastGood {
        LastGood {
            dir: data_dir.join("last-good"),
        }
    }

    fn path(&self, name: &str, extension: &str) -> PathBuf {
        self.dir.join(format!("{name}.{extension}"))
    }

    /// The saved digest of `name`, if any.
    fn saved_digest(&self, name: &str) -> Option<String> {
        std::fs::read_to_string(self.path(name, "digest"))
            .ok()
            .map(|text| text.trim().to_string())
    }

    /// Remembers `wasm` (with `digest`) and `manifest` as `name`'s last good
    /// version, unless that is what is saved already. Blocking.
    pub(crate) fn save(
        &self,
        name: &str,
        wasm: &[u8],
        digest: &str,
        manifest: Option<&str>,
    ) -> Result<()> {
        let saved_manifest = std::fs::read_to_string(self.path(name, "toml")).ok();
        if self.saved_digest(name).as_deref() == Some(digest)
            && saved_manifest.as_deref() == manifest
        {
            return Ok(());
        }
        std::fs::create_dir_all(&self.dir)
            .with_context(|| format!("creating {}", self.dir.display()))?;
        // The digest goes first (removed) and last (written): a crash in
        // between leaves an entry that does not count.
        remove_if_present(&self.path(name, "digest"))?;
        write_atomically(&self.dir, &self.path(name, "wasm"), wasm)?;
        match manifest {
            Some(text) => write_atomically(&self.dir, &self.path(name, "toml"), text.as_bytes())?,
            None => remove_if_present(&self.path(name, "toml"))?,
        }
        write_atomically(
            &self.dir,
            &self.path(name, "digest"),
            format!("{digest}\n").as_bytes(),
        )
    }

    /// `name`'s last good version, if one is saved whole. Blocking.
    pub(crate) fn load(&self, name: &str) -> Option<Saved> {
        let digest = self.saved_digest(name)?;
        let wasm = read_shared(&self.path(name, "wasm"), MAX_COMPONENT_FILE).ok()?;
        if digest_of(&wasm) != digest {
            tracing::warn!(
                service = %name,
                dir = %self.dir.display(),
                "the saved last good version is damaged; ignoring it"
            );
            return None;
        }
        let manifest = std::fs::read_to_string(self.path(name, "toml")).ok();
        let saved_at = std::fs::metadata(self.path(name, "digest"))
            .and_then(|m| m.modified())
            .unwrap_or(std::time::SystemTime::UNIX_EPOCH);
        Some(Saved {
            wasm,
            manifest,
            digest,
            saved_at,
        })
    }

    /// Forgets every saved service not in `present` (services whose file was
    /// removed while the host was down). Blocking.
    pub(crate) fn prune(&self, present: &std::collections::HashSet<String>) -> Result<()> {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return Ok(());
        };
        for entry in entries {
            let path = entry?.path();
            let Some(name) = path
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.strip_suffix(".digest"))
            else {
                continue;
            };
            if !present.contains(name) {
                self.remove(name)?;
            }
        }
        Ok(())
    }

    /// Forgets `name` (its file was removed). Blocking.
    pub(crate) fn remove(&self, name: &str) -> Result<()> {
        for extension in ["digest", "wasm", "toml"] {
            remove_if_present(&self.path(name, extension))?;
        }
        Ok(())
    }
}

fn remove_if_present(path: &Path) -> Result<()> {
    match std::fs::remove_file(path) {
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(()),
        other => other.with_context(|| format!("removing {}", path.display())),
    }
}

/// Writes `bytes` to `path` all-or-nothing: a temporary file in `dir`,
/// fsynced, renamed into place.
fn write_atomically(dir: &Path, path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write as _;
    let mut temp = tempfile::Builder::new()
        .prefix(".saving-")
        .tempfile_in(dir)
        .with_context(|| format!("creating a temporary file in {}", dir.display()))?;
    temp.write_all(bytes)
        .and_then(|()| temp.as_file().sync_all())
        .with_context(|| format!("writing {}", temp.path().display()))?;
    temp.persist(path)
        .with_context(|| format!("renaming into {}", path.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn saves_loads_and_forgets() {
        let data = tempfile::tempdir().unwrap();
        let store = LastGood::new(data.path());
        assert!(store.load("svc").is_none());
        let wasm = b"component bytes";
        store
            .save("svc", wasm, &digest_of(wasm), Some("route = \"/x\""))
            .unwrap();
        let saved = store.load("svc").unwrap();
        assert_eq!(&*saved.wasm, wasm);
        assert_eq!(saved.manifest.as_deref(), Some("route = \"/x\""));
        // A new version without a manifest replaces both.
        let newer = b"newer bytes";
        store.save("svc", newer, &digest_of(newer), None).unwrap();
        let saved = store.load("svc").unwrap();
        assert_eq!(&*saved.wasm, newer);
        assert_eq!(saved.manifest, None);
        store.remove("svc").unwrap();
        assert!(store.load("svc").is_none());
    }

    #[test]
    fn a_damaged_entry_is_ignored() {
        let data = tempfile::tempdir().unwrap();
        let store = LastGood::new(data.path());
        let wasm = b"component bytes";
        store.save("svc", wasm, &digest_of(wasm), None).unwrap();
        std::fs::write(store.path("svc", "wasm"), b"component byte").unwrap();
        assert!(store.load("svc").is_none());
    }
}
