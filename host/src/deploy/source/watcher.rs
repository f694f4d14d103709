//! Keeps the registry in step with the services directory. File events are
//! hints and a directory scan is the truth: events are debounced until a
//! file is complete, then each settled change becomes a deploy, replace or
//! remove. A periodic rescan catches anything the event stream missed,
//! including the directory itself vanishing and coming back.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Result, anyhow};
use notify::event::{AccessKind, AccessMode, EventKind, ModifyKind};
use notify::{RecursiveMode, Watcher as _};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use crate::base::limits::{Limits, PartialLimits};
use crate::capabilities::wasi_config::SecretSources;
use crate::deploy::install::deployer::Deployer;
use crate::deploy::source::files::{
    self, FileRole, HOST_FILE, Load, ServiceFingerprint, SourceOptions, file_role, scan_names,
};
use crate::deploy::source::manifest::{HostSettings, Manifest};
use crate::deploy::source::upload;
use crate::deploy::spec::{EVENTS, HostPolicy};
use crate::deploy::{ServiceSpec, validate_name};

/// Quiet time after a "file complete" event (close after write, rename into
/// place, removal) before the file is read: coalesces the events of one
/// operation. Writes further apart than a compile are ordered by the
/// deployer, where the newest change always wins.
const SETTLE: Duration = Duration::from_millis(2);
/// Quiet time after other events (a write without a close yet) before a file
/// is considered complete anyway.
const QUIET_FALLBACK: Duration = Duration::from_millis(500);
/// How often the whole directory is rescanned regardless of events.
const RESCAN_EVERY: Duration = Duration::from_secs(2);

/// What the watcher needs to know besides the directory.
#[derive(Debug, Clone)]
pub(crate) struct WatchOptions {
    /// Where and how services are read.
    pub source: SourceOptions,
    /// Default limits under the directory's `wharf.toml`.
    pub base_limits: Limits,
    /// Limits over the directory's `wharf.toml` (command-line flags).
    pub limit_overrides: PartialLimits,
    /// Secret sources handed out besides the directory's `wharf.toml`'s
    /// (command-line flags, the embedder).
    pub secret_sources: SecretSources,
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

/// The watcher's memory of what it has seen and applied.
struct DirState {
    options: WatchOptions,
    deployer: Arc<Deployer>,
    /// The defaults from `wharf.toml`, if it exists and is valid.
    host_file: PartialLimits,
    /// The secret sources `wharf.toml` hands out.
    host_file_secrets: SecretSources,
    /// The quotas of single buckets `wharf.toml` sets.
    host_file_quotas: std::collections::BTreeMap<String, u64>,
    /// What `wharf.toml` said when the host started about what is only
    /// read at start (backends and cluster: switching needs a restart).
    started_with: HostSettings,
    /// Fingerprints of each service's files when last applied (deployed,
    /// rejected or found unchanged): the same files are not read again.
    applied: HashMap<String, ServiceFingerprint>,
    /// Names seen as invalid, so each is logged once.
    invalid_names: HashSet<String>,
    /// Whether the directory was missing at the last look.
    dir_missing: bool,
    /// Changes waiting to settle before their files are read.
    pending: HashMap<String, Pending>,
    /// Set during the initial load: a service whose files are broken is
    /// then served from its last good version, if one was saved.
    initial: bool,
}

impl DirState {
    fn dir(&self) -> &Path {
        &self.options.source.dir
    }

    /// The limits of a service without its own: built-in or embedder base,
    /// then `wharf.toml`, then command-line flags.
    fn defaults(&self) -> Limits {
        self.options
            .limit_overrides
            .apply(self.host_file.apply(self.options.base_limits))
    }

    /// The policy services deploy under: the defaults, and the secret
    /// sources of the flags and of `wharf.toml` together.
    fn policy(&self) -> HostPolicy {
        HostPolicy {
            defaults: self.defaults(),
            secrets: self.options.secret_sources.merged(&self.host_file_secrets),
            bucket_quotas: self.host_file_quotas.clone(),
        }
    }

