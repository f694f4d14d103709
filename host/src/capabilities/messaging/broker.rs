//! The messaging contract: what a message broker does for Wharf, whichever
//! it is — accept a message durably, fan it out to every group subscribed
//! to a matching topic, hand each group's messages to its consumers (shared
//! within the group), and take them back as acknowledged, to retry later,
//! or dead — and [`Broker`], a broker of any kind as the host uses it.
//!
//! A new broker is one file implementing [`MessageBroker`] (with its
//! [`BrokerConsumer`] and [`BrokerDelivery`]) and one line in
//! [`BrokerChoice::open`](crate::capabilities::messaging::choice::BrokerChoice::open).
//! What every broker must do:
//!
//! - `publish` returns only once the message is durable (stored, confirmed),
//!   and refuses with [`BrokerError::Full`] past the [`MessagingLimits`] it
//!   was opened with;
//! - a group gets every message published to a matching topic after it
//!   first subscribed, even while none of its consumers runs; its consumers
//!   share them; a delivery not acknowledged comes back (at least once);
//! - `retry` redelivers after the delay without blocking the group, and a
//!   delivery's `attempt` counts the deliveries of that message to that
//!   group; `dead_letter` keeps it for [`dead_letters`](MessageBroker::dead_letters)
//!   within the group's dead-letter bounds;
//! - `claim_group` records the first claimant of a group wherever every
//!   host sharing the broker will see it;
//! - replies to requests reach the requesting host's inboxes
//!   (`listen_for_replies`, `send_reply`), or the broker says it cannot.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use crate::capabilities::messaging::inbox::Inboxes;
use crate::capabilities::messaging::message::Message;
use crate::capabilities::messaging::topic::TopicPattern;

pub use crate::capabilities::BackendStatus as BrokerStatus;

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

/// A message broker: the contract a new broker implements.
pub trait MessageBroker: Send + Sync + 'static {
    /// A consumer of one group.
    type Consumer: BrokerConsumer;

    /// The broker's kind, for logs and metrics (`embedded`, `nats`, …).
    fn kind(&self) -> &'static str;

    /// Whether the broker is reachable now.
    fn status(&self) -> BrokerStatus;

    /// Accepts `message` durably; it is then delivered to every group
    /// subscribed to a matching topic.
    fn publish(&self, message: Message) -> impl Future<Output = BrokerResult<()>> + Send;

    /// Joins the group `subscription` names (creating its durable queue the
    /// first time); the consumer shares the group's messages with the
    /// group's other consumers, on this host and others.
    fn subscribe(
        &self,
        subscription: &Subscription,
    ) -> impl Future<Output = BrokerResult<Self::Consumer>> + Send;

    /// Forgets `group` — its queue or consumer, the messages waiting in it,
    /// its dead letters, its owner. Whether it existed.
    fn delete_group(&self, group: &str) -> impl Future<Output = BrokerResult<bool>> + Send;

    /// A page of `group`'s dead letters, oldest first, as `query` asks (its
    /// limit already capped).
    fn dead_letters(
        &self,
        group: &str,
        query: DeadLetterQuery,
    ) -> impl Future<Output = BrokerResult<Vec<DeadLetter>>> + Send;

    /// How many dead letters `group` has, without reading them. Letters
    /// being read at that moment may be missed until they are put back
    /// (RabbitMQ's quorum queues return them through Raft, a moment later).
    fn count_dead_letters(&self, group: &str) -> impl Future<Output = BrokerResult<u64>> + Send;

    /// Makes `service` the owner of `group` if it has none yet; the owner.
    fn claim_group(
        &self,
        group: &str,
        service: &str,
    ) -> impl Future<Output = BrokerResult<String>> + Send;

    /// Forwards replies addressed to `inboxes` that arrive through the
    /// broker (from other hosts) to them, for as long as the broker lives.
    fn listen_for_replies(&self, inboxes: Arc<Inboxes>);

    /// Sends a reply to a requester on another host (`reply_to` names its
    /// inbox); replies to this host's own inboxes never reach the broker.
    fn send_reply(
        &self,
        reply_to: &str,
        message: Message,
    ) -> impl Future<Output = BrokerResult<()>> + Send;
}

/// A consumer of one group.
pub trait BrokerConsumer: Send + 'static {
    /// One delivery of a message.
    type Delivery: BrokerDelivery;

    /// The next delivery; waits for one. An error means the broker is gone
    /// for now: subscribe again later.
    fn next(&mut self) -> impl Future<Output = BrokerResult<Self::Delivery>> + Send;
}

