//! Guest instances: a fresh store and instance per request by default, or —
//! for services that opt in with `[instance] reuse = N` — instances kept warm
//! between requests, retagged for each one and retired after N requests,
//! after any failure, or after sitting idle.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::OwnedSemaphorePermit;
use wasmtime::component::InstancePre;
use wasmtime::{Store, UpdateDeadline};
use wasmtime_wasi::WasiCtx;

use crate::capabilities::call::CallContext;
use crate::capabilities::keyvalue::KeyValueCtx;
use crate::capabilities::messaging::message::Message;
use crate::capabilities::messaging::{MessagingCtx, call_handler};
use crate::capabilities::outbound::{InternalCalls, OutboundHooks};
use crate::capabilities::wasi_config::ConfigCtx;
use crate::guest::Guest;
use crate::guest::engine::Runtime;
use crate::guest::scheduler::{self, CpuMeter, Verdict};
use crate::guest::state::{CapabilityCtx, HostState};
use crate::guest::stdio::{GuestOutput, Stream};

/// How long a warm instance may sit unused before it is dropped.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(5);
/// Most warm instances one deployment keeps idle.
pub const MAX_IDLE: usize = 32;
/// Reused instances of one deployment that may crash in a row, with none
/// succeeding in between, before reuse is turned off for that deployment.
pub const MAX_REUSE_FAILURES: u32 = 3;

/// One guest instance (or a store about to hold one) and the instance slot
/// it occupies.
pub(crate) struct Instance {
    pub(crate) store: Store<HostState>,
    /// Set once instantiated; a reused instance keeps it.
    instance: Option<wasmtime::component::Instance>,
    /// Requests this instance has completed.
    pub(crate) served: u32,
    /// The host-wide instance slot, held as long as the instance lives.
    _slot: OwnedSemaphorePermit,
}

impl Instance {
    /// A new, not yet instantiated store for `guest`, set up for the
    /// request described by `context`.
    pub(crate) fn fresh(
        runtime: &Runtime,
        guest: &Guest,
        context: CallContext,
        internal: Option<Arc<dyn InternalCalls>>,
        slot: OwnedSemaphorePermit,
    ) -> Instance {
        let store = armed_store(runtime, guest, context, internal);
        Instance {
            store,
            instance: None,
            served: 0,
            _slot: slot,
        }
    }

    /// Prepares a warm instance for its next request.
    pub(crate) fn begin_request(&mut self, context: CallContext) {
        let deadline = context.deadline;
        let previous = self.store.data().cpu();
        let meter = CpuMeter::new(previous.budget(), previous.service().clone());
        self.store.data_mut().begin_request(context, meter.clone());
        arm_deadline(&mut self.store, move || deadline, meter);
    }

    /// Whether this instance has served a request before.
    pub(crate) fn is_reused(&self) -> bool {
        self.served > 0
    }

    /// The component instance, instantiating it first if needed.
    pub(crate) async fn instance(
        &mut self,
        pre: &InstancePre<HostState>,
    ) -> wasmtime::Result<wasmtime::component::Instance> {
        if let Some(instance) = self.instance {
            return Ok(instance);
        }
        let instance = pre.instantiate_async(&mut self.store).await?;
        self.instance = Some(instance);
        Ok(instance)
    }

    /// Runs one request's handler on this instance.
    pub(crate) async fn handle(
        &mut self,
        guest: &Guest,
        request: wasmtime::component::Resource<wasmtime_wasi_http::p2::types::HostIncomingRequest>,
        outparam: wasmtime::component::Resource<
            wasmtime_wasi_http::p2::types::HostResponseOutparam,
        >,
    ) -> wasmtime::Result<()> {
        let instance = self.instance(guest.pre()).await?;
        let indices = guest.exports().http.as_ref().ok_or_else(|| {
            wasmtime::format_err!("the component does not export wasi:http/incoming-handler")
        })?;
        let proxy = indices.load(&mut self.store, &instance)?;
        proxy
            .wasi_http_incoming_handler()
            .call_handle(&mut self.store, request, outparam)
            .await
    }

