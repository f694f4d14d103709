//! Running one request on an instance of a guest (fresh, or warm in
//! reuse mode): admission, the guest call with its deadline, the retry of a
//! reused instance's crash, and the mapping of every way a guest can fail to
//! a clear HTTP answer.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use http::StatusCode;
use http_body_util::BodyExt;
use tokio::sync::{OwnedSemaphorePermit, oneshot};
use wasmtime_wasi_http::WasiHttpView;
use wasmtime_wasi_http::p2::bindings::http::types::{ErrorCode, Scheme};
use wasmtime_wasi_http::p2::body::HyperIncomingBody;

use crate::base::admission::MAX_QUEUE_WAIT;
use crate::base::respond::{self, Body};
use crate::base::trace::TraceContext;
use crate::capabilities::call::CallContext;
use crate::capabilities::messaging::message::Message;
use crate::capabilities::outbound::InternalCalls;
use crate::guest::Guest;
use crate::guest::body::{GuestBody, LimitedBody};
use crate::guest::engine::Runtime;
pub use crate::guest::failure::Failure;
use crate::guest::failure::{classify, first_line};
use crate::guest::instance::armed_store;
use crate::guest::pools::{Instance, Job, Reply, Workers};
use crate::guest::scheduler;
use crate::guest::worker;

/// Instantiates `guest` once without calling it: proves the component
/// fits the instance pool and its start-up code runs, before it is deployed.
pub(crate) async fn probe(runtime: &Runtime, guest: &Guest) -> anyhow::Result<()> {
    let timeout = guest.limits().timeout;
    let context = CallContext {
        request_id: Arc::from("deploy-probe"),
        hops: 0,
        deadline: Instant::now() + timeout,
        trace: TraceContext::child_of(None),
    };
    let mut store = armed_store(runtime, guest, context, None);
    match guest.pre().instantiate_async(&mut store).await {
        Ok(_) => Ok(()),
        Err(err) => {
            let failure = classify(&err, store.data(), timeout);
            Err(anyhow::anyhow!(
                "instantiating the component failed: {}",
                match failure {
                    Failure::Trap(_) | Failure::Overloaded(_) => first_line(&format!("{err:#}")),
                    other => other.reason(),
                }
            ))
        }
    }
}

/// Facts about a request that are not in the request itself.
#[derive(Clone)]
pub(crate) struct RequestMeta {
    /// Correlates the access log, guest output and outgoing calls.
    pub request_id: Arc<str>,
    /// The scheme the client used.
    pub scheme: Scheme,
    /// Service-to-service hops that led here (0 for a client's request).
    pub hops: u32,
    /// The caller's deadline, for a service-to-service call: the callee
    /// gets no more time than its caller has left.
    pub deadline: Option<Instant>,
    /// This request's span.
    pub trace: TraceContext,
    /// Delivers the guest's `*.internal` calls.
    pub internal: Option<Arc<dyn InternalCalls>>,
}

/// Aborts the guest task when dropped, unless disarmed: a client that goes
/// away before the response starts stops its guest.
struct AbortOnDrop(Option<tokio::task::JoinHandle<Option<Failure>>>);

impl AbortOnDrop {
    fn disarm(&mut self) {
        self.0.take();
    }
}

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        if let Some(task) = self.0.take() {
            task.abort();
        }
    }
}

/// Runs `request` on a fresh instance of `guest` and returns the guest's
/// response, or an error response saying why there is none.
pub(crate) async fn invoke(
    runtime: &Runtime,
    guest: &Arc<Guest>,
    request: http::Request<HyperIncomingBody>,
    meta: &RequestMeta,
) -> http::Response<Body> {
    match run_guest(runtime, guest, request, meta).await {
        Ok(response) => response,
        Err(failure) => {
            failure.record(guest.metrics());
            failure.into_response()
        }
    }
}

