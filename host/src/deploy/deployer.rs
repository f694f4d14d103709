//! Applies service changes — deploy, replace, remove — in order per service:
//! compiles on blocking threads, probes, installs into the registry, and logs
//! one structured line per event.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use anyhow::{Result, anyhow};
use tokio::sync::Semaphore;

use crate::base::limits::Limits;
use crate::base::metrics::{DeployEvent, Metrics};
use crate::deploy::cache::CodeCaches;
use crate::deploy::deployment::{self, Deployment, ServiceSpec};
use crate::deploy::registry::Registry;
use crate::guest::engine::Runtime;
use crate::guest::invoke;

/// Compiles, probes and installs deployments; removes them.
pub(crate) struct Deployer {
    runtime: Arc<Runtime>,
    /// Compiled code of earlier deploys, per engine.
    caches: Arc<CodeCaches>,
    registry: Arc<Registry>,
    metrics: Arc<Metrics>,
    /// Bounds concurrent compilations: each one already uses every core.
    compile_permits: Semaphore,
    /// The latest attempt number per service. A deploy that finishes after a
    /// newer deploy or removal of the same service began is discarded, so
    /// the last change always wins whatever order compilations finish in.
    attempts: Mutex<HashMap<String, u64>>,
    /// Limits for services that set none, as currently in force (the
    /// directory's `wharf.toml` may change them).
    defaults: Mutex<Limits>,
    /// Services whose files the admin API is writing: the watcher leaves
    /// them alone until the write is deployed, so it never deploys the
    /// half-written state (a new component with the old manifest).
    held: Mutex<HashMap<String, usize>>,
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
        registry: Arc<Registry>,
        metrics: Arc<Metrics>,
        defaults: Limits,
    ) -> Deployer {
        let parallelism = std::thread::available_parallelism().map_or(2, |n| n.get());
        Deployer {
            runtime,
            caches: Arc::new(caches),
            registry,
            metrics,
            compile_permits: Semaphore::new(parallelism),
            attempts: Mutex::new(HashMap::new()),
            defaults: Mutex::new(defaults),
            held: Mutex::new(HashMap::new()),
        }
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

    /// Whether a writer holds `name` (see [`hold`](Deployer::hold)).
    pub(crate) fn is_held(&self, name: &str) -> bool {
        self.held().contains_key(name)
    }

    /// The limits in force for services that set none.
    pub(crate) fn defaults(&self) -> Limits {
        *self.defaults.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Changes the limits for services that set none.
    pub(crate) fn set_defaults(&self, limits: Limits) {
        *self.defaults.lock().unwrap_or_else(|e| e.into_inner()) = limits;
    }

    pub(crate) fn runtime(&self) -> &Arc<Runtime> {
        &self.runtime
    }

    pub(crate) fn registry(&self) -> &Arc<Registry> {
        &self.registry
    }

    pub(crate) fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Records a rejection found before compiling (unreadable files, a bad
    /// manifest): logged by the caller, counted and remembered here.
    pub(crate) fn record_rejection(&self, name: &str, reason: String) {
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
    pub(crate) async fn deploy(&self, spec: ServiceSpec) -> Result<Arc<Deployment>> {
        let name = spec.name.clone();
        let source = spec
            .source
            .as_ref()
            .map(|path| path.display().to_string())
            .unwrap_or_else(|| "<api>".to_string());
        let source_path = spec.source.clone();
        let attempt = self.begin(&name);
        let built = self.build(spec).await;

        let attempts = self.attempts();
        let same_as_current = |built: &Result<Deployment>| {
            let snapshot = self.registry.snapshot();
            match (built, snapshot.service(&name)) {
                (Ok(new), Some(current))
                    if new.digest() == current.digest() && new.config() == current.config() =>
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
                event = "superseded",
                service = %name,
                file = %source,
                "the file was removed while it compiled; discarding this version"
            );
            return Err(anyhow!("{} was removed while it compiled", path.display()));
        }
        let installed = built.and_then(|deployment| {
            let compile = deployment.compile_info();
            let (new, old) = self.registry.install(deployment)?;
            Ok((new, old, compile))
        });
        drop(attempts);
        match installed {
            Ok((new, old, compile)) => {
                let compile_ms = compile.duration.as_secs_f64() * 1000.0;
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
                        event = "replace",
                        service = %name,
                        generation = new.generation(),
                        previous = old.generation(),
                        digest = %new.digest(),
                        route = %new.route(),
                        compile_ms = format_args!("{compile_ms:.1}"),
                        cache = if compile.cache_hit { "hit" } else { "miss" },
                        memory_init = compile.memory_init.as_str(),
                        file = %source,
                        "service replaced"
                    ),
                    None => tracing::info!(
                        event = "deploy",
                        service = %name,
                        generation = new.generation(),
                        digest = %new.digest(),
                        route = %new.route(),
                        compile_ms = format_args!("{compile_ms:.1}"),
                        cache = if compile.cache_hit { "hit" } else { "miss" },
                        memory_init = compile.memory_init.as_str(),
                        file = %source,
                        "service deployed"
                    ),
                }
                Ok(new)
            }
            Err(err) => {
                let reason = format!("{err:#}");
                let kept = self
                    .registry
                    .snapshot()
                    .service(&name)
                    .map(|d| d.generation());
                match kept {
                    Some(generation) => tracing::warn!(
                        event = "reject",
                        service = %name,
                        file = %source,
                        reason = %reason,
                        "rejected {source}: {reason}; generation {generation} keeps serving"
                    ),
                    None => tracing::warn!(
                        event = "reject",
                        service = %name,
                        file = %source,
                        reason = %reason,
                        "rejected {source}: {reason}"
                    ),
                }
                self.record_rejection(&name, reason);
                Err(err)
            }
        }
    }

    /// Compiles and probes a service without installing it: whether
    /// [`deploy`](Deployer::deploy) would succeed, short of a route conflict
    /// or a newer change arriving meanwhile.
    pub(crate) async fn validate(&self, spec: ServiceSpec) -> Result<()> {
        let route = spec.config.route.clone();
        let name = spec.name.clone();
        if let Some(other) = self
            .registry
            .snapshot()
            .services()
            .find(|d| d.name() != name && *d.route() == route)
        {
            anyhow::bail!(
                "route {route} is already served by service {:?}",
                other.name()
            );
        }
        self.build(spec).await.map(drop)
    }

    /// Compiles on a blocking thread, then proves the component instantiates.
    async fn build(&self, spec: ServiceSpec) -> Result<Deployment> {
        let deployment = {
            // The semaphore is never closed.
            let _permit = self.compile_permits.acquire().await?;
            let runtime = self.runtime.clone();
            let caches = self.caches.clone();
            let metrics = self.metrics.service(&spec.name);
            tokio::task::spawn_blocking(move || deployment::build(&runtime, &caches, spec, metrics))
                .await
                .map_err(|join| anyhow!("compilation task failed: {join}"))??
        };
        tracing::debug!(service = %deployment.name(), "compiled; probing");
        invoke::probe(&self.runtime, deployment.guest()).await?;
        Ok(deployment)
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
