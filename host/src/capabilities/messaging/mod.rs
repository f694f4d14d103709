//! Messaging for guests: publishing to topics, request-reply, and the
//! broker behind message triggers — with the grant in a service's manifest
//! deciding what it may publish to.
//!
//! ```toml
//! [messaging]
//! publish = ["orders.*"]     # topics it may publish to; wildcards allowed
//! ```
//!
//! Guests publish through `wasi:messaging@0.2.0-draft` (`producer`,
//! `request-reply`), `wasmcloud:messaging@0.2.0` (`consumer`), or — needing
//! no bindings — an HTTP POST to `http://messages.internal/TOPIC` (see
//! `outbound`). Every way checks the grant, stamps the message with the
//! publishing request's `x-request-id` and a child `traceparent` (so one
//! trace spans HTTP → message → handler), and waits, within the request's
//! time limit, until the broker has accepted the message durably.
//!
//! The broker is one per host, chosen in `wharf.toml` or with `--broker`
//! ([`choice`]): [`embedded`] (SQLite in the data directory, the default),
//! [`nats`] (JetStream) or [`rabbitmq`], each implementing the contract in
//! [`broker`].
//! Services triggered by messages are the `serve` layer's (`triggers`).

mod bindings;
pub mod broker;
pub mod choice;
pub mod embedded;
pub mod inbox;
pub mod kafka;
pub mod limits;
pub mod message;
pub mod nats;
pub(crate) mod over_http;
pub mod rabbitmq;
pub mod sealed;
pub mod topic;

pub use broker::{
    Broker, BrokerError, BrokerStatus, DeadLetter, DeadLetterQuery, MAX_DEAD_LETTER_PAGE,
    MessageBroker,
};
pub use choice::BrokerChoice;
pub use limits::{DEFAULT_MAX_PENDING, MessagingLimits, PartialMessagingLimits};
pub use message::Message;

use std::sync::Arc;
use std::time::{Duration, Instant};

use wasmtime::component::{HasData, Linker, ResourceTable};

use crate::base::metrics::{Metrics, PublishResult};
use crate::base::trace::{TRACEPARENT, TraceContext};
use crate::capabilities::call::CallContext;
use crate::capabilities::messaging::inbox::{Inboxes, is_inbox};
use crate::capabilities::messaging::topic::{TopicPattern, validate_topic};

/// Largest message body, in bytes (NATS's default maximum payload).
pub const MAX_MESSAGE_SIZE: usize = 1 << 20;

/// Most bytes of metadata (keys and values) one message may carry.
pub const MAX_METADATA_SIZE: usize = 16 << 10;

/// How long a request waits for its replies when the guest gives no time.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// Longest a request may wait for replies (it never outlives the
/// requesting request's own time limit either).
pub const MAX_REPLY_WAIT: Duration = Duration::from_secs(60 * 60);

/// Most replies one request may wait for.
pub const MAX_EXPECTED_REPLIES: u32 = 64;

/// Metadata key carrying the publishing request's id.
pub const REQUEST_ID_KEY: &str = "x-request-id";

/// The topics a service may publish to and subscribe to: its manifest's
/// `[messaging] publish` and `subscribe`. Nothing without them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MessagingGrant {
    publish: Vec<TopicPattern>,
    subscribe: Vec<TopicPattern>,
}

impl MessagingGrant {
    /// A grant of publishing to `entries`; an error names the bad entry.
    pub fn parse(entries: &[String]) -> Result<MessagingGrant, String> {
        let publish = entries
            .iter()
            .map(|entry| TopicPattern::parse(entry))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(MessagingGrant {
            publish,
            subscribe: Vec::new(),
        })
    }

    /// The grant with the subscriptions `subscribe` (already parsed).
    pub fn with_subscriptions(mut self, subscribe: Vec<TopicPattern>) -> MessagingGrant {
        self.subscribe = subscribe;
        self
    }

    /// The subscription patterns as written.
    pub fn subscriptions(&self) -> Vec<String> {
        self.subscribe
            .iter()
            .map(|p| p.as_str().to_string())
            .collect()
    }

