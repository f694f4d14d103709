//! A compiled guest ready to run requests: the pre-instantiated component and
//! the policy every one of its instances runs under.

use std::sync::Arc;

use wasmtime::component::{Component, InstancePre};
use wasmtime_wasi_http::p2::bindings::ProxyIndices;
use wasmtime_wasi_http::p3::bindings::ServiceIndices;

use crate::base::admission::Gate;
use crate::base::limits::Limits;
use crate::base::metrics::ServiceMetrics;
use crate::capabilities::keyvalue::KeyValueAccess;
use crate::capabilities::messaging::{HandlerExports, MessagingAccess};
use crate::capabilities::outbound::OutboundPolicy;
use crate::capabilities::wasi_config::ConfigValues;
use crate::guest::engine::EngineKind;
use crate::guest::pools::{WarmPool, Workers};
use crate::guest::scheduler::ServiceCpu;
use crate::guest::source_map::SourceMapper;
use crate::guest::state::HostState;

/// One compiled, linked version of a service and what its requests may do:
/// limits, environment, outbound policy, request slots, instance reuse. It
/// knows nothing of files, routes or generations — that is the deploy
/// layer's [`Deployment`](crate::deploy::Deployment), which holds one.
pub struct Guest {
    /// The service name, for logs and guest output.
    name: Arc<str>,
    /// Environment variables the guest sees (and nothing else of the host's).
    env: Vec<(String, String)>,
    /// Time, memory, concurrency and body limits.
    limits: Limits,
    /// Where the guest may send HTTP requests.
    outbound: Arc<OutboundPolicy>,
    /// What it may do with the key-value store (`None`: nothing).
    keyvalue: Option<Arc<KeyValueAccess>>,
    /// What `wasi:config` gives it.
    config: Arc<ConfigValues>,
    /// What it may publish (`None`: nothing).
    messaging: Option<Arc<MessagingAccess>>,
    /// Requests one instance may serve in turn (1: always fresh).
    reuse: u32,
    /// Requests one instance of a WASI 0.3 service may serve at once.
    concurrent: u32,
    /// The source map the component carries, for its stack traces.
    source_map: Option<Arc<SourceMapper>>,
    /// Which engine runs it (chosen by its size and WASI version).
    engine: EngineKind,
    /// The component, linked and ready to instantiate.
    pre: InstancePre<HostState>,
    /// The handlers it exports.
    exports: GuestExports,
    /// This version's request slots (the `concurrency` limit), shared
    /// with the code of the same version compiled by another tier.
    admission: Arc<Gate>,
    /// The service's request metrics (shared by its versions).
    metrics: Arc<ServiceMetrics>,
    /// Idle instances kept for reuse (empty unless `reuse` > 1).
    warm: WarmPool,
    /// The instances of a WASI 0.3 service.
    workers: Workers,
    /// What the CPU scheduler remembers about this service.
    cpu: Arc<ServiceCpu>,
    /// The compiled code, shared by every service that runs it: held so
    /// the code cache knows it is in use.
    _code: Arc<Component>,
}

/// What a [`Guest`] is built from, besides its compiled component.
pub struct GuestPolicy {
    /// See [`Guest::name`].
    pub name: Arc<str>,
    /// See [`Guest::env`].
    pub env: Vec<(String, String)>,
    /// See [`Guest::limits`].
    pub limits: Limits,
    /// See [`Guest::outbound`].
    pub outbound: OutboundPolicy,
    /// Key-value access, if the service is granted any bucket.
    pub keyvalue: Option<Arc<KeyValueAccess>>,
    /// The service's configuration.
    pub config: Arc<ConfigValues>,
    /// Messaging access, if the host has a broker.
    pub messaging: Option<Arc<MessagingAccess>>,
    /// See [`Guest::reuse`].
    pub reuse: u32,
    /// See [`Guest::concurrent`].
    pub concurrent: u32,
    /// See [`Guest::source_map`].
    pub source_map: Option<Arc<SourceMapper>>,
}

