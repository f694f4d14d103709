//! The on-disk compiled-code cache: native code for a component, keyed by
//! the component's content digest and the engine's compatibility hash, and
//! checksummed so a corrupt or foreign entry is detected and rebuilt rather
//! than trusted.
//!
//! Layout: `<root>/<engine key>/<sha256 of the component>.cwasm`, the
//! artifact from [`Component::serialize`] exactly as wasmtime wrote it, and
//! beside it `<…>.sum`: magic, the artifact's length and its SHA-256. The
//! artifact is mapped from its file, not copied into the process: its code
//! pages are the page cache's, loaded when first run, shared by every host
//! on the machine and dropped under memory pressure, instead of counted as
//! each host's own memory (a small Rust service's 200-300 KiB of code, a
//! JavaScript service's 37 MiB, most of which a service never runs).
//!
//! Both files are written to a temporary name and renamed into place, the
//! artifact first: readers never see half a file from a running writer, an
//! artifact without its sum is a miss, and a torn entry left by a crash
//! fails its checksum. An entry is checked when it is loaded, then mapped:
//! a file changed in place afterwards (not by Wharf, which only renames)
//! changes the code of the hosts that mapped it, so the entries are
//! written read-only.

use std::collections::HashMap;
use std::hash::Hasher;
use std::io::{Read as _, Write as _};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, Weak};

use anyhow::{Context as _, Result, bail};
use sha2::{Digest as _, Sha256};
use wasmtime::Engine;
use wasmtime::component::Component;

use crate::guest::engine::{EngineKind, Runtime, Tier};

