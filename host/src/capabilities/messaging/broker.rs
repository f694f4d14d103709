//! What a message broker does for Wharf, whichever it is: accept a message
//! durably, fan it out to every group subscribed to a matching topic, hand
//! each group's messages to its consumers (shared within the group), and
//! take them back as acknowledged, to retry later, or dead.
//!
//! The brokers are a closed set — embedded SQLite, NATS JetStream, RabbitMQ
//! — dispatched through enums, so the request and delivery paths make plain
//! calls.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;

use crate::capabilities::messaging::embedded::{
    EmbeddedBroker, EmbeddedConsumer, EmbeddedDelivery,
};
use crate::capabilities::messaging::inbox::Inboxes;
use crate::capabilities::messaging::nats::{NatsBroker, NatsConsumer, NatsDelivery};
use crate::capabilities::messaging::rabbitmq::{RabbitBroker, RabbitConsumer, RabbitDelivery};
use crate::capabilities::messaging::topic::TopicPattern;

/// A message as Wharf carries it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    /// Unique per published message (kept across redeliveries).
    pub id: String,
    /// Where it was published.
    pub topic: String,
    /// The payload.
    pub body: Bytes,
    /// Its content type, if the publisher gave one.
    pub content_type: Option<String>,
    /// Key-value pairs carried with it: the publisher's, and the host's
    /// `traceparent` and `x-request-id`.
    pub metadata: Vec<(String, String)>,
    /// Where replies go, for a request.
    pub reply_to: Option<String>,
    /// When it was published.
    pub published_at: SystemTime,
}

impl Message {
    /// A new message for `topic`, with a fresh id.
    pub fn new(topic: &str, body: Bytes) -> Message {
        Message {
            id: new_message_id(),
            topic: topic.to_string(),
            body,
            content_type: None,
            metadata: Vec::new(),
            reply_to: None,
            published_at: SystemTime::now(),
        }
    }

    /// The value of metadata `key`, if present.
    pub fn meta(&self, key: &str) -> Option<&str> {
        self.metadata
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(key))
            .map(|(_, v)| v.as_str())
    }

    /// The bytes the message takes in a queue, as every bound counts them:
    /// its body, topic and metadata (the metadata as the JSON brokers carry
    /// it in).
    pub fn stored_size(&self) -> u64 {
        let metadata = if self.metadata.is_empty() {
            0
        } else {
            self.metadata_json().len()
        };
        (self.body.len() + self.topic.len() + metadata) as u64
    }

    /// The metadata as JSON text, for brokers that carry it in one header.
    pub(crate) fn metadata_json(&self) -> String {
        let pairs: Vec<serde_json::Value> = self
            .metadata
            .iter()
            .map(|(k, v)| serde_json::json!([k, v]))
            .collect();
        serde_json::Value::Array(pairs).to_string()
    }

    /// Metadata from [`metadata_json`](Message::metadata_json)'s text.
    pub(crate) fn metadata_from_json(text: &str) -> Vec<(String, String)> {
        serde_json::from_str::<Vec<(String, String)>>(text).unwrap_or_default()
    }
}

/// A message id: time-ordered (16 hex digits of nanoseconds) then random.
pub fn new_message_id() -> String {
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos() as u64;
    format!("{now:016x}{:016x}", fastrand::u64(..))
}

/// Why a broker operation failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BrokerError {
    /// The broker cannot take more (a full queue): try later.
    Full(String),
    /// The publisher used its quota: try after the given time.
    Quota(String, Duration),
    /// The broker cannot be reached right now.
    Unavailable(String),
    /// Anything else.
    Other(String),
}

impl std::fmt::Display for BrokerError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BrokerError::Full(why) => write!(f, "the broker is full: {why}"),
            BrokerError::Quota(why, _) => write!(f, "over the publishing quota: {why}"),
            BrokerError::Unavailable(why) => write!(f, "the broker is unavailable: {why}"),
            BrokerError::Other(why) => write!(f, "{why}"),
        }
    }
}

/// The result of a broker operation.
pub type BrokerResult<T> = Result<T, BrokerError>;

