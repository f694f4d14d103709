//! Writing a service's files into the services directory all-or-nothing, for
//! versions that arrive whole: over the admin API or from the cluster.
//!
//! An upload is streamed into temporary files beside the service's (dot
//! files, which the watcher ignores), with its size limit enforced and its
//! digest computed while it streams, and each is fsynced. Only after the
//! upload has been validated are the files put in place ([`commit`]): a
//! journal naming them is written and fsynced first, then the manifest and
//! the component are renamed over the old ones, the directory is fsynced,
//! and the journal is removed. A failure before the journal leaves the old
//! pair untouched; a failure between the renames is rolled back (the old
//! manifest is kept under a backup name until the end); a crash between
//! them is rolled forward by [`recover`] when the host next starts, before
//! it reads the directory. Temporary files a crash left behind are removed
//! by [`recover`] too.

use std::fs::OpenOptions;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, Result, anyhow, bail};
use sha2::{Digest as _, Sha256};

use crate::base::files::read_shared;
use crate::base::limits::format_size;
use crate::deploy::install::deployer::Deployer;
use crate::deploy::source::files::remove_service;
use crate::deploy::source::manifest::Manifest;
use crate::deploy::spec::{MAX_COMPONENT_FILE, ServiceConfig, ServiceSpec, check_header};

/// Prefix of every temporary file an upload creates in the services
/// directory (a dot file, so the watcher never reads it as a service).
pub const UPLOAD_PREFIX: &str = ".wharf-upload-";

/// A file being received into the services directory under a temporary name.
pub(crate) struct StagingFile {
    path: PathBuf,
    file: std::fs::File,
    len: u64,
    limit: u64,
    hasher: Sha256,
    what: &'static str,
}

/// A temporary file received whole and fsynced, not yet in place. Dropping
/// it removes the file.
#[derive(Debug)]
pub(crate) struct Staged {
    path: Option<PathBuf>,
    /// `sha256:<hex>` of its content.
    pub digest: String,
}

impl Staged {
    /// Where the file is.
    pub(crate) fn path(&self) -> &Path {
        self.path.as_deref().unwrap_or(Path::new(""))
    }

    /// Gives up ownership of the file: it is no longer removed on drop.
    fn keep(mut self) -> PathBuf {
        self.path.take().unwrap_or_default()
    }
}

