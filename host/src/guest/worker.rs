//! WASI 0.3 services (`wasi:http/handler@0.3.0`). Every instance of such a
//! service is a *worker*: a task that owns the store, drives the component
//! model's event loop and takes requests from a queue — one request, once,
//! by default; up to `[instance] concurrent` at a time and `reuse` in all
//! when the manifest allows.
//!
//! The requests a worker serves share its store, so when `concurrent` is
//! more than 1 some things belong to the instance, not to one request:
//!
//! - a trap (a panic, the memory cap, the time limit) ends the instance, and
//!   every request it is serving fails with it;
//! - the CPU budget counts the instance's CPU since it last had no request;
//! - guest output and outgoing calls carry the request id, trace and hop
//!   count of the request that arrived last.
//!
//! With the defaults (`concurrent = 1`, `reuse = 1`) none of this applies:
//! each request has an instance of its own, as a WASI 0.2 request does.

use std::collections::HashMap;
use std::future::poll_fn;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::stream::{FuturesUnordered, StreamExt};
use tokio::sync::{mpsc, oneshot};
use wasmtime::Store;
use wasmtime_wasi_http::p3::bindings::Service;
use wasmtime_wasi_http::p3::bindings::http::types::ErrorCode;
use wasmtime_wasi_http::{FieldMap, WasiHttpView};

use crate::base::respond::Body;
use crate::capabilities::outbound::InternalCalls;
use crate::guest::Guest;
use crate::guest::engine::InstanceSlot;
use crate::guest::engine::Runtime;
use crate::guest::failure::{Failure, classify};
use crate::guest::instance::new_store;
use crate::guest::pools::{IDLE_TIMEOUT, Job, Reply, Workers, arm_deadline, lock};
use crate::guest::scheduler::{self, CpuMeter};
use crate::guest::state::HostState;

impl Workers {
    /// Starts a worker for `guest` on the instance slot `slot`, with `job`
    /// as its first request; returns its id.
    pub(crate) fn start(
        runtime: &Runtime,
        guest: &Arc<Guest>,
        job: Box<Job>,
        internal: Option<Arc<dyn InternalCalls>>,
        slot: InstanceSlot,
    ) -> u64 {
        let (sender, queue) = mpsc::unbounded_channel();
        let id = guest.workers().join(sender, guest.reuse());
        let store = new_store(runtime, guest, job.context.clone(), internal);
        let meter = store.data().cpu().clone();
        let worker = Worker {
            id,
            guest: guest.clone(),
            store,
            deadline: Arc::new(SharedDeadline::new(job.context.deadline)),
            meter: meter.clone(),
            pending: Mutex::new(HashMap::new()),
            notes: Mutex::new(Vec::new()),
            _slot: slot,
        };
        tokio::spawn(async move {
            scheduler::admit(&meter).await;
            scheduler::metered(Box::pin(worker.run(job, queue)), meter).await;
        });
        id
    }
}

/// The latest deadline of the requests a worker has taken: it may run until
/// then. Shared with the epoch callback, which stops a guest past it.
struct SharedDeadline {
    base: Instant,
    /// Nanoseconds after `base`.
    offset: AtomicU64,
}

impl SharedDeadline {
    fn new(deadline: Instant) -> SharedDeadline {
        let shared = SharedDeadline {
            base: Instant::now(),
            offset: AtomicU64::new(0),
        };
        shared.extend_to(deadline);
        shared
    }

    fn extend_to(&self, deadline: Instant) {
        let offset = deadline.saturating_duration_since(self.base).as_nanos() as u64;
        self.offset.fetch_max(offset, Ordering::Relaxed);
    }

    fn get(&self) -> Instant {
        self.base + Duration::from_nanos(self.offset.load(Ordering::Relaxed))
    }
}

/// One instance of a WASI 0.3 service and the requests it is serving.
struct Worker {
    id: u64,
    guest: Arc<Guest>,
    store: Store<HostState>,
    deadline: Arc<SharedDeadline>,
    meter: Arc<CpuMeter>,
    /// Where the requests being served want their answers, by call number.
    pending: Mutex<HashMap<u64, oneshot::Sender<Reply>>>,
    /// Responses whose bodies may still be streaming: each is told why, if
    /// the instance fails.
    notes: Mutex<Vec<oneshot::Sender<String>>>,
    /// The host-wide instance slot, held as long as the instance lives.
    _slot: InstanceSlot,
}

