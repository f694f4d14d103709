//! Reading services from the services directory: what each file name means,
//! a service's component and manifest read together into a [`ServiceSpec`],
//! cheap fingerprints to tell whether anything changed, the symlink policy,
//! and the host-wide `wharf.toml`.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::{Context as _, Result, anyhow, bail};

use crate::base::files::{read_bounded_text, read_shared};
use crate::deploy::source::manifest::{HostFile, HostSettings, Manifest};
use crate::deploy::spec::{HostPolicy, MAX_COMPONENT_FILE};
use crate::deploy::{ServiceSpec, digest_of};

/// Largest manifest or `wharf.toml` read.
pub(crate) const MAX_TOML_FILE: u64 = 1 << 20;
/// Name of the host-wide settings file in the services directory.
pub const HOST_FILE: &str = "wharf.toml";

/// What a file name in the services directory means.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum FileRole<'a> {
    /// `NAME.wasm`: the component of service NAME.
    Component(&'a str),
    /// `NAME.toml`: the manifest of service NAME.
    Manifest(&'a str),
    /// `wharf.toml`: the host's default settings.
    HostFile,
    /// Anything else: dotfiles, editor temp files, other extensions.
    Ignored,
}

/// Classifies a file name.
pub(crate) fn file_role(file_name: &str) -> FileRole<'_> {
    if file_name.starts_with('.') || file_name.ends_with('~') || file_name.starts_with('#') {
        return FileRole::Ignored;
    }
    if file_name == HOST_FILE {
        return FileRole::HostFile;
    }
    if let Some(stem) = file_name.strip_suffix(".wasm").filter(|s| !s.is_empty()) {
        return FileRole::Component(stem);
    }
    if let Some(stem) = file_name.strip_suffix(".toml").filter(|s| !s.is_empty()) {
        return FileRole::Manifest(stem);
    }
    FileRole::Ignored
}

/// The service names that have a component file in `dir`.
pub(crate) fn scan_names(dir: &Path) -> std::io::Result<HashSet<String>> {
    let mut names = HashSet::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let Some(file_name) = entry.file_name().to_str().map(str::to_owned) else {
            continue;
        };
        if let FileRole::Component(name) = file_role(&file_name) {
            names.insert(name.to_string());
        }
    }
    Ok(names)
}

/// Identity of a file's contents as cheaply observable: a change in any
/// field means the file may have changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Fingerprint {
    len: u64,
    modified: Option<SystemTime>,
    #[cfg(unix)]
    inode: u64,
    #[cfg(unix)]
    ctime_ns: i64,
}

impl Fingerprint {
    fn of(meta: &std::fs::Metadata) -> Fingerprint {
        #[cfg(unix)]
        use std::os::unix::fs::MetadataExt;
        Fingerprint {
            len: meta.len(),
            modified: meta.modified().ok(),
            #[cfg(unix)]
            inode: meta.ino(),
            #[cfg(unix)]
            ctime_ns: meta.ctime() * 1_000_000_000 + meta.ctime_nsec(),
        }
    }
}

/// Fingerprints of both files of a service.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ServiceFingerprint {
    component: Fingerprint,
    manifest: Option<Fingerprint>,
}

/// Where and how services are read.
#[derive(Debug, Clone)]
pub(crate) struct SourceOptions {
    /// The services directory.
    pub dir: PathBuf,
    /// Follow symlinks that point outside the directory.
    pub allow_external_symlinks: bool,
}

/// The result of looking at a service's files.
pub(crate) enum Load {
    /// Both files are exactly as when last applied.
    Unchanged,
    /// A file changed very recently and may still be being written.
    Settling,
    /// There is no component file (deleted, or replaced by a directory).
    Gone,
    /// Something changed: here is the service as it now is.
    Changed(Box<ServiceSpec>, ServiceFingerprint),
    /// The files are unusable: why, which file is at fault, and the
    /// fingerprint (if any) that identifies this state so the same problem is
    /// reported once.
    Bad(anyhow::Error, PathBuf, Option<ServiceFingerprint>),
}