impl Drop for Staged {
    fn drop(&mut self) {
        if let Some(path) = self.path.take() {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// A unique temporary path in `dir` for a file of service `name`.
fn temp_path(dir: &Path, name: &str, extension: &str) -> PathBuf {
    dir.join(format!(
        "{UPLOAD_PREFIX}{name}-{:016x}.{extension}",
        fastrand::u64(..)
    ))
}

impl StagingFile {
    /// Creates the temporary file for `name`'s `what` (`component` or
    /// `manifest`) in `dir`, refusing content over `limit` bytes. The file
    /// gets the same permissions as one a user copies in (0666 less the
    /// umask), not the 0600 of a private temporary file. Blocking.
    pub(crate) fn create(
        dir: &Path,
        name: &str,
        what: &'static str,
        limit: u64,
    ) -> Result<StagingFile> {
        let extension = if what == "manifest" { "toml" } else { "wasm" };
        let path = temp_path(dir, name, extension);
        let mut options = OpenOptions::new();
        options.write(true).create_new(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o666);
        let file = options
            .open(&path)
            .with_context(|| format!("creating {}", path.display()))?;
        Ok(StagingFile {
            path,
            file,
            len: 0,
            limit,
            hasher: Sha256::new(),
            what,
        })
    }

    /// Appends `chunk`. Blocking.
    pub(crate) fn write(&mut self, chunk: &[u8]) -> Result<()> {
        self.len += chunk.len() as u64;
        if self.len > self.limit {
            bail!(
                "the {} is larger than the limit of {}",
                self.what,
                format_size(self.limit)
            );
        }
        self.hasher.update(chunk);
        self.file
            .write_all(chunk)
            .with_context(|| format!("writing {}", self.path.display()))
    }

    /// Flushes the file to disk and returns it, complete. Blocking.
    pub(crate) fn finish(self) -> Result<Staged> {
        let StagingFile {
            path, file, hasher, ..
        } = self;
        let staged = Staged {
            path: Some(path),
            digest: crate::deploy::spec::hex_digest(hasher.finalize().as_slice()),
        };
        file.sync_all()
            .with_context(|| format!("writing {} to disk", staged.path().display()))?;
        Ok(staged)
    }

    /// Removes the unfinished file.
    pub(crate) fn abandon(self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// A [`StagingFile`] fed from async code: writes are gathered into blocks
/// and written on a blocking thread, so the async threads never wait on disk.
pub(crate) struct AsyncStaging {
    file: Option<StagingFile>,
    buffer: Vec<u8>,
}

/// Bytes gathered before a block is written.
const BLOCK: usize = 1 << 20;

impl AsyncStaging {
    /// See [`StagingFile::create`].
    pub(crate) async fn create(
        dir: &Path,
        name: &str,
        what: &'static str,
        limit: u64,
    ) -> Result<AsyncStaging> {
        let (dir, name) = (dir.to_path_buf(), name.to_string());
        let file =
            tokio::task::spawn_blocking(move || StagingFile::create(&dir, &name, what, limit))
                .await
                .map_err(|join| anyhow!("creating a temporary file failed: {join}"))??;
        Ok(AsyncStaging {
            file: Some(file),
            buffer: Vec::with_capacity(BLOCK),
        })
    }

    /// Appends `chunk`; fails as soon as the content passes its limit.
    pub(crate) async fn write(&mut self, chunk: &[u8]) -> Result<()> {
        if let Some(file) = &self.file {
            let len = file.len + (self.buffer.len() + chunk.len()) as u64;
            if len > file.limit {
                bail!(
                    "the {} is larger than the limit of {}",
                    file.what,
                    format_size(file.limit)
                );
            }
        }
        self.buffer.extend_from_slice(chunk);
        if self.buffer.len() >= BLOCK {
            self.flush().await?;
        }
        Ok(())
    }

    async fn flush(&mut self) -> Result<()> {
        let mut file = self
            .file
            .take()
            .ok_or_else(|| anyhow!("the temporary file failed earlier"))?;
        let block = std::mem::replace(&mut self.buffer, Vec::with_capacity(BLOCK));
        let file = tokio::task::spawn_blocking(move || match file.write(&block) {
            Ok(()) => Ok(file),
            Err(err) => {
                file.abandon();
                Err(err)
            }
        })
        .await
        .map_err(|join| anyhow!("writing a temporary file failed: {join}"))??;
        self.file = Some(file);
        Ok(())
    }

    /// Writes what is left, flushes it to disk and returns the whole file.
    pub(crate) async fn finish(mut self) -> Result<Staged> {
        self.flush().await?;
        let file = self
            .file
            .take()
            .ok_or_else(|| anyhow!("the temporary file failed earlier"))?;
        tokio::task::spawn_blocking(move || file.finish())
            .await
            .map_err(|join| anyhow!("finishing a temporary file failed: {join}"))?
    }
}

impl Drop for AsyncStaging {
    fn drop(&mut self) {
        if let Some(file) = self.file.take() {
            file.abandon();
        }
    }
}

/// Makes the directory's entries (creations, renames, removals) durable.
fn sync_dir(dir: &Path) -> Result<()> {
    #[cfg(unix)]
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("syncing the directory {}", dir.display()))?;
    Ok(())
}

/// The journal of one commit: which temporary files become which service
/// files. Written before the first rename, removed after the last.
#[derive(Debug, PartialEq, Eq)]
struct Journal {
    name: String,
    component: String,
    /// The new manifest's temporary file, or `None` to remove NAME.toml.
    manifest: Option<String>,
}

impl Journal {
    fn render(&self) -> String {
        format!(
            "service {}\ncomponent {}\nmanifest {}\n",
            self.name,
            self.component,
            self.manifest.as_deref().unwrap_or("-")
        )
    }

    fn parse(text: &str) -> Option<Journal> {
        let mut name = None;
        let mut component = None;
        let mut manifest = None;
        for line in text.lines() {
            match line.split_once(' ')? {
                ("service", value) => name = Some(value.to_string()),
                ("component", value) => component = Some(value.to_string()),
                ("manifest", "-") => manifest = Some(None),
                ("manifest", value) => manifest = Some(Some(value.to_string())),
                _ => return None,
            }
        }
        let name = name?;
        crate::deploy::validate_name(&name).ok()?;
        let component = component?;
        let manifest = manifest?;
        let temp_name = |file: &str| file.starts_with(UPLOAD_PREFIX) && !file.contains('/');
        if !temp_name(&component) || manifest.as_deref().is_some_and(|m| !temp_name(m)) {
            return None;
        }
        Some(Journal {
            name,
            component,
            manifest,
        })
    }

    /// Does the renames this journal describes, skipping the ones already
    /// done (their temporary file is gone).
    fn roll_forward(&self, dir: &Path) -> Result<()> {
        let manifest_path = dir.join(format!("{}.toml", self.name));
        match &self.manifest {
            Some(temp) => rename_if_present(&dir.join(temp), &manifest_path)?,
            None => {
                // Only while the component has not been renamed yet: after
                // that, a NAME.toml is a newer one and is not ours to remove.
                if dir.join(&self.component).exists() {
                    remove_if_present(&manifest_path)?;
                }
            }
        }
        rename_if_present(
            &dir.join(&self.component),
            &dir.join(format!("{}.wasm", self.name)),
        )
    }
}

fn rename_if_present(from: &Path, to: &Path) -> Result<()> {
    match std::fs::rename(from, to) {
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(()),
        other => other.with_context(|| format!("renaming {} to {}", from.display(), to.display())),
    }
}

fn remove_if_present(path: &Path) -> Result<()> {
    match std::fs::remove_file(path) {
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(()),
        other => other.with_context(|| format!("removing {}", path.display())),
    }
}

/// The settings a new version's manifest text (`None`: no manifest) gives
/// service `name` on this host, or why it is refused
/// (`NAME.toml: reason`). Secrets may be files: read off the async threads.
pub(crate) async fn service_config(
    deployer: &Deployer,
    name: &str,
    manifest: Option<&str>,
) -> Result<ServiceConfig, String> {
    let manifest = match manifest.map(Manifest::parse) {
        None => Manifest::default(),
        Some(Ok(manifest)) => manifest,
        Some(Err(reason)) => return Err(format!("{name}.toml: {reason}")),
    };
    let (policy, owned) = (deployer.policy(), name.to_string());
    match tokio::task::spawn_blocking(move || manifest.service_config(&owned, &policy)).await {
        Ok(Ok(config)) => Ok(config),
        Ok(Err(reason)) => Err(format!("{name}.toml: {reason}")),
        Err(join) => Err(format!("{name}.toml: reading it failed: {join}")),
    }
}

/// Why a new version did not go in.
#[derive(Debug)]
pub(crate) enum InstallError {
    /// The version was refused (it does not compile, instantiate or fit
    /// this host): nothing changed.
    Rejected(String),
    /// Its files could not be put in place: the previous ones stay.
    Storing(String),
    /// Its files are in place, but the deploy did not install it (a newer
    /// change may have won the race).
    Deploying(anyhow::Error),
}

impl std::fmt::Display for InstallError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            InstallError::Rejected(reason) => write!(f, "{reason}"),
            InstallError::Storing(reason) => write!(f, "cannot store the upload: {reason}"),
            InstallError::Deploying(err) => write!(f, "{err:#}"),
        }
    }
}

impl std::error::Error for InstallError {}

/// Installs a new version of a service whose files are staged beside the
/// services directory: proves it deploys, puts the files in place
/// ([`commit`]) with the watcher held off the service (so it never deploys
/// the new component with the old manifest in between), then deploys it.
/// The caller holds the service's file lock ([`Deployer::lock_files`]).
pub(crate) async fn install(
    deployer: &Arc<Deployer>,
    dir: &Path,
    spec: ServiceSpec,
    component: Staged,
    manifest: Option<Staged>,
) -> Result<(), InstallError> {
    if let Err(err) = deployer.validate(spec.clone()).await {
        return Err(InstallError::Rejected(format!("{err:#}")));
    }
    let _hold = deployer.hold(&spec.name);
    let (commit_dir, commit_name) = (dir.to_path_buf(), spec.name.clone());
    match tokio::task::spawn_blocking(move || {
        commit(&commit_dir, &commit_name, component, manifest)
    })
    .await
    {
        Ok(Ok(())) => {}
        Ok(Err(err)) => return Err(InstallError::Storing(format!("{err:#}"))),
        Err(join) => return Err(InstallError::Storing(join.to_string())),
    }
    deployer
        .deploy(spec)
        .await
        .map(drop)
        .map_err(InstallError::Deploying)
}

/// A version received whole into staged files (over the admin API): the
/// component, and the manifest with its text.
pub(crate) struct Upload {
    /// The component file.
    pub component: Staged,
    /// The manifest file and its text, if one came with it.
    pub manifest: Option<(Staged, String)>,
}

/// What became of an upload that was not refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum UploadOutcome {
    /// It serves.
    Serving {
        /// Its generation on this host.
        generation: u64,
        /// Its component's digest.
        digest: String,
        /// Where it serves.
        route: String,
    },
    /// Its files are in place, but it did not serve within the wait (a
    /// newer change may have replaced it).
    Pending,
}