/// Runs the guest; a failure that happens before its response starts is
/// returned for the caller to count and answer.
async fn run_guest(
    runtime: &Runtime,
    guest: &Arc<Guest>,
    request: http::Request<HyperIncomingBody>,
    meta: &RequestMeta,
) -> Result<http::Response<Body>, Failure> {
    let limits = *guest.limits();
    if !guest.exports().serves_http() {
        return Err(Failure::NoHttpHandler);
    }
    if let Some(length) = content_length(&request)
        && length > limits.body
    {
        return Err(Failure::BodyTooLarge(Some(length), limits.body));
    }
    let started = Instant::now();
    let own_deadline = started + limits.timeout;
    let deadline = meta
        .deadline
        .map_or(own_deadline, |caller| caller.min(own_deadline));
    let timeout = deadline.saturating_duration_since(started);
    let queue_deadline = started + MAX_QUEUE_WAIT.min(timeout);
    let service_slot = guest
        .admission()
        .enter(queue_deadline)
        .await
        .map_err(|refused| Failure::Busy(refused.0))?;
    let context = CallContext {
        request_id: meta.request_id.clone(),
        hops: meta.hops,
        deadline,
        trace: meta.trace,
    };
    if guest.exports().http3.is_some() {
        let slots = (service_slot, queue_deadline);
        return run_on_worker(runtime, guest, request, meta, slots, context, timeout).await;
    }
    let reuse = guest.reuses_instances();
    let warm = if reuse { guest.warm().take() } else { None };
    let (instance, retry) = match warm {
        Some(mut instance) => {
            instance.begin_request(context.clone());
            // A request that can be repeated (idempotent method, no body) is
            // kept, so a reused instance's failure can be retried on a fresh
            // one instead of failing the caller.
            let retry = replayable(&request);
            (instance, retry)
        }
        None => {
            let slot = runtime
                .instance_slot(queue_deadline)
                .await
                .map_err(|refused| Failure::Overloaded(refused.0))?;
            let instance =
                Instance::fresh(runtime, guest, context.clone(), meta.internal.clone(), slot);
            (instance, None)
        }
    };
    let attempt = Attempt {
        guest: guest.clone(),
        meta: meta.clone(),
        timeout,
        reuse,
    };
    match attempt.run(instance, request, service_slot).await {
        Outcome::Done(result) => result,
        Outcome::ReusedInstanceFailed(failure, service_slot) => {
            let Some(request) = retry else {
                // Logged and counted by the guest task already.
                return Ok(failure.into_response());
            };
            tracing::info!(
                service = %guest.name(),
                request_id = %meta.request_id,
                "a reused instance failed ({}); retrying on a fresh instance",
                failure.reason()
            );
            let slot = runtime
                .instance_slot(queue_deadline)
                .await
                .map_err(|refused| Failure::Overloaded(refused.0))?;
            let instance = Instance::fresh(runtime, guest, context, meta.internal.clone(), slot);
            match attempt.run(instance, request, service_slot).await {
                Outcome::Done(result) => result,
                // A fresh instance is never retried; its task logged and
                // counted the failure.
                Outcome::ReusedInstanceFailed(failure, _) => Ok(failure.into_response()),
            }
        }
    }
}

