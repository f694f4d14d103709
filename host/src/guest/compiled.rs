//! A compiled guest ready to run requests: the pre-instantiated component and
//! the policy every one of its instances runs under.

use std::sync::Arc;

use wasmtime_wasi_http::p2::bindings::ProxyPre;

use crate::base::admission::Gate;
use crate::base::limits::Limits;
use crate::base::metrics::ServiceMetrics;
use crate::capabilities::config::ConfigValues;
use crate::capabilities::keyvalue::KeyValueAccess;
use crate::capabilities::outbound::OutboundPolicy;
use crate::guest::engine::MemoryInit;
use crate::guest::instance::WarmPool;
use crate::guest::scheduler::ServiceCpu;
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
    /// Requests one instance may serve in turn (1: always fresh).
    reuse: u32,
    /// Which engine runs it (chosen by its size).
    memory_init: MemoryInit,
    /// The component, linked and ready to instantiate.
    pre: ProxyPre<HostState>,
    /// This version's request slots (the `concurrency` limit).
    admission: Gate,
    /// The service's request metrics (shared by its versions).
    metrics: Arc<ServiceMetrics>,
    /// Idle instances kept for reuse (empty unless `reuse` > 1).
    warm: WarmPool,
    /// What the CPU scheduler remembers about this service.
    cpu: Arc<ServiceCpu>,
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
    /// See [`Guest::reuse`].
    pub reuse: u32,
}

impl Guest {
    /// A guest running `pre` under `policy` on the engine for `memory_init`.
    pub(crate) fn new(
        policy: GuestPolicy,
        memory_init: MemoryInit,
        pre: ProxyPre<HostState>,
        metrics: Arc<ServiceMetrics>,
    ) -> Guest {
        Guest {
            admission: Gate::new(policy.limits.concurrency as usize, "request slots"),
            name: policy.name,
            env: policy.env,
            limits: policy.limits,
            outbound: Arc::new(policy.outbound),
            keyvalue: policy.keyvalue,
            config: policy.config,
            reuse: policy.reuse,
            memory_init,
            pre,
            metrics,
            warm: WarmPool::default(),
            cpu: Arc::default(),
        }
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

    /// Requests one instance may serve in turn.
    pub fn reuse(&self) -> u32 {
        self.reuse
    }

    /// How the engine initialises this guest's memory.
    pub fn memory_init(&self) -> MemoryInit {
        self.memory_init
    }

    pub(crate) fn pre(&self) -> &ProxyPre<HostState> {
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

    /// Instances kept idle for reuse right now.
    pub fn warm_instances(&self) -> usize {
        self.warm.len()
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