    /// Whether `topic` may be published to.
    pub fn allows(&self, topic: &str) -> bool {
        self.publish.iter().any(|pattern| pattern.matches(topic))
    }

    /// Whether nothing may be published.
    pub fn is_empty(&self) -> bool {
        self.publish.is_empty()
    }

    /// The patterns as written.
    pub fn entries(&self) -> Vec<String> {
        self.publish
            .iter()
            .map(|p| p.as_str().to_string())
            .collect()
    }
}

/// Why publishing (or a request) failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MessagingError {
    /// Not a valid topic, or the message is too large.
    Invalid(String),
    /// The manifest does not grant the topic.
    Denied(String),
    /// The broker refused or could not be reached.
    Broker(BrokerError),
    /// No answer in time.
    Timeout(String),
}

impl std::fmt::Display for MessagingError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            MessagingError::Invalid(why)
            | MessagingError::Denied(why)
            | MessagingError::Timeout(why) => write!(f, "{why}"),
            MessagingError::Broker(err) => write!(f, "{err}"),
        }
    }
}

impl MessagingError {
    fn metric(&self) -> PublishResult {
        match self {
            MessagingError::Invalid(_) => PublishResult::Invalid,
            MessagingError::Denied(_) => PublishResult::Denied,
            MessagingError::Broker(BrokerError::Full(_)) => PublishResult::Full,
            MessagingError::Broker(BrokerError::Quota(..)) => PublishResult::Throttled,
            MessagingError::Broker(BrokerError::Unavailable(_)) | MessagingError::Timeout(_) => {
                PublishResult::Unavailable
            }
            MessagingError::Broker(BrokerError::Other(_)) => PublishResult::Error,
        }
    }
}

/// The host's broker with what every service shares: the reply inboxes,
/// the bounds and the metrics.
pub struct MessagingHub {
    broker: Broker,
    inboxes: Arc<Inboxes>,
    limits: MessagingLimits,
    metrics: Arc<Metrics>,
}

impl MessagingHub {
    /// The hub of `broker`, whose publishers are held to `limits`; starts
    /// listening for replies to this host's inboxes that come through the
    /// broker.
    pub fn new(
        broker: Broker,
        limits: MessagingLimits,
        metrics: Arc<Metrics>,
    ) -> anyhow::Result<Arc<MessagingHub>> {
        let inboxes = Inboxes::new().map_err(anyhow::Error::msg)?;
        broker.listen_for_replies(&inboxes);
        Ok(Arc::new(MessagingHub {
            broker,
            inboxes,
            limits,
            metrics,
        }))
    }

    /// The broker.
    pub fn broker(&self) -> &Broker {
        &self.broker
    }

    /// Whether the broker is reachable.
    pub fn status(&self) -> BrokerStatus {
        self.broker.status()
    }

    /// The host's metrics.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Sends `message` as a reply to the inbox `reply_to`: in-process if
    /// the requester is on this host, through the broker otherwise.
    pub async fn reply(&self, reply_to: &str, mut message: Message) -> Result<(), MessagingError> {
        if !is_inbox(reply_to) {
            return Err(MessagingError::Invalid(format!(
                "{reply_to:?} is not a reply address"
            )));
        }
        message.topic = reply_to.to_string();
        if self.inboxes.is_local(reply_to) {
            return if self.inboxes.deliver(reply_to, message) {
                Ok(())
            } else {
                Err(MessagingError::Timeout(
                    "the requester is no longer waiting for a reply".into(),
                ))
            };
        }
        self.broker
            .send_reply(reply_to, message)
            .await
            .map_err(MessagingError::Broker)
    }
}

/// What one deployed service may do with the host's broker.
pub struct MessagingAccess {
    hub: Arc<MessagingHub>,
    grant: MessagingGrant,
    service: Arc<str>,
    /// The service's publishing quota.
    quota: PublishQuota,
}

impl MessagingAccess {
    /// Access to `hub` for `service` within `grant` and the hub's quotas.
    pub fn new(
        hub: Arc<MessagingHub>,
        grant: MessagingGrant,
        service: Arc<str>,
    ) -> MessagingAccess {
        let quota = PublishQuota::new(hub.limits.publish_rate, hub.limits.publish_bytes);
        MessagingAccess {
            hub,
            grant,
            service,
            quota,
        }
    }