/// Runs `request` on a worker of the WASI 0.3 `guest` (see
/// [`worker`](crate::guest::worker)): a running one with room for it, or a
/// new one on a free instance slot.
async fn run_on_worker(
    runtime: &Runtime,
    guest: &Arc<Guest>,
    request: http::Request<HyperIncomingBody>,
    meta: &RequestMeta,
    (service_slot, queue_deadline): (OwnedSemaphorePermit, Instant),
    context: CallContext,
    timeout: Duration,
) -> Result<http::Response<Body>, Failure> {
    let limits = *guest.limits();
    let deadline = context.deadline;
    let body_exceeded = Arc::new(AtomicBool::new(false));
    let request = request
        .map(|body| LimitedBody::new(body, limits.body, body_exceeded.clone()).boxed_unsync());
    let mut request = worker::with_origin(request, uri_scheme(&meta.scheme));
    // Held until the response body is done, like a 0.2 request's.
    let running = (service_slot, guest.metrics().in_flight());
    let mut context = context;
    let answer = loop {
        let (reply_to, reply) = oneshot::channel();
        let job = Box::new(Job {
            request,
            context,
            reply: reply_to,
        });
        let worker = match guest
            .workers()
            .offer(job, guest.concurrent(), guest.reuse())
        {
            Ok(id) => id,
            Err(job) => {
                let slot = runtime
                    .instance_slot(queue_deadline)
                    .await
                    .map_err(|refused| Failure::Overloaded(refused.0))?;
                Workers::start(runtime, guest, job, meta.internal.clone(), slot)
            }
        };
        match tokio::time::timeout_at(deadline.into(), reply).await {
            Ok(Ok(Reply::NotStarted(returned, returned_context))) => {
                request = returned;
                context = returned_context;
            }
            Ok(Ok(Reply::Answer(response, note))) => break Ok((response, note)),
            Ok(Ok(Reply::Failed(failure))) => break Err(failure),
            Ok(Err(_)) => {
                break Err(Failure::Host("the instance ended without answering".into()));
            }
            Err(_) => {
                // The instance may be stuck: it takes no more requests and
                // is stopped once past its requests' deadlines.
                guest.workers().retire(worker);
                break Err(Failure::Timeout(timeout));
            }
        }
    };
    if body_exceeded.load(Ordering::Relaxed) {
        // Whatever the guest made of the cut-off body, the cause is known.
        return Err(Failure::BodyTooLarge(None, limits.body));
    }
    let failure = match answer {
        Ok((response, note)) => {
            return Ok(response.map(|body| {
                GuestBody::new(body, note)
                    .holding(Box::new(running))
                    .boxed_unsync()
            }));
        }
        Err(failure) => failure,
    };
    if !matches!(failure, Failure::ErrorResponse(_)) {
        tracing::warn!(
            service = %guest.name(),
            request_id = %meta.request_id,
            "{}",
            failure.reason()
        );
    }
    Err(failure)
}

/// The URI scheme for a wasi:http scheme.
fn uri_scheme(scheme: &Scheme) -> http::uri::Scheme {
    match scheme {
        Scheme::Https => http::uri::Scheme::HTTPS,
        Scheme::Other(other) => other.parse().unwrap_or(http::uri::Scheme::HTTP),
        Scheme::Http => http::uri::Scheme::HTTP,
    }
}

/// Hands `message` to `guest`'s exported messaging handler on a fresh
/// instance, under the service's limits: admission, instance slot, time
/// limit, CPU budget and the scheduler's fairness, as for a request.
pub(crate) async fn deliver_message(
    runtime: &Runtime,
    guest: &Arc<Guest>,
    message: &Message,
    meta: &RequestMeta,
) -> Result<(), Failure> {
    let limits = *guest.limits();
    let started = Instant::now();
    let deadline = started + limits.timeout;
    let queue_deadline = started + MAX_QUEUE_WAIT.min(limits.timeout);
    let service_slot = guest
        .admission()
        .enter(queue_deadline)
        .await
        .map_err(|refused| Failure::Busy(refused.0))?;
    let slot = runtime
        .instance_slot(queue_deadline)
        .await
        .map_err(|refused| Failure::Overloaded(refused.0))?;
    let context = CallContext {
        request_id: meta.request_id.clone(),
        hops: meta.hops,
        deadline,
        trace: meta.trace,
    };
    let mut instance = Instance::fresh(runtime, guest, context, meta.internal.clone(), slot);
    let meter = instance.store.data().cpu().clone();
    let in_flight = guest.metrics().in_flight();
    let handler = async {
        let _running = (service_slot, in_flight);
        let call = instance.handle_message(guest, message);
        let failure = match tokio::time::timeout_at(deadline.into(), call).await {
            Ok(Ok(Ok(()))) => return Ok(()),
            Ok(Ok(Err(why))) => Failure::Handler(why),
            Ok(Err(err)) => classify(&err, instance.store.data(), limits.timeout),
            Err(_) => Failure::Timeout(limits.timeout),
        };
        failure.record(guest.metrics());
        Err(failure)
    };
    scheduler::admit(&meter).await;
    let result = scheduler::metered(Box::pin(handler), meter.clone()).await;
    guest.metrics().used_cpu(meter.used());
    result
}