/// One delivery of a message to a consumer: handle it, then acknowledge it,
/// ask for it again later, or give up on it. Dropped unsettled, it comes
/// back (at once, or when its lease ends).
pub trait BrokerDelivery: Send + 'static {
    /// The message delivered, and which attempt this is.
    fn received(&self) -> &Received;

    /// The message was handled: it is done for this group.
    fn ack(self) -> impl Future<Output = BrokerResult<()>> + Send;

    /// The handler failed: deliver it again after `delay`.
    fn retry(self, delay: Duration) -> impl Future<Output = BrokerResult<()>> + Send;

    /// Every attempt failed: keep it as a dead letter, with `reason`.
    /// Returns how many of the group's oldest dead letters were dropped to
    /// stay within its bounds (where the broker prunes itself, 0).
    fn dead_letter(self, reason: String) -> impl Future<Output = BrokerResult<u64>> + Send;
}

/// What a delivery carries, whatever the broker: the message, and which
/// attempt this is (1 for the first delivery).
#[derive(Debug, Clone)]
pub struct Received {
    /// The message.
    pub message: Message,
    /// Which attempt this is: 1 for the first delivery.
    pub attempt: u32,
}

/// A boxed future, for the operations of the erased types below.
type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// [`MessageBroker`] with its types erased, so a [`Broker`] can hold any.
trait ErasedBroker: Send + Sync {
    fn kind(&self) -> &'static str;
    fn status(&self) -> BrokerStatus;
    fn publish(&self, message: Message) -> BoxFuture<'_, BrokerResult<()>>;
    fn subscribe<'a>(
        &'a self,
        subscription: &'a Subscription,
    ) -> BoxFuture<'a, BrokerResult<Consumer>>;
    fn delete_group<'a>(&'a self, group: &'a str) -> BoxFuture<'a, BrokerResult<bool>>;
    fn dead_letters<'a>(
        &'a self,
        group: &'a str,
        query: DeadLetterQuery,
    ) -> BoxFuture<'a, BrokerResult<Vec<DeadLetter>>>;
    fn count_dead_letters<'a>(&'a self, group: &'a str) -> BoxFuture<'a, BrokerResult<u64>>;
    fn claim_group<'a>(
        &'a self,
        group: &'a str,
        service: &'a str,
    ) -> BoxFuture<'a, BrokerResult<String>>;
    fn listen_for_replies(&self, inboxes: Arc<Inboxes>);
    fn send_reply<'a>(
        &'a self,
        reply_to: &'a str,
        message: Message,
    ) -> BoxFuture<'a, BrokerResult<()>>;
}

impl<B: MessageBroker> ErasedBroker for B {
    fn kind(&self) -> &'static str {
        MessageBroker::kind(self)
    }

    fn status(&self) -> BrokerStatus {
        MessageBroker::status(self)
    }

    fn publish(&self, message: Message) -> BoxFuture<'_, BrokerResult<()>> {
        Box::pin(MessageBroker::publish(self, message))
    }

    fn subscribe<'a>(
        &'a self,
        subscription: &'a Subscription,
    ) -> BoxFuture<'a, BrokerResult<Consumer>> {
        Box::pin(async move {
            let consumer = MessageBroker::subscribe(self, subscription).await?;
            Ok(Consumer(Box::new(consumer)))
        })
    }

    fn delete_group<'a>(&'a self, group: &'a str) -> BoxFuture<'a, BrokerResult<bool>> {
        Box::pin(MessageBroker::delete_group(self, group))
    }

    fn dead_letters<'a>(
        &'a self,
        group: &'a str,
        query: DeadLetterQuery,
    ) -> BoxFuture<'a, BrokerResult<Vec<DeadLetter>>> {
        Box::pin(MessageBroker::dead_letters(self, group, query))
    }

    fn count_dead_letters<'a>(&'a self, group: &'a str) -> BoxFuture<'a, BrokerResult<u64>> {
        Box::pin(MessageBroker::count_dead_letters(self, group))
    }

    fn claim_group<'a>(
        &'a self,
        group: &'a str,
        service: &'a str,
    ) -> BoxFuture<'a, BrokerResult<String>> {
        Box::pin(MessageBroker::claim_group(self, group, service))
    }

    fn listen_for_replies(&self, inboxes: Arc<Inboxes>) {
        MessageBroker::listen_for_replies(self, inboxes);
    }

    fn send_reply<'a>(
        &'a self,
        reply_to: &'a str,
        message: Message,
    ) -> BoxFuture<'a, BrokerResult<()>> {
        Box::pin(MessageBroker::send_reply(self, reply_to, message))
    }
}

/// [`BrokerConsumer`] with its types erased.
trait ErasedConsumer: Send {
    fn next(&mut self) -> BoxFuture<'_, BrokerResult<Delivery>>;
}

impl<C: BrokerConsumer> ErasedConsumer for C {
    fn next(&mut self) -> BoxFuture<'_, BrokerResult<Delivery>> {
        Box::pin(async move {
            let delivery = BrokerConsumer::next(self).await?;
            Ok(Delivery(Box::new(delivery)))
        })
    }
}

