//! Turning a component into a deployment: compile (or load from the cache),
//! link against what Wharf provides, check its exports against its
//! triggers, and assemble the guest's policy from the service's settings.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context as _, Result, bail};

use crate::base::metrics::{KeyValueMetrics, ServiceMetrics};
use crate::capabilities::Backends;
use crate::capabilities::keyvalue::{KeyValueAccess, KeyValueLimits};
use crate::capabilities::messaging::MessagingAccess;
use crate::deploy::compile::cache::CodeCaches;
use crate::deploy::compile::deployment::{CompileInfo, Deployment, explain_link_error};
use crate::deploy::compile::tiering::{self, Compiled};
use crate::deploy::spec::{EVENTS, EXPOSE_ERRORS_VARIABLE, ServiceSpec, check_header, digest_of};
use crate::deploy::triggers::Triggers;
use crate::guest::engine::Runtime;
use crate::guest::source_map::SourceMapper;
use crate::guest::{Guest, GuestExports, GuestPolicy};

/// Compiles and links a service. Blocking and CPU-heavy: call it from a
/// blocking thread, never from an async worker.
pub(crate) fn build(
    runtime: &Runtime,
    caches: &CodeCaches,
    backends: &Backends,
    spec: ServiceSpec,
    metrics: Arc<ServiceMetrics>,
    keyvalue_metrics: Option<Arc<KeyValueMetrics>>,
) -> Result<Deployment> {
    check_header(&spec.wasm)?;
    let digest = spec.digest.unwrap_or_else(|| digest_of(&spec.wasm));
    let started = Instant::now();
    let Compiled {
        component,
        kind,
        cache_hit,
        baseline_refused,
    } = tiering::compile_first(runtime, caches, &spec.wasm, &digest)?;
    if let Some(reason) = baseline_refused {
        tracing::warn!(
            target: EVENTS,
            service = %spec.name,
            reason = %reason,
            "Winch cannot compile {}; compiled with Cranelift instead",
            spec.name
        );
    }
    let flavour = runtime.flavour(kind);
    let compile = CompileInfo {
        queued: Duration::ZERO,
        duration: started.elapsed(),
        cache_hit,
        memory_init: kind.init,
        optimised_at: None,
    };
    let instance_pre = flavour
        .linker()
        .instantiate_pre(&component)
        .map_err(|err| explain_link_error(&format!("{err:#}")))
        .context("the component needs imports Wharf does not provide")?;
    let exports = GuestExports::find(&instance_pre).map_err(anyhow::Error::msg)?;
    if spec.config.concurrent > 1 && exports.http3.is_none() {
        bail!(
            "instance.concurrent: {} needs a WASI 0.3 component (wasi:http/handler@0.3.0); this one is not, and serves one request per instance at a time",
            spec.config.concurrent
        );
    }
    check_triggers(&spec.config.triggers, &exports)?;
    let limits = spec.config.limits;
    let keyvalue = match (&backends.keyvalue, keyvalue_metrics) {
        (Some(backend), Some(keyvalue_metrics)) => Some(Arc::new(KeyValueAccess::new(
            Arc::from(spec.name.as_str()),
            backend.clone(),
            spec.config.keyvalue.clone(),
            KeyValueLimits {
                key_size: limits.kv_key_size,
                value_size: limits.kv_value_size,
                bucket_quota: limits.kv_bucket_quota,
                bucket_quotas: spec.config.bucket_quotas.clone(),
                max_buckets: limits.kv_max_buckets,
            },
            keyvalue_metrics,
        ))),
        _ => None,
    };
    let name: Arc<str> = spec.name.into();
    let messaging = backends.messaging.as_ref().map(|hub| {
        Arc::new(MessagingAccess::new(
            hub.clone(),
            spec.config.messaging.clone(),
            name.clone(),
        ))
    });
    let source_map = SourceMapper::find(&name, &spec.wasm).map(Arc::new);
    let mut env = spec.config.env.clone();
    if spec.config.http.expose_errors {
        env.retain(|(key, _)| key != EXPOSE_ERRORS_VARIABLE);
        env.push((EXPOSE_ERRORS_VARIABLE.to_string(), "1".to_string()));
    }
    let policy = GuestPolicy {
        name,
        env,
        limits,
        outbound: spec.config.outbound.clone(),
        keyvalue,
        config: spec.config.config.clone(),
        messaging,
        reuse: spec.config.reuse,
        concurrent: spec.config.concurrent,
        source_map,
    };
    Ok(Deployment {
        generation: 0,
        digest,
        source: spec.source,
        loaded_at: SystemTime::now(),
        config: spec.config,
        manifest: spec.manifest,
        compile,
        guest: Arc::new(Guest::new(
            policy,
            kind,
            instance_pre,
            exports,
            metrics,
            component,
        )),
    })
}

/// Checks that the component can be triggered the way its manifest says:
/// a message trigger without a path needs a messaging export, a schedule
/// an HTTP one, and a component without an HTTP export is only of use with
/// message triggers.
fn check_triggers(triggers: &Triggers, exports: &GuestExports) -> Result<()> {
    for (index, trigger) in triggers.messages.iter().enumerate() {
        if trigger.path.is_none() && exports.messages.is_none() {
            bail!(
                "trigger.message[{index}].path: missing; the component exports no messaging handler, so messages must be POSTed to a path of its wasi:http handler"
            );
        }
        if trigger.path.is_some() && !exports.serves_http() {
            bail!(
                "trigger.message[{index}].path: the component exports no wasi:http handler to POST messages to; drop the path to use its messaging export"
            );
        }
    }
    if !triggers.schedules.is_empty() && !exports.serves_http() {
        bail!(
            "trigger.schedule[0]: scheduled runs are POSTed to the component's wasi:http handler, and it exports none"
        );
    }
    if !exports.serves_http() && triggers.messages.is_empty() {
        bail!(
            "the component exports only a messaging handler, and its manifest has no [[trigger.message]] to call it"
        );
    }
    Ok(())
}