/// A copy of a request that can be sent again: only for idempotent methods
/// without a body (the body of the first attempt is consumed).
fn replayable(
    request: &http::Request<HyperIncomingBody>,
) -> Option<http::Request<HyperIncomingBody>> {
    let idempotent = matches!(
        *request.method(),
        http::Method::GET | http::Method::HEAD | http::Method::OPTIONS | http::Method::TRACE
    );
    let bodiless =
        http_body::Body::is_end_stream(request.body()) || content_length(request) == Some(0);
    if !(idempotent && bodiless) {
        return None;
    }
    let mut copy = http::Request::new(respond::empty());
    *copy.method_mut() = request.method().clone();
    *copy.uri_mut() = request.uri().clone();
    *copy.version_mut() = request.version();
    *copy.headers_mut() = request.headers().clone();
    Some(copy)
}

/// How one attempt at running a request ended.
enum Outcome {
    /// Finished: the response (maybe still streaming) or a failure to report.
    Done(Result<http::Response<Body>, Failure>),
    /// A reused instance failed before sending a response: the request may
    /// be retried on a fresh instance. The service slot is handed back.
    ReusedInstanceFailed(Failure, OwnedSemaphorePermit),
}

/// What every attempt at one request shares.
struct Attempt {
    guest: Arc<Guest>,
    meta: RequestMeta,
    timeout: Duration,
    reuse: bool,
}

impl Attempt {
    async fn run(
        &self,
        mut instance: Instance,
        request: http::Request<HyperIncomingBody>,
        service_slot: OwnedSemaphorePermit,
    ) -> Outcome {
        let guest = &self.guest;
        let limits = *guest.limits();
        let body_exceeded = Arc::new(AtomicBool::new(false));
        let request = request
            .map(|body| LimitedBody::new(body, limits.body, body_exceeded.clone()).boxed_unsync());
        let (sender, receiver) = oneshot::channel();
        let prepared = {
            let mut http = instance.store.data_mut().http();
            http.new_incoming_request(self.meta.scheme.clone(), request)
                .and_then(|req| Ok((req, http.new_response_outparam(sender)?)))
        };
        let (incoming, outparam) = match prepared {
            Ok(handles) => handles,
            Err(err) => {
                return Outcome::Done(Ok(respond::text(
                    StatusCode::BAD_REQUEST,
                    &format!("request cannot be handed to the service: {err}"),
                )));
            }
        };

        let reused = instance.is_reused();
        let keep_warm = self.reuse;
        let reuse_limit = guest.reuse();
        let pre_guest = guest.clone();
        let request_id = self.meta.request_id.clone();
        let timeout = self.timeout;
        let deadline = Instant::now() + timeout;
        let in_flight = guest.metrics().in_flight();
        let meter = instance.store.data().cpu().clone();
        let metrics = guest.metrics().clone();
        let (failure_tx, failure_rx) = oneshot::channel();
        // The guest's response goes through the task, which so knows whether
        // one was sent before the guest returned.
        let (relay_tx, relay_rx) = oneshot::channel();
        // Boxed once: the call's future is about 10 KB, and every wrapper
        // and the spawn would otherwise move it again (memmove was 6% of a
        // hello request's CPU).
        let guest_task = Box::pin(async move {
            // Held until the guest is done, response body included.
            let _running = (service_slot, in_flight);
            let guest = pre_guest;
            let (result, responded) = {
                let run = tokio::time::timeout_at(
                    deadline.into(),
                    instance.handle(&guest, incoming, outparam),
                );
                relay_response(run, receiver, relay_tx).await
            };
            let failure = match result {
                Ok(Ok(())) if responded => None,
                Ok(Ok(())) => Some(Failure::NoResponse),
                Ok(Err(err)) => Some(classify(&err, instance.store.data(), timeout)),
                Err(_) => Some(Failure::Timeout(timeout)),
            };
            match &failure {
                Some(failure) => {
                    tracing::warn!(
                        service = %guest.name(),
                        request_id = %request_id,
                        "{}",
                        failure.reason()
                    );
                    failure.record(guest.metrics());
                    if reused && failure.is_guest_crash() && guest.warm().reused_instance_failed() {
                        tracing::warn!(
                            service = %guest.name(),
                            "{} reused instances of this service crashed in a row: it does not \
                             survive reuse, so every request now gets a fresh instance \
                             (until the service is redeployed)",
                            crate::guest::pools::MAX_REUSE_FAILURES
                        );
                    }
                    // Sent before the store (and with it the response body's
                    // sender) is dropped, so a body cut short by a failure
                    // ends in an error.
                    let _ = failure_tx.send(failure.reason());
                    drop(instance);
                }
                None => {
                    if reused {
                        guest.warm().reused_instance_succeeded();
                    }
                    instance.served += 1;
                    if keep_warm && instance.served < reuse_limit {
                        guest.warm().give_back(instance);
                    }
                }
            }
            failure
        });
        // Every poll of the guest is timed: the scheduler's and the CPU
        // budget's view of how much CPU this request has used.
        let metered = async move {
            scheduler::admit(&meter).await;
            let failure = scheduler::metered(guest_task, meter.clone()).await;
            metrics.used_cpu(meter.used());
            failure
        };
        let mut task = AbortOnDrop(Some(tokio::spawn(metered)));

        let response = match relay_rx.await {
            Ok(Ok(response)) => {
                // The guest keeps running to stream the body; it is bounded
                // by its deadline, not by this request future.
                task.disarm();
                response.map(|body| GuestBody::new(body, failure_rx).boxed_unsync())
            }
            Ok(Err(code)) => {
                task.disarm();
                Failure::ErrorResponse(error_code_text(&code)).into_response()
            }
            Err(_) => {
                // The response sender is gone without a response: the guest
                // finished, failed, or was stopped. Its task says which (and
                // has already counted and logged a failure).
                let Some(handle) = task.0.as_mut() else {
                    return Outcome::Done(Err(Failure::Host("guest task vanished".into())));
                };
                let outcome = handle.await;
                task.disarm();
                let failure = match outcome {
                    Ok(Some(failure)) => failure,
                    Ok(None) => Failure::Host("the guest finished without a response".into()),
                    Err(join) => Failure::Host(format!("guest task failed: {join}")),
                };
                if reused && failure.is_guest_crash() {
                    // The slot was released with the task; take another.
                    if let Ok(slot) = guest.admission().enter(Instant::now()).await {
                        return Outcome::ReusedInstanceFailed(failure, slot);
                    }
                }
                // The guest task has logged and counted its failure.
                return Outcome::Done(match failure {
                    Failure::Host(_) => Err(failure),
                    other => Ok(other.into_response()),
                });
            }
        };
        if body_exceeded.load(Ordering::Relaxed) {
            // Whatever the guest made of the cut-off body, the cause is known.
            return Outcome::Done(Err(Failure::BodyTooLarge(None, limits.body)));
        }
        Outcome::Done(Ok(response))
    }
}

