//! Where compilation runs: two lanes, one for small components and one for
//! large ones (JavaScript and Python interpreters, megabytes of code), each
//! with its own permits and its own rayon thread pool for Cranelift's
//! parallel compilation.
//!
//! With one shared pool, a small Rust service queued behind two 13 MB
//! components waited for their compiles' work to drain out of the pool and
//! logged `compile_ms=16927` for a compile of a few milliseconds. With two
//! pools the operating system shares the cores between the lanes, so a small
//! service is live in milliseconds while a large one compiles beside it;
//! large compiles go one at a time (each already uses every core), so the
//! first of several finishes as early as it can.

use std::future::Future;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, anyhow};
use tokio::sync::Semaphore;

use crate::base::limits::format_size;
use crate::guest::engine::COPY_ON_WRITE_FROM;

/// Components at least this large compile in the large lane.
pub const LARGE_COMPONENT: usize = COPY_ON_WRITE_FROM;

/// How often a long compile says it is still running.
const PROGRESS_EVERY: Duration = Duration::from_secs(5);

/// One lane: how many compiles may run at once, and the threads they use.
struct Lane {
    permits: Semaphore,
    pool: rayon::ThreadPool,
}

/// The scheduling priority (nice value) of background compile threads.
const BACKGROUND_NICE: i32 = 10;

impl Lane {
    fn new(name: &str, permits: usize, threads: usize) -> Result<Lane> {
        Lane::with_priority(name, permits, threads, 0)
    }

    /// A lane whose threads run at nice value `nice` (0: unchanged).
    fn with_priority(name: &str, permits: usize, threads: usize, nice: i32) -> Result<Lane> {
        let prefix = format!("wharf-compile-{name}");
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .thread_name(move |i| format!("{prefix}-{i}"))
            .start_handler(move |_| lower_priority(nice))
            .build()
            .with_context(|| format!("starting the {name} compile threads"))?;
        Ok(Lane {
            permits: Semaphore::new(permits),
            pool,
        })
    }

    /// Waits for one of the lane's permits, held as long as the guard.
    async fn turn(&self) -> Result<tokio::sync::SemaphorePermit<'_>> {
        // The semaphores are never closed.
        self.permits
            .acquire()
            .await
            .map_err(|_| anyhow!("the compiler is shutting down"))
    }

    /// Runs `compile` on the lane's threads; its result arrives through the
    /// returned channel (closed without one only if the thread panicked).
    fn spawn<T: Send + 'static>(
        &self,
        compile: impl FnOnce() -> Result<T> + Send + 'static,
    ) -> tokio::sync::oneshot::Receiver<Result<T>> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.pool.spawn(move || {
            // The receiver is gone only if the deploy was abandoned.
            let _ = tx.send(compile());
        });
        rx
    }
}

/// The compile lanes of a host.
pub(crate) struct Compiler {
    small: Lane,
    large: Lane,
    /// Optimising compiles of services already served from baseline code:
    /// one at a time, on threads the operating system schedules after
    /// everything else (nice 10), so serving and first compiles go first.
    background: Lane,
}

/// How long a compile waited for its lane and how long it ran.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CompileTimes {
    /// Time spent waiting for a compile permit.
    pub queued: Duration,
    /// Time spent compiling (or loading from the cache), linking included.
    pub compiled: Duration,
}

impl Compiler {
    /// Lanes sized for this machine: as many small compiles at once as there
    /// are cores, large ones one at a time; each lane's pool has a thread per
    /// core.
    pub(crate) fn new() -> Result<Compiler> {
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        Ok(Compiler {
            small: Lane::new("small", cores, cores)?,
            large: Lane::new("large", 1, cores)?,
            background: Lane::with_priority("background", 1, cores, BACKGROUND_NICE)?,
        })
    }

    /// Runs `compile` (blocking, CPU-heavy) for service `name` in the
    /// background lane, once it has its turn, on what `still_wanted` then
    /// gives it; `None` if that is nothing. Returns the value and how long
    /// it waited and ran.
    pub(crate) async fn run_background<W: Send + 'static, T: Send + 'static>(
        &self,
        name: &str,
        still_wanted: impl FnOnce() -> Option<W>,
        compile: impl FnOnce(W) -> Result<T> + Send + 'static,
    ) -> Result<Option<(T, CompileTimes)>> {
        let queued_at = Instant::now();
        let _permit = self.background.turn().await?;
        let Some(input) = still_wanted() else {
            return Ok(None);
        };
        let queued = queued_at.elapsed();
        let started = Instant::now();
        let value = self
            .background
            .spawn(move || compile(input))
            .await
            .map_err(|_| anyhow!("the optimising compile of {name} ended without a result"))??;
        let compiled = started.elapsed();
        Ok(Some((value, CompileTimes { queued, compiled })))
    }