/// How a worker's event loop ended, when it did not fail.
enum Ended {
    /// It had served its share and had nothing left running.
    Retired,
    /// It sat idle past [`IDLE_TIMEOUT`].
    Idle,
}

impl Ended {
    fn why(&self) -> &'static str {
        match self {
            Ended::Retired => "it served its share of requests",
            Ended::Idle => "it sat idle",
        }
    }
}

impl Worker {
    async fn run(mut self, first: Box<Job>, mut queue: mpsc::UnboundedReceiver<Box<Job>>) {
        let outcome = self.serve(first, &mut queue).await;
        let workers = self.guest.workers();
        self.guest.metrics().used_cpu(self.meter.used());
        let failure = match outcome {
            Ok(ended) => {
                tracing::debug!(service = %self.guest.name(), "an instance ended: {}", ended.why());
                return;
            }
            Err(failure) => failure,
        };
        workers.leave(self.id);
        let pending = std::mem::take(&mut *lock(&self.pending));
        if pending.is_empty() {
            // Every request had its response; a body may have been cut.
            tracing::warn!(
                service = %self.guest.name(),
                "{} (after its responses had started)",
                failure.reason()
            );
        } else if pending.len() > 1 {
            tracing::warn!(
                service = %self.guest.name(),
                "{} (an instance serving {} requests at once: all of them failed)",
                failure.reason(),
                pending.len()
            );
        }
        for (_, reply) in pending {
            let _ = reply.send(Reply::Failed(failure.clone()));
        }
        for note in std::mem::take(&mut *lock(&self.notes)) {
            let _ = note.send(failure.reason());
        }
        // Requests queued behind the failure never reached the instance.
        queue.close();
        while let Ok(job) = queue.try_recv() {
            let Job {
                request,
                context,
                reply,
            } = *job;
            let _ = reply.send(Reply::NotStarted(request, context));
        }
    }

