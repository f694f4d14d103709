//! Fair CPU between requests, so one service's CPU-bound requests cannot
//! starve its neighbours on the same server thread.
//!
//! Every guest runs with epoch interruption: each [`EPOCH_TICK`] of
//! execution it reaches a yield point (the epoch callback in `instance`).
//! What happens there depends on how much CPU its request has used so far,
//! measured exactly by [`metered`], which times every poll of the guest's
//! task:
//!
//! - an **interactive** request (under [`DEMOTE_AFTER`] of CPU, which every
//!   ordinary request is) just yields, letting whatever else is ready run;
//! - a **long-running** one (past [`DEMOTE_AFTER`]) yields and, while
//!   interactive requests are running on the same thread, pauses after each
//!   slice long enough that the long-running requests of that thread
//!   together get at most one part in [`BACKGROUND_PARTS`] of it. They take turns in
//!   the order they yielded; when no interactive work is around, they run
//!   flat out.
//!
//! A service whose requests ran long in the last [`SUSPECT_FOR`] is
//! suspect: its requests count as long-running after a single tick, and
//! while its thread has interactive work they wait for a background turn
//! before they start ([`admit`]), so a burst of new busy requests cannot
//! crowd out ordinary ones either.
//!
//! This is a two-level feedback queue: a request is judged by what it has
//! done, not by the service it belongs to, so a service whose requests are
//! short keeps its latency however many busy loops run beside it, and a
//! long computation still finishes — fast on an idle host, slowly on a busy
//! one. A request also has a CPU budget (`limits.cpu`); past it, it is
//! stopped like one past its time limit.
//!
//! The accounting is per server thread (a thread-local lane): the CLI's
//! server threads each run one single-threaded runtime and keep a request
//! on its thread. On a multi-threaded runtime a task may move between
//! workers, which the lanes tolerate but do not account exactly.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// How often the epoch advances. A guest running wasm code notices its
/// deadline (and yields to other requests) within one tick: the
/// scheduler's time slice, which the engine's ticker drives.
pub const EPOCH_TICK: Duration = Duration::from_millis(1);

/// CPU time after which a request counts as long-running.
pub const DEMOTE_AFTER: Duration = Duration::from_millis(10);

/// How long a service that had a long-running request stays suspect: its
/// requests count as long-running after one tick, not [`DEMOTE_AFTER`].
/// Without this memory, a burst of new busy requests (say 64 arriving at
/// once, as a timed-out batch retries) would each get 10 ms of priority.
pub const SUSPECT_FOR: Duration = Duration::from_secs(5);

/// The most of a server thread that long-running requests get together
/// while interactive requests are running on it: one part in
/// `BACKGROUND_PARTS`.
pub const BACKGROUND_PARTS: u32 = 10;

/// How recently an interactive request must have run on a thread for the
/// thread to count as busy with interactive work.
const CONTENDED_WINDOW: Duration = Duration::from_millis(5);

/// The longest slice a long-running request is charged for at once (a
/// guest that blocked in a host call is not charged for the wait).
const MAX_SLICE: Duration = Duration::from_millis(10);

/// A point of reference for the nanosecond timestamps kept in atomics.
fn epoch() -> Instant {
    static EPOCH: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

fn now_ns() -> u64 {
    epoch().elapsed().as_nanos() as u64
}

/// CPU time the calling thread has used, in nanoseconds. A guest is
/// charged what its polls cost in CPU, not in wall time: a poll during
/// which the operating system ran something else (the load generator on
/// the same cores, say) must not make an ordinary request look long-running.
fn thread_cpu_ns() -> u64 {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `now` is a valid timespec to write into, and the thread CPU
    // clock exists on every platform Wharf supports (Linux, macOS).
    let status = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut now) };
    if status != 0 {
        return 0;
    }
    (now.tv_sec as u64)
        .saturating_mul(1_000_000_000)
        .saturating_add(now.tv_nsec as u64)
}

/// What the scheduler remembers about one service (one deployed version):
/// when one of its requests last ran long.
#[derive(Debug, Default)]
pub struct ServiceCpu {
    /// `now_ns()` when a request of this service was last long-running (0:
    /// never).
    last_long: AtomicU64,
}

impl ServiceCpu {
    /// Whether a request of this service ran long within [`SUSPECT_FOR`].
    fn suspect(&self, now: u64) -> bool {
        let last = self.last_long.load(Ordering::Relaxed);
        last != 0 && now.saturating_sub(last) < SUSPECT_FOR.as_nanos() as u64
    }

    fn note_long(&self, now: u64) {
        self.last_long.store(now, Ordering::Relaxed);
    }
}