/// A group's subscription: which topics, and how deliveries behave.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subscription {
    /// The consumer group: every group gets every matching message, and
    /// the consumers of one group share them.
    pub group: String,
    /// The topics.
    pub pattern: TopicPattern,
    /// Deliveries of one message before it is dead-lettered.
    pub max_attempts: u32,
    /// How long a delivery may stay unacknowledged before the broker gives
    /// it to another consumer (longer than the handler's time limit).
    pub ack_wait: Duration,
    /// Deliveries a consumer may hold unacknowledged at once.
    pub prefetch: usize,
}

/// A message that failed every attempt, as kept for inspection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetter {
    /// The group it failed in.
    pub group: String,
    /// The message; its body cut to the query's `body_limit`.
    pub message: Message,
    /// The body's whole size, in bytes (more than `message.body` holds when
    /// it was cut).
    pub body_size: u64,
    /// Its place in the group's dead letters: pass it as the next query's
    /// `after` to read on from here.
    pub position: u64,
    /// Attempts made.
    pub attempts: u32,
    /// Why the last attempt failed.
    pub reason: String,
    /// When it was given up on.
    pub dead_at: SystemTime,
}

/// Most dead letters one read returns.
pub const MAX_DEAD_LETTER_PAGE: usize = 100;

/// Which dead letters to read: a page of at most
/// [`MAX_DEAD_LETTER_PAGE`] after a position, bodies cut to `body_limit`
/// bytes, so a read costs at most `limit × body_limit` bytes of memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeadLetterQuery {
    /// Start after this position (a previous letter's `position`); `None`:
    /// from the oldest.
    pub after: Option<u64>,
    /// Letters wanted (capped at [`MAX_DEAD_LETTER_PAGE`]).
    pub limit: usize,
    /// Body bytes kept per letter.
    pub body_limit: usize,
}

impl DeadLetterQuery {
    /// The query with its limit capped.
    pub fn bounded(self) -> DeadLetterQuery {
        DeadLetterQuery {
            limit: self.limit.clamp(1, MAX_DEAD_LETTER_PAGE),
            ..self
        }
    }
}

/// What bounds a broker's queues, in messages and in bytes, and what
/// one service may publish: every bound refuses with [`BrokerError::Full`]
/// (or, for a publisher's quota, [`BrokerError::Quota`]) instead of letting a
/// flood fill memory or disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MessagingLimits {
    /// Deliveries (embedded; messages on NATS; per group on RabbitMQ)
    /// waiting at once.
    pub max_pending: u64,
    /// Bytes the broker holds in all: waiting messages and dead letters
    /// (embedded: everything; NATS: each of its two streams).
    pub max_bytes: u64,
    /// Bytes waiting for one group (embedded and RabbitMQ; NATS bounds its
    /// stream only).
    pub max_group_bytes: u64,
    /// Dead letters kept per group; past it the oldest are dropped.
    pub max_dead_letters: u64,
    /// Dead-letter bytes kept per group (embedded and RabbitMQ); past it
    /// the oldest are dropped.
    pub max_dead_bytes: u64,
    /// Messages one service may publish per second, in bursts of up to a
    /// second's worth; `None`: no limit.
    pub publish_rate: Option<u64>,
    /// Message bytes one service may publish per second, in bursts of up
    /// to a second's worth; `None`: no limit.
    pub publish_bytes: Option<u64>,
}

/// Messaging bounds of which only some are set: a layer (`[messaging]` in
/// `wharf.toml`, command-line flags) applied over defaults.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PartialMessagingLimits {
    /// See [`MessagingLimits::max_pending`].
    pub max_pending: Option<u64>,
    /// See [`MessagingLimits::max_bytes`].
    pub max_bytes: Option<u64>,
    /// See [`MessagingLimits::max_group_bytes`].
    pub max_group_bytes: Option<u64>,
    /// See [`MessagingLimits::max_dead_letters`].
    pub max_dead_letters: Option<u64>,
    /// See [`MessagingLimits::max_dead_bytes`].
    pub max_dead_bytes: Option<u64>,
    /// See [`MessagingLimits::publish_rate`] (`Some(None)`: no limit).
    pub publish_rate: Option<Option<u64>>,
    /// See [`MessagingLimits::publish_bytes`] (`Some(None)`: no limit).
    pub publish_bytes: Option<Option<u64>>,
}