    /// Instantiates the component and serves requests until the worker
    /// retires, idles out or fails.
    async fn serve(
        &mut self,
        first: Box<Job>,
        queue: &mut mpsc::UnboundedReceiver<Box<Job>>,
    ) -> Result<Ended, Failure> {
        let deadline = self.deadline.clone();
        arm_deadline(&mut self.store, move || deadline.get(), self.meter.clone());
        let guest = self.guest.clone();
        let timeout = guest.limits().timeout;
        let Job {
            request,
            context,
            reply,
        } = *first;
        lock(&self.pending).insert(0, reply);
        let first = (request, context);
        let service = match self.instantiate().await {
            Ok(service) => service,
            Err(err) => return Err(classify(&err, self.store.data(), timeout)),
        };
        let id = self.id;
        let Worker {
            store,
            deadline,
            meter,
            pending,
            notes,
            ..
        } = self;
        let workers = guest.workers();
        let ended = store
            .run_concurrent(async |accessor| {
                let mut calls = FuturesUnordered::new();
                let mut next_call = 1u64;
                let mut arrived = Some((0, first));
                let mut idle_since: Option<tokio::time::Instant> = None;
                loop {
                    if let Some((call, (request, context))) = arrived.take() {
                        idle_since = None;
                        let (parts, body) = request.into_parts();
                        let headers = accessor.with(|mut access| {
                            if calls.is_empty() {
                                meter.restart();
                            }
                            deadline.extend_to(context.deadline);
                            let state = access.get();
                            state.begin_request(context, meter.clone());
                            // Forbidden headers are dropped on the way in.
                            FieldMap::new_immutable(state.http().hooks, parts.headers)
                        });
                        let uri = parts.uri.into_parts();
                        let (request, body_done) = wasmtime_wasi_http::p3::Request::new(
                            parts.method,
                            uri.scheme,
                            uri.authority,
                            uri.path_and_query,
                            headers,
                            None,
                            body,
                        );
                        let service = &service;
                        calls.push(async move {
                            let result = service.handle(accessor, request).await;
                            (call, result, body_done)
                        });
                        continue;
                    }
                    let quiet = calls.is_empty();
                    let expires = tokio::time::Instant::from_std(deadline.get());
                    tokio::select! {
                        biased;
                        Some((call, result, body_done)) = calls.next(), if !quiet => {
                            let reply = match result {
                                // A trap: the instance is done for.
                                Err(err) => return Err(err),
                                Ok(Err(code)) => Reply::Failed(Failure::ErrorResponse(
                                    error_code_text(&code),
                                )),
                                Ok(Ok(response)) => {
                                    let converted = accessor.with(|mut access| {
                                        response.into_http(&mut access, body_done)
                                    });
                                    match converted {
                                        Ok(response) => {
                                            let (note, heard) = oneshot::channel();
                                            let mut notes = lock(notes);
                                            notes.retain(|note| !note.is_closed());
                                            notes.push(note);
                                            Reply::Answer(response, heard)
                                        }
                                        Err(err) => Reply::Failed(Failure::Trap(format!(
                                            "its response is invalid: {err:#}"
                                        ))),
                                    }
                                }
                            };
                            if let Some(reply_to) = lock(pending).remove(&call) {
                                let _ = reply_to.send(reply);
                            }
                            workers.answered(id);
                        }
                        job = queue.recv() => match job {
                            Some(job) => {
                                let Job { request, context, reply } = *job;
                                lock(pending).insert(next_call, reply);
                                arrived = Some((next_call, (request, context)));
                                next_call += 1;
                            }
                            // The queue closes only once the worker has left.
                            None => return Ok(Ended::Retired),
                        },
                        () = poll_fn(|cx| accessor.poll_no_interesting_tasks(cx)), if quiet && idle_since.is_none() => {
                            // Nothing runs in the instance any more.
                            if workers.is_retiring(id) && workers.try_leave(id) {
                                return Ok(Ended::Retired);
                            }
                            idle_since = Some(tokio::time::Instant::now());
                        }
                        () = tokio::time::sleep_until(expires), if idle_since.is_none() => {
                            // Past every request's deadline with work still
                            // running (a request that never answers, a body
                            // that never ends): the instance is stopped.
                            return Err(wasmtime::Error::new(wasmtime::Trap::Interrupt));
                        }
                        () = tokio::time::sleep_until(
                            idle_since.unwrap_or_else(tokio::time::Instant::now) + IDLE_TIMEOUT
                        ), if idle_since.is_some() => {
                            if workers.try_leave(id) {
                                return Ok(Ended::Idle);
                            }
                        }
                    }
                }
            })
            .await;
        match ended {
            Ok(Ok(ended)) => Ok(ended),
            Ok(Err(err)) | Err(err) => Err(classify(&err, store.data(), timeout)),
        }
    }

    async fn instantiate(&mut self) -> wasmtime::Result<Service> {
        let indices = self.guest.exports().http3.as_ref().ok_or_else(|| {
            wasmtime::format_err!("the component does not export wasi:http/handler@0.3.0")
        })?;
        let instance = self.guest.pre().instantiate_async(&mut self.store).await?;
        indices.load(&mut self.store, &instance)
    }
}

/// Gives `request` an absolute URI, as wasi:http 0.3 hands the guest the
/// scheme and authority with the request: `scheme` (the one the client
/// used) and the `Host` header. A request whose `Host` is missing or not a
/// valid authority keeps its path-only URI.
pub(crate) fn with_origin(
    mut request: http::Request<Body>,
    scheme: http::uri::Scheme,
) -> http::Request<Body> {
    let authority = request
        .headers()
        .get(http::header::HOST)
        .and_then(|host| host.to_str().ok())
        .and_then(|host| host.parse::<http::uri::Authority>().ok());
    let Some(authority) = authority else {
        return request;
    };
    let mut parts = request.uri().clone().into_parts();
    parts.scheme = Some(scheme);
    parts.authority = Some(authority);
    if parts.path_and_query.is_none() {
        parts.path_and_query = Some(http::uri::PathAndQuery::from_static("/"));
    }
    if let Ok(uri) = http::Uri::from_parts(parts) {
        *request.uri_mut() = uri;
    }
    request
}

fn error_code_text(code: &ErrorCode) -> String {
    match code {
        ErrorCode::InternalError(Some(message)) => format!("internal error: {message}"),
        other => format!("{other:?}"),
    }
}