    /// Checks that the service may publish `body` to `topic`.
    pub fn check(&self, topic: &str, body: &[u8]) -> Result<(), MessagingError> {
        validate_topic(topic).map_err(MessagingError::Invalid)?;
        check_size(body.len())?;
        if !self.grant.allows(topic) {
            return Err(MessagingError::Denied(format!(
                "service {} may not publish to {topic:?}: not in its [messaging] publish list",
                self.service
            )));
        }
        Ok(())
    }

    /// Publishes `message` on behalf of the request in `context`, once the
    /// broker has it or the request's time is up.
    pub(crate) async fn publish(
        &self,
        mut message: Message,
        context: &CallContext,
    ) -> Result<(), MessagingError> {
        let result = self.publish_uncounted(&mut message, context).await;
        let metric = match &result {
            Ok(()) => PublishResult::Ok,
            Err(err) => err.metric(),
        };
        self.hub.metrics.message_published(&self.service, metric);
        if let Err(err) = &result {
            tracing::warn!(
                service = %self.service,
                request_id = %context.request_id,
                topic = %message.topic,
                "publish failed: {err}"
            );
        }
        result
    }

    async fn publish_uncounted(
        &self,
        message: &mut Message,
        context: &CallContext,
    ) -> Result<(), MessagingError> {
        self.check(&message.topic, &message.body)?;
        check_metadata(message)?;
        stamp(message, context);
        if message.key.is_none() {
            let key = message.meta(message::MESSAGE_KEY).unwrap_or(&self.service);
            message.key = Some(key.to_string());
        }
        self.quota.take(message.stored_size()).map_err(|wait| {
            MessagingError::Broker(BrokerError::Quota(
                format!(
                    "service {} publishes more than this host allows per second; try again in {}",
                    self.service,
                    humantime::format_duration(wait)
                ),
                wait,
            ))
        })?;
        let publish = self.hub.broker.publish(message.clone());
        match tokio::time::timeout_at(context.deadline.into(), publish).await {
            Ok(result) => result.map_err(MessagingError::Broker),
            Err(_) => Err(MessagingError::Timeout(
                "the request's time limit passed before the broker accepted the message".into(),
            )),
        }
    }

    /// Publishes `message` as a request and waits up to `timeout` (and no
    /// longer than the request's time limit) for `expected` replies;
    /// returns those that came (an error if none did).
    pub(crate) async fn request(
        &self,
        mut message: Message,
        context: &CallContext,
        timeout: Duration,
        expected: u32,
    ) -> Result<Vec<Message>, MessagingError> {
        let mut inbox = self
            .hub
            .inboxes
            .open()
            .map_err(|why| MessagingError::Broker(BrokerError::Other(why)))?;
        message.reply_to = Some(inbox.address().to_string());
        self.publish(message, context).await?;
        let started = Instant::now();
        let until = crate::base::limits::deadline_after(started, timeout.min(MAX_REPLY_WAIT))
            .min(context.deadline);
        let expected = expected.clamp(1, MAX_EXPECTED_REPLIES) as usize;
        let mut replies = Vec::new();
        while replies.len() < expected {
            match tokio::time::timeout_at(until.into(), inbox.recv()).await {
                Ok(Some(reply)) => replies.push(reply),
                Ok(None) | Err(_) => break,
            }
        }
        if replies.is_empty() {
            let waited = until.saturating_duration_since(started);
            return Err(MessagingError::Timeout(format!(
                "no reply within {}",
                humantime::format_duration(Duration::from_millis(waited.as_millis() as u64))
            )));
        }
        Ok(replies)
    }

    /// Replies to a request (a message with `reply_to`).
    pub(crate) async fn reply(
        &self,
        reply_to: &str,
        mut message: Message,
        context: &CallContext,
    ) -> Result<(), MessagingError> {
        check_size(message.body.len())?;
        check_metadata(&message)?;
        stamp(&mut message, context);
        self.hub.reply(reply_to, message).await
    }
}

