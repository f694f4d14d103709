//! The on-disk compiled-code cache: native code for a component, keyed by
//! the component's content digest and the engine's compatibility hash, and
//! checksummed so a corrupt or foreign entry is detected and rebuilt rather
//! than trusted.
//!
//! Layout: `<root>/<engine key>/<sha256 of the component>.cwasm`, where each
//! file is a small header (magic, artifact length, SHA-256 of the artifact)
//! followed by the artifact from [`Component::serialize`]. Entries are written
//! to a temporary file and renamed into place, so readers never see half an
//! entry from a running writer, and a torn entry left by a crash fails its
//! checksum.

use std::collections::HashMap;
use std::hash::Hasher;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, Weak};

use anyhow::{Context as _, Result, bail};
use sha2::{Digest as _, Sha256};
use wasmtime::Engine;
use wasmtime::component::Component;

use crate::guest::engine::{EngineKind, Runtime, Tier};

/// First bytes of every cache entry.
const MAGIC: &[u8; 12] = b"WHARF-CWASM\x01";
/// Header: magic, artifact length (u64 LE), SHA-256 of the artifact.
const HEADER_LEN: usize = MAGIC.len() + 8 + 32;

/// The caches of a runtime's optimising engines, one per [`EngineKind`]
/// (their compiled code is not interchangeable), on disk; and, in memory,
/// the compiled components in use, so a component deployed as many
/// services (one template, many manifests) is compiled or loaded once and
/// its code shared by all of them. Baseline (Winch) code is never cached
/// on disk: a restart serves optimised code at once.
#[derive(Default)]
pub struct CodeCaches {
    /// Indexed by [`EngineKind::index`].
    caches: Vec<Option<CodeCache>>,
    /// The components in use, by engine and digest.
    in_use: Mutex<HashMap<(usize, String), Weak<Component>>>,
}

impl std::fmt::Debug for CodeCaches {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CodeCaches")
            .field("caches", &self.caches)
            .finish_non_exhaustive()
    }
}

impl CodeCaches {
    /// Opens the caches under `root` for each of `runtime`'s engines; `None`
    /// (or a cache that cannot be created, which is logged) disables them.
    pub fn open(root: Option<&Path>, runtime: &Runtime) -> CodeCaches {
        let open = |kind: EngineKind| {
            let root = root.filter(|_| kind.tier == Tier::Optimised)?;
            match CodeCache::open(root, runtime.flavour(kind).engine()) {
                Ok(cache) => Some(cache),
                Err(err) => {
                    tracing::warn!(reason = %format!("{err:#}"), "compiled-code cache disabled");
                    None
                }
            }
        };
        CodeCaches {
            caches: EngineKind::ALL.into_iter().map(open).collect(),
            in_use: Mutex::default(),
        }
    }

    fn in_use(&self) -> MutexGuard<'_, HashMap<(usize, String), Weak<Component>>> {
        // A map of weak references: consistent between statements.
        self.in_use.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// `kind`'s compiled code for `digest` if a deployment uses it now.
    pub fn in_use_for(&self, kind: EngineKind, digest: &str) -> Option<Arc<Component>> {
        if digest.is_empty() {
            return None;
        }
        self.in_use()
            .get(&(kind.index(), digest.to_string()))
            .and_then(Weak::upgrade)
    }

    /// Remembers `component` as `kind`'s code for `digest` while something
    /// uses it.
    pub fn keep(&self, kind: EngineKind, digest: &str, component: &Arc<Component>) {
        if digest.is_empty() {
            return;
        }
        let mut in_use = self.in_use();
        // Now and then, forget the components nothing uses any more.
        if in_use.len() >= 64 && in_use.len().is_power_of_two() {
            in_use.retain(|_, weak| weak.strong_count() > 0);
        }
        in_use.insert(
            (kind.index(), digest.to_string()),
            Arc::downgrade(component),
        );
    }

    /// The cache of `kind`'s engine, if enabled.
    pub fn for_kind(&self, kind: EngineKind) -> Option<&CodeCache> {
        self.caches.get(kind.index())?.as_ref()
    }
}

/// A cache of compiled components for one engine configuration.
#[derive(Debug, Clone)]
pub struct CodeCache {
    dir: PathBuf,
}

/// Feeds `Hash` input into SHA-256, for a key that is stable across runs.
struct Sha256Hasher(Sha256);

impl Hasher for Sha256Hasher {
    fn finish(&self) -> u64 {
        let digest = self.0.clone().finalize();
        u64::from_le_bytes(digest[..8].try_into().unwrap_or_default())
    }

    fn write(&mut self, bytes: &[u8]) {
        self.0.update(bytes);
    }
}

