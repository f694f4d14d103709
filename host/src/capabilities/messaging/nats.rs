//! The NATS JetStream broker (`nats://…`).
//!
//! Every message goes into one stream, `WHARF_MESSAGES`, on the subject
//! `wharf.msg.TOPIC`, with interest retention: the stream keeps a message
//! until every consumer whose filter matches it has acknowledged it, so a
//! topic nobody subscribes to costs nothing. A consumer group is a durable
//! pull consumer named after the group, filtered to `wharf.msg.PATTERN`,
//! with explicit acknowledgement; every host running the group's service
//! pulls from the same consumer, so they share its messages. The stream is
//! bounded ([`MessagingLimits`]: `max_pending` messages and `max_bytes`
//! bytes, new ones refused when full; JetStream cannot bound one consumer's
//! share, so `max_group_bytes` does not apply here), and each message's id
//! is JetStream's `Nats-Msg-Id`, so a publish retried after a lost
//! acknowledgement is stored once.
//!
//! Retries are negative acknowledgements with a delay; the attempt number
//! is JetStream's delivery count. Dead letters go to the stream
//! `WHARF_DEAD` (subject `wharf.dead.GROUP`; per group the newest
//! `max_dead_letters` kept, `max_bytes` in all, the oldest dropped first)
//! and the original is terminated. Replies to requests are plain NATS
//! messages to the requester's inbox subject. Each group's owner is a key
//! of the key-value bucket `wharf-group-owners`, written with create
//! semantics so the first claim wins on every host.
//!
//! Only what NATS 2.9 offers is used (Debian's version): one filter subject
//! per consumer — if a group's topic changes, its consumer is recreated.
//!
//! [`BrokerChoice::open`]: crate::capabilities::messaging::broker::BrokerChoice::open

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::Result;
use async_nats::HeaderMap;
use async_nats::jetstream::{self, AckKind, consumer, stream};
use bytes::Bytes;
use futures_util::StreamExt as _;

use crate::capabilities::messaging::broker::{
    BrokerConsumer, BrokerDelivery, BrokerError, BrokerResult, BrokerStatus, DeadLetter,
    DeadLetterQuery, MessageBroker, Received, Subscription,
};
use crate::capabilities::messaging::inbox::Inboxes;
use crate::capabilities::messaging::limits::MessagingLimits;
use crate::capabilities::messaging::message::{Message, new_message_id};
use crate::capabilities::nats::{KeyValueSpec, NatsConnection, Replicas};
use crate::capabilities::tls::BackendTls;

/// The stream holding every message.
const STREAM: &str = "WHARF_MESSAGES";
/// Subject prefix of messages.
const SUBJECT_PREFIX: &str = "wharf.msg.";
/// The stream holding dead letters.
const DEAD_STREAM: &str = "WHARF_DEAD";
/// Subject prefix of dead letters.
const DEAD_PREFIX: &str = "wharf.dead.";
/// The key-value bucket naming each group's owner.
const OWNERS_BUCKET: &str = "wharf-group-owners";
/// How long an operation waits for the client to be connected.
const CONNECT_WAIT: Duration = Duration::from_secs(1);

/// Header names Wharf's messages carry.
mod header {
    pub const TOPIC: &str = "Wharf-Topic";
    pub const CONTENT_TYPE: &str = "Content-Type";
    pub const METADATA: &str = "Wharf-Metadata";
    pub const REPLY_TO: &str = "Wharf-Reply-To";
    pub const PUBLISHED: &str = "Wharf-Published-Ms";
    pub const ID: &str = "Wharf-Id";
    pub const NATS_ID: &str = "Nats-Msg-Id";
    pub const REASON: &str = "Wharf-Dead-Reason";
    pub const ATTEMPTS: &str = "Wharf-Attempts";
    pub const DEAD_AT: &str = "Wharf-Dead-Ms";
}

fn unavailable(err: impl std::fmt::Display) -> BrokerError {
    BrokerError::Unavailable(format!("nats: {err}"))
}

fn classify(err: impl std::fmt::Display) -> BrokerError {
    let text = err.to_string();
    if text.contains("maximum messages")
        || text.contains("maximum bytes")
        || text.contains("insufficient resources")
    {
        BrokerError::Full(format!("nats: {text}"))
    } else if text.contains("timed out")
        || text.contains("no responders")
        || text.contains("disconnected")
        || text.contains("connection")
    {
        unavailable(text)
    } else {
        BrokerError::Other(format!("nats: {text}"))
    }
}