impl PartialMessagingLimits {
    /// `base` with every bound set here replaced.
    pub fn apply(&self, base: MessagingLimits) -> MessagingLimits {
        MessagingLimits {
            max_pending: self.max_pending.unwrap_or(base.max_pending),
            max_bytes: self.max_bytes.unwrap_or(base.max_bytes),
            max_group_bytes: self.max_group_bytes.unwrap_or(base.max_group_bytes),
            max_dead_letters: self.max_dead_letters.unwrap_or(base.max_dead_letters),
            max_dead_bytes: self.max_dead_bytes.unwrap_or(base.max_dead_bytes),
            publish_rate: self.publish_rate.unwrap_or(base.publish_rate),
            publish_bytes: self.publish_bytes.unwrap_or(base.publish_bytes),
        }
    }
}

/// Default most deliveries waiting.
pub const DEFAULT_MAX_PENDING: u64 = 1_000_000;
/// Default most bytes a broker holds: 1 GiB.
pub const DEFAULT_MAX_BYTES: u64 = 1 << 30;
/// Default most bytes waiting for one group: 256 MiB.
pub const DEFAULT_MAX_GROUP_BYTES: u64 = 256 << 20;
/// Default dead letters kept per group.
pub const DEFAULT_MAX_DEAD_LETTERS: u64 = 10_000;
/// Default dead-letter bytes kept per group: 64 MiB.
pub const DEFAULT_MAX_DEAD_BYTES: u64 = 64 << 20;
/// Default message bytes one service may publish per second: 64 MiB.
pub const DEFAULT_PUBLISH_BYTES: u64 = 64 << 20;

impl Default for MessagingLimits {
    fn default() -> Self {
        MessagingLimits {
            max_pending: DEFAULT_MAX_PENDING,
            max_bytes: DEFAULT_MAX_BYTES,
            max_group_bytes: DEFAULT_MAX_GROUP_BYTES,
            max_dead_letters: DEFAULT_MAX_DEAD_LETTERS,
            max_dead_bytes: DEFAULT_MAX_DEAD_BYTES,
            publish_rate: None,
            publish_bytes: Some(DEFAULT_PUBLISH_BYTES),
        }
    }
}

/// Whether a broker is reachable, for readiness and metrics.
pub use crate::capabilities::keyvalue::backend::BackendStatus as BrokerStatus;

/// Which broker a host uses, as configured (`--broker`, or `backend` under
/// `[messaging]` in `wharf.toml`).
#[derive(Clone, Default, PartialEq, Eq)]
pub enum BrokerChoice {
    /// SQLite in the data directory (in memory without one).
    #[default]
    Embedded,
    /// NATS JetStream: `nats://host:port[,…]`.
    Nats(String),
    /// RabbitMQ: `amqp://user:password@host:port/vhost`.
    Rabbit(String),
}

/// Shows the address without its credentials.
impl std::fmt::Debug for BrokerChoice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BrokerChoice::Embedded => f.write_str("Embedded"),
            BrokerChoice::Nats(url) => write!(f, "Nats({:?})", crate::base::redact::url(url)),
            BrokerChoice::Rabbit(url) => write!(f, "Rabbit({:?})", crate::base::redact::url(url)),
        }
    }
}

impl std::str::FromStr for BrokerChoice {
    type Err = String;

    fn from_str(text: &str) -> Result<BrokerChoice, String> {
        let text = text.trim();
        if text == "embedded" {
            Ok(BrokerChoice::Embedded)
        } else if text.starts_with("nats://") || text.starts_with("tls://") {
            Ok(BrokerChoice::Nats(text.to_string()))
        } else if text.starts_with("amqp://") || text.starts_with("amqps://") {
            Ok(BrokerChoice::Rabbit(text.to_string()))
        } else {
            Err(format!(
                "{text:?} is not a message broker: use \"embedded\", \"nats://HOST:PORT\" or \"amqp://USER:PASSWORD@HOST:PORT/VHOST\""
            ))
        }
    }
}