/// First bytes of every entry's sum file.
const MAGIC: &[u8; 12] = b"WHARF-CWSUM\x01";
/// A sum file: magic, artifact length (u64 LE), SHA-256 of the artifact.
const SUM_LEN: usize = MAGIC.len() + 8 + 32;

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

    /// The artifact's path and its sum file's.
    fn entry_paths(&self, digest: &str) -> (PathBuf, PathBuf) {
        let hex = digest.strip_prefix("sha256:").unwrap_or(digest);
        (
            self.dir.join(format!("{hex}.cwasm")),
            self.dir.join(format!("{hex}.sum")),
        )
    }

    /// Loads the compiled component for `digest`. A missing entry is `None`;
    /// a corrupt or incompatible one is logged, deleted and `None`.
    pub fn load(&self, engine: &Engine, digest: &str) -> Option<Component> {
        let (artifact, sum) = self.entry_paths(digest);
        let sum_bytes = match std::fs::read(&sum) {
            Ok(bytes) => bytes,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => return None,
            Err(err) => {
                tracing::warn!(entry = %sum.display(), error = %err, "cannot read cache entry; compiling instead");
                return None;
            }
        };
        let loaded = Sum::decode(&sum_bytes)
            .and_then(|expected| expected.check(&Sum::of_file(&artifact)?))
            .and_then(|()| {
                // SAFETY: the file is byte-for-byte what `Component::serialize`
                // produced for this engine configuration when the entry was
                // stored: its length and SHA-256 match the sum written with
                // it, the entry lives in a directory keyed by the engine's
                // compatibility hash, and wasmtime rechecks the artifact's
                // own engine header. Wharf replaces entries only by renaming
                // new files over them, never in place (see the module docs).
                unsafe { Component::deserialize_file(engine, &artifact) }
                    .map_err(|err| anyhow::anyhow!("{err:#}"))
            });
        match loaded {
            Ok(component) => Some(component),
            Err(err) => {
                tracing::warn!(
                    entry = %artifact.display(),
                    reason = %format!("{err:#}"),
                    "ignoring a corrupt or foreign cache entry; recompiling"
                );
                let _ = std::fs::remove_file(&sum);
                let _ = std::fs::remove_file(&artifact);
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
        let (artifact_path, sum_path) = self.entry_paths(digest);
        // The artifact first: until its sum is in place, it is a miss.
        self.write_read_only(&artifact_path, &artifact)?;
        self.write_read_only(&sum_path, &Sum::of(&artifact).encode())
    }

    /// Writes `bytes` to a temporary file, read-only, and renames it to
    /// `path`. No fsync: it costs more than the compile of a small service
    /// on some disks, and a torn entry after a crash fails its checksum and
    /// is rebuilt.
    fn write_read_only(&self, path: &Path, bytes: &[u8]) -> Result<()> {
        let mut temp = tempfile::NamedTempFile::new_in(&self.dir)
            .with_context(|| format!("creating a temporary file in {}", self.dir.display()))?;
        temp.write_all(bytes)?;
        let mut permissions = temp.as_file().metadata()?.permissions();
        permissions.set_readonly(true);
        temp.as_file().set_permissions(permissions)?;
        temp.persist(path)
            .with_context(|| format!("renaming the entry into {}", path.display()))?;
        Ok(())
    }
}

/// An artifact's length and SHA-256, as its sum file holds them.
#[derive(Debug, PartialEq, Eq)]
struct Sum {
    len: u64,
    sha256: [u8; 32],
}

impl Sum {
    fn of(artifact: &[u8]) -> Sum {
        Sum {
            len: artifact.len() as u64,
            sha256: Sha256::digest(artifact).into(),
        }
    }

    /// The sum of the file at `path`, read in chunks (an artifact can be
    /// tens of MiB; it is hashed, not held).
    fn of_file(path: &Path) -> Result<Sum> {
        let mut file =
            std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
        let mut hasher = Sha256::new();
        let mut chunk = vec![0u8; 256 << 10];
        let mut len = 0u64;
        loop {
            let read = file
                .read(&mut chunk)
                .with_context(|| format!("reading {}", path.display()))?;
            if read == 0 {
                break;
            }
            hasher.update(&chunk[..read]);
            len += read as u64;
        }
        Ok(Sum {
            len,
            sha256: hasher.finalize().into(),
        })
    }

    fn encode(&self) -> Vec<u8> {
        let mut bytes = Vec::with_capacity(SUM_LEN);
        bytes.extend_from_slice(MAGIC);
        bytes.extend_from_slice(&self.len.to_le_bytes());
        bytes.extend_from_slice(&self.sha256);
        bytes
    }

    fn decode(bytes: &[u8]) -> Result<Sum> {
        if bytes.len() != SUM_LEN || &bytes[..MAGIC.len()] != MAGIC {
            bail!("not a Wharf cache entry");
        }
        let len: [u8; 8] = bytes[MAGIC.len()..MAGIC.len() + 8].try_into()?;
        let sha256: [u8; 32] = bytes[MAGIC.len() + 8..].try_into()?;
        Ok(Sum {
            len: u64::from_le_bytes(len),
            sha256,
        })
    }

    /// Ok if `actual` is the artifact this sum describes.
    fn check(&self, actual: &Sum) -> Result<()> {
        if actual.len != self.len {
            bail!(
                "truncated: {} artifact bytes, its sum says {}",
                actual.len,
                self.len
            );
        }
        if actual.sha256 != self.sha256 {
            bail!("checksum mismatch");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_accept_intact_artifacts_only() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.cwasm");
        std::fs::write(&path, b"artifact bytes").unwrap();
        let sum = Sum::decode(&Sum::of(b"artifact bytes").encode()).unwrap();
        sum.check(&Sum::of_file(&path).unwrap()).unwrap();

        std::fs::write(&path, b"artifact bytez").unwrap();
        let err = sum.check(&Sum::of_file(&path).unwrap()).unwrap_err();
        assert!(err.to_string().contains("checksum"), "{err}");

        std::fs::write(&path, b"artifact byte").unwrap();
        let err = sum.check(&Sum::of_file(&path).unwrap()).unwrap_err();
        assert!(err.to_string().contains("truncated"), "{err}");

        assert!(Sum::decode(b"\0asm\x0d\0\x01\0").is_err());
        assert!(Sum::decode(b"").is_err());
    }
}
