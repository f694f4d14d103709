//! The embedded broker: durable queues in SQLite in the data directory, so
//! messaging works with nothing installed.
//!
//! A published message is stored once, with one delivery row per consumer
//! group whose subscription (binding) matches its topic; bindings are kept
//! too, so a group whose service is down or being replaced still collects
//! its messages. Consumers lease deliveries (marking them taken until the
//! lease ends), and a delivery is deleted only when acknowledged — after
//! its handler succeeded — so a message not yet acknowledged survives a
//! restart or `kill -9` and is delivered after it (leases from before a
//! restart are void). A failed delivery gets a later `ready_at`; one that
//! failed its last attempt moves to the dead letters. The queue is bounded:
//! past `max_pending` undelivered deliveries, publishing fails with "full".
//!
//! As with the key-value store (same reasoning, see
//! `capabilities::keyvalue::embedded`): one SQLite connection owned by one
//! thread, write-ahead log with `synchronous = NORMAL` (an accepted message
//! survives `kill -9`; a power loss may lose the last ones), and group
//! commit — every operation waiting when the thread looks is committed in
//! one transaction, each in a savepoint, and answered after the commit.

use std::collections::{HashMap, VecDeque};
use std::path::Path;
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, SystemTime};

use anyhow::{Context as _, Result};
use bytes::Bytes;
use rusqlite::{Connection, OptionalExtension as _, params};
use tokio::sync::{Notify, oneshot};

use crate::capabilities::messaging::broker::{
    BrokerError, BrokerResult, BrokerStatus, DeadLetter, Message, Subscription,
};
use crate::capabilities::messaging::topic::TopicPattern;
use crate::capabilities::sqlite::{self, in_savepoint, in_transaction};

/// Most operations committed in one transaction.
const MAX_BATCH: usize = 512;

/// How often an idle consumer looks for deliveries whose retry time came,
/// at the latest.
const POLL_EVERY: Duration = Duration::from_millis(250);

fn millis(time: SystemTime) -> i64 {
    time.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

fn from_millis(ms: i64) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_millis(ms.max(0) as u64)
}

fn now_ms() -> i64 {
    millis(SystemTime::now())
}

/// One leased delivery, as the store thread hands it out.
struct Leased {
    seq: i64,
    attempt: u32,
    message: Message,
}

enum Op {
    Publish(Message),
    Bind {
        group: String,
        pattern: String,
    },
    Lease {
        group: String,
        max: usize,
        lease_ms: i64,
    },
    Ack {
        group: String,
        seq: i64,
    },
    Retry {
        group: String,
        seq: i64,
        at_ms: i64,
    },
    /// Hands a leased delivery back unhandled (its attempt not counted).
    Release {
        group: String,
        seq: i64,
    },
    Dead {
        group: String,
        seq: i64,
        reason: String,
    },
    /// Forgets a group: its binding, waiting deliveries and dead letters.
    DeleteGroup {
        group: String,
    },
    DeadLetters {
        group: String,
        limit: usize,
    },
}

enum Reply {
    Done,
    Published(Vec<String>),
    Leased(Vec<Leased>),
    Dead(Vec<DeadLetter>),
    Deleted(bool),
}

type Job = (Op, oneshot::Sender<BrokerResult<Reply>>);

/// The embedded broker.
pub struct EmbeddedBroker {
    jobs: Mutex<mpsc::Sender<Job>>,
    /// Wakes a group's consumers when a message for it arrives.
    wakers: Mutex<HashMap<String, Arc<Notify>>>,
    detail: String,
}