impl BrokerChoice {
    /// Opens the chosen broker, its queues bounded by `limits`: the embedded
    /// queue at `data_dir` (in memory without one); NATS and RabbitMQ
    /// connect in the background.
    pub async fn open(
        &self,
        data_dir: Option<&std::path::Path>,
        limits: MessagingLimits,
    ) -> anyhow::Result<Broker> {
        Ok(match self {
            BrokerChoice::Embedded => {
                let path = data_dir.map(|dir| dir.join("messages.sqlite3"));
                let broker = tokio::task::spawn_blocking(move || {
                    EmbeddedBroker::open(path.as_deref(), limits)
                })
                .await??;
                Broker::Embedded(Arc::new(broker))
            }
            BrokerChoice::Nats(url) => Broker::Nats(NatsBroker::connect(url, limits).await?),
            BrokerChoice::Rabbit(url) => Broker::Rabbit(RabbitBroker::connect(url, limits)?),
        })
    }
}

/// A message broker.
#[derive(Clone)]
pub enum Broker {
    /// SQLite in the data directory.
    Embedded(Arc<EmbeddedBroker>),
    /// NATS JetStream.
    Nats(Arc<NatsBroker>),
    /// RabbitMQ.
    Rabbit(Arc<RabbitBroker>),
}

impl Broker {
    /// The broker's kind, for logs and metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Broker::Embedded(_) => "embedded",
            Broker::Nats(_) => "nats",
            Broker::Rabbit(_) => "rabbitmq",
        }
    }

    /// Whether the broker is reachable.
    pub fn status(&self) -> BrokerStatus {
        match self {
            Broker::Embedded(broker) => broker.status(),
            Broker::Nats(broker) => broker.status(),
            Broker::Rabbit(broker) => broker.status(),
        }
    }

    /// Accepts `message` durably; it is then delivered to every group
    /// subscribed to a matching topic.
    pub async fn publish(&self, message: Message) -> BrokerResult<()> {
        match self {
            Broker::Embedded(broker) => broker.publish(message).await,
            Broker::Nats(broker) => broker.publish(message).await,
            Broker::Rabbit(broker) => broker.publish(message).await,
        }
    }

    /// Joins the group `subscription` names (creating its durable queue the
    /// first time); the consumer shares the group's messages with the
    /// group's other consumers, on this host and others.
    pub async fn subscribe(&self, subscription: &Subscription) -> BrokerResult<Consumer> {
        Ok(match self {
            Broker::Embedded(broker) => Consumer::Embedded(broker.subscribe(subscription).await?),
            Broker::Nats(broker) => Consumer::Nats(Box::new(broker.subscribe(subscription).await?)),
            Broker::Rabbit(broker) => Consumer::Rabbit(broker.subscribe(subscription).await?),
        })
    }

    /// Forgets `group` on the broker — its queue or consumer, the messages
    /// waiting in it, its dead letters — so messages no longer wait for a
    /// group nobody consumes. Whether it existed.
    pub async fn delete_group(&self, group: &str) -> BrokerResult<bool> {
        match self {
            Broker::Embedded(broker) => broker.delete_group(group).await,
            Broker::Nats(broker) => broker.delete_group(group).await,
            Broker::Rabbit(broker) => broker.delete_group(group).await,
        }
    }

    /// A page of `group`'s dead letters, oldest first, as `query` asks
    /// (its limit capped).
    pub async fn dead_letters(
        &self,
        group: &str,
        query: DeadLetterQuery,
    ) -> BrokerResult<Vec<DeadLetter>> {
        let query = query.bounded();
        match self {
            Broker::Embedded(broker) => broker.dead_letters(group, query).await,
            Broker::Nats(broker) => broker.dead_letters(group, query).await,
            Broker::Rabbit(broker) => broker.dead_letters(group, query).await,
        }
    }

    /// How many dead letters `group` has, without reading them.
    pub async fn count_dead_letters(&self, group: &str) -> BrokerResult<u64> {
        match self {
            Broker::Embedded(broker) => broker.count_dead_letters(group).await,
            Broker::Nats(broker) => broker.count_dead_letters(group).await,
            Broker::Rabbit(broker) => broker.count_dead_letters(group).await,
        }
    }

    /// Makes `service` the owner of `group` if it has none yet, and returns
    /// the owner (`service` itself, or the service that claimed it first).
    /// The claim lives with the broker — across restarts, and across every
    /// host sharing the broker — until the group is deleted.
    pub async fn claim_group(&self, group: &str, service: &str) -> BrokerResult<String> {
        match self {
            Broker::Embedded(broker) => broker.claim_group(group, service).await,
            Broker::Nats(broker) => broker.claim_group(group, service).await,
            Broker::Rabbit(broker) => broker.claim_group(group, service).await,
        }
    }

    /// Forwards replies addressed to `inboxes` that arrive through the
    /// broker (from other hosts) to them.
    pub fn listen_for_replies(&self, inboxes: &Arc<Inboxes>) {
        match self {
            // One process: every reply is delivered in-process.
            Broker::Embedded(_) => {}
            Broker::Nats(broker) => broker.listen_for_replies(inboxes.clone()),
            Broker::Rabbit(broker) => broker.listen_for_replies(inboxes.clone()),
        }
    }

    /// Sends a reply to a requester on another host (`reply_to` names its
    /// inbox); replies to this host's own inboxes never reach the broker.
    pub async fn send_reply(&self, reply_to: &str, message: Message) -> BrokerResult<()> {
        match self {
            Broker::Embedded(_) => Err(BrokerError::Other(format!(
                "no requester is waiting at {reply_to}"
            ))),
            Broker::Nats(broker) => broker.send_reply(reply_to, message).await,
            Broker::Rabbit(broker) => broker.send_reply(reply_to, message).await,
        }
    }
}

