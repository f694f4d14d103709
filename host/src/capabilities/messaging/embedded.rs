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
//! failed its last attempt moves to the dead letters. The queue is bounded
//! in messages and in bytes ([`MessagingLimits`]): past `max_pending`
//! undelivered deliveries, `max_bytes` stored in all (dead letters
//! included) or `max_group_bytes` waiting for one group, publishing fails
//! with "full"; a group's dead letters past `max_dead_letters` or
//! `max_dead_bytes` are dropped oldest first. The owner of each group (the
//! service that first subscribed it) is kept here too.
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
    BrokerConsumer, BrokerDelivery, BrokerError, BrokerResult, BrokerStatus, DeadLetter,
    DeadLetterQuery, MessageBroker, Received, Subscription,
};
use crate::capabilities::messaging::inbox::Inboxes;
use crate::capabilities::messaging::limits::MessagingLimits;
use crate::capabilities::messaging::message::Message;
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

/// The bytes a stored message (a row of `messages` or `dead`) counts, in
/// SQL: what [`Message::stored_size`] counts.
const STORED_SIZE: &str = "(length(body) + length(CAST(topic AS BLOB)) + CASE WHEN metadata = '[]' THEN 0 ELSE length(CAST(metadata AS BLOB)) END)";

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
        /// The message's stored size, which the acknowledgement frees.
        size: u64,
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
        /// The message's stored size.
        size: u64,
    },
    /// Forgets a group: its binding, waiting deliveries, dead letters and
    /// owner.
    DeleteGroup {
        group: String,
    },
    DeadLetters {
        group: String,
        query: DeadLetterQuery,
    },
    CountDead {
        group: String,
    },
    /// Records the group's owner if it has none; answers the owner.
    Claim {
        group: String,
        service: String,
    },
}

enum Reply {
    Done,
    Published(Vec<String>),
    Leased(Vec<Leased>),
    Dead(Vec<DeadLetter>),
    Deleted(bool),
    /// Dead letters dropped to keep a group within its bounds.
    Pruned(u64),
    Count(u64),
    Owner(String),
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
    /// if `path` is `None` (nothing survives the process), bounded by
    /// `limits`.
    pub fn open(path: Option<&Path>, limits: MessagingLimits) -> Result<EmbeddedBroker> {
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
                 CREATE INDEX IF NOT EXISTS dead_by_group ON dead (grp);
                 CREATE TABLE IF NOT EXISTS group_owners (
                     grp TEXT PRIMARY KEY,
                     service TEXT NOT NULL
                 ) WITHOUT ROWID;
                 -- Leases taken before a restart are void: their consumers
                 -- are gone, so the deliveries are due again at once.
                 UPDATE deliveries SET leased_until_ms = 0;",
            )
            .context("preparing the message queue")?;
        let pending: i64 = connection
            .query_row("SELECT COUNT(*) FROM deliveries", [], |row| row.get(0))
            .context("counting pending deliveries")?;
        let bindings = load_bindings(&connection)?;
        let usage = Usage::measure(&connection).context("measuring the message queue")?;
        let checkpoints = sqlite::checkpoint_in_background(&connection, path, "message queue")?;
        let (jobs, receiver) = mpsc::channel::<Job>();
        let state = StoreThread {
            connection,
            bindings,
            pending: pending.max(0) as u64,
            usage,
            limits,
        };
        std::thread::Builder::new()
            .name("wharf-messages".into())
            .spawn(move || {
                let _checkpoints = checkpoints;
                state.run(receiver)
            })
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
}

impl MessageBroker for Arc<EmbeddedBroker> {
    type Consumer = EmbeddedConsumer;

