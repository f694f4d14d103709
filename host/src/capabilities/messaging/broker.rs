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
    /// The broker cannot be reached right now.
    Unavailable(String),
    /// Anything else.
    Other(String),
}

impl std::fmt::Display for BrokerError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BrokerError::Full(why) => write!(f, "the broker is full: {why}"),
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
    /// The message.
    pub message: Message,
    /// Attempts made.
    pub attempts: u32,
    /// Why the last attempt failed.
    pub reason: String,
    /// When it was given up on.
    pub dead_at: SystemTime,
}

/// Whether a broker is reachable, for readiness and metrics.
pub use crate::capabilities::keyvalue::backend::BackendStatus as BrokerStatus;

/// Which broker a host uses, as configured (`--broker`, or `backend` under
/// `[messaging]` in `wharf.toml`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum BrokerChoice {
    /// SQLite in the data directory (in memory without one).
    #[default]
    Embedded,
    /// NATS JetStream: `nats://host:port[,…]`.
    Nats(String),
    /// RabbitMQ: `amqp://user:password@host:port/vhost`.
    Rabbit(String),
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
    /// Opens the chosen broker: the embedded queue at `data_dir` (in memory
    /// without one), holding at most `max_pending` undelivered deliveries;
    /// NATS and RabbitMQ connect in the background (their streams and
    /// queues hold at most `max_pending` messages too).
    pub async fn open(
        &self,
        data_dir: Option<&std::path::Path>,
        max_pending: u64,
    ) -> anyhow::Result<Broker> {
        Ok(match self {
            BrokerChoice::Embedded => {
                let path = data_dir.map(|dir| dir.join("messages.sqlite3"));
                let broker = tokio::task::spawn_blocking(move || {
                    EmbeddedBroker::open(path.as_deref(), max_pending)
                })
                .await??;
                Broker::Embedded(Arc::new(broker))
            }
            BrokerChoice::Nats(url) => Broker::Nats(NatsBroker::connect(url, max_pending).await?),
            BrokerChoice::Rabbit(url) => Broker::Rabbit(RabbitBroker::connect(url, max_pending)?),
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

    /// Up to `limit` dead letters of `group`, oldest first.
    pub async fn dead_letters(&self, group: &str, limit: usize) -> BrokerResult<Vec<DeadLetter>> {
        match self {
            Broker::Embedded(broker) => broker.dead_letters(group, limit).await,
            Broker::Nats(broker) => broker.dead_letters(group, limit).await,
            Broker::Rabbit(broker) => broker.dead_letters(group, limit).await,
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
    pub async fn dead_letter(self, reason: &str) -> BrokerResult<()> {
        delivery!(self, d => d.dead_letter(reason).await)
    }
}
