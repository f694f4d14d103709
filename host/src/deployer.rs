//! Applies service changes — deploy, replace, remove — in order per service:
//! compiles on blocking threads, probes, installs into the registry, and logs
//! one structured line per event.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use anyhow::{Result, anyhow};
use tokio::sync::Semaphore;

use crate::deploy::{self, Deployment, ServiceSpec};
use crate::engine::Runtime;
use crate::invoke;
use crate::registry::Registry;

/// Compiles, probes and installs deployments; removes them.
pub(crate) struct Deployer {
    runtime: Arc<Runtime>,
    registry: Arc<Registry>,
    /// Bounds concurrent compilations: each one already uses every core.
    compile_permits: Semaphore,
    /// The latest attempt number per service. A deploy that finishes after a
    /// newer deploy or removal of the same service began is discarded, so
    /// the last change always wins whatever order compilations finish in.
    attempts: Mutex<HashMap<String, u64>>,
}

impl Deployer {
    pub(crate) fn new(runtime: Arc<Runtime>, registry: Arc<Registry>) -> Deployer {
        let parallelism = std::thread::available_parallelism().map_or(2, |n| n.get());
        Deployer {
            runtime,
            registry,
            compile_permits: Semaphore::new(parallelism),
            attempts: Mutex::new(HashMap::new()),
        }
    }

    pub(crate) fn runtime(&self) -> &Arc<Runtime> {
        &self.runtime
    }

    pub(crate) fn registry(&self) -> &Arc<Registry> {
        &self.registry
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
        let attempt = self.begin(&name);
        let built = self.build(spec).await;

        let attempts = self.attempts();
        if attempts.get(&name) != Some(&attempt) {
            tracing::info!(
                event = "superseded",
                service = %name,
                file = %source,
                "a newer change to this service arrived while it compiled; discarding this version"
            );
            return Err(anyhow!("superseded by a newer change to service {name:?}"));
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
                self.registry.record_rejection(&name, reason);
                Err(err)
            }
        }
    }

    /// Compiles on a blocking thread, then proves the component instantiates.
    async fn build(&self, spec: ServiceSpec) -> Result<Deployment> {
        let deployment = {
            // The semaphore is never closed.
            let _permit = self.compile_permits.acquire().await?;
            let runtime = self.runtime.clone();
            tokio::task::spawn_blocking(move || deploy::build(&runtime, spec))
                .await
                .map_err(|join| anyhow!("compilation task failed: {join}"))??
        };
        tracing::debug!(service = %deployment.name(), "compiled; probing");
        invoke::probe(&self.runtime, &deployment).await?;
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