    fn kind(&self) -> &'static str {
        "embedded"
    }

    /// One process: every reply is delivered in-process.
    fn listen_for_replies(&self, _inboxes: Arc<Inboxes>) {}

    async fn send_reply(&self, reply_to: &str, _message: Message) -> BrokerResult<()> {
        Err(BrokerError::Other(format!(
            "no requester is waiting at {reply_to}"
        )))
    }

    /// Always up while its thread runs.
    fn status(&self) -> BrokerStatus {
        BrokerStatus {
            kind: "embedded",
            up: true,
            detail: self.detail.clone(),
        }
    }

    /// Stores `message` with a delivery for every bound group.
    async fn publish(&self, message: Message) -> BrokerResult<()> {
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
    async fn subscribe(&self, subscription: &Subscription) -> BrokerResult<EmbeddedConsumer> {
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

    /// A page of the group's dead letters, oldest first (positions are
    /// row ids).
    async fn dead_letters(
        &self,
        group: &str,
        query: DeadLetterQuery,
    ) -> BrokerResult<Vec<DeadLetter>> {
        match self
            .call(Op::DeadLetters {
                group: group.to_string(),
                query,
            })
            .await?
        {
            Reply::Dead(letters) => Ok(letters),
            _ => Err(unexpected()),
        }
    }

    /// How many dead letters the group has.
    async fn count_dead_letters(&self, group: &str) -> BrokerResult<u64> {
        match self
            .call(Op::CountDead {
                group: group.to_string(),
            })
            .await?
        {
            Reply::Count(count) => Ok(count),
            _ => Err(unexpected()),
        }
    }

    /// Records `service` as the group's owner unless it has one; the owner.
    async fn claim_group(&self, group: &str, service: &str) -> BrokerResult<String> {
        match self
            .call(Op::Claim {
                group: group.to_string(),
                service: service.to_string(),
            })
            .await?
        {
            Reply::Owner(owner) => Ok(owner),
            _ => Err(unexpected()),
        }
    }

    /// Forgets `group`: its binding (new messages no longer wait for it),
    /// the deliveries waiting for it, and its dead letters. Whether there
    /// was anything to forget.
    async fn delete_group(&self, group: &str) -> BrokerResult<bool> {
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

impl BrokerConsumer for EmbeddedConsumer {
    type Delivery = EmbeddedDelivery;

    /// The next delivery: leased from the queue, waiting for a publish (or
    /// a retry coming due) when there is none.
    async fn next(&mut self) -> BrokerResult<EmbeddedDelivery> {
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
                    received: Received {
                        message: lease.message,
                        attempt: lease.attempt,
                    },
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
    received: Received,
    settled: bool,
}

impl EmbeddedDelivery {
    /// Marks the delivery settled and returns what an operation on it
    /// needs: the broker, the group, the sequence number and the message's
    /// stored size.
    fn settle(mut self) -> (Arc<EmbeddedBroker>, String, i64, u64) {
        self.settled = true;
        (
            self.broker.clone(),
            std::mem::take(&mut self.group),
            self.seq,
            self.received.message.stored_size(),
        )
    }
}

impl BrokerDelivery for EmbeddedDelivery {
    fn received(&self) -> &Received {
        &self.received
    }

    /// Deletes the delivery: the message is done for this group. Queued
    /// for the store thread without waiting for its commit: an
    /// acknowledgement lost in a crash only means the message comes again,
    /// which at-least-once delivery allows, and not waiting saves a
    /// round trip between threads per message. Acknowledgements and the
    /// consumer's next lease go through the same queue, in order, so a
    /// consumer never runs ahead of its acknowledgements.
    async fn ack(self) -> BrokerResult<()> {
        let (broker, group, seq, size) = self.settle();
        broker.send(Op::Ack { group, seq, size })
    }

    /// Makes the delivery due again after `delay`.
    async fn retry(self, delay: Duration) -> BrokerResult<()> {
        let delay_ms = i64::try_from(delay.as_millis()).unwrap_or(i64::MAX);
        let at_ms = now_ms().saturating_add(delay_ms);
        let (broker, group, seq, _) = self.settle();
        broker.call(Op::Retry { group, seq, at_ms }).await.map(drop)
    }

    /// Moves the message to the group's dead letters; how many old ones
    /// were dropped to make room.
    async fn dead_letter(self, reason: String) -> BrokerResult<u64> {
        let (broker, group, seq, size) = self.settle();
        match broker
            .call(Op::Dead {
                group,
                seq,
                reason,
                size,
            })
            .await?
        {
            Reply::Pruned(pruned) => Ok(pruned),
            _ => Ok(0),
        }
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
    /// The bytes stored, in all and per group.
    usage: Usage,
    limits: MessagingLimits,
}

/// The bytes the queue holds, as the byte bounds count them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Usage {
    /// Every stored message (once, however many groups wait for it) and
    /// every dead letter.
    total: u64,
    /// Per group: the messages waiting for it.
    groups: HashMap<String, u64>,
}

impl Usage {
    /// Measures what the database holds (at open, and after a group is
    /// deleted).
    fn measure(connection: &Connection) -> rusqlite::Result<Usage> {
        let stored: i64 = connection.query_row(
            &format!(
                "SELECT COALESCE((SELECT SUM({STORED_SIZE}) FROM messages), 0)
                      + COALESCE((SELECT SUM({STORED_SIZE}) FROM dead), 0)"
            ),
            [],
            |row| row.get(0),
        )?;
        let mut statement = connection.prepare(&format!(
            "SELECT d.grp, SUM({}) FROM deliveries d JOIN messages m ON m.seq = d.seq GROUP BY d.grp",
            STORED_SIZE
                .replace("body", "m.body")
                .replace("topic", "m.topic")
                .replace("metadata", "m.metadata")
        ))?;
        let groups = statement
            .query_map([], |row| {
                Ok((
                    row.get::<_, String>(0)?,
                    row.get::<_, i64>(1)?.max(0) as u64,
                ))
            })?
            .collect::<rusqlite::Result<HashMap<_, _>>>()?;
        Ok(Usage {
            total: stored.max(0) as u64,
            groups,
        })
    }

    /// `group`'s waiting bytes.
    fn group(&self, group: &str) -> u64 {
        self.groups.get(group).copied().unwrap_or(0)
    }

    /// Applies an operation's changes.
    fn apply(&mut self, effect: &Effect) {
        self.total = self.total.saturating_add_signed(effect.bytes);
        for (group, change) in &effect.group_bytes {
            let bytes = self.groups.entry(group.clone()).or_insert(0);
            *bytes = bytes.saturating_add_signed(*change);
            if *bytes == 0 {
                self.groups.remove(group);
            }
        }
    }
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
        let mut state = State {
            pending: self.pending,
            usage: self.usage.clone(),
            bindings: self.bindings.clone(),
            limits: self.limits,
        };
        let outcome = in_transaction(&self.connection, |connection| {
            batch
                .iter()
                .map(|(op, _)| {
                    // A failed operation leaves nothing behind.
                    in_savepoint(connection, sql, |connection| apply(connection, op, &state)).map(
                        |(reply, effect)| {
                            state.pending = state.pending.saturating_add_signed(effect.pending);
                            state.usage.apply(&effect);
                            if effect.remeasure
                                && let Ok(usage) = Usage::measure(connection)
                            {
                                state.usage = usage;
                            }
                            if let Some(binding) = effect.binding {
                                state.bindings.push(binding);
                            }
                            if let Some(group) = effect.unbound {
                                state.bindings.retain(|(g, _)| *g != group);
                            }
                            reply
                        },
                    )
                })
                .collect::<Vec<_>>()
        });
        match outcome {
            Ok(results) => {
                self.pending = state.pending;
                self.usage = state.usage;
                self.bindings = state.bindings;
                results
            }
            Err(err) => batch.iter().map(|_| Err(sql_text(&err))).collect(),
        }
    }
}

/// What an operation sees of the store thread's memory, as of the
/// operations before it in the batch.
struct State {
    pending: u64,
    usage: Usage,
    bindings: Vec<(String, TopicPattern)>,
    limits: MessagingLimits,
}

/// How an operation changes what the store thread keeps in memory.
#[derive(Default)]
struct Effect {
    /// Change to the pending-delivery count.
    pending: i64,
    /// Change to the bytes stored in all.
    bytes: i64,
    /// Changes to groups' waiting bytes.
    group_bytes: Vec<(String, i64)>,
    /// Measure the bytes again from the database (after a bulk delete).
    remeasure: bool,
    /// A new binding.
    binding: Option<(String, TopicPattern)>,
    /// A group whose bindings are gone.
    unbound: Option<String>,
}

fn signed(bytes: u64) -> i64 {
    i64::try_from(bytes).unwrap_or(i64::MAX)
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
        key: None,
    })
}

/// Drops one reference to message `seq`, deleting it with the last;
/// whether it was deleted.
fn release(connection: &Connection, seq: i64) -> BrokerResult<bool> {
    connection
        .prepare_cached("UPDATE messages SET refs = refs - 1 WHERE seq = ?1")
        .and_then(|mut s| s.execute(params![seq]))
        .map_err(sql)?;
    let deleted = connection
        .prepare_cached("DELETE FROM messages WHERE seq = ?1 AND refs <= 0")
        .and_then(|mut s| s.execute(params![seq]))
        .map_err(sql)?;
    Ok(deleted > 0)
}

/// Drops `group`'s oldest dead letters until it is within the count and
/// byte bounds; how many were dropped and their bytes.
fn prune_dead(
    connection: &Connection,
    group: &str,
    limits: &MessagingLimits,
) -> BrokerResult<(u64, u64)> {
    let (count, bytes): (i64, i64) = connection
        .prepare_cached(&format!(
            "SELECT COUNT(*), COALESCE(SUM({STORED_SIZE}), 0) FROM dead WHERE grp = ?1"
        ))
        .and_then(|mut s| s.query_row(params![group], |row| Ok((row.get(0)?, row.get(1)?))))
        .map_err(sql)?;
    let (mut count, mut bytes) = (count.max(0) as u64, bytes.max(0) as u64);
    let (mut pruned, mut freed) = (0, 0);
    while count > limits.max_dead_letters || bytes > limits.max_dead_bytes {
        let oldest: Option<(i64, i64)> = connection
            .prepare_cached(&format!(
                "SELECT rowid, {STORED_SIZE} FROM dead WHERE grp = ?1 ORDER BY rowid LIMIT 1"
            ))
            .and_then(|mut s| {
                s.query_row(params![group], |row| Ok((row.get(0)?, row.get(1)?)))
                    .optional()
            })
            .map_err(sql)?;
        let Some((rowid, size)) = oldest else { break };
        connection
            .prepare_cached("DELETE FROM dead WHERE rowid = ?1")
            .and_then(|mut s| s.execute(params![rowid]))
            .map_err(sql)?;
        let size = size.max(0) as u64;
        count -= 1;
        bytes = bytes.saturating_sub(size);
        pruned += 1;
        freed += size;
    }
    Ok((pruned, freed))
}

fn apply(connection: &Connection, op: &Op, state: &State) -> BrokerResult<(Reply, Effect)> {
    let done = |reply| Ok((reply, Effect::default()));
    let limits = &state.limits;
    match op {
        Op::Publish(message) => {
            let mut groups: Vec<String> = state
                .bindings
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
            let pending = state.pending;
            if pending + groups.len() as u64 > limits.max_pending {
                return Err(BrokerError::Full(format!(
                    "{pending} messages are waiting for delivery, the most the embedded broker holds"
                )));
            }
            let size = message.stored_size();
            if state.usage.total.saturating_add(size) > limits.max_bytes {
                return Err(BrokerError::Full(format!(
                    "the embedded broker holds {} bytes of messages and dead letters, its most is {}",
                    state.usage.total, limits.max_bytes
                )));
            }
            if let Some(group) = groups.iter().find(|group| {
                state.usage.group(group).saturating_add(size) > limits.max_group_bytes
            }) {
                return Err(BrokerError::Full(format!(
                    "group {group} has {} bytes of messages waiting, its most is {}",
                    state.usage.group(group),
                    limits.max_group_bytes
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
                bytes: signed(size),
                group_bytes: groups.iter().map(|g| (g.clone(), signed(size))).collect(),
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
                .filter(|parsed| {
                    !state
                        .bindings
                        .iter()
                        .any(|(g, p)| g == group && p == parsed)
                })
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
        Op::Ack { group, seq, size } => {
            let removed = connection
                .prepare_cached("DELETE FROM deliveries WHERE grp = ?1 AND seq = ?2")
                .and_then(|mut s| s.execute(params![group, seq]))
                .map_err(sql)?;
            if removed == 0 {
                return done(Reply::Done);
            }
            let deleted = release(connection, *seq)?;
            Ok((
                Reply::Done,
                Effect {
                    pending: -1,
                    bytes: if deleted { -signed(*size) } else { 0 },
                    group_bytes: vec![(group.clone(), -signed(*size))],
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
        Op::Dead {
            group,
            seq,
            reason,
            size,
        } => {
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
            let deleted = release(connection, *seq)?;
            let (pruned, freed) = prune_dead(connection, group, limits)?;
            // The dead copy is stored; the message itself may be gone.
            let stored = signed(*size) - if deleted { signed(*size) } else { 0 };
            Ok((
                Reply::Pruned(pruned),
                Effect {
                    pending: -1,
                    bytes: stored - signed(freed),
                    group_bytes: vec![(group.clone(), -signed(*size))],
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
            let owned = connection
                .prepare_cached("DELETE FROM group_owners WHERE grp = ?1")
                .and_then(|mut s| s.execute(params![group]))
                .map_err(sql)?;
            Ok((
                Reply::Deleted(unbound + seqs.len() + dead + owned > 0),
                Effect {
                    pending: -(seqs.len() as i64),
                    remeasure: true,
                    unbound: Some(group.clone()),
                    ..Effect::default()
                },
            ))
        }
        Op::DeadLetters { group, query } => {
            // The body is cut in SQL: a page never loads more than
            // `limit × body_limit` bytes of bodies.
            let mut statement = connection
                .prepare_cached(
                    "SELECT id, topic, substr(body, 1, ?4), content_type, metadata, NULL, published_ms,
                            attempts, reason, dead_ms, rowid, length(body)
                     FROM dead WHERE grp = ?1 AND rowid > ?2 ORDER BY rowid LIMIT ?3",
                )
                .map_err(sql)?;
            let after = query.after.map_or(0, signed);
            let body_limit = i64::try_from(query.body_limit).unwrap_or(i64::MAX);
            let letters = statement
                .query_map(
                    params![group, after, query.limit as i64, body_limit],
                    |row| {
                        Ok(DeadLetter {
                            group: group.clone(),
                            message: read_message(row, 0)?,
                            attempts: row.get::<_, i64>(7)? as u32,
                            reason: row.get(8)?,
                            dead_at: from_millis(row.get(9)?),
                            position: row.get::<_, i64>(10)?.max(0) as u64,
                            body_size: row.get::<_, i64>(11)?.max(0) as u64,
                        })
                    },
                )
                .and_then(Iterator::collect::<rusqlite::Result<Vec<_>>>)
                .map_err(sql)?;
            done(Reply::Dead(letters))
        }
        Op::CountDead { group } => {
            let count: i64 = connection
                .prepare_cached("SELECT COUNT(*) FROM dead WHERE grp = ?1")
                .and_then(|mut s| s.query_row(params![group], |row| row.get(0)))
                .map_err(sql)?;
            done(Reply::Count(count.max(0) as u64))
        }
        Op::Claim { group, service } => {
            connection
                .prepare_cached("INSERT OR IGNORE INTO group_owners (grp, service) VALUES (?1, ?2)")
                .and_then(|mut s| s.execute(params![group, service]))
                .map_err(sql)?;
            let owner: String = connection
                .prepare_cached("SELECT service FROM group_owners WHERE grp = ?1")
                .and_then(|mut s| s.query_row(params![group], |row| row.get(0)))
                .map_err(sql)?;
            done(Reply::Owner(owner))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(max_pending: u64) -> MessagingLimits {
        MessagingLimits {
            max_pending,
            ..MessagingLimits::default()
        }
    }

    fn page(limit: usize) -> DeadLetterQuery {
        DeadLetterQuery {
            after: None,
            limit,
            body_limit: 1 << 20,
        }
    }

    #[tokio::test]
    async fn regression_a_flood_of_large_messages_is_refused_by_bytes_not_count() {
        let broker = Arc::new(
            EmbeddedBroker::open(
                None,
                MessagingLimits {
                    max_bytes: 64 << 10,
                    max_group_bytes: 32 << 10,
                    ..MessagingLimits::default()
                },
            )
            .unwrap(),
        );
        broker.subscribe(&subscription("slow", "t")).await.unwrap();
        let body = Bytes::from(vec![b'x'; 4 << 10]);
        let mut accepted = 0;
        let err = loop {
            match broker.publish(Message::new("t", body.clone())).await {
                Ok(()) => accepted += 1,
                Err(err) => break err,
            }
            assert!(accepted < 100, "the byte bound never refused");
        };
        // 32 KiB for the group: 7 messages of 4 KiB and a bit fit, not 8.
        assert_eq!(accepted, 7);
        assert!(
            matches!(&err, BrokerError::Full(why) if why.contains("group slow")),
            "{err}"
        );
        // Another group still has room until the total bound.
        broker.subscribe(&subscription("other", "u")).await.unwrap();
        broker
            .publish(Message::new("u", body.clone()))
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn regression_dead_letters_are_capped_and_pruned_oldest_first() {
        let broker = Arc::new(
            EmbeddedBroker::open(
                None,
                MessagingLimits {
                    max_dead_letters: 3,
                    ..MessagingLimits::default()
                },
            )
            .unwrap(),
        );
        let mut consumer = broker.subscribe(&subscription("g", "t")).await.unwrap();
        let mut pruned = 0;
        for i in 0..5 {
            broker
                .publish(Message::new("t", Bytes::from(format!("m{i}"))))
                .await
                .unwrap();
            pruned += consumer
                .next()
                .await
                .unwrap()
                .dead_letter("no".into())
                .await
                .unwrap();
        }
        assert_eq!(pruned, 2);
        assert_eq!(broker.count_dead_letters("g").await.unwrap(), 3);
        let letters = broker.dead_letters("g", page(10)).await.unwrap();
        let bodies: Vec<_> = letters.iter().map(|l| l.message.body.clone()).collect();
        assert_eq!(bodies, ["m2", "m3", "m4"]);
        // Paged by position, bodies cut to the query's limit.
        let next = broker
            .dead_letters(
                "g",
                DeadLetterQuery {
                    after: Some(letters[0].position),
                    limit: 1,
                    body_limit: 1,
                },
            )
            .await
            .unwrap();
        assert_eq!(next.len(), 1);
        assert_eq!(next[0].message.body, "m");
        assert_eq!(next[0].body_size, 2);
        assert_eq!(next[0].position, letters[1].position);
    }

    #[tokio::test]
    async fn a_group_belongs_to_the_service_that_claimed_it_first() {
        let broker = Arc::new(EmbeddedBroker::open(None, limits(10)).unwrap());
        assert_eq!(
            broker.claim_group("billing", "billing").await.unwrap(),
            "billing"
        );
        assert_eq!(
            broker.claim_group("billing", "spy").await.unwrap(),
            "billing"
        );
        assert_eq!(
            broker.claim_group("billing", "billing").await.unwrap(),
            "billing"
        );
        broker.delete_group("billing").await.unwrap();
        assert_eq!(broker.claim_group("billing", "spy").await.unwrap(), "spy");
    }

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
        let broker = Arc::new(EmbeddedBroker::open(None, limits(100)).unwrap());
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
        assert_eq!(first.received().message.body, "o1");
        assert_eq!(first.received().attempt, 1);
        first.retry(Duration::ZERO).await.unwrap();
        let again = billing.next().await.unwrap();
        assert_eq!(again.received().attempt, 2);
        again.dead_letter("always fails".into()).await.unwrap();
        let letters = broker.dead_letters("billing", page(10)).await.unwrap();
        assert_eq!(letters.len(), 1);
        assert_eq!(letters[0].reason, "always fails");
        assert_eq!(letters[0].attempts, 2);
        let mail = email.next().await.unwrap();
        assert_eq!(mail.received().message.topic, "orders.created");
        mail.ack().await.unwrap();
    }

    #[tokio::test]
    async fn a_delivery_dropped_unsettled_comes_back_at_once() {
        let broker = Arc::new(EmbeddedBroker::open(None, limits(100)).unwrap());
        let mut consumer = broker.subscribe(&subscription("g", "t")).await.unwrap();
        broker
            .publish(Message::new("t", Bytes::from_static(b"m")))
            .await
            .unwrap();
        drop(consumer.next().await.unwrap());
        let again = consumer.next().await.unwrap();
        // Not counted as an attempt: nothing handled it.
        assert_eq!(again.received().attempt, 1);
        again.ack().await.unwrap();
    }

    #[tokio::test]
    async fn a_full_queue_refuses_publishes() {
        let broker = Arc::new(EmbeddedBroker::open(None, limits(2)).unwrap());
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
            let broker = Arc::new(EmbeddedBroker::open(Some(&path), limits(100)).unwrap());
            let mut consumer = broker.subscribe(&subscription("g", "t")).await.unwrap();
            broker
                .publish(Message::new("t", Bytes::from_static(b"kept")))
                .await
                .unwrap();
            // Taken but never acknowledged: the host "crashes" (no release on drop).
            std::mem::forget(consumer.next().await.unwrap());
        });
        runtime.block_on(async {
            let broker = Arc::new(EmbeddedBroker::open(Some(&path), limits(100)).unwrap());
            // The binding survived too: new messages still reach the group.
            broker
                .publish(Message::new("t", Bytes::from_static(b"new")))
                .await
                .unwrap();
            let mut consumer = broker.subscribe(&subscription("g", "t")).await.unwrap();
            let first = consumer.next().await.unwrap();
            assert_eq!(first.received().message.body, "kept");
            assert_eq!(first.received().attempt, 2);
            let second = consumer.next().await.unwrap();
            assert_eq!(second.received().message.body, "new");
        });
    }
}