    /// Rereads `wharf.toml`. A bad file is reported and the previous defaults
    /// stay; new defaults make every service be looked at again.
    async fn reload_host_file(&mut self) {
        let dir = self.dir().to_path_buf();
        let read = tokio::task::spawn_blocking(move || files::read_host_file(&dir))
            .await
            .unwrap_or_else(|join| Err(anyhow!("reading {HOST_FILE} failed: {join}")));
        match read {
            Ok(settings) => {
                let settings = settings.unwrap_or_default();
                for (changed, what) in [
                    (
                        settings.keyvalue != self.started_with.keyvalue,
                        "the key-value backend",
                    ),
                    (
                        settings.messaging != self.started_with.messaging,
                        "the message broker",
                    ),
                    (settings.cluster != self.started_with.cluster, "the cluster"),
                    (
                        settings.tiers != self.started_with.tiers
                            || settings.keep_resident != self.started_with.keep_resident,
                        "[engine]",
                    ),
                ] {
                    if changed {
                        tracing::warn!(
                            file = HOST_FILE,
                            "{what} in {HOST_FILE} changed; it takes effect when the host restarts"
                        );
                    }
                }
                let limits = settings.limits;
                let changed: Vec<&str> = [
                    (limits != self.host_file, "default limits"),
                    (settings.secrets != self.host_file_secrets, "secret sources"),
                    (
                        settings.bucket_quotas != self.host_file_quotas,
                        "bucket quotas",
                    ),
                ]
                .into_iter()
                .filter_map(|(changed, what)| changed.then_some(what))
                .collect();
                if !changed.is_empty() {
                    tracing::info!(
                        file = HOST_FILE,
                        "{} changed; re-checking every service",
                        changed.join(", ")
                    );
                    self.host_file = limits;
                    self.host_file_secrets = settings.secrets;
                    self.host_file_quotas = settings.bucket_quotas;
                    self.applied.clear();
                    self.deployer.set_policy(self.policy());
                }
            }
            Err(err) => tracing::warn!(
                event = "reject",
                file = HOST_FILE,
                reason = %format!("{err:#}"),
                "rejected {HOST_FILE}; the previous defaults stay in force"
            ),
        }
    }