impl EmbeddedBroker {
    /// Opens (creating if needed) the queue at `path`, or an in-memory one
    /// if `path` is `None` (nothing survives the process), holding at most
    /// `max_pending` undelivered deliveries.
    pub fn open(path: Option<&Path>, max_pending: u64) -> Result<EmbeddedBroker> {
        let connection = sqlite::open(path, "message queue")?;
        connection
            .execute_batch(
                "CREATE TABLE IF NOT EXISTS messages (
                     seq INTEGER PRIMARY KEY,
                     id TEXT NOT NULL,
                     topic TEXT NOT NULL,
                     body BLOB NOT NULL,
                     content_type TEXT,
                     metadata TEXT NOT NULL,
                     reply_to TEXT,
                     published_ms INTEGER NOT NULL,
                     refs INTEGER NOT NULL
                 );
                 CREATE TABLE IF NOT EXISTS bindings (
                     grp TEXT NOT NULL,
                     pattern TEXT NOT NULL,
                     PRIMARY KEY (grp, pattern)
                 ) WITHOUT ROWID;
                 CREATE TABLE IF NOT EXISTS deliveries (
                     grp TEXT NOT NULL,
                     seq INTEGER NOT NULL,
                     attempts INTEGER NOT NULL,
                     ready_ms INTEGER NOT NULL,
                     leased_until_ms INTEGER NOT NULL,
                     PRIMARY KEY (grp, seq)
                 ) WITHOUT ROWID;
                 CREATE INDEX IF NOT EXISTS deliveries_ready ON deliveries (grp, ready_ms, seq);
                 CREATE TABLE IF NOT EXISTS dead (
                     grp TEXT NOT NULL,
                     id TEXT NOT NULL,
                     topic TEXT NOT NULL,
                     body BLOB NOT NULL,
                     content_type TEXT,
                     metadata TEXT NOT NULL,
                     published_ms INTEGER NOT NULL,
                     attempts INTEGER NOT NULL,
                     reason TEXT NOT NULL,
                     dead_ms INTEGER NOT NULL
                 );
                 -- Leases taken before a restart are void: their consumers
                 -- are gone, so the deliveries are due again at once.
                 UPDATE deliveries SET leased_until_ms = 0;",
            )
            .context("preparing the message queue")?;
        let pending: i64 = connection
            .query_row("SELECT COUNT(*) FROM deliveries", [], |row| row.get(0))
            .context("counting pending deliveries")?;
        let bindings = load_bindings(&connection)?;
        let (jobs, receiver) = mpsc::channel::<Job>();
        let state = StoreThread {
            connection,
            bindings,
            pending: pending.max(0) as u64,
            max_pending,
        };
        std::thread::Builder::new()
            .name("wharf-messages".into())
            .spawn(move || state.run(receiver))
            .context("starting the message queue thread")?;
        Ok(EmbeddedBroker {
            jobs: Mutex::new(jobs),
            wakers: Mutex::new(HashMap::new()),
            detail: match path {
                Some(path) => format!("SQLite at {}", path.display()),
                None => "in memory (not persisted)".into(),
            },
        })
    }

    /// Queues `op` without waiting for its answer.
    fn send(&self, op: Op) -> BrokerResult<()> {
        let (reply, _) = oneshot::channel();
        self.jobs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .send((op, reply))
            .map_err(|_| BrokerError::Unavailable("the message queue thread has stopped".into()))
    }

    async fn call(&self, op: Op) -> BrokerResult<Reply> {
        let (reply, answer) = oneshot::channel();
        self.jobs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .send((op, reply))
            .map_err(|_| BrokerError::Unavailable("the message queue thread has stopped".into()))?;
        answer
            .await
            .map_err(|_| BrokerError::Unavailable("the message queue thread has stopped".into()))?
    }

    fn waker(&self, group: &str) -> Arc<Notify> {
        self.wakers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(group.to_string())
            .or_default()
            .clone()
    }

    /// Always up while its thread runs.
    pub fn status(&self) -> BrokerStatus {
        BrokerStatus {
            kind: "embedded",
            up: true,
            detail: self.detail.clone(),
        }
    }

    /// Stores `message` with a delivery for every bound group.
    pub async fn publish(&self, message: Message) -> BrokerResult<()> {
        match self.call(Op::Publish(message)).await? {
            Reply::Published(groups) => {
                for group in groups {
                    self.waker(&group).notify_waiters();
                }
                Ok(())
            }
            _ => Err(unexpected()),
        }
    }

    /// Binds the group to its pattern (kept across restarts) and returns a
    /// consumer of it.
    pub async fn subscribe(
        self: &Arc<Self>,
        subscription: &Subscription,
    ) -> BrokerResult<EmbeddedConsumer> {
        self.call(Op::Bind {
            group: subscription.group.clone(),
            pattern: subscription.pattern.as_str().to_string(),
        })
        .await?;
        Ok(EmbeddedConsumer {
            broker: self.clone(),
            subscription: subscription.clone(),
            buffer: VecDeque::new(),
            waker: self.waker(&subscription.group),
        })
    }

    pub async fn dead_letters(&self, group: &str, limit: usize) -> BrokerResult<Vec<DeadLetter>> {
        match self
            .call(Op::DeadLetters {
                group: group.to_string(),
                limit,
            })
            .await?
        {
            Reply::Dead(letters) => Ok(letters),
            _ => Err(unexpected()),
        }
    }
}