/// The CPU one request's guest has used, and its budget.
#[derive(Debug)]
pub struct CpuMeter {
    /// CPU used in finished polls, in nanoseconds.
    used_ns: AtomicU64,
    /// The thread's CPU clock when the current poll began (`thread_cpu_ns()
    /// + 1`), or 0 between polls.
    running_since: AtomicU64,
    /// The budget; past it the guest is stopped.
    budget: Duration,
    /// Set when the guest was stopped for going over its budget.
    exceeded: AtomicBool,
    /// Its service's history.
    service: Arc<ServiceCpu>,
}

impl CpuMeter {
    /// A meter for a request of `service` allowed `budget` of CPU.
    pub fn new(budget: Duration, service: Arc<ServiceCpu>) -> Arc<CpuMeter> {
        Arc::new(CpuMeter {
            used_ns: AtomicU64::new(0),
            running_since: AtomicU64::new(0),
            budget,
            exceeded: AtomicBool::new(false),
            service,
        })
    }

    /// Starts counting afresh: an instance serving requests concurrently
    /// meters each stretch it is busy, from its first request to its last.
    pub fn restart(&self) {
        self.used_ns.store(0, Ordering::Relaxed);
        self.exceeded.store(false, Ordering::Relaxed);
    }

    /// Its service's history, for the next request's meter.
    pub fn service(&self) -> &Arc<ServiceCpu> {
        &self.service
    }

    /// The CPU used so far, the current slice included.
    pub fn used(&self) -> Duration {
        Duration::from_nanos(self.used_ns.load(Ordering::Relaxed)) + self.current_slice()
    }

    /// The CPU the guest has used in the current poll (called from the
    /// thread running the poll).
    fn current_slice(&self) -> Duration {
        match self.running_since.load(Ordering::Relaxed) {
            0 => Duration::ZERO,
            since => Duration::from_nanos(thread_cpu_ns().saturating_sub(since - 1)),
        }
    }

    /// The budget this meter enforces.
    pub fn budget(&self) -> Duration {
        self.budget
    }

    /// Whether the guest was stopped for going over its budget.
    pub fn exceeded(&self) -> bool {
        self.exceeded.load(Ordering::Relaxed)
    }

    /// Whether the request has used enough CPU to count as long-running:
    /// [`DEMOTE_AFTER`], or a single tick if its service ran long lately.
    pub fn is_long_running(&self) -> bool {
        let used = self.used();
        used >= DEMOTE_AFTER || (used >= EPOCH_TICK && self.service.suspect(now_ns()))
    }

    fn begin_poll(&self) {
        self.running_since
            .store(thread_cpu_ns() + 1, Ordering::Relaxed);
    }

    fn end_poll(&self) {
        let slice = self.current_slice();
        self.running_since.store(0, Ordering::Relaxed);
        self.used_ns
            .fetch_add(slice.as_nanos() as u64, Ordering::Relaxed);
    }
}

/// What the epoch callback should do for a request at a yield point.
pub enum Verdict {
    /// Stop the guest: its budget is spent.
    Stop,
    /// Let it go on after this future completes.
    Yield(Pin<Box<dyn Future<Output = ()> + Send>>),
}

/// Decides what a guest metered by `meter` does at a yield point: stop if
/// over budget, otherwise yield — and pause, if it is long-running and its
/// thread has interactive work.
pub fn at_yield_point(meter: &CpuMeter) -> Verdict {
    if meter.used() > meter.budget {
        meter.exceeded.store(true, Ordering::Relaxed);
        return Verdict::Stop;
    }
    if !meter.is_long_running() {
        return Verdict::Yield(Box::pin(tokio::task::yield_now()));
    }
    meter.service.note_long(now_ns());
    let lane = Lane::current();
    let slice = meter.current_slice().min(MAX_SLICE).max(EPOCH_TICK);
    Verdict::Yield(Box::pin(lane.background_turn(slice)))
}

/// Waits, before a request's guest starts, if its service ran long lately
/// and the thread has interactive work: such a request takes its turn with
/// the long-running ones instead of going ahead of ordinary requests (a
/// burst of new busy requests would otherwise each run first for a tick).
pub async fn admit(meter: &CpuMeter) {
    let now = now_ns();
    let lane = Lane::current();
    if meter.service.suspect(now) && lane.contended(now) {
        lane.background_turn(EPOCH_TICK).await;
    }
}

/// One server thread's view of its CPU: when interactive work last ran, and
/// when the long-running requests may next run.
#[derive(Debug, Default)]
pub struct Lane {
    /// When an interactive request last finished a poll (`now_ns()`).
    last_interactive: AtomicU64,
    /// Until when long-running requests must wait (`now_ns()`): each slice
    /// they run pushes it further, so their total stays within the share.
    background_until: AtomicU64,
}

thread_local! {
    static LANE: Arc<Lane> = Arc::new(Lane::default());
}

impl Lane {
    /// The lane of the current thread.
    pub fn current() -> Arc<Lane> {
        LANE.with(Arc::clone)
    }

    fn note_interactive(&self) {
        self.last_interactive.store(now_ns(), Ordering::Relaxed);
    }

