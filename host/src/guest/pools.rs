//! Where a guest's live instances wait between requests: the warm pool of
//! a WASI 0.2 service in reuse mode (idle instances, retagged for each
//! request and retired after `reuse` requests, any failure, or sitting
//! idle), and the workers of a WASI 0.3 service (each an instance taking
//! requests from a queue). Making instances and running requests on them
//! is `instance`'s and `worker`'s; this file only keeps them.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::ThreadId;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot};
use wasmtime::component::InstancePre;
use wasmtime::{Store, UpdateDeadline};

use crate::base::respond::Body;
use crate::capabilities::call::CallContext;
use crate::guest::body::FailureNote;
use crate::guest::engine::InstanceSlot;
use crate::guest::failure::Failure;
use crate::guest::scheduler::{self, CpuMeter, Verdict};
use crate::guest::state::HostState;

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
    _slot: InstanceSlot,
}

impl Instance {
    /// An instance that is not instantiated yet: `store`, holding `slot`.
    pub(crate) fn new(store: Store<HostState>, slot: InstanceSlot) -> Instance {
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
}

/// Makes the guest stop once past the instant `deadline` gives (read at
/// every tick: a worker's deadline moves with its requests) or when `meter`
/// says its CPU budget is spent; until then, at every epoch tick it yields as the
/// [`scheduler`](crate::guest::scheduler) decides, so a busy guest can hold
/// neither a thread nor more than its share of one.
pub(crate) fn arm_deadline<T>(
    store: &mut Store<T>,
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

/// A request handed to a worker.
pub(crate) struct Job {
    /// The request, its body limited to the service's size.
    pub request: http::Request<Body>,
    /// Its request id, trace, hops and deadline.
    pub context: CallContext,
    /// Where the worker answers.
    pub reply: oneshot::Sender<Reply>,
}

/// A worker's answer to one [`Job`].
pub(crate) enum Reply {
    /// The guest's response, its body still streaming from the instance,
    /// and the note that says why, if the instance fails before the body
    /// ends.
    Answer(http::Response<Body>, FailureNote),
    /// The request got no response.
    Failed(Failure),
    /// The worker ended before the request reached the instance: another
    /// worker may take it.
    NotStarted(http::Request<Body>, CallContext),
}

/// The workers of one deployed version, and how many requests each has
/// been handed.
#[derive(Default)]
pub(crate) struct Workers {
    entries: Mutex<Vec<WorkerEntry>>,
    next_id: AtomicU64,
}

struct WorkerEntry {
    id: u64,
    /// The runtime it runs on (see [`runtime_lane`]): requests go to a
    /// worker of their own.
    lane: Option<ThreadId>,
    jobs: mpsc::UnboundedSender<Box<Job>>,
    /// Requests handed over and not yet answered.
    in_flight: u32,
    /// Requests handed over in all.
    accepted: u32,
    /// Takes no more requests: it has had `reuse`, or a request expired.
    retiring: bool,
}

impl Workers {
    fn entries(&self) -> MutexGuard<'_, Vec<WorkerEntry>> {
        // Every change is one statement; a panic cannot leave it half-made.
        lock(&self.entries)
    }

    /// Hands `job` to a running worker of this runtime with room for it,
    /// returning the worker's id, or gives the job back when none has room.
    ///
    /// Only this runtime's workers: the CLI serves each connection on one
    /// thread with a single-threaded runtime of its own, and a request
    /// handed to a worker of another thread would cross threads at every
    /// step (measured with `wrk -t1 -c32` on the 2-core VM, the 0.3 hello
    /// with `concurrent = 16`: one worker taking both threads' requests
    /// served 12k requests/s, a worker per thread 16k).
    pub(crate) fn offer(
        &self,
        job: Box<Job>,
        concurrent: u32,
        reuse: u32,
    ) -> Result<u64, Box<Job>> {
        let lane = runtime_lane();
        let mut entries = self.entries();
        // The newest first: older workers are nearer their reuse count and
        // are left to drain.
        let Some(entry) = entries
            .iter_mut()
            .rev()
            .find(|entry| entry.lane == lane && !entry.retiring && entry.in_flight < concurrent)
        else {
            return Err(job);
        };
        // The worker takes its entry out before it drops its queue, so the
        // queue is open; should it not be, the job goes elsewhere.
        if let Err(returned) = entry.jobs.send(job) {
            entry.retiring = true;
            return Err(returned.0);
        }
        entry.in_flight += 1;
        entry.accepted += 1;
        entry.retiring = entry.accepted >= reuse;
        Ok(entry.id)
    }

    /// Registers a new worker that has been handed its first request.
    pub(crate) fn join(&self, jobs: mpsc::UnboundedSender<Box<Job>>, reuse: u32) -> u64 {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        self.entries().push(WorkerEntry {
            id,
            lane: runtime_lane(),
            jobs,
            in_flight: 1,
            accepted: 1,
            retiring: reuse <= 1,
        });
        id
    }

    /// Notes that worker `id` answered a request (or gave up on it).
    pub(crate) fn answered(&self, id: u64) {
        if let Some(entry) = self.entries().iter_mut().find(|e| e.id == id) {
            entry.in_flight = entry.in_flight.saturating_sub(1);
        }
    }

    /// Stops handing requests to worker `id`: one of its requests ran past
    /// its deadline, and an instance that may be stuck takes no more.
    pub(crate) fn retire(&self, id: u64) {
        if let Some(entry) = self.entries().iter_mut().find(|e| e.id == id) {
            entry.retiring = true;
        }
    }

    /// Whether worker `id` takes no more requests.
    pub(crate) fn is_retiring(&self, id: u64) -> bool {
        self.entries()
            .iter()
            .find(|e| e.id == id)
            .is_none_or(|e| e.retiring)
    }

    /// Takes worker `id` out if nothing handed to it is outstanding;
    /// returns whether it may end.
    pub(crate) fn try_leave(&self, id: u64) -> bool {
        let mut entries = self.entries();
        match entries.iter().position(|e| e.id == id) {
            Some(index) if entries[index].in_flight == 0 => {
                entries.swap_remove(index);
                true
            }
            Some(_) => false,
            None => true,
        }
    }

    /// Takes worker `id` out, whatever it still has: it failed.
    pub(crate) fn leave(&self, id: u64) {
        self.entries().retain(|e| e.id != id);
    }

    /// Workers (instances) alive right now.
    pub(crate) fn len(&self) -> usize {
        self.entries().len()
    }
}

/// The runtime a worker started here runs on: this thread, for a
/// single-threaded runtime (the CLI's); `None` for a multi-threaded one,
/// whose tasks move between threads anyway.
fn runtime_lane() -> Option<ThreadId> {
    use tokio::runtime::{Handle, RuntimeFlavor};
    match Handle::try_current().map(|handle| handle.runtime_flavor()) {
        Ok(RuntimeFlavor::CurrentThread) => Some(std::thread::current().id()),
        _ => None,
    }
}

/// Locks `mutex`, whatever a panic elsewhere left in it.
pub(crate) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}
