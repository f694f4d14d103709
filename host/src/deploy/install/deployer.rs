//! Applies service changes — deploy, replace, remove — in order per service:
//! compiles on blocking threads, probes, installs into the registry, and logs
//! one structured line per event.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, Weak};

use anyhow::{Result, anyhow};

use crate::base::limits::{Limits, format_size};
use crate::base::metrics::{DeployEvent, Metrics};
use crate::capabilities::Backends;
use crate::deploy::compile::cache::CodeCaches;
use crate::deploy::compile::compiler::Compiler;
use crate::deploy::compile::deployment::Deployment;
use crate::deploy::compile::link;
use crate::deploy::compile::tiering;
use crate::deploy::install::last_good::{LastGood, Saved};
use crate::deploy::install::registry::Registry;
use crate::deploy::spec::HostPolicy;
use crate::deploy::spec::{EVENTS, ServiceSpec};
use crate::guest::engine::{Runtime, Tier, Tiers};
use crate::guest::invoke;

/// Longest a deploy waits for the broker to say who owns a group.
const GROUP_CLAIM_WAIT: std::time::Duration = std::time::Duration::from_secs(3);

/// Why trigger `index` may not use `group`: `owner` has it.
pub(crate) fn group_taken(index: usize, group: &str, owner: &str) -> String {
    format!(
        "trigger.message[{index}].group: group {group:?} belongs to service {owner:?}, which subscribed it first; choose another group (an operator can release it with DELETE /messages/groups/{group})"
    )
}

/// Compiles, probes and installs deployments; removes them.
pub(crate) struct Deployer {
    runtime: Arc<Runtime>,
    /// Compiled code of earlier deploys, per engine.
    caches: Arc<CodeCaches>,
    /// The backends guests' capabilities use.
    backends: Backends,
    registry: Arc<Registry>,
    metrics: Arc<Metrics>,
    /// Where compiles run: a lane for small components and one for large.
    compiler: Compiler,
    /// The latest attempt number per service. A deploy that finishes after a
    /// newer deploy or removal of the same service began is discarded, so
    /// the last change always wins whatever order compilations finish in.
    attempts: Mutex<HashMap<String, u64>>,
    /// Limits for services that set none and what the operator hands out,
    /// as currently in force (the directory's `wharf.toml` may change them).
    policy: Mutex<Arc<HostPolicy>>,
    /// Services whose files the admin API is writing: the watcher leaves
    /// them alone until the write is deployed, so it never deploys the
    /// half-written state (a new component with the old manifest).
    held: Mutex<HashMap<String, usize>>,
    /// One lock per service whose files a writer (the admin API) changes:
    /// writes to one service take turns, so the last complete one wins
    /// whole, never half of one and half of another.
    file_locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// The last version of each service that deployed from a file, kept
    /// across restarts (with a data directory).
    last_good: Option<LastGood>,
    /// Saves to `last_good` take turns, each checking it is still current.
    saving: tokio::sync::Mutex<()>,
}

/// Logs that service `name`'s optimising compile failed: its Winch code
/// keeps serving.
fn optimise_failed(name: &str, err: &anyhow::Error) {
    tracing::warn!(
        target: EVENTS,
        event = "optimise-failed",
        service = %name,
        reason = %format!("{err:#}"),
        "the optimising compile failed; the Winch code keeps serving"
    );
}

/// Keeps the watcher off one service while it lives; see
/// [`Deployer::hold`].
pub(crate) struct Hold<'a> {
    deployer: &'a Deployer,
    name: String,
}

impl Drop for Hold<'_> {
    fn drop(&mut self) {
        let mut held = self.deployer.held();
        if let Some(count) = held.get_mut(&self.name) {
            *count -= 1;
            if *count == 0 {
                held.remove(&self.name);
            }
        }
    }
}