/// Stats `path` following symlinks, reporting a dangling link clearly.
fn stat(path: &Path) -> Result<Option<(std::fs::Metadata, std::fs::Metadata)>> {
    let link_meta = match std::fs::symlink_metadata(path) {
        Ok(meta) => meta,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(err) => return Err(err).with_context(|| format!("cannot inspect {}", path.display())),
    };
    match std::fs::metadata(path) {
        Ok(meta) => Ok(Some((link_meta, meta))),
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
            Err(anyhow!("{} is a symlink to a missing file", path.display()))
        }
        Err(err) => Err(err).with_context(|| format!("cannot inspect {}", path.display())),
    }
}

fn age(meta: &std::fs::Metadata) -> Duration {
    meta.modified()
        .ok()
        .and_then(|modified| SystemTime::now().duration_since(modified).ok())
        .unwrap_or(Duration::MAX)
}

/// Reads service `name` (its component and optional manifest) unless both
/// fingerprints still equal `last`, or a file was modified less than
/// `min_age` ago; the manifest applies under `policy`. Blocking: file I/O.
pub(crate) fn load(
    options: &SourceOptions,
    name: &str,
    policy: &HostPolicy,
    last: Option<ServiceFingerprint>,
    min_age: Duration,
) -> Load {
    let component_path = options.dir.join(format!("{name}.wasm"));
    let manifest_path = options.dir.join(format!("{name}.toml"));
    let component = match stat(&component_path) {
        Ok(Some((_, meta))) if meta.is_dir() => return Load::Gone,
        Ok(Some(metas)) => metas,
        Ok(None) => return Load::Gone,
        Err(err) => {
            let fingerprint =
                std::fs::symlink_metadata(&component_path)
                    .ok()
                    .map(|m| ServiceFingerprint {
                        component: Fingerprint::of(&m),
                        manifest: None,
                    });
            return Load::Bad(err, component_path, fingerprint);
        }
    };
    let manifest = match stat(&manifest_path) {
        Ok(metas) => metas,
        Err(err) => {
            let fingerprint = ServiceFingerprint {
                component: Fingerprint::of(&component.1),
                manifest: std::fs::symlink_metadata(&manifest_path)
                    .ok()
                    .map(|m| Fingerprint::of(&m)),
            };
            return Load::Bad(err, manifest_path, Some(fingerprint));
        }
    };
    let fingerprint = ServiceFingerprint {
        component: Fingerprint::of(&component.1),
        manifest: manifest.as_ref().map(|(_, meta)| Fingerprint::of(meta)),
    };
    if last == Some(fingerprint) {
        return Load::Unchanged;
    }
    let youngest = manifest.as_ref().map_or(age(&component.1), |(_, meta)| {
        age(meta).min(age(&component.1))
    });
    if youngest < min_age {
        return Load::Settling;
    }
    let read = || -> Result<ServiceSpec, (anyhow::Error, PathBuf)> {
        let component_error = |err: anyhow::Error| (err, component_path.clone());
        let manifest_error = |err: anyhow::Error| (err, manifest_path.clone());
        if component.0.file_type().is_symlink() {
            check_symlink(options, &component_path).map_err(component_error)?;
        }
        if !component.1.is_file() {
            return Err(component_error(anyhow!(
                "{} is not a regular file",
                component_path.display()
            )));
        }
        if component.1.len() > MAX_COMPONENT_FILE {
            return Err(component_error(anyhow!(
                "{} is {} bytes, larger than the {MAX_COMPONENT_FILE} byte limit for a component",
                component_path.display(),
                component.1.len(),
            )));
        }
        let (config, manifest_text) = match &manifest {
            Some((link_meta, meta)) => {
                if link_meta.file_type().is_symlink() {
                    check_symlink(options, &manifest_path).map_err(manifest_error)?;
                }
                let text = read_toml(&manifest_path, meta).map_err(manifest_error)?;
                let config = Manifest::parse(&text)
                    .and_then(|manifest| manifest.service_config(name, policy))
                    .map_err(|why| manifest_error(anyhow!("{}: {why}", manifest_path.display())))?;
                (config, Some(Arc::from(text)))
            }
            None => (
                Manifest::default()
                    .service_config(name, policy)
                    .map_err(|why| component_error(anyhow!(why)))?,
                None,
            ),
        };
        let wasm = read_component(&component_path)
            .with_context(|| format!("cannot read {}", component_path.display()))
            .map_err(component_error)?;
        Ok(ServiceSpec {
            name: name.to_string(),
            digest: Some(digest_of(&wasm)),
            wasm,
            config,
            source: Some(component_path.clone()),
            manifest: manifest_text,
        })
    };
    match read() {
        Ok(spec) => Load::Changed(Box::new(spec), fingerprint),
        Err((err, file)) => Load::Bad(err, file, Some(fingerprint)),
    }
}