    /// Runs `compile` (blocking, CPU-heavy) for service `name`, whose
    /// component has `size` bytes, in the lane that suits its size. Large
    /// compiles are announced, and say every few seconds that they are still
    /// running.
    pub(crate) async fn run<T: Send + 'static>(
        &self,
        name: &str,
        size: usize,
        compile: impl FnOnce() -> Result<T> + Send + 'static,
    ) -> Result<(T, CompileTimes)> {
        let large = size >= LARGE_COMPONENT;
        let lane = if large { &self.large } else { &self.small };
        let queued_at = Instant::now();
        let _permit = lane.turn().await?;
        let queued = queued_at.elapsed();
        let started = Instant::now();
        if large {
            tracing::info!(
                target: "wharf::deploy",
                event = "compiling",
                service = %name,
                size = %format_size(size as u64),
                queue_ms = queued.as_millis() as u64,
                "compiling {name} ({}); a large component takes a few seconds",
                format_size(size as u64)
            );
        }
        let result = with_progress(name, large, started, lane.spawn(compile)).await;
        let compiled = started.elapsed();
        let value = result.map_err(|_| anyhow!("the compile thread ended without a result"))??;
        Ok((value, CompileTimes { queued, compiled }))
    }
}

/// Awaits `done`, logging every [`PROGRESS_EVERY`] that `name` is still
/// compiling if it is a `large` one.
async fn with_progress<F: Future>(name: &str, large: bool, started: Instant, done: F) -> F::Output {
    let mut done = std::pin::pin!(done);
    loop {
        tokio::select! {
            output = &mut done => return output,
            () = tokio::time::sleep(PROGRESS_EVERY), if large => {
                tracing::info!(
                    target: "wharf::deploy",
                    event = "compiling",
                    service = %name,
                    elapsed_s = started.elapsed().as_secs(),
                    "still compiling {name} ({} s so far)",
                    started.elapsed().as_secs()
                );
            }
        }
    }
}

/// Lowers the calling thread's scheduling priority to nice value `nice`
/// (Linux schedules threads individually); a no-op for 0, and best effort:
/// a thread that cannot be lowered compiles at normal priority.
fn lower_priority(nice: i32) {
    if nice == 0 {
        return;
    }
    #[cfg(target_os = "linux")]
    // SAFETY: gettid has no preconditions; setpriority on the calling
    // thread's id changes only that thread's nice value.
    unsafe {
        let tid = libc::gettid();
        libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, nice);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn compiles_run_in_their_lane_and_report_their_times() {
        let compiler = Compiler::new().unwrap();
        let (value, times) = compiler
            .run("small", 10, || {
                assert!(
                    rayon::current_thread_index().is_some(),
                    "runs on a lane's pool"
                );
                Ok(7)
            })
            .await
            .unwrap();
        assert_eq!(value, 7);
        assert!(times.queued < Duration::from_secs(5));
        let err = compiler
            .run("large", LARGE_COMPONENT, || -> Result<()> {
                Err(anyhow!("bad component"))
            })
            .await
            .unwrap_err();
        assert!(err.to_string().contains("bad component"));
    }

    #[tokio::test]
    async fn a_small_compile_does_not_wait_behind_a_large_one() {
        let compiler = std::sync::Arc::new(Compiler::new().unwrap());
        let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
        let large = tokio::spawn({
            let compiler = compiler.clone();
            async move {
                compiler
                    .run("large", LARGE_COMPONENT, move || {
                        let _ = release_rx.recv();
                        Ok(())
                    })
                    .await
            }
        });
        // The large lane is busy until released; a small compile still runs.
        let (_, times) = compiler.run("small", 10, || Ok(())).await.unwrap();
        assert!(times.queued < Duration::from_secs(5));
        release_tx.send(()).unwrap();
        large.await.unwrap().unwrap();
    }
}