impl EmbeddedBroker {
    /// Forgets `group`: its binding (new messages no longer wait for it),
    /// the deliveries waiting for it, and its dead letters. Whether there
    /// was anything to forget.
    pub async fn delete_group(&self, group: &str) -> BrokerResult<bool> {
        match self
            .call(Op::DeleteGroup {
                group: group.to_string(),
            })
            .await?
        {
            Reply::Deleted(existed) => Ok(existed),
            _ => Err(unexpected()),
        }
    }
}

fn unexpected() -> BrokerError {
    BrokerError::Other("the message queue answered another operation".into())
}

/// A consumer of one group on the embedded broker.
pub struct EmbeddedConsumer {
    broker: Arc<EmbeddedBroker>,
    subscription: Subscription,
    buffer: VecDeque<EmbeddedDelivery>,
    waker: Arc<Notify>,
}

impl EmbeddedConsumer {
    /// The next delivery: leased from the queue, waiting for a publish (or
    /// a retry coming due) when there is none.
    pub async fn next(&mut self) -> BrokerResult<EmbeddedDelivery> {
        loop {
            if let Some(delivery) = self.buffer.pop_front() {
                return Ok(delivery);
            }
            let notified = self.waker.notified();
            let mut notified = std::pin::pin!(notified);
            notified.as_mut().enable();
            let leased = self
                .broker
                .call(Op::Lease {
                    group: self.subscription.group.clone(),
                    max: self.subscription.prefetch.max(1),
                    lease_ms: self.subscription.ack_wait.as_millis() as i64,
                })
                .await?;
            let Reply::Leased(leased) = leased else {
                return Err(unexpected());
            };
            if leased.is_empty() {
                tokio::select! {
                    () = notified => {}
                    () = tokio::time::sleep(POLL_EVERY) => {}
                }
                continue;
            }
            for lease in leased {
                self.buffer.push_back(EmbeddedDelivery {
                    broker: self.broker.clone(),
                    group: self.subscription.group.clone(),
                    seq: lease.seq,
                    attempt: lease.attempt,
                    message: lease.message,
                    settled: false,
                });
            }
        }
    }
}

/// One delivery from the embedded broker. Dropped without being settled
/// (its consumer stopped before handing it out, its handler was cancelled),
/// it goes back to the queue at once, the attempt not counted.
pub struct EmbeddedDelivery {
    broker: Arc<EmbeddedBroker>,
    group: String,
    seq: i64,
    attempt: u32,
    message: Message,
    settled: bool,
}

impl EmbeddedDelivery {
    /// The message.
    pub fn message(&self) -> &Message {
        &self.message
    }

    /// Which attempt this is.
    pub fn attempt(&self) -> u32 {
        self.attempt
    }

    /// Marks the delivery settled and returns what an operation on it needs.
    fn settle(mut self) -> (Arc<EmbeddedBroker>, String, i64) {
        self.settled = true;
        (
            self.broker.clone(),
            std::mem::take(&mut self.group),
            self.seq,
        )
    }

    /// Deletes the delivery: the message is done for this group. Queued
    /// for the store thread without waiting for its commit: an
    /// acknowledgement lost in a crash only means the message comes again,
    /// which at-least-once delivery allows, and not waiting saves a
    /// round trip between threads per message. Acknowledgements and the
    /// consumer's next lease go through the same queue, in order, so a
    /// consumer never runs ahead of its acknowledgements.
    pub async fn ack(self) -> BrokerResult<()> {
        let (broker, group, seq) = self.settle();
        broker.send(Op::Ack { group, seq })
    }

    /// Makes the delivery due again after `delay`.
    pub async fn retry(self, delay: Duration) -> BrokerResult<()> {
        let at_ms = now_ms() + delay.as_millis() as i64;
        let (broker, group, seq) = self.settle();
        broker.call(Op::Retry { group, seq, at_ms }).await.map(drop)
    }