impl Deployer {
    pub(crate) fn new(
        runtime: Arc<Runtime>,
        caches: CodeCaches,
        backends: Backends,
        registry: Arc<Registry>,
        metrics: Arc<Metrics>,
        policy: HostPolicy,
        data_dir: Option<&std::path::Path>,
    ) -> Result<Deployer> {
        Ok(Deployer {
            runtime,
            caches: Arc::new(caches),
            backends,
            registry,
            metrics,
            compiler: Compiler::new()?,
            attempts: Mutex::new(HashMap::new()),
            policy: Mutex::new(Arc::new(policy)),
            held: Mutex::new(HashMap::new()),
            file_locks: Mutex::new(HashMap::new()),
            last_good: data_dir.map(LastGood::new),
            saving: tokio::sync::Mutex::new(()),
        })
    }

    fn held(&self) -> MutexGuard<'_, HashMap<String, usize>> {
        // A plain map of counters: consistent between statements.
        self.held.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Keeps the directory watcher from deploying `name` until the returned
    /// guard is dropped: for writers that change several of its files and
    /// deploy the result themselves.
    pub(crate) fn hold(&self, name: &str) -> Hold<'_> {
        *self.held().entry(name.to_string()).or_insert(0) += 1;
        Hold {
            deployer: self,
            name: name.to_string(),
        }
    }

    /// Remembers why the files of `name` are not what serves, without
    /// logging again (the rejection was logged when it happened).
    pub(crate) fn note_rejection(&self, name: &str, reason: String) {
        self.registry.record_rejection(name, reason);
    }

    /// Waits for the turn to change service `name`'s files; the turn lasts
    /// as long as the guard.
    pub(crate) async fn lock_files(&self, name: &str) -> tokio::sync::OwnedMutexGuard<()> {
        let lock = {
            let mut locks = self.file_locks.lock().unwrap_or_else(|e| e.into_inner());
            locks.entry(name.to_string()).or_default().clone()
        };
        lock.lock_owned().await
    }

    /// Whether a writer holds `name` (see [`hold`](Deployer::hold)).
    pub(crate) fn is_held(&self, name: &str) -> bool {
        self.held().contains_key(name)
    }

    /// The limits in force for services that set none.
    pub(crate) fn defaults(&self) -> Limits {
        self.policy().defaults
    }

    /// The host's policy in force: default limits, secret sources.
    pub(crate) fn policy(&self) -> Arc<HostPolicy> {
        self.policy
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Changes the host's policy (for deploys from now on).
    pub(crate) fn set_policy(&self, policy: HostPolicy) {
        *self.policy.lock().unwrap_or_else(|e| e.into_inner()) = Arc::new(policy);
    }

    pub(crate) fn runtime(&self) -> &Arc<Runtime> {
        &self.runtime
    }

    /// The backends guests' capabilities use.
    pub(crate) fn backends(&self) -> &Backends {
        &self.backends
    }

    pub(crate) fn registry(&self) -> &Arc<Registry> {
        &self.registry
    }

    pub(crate) fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Rejects a new version of service `name` whose `file` is unusable:
    /// logs one line of the same shape for every kind of rejection (a bad
    /// component, a bad manifest, an unreadable file, a reserved name),
    /// counts it and remembers it for the service list. The previous
    /// version, if any, keeps serving.
    pub(crate) fn reject(&self, name: &str, file: &str, reason: String) {
        // A reason that already starts with the file is not prefixed twice.
        let what = if reason.starts_with(file) {
            reason.clone()
        } else {
            format!("{file}: {reason}")
        };
        let kept = self
            .registry
            .snapshot()
            .service(name)
            .map(|d| d.generation());
        match kept {
            Some(generation) => tracing::warn!(
                target: EVENTS,
                event = "reject",
                service = %name,
                file = %file,
                reason = %reason,
                "rejected {what}; generation {generation} keeps serving"
            ),
            None => tracing::warn!(
                target: EVENTS,
                event = "reject",
                service = %name,
                file = %file,
                reason = %reason,
                "rejected {what}"
            ),
        }
        self.metrics.deploy_event(name, DeployEvent::Reject);
        self.registry.record_rejection(name, reason);
    }

    fn attempts(&self) -> MutexGuard<'_, HashMap<String, u64>> {
        // Plain counters: consistent whatever a panicking holder was doing.
        self.attempts.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn begin(&self, name: &str) -> u64 {
        let mut attempts = self.attempts();
        let attempt = attempts.entry(name.to_string()).or_insert(0);
        *attempt += 1;
        *attempt
    }

    /// Deploys (or replaces) a service. On failure nothing changes: the
    /// previous version, if any, keeps serving, and the rejection is logged
    /// and recorded.
    pub(crate) async fn deploy(self: &Arc<Self>, spec: ServiceSpec) -> Result<Arc<Deployment>> {
        let name = spec.name.clone();
        let wasm = spec.wasm.clone();
        let source = spec
            .source
            .as_ref()
            .map(|path| path.display().to_string())
            .unwrap_or_else(|| "<api>".to_string());
        let source_path = spec.source.clone();
        // What the last-good store keeps if this version deploys from a file.
        let keep = spec
            .source
            .is_some()
            .then(|| (spec.wasm.clone(), spec.manifest.clone()));
        let attempt = self.begin(&name);
        let built = match self.build(spec).await {
            Ok(deployment) => self.claim_groups(&deployment).await.map(|()| deployment),
            Err(err) => Err(err),
        };

        // Decided under the attempts lock, so no newer change can slip in
        // between the check and the install.
        let installed = {
            let attempts = self.attempts();
            let same_as_current = |built: &Result<Deployment>| {
                let snapshot = self.registry.snapshot();
                match (built, snapshot.service(&name)) {
                    // The manifest's text too: it is what `/services` and
                    // the cluster show, so an edit that resolves to the
                    // same settings still replaces it.
                    (Ok(new), Some(current))
                        if new.digest() == current.digest()
                            && new.config() == current.config()
                            && new.manifest() == current.manifest() =>
                    {
                        Some(current.clone())
                    }
                    _ => None,
                }
            };
            // The same version arrived twice (say through the admin API and then
            // its file): nothing to replace.
            if let Some(current) = same_as_current(&built) {
                return Ok(current);
            }
            if attempts.get(&name) != Some(&attempt) {
                tracing::info!(
                    target: EVENTS,
                    event = "superseded",
                    service = %name,
                    file = %source,
                    "a newer change to this service arrived while it compiled; discarding this version"
                );
                return Err(anyhow!("superseded by a newer change to service {name:?}"));
            }
            // The file was removed while it compiled (its removal may already
            // have been applied): installing it now would bring back a deleted
            // service.
            if let Some(path) = &source_path
                && !path.exists()
            {
                tracing::info!(
                    target: EVENTS,
                    event = "superseded",
                    service = %name,
                    file = %source,
                    "the file was removed while it compiled; discarding this version"
                );
                return Err(anyhow!("{} was removed while it compiled", path.display()));
            }
            built.and_then(|deployment| {
                let compile = deployment.compile_info();
                let (new, old) = self.registry.install(deployment)?;
                Ok((new, old, compile))
            })
        };
        match installed {
            Ok((new, old, compile)) => {
                let compile_ms = compile.duration.as_secs_f64() * 1000.0;
                let queue_ms = compile.queued.as_secs_f64() * 1000.0;
                self.metrics
                    .compiled(&name, compile.duration, compile.cache_hit);
                let event = if old.is_some() {
                    DeployEvent::Replace
                } else {
                    DeployEvent::Deploy
                };
                self.metrics.deploy_event(&name, event);
                match old {
                    Some(old) => tracing::info!(
                        target: EVENTS,
                        event = "replace",
                        service = %name,
                        generation = new.generation(),
                        previous = old.generation(),
                        digest = %new.digest(),
                        route = %new.route(),
                        queue_ms = format_args!("{queue_ms:.1}"),
                        compile_ms = format_args!("{compile_ms:.1}"),
                        cache = if compile.cache_hit { "hit" } else { "miss" },
                        memory_init = compile.memory_init.as_str(),
                        tier = new.tier().as_str(),
                        file = %source,
                        "service replaced"
                    ),
                    None => tracing::info!(
                        target: EVENTS,
                        event = "deploy",
                        service = %name,
                        generation = new.generation(),
                        digest = %new.digest(),
                        route = %new.route(),
                        queue_ms = format_args!("{queue_ms:.1}"),
                        compile_ms = format_args!("{compile_ms:.1}"),
                        cache = if compile.cache_hit { "hit" } else { "miss" },
                        memory_init = compile.memory_init.as_str(),
                        tier = new.tier().as_str(),
                        file = %source,
                        "service deployed"
                    ),
                }
                if new.tier() == Tier::Baseline && self.runtime.tiers() == Tiers::Tiered {
                    self.optimise_later(&new, wasm);
                }
                if let Some((wasm, manifest)) = keep {
                    self.save_last_good(&new, wasm, manifest).await;
                }
                Ok(new)
            }
            Err(err) => {
                self.reject(&name, &source, format!("{err:#}"));
                Err(err)
            }
        }
    }

    /// Compiles `baseline` — just installed from Winch code — with
    /// Cranelift in the background lane (after the runtime's optimise
    /// delay), and swaps the optimised version in if `baseline` still
    /// serves by then. Nothing holds the host or `baseline` alive meanwhile.
    fn optimise_later(self: &Arc<Self>, baseline: &Arc<Deployment>, wasm: Arc<[u8]>) {
        let deployer = Arc::downgrade(self);
        let baseline = Arc::downgrade(baseline);
        let delay = self.runtime.optimise_delay();
        tokio::spawn(async move {
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            if let Some(deployer) = deployer.upgrade() {
                deployer.optimise(baseline, wasm).await;
            }
        });
    }

    /// See [`optimise_later`](Deployer::optimise_later).
    async fn optimise(&self, baseline: Weak<Deployment>, wasm: Arc<[u8]>) {
        // Whether `baseline` still serves: a newer version or a removal
        // makes its optimised code worthless.
        let serving = |baseline: &Weak<Deployment>| {
            let baseline = baseline.upgrade()?;
            let snapshot = self.registry.snapshot();
            let current = snapshot.service(baseline.name())?;
            Arc::ptr_eq(current, &baseline).then_some(baseline)
        };
        let Some(name) = baseline.upgrade().map(|d| d.name().to_string()) else {
            return;
        };
        let (runtime, caches) = (self.runtime.clone(), self.caches.clone());
        let compiled = self
            .compiler
            .run_background(
                &name,
                || {
                    let current = serving(&baseline)?;
                    tracing::info!(
                        target: EVENTS,
                        event = "optimising",
                        service = %name,
                        generation = current.generation(),
                        digest = %current.digest(),
                        "compiling {name} with Cranelift in the background; Winch code serves meanwhile"
                    );
                    Some(current)
                },
                move |current| tiering::optimise(&runtime, &caches, &current, &wasm),
            )
            .await;
        let (optimised, times) = match compiled {
            Ok(Some(done)) => done,
            Ok(None) => {
                tracing::info!(
                    target: EVENTS,
                    event = "superseded",
                    service = %name,
                    "a newer change to this service arrived before its optimising compile began; not optimising the old version"
                );
                return;
            }
            Err(err) => return optimise_failed(&name, &err),
        };
        if let Err(err) = invoke::probe(&self.runtime, optimised.guest()).await {
            return optimise_failed(
                &name,
                &err.context("the optimised code does not instantiate"),
            );
        }
        // Under the attempts lock, as an install is; the registry swaps only
        // if the Winch version still serves.
        let swapped = baseline.upgrade().and_then(|current| {
            let _attempts = self.attempts();
            self.registry.replace_tier(optimised, &current)
        });
        let Some(new) = swapped else {
            tracing::info!(
                target: EVENTS,
                event = "superseded",
                service = %name,
                "a newer change to this service arrived while Cranelift compiled it; discarding the optimised code of the old version"
            );
            return;
        };
        let compile_ms = times.compiled.as_secs_f64() * 1000.0;
        self.metrics.compiled(&name, times.compiled, false);
        tracing::info!(
            target: EVENTS,
            event = "optimise",
            service = %name,
            generation = new.generation(),
            digest = %new.digest(),
            queue_ms = format_args!("{:.1}", times.queued.as_secs_f64() * 1000.0),
            compile_ms = format_args!("{compile_ms:.1}"),
            tier = Tier::Optimised.as_str(),
            "service now runs Cranelift-optimised code; the Winch code finishes its requests"
        );
    }

    /// Compiles and probes a service without installing it: whether
    /// [`deploy`](Deployer::deploy) would succeed, short of a route conflict
    /// or a newer change arriving meanwhile. Returns the compiled, uninstalled
    /// deployment.
    pub(crate) async fn validate(&self, spec: ServiceSpec) -> Result<Deployment> {
        let route = spec.config.route.clone();
        let name = spec.name.clone();
        if let Some(other) = self
            .registry
            .snapshot()
            .route_owner(&route)
            .filter(|d| d.name() != name)
        {
            anyhow::bail!(
                "route {route} is already served by service {:?}",
                other.name()
            );
        }
        self.build(spec).await
    }

    /// Compiles in the lane for its size, then proves the component
    /// instantiates.
    async fn build(&self, spec: ServiceSpec) -> Result<Deployment> {
        let (wanted, most) = (spec.config.limits.memory, self.runtime.max_service_memory());
        if wanted > most {
            anyhow::bail!(
                "limits.memory is {} but this host lets one service have at most {} (--max-service-memory)",
                format_size(wanted),
                format_size(most)
            );
        }
        let runtime = self.runtime.clone();
        let caches = self.caches.clone();
        let backends = self.backends.clone();
        let metrics = self.metrics.service(&spec.name);
        // Created only for services granted a bucket: the others would
        // fill /metrics with zeros.
        let keyvalue_metrics = match (&self.backends.keyvalue, spec.config.keyvalue.is_empty()) {
            (Some(backend), false) => Some(self.metrics.keyvalue(&spec.name, backend.kind())),
            _ => None,
        };
        let name = spec.name.clone();
        let size = spec.wasm.len();
        let (mut deployment, times) = self
            .compiler
            .run(&name, size, move || {
                link::build(
                    &runtime,
                    &caches,
                    &backends,
                    spec,
                    metrics,
                    keyvalue_metrics,
                )
            })
            .await?;
        deployment.set_queued(times.queued);
        tracing::debug!(service = %deployment.name(), "compiled; probing");
        invoke::probe(&self.runtime, deployment.guest()).await?;
        Ok(deployment)
    }

    /// Claims the consumer groups of `deployment`'s message triggers on the
    /// broker: a group belongs to the service that first subscribed it
    /// (on every host sharing the broker, across restarts), and a version
    /// naming another service's group is refused. A broker that does not
    /// answer in time does not hold the deploy up: each trigger claims its
    /// group again before it joins, and stays off if it is not its own.
    async fn claim_groups(&self, deployment: &Deployment) -> Result<()> {
        let Some(hub) = &self.backends.messaging else {
            return Ok(());
        };
        let name = deployment.name();
        for (index, trigger) in deployment.config().triggers.messages.iter().enumerate() {
            let group = trigger.group();
            let claim = hub.broker().claim_group(group, name);
            match tokio::time::timeout(GROUP_CLAIM_WAIT, claim).await {
                Ok(Ok(owner)) if owner == name => {}
                Ok(Ok(owner)) => anyhow::bail!("{}", group_taken(index, group, &owner)),
                Ok(Err(err)) => tracing::warn!(
                    service = %name,
                    group = %group,
                    "cannot check who owns the group now ({err}); its trigger checks again before it joins"
                ),
                Err(_) => tracing::warn!(
                    service = %name,
                    group = %group,
                    "the broker did not say in time who owns the group; its trigger checks again before it joins"
                ),
            }
        }
        Ok(())
    }

    /// Saves `deployment` (whose component is `wasm`, its manifest
    /// `manifest`) as its service's last good version, if it is still the
    /// one serving once its turn comes. A failure is logged: the store is a
    /// safety net, not a reason to fail a deploy.
    async fn save_last_good(
        &self,
        deployment: &Arc<Deployment>,
        wasm: Arc<[u8]>,
        manifest: Option<Arc<str>>,
    ) {
        let Some(store) = self.last_good.clone() else {
            return;
        };
        let _turn = self.saving.lock().await;
        let name = deployment.name().to_string();
        let digest = deployment.digest().to_string();
        let current = self
            .registry
            .snapshot()
            .service(&name)
            // The same generation: a tier swap keeps it.
            .is_some_and(|d| d.generation() == deployment.generation());
        if !current {
            return;
        }
        let saved = tokio::task::spawn_blocking(move || {
            store.save(&name, &wasm, &digest, manifest.as_deref())
        })
        .await;
        match saved {
            Ok(Ok(())) => {}
            Ok(Err(err)) => tracing::warn!(
                service = %deployment.name(),
                error = %format!("{err:#}"),
                "cannot save the last good version"
            ),
            Err(join) => tracing::warn!(error = %join, "saving the last good version failed"),
        }
    }

    /// The last good version saved for `name`, if any.
    pub(crate) async fn last_good(&self, name: &str) -> Option<Saved> {
        let store = self.last_good.clone()?;
        let name = name.to_string();
        tokio::task::spawn_blocking(move || store.load(&name))
            .await
            .ok()
            .flatten()
    }

    /// Forgets the last good versions of services not in `present`.
    pub(crate) async fn prune_last_good(&self, present: std::collections::HashSet<String>) {
        let Some(store) = self.last_good.clone() else {
            return;
        };
        let _turn = self.saving.lock().await;
        if let Ok(Err(err)) = tokio::task::spawn_blocking(move || store.prune(&present)).await {
            tracing::warn!(error = %format!("{err:#}"), "cannot prune the last good versions");
        }
    }

    /// Forgets the last good version of `name` (its files were removed).
    pub(crate) async fn forget_last_good(&self, name: &str) {
        let Some(store) = self.last_good.clone() else {
            return;
        };
        let _turn = self.saving.lock().await;
        let owned = name.to_string();
        if let Ok(Err(err)) = tokio::task::spawn_blocking(move || store.remove(&owned)).await {
            tracing::warn!(service = %name, error = %format!("{err:#}"), "cannot forget the last good version");
        }
    }

    /// Removes a service; requests already running finish on it.
    pub(crate) fn undeploy(&self, name: &str, why: &str) -> Option<Arc<Deployment>> {
        let _attempt = self.begin(name);
        let attempts = self.attempts();
        let removed = self.registry.remove(name);
        drop(attempts);
        self.registry.clear_rejection(name);
        if let Some(removed) = &removed {
            self.metrics.deploy_event(name, DeployEvent::Remove);
            tracing::info!(
                target: EVENTS,
                event = "remove",
                service = %name,
                generation = removed.generation(),
                digest = %removed.digest(),
                "service removed: {why}"
            );
        }
        removed
    }
}