/// The entry points a component exports, found once when it is deployed.
#[derive(Clone)]
pub struct GuestExports {
    /// `wasi:http/incoming-handler@0.2.x`: it serves HTTP requests, one
    /// per call.
    pub http: Option<ProxyIndices>,
    /// `wasi:http/handler@0.3.0`: it serves HTTP requests with async calls,
    /// maybe several at once.
    pub http3: Option<ServiceIndices>,
    /// A messaging handler: it takes messages through that export.
    pub messages: Option<HandlerExports>,
    /// The wasi:http handler interface it exports, with its version (for
    /// the service list; also one Wharf does not serve).
    pub http_export: Option<String>,
}

impl GuestExports {
    /// What `pre`'s component exports; an error if it exports no handler
    /// Wharf can call at all.
    pub fn find(pre: &InstancePre<HostState>) -> Result<GuestExports, String> {
        let http = ProxyIndices::new(pre).ok();
        let http3 = ServiceIndices::new(pre).ok();
        let messages = HandlerExports::find(pre);
        let http_export = export_names(pre.component())
            .into_iter()
            .find(|name| is_http_handler(name));
        if http.is_some() && http3.is_some() {
            return Err(
                "the component exports both wasi:http/incoming-handler@0.2.x and wasi:http/handler@0.3.0; \
                 a service answers HTTP through one of them: build it for WASI 0.2 or for WASI 0.3"
                    .to_string(),
            );
        }
        if http.is_none() && http3.is_none() && messages.is_none() {
            return Err(format!(
                "the component exports neither wasi:http/incoming-handler@0.2.x (the wasi:http/proxy world), \
                 wasi:http/handler@0.3.0 (the wasi:http/service world) \
                 nor a messaging handler (wasi:messaging/incoming-handler@0.2.0-draft, wasmcloud:messaging/handler@0.2.0){}",
                match &http_export {
                    Some(name) =>
                        format!("; it exports {name}, a version this Wharf does not serve"),
                    None => String::new(),
                }
            ));
        }
        Ok(GuestExports {
            http,
            http3,
            messages,
            http_export,
        })
    }

    /// Whether the component answers HTTP requests (WASI 0.2 or 0.3).
    pub fn serves_http(&self) -> bool {
        self.http.is_some() || self.http3.is_some()
    }
}

impl Guest {
    /// A guest running `pre` under `policy` on the engine of `engine`.
    pub(crate) fn new(
        policy: GuestPolicy,
        engine: EngineKind,
        pre: InstancePre<HostState>,
        exports: GuestExports,
        metrics: Arc<ServiceMetrics>,
        code: Arc<Component>,
    ) -> Guest {
        Guest {
            _code: code,
            admission: Arc::new(Gate::new(
                policy.limits.concurrency as usize,
                "request slots",
            )),
            name: policy.name,
            env: policy.env,
            limits: policy.limits,
            outbound: Arc::new(policy.outbound),
            keyvalue: policy.keyvalue,
            config: policy.config,
            messaging: policy.messaging,
            reuse: policy.reuse,
            concurrent: policy.concurrent,
            source_map: policy.source_map,
            engine,
            pre,
            exports,
            metrics,
            warm: WarmPool::default(),
            workers: Workers::default(),
            cpu: Arc::default(),
        }
    }

    /// The same version and policy run by other compiled code (`pre`, for
    /// `engine`): optimised code taking over from baseline code. It shares
    /// this guest's request slots, metrics, CPU record and what the guest
    /// has shown about reuse, so the swap changes no limit, and starts with
    /// no warm instance.
    pub(crate) fn recompiled(
        &self,
        engine: EngineKind,
        pre: InstancePre<HostState>,
        exports: GuestExports,
        code: Arc<Component>,
    ) -> Guest {
        Guest {
            _code: code,
            name: self.name.clone(),
            env: self.env.clone(),
            limits: self.limits,
            outbound: self.outbound.clone(),
            keyvalue: self.keyvalue.clone(),
            config: self.config.clone(),
            messaging: self.messaging.clone(),
            reuse: self.reuse,
            concurrent: self.concurrent,
            source_map: self.source_map.clone(),
            engine,
            pre,
            exports,
            admission: self.admission.clone(),
            metrics: self.metrics.clone(),
            warm: self.warm.successor(),
            workers: Workers::default(),
            cpu: self.cpu.clone(),
        }
    }