/// Reads a component file into shared memory in one allocation.
pub(crate) fn read_component(path: &Path) -> std::io::Result<Arc<[u8]>> {
    read_shared(path, MAX_COMPONENT_FILE)
}

fn read_toml(path: &Path, meta: &std::fs::Metadata) -> Result<String> {
    if !meta.is_file() {
        bail!("{} is not a regular file", path.display());
    }
    // The metadata was a first look: the read checks the opened file again.
    read_bounded_text(path, MAX_TOML_FILE).map_err(|why| anyhow!(why))
}

fn check_symlink(options: &SourceOptions, path: &Path) -> Result<()> {
    if options.allow_external_symlinks {
        return Ok(());
    }
    let target = std::fs::canonicalize(path)
        .with_context(|| format!("cannot resolve {}", path.display()))?;
    let dir = std::fs::canonicalize(&options.dir)
        .with_context(|| format!("cannot resolve {}", options.dir.display()))?;
    if !target.starts_with(&dir) {
        bail!(
            "{} is a symlink to {}, outside the services directory (allow with --allow-external-symlinks)",
            path.display(),
            target.display()
        );
    }
    Ok(())
}

/// Reads the host-wide settings from `DIR/wharf.toml`; `None` if there is
/// no such file. Paths in it are resolved against `DIR`.
pub(crate) fn read_host_file(dir: &Path) -> Result<Option<HostSettings>> {
    let path = dir.join(HOST_FILE);
    let Some((_, meta)) = stat(&path)? else {
        return Ok(None);
    };
    let text = read_toml(&path, &meta)?;
    let settings =
        HostFile::parse(&text, dir).map_err(|why| anyhow!("{}: {why}", path.display()))?;
    Ok(Some(settings))
}

/// Removes a service's files, the component first (so the service is gone
/// at once, whatever happens to the manifest); whether there was a
/// component file.
pub(crate) fn remove_service(dir: &Path, name: &str) -> Result<bool> {
    let mut removed_component = false;
    for (file, is_component) in [
        (format!("{name}.wasm"), true),
        (format!("{name}.toml"), false),
    ] {
        let path = dir.join(file);
        match std::fs::remove_file(&path) {
            Ok(()) => removed_component |= is_component,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
            Err(err) => return Err(err).with_context(|| format!("removing {}", path.display())),
        }
    }
    Ok(removed_component)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_roles() {
        assert_eq!(file_role("orders.wasm"), FileRole::Component("orders"));
        assert_eq!(file_role("my.svc.wasm"), FileRole::Component("my.svc"));
        assert_eq!(file_role("orders.toml"), FileRole::Manifest("orders"));
        assert_eq!(file_role("wharf.toml"), FileRole::HostFile);
        for ignored in [
            ".orders.wasm",
            ".orders.wasm.swp",
            ".orders.toml",
            "orders.wasm~",
            "#orders.wasm#",
            "orders.wasm.tmp",
            "orders.txt",
            ".wasm",
            ".toml",
            "README",
        ] {
            assert_eq!(file_role(ignored), FileRole::Ignored, "{ignored}");
        }
    }
}
