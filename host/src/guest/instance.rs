//! Guest instances: the store of each (memory cap, environment, captured
//! stdio, outbound hooks, capabilities, deadline), a fresh one per request
//! by default, and running a WASI 0.2 request or a message on one. Warm
//! instances kept for reuse wait in [`pools`](crate::guest::pools).

use std::sync::Arc;

use wasmtime::Store;
use wasmtime_wasi::WasiCtx;

use crate::capabilities::call::CallContext;
use crate::capabilities::keyvalue::KeyValueCtx;
use crate::capabilities::messaging::message::Message;
use crate::capabilities::messaging::{MessagingCtx, call_handler};
use crate::capabilities::outbound::{InternalCalls, OutboundHooks};
use crate::capabilities::wasi_config::ConfigCtx;
use crate::guest::Guest;
use crate::guest::engine::InstanceSlot;
use crate::guest::engine::Runtime;
use crate::guest::pools::{Instance, arm_deadline};
use crate::guest::scheduler::CpuMeter;
use crate::guest::state::{CapabilityCtx, HostState};
use crate::guest::stdio::{GuestOutput, Stream};

impl Instance {
    /// A new, not yet instantiated store for `guest`, set up for the
    /// request described by `context`.
    pub(crate) fn fresh(
        runtime: &Runtime,
        guest: &Guest,
        context: CallContext,
        internal: Option<Arc<dyn InternalCalls>>,
        slot: InstanceSlot,
    ) -> Instance {
        Instance::new(armed_store(runtime, guest, context, internal), slot)
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