    /// Hands `message` to the instance's exported messaging handler; the
    /// inner error is the handler's own.
    pub(crate) async fn handle_message(
        &mut self,
        guest: &Guest,
        message: &Message,
    ) -> wasmtime::Result<Result<(), String>> {
        let instance = self.instance(guest.pre()).await?;
        let exports =
            guest.exports().messages.as_ref().ok_or_else(|| {
                wasmtime::format_err!("the component exports no messaging handler")
            })?;
        if let Some(reply_to) = &message.reply_to {
            self.store.data_mut().messaging().ctx.owe_reply(reply_to);
        }
        call_handler(
            exports,
            &mut self.store,
            &instance,
            message,
            HostState::messaging,
        )
        .await
    }
}

/// Builds the store for one instance of `guest`, with its memory cap,
/// environment, captured stdio and outbound hooks.
pub(crate) fn new_store(
    runtime: &Runtime,
    guest: &Guest,
    context: CallContext,
    internal: Option<Arc<dyn InternalCalls>>,
) -> Store<HostState> {
    let service = guest.name_arc();
    let deadline = context.deadline;
    let source_map = guest.source_map().cloned();
    let stdout = GuestOutput::new(
        Stream::Stdout,
        service.clone(),
        context.request_id.clone(),
        source_map.clone(),
    );
    let stderr = GuestOutput::new(
        Stream::Stderr,
        service.clone(),
        context.request_id.clone(),
        source_map,
    );
    let mut wasi = WasiCtx::builder();
    wasi.envs(guest.env())
        .stdout(stdout.clone())
        .stderr(stderr.clone());
    let messaging = MessagingCtx::new(guest.messaging().cloned(), context.clone());
    let hooks = OutboundHooks::new(
        guest.outbound().clone(),
        service.clone(),
        context,
        internal,
        guest.messaging().cloned(),
    );
    let state = HostState::new(
        wasi.build(),
        guest.limits().memory,
        hooks,
        [stdout, stderr],
        CpuMeter::new(guest.limits().cpu, guest.cpu().clone()),
        CapabilityCtx {
            keyvalue: KeyValueCtx::new(guest.keyvalue().cloned(), deadline),
            config: ConfigCtx::new(guest.config().clone()),
            messaging,
        },
    );
    let engine = runtime.flavour(guest.engine_kind()).engine();
    let mut store = Store::new(engine, state);
    store.limiter(|state| &mut state.limiter);
    store
}

/// [`new_store`] with its deadline armed: ready to instantiate.
pub(crate) fn armed_store(
    runtime: &Runtime,
    guest: &Guest,
    context: CallContext,
    internal: Option<Arc<dyn InternalCalls>>,
) -> Store<HostState> {
    let deadline = context.deadline;
    let mut store = new_store(runtime, guest, context, internal);
    let meter = store.data().cpu().clone();
    arm_deadline(&mut store, move || deadline, meter);
    store
}

/// Makes the guest stop once past the instant `deadline` gives (read at
/// every tick: a worker's deadline moves with its requests) or when `meter`
/// says its CPU budget is spent; until then, at every epoch tick it yields as the
/// [`scheduler`](crate::guest::scheduler) decides, so a busy guest can hold
/// neither a thread nor more than its share of one.
pub(crate) fn arm_deadline(
    store: &mut Store<HostState>,
    deadline: impl Fn() -> Instant + Send + Sync + 'static,
    meter: Arc<CpuMeter>,
) {
    store.set_epoch_deadline(1);
    store.epoch_deadline_callback(move |_| {
        if Instant::now() >= deadline() {
            return Ok(UpdateDeadline::Interrupt);
        }
        Ok(match scheduler::at_yield_point(&meter) {
            Verdict::Stop => UpdateDeadline::Interrupt,
            Verdict::Yield(turn) => UpdateDeadline::YieldCustom(1, turn),
        })
    });
}