/// Refuses a body over [`MAX_MESSAGE_SIZE`].
fn check_size(len: usize) -> Result<(), MessagingError> {
    if len > MAX_MESSAGE_SIZE {
        return Err(MessagingError::Invalid(format!(
            "the message is {len} bytes, over the limit of {MAX_MESSAGE_SIZE}"
        )));
    }
    Ok(())
}

/// Refuses metadata over [`MAX_METADATA_SIZE`] bytes in all.
fn check_metadata(message: &Message) -> Result<(), MessagingError> {
    let size: usize = message
        .metadata
        .iter()
        .map(|(key, value)| key.len() + value.len())
        .sum();
    if size > MAX_METADATA_SIZE {
        return Err(MessagingError::Invalid(format!(
            "the message's metadata is {size} bytes, over the limit of {MAX_METADATA_SIZE}"
        )));
    }
    Ok(())
}

/// A service's publishing quota: token buckets of messages and bytes per
/// second, each holding at most one second's worth (bytes: at least one
/// largest message, so any message can pass).
struct PublishQuota {
    messages: Option<TokenBucket>,
    bytes: Option<TokenBucket>,
}

impl PublishQuota {
    fn new(rate: Option<u64>, bytes: Option<u64>) -> PublishQuota {
        let largest = (MAX_MESSAGE_SIZE + MAX_METADATA_SIZE + topic::MAX_TOPIC) as u64;
        PublishQuota {
            messages: rate.map(|rate| TokenBucket::new(rate, rate.max(1))),
            bytes: bytes.map(|rate| TokenBucket::new(rate, rate.max(largest))),
        }
    }

    /// Takes one message of `size` bytes, or says how long until it fits.
    fn take(&self, size: u64) -> Result<(), Duration> {
        let now = Instant::now();
        let waits = [
            self.messages.as_ref().map(|b| b.wait_for(1, now)),
            self.bytes.as_ref().map(|b| b.wait_for(size, now)),
        ];
        if let Some(wait) = waits.iter().flatten().flatten().max() {
            return Err(*wait);
        }
        if let Some(bucket) = &self.messages {
            bucket.take(1, now);
        }
        if let Some(bucket) = &self.bytes {
            bucket.take(size, now);
        }
        Ok(())
    }
}

/// Tokens refilled at `rate` per second up to `capacity`.
struct TokenBucket {
    rate: u64,
    capacity: u64,
    /// Tokens now, and when they were counted.
    state: std::sync::Mutex<(f64, Instant)>,
}

impl TokenBucket {
    fn new(rate: u64, capacity: u64) -> TokenBucket {
        TokenBucket {
            rate: rate.max(1),
            capacity,
            state: std::sync::Mutex::new((capacity as f64, Instant::now())),
        }
    }

    fn refilled(&self, state: &mut (f64, Instant), now: Instant) {
        let elapsed = now.saturating_duration_since(state.1).as_secs_f64();
        state.0 = (state.0 + elapsed * self.rate as f64).min(self.capacity as f64);
        state.1 = now;
    }

    /// `None` if `amount` tokens are there now, else how long until they are.
    fn wait_for(&self, amount: u64, now: Instant) -> Option<Duration> {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        self.refilled(&mut state, now);
        let missing = amount as f64 - state.0;
        (missing > 0.0).then(|| Duration::from_secs_f64(missing / self.rate as f64))
    }

    fn take(&self, amount: u64, now: Instant) {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        self.refilled(&mut state, now);
        state.0 -= amount as f64;
    }
}

/// Adds the publishing request's id and a child span of its trace to the
/// message's metadata, unless the guest set them.
fn stamp(message: &mut Message, context: &CallContext) {
    if message.meta(TRACEPARENT).is_none() {
        let span = TraceContext::child_of(Some(&context.trace));
        if let Ok(value) = span.header_value().to_str() {
            message
                .metadata
                .push((TRACEPARENT.to_string(), value.to_string()));
        }
    }
    if message.meta(REQUEST_ID_KEY).is_none() {
        message
            .metadata
            .push((REQUEST_ID_KEY.to_string(), context.request_id.to_string()));
    }
}