    /// Moves the message to the group's dead letters.
    pub async fn dead_letter(self, reason: &str) -> BrokerResult<()> {
        let reason = reason.to_string();
        let (broker, group, seq) = self.settle();
        broker.call(Op::Dead { group, seq, reason }).await.map(drop)
    }
}

impl Drop for EmbeddedDelivery {
    fn drop(&mut self) {
        if self.settled {
            return;
        }
        let op = Op::Release {
            group: self.group.clone(),
            seq: self.seq,
        };
        // Nobody waits for the answer.
        let (reply, _) = oneshot::channel();
        let _ = self
            .broker
            .jobs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .send((op, reply));
        if let Ok(wakers) = self.broker.wakers.lock()
            && let Some(waker) = wakers.get(&self.group)
        {
            waker.notify_waiters();
        }
    }
}

fn load_bindings(connection: &Connection) -> Result<Vec<(String, TopicPattern)>> {
    let mut statement = connection.prepare("SELECT grp, pattern FROM bindings")?;
    let rows = statement.query_map([], |row| {
        Ok((row.get::<_, String>(0)?, row.get::<_, String>(1)?))
    })?;
    let mut bindings = Vec::new();
    for row in rows {
        let (group, pattern) = row?;
        if let Ok(pattern) = TopicPattern::parse(&pattern) {
            bindings.push((group, pattern));
        }
    }
    Ok(bindings)
}

fn sql(err: rusqlite::Error) -> BrokerError {
    BrokerError::Other(format!("the message queue failed: {err}"))
}

/// What the store thread owns.
struct StoreThread {
    connection: Connection,
    bindings: Vec<(String, TopicPattern)>,
    /// Deliveries not yet acknowledged or dead.
    pending: u64,
    max_pending: u64,
}

impl StoreThread {
    fn run(mut self, jobs: mpsc::Receiver<Job>) {
        while let Ok(first) = jobs.recv() {
            let mut batch = vec![first];
            while batch.len() < MAX_BATCH {
                match jobs.try_recv() {
                    Ok(job) => batch.push(job),
                    Err(_) => break,
                }
            }
            let results = self.run_batch(&batch);
            for ((_, reply), result) in batch.into_iter().zip(results) {
                let _ = reply.send(result);
            }
        }
    }

    /// Runs `batch` in one transaction, each operation in its own
    /// savepoint; the answers, and the changes to the bindings and the
    /// pending count, count only once the commit succeeded.
    fn run_batch(&mut self, batch: &[Job]) -> Vec<BrokerResult<Reply>> {
        let mut pending = self.pending;
        let mut bindings = self.bindings.clone();
        let max_pending = self.max_pending;
        let outcome = in_transaction(&self.connection, |connection| {
            batch
                .iter()
                .map(|(op, _)| {
                    // A failed operation leaves nothing behind.
                    in_savepoint(connection, sql, |connection| {
                        apply(connection, op, pending, &bindings, max_pending)
                    })
                    .map(|(reply, effect)| {
                        pending = pending.saturating_add_signed(effect.pending);
                        if let Some(binding) = effect.binding {
                            bindings.push(binding);
                        }
                        if let Some(group) = effect.unbound {
                            bindings.retain(|(g, _)| *g != group);
                        }
                        reply
                    })
                })
                .collect::<Vec<_>>()
        });
        match outcome {
            Ok(results) => {
                self.pending = pending;
                self.bindings = bindings;
                results
            }
            Err(err) => batch.iter().map(|_| Err(sql_text(&err))).collect(),
        }
    }
}

/// How an operation changes what the store thread keeps in memory.
#[derive(Default)]
struct Effect {
    /// Change to the pending-delivery count.
    pending: i64,
    /// A new binding.
    binding: Option<(String, TopicPattern)>,
    /// A group whose bindings are gone.
    unbound: Option<String>,
}

fn sql_text(err: &rusqlite::Error) -> BrokerError {
    BrokerError::Other(format!("the message queue failed: {err}"))
}

fn read_message(row: &rusqlite::Row<'_>, offset: usize) -> rusqlite::Result<Message> {
    Ok(Message {
        id: row.get(offset)?,
        topic: row.get(offset + 1)?,
        body: Bytes::from(row.get::<_, Vec<u8>>(offset + 2)?),
        content_type: row.get(offset + 3)?,
        metadata: Message::metadata_from_json(&row.get::<_, String>(offset + 4)?),
        reply_to: row.get(offset + 5)?,
        published_at: from_millis(row.get(offset + 6)?),
    })
}