/// One consumer of a group.
pub enum Consumer {
    /// On the embedded broker.
    Embedded(EmbeddedConsumer),
    /// On NATS JetStream (boxed: its pull stream is large).
    Nats(Box<NatsConsumer>),
    /// On RabbitMQ.
    Rabbit(RabbitConsumer),
}

impl Consumer {
    /// The next delivery; waits for one. An error means the broker is gone
    /// for now: subscribe again later.
    pub async fn next(&mut self) -> BrokerResult<Delivery> {
        match self {
            Consumer::Embedded(consumer) => consumer.next().await.map(Delivery::Embedded),
            Consumer::Nats(consumer) => consumer.next().await.map(Delivery::Nats),
            Consumer::Rabbit(consumer) => consumer.next().await.map(Delivery::Rabbit),
        }
    }
}

/// One delivery of a message to a consumer: handle it, then acknowledge it,
/// ask for it again later, or give up on it.
pub enum Delivery {
    /// From the embedded broker.
    Embedded(EmbeddedDelivery),
    /// From NATS JetStream.
    Nats(NatsDelivery),
    /// From RabbitMQ.
    Rabbit(RabbitDelivery),
}

macro_rules! delivery {
    ($self:ident, $d:ident => $e:expr) => {
        match $self {
            Delivery::Embedded($d) => $e,
            Delivery::Nats($d) => $e,
            Delivery::Rabbit($d) => $e,
        }
    };
}

impl Delivery {
    /// The message.
    pub fn message(&self) -> &Message {
        delivery!(self, d => d.message())
    }

    /// Which attempt this is: 1 for the first delivery.
    pub fn attempt(&self) -> u32 {
        delivery!(self, d => d.attempt())
    }

    /// The message was handled: it is done for this group.
    pub async fn ack(self) -> BrokerResult<()> {
        delivery!(self, d => d.ack().await)
    }

    /// The handler failed: deliver it again after `delay`.
    pub async fn retry(self, delay: Duration) -> BrokerResult<()> {
        delivery!(self, d => d.retry(delay).await)
    }

    /// Every attempt failed: keep it as a dead letter, with `reason`.
    /// Returns how many of the group's oldest dead letters were dropped to
    /// stay within its bounds (where the broker prunes itself, 0).
    pub async fn dead_letter(self, reason: &str) -> BrokerResult<u64> {
        delivery!(self, d => d.dead_letter(reason).await)
    }
}
