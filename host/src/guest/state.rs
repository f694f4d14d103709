//! Per-request store data: the WASI and wasi:http contexts, the resource
//! table, the memory limiter, the outbound policy and the capability
//! contexts of one guest instance.

use wasmtime::ResourceLimiter;
use wasmtime::component::ResourceTable;
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};
use wasmtime_wasi_http::{WasiHttpCtx, WasiHttpCtxView, WasiHttpView};

use std::sync::Arc;

use crate::capabilities::call::CallContext;
use crate::capabilities::keyvalue::{KeyValueCtx, KeyValueView};
use crate::capabilities::messaging::{MessagingCtx, MessagingView};
use crate::capabilities::outbound::OutboundHooks;
use crate::capabilities::wasi_config::ConfigCtx;
use crate::guest::scheduler::CpuMeter;
use crate::guest::stdio::GuestOutput;

/// Largest table a guest may grow to, in elements. Tables are bounded by the
/// pooling allocator too; this also bounds on-demand allocation.
const MAX_TABLE_ELEMENTS: usize = 1_000_000;

/// The data of one request's `Store`: everything the host functions a guest
/// calls need, owned by that request alone.
pub struct HostState {
    /// What the guest sees of the world through WASI: environment, stdio,
    /// clocks, randomness. No preopened directories, no socket permissions.
    wasi: WasiCtx,
    /// wasi:http settings of this store.
    http: WasiHttpCtx,
    /// Host resources (streams, requests, fields) the guest holds handles to.
    table: ResourceTable,
    /// Enforces the memory cap and remembers whether it said no.
    pub(crate) limiter: GuestLimiter,
    /// Decides where the guest's outgoing HTTP requests may go.
    hooks: OutboundHooks,
    /// The guest's stdout and stderr, retagged per request.
    output: [GuestOutput; 2],
    /// The CPU the current request has used, and its budget.
    cpu: Arc<CpuMeter>,
    /// What the guest may do with the key-value store.
    keyvalue: KeyValueCtx,
    /// The guest's configuration.
    config: ConfigCtx,
    /// What the guest may publish.
    messaging: MessagingCtx,
}

impl HostState {
    /// Assembles the store data for one instance.
    pub(crate) fn new(
        wasi: WasiCtx,
        memory_cap: u64,
        hooks: OutboundHooks,
        output: [GuestOutput; 2],
        cpu: Arc<CpuMeter>,
        capabilities: CapabilityCtx,
    ) -> HostState {
        let CapabilityCtx {
            keyvalue,
            config,
            messaging,
        } = capabilities;
        HostState {
            wasi,
            http: WasiHttpCtx::new(),
            table: ResourceTable::new(),
            limiter: GuestLimiter::new(memory_cap),
            hooks,
            output,
            cpu,
            keyvalue,
            config,
            messaging,
        }
    }

    /// The key-value context with the resource table, for the host functions.
    pub(crate) fn keyvalue(&mut self) -> KeyValueView<'_> {
        KeyValueView {
            ctx: &mut self.keyvalue,
            table: &mut self.table,
        }
    }

    /// The messaging context with the resource table, for the host functions.
    pub(crate) fn messaging(&mut self) -> MessagingView<'_> {
        MessagingView {
            ctx: &mut self.messaging,
            table: &mut self.table,
        }
    }

    /// The configuration, for the host functions.
    pub(crate) fn config(&mut self) -> &ConfigCtx {
        &self.config
    }

    /// The current request's CPU meter.
    pub(crate) fn cpu(&self) -> &Arc<CpuMeter> {
        &self.cpu
    }

    /// Prepares a reused instance for its next request: its logs, outgoing
    /// calls and limits belong to `context` from now on.
    pub(crate) fn begin_request(&mut self, context: CallContext, cpu: Arc<CpuMeter>) {
        self.cpu = cpu;
        self.keyvalue.begin_request(context.deadline);
        self.messaging.begin_request(context.clone());
        for output in &self.output {
            output.begin_request(context.request_id.clone());
        }
        self.hooks.begin_request(context);
        self.limiter.memory_denied = false;
    }
}

impl WasiView for HostState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

impl WasiHttpView for HostState {
    fn http(&mut self) -> WasiHttpCtxView<'_> {
        WasiHttpCtxView {
            ctx: &mut self.http,
            table: &mut self.table,
            hooks: &mut self.hooks,
        }
    }
}

/// The contexts of the capabilities a guest reaches through its own
/// interfaces (outbound HTTP goes through the hooks).
pub(crate) struct CapabilityCtx {
    /// Key-value buckets.
    pub keyvalue: KeyValueCtx,
    /// `wasi:config`.
    pub config: ConfigCtx,
    /// Messaging.
    pub messaging: MessagingCtx,
}

/// A [`ResourceLimiter`] that caps each linear memory and records whether a
/// growth was refused, so a trap that follows can be reported as "memory
/// limit exceeded" instead of an anonymous crash.
#[derive(Debug)]
pub(crate) struct GuestLimiter {
    memory_cap: u64,
    memory_denied: bool,
}

impl GuestLimiter {
    fn new(memory_cap: u64) -> GuestLimiter {
        GuestLimiter {
            memory_cap,
            memory_denied: false,
        }
    }

    /// Whether the guest asked for more memory than its cap.
    pub(crate) fn memory_denied(&self) -> bool {
        self.memory_denied
    }

    /// The memory cap in bytes.
    pub(crate) fn memory_cap(&self) -> u64 {
        self.memory_cap
    }
}

impl ResourceLimiter for GuestLimiter {
    fn memory_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        let allowed = desired as u64 <= self.memory_cap;
        if !allowed {
            self.memory_denied = true;
        }
        Ok(allowed)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= MAX_TABLE_ELEMENTS)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limiter_allows_up_to_the_cap_and_remembers_refusals() {
        let mut limiter = GuestLimiter::new(1 << 20);
        assert!(limiter.memory_growing(0, 1 << 20, None).unwrap());
        assert!(!limiter.memory_denied());
        assert!(
            !limiter
                .memory_growing(1 << 20, (1 << 20) + 1, None)
                .unwrap()
        );
        assert!(limiter.memory_denied());
    }
}