/// Drops one reference to message `seq`, deleting it with the last.
fn release(connection: &Connection, seq: i64) -> BrokerResult<()> {
    connection
        .prepare_cached("UPDATE messages SET refs = refs - 1 WHERE seq = ?1")
        .and_then(|mut s| s.execute(params![seq]))
        .map_err(sql)?;
    connection
        .prepare_cached("DELETE FROM messages WHERE seq = ?1 AND refs <= 0")
        .and_then(|mut s| s.execute(params![seq]))
        .map_err(sql)?;
    Ok(())
}

fn apply(
    connection: &Connection,
    op: &Op,
    pending: u64,
    bindings: &[(String, TopicPattern)],
    max_pending: u64,
) -> BrokerResult<(Reply, Effect)> {
    let done = |reply| Ok((reply, Effect::default()));
    match op {
        Op::Publish(message) => {
            let mut groups: Vec<String> = bindings
                .iter()
                .filter(|(_, pattern)| pattern.matches(&message.topic))
                .map(|(group, _)| group.clone())
                .collect();
            groups.sort();
            groups.dedup();
            if groups.is_empty() {
                // No group subscribes to this topic: nothing to keep.
                return done(Reply::Published(groups));
            }
            if pending + groups.len() as u64 > max_pending {
                return Err(BrokerError::Full(format!(
                    "{pending} messages are waiting for delivery, the most the embedded broker holds"
                )));
            }
            connection
                .prepare_cached(
                    "INSERT INTO messages (id, topic, body, content_type, metadata, reply_to, published_ms, refs)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
                )
                .and_then(|mut s| {
                    s.execute(params![
                        message.id,
                        message.topic,
                        &message.body[..],
                        message.content_type,
                        message.metadata_json(),
                        message.reply_to,
                        millis(message.published_at),
                        groups.len() as i64,
                    ])
                })
                .map_err(sql)?;
            let seq = connection.last_insert_rowid();
            let now = now_ms();
            for group in &groups {
                connection
                    .prepare_cached(
                        "INSERT INTO deliveries (grp, seq, attempts, ready_ms, leased_until_ms) VALUES (?1, ?2, 0, ?3, 0)",
                    )
                    .and_then(|mut s| s.execute(params![group, seq, now]))
                    .map_err(sql)?;
            }
            let effect = Effect {
                pending: groups.len() as i64,
                ..Effect::default()
            };
            Ok((Reply::Published(groups), effect))
        }
        Op::Bind { group, pattern } => {
            connection
                .prepare_cached("INSERT OR IGNORE INTO bindings (grp, pattern) VALUES (?1, ?2)")
                .and_then(|mut s| s.execute(params![group, pattern]))
                .map_err(sql)?;
            let binding = TopicPattern::parse(pattern)
                .ok()
                .filter(|parsed| !bindings.iter().any(|(g, p)| g == group && p == parsed))
                .map(|parsed| (group.clone(), parsed));
            Ok((
                Reply::Done,
                Effect {
                    binding,
                    ..Effect::default()
                },
            ))
        }
        Op::Lease {
            group,
            max,
            lease_ms,
        } => {
            let now = now_ms();
            let mut statement = connection
                .prepare_cached(
                    "SELECT d.seq, d.attempts, m.id, m.topic, m.body, m.content_type, m.metadata, m.reply_to, m.published_ms
                     FROM deliveries d JOIN messages m ON m.seq = d.seq
                     WHERE d.grp = ?1 AND d.ready_ms <= ?2 AND d.leased_until_ms <= ?2
                     ORDER BY d.ready_ms, d.seq LIMIT ?3",
                )
                .map_err(sql)?;
            let rows = statement
                .query_map(params![group, now, *max as i64], |row| {
                    Ok(Leased {
                        seq: row.get(0)?,
                        attempt: row.get::<_, i64>(1)? as u32 + 1,
                        message: read_message(row, 2)?,
                    })
                })
                .and_then(Iterator::collect::<rusqlite::Result<Vec<_>>>)
                .map_err(sql)?;
            for leased in &rows {
                connection
                    .prepare_cached(
                        "UPDATE deliveries SET attempts = attempts + 1, leased_until_ms = ?3 WHERE grp = ?1 AND seq = ?2",
                    )
                    .and_then(|mut s| s.execute(params![group, leased.seq, now + lease_ms]))
                    .map_err(sql)?;
            }
            done(Reply::Leased(rows))
        }
        Op::Ack { group, seq } => {
            let removed = connection
                .prepare_cached("DELETE FROM deliveries WHERE grp = ?1 AND seq = ?2")
                .and_then(|mut s| s.execute(params![group, seq]))
                .map_err(sql)?;
            if removed == 0 {
                return done(Reply::Done);
            }
            release(connection, *seq)?;
            Ok((
                Reply::Done,
                Effect {
                    pending: -1,
                    ..Effect::default()
                },
            ))
        }
        Op::Retry { group, seq, at_ms } => {
            connection
                .prepare_cached(
                    "UPDATE deliveries SET ready_ms = ?3, leased_until_ms = 0 WHERE grp = ?1 AND seq = ?2",
                )
                .and_then(|mut s| s.execute(params![group, seq, at_ms]))
                .map_err(sql)?;
            done(Reply::Done)
        }
        Op::Release { group, seq } => {
            connection
                .prepare_cached(
                    "UPDATE deliveries SET attempts = MAX(attempts - 1, 0), leased_until_ms = 0 WHERE grp = ?1 AND seq = ?2",
                )
                .and_then(|mut s| s.execute(params![group, seq]))
                .map_err(sql)?;
            done(Reply::Done)
        }
        Op::Dead { group, seq, reason } => {
            let attempts: Option<i64> = connection
                .prepare_cached("SELECT attempts FROM deliveries WHERE grp = ?1 AND seq = ?2")
                .and_then(|mut s| {
                    s.query_row(params![group, seq], |row| row.get(0))
                        .optional()
                })
                .map_err(sql)?;
            let Some(attempts) = attempts else {
                return done(Reply::Done);
            };
            connection
                .prepare_cached(
                    "INSERT INTO dead (grp, id, topic, body, content_type, metadata, published_ms, attempts, reason, dead_ms)
                     SELECT ?1, id, topic, body, content_type, metadata, published_ms, ?3, ?4, ?5 FROM messages WHERE seq = ?2",
                )
                .and_then(|mut s| s.execute(params![group, seq, attempts, reason, now_ms()]))
                .map_err(sql)?;
            connection
                .prepare_cached("DELETE FROM deliveries WHERE grp = ?1 AND seq = ?2")
                .and_then(|mut s| s.execute(params![group, seq]))
                .map_err(sql)?;
            release(connection, *seq)?;
            Ok((
                Reply::Done,
                Effect {
                    pending: -1,
                    ..Effect::default()
                },
            ))
        }
        Op::DeleteGroup { group } => {
            let seqs: Vec<i64> = connection
                .prepare_cached("SELECT seq FROM deliveries WHERE grp = ?1")
                .and_then(|mut s| {
                    s.query_map(params![group], |row| row.get(0))
                        .and_then(Iterator::collect::<rusqlite::Result<Vec<i64>>>)
                })
                .map_err(sql)?;
            connection
                .prepare_cached("DELETE FROM deliveries WHERE grp = ?1")
                .and_then(|mut s| s.execute(params![group]))
                .map_err(sql)?;
            for seq in &seqs {
                release(connection, *seq)?;
            }
            let unbound = connection
                .prepare_cached("DELETE FROM bindings WHERE grp = ?1")
                .and_then(|mut s| s.execute(params![group]))
                .map_err(sql)?;
            let dead = connection
                .prepare_cached("DELETE FROM dead WHERE grp = ?1")
                .and_then(|mut s| s.execute(params![group]))
                .map_err(sql)?;
            Ok((
                Reply::Deleted(unbound + seqs.len() + dead > 0),
                Effect {
                    pending: -(seqs.len() as i64),
                    unbound: Some(group.clone()),
                    ..Effect::default()
                },
            ))
        }
        Op::DeadLetters { group, limit } => {
            let mut statement = connection
                .prepare_cached(
                    "SELECT id, topic, body, content_type, metadata, NULL, published_ms, attempts, reason, dead_ms
                     FROM dead WHERE grp = ?1 ORDER BY rowid LIMIT ?2",
                )
                .map_err(sql)?;
            let letters = statement
                .query_map(params![group, *limit as i64], |row| {
                    Ok(DeadLetter {
                        group: group.clone(),
                        message: read_message(row, 0)?,
                        attempts: row.get::<_, i64>(7)? as u32,
                        reason: row.get(8)?,
                        dead_at: from_millis(row.get(9)?),
                    })
                })
                .and_then(Iterator::collect::<rusqlite::Result<Vec<_>>>)
                .map_err(sql)?;
            done(Reply::Dead(letters))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn subscription(group: &str, pattern: &str) -> Subscription {
        Subscription {
            group: group.into(),
            pattern: TopicPattern::parse(pattern).unwrap(),
            max_attempts: 3,
            ack_wait: Duration::from_secs(30),
            prefetch: 8,
        }
    }

    #[tokio::test]
    async fn fan_out_to_groups_ack_retry_and_dead_letters() {
        let broker = Arc::new(EmbeddedBroker::open(None, 100).unwrap());
        let mut billing = broker
            .subscribe(&subscription("billing", "orders.*"))
            .await
            .unwrap();
        let mut email = broker
            .subscribe(&subscription("email", "orders.created"))
            .await
            .unwrap();
        broker
            .publish(Message::new("orders.created", Bytes::from_static(b"o1")))
            .await
            .unwrap();
        broker
            .publish(Message::new("payments.done", Bytes::from_static(b"nobody")))
            .await
            .unwrap();
        let first = billing.next().await.unwrap();
        assert_eq!(first.message().body, "o1");
        assert_eq!(first.attempt(), 1);
        first.retry(Duration::ZERO).await.unwrap();
        let again = billing.next().await.unwrap();
        assert_eq!(again.attempt(), 2);
        again.dead_letter("always fails").await.unwrap();
        let letters = broker.dead_letters("billing", 10).await.unwrap();
        assert_eq!(letters.len(), 1);
        assert_eq!(letters[0].reason, "always fails");
        assert_eq!(letters[0].attempts, 2);
        let mail = email.next().await.unwrap();
        assert_eq!(mail.message().topic, "orders.created");
        mail.ack().await.unwrap();
    }

    #[tokio::test]
    async fn a_delivery_dropped_unsettled_comes_back_at_once() {
        let broker = Arc::new(EmbeddedBroker::open(None, 100).unwrap());
        let mut consumer = broker.subscribe(&subscription("g", "t")).await.unwrap();
        broker
            .publish(Message::new("t", Bytes::from_static(b"m")))
            .await
            .unwrap();
        drop(consumer.next().await.unwrap());
        let again = consumer.next().await.unwrap();
        // Not counted as an attempt: nothing handled it.
        assert_eq!(again.attempt(), 1);
        again.ack().await.unwrap();
    }

    #[tokio::test]
    async fn a_full_queue_refuses_publishes() {
        let broker = Arc::new(EmbeddedBroker::open(None, 2).unwrap());
        broker.subscribe(&subscription("g", ">")).await.unwrap();
        for _ in 0..2 {
            broker
                .publish(Message::new("t", Bytes::new()))
                .await
                .unwrap();
        }
        let err = broker
            .publish(Message::new("t", Bytes::new()))
            .await
            .unwrap_err();
        assert!(matches!(err, BrokerError::Full(_)), "{err}");
    }

    #[test]
    fn unacknowledged_messages_survive_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("messages.sqlite3");
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async {
            let broker = Arc::new(EmbeddedBroker::open(Some(&path), 100).unwrap());
            let mut consumer = broker.subscribe(&subscription("g", "t")).await.unwrap();
            broker
                .publish(Message::new("t", Bytes::from_static(b"kept")))
                .await
                .unwrap();
            // Taken but never acknowledged: the host "crashes" (no release on drop).
            std::mem::forget(consumer.next().await.unwrap());
        });
        runtime.block_on(async {
            let broker = Arc::new(EmbeddedBroker::open(Some(&path), 100).unwrap());
            // The binding survived too: new messages still reach the group.
            broker
                .publish(Message::new("t", Bytes::from_static(b"new")))
                .await
                .unwrap();
            let mut consumer = broker.subscribe(&subscription("g", "t")).await.unwrap();
            let first = consumer.next().await.unwrap();
            assert_eq!(first.message().body, "kept");
            assert_eq!(first.attempt(), 2);
            let second = consumer.next().await.unwrap();
            assert_eq!(second.message().body, "new");
        });
    }
}