/// The messaging state of one request's store.
pub struct MessagingCtx {
    /// `None`: the host has no broker, so every publish is refused.
    access: Option<Arc<MessagingAccess>>,
    /// The request the guest publishes on behalf of.
    context: CallContext,
    /// The inboxes this invocation may reply to: those named by the
    /// messages delivered to it. A reply to any other is refused, so no
    /// service can answer (or forge an answer to) a request it was not
    /// given.
    owed_replies: Vec<String>,
}

impl MessagingCtx {
    /// The context of a request described by `context`.
    pub(crate) fn new(access: Option<Arc<MessagingAccess>>, context: CallContext) -> MessagingCtx {
        MessagingCtx {
            access,
            context,
            owed_replies: Vec::new(),
        }
    }

    /// Hands the context to the next request of a reused instance; what
    /// the previous invocation was owed is no longer.
    pub(crate) fn begin_request(&mut self, context: CallContext) {
        self.context = context;
        self.owed_replies.clear();
    }

    /// Records that the message being delivered to this invocation asked
    /// for replies at `reply_to`: the guest may now reply there.
    pub(crate) fn owe_reply(&mut self, reply_to: &str) {
        if !self.owed_replies.iter().any(|owed| owed == reply_to) {
            self.owed_replies.push(reply_to.to_string());
        }
    }

    /// Refuses a reply to `reply_to` unless a delivery to this invocation
    /// named it.
    fn check_owed(&self, reply_to: &str) -> Result<(), MessagingError> {
        if self.owed_replies.iter().any(|owed| owed == reply_to) {
            return Ok(());
        }
        Err(MessagingError::Denied(
            "this service may not reply there: a service replies only to a request delivered to it, while it handles that request"
                .into(),
        ))
    }
}

/// A connection a guest opened (`wasi:messaging` `client`): Wharf has one
/// broker, so any name reaches it and the handle holds nothing.
pub struct ClientHandle;

/// A message as a guest holds it (`wasi:messaging` `message`).
#[derive(Debug, Clone, Default)]
pub struct MessageHandle {
    /// Where it came from (a received message) or was last sent.
    pub topic: Option<String>,
    /// Its content type.
    pub content_type: Option<String>,
    /// The payload.
    pub data: Vec<u8>,
    /// Its metadata.
    pub metadata: Vec<(String, String)>,
    /// Where replies go (a received request).
    pub reply_to: Option<String>,
}

impl MessageHandle {
    /// The guest's view of a received message.
    pub fn received(message: &Message) -> MessageHandle {
        MessageHandle {
            topic: Some(message.topic.clone()),
            content_type: message.content_type.clone(),
            data: message.body.to_vec(),
            metadata: message.metadata.clone(),
            reply_to: message.reply_to.clone(),
        }
    }

    /// The message to publish to `topic`.
    fn to_message(&self, topic: &str) -> Message {
        let mut message = Message::new(topic, bytes::Bytes::from(self.data.clone()));
        message.content_type = self.content_type.clone();
        message.metadata = self.metadata.clone();
        message
    }
}

/// Options of one request (`wasi:messaging` `request-options`).
#[derive(Debug, Clone, Default)]
pub struct RequestOptionsHandle {
    /// How long to wait for replies.
    pub timeout: Option<Duration>,
    /// How many replies to wait for.
    pub expected: Option<u32>,
}

/// The messaging context and resource table of one store, which the host
/// functions work on.
pub struct MessagingView<'a> {
    /// The request's messaging context.
    pub ctx: &'a mut MessagingCtx,
    /// The store's resources (clients, messages, options live here).
    pub table: &'a mut ResourceTable,
}

/// Marks [`MessagingView`] as the data the generated bindings work on.
pub struct Messaging;

impl HasData for Messaging {
    type Data<'a> = MessagingView<'a>;
}

/// Adds `wasi:messaging@0.2.0-draft` and `wasmcloud:messaging@0.2.0` to
/// `linker`, reaching each store's messaging context through `get`.
pub fn add_to_linker<T: Send + 'static>(
    linker: &mut Linker<T>,
    get: fn(&mut T) -> MessagingView<'_>,
) -> wasmtime::Result<()> {
    bindings::add_to_linker(linker, get)
}