    /// Whether interactive work ran on this thread within the window.
    fn contended(&self, now: u64) -> bool {
        let last = self.last_interactive.load(Ordering::Relaxed);
        last != 0 && now.saturating_sub(last) < CONTENDED_WINDOW.as_nanos() as u64
    }

    /// Where a long-running request that just ran `slice` waits for its
    /// next turn: at once if the thread has no interactive work, otherwise
    /// after the long-running requests queued before it, each pausing
    /// `BACKGROUND_PARTS - 1` times its slice.
    async fn background_turn(self: Arc<Self>, slice: Duration) {
        // Whatever else is ready runs first, as for any yield.
        tokio::task::yield_now().await;
        let now = now_ns();
        if !self.contended(now) {
            self.background_until.store(now, Ordering::Relaxed);
            return;
        }
        let pause = slice.as_nanos() as u64 * u64::from(BACKGROUND_PARTS - 1);
        let previous = self
            .background_until
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |until| {
                Some(until.max(now) + pause)
            })
            .unwrap_or(now);
        let wake = previous.max(now) + pause;
        tokio::time::sleep(Duration::from_nanos(wake.saturating_sub(now))).await;
    }
}

/// Runs `guest` (the future that drives one request's guest), timing every
/// poll into `meter` and telling the thread's lane when interactive work
/// runs. Adds no allocation: the future is pinned in place.
pub async fn metered<F: Future>(guest: F, meter: Arc<CpuMeter>) -> F::Output {
    let mut guest = std::pin::pin!(guest);
    std::future::poll_fn(|cx| {
        meter.begin_poll();
        let result = guest.as_mut().poll(cx);
        meter.end_poll();
        if !meter.is_long_running() {
            LANE.with(|lane| lane.note_interactive());
        }
        result
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Burns `ms` of this thread's CPU time (not wall time: a busy test
    /// machine may take the CPU away meanwhile).
    fn spin(ms: u64) {
        let until = thread_cpu_ns() + ms * 1_000_000;
        while thread_cpu_ns() < until {
            std::hint::spin_loop();
        }
    }

    #[tokio::test]
    async fn polls_are_metered_and_budgets_enforced() {
        let meter = CpuMeter::new(Duration::from_millis(30), Arc::default());
        metered(async { spin(5) }, meter.clone()).await;
        assert!(meter.used() >= Duration::from_millis(5));
        assert!(!meter.is_long_running());
        assert!(matches!(at_yield_point(&meter), Verdict::Yield(_)));
        metered(async { spin(10) }, meter.clone()).await;
        assert!(meter.is_long_running());
        metered(async { spin(20) }, meter.clone()).await;
        assert!(matches!(at_yield_point(&meter), Verdict::Stop));
        assert!(meter.exceeded());
    }

    #[tokio::test]
    async fn a_service_that_ran_long_is_suspect_for_a_while() {
        let service = Arc::new(ServiceCpu::default());
        let first = CpuMeter::new(Duration::from_secs(1), service.clone());
        metered(async { spin(2) }, first.clone()).await;
        assert!(!first.is_long_running(), "2 ms is ordinary");
        metered(async { spin(10) }, first.clone()).await;
        assert!(matches!(at_yield_point(&first), Verdict::Yield(_)));
        // The next request of the same service is long-running after a tick.
        let next = CpuMeter::new(Duration::from_secs(1), service);
        metered(async { spin(2) }, next.clone()).await;
        assert!(next.is_long_running());
    }

    #[test]
    fn time_the_thread_does_not_run_is_not_charged() {
        let meter = CpuMeter::new(Duration::from_secs(1), Arc::default());
        meter.begin_poll();
        // Off the CPU, as when the operating system runs another thread.
        std::thread::sleep(Duration::from_millis(30));
        meter.end_poll();
        assert!(
            meter.used() < Duration::from_millis(5),
            "{:?}",
            meter.used()
        );
    }

    #[tokio::test]
    async fn waiting_is_not_charged() {
        let meter = CpuMeter::new(Duration::from_secs(1), Arc::default());
        metered(tokio::time::sleep(Duration::from_millis(30)), meter.clone()).await;
        assert!(
            meter.used() < Duration::from_millis(10),
            "{:?}",
            meter.used()
        );
    }

    #[tokio::test(flavor = "current_thread", start_paused = true)]
    async fn long_runners_pause_only_while_interactive_work_runs() {
        let lane = Lane::current();
        // No interactive work: a turn comes at once.
        let started = tokio::time::Instant::now();
        lane.clone().background_turn(Duration::from_millis(1)).await;
        assert_eq!(started.elapsed(), Duration::ZERO);
        // Interactive work just ran: a long-runner pauses nine slices.
        lane.note_interactive();
        let started = tokio::time::Instant::now();
        lane.clone().background_turn(Duration::from_millis(1)).await;
        assert!(started.elapsed() >= Duration::from_millis(9));
    }
}
