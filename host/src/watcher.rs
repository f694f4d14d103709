//! Keeps the registry in step with the services directory: file events are
//! hints, a directory scan is the truth. Events are debounced until a file is
//! complete, then each settled change becomes a deploy, replace or remove. A
//! periodic rescan catches anything the event stream missed, including the
//! directory itself vanishing and coming back.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context as _, Result, anyhow, bail};
use notify::event::{AccessKind, AccessMode, EventKind, ModifyKind};
use notify::{RecursiveMode, Watcher as _};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use crate::deploy::{ServiceConfig, ServiceSpec, digest_of, validate_name};
use crate::deployer::Deployer;
use crate::limits::Limits;

/// Quiet time after a "file complete" event (close after write, rename into
/// place, removal) before the file is read.
const SETTLE: Duration = Duration::from_millis(20);
/// Quiet time after other events (a write without a close yet) before a file
/// is considered complete anyway.
const QUIET_FALLBACK: Duration = Duration::from_millis(500);
/// How often the whole directory is rescanned regardless of events.
const RESCAN_EVERY: Duration = Duration::from_secs(2);
/// Largest component file read.
pub const MAX_COMPONENT_FILE: u64 = 1 << 30;

/// What a file name in the services directory means.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum FileRole<'a> {
    /// `NAME.wasm`: the component of service NAME.
    Component(&'a str),
    /// Anything else: dotfiles, editor temp files, other extensions.
    Ignored,
}

/// Classifies a file name.
pub(crate) fn file_role(file_name: &str) -> FileRole<'_> {
    if file_name.starts_with('.') || file_name.ends_with('~') || file_name.starts_with('#') {
        return FileRole::Ignored;
    }
    match file_name.strip_suffix(".wasm") {
        Some(stem) if !stem.is_empty() => FileRole::Component(stem),
        _ => FileRole::Ignored,
    }
}

/// Identity of a file's current contents as cheaply observable: a change in
/// any field means the file may have changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Fingerprint {
    len: u64,
    modified: Option<SystemTime>,
    #[cfg(unix)]
    inode: u64,
    #[cfg(unix)]
    ctime: i64,
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
            ctime: meta.ctime_nsec() + meta.ctime() * 1_000_000_000,
        }
    }
}

/// Directory-watching options.
#[derive(Debug, Clone)]
pub(crate) struct WatchOptions {
    /// The services directory.
    pub dir: PathBuf,
    /// Limits for services without their own.
    pub defaults: Limits,
    /// Follow symlinks that point outside the directory.
    pub allow_external_symlinks: bool,
}

/// The result of looking at a service's file.
enum Load {
    /// The file is exactly as when last applied.
    Unchanged,
    /// There is no service file (deleted, or replaced by a directory).
    Gone,
    /// The file changed: here is the new version.
    Changed(ServiceSpec, Fingerprint),
    /// The file is unusable; the fingerprint (if any) identifies this state.
    Bad(anyhow::Error, Option<Fingerprint>),
}

/// Reads service `name` from the directory unless its fingerprint is still
/// `last`. Blocking: file I/O.
fn load(options: &WatchOptions, name: &str, last: Option<Fingerprint>) -> Load {
    let path = options.dir.join(format!("{name}.wasm"));
    let link_meta = match std::fs::symlink_metadata(&path) {
        Ok(meta) => meta,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Load::Gone,
        Err(err) => {
            return Load::Bad(
                anyhow!(err).context(format!("cannot inspect {}", path.display())),
                None,
            );
        }
    };
    let meta = match std::fs::metadata(&path) {
        Ok(meta) => meta,
        Err(err) => {
            let what = if err.kind() == std::io::ErrorKind::NotFound {
                anyhow!("{} is a symlink to a missing file", path.display())
            } else {
                anyhow!(err).context(format!("cannot inspect {}", path.display()))
            };
            return Load::Bad(what, Some(Fingerprint::of(&link_meta)));
        }
    };
    let fingerprint = Fingerprint::of(&meta);
    if last == Some(fingerprint) {
        return Load::Unchanged;
    }
    if meta.is_dir() {
        return Load::Gone;
    }
    let checked = (|| {
        if link_meta.file_type().is_symlink() {
            check_symlink(options, &path)?;
        }
        if !meta.is_file() {
            bail!("{} is not a regular file", path.display());
        }
        if meta.len() > MAX_COMPONENT_FILE {
            bail!(
                "{} is {} bytes, larger than the {} byte limit for a component",
                path.display(),
                meta.len(),
                MAX_COMPONENT_FILE
            );
        }
        std::fs::read(&path).with_context(|| format!("cannot read {}", path.display()))
    })();
    match checked {
        Ok(wasm) => Load::Changed(
            ServiceSpec {
                name: name.to_string(),
                wasm: wasm.into(),
                config: ServiceConfig::defaults(name, options.defaults),
                source: Some(path),
            },
            fingerprint,
        ),
        Err(err) => Load::Bad(err, Some(fingerprint)),
    }
}