/// The guest's response as wasi:http hands it over.
type GuestResponse =
    Result<hyper::Response<wasmtime_wasi_http::p2::body::HyperOutgoingBody>, ErrorCode>;

/// Drives the guest call `run` while forwarding its response from `receiver`
/// to `relay` as soon as it is set. Returns the call's result and whether a
/// response was sent. When no response was sent, `relay` is dropped, which
/// tells the waiting request there will be none.
async fn relay_response<F: std::future::Future>(
    run: F,
    mut receiver: oneshot::Receiver<GuestResponse>,
    relay: oneshot::Sender<GuestResponse>,
) -> (F::Output, bool) {
    let mut run = std::pin::pin!(run);
    let mut relay = Some(relay);
    let mut responded = false;
    let result = loop {
        tokio::select! {
            biased;
            response = &mut receiver, if relay.is_some() => {
                if let (Ok(response), Some(relay)) = (response, relay.take()) {
                    responded = true;
                    let _ = relay.send(response);
                }
            }
            result = &mut run => break result,
        }
    };
    // The response may have been set just before the guest returned.
    if let Some(relay) = relay
        && let Ok(response) = receiver.try_recv()
    {
        responded = true;
        let _ = relay.send(response);
    }
    (result, responded)
}

fn content_length<B>(request: &http::Request<B>) -> Option<u64> {
    request
        .headers()
        .get(http::header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .parse()
        .ok()
}

fn error_code_text(code: &ErrorCode) -> String {
    match code {
        ErrorCode::InternalError(Some(message)) => format!("internal error: {message}"),
        other => format!("{other:?}"),
    }
}
