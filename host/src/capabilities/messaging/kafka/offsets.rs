//! Which offsets of a Kafka consumer's partitions may be committed.
//!
//! Kafka keeps one committed offset per partition and group: everything
//! before it counts as handled. Deliveries of one partition are handled
//! concurrently and finish in any order, so a partition's commit point is
//! the oldest offset still in flight (or one past the newest handed out,
//! when none is): a crash redelivers what was in flight, never skips it.
//!
//! A rebalance that takes a partition away forgets it: deliveries of the
//! old assignment still finishing then commit nothing (the partition's new
//! owner starts from the last commit, so they are delivered again — at
//! least once, never lost). Each assignment of a partition has its own
//! generation, so an old delivery cannot move a newer assignment's point.

use std::collections::{BTreeSet, HashMap};

/// A topic's partition.
pub type PartitionKey = (String, i32);

/// One partition's deliveries in flight, of one assignment.
#[derive(Debug)]
struct Partition {
    generation: u64,
    in_flight: BTreeSet<i64>,
    /// One past the newest offset handed out.
    next: i64,
}

/// The offsets in flight of every partition a consumer holds.
#[derive(Debug, Default)]
pub struct OffsetTracker {
    partitions: HashMap<PartitionKey, Partition>,
    generations: u64,
}

/// A delivery's place: which assignment of which partition handed it out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ticket {
    /// The partition.
    pub partition: PartitionKey,
    /// The record's offset.
    pub offset: i64,
    generation: u64,
}

impl OffsetTracker {
    /// Records that the record at `offset` of `partition` was handed out.
    pub fn begin(&mut self, partition: PartitionKey, offset: i64) -> Ticket {
        let generations = &mut self.generations;
        let entry = self.partitions.entry(partition.clone()).or_insert_with(|| {
            *generations += 1;
            Partition {
                generation: *generations,
                in_flight: BTreeSet::new(),
                next: offset,
            }
        });
        entry.in_flight.insert(offset);
        entry.next = entry.next.max(offset + 1);
        Ticket {
            partition,
            offset,
            generation: entry.generation,
        }
    }

    /// Records that `ticket`'s delivery is settled; the partition's new
    /// commit point (the next offset to consume), or `None` when the
    /// partition was taken away since or nothing moved.
    pub fn finish(&mut self, ticket: &Ticket) -> Option<i64> {
        let entry = self.partitions.get_mut(&ticket.partition)?;
        if entry.generation != ticket.generation || !entry.in_flight.remove(&ticket.offset) {
            return None;
        }
        let point = entry.in_flight.first().copied().unwrap_or(entry.next);
        (point > ticket.offset).then_some(point)
    }

    /// Whether `ticket` still belongs to a partition this consumer holds.
    pub fn holds(&self, ticket: &Ticket) -> bool {
        self.partitions
            .get(&ticket.partition)
            .is_some_and(|entry| entry.generation == ticket.generation)
    }

    /// Forgets `partition` (taken away by a rebalance).
    pub fn forget(&mut self, partition: &PartitionKey) {
        self.partitions.remove(partition);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> PartitionKey {
        ("orders".to_string(), 0)
    }

    #[test]
    fn the_commit_point_waits_for_the_oldest_in_flight() {
        let mut tracker = OffsetTracker::default();
        let a = tracker.begin(key(), 10);
        let b = tracker.begin(key(), 11);
        let c = tracker.begin(key(), 12);
        // 11 and 12 finish first: 10 still runs, nothing is committed.
        assert_eq!(tracker.finish(&b), None);
        assert_eq!(tracker.finish(&c), None);
        // 10 finishes: everything up to 12 is done.
        assert_eq!(tracker.finish(&a), Some(13));
    }

    #[test]
    fn in_order_deliveries_commit_one_by_one() {
        let mut tracker = OffsetTracker::default();
        let a = tracker.begin(key(), 0);
        let b = tracker.begin(key(), 1);
        assert_eq!(tracker.finish(&a), Some(1));
        assert_eq!(tracker.finish(&b), Some(2));
        // Settling twice moves nothing.
        assert_eq!(tracker.finish(&b), None);
    }

    #[test]
    fn a_delivery_of_a_revoked_partition_commits_nothing() {
        let mut tracker = OffsetTracker::default();
        let old = tracker.begin(key(), 5);
        tracker.forget(&key());
        assert!(!tracker.holds(&old));
        // Assigned again: the old delivery cannot move the new point.
        let new = tracker.begin(key(), 3);
        assert_eq!(tracker.finish(&old), None);
        assert_eq!(tracker.finish(&new), Some(4));
    }
}