fn check_symlink(options: &WatchOptions, path: &Path) -> Result<()> {
    if options.allow_external_symlinks {
        return Ok(());
    }
    let target = match std::fs::canonicalize(path) {
        Ok(target) => target,
        // A dangling link is reported when its metadata is read.
        Err(_) => return Ok(()),
    };
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

/// The names of every service file in the directory.
fn scan_names(dir: &Path) -> std::io::Result<HashSet<String>> {
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

/// How the initial load of a directory went.
#[derive(Debug, Clone, Default)]
pub struct LoadReport {
    /// Services deployed.
    pub deployed: usize,
    /// Service files rejected.
    pub rejected: usize,
    /// Wall-clock time of the whole load.
    pub elapsed: Duration,
}

/// The watcher's memory of what it has seen and applied.
struct DirState {
    options: WatchOptions,
    deployer: Arc<Deployer>,
    /// Fingerprint of each service file when it was last applied (deployed,
    /// rejected or found unchanged): the same fingerprint is not read again.
    applied: HashMap<String, Fingerprint>,
    /// Names seen as invalid, so each is logged once.
    invalid_names: HashSet<String>,
    /// Whether the directory was missing at the last look.
    dir_missing: bool,
}

impl DirState {
    fn new(options: WatchOptions, deployer: Arc<Deployer>) -> DirState {
        DirState {
            options,
            deployer,
            applied: HashMap::new(),
            invalid_names: HashSet::new(),
            dir_missing: false,
        }
    }

    /// Scans the directory and applies every change found, waiting for the
    /// resulting deploys when `wait` is set (the initial load).
    async fn rescan(&mut self, wait: bool) -> LoadReport {
        let started = Instant::now();
        let names = match scan_names(&self.options.dir) {
            Ok(names) => {
                if self.dir_missing {
                    tracing::info!(dir = %self.options.dir.display(), "services directory is back");
                    self.dir_missing = false;
                }
                names
            }
            Err(err) => {
                if !self.dir_missing {
                    tracing::warn!(
                        dir = %self.options.dir.display(),
                        error = %err,
                        "cannot read the services directory; its services are removed until it is back"
                    );
                    self.dir_missing = true;
                }
                HashSet::new()
            }
        };
        let mut candidates: HashSet<String> = names;
        candidates.extend(self.applied.keys().cloned());
        candidates.extend(
            self.deployer
                .registry()
                .snapshot()
                .services()
                .filter(|d| d.source().is_some())
                .map(|d| d.name().to_string()),
        );
        let mut pending = Vec::new();
        for name in candidates {
            if let Some(task) = self.sync(&name).await {
                pending.push(task);
            }
        }
        let mut report = LoadReport::default();
        if wait {
            for task in pending {
                match task.await {
                    Ok(true) => report.deployed += 1,
                    _ => report.rejected += 1,
                }
            }
        }
        report.elapsed = started.elapsed();
        report
    }

    /// Brings service `name` in line with its file. Returns the deploy task
    /// if one was started (it yields whether the deploy succeeded).
    async fn sync(&mut self, name: &str) -> Option<JoinHandle<bool>> {
        if let Err(reason) = validate_name(name) {
            if self.invalid_names.insert(name.to_string()) {
                tracing::warn!(file = %format!("{name}.wasm"), "ignoring file: {reason}");
            }
            return None;
        }
        let options = self.options.clone();
        let last = self.applied.get(name).copied();
        let owned_name = name.to_string();
        let loaded = tokio::task::spawn_blocking(move || load(&options, &owned_name, last))
            .await
            .unwrap_or_else(|join| Load::Bad(anyhow!("reading the file failed: {join}"), None));
        match loaded {
            Load::Unchanged => None,
            Load::Gone => {
                self.applied.remove(name);
                self.deployer.undeploy(name, "its file was removed");
                None
            }
            Load::Changed(spec, fingerprint) => {
                self.applied.insert(name.to_string(), fingerprint);
                let unchanged_content = self
                    .deployer
                    .registry()
                    .snapshot()
                    .service(name)
                    .is_some_and(|current| current.digest() == digest_of(&spec.wasm));
                if unchanged_content {
                    return None;
                }
                let deployer = self.deployer.clone();
                Some(tokio::spawn(
                    async move { deployer.deploy(spec).await.is_ok() },
                ))
            }
            Load::Bad(err, fingerprint) => {
                let reason = format!("{err:#}");
                tracing::warn!(
                    event = "reject",
                    service = %name,
                    reason = %reason,
                    "rejected {name}.wasm: {reason}"
                );
                self.deployer.registry().record_rejection(name, reason);
                // Remember this state so the same bad file is not reported
                // again on every rescan.
                match fingerprint {
                    Some(fingerprint) => self.applied.insert(name.to_string(), fingerprint),
                    None => self.applied.remove(name),
                };
                None
            }
        }
    }
}

/// A debounced change waiting to settle.
#[derive(Debug, Clone, Copy)]
struct Pending {
    last_event: Instant,
    complete: bool,
}

impl Pending {
    fn ready_at(&self) -> Instant {
        self.last_event
            + if self.complete {
                SETTLE
            } else {
                QUIET_FALLBACK
            }
    }
}

/// What a raw notify event means for the watcher.
enum Hint {
    /// Service `name` changed; `complete` if the change is known to be whole.
    Service { name: String, complete: bool },
    /// Something happened that needs a full rescan.
    Rescan,
    /// The directory itself changed (removed, moved, recreated): rescan and
    /// watch it anew, since the old watch may have died with it.
    DirChanged,
}

fn hints(event: &notify::Event, dir: &Path) -> Vec<Hint> {
    if event.need_rescan() {
        return vec![Hint::Rescan];
    }
    let complete = matches!(
        event.kind,
        EventKind::Access(AccessKind::Close(AccessMode::Write))
            | EventKind::Modify(ModifyKind::Name(_))
            | EventKind::Remove(_)
    );
    let mut hints = Vec::new();
    for path in &event.paths {
        if path == dir {
            hints.push(Hint::DirChanged);
            continue;
        }
        if path.parent() != Some(dir) {
            hints.push(Hint::Rescan);
            continue;
        }
        let Some(file_name) = path.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        if let FileRole::Component(name) = file_role(file_name) {
            hints.push(Hint::Service {
                name: name.to_string(),
                complete,
            });
        }
    }
    hints
}

/// The running watcher; stops when dropped.
pub(crate) struct DirWatcher {
    stop: watch::Sender<bool>,
    task: Option<JoinHandle<()>>,
}

impl DirWatcher {
    /// Stops the watcher and waits for it to end.
    pub(crate) async fn stop(mut self) {
        let _ = self.stop.send(true);
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for DirWatcher {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// Loads every service in the directory, waiting until all valid ones are
/// deployed, then (if `watch`) keeps applying changes in the background.
pub(crate) async fn load_and_watch(
    options: WatchOptions,
    deployer: Arc<Deployer>,
    watch: bool,
) -> Result<(LoadReport, Option<DirWatcher>)> {
    if !options.dir.is_dir() {
        return Err(anyhow!(
            "services directory {} does not exist or is not a directory",
            options.dir.display()
        ));
    }
    let (events_tx, events_rx) = mpsc::channel(1024);
    // Watch before the initial scan, so nothing written during the load is
    // missed; early events just cause a redundant, idempotent sync.
    let fs_watcher = if watch {
        start_fs_watcher(&options.dir, events_tx.clone(), false)
    } else {
        None
    };
    let mut state = DirState::new(options, deployer);
    let report = state.rescan(true).await;
    if !watch {
        return Ok((report, None));
    }
    let (stop_tx, stop_rx) = watch::channel(false);
    let task = tokio::spawn(run(state, fs_watcher, events_tx, events_rx, stop_rx));
    Ok((
        report,
        Some(DirWatcher {
            stop: stop_tx,
            task: Some(task),
        }),
    ))
}

/// Starts watching `dir`. A failure is logged (as an error unless `quiet`,
/// for retries) and leaves the periodic rescan as the only source of changes.
fn start_fs_watcher(
    dir: &Path,
    events: mpsc::Sender<notify::Result<notify::Event>>,
    quiet: bool,
) -> Option<notify::RecommendedWatcher> {
    let handler = move |event| {
        // The receiver is gone only when the watcher is shutting down.
        let _ = events.blocking_send(event);
    };
    let attempt = notify::recommended_watcher(handler).and_then(|mut watcher| {
        watcher.watch(dir, RecursiveMode::NonRecursive)?;
        Ok(watcher)
    });
    match attempt {
        Ok(watcher) => Some(watcher),
        Err(err) if quiet => {
            tracing::debug!(dir = %dir.display(), error = %err, "still cannot watch the services directory");
            None
        }
        Err(err) => {
            tracing::error!(
                dir = %dir.display(),
                error = %err,
                "cannot watch the services directory; changes are picked up by rescanning every {}s",
                RESCAN_EVERY.as_secs()
            );
            None
        }
    }
}

async fn run(
    mut state: DirState,
    mut fs_watcher: Option<notify::RecommendedWatcher>,
    events_tx: mpsc::Sender<notify::Result<notify::Event>>,
    mut events: mpsc::Receiver<notify::Result<notify::Event>>,
    mut stop: watch::Receiver<bool>,
) {
    let mut pending: HashMap<String, Pending> = HashMap::new();
    let mut next_rescan = Instant::now() + RESCAN_EVERY;
    let mut rescan_soon = false;
    let mut rewatch = false;
    loop {
        let wake = pending
            .values()
            .map(Pending::ready_at)
            .chain(std::iter::once(if rescan_soon {
                Instant::now() + SETTLE
            } else {
                next_rescan
            }))
            .min()
            .unwrap_or(next_rescan);
        tokio::select! {
            _ = stop.changed() => return,
            event = events.recv() => match event {
                Some(Ok(event)) => {
                    for hint in hints(&event, &state.options.dir) {
                        match hint {
                            Hint::Rescan => rescan_soon = true,
                            Hint::DirChanged => {
                                rescan_soon = true;
                                rewatch = true;
                            }
                            Hint::Service { name, complete } => {
                                pending.insert(name, Pending { last_event: Instant::now(), complete });
                            }
                        }
                    }
                }
                Some(Err(err)) => {
                    tracing::error!(error = %err, "file watcher error; rescanning the services directory");
                    rescan_soon = true;
                }
                // The watcher holds a sender, so this only ends at shutdown.
                None => return,
            },
            _ = tokio::time::sleep_until(wake.into()) => {}
        }

        let now = Instant::now();
        let ready: Vec<String> = pending
            .iter()
            .filter(|(_, p)| p.ready_at() <= now)
            .map(|(name, _)| name.clone())
            .collect();
        for name in ready {
            pending.remove(&name);
            state.sync(&name).await;
        }

        if rescan_soon || now >= next_rescan {
            let was_missing = state.dir_missing;
            state.rescan(false).await;
            rescan_soon = false;
            next_rescan = Instant::now() + RESCAN_EVERY;
            // The directory came back, or its watch may have died with it,
            // or watching never worked: watch anew.
            if state.dir_missing {
                rewatch = true;
            } else if rewatch || was_missing || fs_watcher.is_none() {
                let retry = fs_watcher.is_none() && !rewatch && !was_missing;
                drop(fs_watcher.take());
                fs_watcher = start_fs_watcher(&state.options.dir, events_tx.clone(), retry);
                rewatch = false;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_roles() {
        assert_eq!(file_role("orders.wasm"), FileRole::Component("orders"));
        assert_eq!(file_role("my.svc.wasm"), FileRole::Component("my.svc"));
        for ignored in [
            ".orders.wasm",
            ".orders.wasm.swp",
            "orders.wasm~",
            "#orders.wasm#",
            "orders.wasm.tmp",
            "orders.txt",
            ".wasm",
            "README",
        ] {
            assert_eq!(file_role(ignored), FileRole::Ignored, "{ignored}");
        }
    }
}