/// Deploys an upload of service `name` into `dir`: its manifest is checked
/// against this host's policy, the component read once and proved to
/// deploy, then both files are put in place at once ([`install`]) and the
/// call waits up to `wait` for the version to serve. Uploads of one service
/// take turns; a refused one is recorded as the service's last deploy
/// result, and whatever fails, the previous files and deployment stay.
pub(crate) async fn deploy_upload(
    deployer: &Arc<Deployer>,
    dir: &Path,
    name: &str,
    upload: Upload,
    wait: Duration,
) -> Result<UploadOutcome, InstallError> {
    let _turn = deployer.lock_files(name).await;
    let refused = |reason: String| {
        tracing::warn!(service = %name, reason = %reason, "admin upload rejected; nothing was changed");
        deployer.note_rejection(name, format!("admin upload: {reason}"));
        InstallError::Rejected(reason)
    };
    let manifest_text = upload.manifest.as_ref().map(|(_, text)| text.as_str());
    let config = service_config(deployer, name, manifest_text)
        .await
        .map_err(refused)?;
    // The one copy of the component in memory: what the compiler reads.
    let path = upload.component.path().to_path_buf();
    let wasm = match tokio::task::spawn_blocking(move || read_component(&path)).await {
        Ok(Ok(wasm)) => wasm,
        Ok(Err(err)) => return Err(refused(format!("{err:#}"))),
        Err(join) => return Err(InstallError::Storing(join.to_string())),
    };
    let Upload {
        component,
        manifest,
    } = upload;
    let digest = component.digest.clone();
    let spec = ServiceSpec {
        name: name.to_string(),
        config: config.clone(),
        wasm,
        source: Some(dir.join(format!("{name}.wasm"))),
        digest: Some(digest.clone()),
        manifest: manifest.as_ref().map(|(_, text)| Arc::from(text.as_str())),
    };
    match install(
        deployer,
        dir,
        spec,
        component,
        manifest.map(|(file, _)| file),
    )
    .await
    {
        Ok(()) => {}
        Err(InstallError::Rejected(reason)) => return Err(refused(reason)),
        Err(InstallError::Storing(reason)) => {
            tracing::warn!(service = %name, reason = %reason, "admin upload could not be put in place; the previous files stay");
            return Err(InstallError::Storing(reason));
        }
        Err(InstallError::Deploying(err)) => {
            // A newer change may have won the race; the registry says which.
            tracing::debug!(service = %name, error = %format!("{err:#}"), "admin deploy did not install");
        }
    }
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        let snapshot = deployer.registry().snapshot();
        if let Some(current) = snapshot.service(name)
            && current.digest() == digest
            && *current.config() == config
        {
            tracing::info!(service = %name, generation = current.generation(), "deployed through the admin API");
            return Ok(UploadOutcome::Serving {
                generation: current.generation(),
                digest: current.digest().to_string(),
                route: current.route().as_str().to_string(),
            });
        }
        if tokio::time::Instant::now() >= deadline {
            return Ok(UploadOutcome::Pending);
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Reads an uploaded component for compiling, checking its header first so
/// a file that is not a component is refused without reading all of it.
/// Blocking.
fn read_component(path: &Path) -> Result<Arc<[u8]>> {
    use std::io::Read as _;
    let mut file = std::fs::File::open(path)?;
    let mut header = [0u8; 8];
    let read = file.read(&mut header)?;
    check_header(&header[..read])?;
    Ok(read_shared(path, MAX_COMPONENT_FILE)?)
}

/// Removes service `name`: its files from `dir` (the watcher held off it,
/// so it never sees half a removal) and its deployment. Returns whether
/// there was anything to remove.
pub(crate) async fn remove(deployer: &Arc<Deployer>, dir: &Path, name: &str) -> Result<bool> {
    let _turn = deployer.lock_files(name).await;
    let _hold = deployer.hold(name);
    let (dir, owned) = (dir.to_path_buf(), name.to_string());
    let had_file = tokio::task::spawn_blocking(move || remove_service(&dir, &owned))
        .await
        .context("removing the files failed")??;
    let was_deployed = deployer
        .undeploy(name, "removed through the admin API")
        .is_some();
    if had_file || was_deployed {
        tracing::info!(service = %name, "removed through the admin API");
    }
    Ok(had_file || was_deployed)
}

/// Puts `component` in place as `NAME.wasm` and `manifest` as `NAME.toml`
/// (`None`: `NAME.toml` is removed, so the directory holds exactly the
/// upload), all-or-nothing as the module docs describe. Blocking.
pub(crate) fn commit(
    dir: &Path,
    name: &str,
    component: Staged,
    manifest: Option<Staged>,
) -> Result<()> {
    let file_name = |path: &Path| {
        path.file_name()
            .and_then(|n| n.to_str())
            .map(str::to_string)
            .ok_or_else(|| anyhow!("temporary file {} has no name", path.display()))
    };
    let journal = Journal {
        name: name.to_string(),
        component: file_name(component.path())?,
        manifest: manifest.as_ref().map(|m| file_name(m.path())).transpose()?,
    };
    let manifest_path = dir.join(format!("{name}.toml"));
    // The old manifest stays reachable under a backup name until the end,
    // so a failed rename can put it back.
    let backup = temp_path(dir, name, "toml.old");
    let had_manifest = match std::fs::hard_link(&manifest_path, &backup) {
        Ok(()) => true,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => false,
        Err(err) => {
            return Err(err)
                .with_context(|| format!("keeping a copy of {}", manifest_path.display()));
        }
    };
    let cleanup_backup = || {
        if had_manifest {
            let _ = std::fs::remove_file(&backup);
        }
    };
    let journal_path = temp_path(dir, name, "journal");
    let written = (|| -> Result<()> {
        let mut file = std::fs::File::create(&journal_path)
            .with_context(|| format!("creating {}", journal_path.display()))?;
        file.write_all(journal.render().as_bytes())?;
        file.sync_all()?;
        sync_dir(dir)
    })();
    if let Err(err) = written {
        let _ = std::fs::remove_file(&journal_path);
        cleanup_backup();
        return Err(err.context("writing the upload journal"));
    }

    // From here on the renames happen, or are rolled back, or (after a
    // crash) rolled forward by `recover`.
    let manifest_step = match manifest {
        Some(manifest) => {
            let from = manifest.keep();
            std::fs::rename(&from, &manifest_path).map_err(|err| {
                let _ = std::fs::remove_file(&from);
                anyhow!(err).context(format!("renaming into {}", manifest_path.display()))
            })
        }
        None => remove_if_present(&manifest_path),
    };
    let component_step = manifest_step.and_then(|()| {
        let from = component.path().to_path_buf();
        std::fs::rename(&from, dir.join(format!("{name}.wasm")))
            .with_context(|| format!("renaming into {name}.wasm"))
            .map(|()| {
                component.keep();
            })
    });
    if let Err(err) = component_step {
        // Put the old manifest back (or take the new one away).
        let restored = if had_manifest {
            std::fs::rename(&backup, &manifest_path)
        } else {
            match std::fs::remove_file(&manifest_path) {
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
                other => other,
            }
        };
        if let Err(restore) = restored {
            // The journal stays: the next start rolls the upload forward.
            tracing::error!(
                service = %name,
                error = %restore,
                "could not restore {} after a failed upload; the next start completes the upload",
                manifest_path.display()
            );
            return Err(err);
        }
        let _ = std::fs::remove_file(&journal_path);
        let _ = sync_dir(dir);
        return Err(err);
    }
    sync_dir(dir)?;
    let _ = std::fs::remove_file(&journal_path);
    cleanup_backup();
    Ok(())
}

/// Finishes or cleans up after uploads a crash interrupted: completes every
/// commit whose journal survived, then removes every other temporary upload
/// file. Call it before reading the directory. Returns how many files it
/// removed. Blocking.
pub(crate) fn recover(dir: &Path) -> Result<usize> {
    let entries = || -> Result<Vec<(PathBuf, String)>> {
        let mut found = Vec::new();
        for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
            let entry = entry?;
            if let Some(name) = entry.file_name().to_str()
                && name.starts_with(UPLOAD_PREFIX)
            {
                found.push((entry.path(), name.to_string()));
            }
        }
        Ok(found)
    };
    for (path, file) in entries()? {
        if !file.ends_with(".journal") {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        match Journal::parse(&text) {
            Some(journal) => {
                journal.roll_forward(dir)?;
                tracing::warn!(
                    target: crate::deploy::EVENTS,
                    service = %journal.name,
                    "completed an upload that a crash interrupted"
                );
            }
            None => tracing::warn!(file = %path.display(), "ignoring an unreadable upload journal"),
        }
        remove_if_present(&path)?;
    }
    let mut removed = 0;
    for (path, _) in entries()? {
        if path.is_file() {
            remove_if_present(&path)?;
            removed += 1;
        }
    }
    if removed > 0 {
        tracing::info!(
            dir = %dir.display(),
            removed,
            "removed temporary files of interrupted uploads"
        );
    }
    sync_dir(dir)?;
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stage(dir: &Path, name: &str, what: &'static str, content: &[u8]) -> Staged {
        let mut file = StagingFile::create(dir, name, what, 1 << 20).unwrap();
        file.write(content).unwrap();
        file.finish().unwrap()
    }

    #[test]
    fn commit_puts_both_files_in_place_and_leaves_nothing_else() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("svc.toml"), "old").unwrap();
        std::fs::write(dir.path().join("svc.wasm"), "old").unwrap();
        let component = stage(dir.path(), "svc", "component", b"new wasm");
        assert_eq!(component.digest, crate::deploy::digest_of(b"new wasm"));
        let manifest = stage(dir.path(), "svc", "manifest", b"new toml");
        commit(dir.path(), "svc", component, Some(manifest)).unwrap();
        assert_eq!(
            std::fs::read(dir.path().join("svc.wasm")).unwrap(),
            b"new wasm"
        );
        assert_eq!(
            std::fs::read(dir.path().join("svc.toml")).unwrap(),
            b"new toml"
        );
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names.len(), 2, "{names:?}");
    }

    #[test]
    fn commit_without_a_manifest_removes_the_old_one() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("svc.toml"), "old").unwrap();
        let component = stage(dir.path(), "svc", "component", b"wasm");
        commit(dir.path(), "svc", component, None).unwrap();
        assert!(!dir.path().join("svc.toml").exists());
        assert!(dir.path().join("svc.wasm").exists());
    }

    #[test]
    fn a_failed_component_rename_restores_the_old_manifest() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("svc.toml"), "old").unwrap();
        // A directory where the component should go makes its rename fail.
        std::fs::create_dir(dir.path().join("svc.wasm")).unwrap();
        std::fs::write(dir.path().join("svc.wasm").join("x"), "").unwrap();
        let component = stage(dir.path(), "svc", "component", b"wasm");
        let manifest = stage(dir.path(), "svc", "manifest", b"new");
        assert!(commit(dir.path(), "svc", component, Some(manifest)).is_err());
        assert_eq!(
            std::fs::read_to_string(dir.path().join("svc.toml")).unwrap(),
            "old"
        );
        let leftovers: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
            .filter(|n| n.starts_with(UPLOAD_PREFIX))
            .collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");
    }

    #[test]
    fn the_size_limit_holds_while_streaming() {
        let dir = tempfile::tempdir().unwrap();
        let mut file = StagingFile::create(dir.path(), "svc", "component", 10).unwrap();
        file.write(b"0123456789").unwrap();
        let err = file.write(b"x").unwrap_err();
        assert!(err.to_string().contains("larger than the limit"), "{err}");
        file.abandon();
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    #[test]
    fn recover_rolls_an_interrupted_commit_forward_and_removes_strays() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("svc.wasm"), "old wasm").unwrap();
        std::fs::write(dir.path().join("svc.toml"), "old toml").unwrap();
        // A crash after the journal and the manifest rename, before the
        // component rename.
        let component = stage(dir.path(), "svc", "component", b"new wasm").keep();
        std::fs::write(dir.path().join("svc.toml"), "new toml").unwrap();
        let journal = Journal {
            name: "svc".into(),
            component: component.file_name().unwrap().to_string_lossy().into(),
            manifest: Some(format!("{UPLOAD_PREFIX}svc-gone.toml")),
        };
        std::fs::write(
            dir.path().join(format!("{UPLOAD_PREFIX}svc-1.journal")),
            journal.render(),
        )
        .unwrap();
        // A stray temporary file from another crashed upload.
        std::fs::write(dir.path().join(format!("{UPLOAD_PREFIX}x-2.wasm")), "half").unwrap();

        recover(dir.path()).unwrap();
        assert_eq!(
            std::fs::read_to_string(dir.path().join("svc.wasm")).unwrap(),
            "new wasm"
        );
        assert_eq!(
            std::fs::read_to_string(dir.path().join("svc.toml")).unwrap(),
            "new toml"
        );
        let mut names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
            .collect();
        names.sort();
        assert_eq!(names, ["svc.toml", "svc.wasm"]);
    }

    #[test]
    fn journals_parse_only_what_they_render() {
        let journal = Journal {
            name: "svc".into(),
            component: format!("{UPLOAD_PREFIX}svc-1.wasm"),
            manifest: None,
        };
        assert_eq!(Journal::parse(&journal.render()), Some(journal));
        assert_eq!(
            Journal::parse("service ../x\ncomponent .wharf-upload-a\nmanifest -\n"),
            None
        );
        assert_eq!(
            Journal::parse("service x\ncomponent ../../etc/passwd\nmanifest -\n"),
            None
        );
    }
}