pub use bindings::{HandlerExports, call_handler};

impl MessagingView<'_> {
    fn access(&self) -> Result<&Arc<MessagingAccess>, MessagingError> {
        self.ctx.access.as_ref().ok_or_else(|| {
            MessagingError::Denied("this service is not granted any messaging".into())
        })
    }

    /// Publishes `message` to `topic` (replying, if `topic` is an inbox).
    pub(crate) async fn send(
        &mut self,
        topic: &str,
        message: &MessageHandle,
    ) -> Result<(), MessagingError> {
        let access = self.access()?.clone();
        let context = self.ctx.context.clone();
        if is_inbox(topic) {
            self.ctx.check_owed(topic)?;
            return access
                .reply(topic, message.to_message(topic), &context)
                .await;
        }
        access.publish(message.to_message(topic), &context).await
    }

    /// Sends a request and waits for replies.
    pub(crate) async fn request(
        &mut self,
        topic: &str,
        message: &MessageHandle,
        timeout: Option<Duration>,
        expected: Option<u32>,
    ) -> Result<Vec<Message>, MessagingError> {
        let access = self.access()?.clone();
        let context = self.ctx.context.clone();
        access
            .request(
                message.to_message(topic),
                &context,
                timeout.unwrap_or(DEFAULT_REQUEST_TIMEOUT),
                expected.unwrap_or(1),
            )
            .await
    }

    /// Replies to a received request.
    pub(crate) async fn reply(
        &mut self,
        reply_to: &str,
        message: &MessageHandle,
    ) -> Result<(), MessagingError> {
        let access = self.access()?.clone();
        self.ctx.check_owed(reply_to)?;
        let context = self.ctx.context.clone();
        access
            .reply(reply_to, message.to_message(reply_to), &context)
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grants_match_patterns() {
        let grant = MessagingGrant::parse(&["orders.*".into(), "audit.>".into()]).unwrap();
        assert!(grant.allows("orders.created"));
        assert!(!grant.allows("orders.created.eu"));
        assert!(grant.allows("audit.a.b"));
        assert!(!grant.allows("payments.done"));
        assert!(MessagingGrant::default().is_empty());
        assert!(MessagingGrant::parse(&["a..b".into()]).is_err());
        assert!(MessagingGrant::parse(&["_inbox.>".into()]).is_err());
    }

    #[test]
    fn regression_a_publisher_over_its_quota_is_told_when_to_retry() {
        let quota = PublishQuota::new(Some(2), Some(10 << 20));
        assert!(quota.take(10).is_ok());
        assert!(quota.take(10).is_ok());
        let wait = quota.take(10).unwrap_err();
        assert!(
            wait > Duration::ZERO && wait <= Duration::from_secs(1),
            "{wait:?}"
        );
        let bytes = PublishQuota::new(None, Some(1000));
        // One largest message always fits an idle bucket...
        assert!(bytes.take(MAX_MESSAGE_SIZE as u64).is_ok());
        // ...and then the bucket is empty for a while.
        assert!(bytes.take(MAX_MESSAGE_SIZE as u64).is_err());
        assert!(PublishQuota::new(None, None).take(u64::MAX).is_ok());
    }

    #[test]
    fn stamping_keeps_what_the_guest_set() {
        let context = CallContext {
            request_id: Arc::from("req-1"),
            hops: 0,
            deadline: Instant::now(),
            trace: TraceContext::child_of(None),
        };
        let mut message = Message::new("t", bytes::Bytes::new());
        stamp(&mut message, &context);
        assert_eq!(message.meta(REQUEST_ID_KEY), Some("req-1"));
        let traceparent = message.meta(TRACEPARENT).unwrap().to_string();
        assert!(traceparent.contains(&context.trace.trace_id()));
        let mut own = Message::new("t", bytes::Bytes::new());
        own.metadata.push(("X-Request-Id".into(), "mine".into()));
        stamp(&mut own, &context);
        assert_eq!(own.meta(REQUEST_ID_KEY), Some("mine"));
    }
}