    /// Scans the directory and applies every change found. On the initial
    /// load (`initial`) every file present is taken as complete and the
    /// deploys are awaited; later, a file modified within the last
    /// [`QUIET_FALLBACK`] (being written, perhaps without events) is left to
    /// settle first, as is any file with events still settling.
    async fn rescan(&mut self, initial: bool) -> LoadReport {
        let started = Instant::now();
        self.initial = initial;
        let names = match scan_names(self.dir()) {
            Ok(names) => {
                if self.dir_missing {
                    tracing::info!(dir = %self.dir().display(), "services directory is back");
                    self.dir_missing = false;
                }
                names
            }
            Err(err) => {
                if !self.dir_missing {
                    tracing::warn!(
                        dir = %self.dir().display(),
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
        let mut deploys = Vec::new();
        for name in candidates {
            if self.pending.contains_key(&name) {
                continue;
            }
            let min_age = if initial {
                Duration::ZERO
            } else {
                QUIET_FALLBACK
            };
            if let Some(task) = self.sync(&name, min_age).await {
                deploys.push(task);
            }
        }
        self.initial = false;
        let mut report = LoadReport::default();
        if initial {
            for task in deploys {
                match task.await {
                    Ok(true) => report.deployed += 1,
                    _ => report.rejected += 1,
                }
            }
        }
        report.elapsed = started.elapsed();
        report
    }

    /// Re-examines `name` once it has been left alone for the longer settle
    /// time (no close-write seen).
    fn look_again_later(&mut self, name: &str) {
        self.pending.insert(
            name.to_string(),
            Pending {
                last_event: Instant::now(),
                complete: false,
            },
        );
    }

    /// Brings service `name` in line with its files, unless a file changed
    /// less than `min_age` ago (then it is marked pending, to settle).
    /// Returns the deploy task if one was started (it yields whether the
    /// deploy succeeded).
    async fn sync(&mut self, name: &str, min_age: Duration) -> Option<JoinHandle<bool>> {
        if let Err(reason) = validate_name(name) {
            if self.invalid_names.insert(name.to_string()) {
                let file = self.dir().join(format!("{name}.wasm"));
                self.deployer
                    .reject(name, &file.display().to_string(), reason);
            }
            return None;
        }
        let options = self.options.source.clone();
        let policy = self.policy();
        let last = self.applied.get(name).copied();
        let owned_name = name.to_string();
        let loaded = tokio::task::spawn_blocking(move || {
            files::load(&options, &owned_name, &policy, last, min_age)
        })
        .await
        .unwrap_or_else(|join| {
            Load::Bad(
                anyhow!("reading the files failed: {join}"),
                self.dir().join(format!("{name}.wasm")),
                None,
            )
        });
        match loaded {
            Load::Unchanged => None,
            Load::Settling => {
                self.look_again_later(name);
                None
            }
            Load::Gone => {
                self.applied.remove(name);
                self.deployer.undeploy(name, "its file was removed");
                self.deployer.forget_last_good(name).await;
                None
            }
            Load::Changed(_, _) if self.deployer.is_held(name) => {
                // The admin API is writing this service's files and deploys
                // them itself; look again later (after the longer settle
                // time, so a long compile is not polled tightly).
                self.look_again_later(name);
                None
            }
            Load::Changed(spec, fingerprint) => {
                self.applied.insert(name.to_string(), fingerprint);
                let unchanged = self
                    .deployer
                    .registry()
                    .snapshot()
                    .service(name)
                    .is_some_and(|current| {
                        Some(current.digest()) == spec.digest.as_deref()
                            && *current.config() == spec.config
                    });
                if unchanged {
                    return None;
                }
                let deployer = self.deployer.clone();
                let fallback = self.initial.then(|| self.fallback(name));
                Some(tokio::spawn(async move {
                    match deployer.deploy(*spec).await {
                        Ok(_) => true,
                        Err(err) => match fallback {
                            Some(fallback) => fallback.deploy(format!("{err:#}")).await,
                            None => false,
                        },
                    }
                }))
            }
            Load::Bad(err, file, fingerprint) => {
                let reason = format!("{err:#}");
                self.deployer
                    .reject(name, &file.display().to_string(), reason.clone());
                match fingerprint {
                    Some(fingerprint) => self.applied.insert(name.to_string(), fingerprint),
                    None => self.applied.remove(name),
                };
                if self.initial {
                    let fallback = self.fallback(name);
                    return Some(tokio::spawn(fallback.deploy(reason)));
                }
                None
            }
        }
    }
}

impl DirState {
    /// What serving `name` from its last good version needs.
    fn fallback(&self, name: &str) -> Fallback {
        Fallback {
            deployer: self.deployer.clone(),
            name: name.to_string(),
            component_path: self.dir().join(format!("{name}.wasm")),
            policy: self.policy(),
        }
    }
}

/// Serves a service from its last good version when its files are broken at
/// start.
struct Fallback {
    deployer: Arc<Deployer>,
    name: String,
    component_path: std::path::PathBuf,
    policy: HostPolicy,
}

impl Fallback {
    /// Deploys the last good version, if one is saved; `broken` says what is
    /// wrong with the files. Returns whether the service now serves.
    async fn deploy(self, broken: String) -> bool {
        let Some(saved) = self.deployer.last_good(&self.name).await else {
            return false;
        };
        // Secrets may be files: read off the async threads.
        let (text, name, policy) = (saved.manifest.clone(), self.name.clone(), self.policy);
        let config = tokio::task::spawn_blocking(move || {
            text.as_deref()
                .map(Manifest::parse)
                .transpose()
                .and_then(|manifest| manifest.unwrap_or_default().service_config(&name, &policy))
        })
        .await
        .unwrap_or_else(|join| Err(format!("reading it failed: {join}")));
        let config = match config {
            Ok(config) => config,
            Err(why) => {
                tracing::warn!(service = %self.name, "the saved last good manifest no longer applies: {why}");
                return false;
            }
        };
        let spec = ServiceSpec {
            name: self.name.clone(),
            wasm: saved.wasm,
            config,
            source: Some(self.component_path.clone()),
            digest: Some(saved.digest.clone()),
            manifest: saved.manifest.map(Arc::from),
        };
        match self.deployer.deploy(spec).await {
            Ok(deployment) => {
                tracing::warn!(
                    target: EVENTS,
                    event = "last-good",
                    service = %self.name,
                    generation = deployment.generation(),
                    digest = %saved.digest,
                    saved_at = %humantime::format_rfc3339_seconds(saved.saved_at),
                    file = %self.component_path.display(),
                    "{} is broken ({broken}); serving the last version that deployed, saved at {}",
                    self.component_path.display(),
                    humantime::format_rfc3339_seconds(saved.saved_at)
                );
                self.deployer.note_rejection(
                    &self.name,
                    format!("{broken} (serving the last good version, {})", saved.digest),
                );
                true
            }
            Err(_) => false,
        }
    }
}

/// What a raw notify event means for the watcher.
#[derive(Debug, PartialEq, Eq)]
enum Hint {
    /// Service `name` changed; `complete` if the change is known to be whole.
    Service { name: String, complete: bool },
    /// `wharf.toml` changed.
    HostFile,
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
    // Opening, reading or closing a file unmodified changes nothing (and
    // Wharf's own reads cause such events).
    if matches!(event.kind, EventKind::Access(kind) if kind != AccessKind::Close(AccessMode::Write))
    {
        return Vec::new();
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
        match file_role(file_name) {
            FileRole::Component(name) | FileRole::Manifest(name) => hints.push(Hint::Service {
                name: name.to_string(),
                complete,
            }),
            FileRole::HostFile => hints.push(Hint::HostFile),
            FileRole::Ignored => {}
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
/// Fails if the directory or its `wharf.toml` is unusable.
pub(crate) async fn load_and_watch(
    options: WatchOptions,
    deployer: Arc<Deployer>,
    watch: bool,
) -> Result<(LoadReport, Option<DirWatcher>)> {
    let dir = options.source.dir.clone();
    if !dir.is_dir() {
        return Err(anyhow!(
            "services directory {} does not exist or is not a directory",
            dir.display()
        ));
    }
    // Uploads a crash interrupted are completed (or their leftovers
    // removed) before anything in the directory is read.
    let recover_dir = dir.clone();
    match tokio::task::spawn_blocking(move || upload::recover(&recover_dir)).await {
        Ok(Ok(_)) => {}
        Ok(Err(err)) => tracing::error!(
            dir = %dir.display(),
            error = %format!("{err:#}"),
            "cannot clean up interrupted uploads"
        ),
        Err(join) => tracing::error!(error = %join, "cleaning up interrupted uploads failed"),
    }
    let settings = files::read_host_file(&dir)?.unwrap_or_default();
    let (events_tx, events_rx) = mpsc::channel(1024);
    // Watch before the initial scan, so nothing written during the load is
    // missed; early events just cause a redundant, idempotent sync.
    let fs_watcher = if watch {
        start_fs_watcher(&dir, events_tx.clone(), false)
    } else {
        None
    };
    let mut state = DirState {
        options,
        deployer,
        host_file: settings.limits,
        host_file_secrets: settings.secrets.clone(),
        host_file_quotas: settings.bucket_quotas.clone(),
        started_with: settings,
        applied: HashMap::new(),
        invalid_names: HashSet::new(),
        dir_missing: false,
        pending: HashMap::new(),
        initial: false,
    };
    state.deployer.set_policy(state.policy());
    if let Ok(present) = scan_names(&state.options.source.dir) {
        state.deployer.prune_last_good(present).await;
    }
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
    let mut next_rescan = Instant::now() + RESCAN_EVERY;
    let mut rescan_soon = false;
    let mut rewatch = false;
    let mut host_file_changed = false;
    loop {
        let soon = Instant::now() + SETTLE;
        let wake = state
            .pending
            .values()
            .map(Pending::ready_at)
            .chain(std::iter::once(if rescan_soon || host_file_changed {
                soon
            } else {
                next_rescan
            }))
            .min()
            .unwrap_or(next_rescan);
        tokio::select! {
            _ = stop.changed() => return,
            event = events.recv() => match event {
                Some(Ok(event)) => {
                    for hint in hints(&event, state.dir()) {
                        match hint {
                            Hint::Rescan => rescan_soon = true,
                            Hint::HostFile => host_file_changed = true,
                            Hint::DirChanged => {
                                rescan_soon = true;
                                rewatch = true;
                            }
                            Hint::Service { name, complete } => {
                                tracing::debug!(service = %name, complete, "file event");
                                state.pending.insert(name, Pending { last_event: Instant::now(), complete });
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

        if host_file_changed {
            host_file_changed = false;
            state.reload_host_file().await;
            rescan_soon = true;
        }

        let now = Instant::now();
        let ready: Vec<(String, bool)> = state
            .pending
            .iter()
            .filter(|(_, p)| p.ready_at() <= now)
            .map(|(name, p)| (name.clone(), p.complete))
            .collect();
        for (name, complete) in ready {
            tracing::debug!(service = %name, "settled; syncing");
            state.pending.remove(&name);
            // Without a "complete" event, the files must also look untouched
            // for a while; otherwise they go back to settling.
            let min_age = if complete {
                Duration::ZERO
            } else {
                QUIET_FALLBACK
            };
            state.sync(&name, min_age).await;
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
                fs_watcher = start_fs_watcher(state.dir(), events_tx.clone(), retry);
                rewatch = false;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use notify::event::{CreateKind, DataChange, RemoveKind};

    use super::*;

    fn event(kind: EventKind, paths: &[&str]) -> notify::Event {
        let mut event = notify::Event::new(kind);
        for path in paths {
            event = event.add_path(PathBuf::from(path));
        }
        event
    }

    #[test]
    fn events_become_hints() {
        let dir = Path::new("/srv");
        let close = EventKind::Access(AccessKind::Close(AccessMode::Write));
        assert_eq!(
            hints(&event(close, &["/srv/a.wasm"]), dir),
            [Hint::Service {
                name: "a".into(),
                complete: true
            }]
        );
        let write = EventKind::Modify(ModifyKind::Data(DataChange::Any));
        assert_eq!(
            hints(&event(write, &["/srv/a.toml"]), dir),
            [Hint::Service {
                name: "a".into(),
                complete: false
            }]
        );
        let created = EventKind::Create(CreateKind::File);
        assert_eq!(
            hints(&event(created, &["/srv/wharf.toml"]), dir),
            [Hint::HostFile]
        );
        assert!(hints(&event(created, &["/srv/.a.wasm.tmp"]), dir).is_empty());
        let opened = EventKind::Access(AccessKind::Open(AccessMode::Any));
        assert!(hints(&event(opened, &["/srv/a.wasm"]), dir).is_empty());
        let removed = EventKind::Remove(RemoveKind::Folder);
        assert_eq!(hints(&event(removed, &["/srv"]), dir), [Hint::DirChanged]);
    }
}