/// Idle instances of one deployment in reuse mode, and whether the guest has
/// shown it survives reuse.
#[derive(Default)]
pub(crate) struct WarmPool {
    idle: Mutex<Vec<(Instance, Instant)>>,
    /// Shared with the same component compiled by another tier: the
    /// guest's code behaves the same whichever compiler built it.
    verdict: Arc<ReuseVerdict>,
}

/// What a component has shown about serving on reused instances.
#[derive(Default)]
struct ReuseVerdict {
    /// Reused instances that crashed since the last one that succeeded.
    failures_in_a_row: AtomicU32,
    /// Set once the guest has proven it cannot serve a second request.
    disabled: AtomicBool,
}

impl WarmPool {
    /// An empty pool for the same component compiled again (a tier swap):
    /// its instances belong to another engine and cannot carry over, but
    /// what the guest has shown about reuse does.
    pub(crate) fn successor(&self) -> WarmPool {
        WarmPool {
            idle: Mutex::default(),
            verdict: self.verdict.clone(),
        }
    }

    fn idle(&self) -> std::sync::MutexGuard<'_, Vec<(Instance, Instant)>> {
        // The list is consistent between statements; a panic elsewhere while
        // holding the lock does not corrupt it.
        self.idle.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether instances may still be reused: false once
    /// [`MAX_REUSE_FAILURES`] reused instances crashed in a row.
    pub(crate) fn enabled(&self) -> bool {
        !self.verdict.disabled.load(Ordering::Relaxed)
    }

    /// Notes that a reused instance served its request.
    pub(crate) fn reused_instance_succeeded(&self) {
        self.verdict.failures_in_a_row.store(0, Ordering::Relaxed);
    }

    /// Notes that a reused instance crashed; returns true when this turned
    /// reuse off (and dropped the idle instances).
    pub(crate) fn reused_instance_failed(&self) -> bool {
        let verdict = &self.verdict;
        let failures = verdict.failures_in_a_row.fetch_add(1, Ordering::Relaxed) + 1;
        if failures < MAX_REUSE_FAILURES || verdict.disabled.swap(true, Ordering::Relaxed) {
            return false;
        }
        let retired = std::mem::take(&mut *self.idle());
        drop(retired);
        true
    }

    /// The most recently used idle instance, if one is still fresh enough.
    pub(crate) fn take(&self) -> Option<Instance> {
        let mut idle = self.idle();
        while let Some((instance, since)) = idle.pop() {
            if since.elapsed() < IDLE_TIMEOUT {
                return Some(instance);
            }
            // Stale: older entries below it are staler still.
            idle.clear();
        }
        None
    }

    /// Keeps `instance` for a later request; drops it when the pool is full
    /// or reuse has been turned off.
    pub(crate) fn give_back(&self, instance: Instance) {
        if !self.enabled() {
            return;
        }
        self.sweep();
        let surplus = {
            let mut idle = self.idle();
            if idle.len() < MAX_IDLE {
                idle.push((instance, Instant::now()));
                None
            } else {
                Some(instance)
            }
        };
        // Torn down outside the lock.
        drop(surplus);
    }

    /// Drops the instances that have sat idle longer than [`IDLE_TIMEOUT`],
    /// giving their memory and instance slots back.
    pub(crate) fn sweep(&self) {
        let now = Instant::now();
        let retired: Vec<_> = {
            let mut idle = self.idle();
            let fresh_from = idle
                .iter()
                .position(|(_, since)| now.duration_since(*since) < IDLE_TIMEOUT)
                .unwrap_or(idle.len());
            idle.drain(..fresh_from).collect()
        };
        drop(retired);
    }

    /// Idle instances right now.
    pub(crate) fn len(&self) -> usize {
        self.idle().len()
    }
}