    /// The source map the component carries, if any.
    pub(crate) fn source_map(&self) -> Option<&Arc<SourceMapper>> {
        self.source_map.as_ref()
    }

    /// The service name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The service name, shareable.
    pub(crate) fn name_arc(&self) -> &Arc<str> {
        &self.name
    }

    /// The environment variables the guest sees.
    pub fn env(&self) -> &[(String, String)] {
        &self.env
    }

    /// The limits every request runs under.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Where the guest may send HTTP requests.
    pub(crate) fn outbound(&self) -> &Arc<OutboundPolicy> {
        &self.outbound
    }

    /// Its key-value access, if granted any bucket.
    pub(crate) fn keyvalue(&self) -> Option<&Arc<KeyValueAccess>> {
        self.keyvalue.as_ref()
    }

    /// Its configuration.
    pub(crate) fn config(&self) -> &Arc<ConfigValues> {
        &self.config
    }

    /// What it may publish, if the host has a broker.
    pub(crate) fn messaging(&self) -> Option<&Arc<MessagingAccess>> {
        self.messaging.as_ref()
    }

    /// The handlers the component exports.
    pub fn exports(&self) -> &GuestExports {
        &self.exports
    }

    /// Requests one instance may serve in turn.
    pub fn reuse(&self) -> u32 {
        self.reuse
    }

    /// Requests one instance of a WASI 0.3 service may serve at once.
    pub fn concurrent(&self) -> u32 {
        self.concurrent
    }

    /// The instances of a WASI 0.3 service.
    pub(crate) fn workers(&self) -> &Workers {
        &self.workers
    }

    /// The engine it runs on.
    pub fn engine_kind(&self) -> EngineKind {
        self.engine
    }

    pub(crate) fn pre(&self) -> &InstancePre<HostState> {
        &self.pre
    }

    /// The request slots of this version.
    pub fn admission(&self) -> &Gate {
        &self.admission
    }

    /// The service's request metrics.
    pub fn metrics(&self) -> &Arc<ServiceMetrics> {
        &self.metrics
    }

    /// Idle instances kept for reuse.
    pub(crate) fn warm(&self) -> &WarmPool {
        &self.warm
    }

    /// Whether requests may run on reused instances: the manifest asked for
    /// reuse and the guest has not shown it fails on a reused instance.
    pub fn reuses_instances(&self) -> bool {
        self.reuse > 1 && self.warm.enabled()
    }

    /// Instances kept for reuse right now: idle ones of a WASI 0.2 service,
    /// live ones of a WASI 0.3 service.
    pub fn warm_instances(&self) -> usize {
        self.warm.len() + self.workers.len()
    }

    /// What the CPU scheduler remembers about this service.
    pub(crate) fn cpu(&self) -> &Arc<ServiceCpu> {
        &self.cpu
    }

    /// Drops warm instances that have idled too long.
    pub fn sweep_idle(&self) {
        self.warm.sweep();
    }
}

/// The names of the interfaces and functions `component` exports.
pub(crate) fn export_names(component: &Component) -> Vec<String> {
    component
        .component_type()
        .exports(component.engine())
        .map(|(name, _)| name.to_string())
        .collect()
}

/// Whether `export` is a wasi:http handler interface, of any version.
pub(crate) fn is_http_handler(export: &str) -> bool {
    export.starts_with("wasi:http/incoming-handler@") || export.starts_with("wasi:http/handler@")
}
