//! Admission control: how many requests may run at once — per service and
//! across the host's instance pool — with a short, bounded wait for a slot
//! and a bounded number of waiters. Past either bound the answer is 503, so
//! overload never grows an unbounded queue.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Longest a request waits for a slot before getting 503.
pub const MAX_QUEUE_WAIT: Duration = Duration::from_secs(1);

/// A bounded set of slots with a bounded waiting line.
#[derive(Debug)]
pub struct Gate {
    slots: Arc<Semaphore>,
    capacity: usize,
    /// Requests waiting right now.
    waiting: AtomicUsize,
    /// Most requests allowed to wait at once.
    max_waiting: usize,
    /// What the gate guards, for the 503 reason.
    what: &'static str,
}

/// Why a request was not admitted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused(pub String);

/// Counts a waiter while it waits.
struct Waiting<'a>(&'a AtomicUsize);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Gate {
    /// A gate with `capacity` slots and as many places to wait.
    pub fn new(capacity: usize, what: &'static str) -> Gate {
        Gate {
            slots: Arc::new(Semaphore::new(capacity)),
            capacity,
            waiting: AtomicUsize::new(0),
            max_waiting: capacity,
            what,
        }
    }

    /// Slots in total.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Slots in use right now.
    pub fn in_use(&self) -> usize {
        self.capacity - self.slots.available_permits()
    }

    /// Takes a slot, waiting until `deadline` at most. The slot is released
    /// when the permit is dropped.
    pub async fn enter(&self, deadline: Instant) -> Result<OwnedSemaphorePermit, Refused> {
        if let Ok(permit) = self.slots.clone().try_acquire_owned() {
            return Ok(permit);
        }
        if self.waiting.fetch_add(1, Ordering::Relaxed) >= self.max_waiting {
            self.waiting.fetch_sub(1, Ordering::Relaxed);
            return Err(self.refusal());
        }
        let _waiting = Waiting(&self.waiting);
        match tokio::time::timeout_at(deadline.into(), self.slots.clone().acquire_owned()).await {
            Ok(Ok(permit)) => Ok(permit),
            // The semaphore is never closed; a timeout means still full.
            _ => Err(self.refusal()),
        }
    }

    fn refusal(&self) -> Refused {
        Refused(format!("{} of {} are busy", self.what, self.capacity))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn slots_are_bounded_and_waiting_is_bounded() {
        let gate = Arc::new(Gate::new(1, "request slots"));
        let held = gate.enter(Instant::now()).await.unwrap();
        assert_eq!(gate.in_use(), 1);

        // One waiter is allowed; it gets the slot when it frees up.
        let waiter = tokio::spawn({
            let gate = gate.clone();
            async move {
                gate.enter(Instant::now() + Duration::from_secs(5))
                    .await
                    .is_ok()
            }
        });
        while gate.waiting.load(Ordering::Relaxed) == 0 {
            tokio::task::yield_now().await;
        }
        // A second waiter is refused at once: the line is full.
        let refused = gate.enter(Instant::now() + Duration::from_secs(5)).await;
        assert_eq!(refused.unwrap_err().0, "request slots of 1 are busy");
        drop(held);
        assert!(waiter.await.unwrap());
    }

    #[tokio::test]
    async fn waiting_ends_at_the_deadline() {
        let gate = Gate::new(1, "slots");
        let _held = gate.enter(Instant::now()).await.unwrap();
        let started = Instant::now();
        assert!(
            gate.enter(Instant::now() + Duration::from_millis(20))
                .await
                .is_err()
        );
        assert!(started.elapsed() >= Duration::from_millis(20));
        assert_eq!(gate.waiting.load(Ordering::Relaxed), 0);
    }
}