/// [`BrokerDelivery`] with its types erased: settling consumes the box.
trait ErasedDelivery: Send {
    fn received(&self) -> &Received;
    fn ack(self: Box<Self>) -> BoxFuture<'static, BrokerResult<()>>;
    fn retry(self: Box<Self>, delay: Duration) -> BoxFuture<'static, BrokerResult<()>>;
    fn dead_letter(self: Box<Self>, reason: String) -> BoxFuture<'static, BrokerResult<u64>>;
}

impl<D: BrokerDelivery> ErasedDelivery for D {
    fn received(&self) -> &Received {
        BrokerDelivery::received(self)
    }

    fn ack(self: Box<Self>) -> BoxFuture<'static, BrokerResult<()>> {
        Box::pin(BrokerDelivery::ack(*self))
    }

    fn retry(self: Box<Self>, delay: Duration) -> BoxFuture<'static, BrokerResult<()>> {
        Box::pin(BrokerDelivery::retry(*self, delay))
    }

    fn dead_letter(self: Box<Self>, reason: String) -> BoxFuture<'static, BrokerResult<u64>> {
        Box::pin(BrokerDelivery::dead_letter(*self, reason))
    }
}

/// A message broker of any kind, as the host uses it: cheap to clone.
#[derive(Clone)]
pub struct Broker(Arc<dyn ErasedBroker>);

impl Broker {
    /// The broker of `backend`.
    pub fn new(backend: impl MessageBroker) -> Broker {
        Broker(Arc::new(backend))
    }

    /// The broker's kind, for logs and metrics.
    pub fn kind(&self) -> &'static str {
        self.0.kind()
    }

    /// Whether the broker is reachable.
    pub fn status(&self) -> BrokerStatus {
        self.0.status()
    }

    /// Accepts `message` durably (see `MessageBroker::publish`).
    pub async fn publish(&self, message: Message) -> BrokerResult<()> {
        self.0.publish(message).await
    }

    /// Joins the group `subscription` names (see `MessageBroker::subscribe`).
    pub async fn subscribe(&self, subscription: &Subscription) -> BrokerResult<Consumer> {
        self.0.subscribe(subscription).await
    }

    /// Forgets `group` on the broker; whether it existed.
    pub async fn delete_group(&self, group: &str) -> BrokerResult<bool> {
        self.0.delete_group(group).await
    }

    /// A page of `group`'s dead letters, oldest first, as `query` asks
    /// (its limit capped).
    pub async fn dead_letters(
        &self,
        group: &str,
        query: DeadLetterQuery,
    ) -> BrokerResult<Vec<DeadLetter>> {
        self.0.dead_letters(group, query.bounded()).await
    }

    /// How many dead letters `group` has, without reading them.
    pub async fn count_dead_letters(&self, group: &str) -> BrokerResult<u64> {
        self.0.count_dead_letters(group).await
    }

    /// Makes `service` the owner of `group` if it has none yet, and returns
    /// the owner (see `MessageBroker::claim_group`).
    pub async fn claim_group(&self, group: &str, service: &str) -> BrokerResult<String> {
        self.0.claim_group(group, service).await
    }

    /// Forwards replies addressed to `inboxes` that arrive through the
    /// broker to them.
    pub fn listen_for_replies(&self, inboxes: &Arc<Inboxes>) {
        self.0.listen_for_replies(inboxes.clone());
    }

    /// Sends a reply to a requester on another host.
    pub async fn send_reply(&self, reply_to: &str, message: Message) -> BrokerResult<()> {
        self.0.send_reply(reply_to, message).await
    }
}

/// One consumer of a group, of any broker.
pub struct Consumer(Box<dyn ErasedConsumer>);

impl Consumer {
    /// The next delivery; waits for one. An error means the broker is gone
    /// for now: subscribe again later.
    pub async fn next(&mut self) -> BrokerResult<Delivery> {
        self.0.next().await
    }
}

/// One delivery of a message, of any broker.
pub struct Delivery(Box<dyn ErasedDelivery>);

impl Delivery {
    /// The message.
    pub fn message(&self) -> &Message {
        &self.0.received().message
    }

    /// Which attempt this is: 1 for the first delivery.
    pub fn attempt(&self) -> u32 {
        self.0.received().attempt
    }

    /// The message was handled: it is done for this group.
    pub async fn ack(self) -> BrokerResult<()> {
        self.0.ack().await
    }

    /// The handler failed: deliver it again after `delay`.
    pub async fn retry(self, delay: Duration) -> BrokerResult<()> {
        self.0.retry(delay).await
    }

    /// Every attempt failed: keep it as a dead letter, with `reason`; how
    /// many old dead letters were dropped to make room.
    pub async fn dead_letter(self, reason: &str) -> BrokerResult<u64> {
        self.0.dead_letter(reason.to_string()).await
    }
}