/// A bound as JetStream takes it.
fn bound(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

fn millis(time: SystemTime) -> u64 {
    time.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The headers that carry `message` (besides its body and subject).
fn headers_of(message: &Message) -> HeaderMap {
    let mut headers = HeaderMap::new();
    headers.insert(header::ID, message.id.as_str());
    headers.insert(header::NATS_ID, message.id.as_str());
    headers.insert(header::TOPIC, message.topic.as_str());
    headers.insert(
        header::PUBLISHED,
        millis(message.published_at).to_string().as_str(),
    );
    if let Some(content_type) = &message.content_type {
        headers.insert(header::CONTENT_TYPE, content_type.as_str());
    }
    if !message.metadata.is_empty() {
        headers.insert(header::METADATA, message.metadata_json().as_str());
    }
    if let Some(reply_to) = &message.reply_to {
        headers.insert(header::REPLY_TO, reply_to.as_str());
    }
    headers
}

fn header_text(headers: Option<&HeaderMap>, name: &str) -> Option<String> {
    headers?.get(name).map(|value| value.as_str().to_string())
}

/// The message a NATS message carries; `subject_topic` is the topic its
/// subject names, used when a header is missing (published by a non-Wharf
/// client).
fn message_of(subject_topic: &str, headers: Option<&HeaderMap>, payload: Bytes) -> Message {
    Message {
        id: header_text(headers, header::ID).unwrap_or_else(new_message_id),
        topic: header_text(headers, header::TOPIC).unwrap_or_else(|| subject_topic.to_string()),
        body: payload,
        content_type: header_text(headers, header::CONTENT_TYPE),
        metadata: header_text(headers, header::METADATA)
            .map(|text| Message::metadata_from_json(&text))
            .unwrap_or_default(),
        reply_to: header_text(headers, header::REPLY_TO),
        published_at: header_text(headers, header::PUBLISHED)
            .and_then(|ms| ms.parse::<u64>().ok())
            .map_or_else(SystemTime::now, |ms| {
                SystemTime::UNIX_EPOCH + Duration::from_millis(ms)
            }),
        key: None,
    }
}

/// The NATS JetStream broker.
pub struct NatsBroker {
    /// The shared connection.
    connection: Arc<NatsConnection>,
    client: async_nats::Client,
    jetstream: jetstream::Context,
    /// What bounds the streams.
    limits: MessagingLimits,
    /// Whether the streams have been created (since the last reconnect).
    streams_ready: tokio::sync::Mutex<bool>,
    /// The consumer of every group this host has asked to join, by group:
    /// created with the streams, before the first publish is accepted, so
    /// a message published while a trigger is still retrying to join is
    /// kept for it (the stream keeps a message only for existing consumers).
    groups: std::sync::Mutex<HashMap<String, consumer::pull::Config>>,
    /// How many servers keep a copy of each stream (consumers follow their
    /// stream).
    replicas: Replicas,
}

impl NatsBroker {
    /// A broker on the NATS server(s) at `url` (comma-separated), its
    /// streams bounded by `limits` and kept by `replicas` servers, over TLS
    /// as `tls` says, authenticated by the NATS `credentials` file's text if
    /// any. Connects in the background: a host whose NATS is down at start
    /// still starts.
    pub async fn connect(
        url: &str,
        limits: MessagingLimits,
        replicas: Replicas,
        tls: &BackendTls,
        credentials: Option<&str>,
    ) -> Result<Arc<NatsBroker>> {
        let connection = NatsConnection::shared(url, credentials, tls).await?;
        Ok(Arc::new(NatsBroker {
            client: connection.client().clone(),
            jetstream: connection.jetstream().clone(),
            connection,
            limits,
            streams_ready: tokio::sync::Mutex::new(false),
            groups: std::sync::Mutex::new(HashMap::new()),
            replicas,
        }))
    }

    async fn connected(&self) -> BrokerResult<()> {
        self.connection
            .connected(CONNECT_WAIT)
            .await
            .map_err(unavailable)
    }

    /// Creates the two streams if they do not exist yet.
    async fn ensure_streams(&self) -> BrokerResult<()> {
        self.connected().await?;
        let mut ready = self.streams_ready.lock().await;
        if *ready {
            return Ok(());
        }
        let replicas = self.connection.replicas(self.replicas);
        self.connection
            .stream(stream::Config {
                name: STREAM.to_string(),
                subjects: vec![format!("{SUBJECT_PREFIX}>")],
                retention: stream::RetentionPolicy::Interest,
                storage: stream::StorageType::File,
                discard: stream::DiscardPolicy::New,
                max_messages: bound(self.limits.max_pending),
                max_bytes: bound(self.limits.max_bytes),
                duplicate_window: Duration::from_secs(120),
                num_replicas: replicas,
                ..Default::default()
            })
            .await
            .map_err(classify)?;
        self.connection
            .stream(stream::Config {
                name: DEAD_STREAM.to_string(),
                subjects: vec![format!("{DEAD_PREFIX}>")],
                retention: stream::RetentionPolicy::Limits,
                storage: stream::StorageType::File,
                discard: stream::DiscardPolicy::Old,
                max_messages_per_subject: bound(self.limits.max_dead_letters),
                max_bytes: bound(self.limits.max_bytes),
                num_replicas: replicas,
                ..Default::default()
            })
            .await
            .map_err(classify)?;
        let groups: Vec<(String, consumer::pull::Config)> = self
            .groups
            .lock()
            .map(|groups| groups.iter().map(|(g, c)| (g.clone(), c.clone())).collect())
            .unwrap_or_default();
        if !groups.is_empty() {
            let stream = self.jetstream.get_stream(STREAM).await.map_err(classify)?;
            for (group, config) in groups {
                stream
                    .get_or_create_consumer::<consumer::pull::Config>(&group, config)
                    .await
                    .map_err(|err| {
                        classify(format!("creating the consumer of group {group}: {err}"))
                    })?;
            }
        }
        *ready = true;
        Ok(())
    }

    /// The bucket of group owners, created on first use.
    async fn owners(&self) -> BrokerResult<jetstream::kv::Store> {
        self.connected().await?;
        self.connection
            .key_value(
                OWNERS_BUCKET,
                KeyValueSpec {
                    replicas: self.connection.replicas(self.replicas),
                    ..KeyValueSpec::default()
                },
            )
            .await
            .map_err(classify)
    }
}

impl MessageBroker for Arc<NatsBroker> {
    type Consumer = NatsConsumer;

    fn kind(&self) -> &'static str {
        "nats"
    }

    /// Whether the client is connected now.
    fn status(&self) -> BrokerStatus {
        let (up, detail) = self.connection.state();
        BrokerStatus {
            kind: "nats",
            up,
            detail,
        }
    }

    /// Stores `message` in the stream; returns once JetStream has it.
    async fn publish(&self, message: Message) -> BrokerResult<()> {
        self.ensure_streams().await?;
        let subject = format!("{SUBJECT_PREFIX}{}", message.topic);
        let ack = self
            .jetstream
            .publish_with_headers(subject, headers_of(&message), message.body.clone())
            .await
            .map_err(classify)?;
        ack.await.map_err(classify)?;
        Ok(())
    }

    /// The group's durable consumer (created, or recreated when its topic
    /// changed), pulling up to `prefetch` messages at a time.
    async fn subscribe(&self, subscription: &Subscription) -> BrokerResult<NatsConsumer> {
        let filter = format!("{SUBJECT_PREFIX}{}", subscription.pattern.as_str());
        let name = subscription.group.as_str();
        let config = consumer::pull::Config {
            durable_name: Some(name.to_string()),
            filter_subject: filter.clone(),
            ack_policy: consumer::AckPolicy::Explicit,
            ack_wait: subscription.ack_wait,
            // Wharf counts attempts and dead-letters itself.
            max_deliver: -1,
            max_ack_pending: 10_000,
            deliver_policy: consumer::DeliverPolicy::All,
            ..Default::default()
        };
        if let Ok(mut groups) = self.groups.lock() {
            groups.insert(name.to_string(), config.clone());
        }
        self.ensure_streams().await?;
        let stream = self.jetstream.get_stream(STREAM).await.map_err(classify)?;
        match stream.consumer_info(name).await {
            Ok(info) if info.config.filter_subject != filter => {
                tracing::warn!(
                    group = name,
                    old = %info.config.filter_subject,
                    new = %filter,
                    "the group's topic changed: recreating its NATS consumer (messages waiting for the old topic are dropped)"
                );
                stream.delete_consumer(name).await.map_err(classify)?;
            }
            _ => {}
        }
        let consumer: consumer::PullConsumer = stream
            .get_or_create_consumer(name, config)
            .await
            .map_err(classify)?;
        let messages = consumer
            .stream()
            .max_messages_per_batch(subscription.prefetch.max(1))
            .heartbeat(Duration::from_secs(5))
            .expires(Duration::from_secs(30))
            .messages()
            .await
            .map_err(classify)?;
        Ok(NatsConsumer {
            messages,
            jetstream: self.jetstream.clone(),
            group: subscription.group.clone(),
        })
    }

    /// Deletes the group's durable consumer (the stream then keeps no
    /// message for it) and purges its dead letters.
    async fn delete_group(&self, group: &str) -> BrokerResult<bool> {
        if let Ok(mut groups) = self.groups.lock() {
            groups.remove(group);
        }
        self.ensure_streams().await?;
        let stream = self.jetstream.get_stream(STREAM).await.map_err(classify)?;
        let existed = stream.consumer_info(group).await.is_ok();
        if existed {
            stream.delete_consumer(group).await.map_err(classify)?;
        }
        let dead = self
            .jetstream
            .get_stream(DEAD_STREAM)
            .await
            .map_err(classify)?;
        dead.purge()
            .filter(format!("{DEAD_PREFIX}{group}"))
            .await
            .map_err(classify)?;
        let owners = self.owners().await?;
        owners.purge(group).await.map_err(classify)?;
        Ok(existed)
    }

    /// Records `service` as the group's owner unless it has one (a create:
    /// the first claim wins on every host); the owner.
    async fn claim_group(&self, group: &str, service: &str) -> BrokerResult<String> {
        let owners = self.owners().await?;
        if owners
            .create(group, Bytes::from(service.to_string()))
            .await
            .is_ok()
        {
            return Ok(service.to_string());
        }
        match owners.get(group).await.map_err(classify)? {
            Some(owner) => Ok(String::from_utf8_lossy(&owner).into_owned()),
            None => Err(BrokerError::Other(format!(
                "nats: the owner of group {group} could be neither written nor read"
            ))),
        }
    }

    /// How many dead letters the group has (from the stream's subject
    /// counts, reading none).
    async fn count_dead_letters(&self, group: &str) -> BrokerResult<u64> {
        self.ensure_streams().await?;
        let stream = self
            .jetstream
            .get_stream(DEAD_STREAM)
            .await
            .map_err(classify)?;
        let subject = format!("{DEAD_PREFIX}{group}");
        let info = stream
            .info_with_subjects(subject.clone())
            .await
            .map_err(classify)?;
        let mut subjects = info;
        let mut count = 0;
        while let Some(entry) = subjects.next().await {
            let (name, n) = entry.map_err(classify)?;
            if name == subject {
                count += n as u64;
            }
        }
        Ok(count)
    }

    /// A page of the group's dead letters, oldest first (positions are
    /// stream sequence numbers).
    async fn dead_letters(
        &self,
        group: &str,
        query: DeadLetterQuery,
    ) -> BrokerResult<Vec<DeadLetter>> {
        self.ensure_streams().await?;
        let stream = self
            .jetstream
            .get_stream(DEAD_STREAM)
            .await
            .map_err(classify)?;
        let deliver_policy = match query.after {
            Some(after) => consumer::DeliverPolicy::ByStartSequence {
                start_sequence: after.saturating_add(1),
            },
            None => consumer::DeliverPolicy::All,
        };
        let consumer = stream
            .create_consumer(consumer::pull::OrderedConfig {
                filter_subject: format!("{DEAD_PREFIX}{group}"),
                deliver_policy,
                ..Default::default()
            })
            .await
            .map_err(classify)?;
        let pending = consumer.cached_info().num_pending.min(query.limit as u64) as usize;
        let mut letters = Vec::with_capacity(pending);
        if pending == 0 {
            return Ok(letters);
        }
        let mut messages = consumer.messages().await.map_err(classify)?;
        while letters.len() < pending {
            let next = tokio::time::timeout(Duration::from_secs(2), messages.next()).await;
            let Ok(Some(Ok(message))) = next else { break };
            let headers = message.headers.as_ref();
            let attempts = header_text(headers, header::ATTEMPTS)
                .and_then(|n| n.parse().ok())
                .unwrap_or(0);
            let reason = header_text(headers, header::REASON).unwrap_or_default();
            let dead_at = header_text(headers, header::DEAD_AT)
                .and_then(|ms| ms.parse::<u64>().ok())
                .map_or(SystemTime::UNIX_EPOCH, |ms| {
                    SystemTime::UNIX_EPOCH + Duration::from_millis(ms)
                });
            let position = message.info().map_or(0, |info| info.stream_sequence);
            let body_size = message.payload.len() as u64;
            let body = message
                .payload
                .slice(..message.payload.len().min(query.body_limit));
            letters.push(DeadLetter {
                group: group.to_string(),
                message: message_of("", headers, body),
                body_size,
                position,
                attempts,
                reason,
                dead_at,
            });
        }
        Ok(letters)
    }

    /// Sends a reply to an inbox subject (a requester on any host).
    async fn send_reply(&self, reply_to: &str, message: Message) -> BrokerResult<()> {
        self.connected().await?;
        self.client
            .publish_with_headers(reply_to.to_string(), headers_of(&message), message.body)
            .await
            .map_err(classify)?;
        Ok(())
    }

    /// Delivers replies sent to this host's inboxes (`inboxes.prefix()`)
    /// from any host, for as long as the broker lives.
    fn listen_for_replies(&self, inboxes: Arc<Inboxes>) {
        let broker = Arc::downgrade(self);
        tokio::spawn(async move {
            let subject = format!("{}>", inboxes.prefix());
            loop {
                let Some(this) = broker.upgrade() else { return };
                let subscriber = this.client.subscribe(subject.clone()).await;
                drop(this);
                match subscriber {
                    Ok(mut subscriber) => {
                        while let Some(reply) = subscriber.next().await {
                            let message = message_of(
                                reply.subject.as_str(),
                                reply.headers.as_ref(),
                                reply.payload,
                            );
                            inboxes.deliver(reply.subject.as_str(), message);
                        }
                    }
                    Err(err) => {
                        tracing::debug!(error = %err, "subscribing to the reply inbox failed; retrying");
                    }
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        });
    }
}

/// A consumer of one group on NATS JetStream.
pub struct NatsConsumer {
    messages: consumer::pull::Stream,
    jetstream: jetstream::Context,
    group: String,
}

impl BrokerConsumer for NatsConsumer {
    type Delivery = NatsDelivery;

    /// The next delivery; an error means the consumer must be recreated.
    async fn next(&mut self) -> BrokerResult<NatsDelivery> {
        match self.messages.next().await {
            Some(Ok(message)) => {
                let attempt = message
                    .info()
                    .map(|info| info.delivered.max(1) as u32)
                    .unwrap_or(1);
                let topic = message
                    .subject
                    .as_str()
                    .strip_prefix(SUBJECT_PREFIX)
                    .unwrap_or_default()
                    .to_string();
                let parsed = message_of(&topic, message.headers.as_ref(), message.payload.clone());
                Ok(NatsDelivery {
                    raw: message,
                    received: Received {
                        message: parsed,
                        attempt,
                    },
                    jetstream: self.jetstream.clone(),
                    group: self.group.clone(),
                })
            }
            // Missed heartbeats and the like: the consumer is recreated.
            Some(Err(err)) => Err(classify(err)),
            None => Err(unavailable("the consumer's message stream ended")),
        }
    }
}

/// One delivery from NATS JetStream.
pub struct NatsDelivery {
    raw: jetstream::Message,
    received: Received,
    jetstream: jetstream::Context,
    group: String,
}

impl BrokerDelivery for NatsDelivery {
    /// The message, and JetStream's delivery count as the attempt.
    fn received(&self) -> &Received {
        &self.received
    }

    /// Acknowledges the message.
    async fn ack(self) -> BrokerResult<()> {
        self.raw.ack().await.map_err(classify)
    }

    /// Asks for a redelivery after `delay`.
    async fn retry(self, delay: Duration) -> BrokerResult<()> {
        self.raw
            .ack_with(AckKind::Nak(Some(delay)))
            .await
            .map_err(classify)
    }

    /// Stores the message in the dead-letter stream, then terminates it.
    /// The stream drops a group's oldest letters itself: 0 pruned here.
    async fn dead_letter(self, reason: String) -> BrokerResult<u64> {
        let reason = reason.as_str();
        let mut headers = headers_of(&self.received.message);
        // A dead letter is not a duplicate of the message it was.
        headers.insert(
            header::NATS_ID,
            format!("{}-dead-{}", self.received.message.id, self.group).as_str(),
        );
        headers.insert(header::REASON, reason);
        headers.insert(header::ATTEMPTS, self.received.attempt.to_string().as_str());
        headers.insert(
            header::DEAD_AT,
            millis(SystemTime::now()).to_string().as_str(),
        );
        let ack = self
            .jetstream
            .publish_with_headers(
                format!("{DEAD_PREFIX}{}", self.group),
                headers,
                self.received.message.body.clone(),
            )
            .await
            .map_err(classify)?;
        ack.await.map_err(classify)?;
        self.raw.ack_with(AckKind::Term).await.map_err(classify)?;
        Ok(0)
    }
}
