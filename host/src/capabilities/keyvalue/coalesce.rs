//! Increments of one key, coalesced: while one compare-and-swap of a key is
//! in flight, this host's later increments of it wait, and the next swap
//! applies all of them at once. A backend whose increment is a
//! read-then-swap (NATS, any backend behind encryption) would otherwise
//! make its own concurrent increments of a hot key lose races to each
//! other and retry.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};

use crate::capabilities::keyvalue::store::{BackendError, BackendResult};

/// Increments of one key queued behind the swap in flight.
#[derive(Default)]
struct Pending {
    /// Each waiting increment's delta and where its result goes.
    waiting: Vec<(i64, tokio::sync::oneshot::Sender<BackendResult<i64>>)>,
    /// Whether a task is applying them.
    flushing: bool,
}

/// The increments waiting, per (bucket, key).
#[derive(Default)]
pub(crate) struct IncrementQueues {
    pending: Mutex<HashMap<(String, String), Pending>>,
}

impl IncrementQueues {
    /// Adds `delta` to the key `id`: queued behind the swap in flight, or,
    /// if none is, applied by a task of its own (a caller that gives up
    /// never strands the queue) that calls `apply` with the deltas waiting
    /// — `apply` adds them all in one atomic step and returns the value
    /// before them — until none are left. The counter's value after this
    /// increment.
    pub(crate) async fn add<F, Fut>(
        self: &Arc<Self>,
        id: (String, String),
        delta: i64,
        apply: F,
    ) -> BackendResult<i64>
    where
        F: Fn(Vec<i64>) -> Fut + Send + 'static,
        Fut: Future<Output = BackendResult<i64>> + Send + 'static,
    {
        let (reply, answer) = tokio::sync::oneshot::channel();
        let lead = {
            let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
            let queue = pending.entry(id.clone()).or_default();
            queue.waiting.push((delta, reply));
            !std::mem::replace(&mut queue.flushing, true)
        };
        if lead {
            tokio::spawn(self.clone().flush(id, apply));
        }
        answer
            .await
            .map_err(|_| BackendError::Other("the increment was abandoned".into()))?
    }

    /// Applies the queued increments of `id`, a batch per `apply`, until
    /// none are left.
    async fn flush<F, Fut>(self: Arc<Self>, id: (String, String), apply: F)
    where
        F: Fn(Vec<i64>) -> Fut,
        Fut: Future<Output = BackendResult<i64>>,
    {
        loop {
            let batch = {
                let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
                let Some(queue) = pending.get_mut(&id) else {
                    return;
                };
                if queue.waiting.is_empty() {
                    pending.remove(&id);
                    return;
                }
                std::mem::take(&mut queue.waiting)
            };
            let deltas: Vec<i64> = batch.iter().map(|(delta, _)| *delta).collect();
            match apply(deltas).await {
                Ok(base) => {
                    let mut value = base;
                    for (delta, reply) in batch {
                        value = value.saturating_add(delta);
                        let _ = reply.send(Ok(value));
                    }
                }
                Err(err) => {
                    for (_, reply) in batch {
                        let _ = reply.send(Err(err.clone()));
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicI64, AtomicUsize, Ordering};

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_increments_of_one_key_share_swaps_and_each_gets_its_own_value() {
        let queues = Arc::new(IncrementQueues::default());
        let (counter, swaps) = (Arc::new(AtomicI64::new(0)), Arc::new(AtomicUsize::new(0)));
        let tasks: Vec<_> = (0..200)
            .map(|_| {
                let (queues, counter, swaps) = (queues.clone(), counter.clone(), swaps.clone());
                tokio::spawn(async move {
                    queues
                        .add(("b".into(), "k".into()), 1, move |deltas: Vec<i64>| {
                            let (counter, swaps) = (counter.clone(), swaps.clone());
                            async move {
                                swaps.fetch_add(1, Ordering::Relaxed);
                                tokio::time::sleep(std::time::Duration::from_millis(2)).await;
                                Ok(counter.fetch_add(deltas.iter().sum(), Ordering::Relaxed))
                            }
                        })
                        .await
                        .unwrap()
                })
            })
            .collect();
        let mut values = Vec::new();
        for task in tasks {
            values.push(task.await.unwrap());
        }
        values.sort_unstable();
        assert_eq!(values, (1..=200).collect::<Vec<i64>>());
        assert_eq!(counter.load(Ordering::Relaxed), 200);
        assert!(
            swaps.load(Ordering::Relaxed) < 200,
            "no increments shared a swap"
        );
        assert!(queues.pending.lock().unwrap().is_empty());
    }
}