impl CodeCache {
    /// Opens (creating if needed) the cache under `root` for `engine`.
    /// Artifacts of other engine versions or settings live in other
    /// subdirectories and are never looked at.
    pub fn open(root: &Path, engine: &Engine) -> Result<CodeCache> {
        let mut hasher = Sha256Hasher(Sha256::new());
        hasher.write(env!("CARGO_PKG_VERSION").as_bytes());
        std::hash::Hash::hash(&engine.precompile_compatibility_hash(), &mut hasher);
        let key = format!("{:016x}", hasher.finish());
        let dir = root.join(key);
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("cannot create cache directory {}", dir.display()))?;
        Ok(CodeCache { dir })
    }

    fn entry_path(&self, digest: &str) -> PathBuf {
        let hex = digest.strip_prefix("sha256:").unwrap_or(digest);
        self.dir.join(format!("{hex}.cwasm"))
    }

    /// Loads the compiled component for `digest`. A missing entry is `None`;
    /// a corrupt or incompatible one is logged, deleted and `None`.
    pub fn load(&self, engine: &Engine, digest: &str) -> Option<Component> {
        let path = self.entry_path(digest);
        let bytes = match std::fs::read(&path) {
            Ok(bytes) => bytes,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => return None,
            Err(err) => {
                tracing::warn!(entry = %path.display(), error = %err, "cannot read cache entry; compiling instead");
                return None;
            }
        };
        match verify(&bytes).and_then(|artifact| {
            // SAFETY: `artifact` is byte-for-byte what `Component::serialize`
            // produced for this engine configuration when the entry was
            // stored: the SHA-256 in the header matched, the entry lives in a
            // directory keyed by the engine's compatibility hash, and
            // wasmtime rechecks the artifact's own engine header.
            unsafe { Component::deserialize(engine, artifact) }
                .map_err(|err| anyhow::anyhow!("{err:#}"))
        }) {
            Ok(component) => Some(component),
            Err(err) => {
                tracing::warn!(
                    entry = %path.display(),
                    reason = %format!("{err:#}"),
                    "ignoring a corrupt or foreign cache entry; recompiling"
                );
                let _ = std::fs::remove_file(&path);
                None
            }
        }
    }

    /// Stores the compiled `component` for `digest`. Failures are logged and
    /// otherwise ignored: the cache is an optimisation.
    pub fn store(&self, digest: &str, component: &Component) {
        if let Err(err) = self.try_store(digest, component) {
            tracing::warn!(digest = %digest, reason = %format!("{err:#}"), "cannot write cache entry");
        }
    }

    fn try_store(&self, digest: &str, component: &Component) -> Result<()> {
        let artifact = component
            .serialize()
            .map_err(|err| anyhow::anyhow!("{err:#}"))
            .context("serializing the compiled component")?;
        let path = self.entry_path(digest);
        let mut temp = tempfile::NamedTempFile::new_in(&self.dir)
            .with_context(|| format!("creating a temporary file in {}", self.dir.display()))?;
        temp.write_all(MAGIC)?;
        temp.write_all(&(artifact.len() as u64).to_le_bytes())?;
        temp.write_all(&Sha256::digest(&artifact))?;
        temp.write_all(&artifact)?;
        // No fsync: it costs more than the compile of a small service on
        // some disks, and a torn entry after a crash fails its checksum and
        // is rebuilt.
        temp.persist(&path)
            .with_context(|| format!("renaming the entry into {}", path.display()))?;
        Ok(())
    }
}

/// Checks an entry's header and checksum; returns the artifact.
fn verify(bytes: &[u8]) -> Result<&[u8]> {
    if bytes.len() < HEADER_LEN || &bytes[..MAGIC.len()] != MAGIC {
        bail!("not a Wharf cache entry");
    }
    let len_bytes: [u8; 8] = bytes[MAGIC.len()..MAGIC.len() + 8].try_into()?;
    let expected_len = u64::from_le_bytes(len_bytes);
    let checksum = &bytes[MAGIC.len() + 8..HEADER_LEN];
    let artifact = &bytes[HEADER_LEN..];
    if artifact.len() as u64 != expected_len {
        bail!(
            "truncated: {} artifact bytes, header says {expected_len}",
            artifact.len()
        );
    }
    if Sha256::digest(artifact).as_slice() != checksum {
        bail!("checksum mismatch");
    }
    Ok(artifact)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(artifact: &[u8]) -> Vec<u8> {
        let mut bytes = MAGIC.to_vec();
        bytes.extend_from_slice(&(artifact.len() as u64).to_le_bytes());
        bytes.extend_from_slice(&Sha256::digest(artifact));
        bytes.extend_from_slice(artifact);
        bytes
    }

    #[test]
    fn verify_accepts_intact_entries_only() {
        let good = entry(b"artifact bytes");
        assert_eq!(verify(&good).unwrap(), b"artifact bytes");

        let mut flipped = good.clone();
        *flipped.last_mut().unwrap() ^= 1;
        assert!(
            verify(&flipped)
                .unwrap_err()
                .to_string()
                .contains("checksum")
        );

        let truncated = &good[..good.len() - 1];
        assert!(
            verify(truncated)
                .unwrap_err()
                .to_string()
                .contains("truncated")
        );

        assert!(verify(b"\0asm\x0d\0\x01\0").is_err());
        assert!(verify(b"").is_err());
    }
}
