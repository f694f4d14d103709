//! The RabbitMQ broker (`amqp://…`, AMQP 0-9-1 through `lapin`).
//!
//! Messages are published, persistent and with publisher confirms, to the
//! durable topic exchange `wharf` with the topic as routing key — so any
//! AMQP client can publish to Wharf's services the same way. A consumer
//! group is the durable queue `wharf.GROUP`, bound to the exchange with the
//! group's topic pattern (`>` becomes `#`), consumed with manual
//! acknowledgement and a prefetch of the trigger's concurrency. The queue
//! holds at most `max_pending` messages and `max_group_bytes` bytes
//! ([`MessagingLimits`]) and then refuses publishes (`x-overflow:
//! reject-publish`, which the publisher sees as a negative confirm:
//! "full"). RabbitMQ has no bound across queues: `max_bytes` does not apply.
//!
//! A retry is a copy of the message, with its attempt number in the
//! `x-wharf-attempt` header, published to a delay queue
//! (`wharf.retry.GROUP.MS`: a fixed time-to-live, then dead-lettered back
//! into the group's queue), after which the original is acknowledged;
//! delays are rounded up to a fixed ladder so a group has few delay queues.
//! A delivery RabbitMQ marks redelivered (its consumer vanished before
//! acknowledging) counts as one more attempt. Dead letters go to the
//! durable queue `wharf.dead.GROUP` (the newest `max_dead_letters` and
//! `max_dead_bytes` kept: `x-overflow: drop-head`), with the reason and
//! attempt count as headers. Replies to requests go through the default
//! exchange to the requesting host's exclusive inbox queue.
//!
//! A group's owner is the one message of the durable queue
//! `wharf.owner.GROUP` (`x-max-length: 1`, `reject-publish`): the first
//! claim's publish is confirmed, every later one refused, so the first
//! claim wins on every host; the owner is read back with a get that puts
//! the message back. Each host remembers the owners it has seen, so a
//! trigger re-joining its group while the owner queue's node is down (a
//! classic queue lives on one node) still joins.
//!
//! The connection is made on demand and again after it breaks, at most
//! once a second; meanwhile operations fail with "unavailable".

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use anyhow::Result;
use bytes::Bytes;
use futures_util::StreamExt as _;
use lapin::message::Delivery as AmqpDelivery;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicGetOptions, BasicNackOptions, BasicPublishOptions,
    BasicQosOptions, ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions,
    QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::tcp::{OwnedIdentity, OwnedTLSConfig};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{
    BasicProperties, Channel, Confirmation, Connection, ConnectionProperties, ExchangeKind,
};

use crate::base::redact::url as redact;
use crate::capabilities::messaging::broker::{
    BrokerConsumer, BrokerDelivery, BrokerError, BrokerResult, BrokerStatus, DeadLetter,
    DeadLetterQuery, MessageBroker, Received, Subscription,
};
use crate::capabilities::messaging::inbox::Inboxes;
use crate::capabilities::messaging::limits::MessagingLimits;
use crate::capabilities::messaging::message::{Message, new_message_id};
use crate::capabilities::tls::{BackendTls, TlsPem, check_backend_url, ensure_crypto_provider};

/// The topic exchange every message is published to.
pub const EXCHANGE: &str = "wharf";
/// Least time between connection attempts.
const RECONNECT_EVERY: Duration = Duration::from_secs(1);
/// Longest a connection attempt may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// How long a publish waits for the broker's confirm. A node that died
/// without closing its connections (a machine switched off, a network
/// partition) leaves a link that looks connected until heartbeats fail, a
/// minute or more: past this, the publish is refused as unavailable and
/// the link replaced, so the next publish fails over to another node.
const CONFIRM_TIMEOUT: Duration = Duration::from_secs(10);

/// The heartbeat interval Wharf asks for, in seconds, unless the URL sets
/// one (`?heartbeat=N`): a connection silent for about twice this long is
/// given up, and its consumers join again through another node.
const HEARTBEAT_SECS: u16 = 5;

/// The least time between two renewals of the publishing channel: a queue
/// that is really full refuses every publish, and each refusal must not
/// cost the broker a new channel.
const RENEW_EVERY: Duration = Duration::from_secs(1);
/// The delays a retry is rounded up to, in milliseconds.
const DELAY_LADDER_MS: &[u64] = &[
    100, 250, 500, 1_000, 2_000, 5_000, 10_000, 30_000, 60_000, 300_000, 900_000, 3_600_000,
];

/// Header names Wharf's messages carry.
mod header {
    pub const TOPIC: &str = "x-wharf-topic";
    pub const METADATA: &str = "x-wharf-metadata";
    pub const PUBLISHED: &str = "x-wharf-published-ms";
    pub const ATTEMPT: &str = "x-wharf-attempt";
    pub const REASON: &str = "x-wharf-dead-reason";
    pub const DEAD_AT: &str = "x-wharf-dead-ms";
    pub const INBOX: &str = "x-wharf-inbox";
}

fn unavailable(err: impl std::fmt::Display) -> BrokerError {
    BrokerError::Unavailable(format!("rabbitmq: {err}"))
}

fn classify(err: lapin::Error) -> BrokerError {
    let text = err.to_string();
    if text.contains("inequivalent arg 'x-queue-type'") {
        BrokerError::Other(format!(
            "rabbitmq: a queue exists as another kind than [messaging] queues asks for ({text}): \
             set queues to the kind it is, or drain and delete the queue so Wharf declares it anew"
        ))
    } else if text.contains("PRECONDITION_FAILED") || text.contains("NOT_FOUND") {
        BrokerError::Other(format!("rabbitmq: {text}"))
    } else {
        unavailable(text)
    }
}

fn millis(time: SystemTime) -> u64 {
    time.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn long_string(text: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(text.as_bytes().to_vec()))
}

fn value_text(value: &AMQPValue) -> Option<String> {
    match value {
        AMQPValue::LongString(text) => Some(String::from_utf8_lossy(text.as_bytes()).into_owned()),
        AMQPValue::ShortString(text) => Some(text.as_str().to_string()),
        AMQPValue::LongLongInt(n) => Some(n.to_string()),
        AMQPValue::LongInt(n) => Some(n.to_string()),
        AMQPValue::LongUInt(n) => Some(n.to_string()),
        _ => None,
    }
}

fn header_text(properties: &BasicProperties, name: &str) -> Option<String> {
    properties
        .headers()
        .as_ref()?
        .inner()
        .get(name)
        .and_then(value_text)
}

/// The AMQP properties that carry `message` (with `extra` headers).
fn properties_of(message: &Message, extra: &[(&str, AMQPValue)]) -> BasicProperties {
    let mut headers = FieldTable::default();
    headers.insert(header::TOPIC.into(), long_string(&message.topic));
    headers.insert(
        header::PUBLISHED.into(),
        AMQPValue::LongLongInt(millis(message.published_at) as i64),
    );
    if !message.metadata.is_empty() {
        headers.insert(
            header::METADATA.into(),
            long_string(&message.metadata_json()),
        );
    }
    for (name, value) in extra {
        headers.insert((*name).into(), value.clone());
    }
    let mut properties = BasicProperties::default()
        .with_message_id(message.id.as_str().into())
        .with_delivery_mode(2)
        .with_timestamp(millis(message.published_at) / 1000)
        .with_headers(headers);
    if let Some(content_type) = &message.content_type {
        properties = properties.with_content_type(content_type.as_str().into());
    }
    if let Some(reply_to) = &message.reply_to {
        properties = properties.with_reply_to(reply_to.as_str().into());
    }
    properties
}

/// The message an AMQP delivery carries (a message published by a
/// non-Wharf client gets a fresh id and its routing key as topic).
fn message_of(routing_key: &str, properties: &BasicProperties, body: Vec<u8>) -> Message {
    Message {
        id: properties
            .message_id()
            .as_ref()
            .map(|id| id.as_str().to_string())
            .unwrap_or_else(new_message_id),
        topic: header_text(properties, header::TOPIC).unwrap_or_else(|| routing_key.to_string()),
        body: Bytes::from(body),
        content_type: properties
            .content_type()
            .as_ref()
            .map(|t| t.as_str().to_string()),
        metadata: header_text(properties, header::METADATA)
            .map(|text| Message::metadata_from_json(&text))
            .unwrap_or_default(),
        reply_to: properties
            .reply_to()
            .as_ref()
            .map(|r| r.as_str().to_string()),
        published_at: header_text(properties, header::PUBLISHED)
            .and_then(|ms| ms.parse::<u64>().ok())
            .map_or_else(SystemTime::now, |ms| {
                SystemTime::UNIX_EPOCH + Duration::from_millis(ms)
            }),
        key: None,
    }
}

/// Connects to `uri`, opens the confirmed publishing channel, and declares
/// the exchange and the queues of `groups`.
async fn open_link(
    mut uri: lapin::uri::AMQPUri,
    groups: &[(String, String)],
    queues: &QueueSettings,
    tls: OwnedTLSConfig,
) -> lapin::Result<(Connection, Channel)> {
    // RabbitMQ's default heartbeat is a minute: a node that stopped
    // answering kept consumers waiting on its silent connection for two.
    uri.query.heartbeat.get_or_insert(HEARTBEAT_SECS);
    let connection = Connection::connect_uri_with_config(
        uri,
        ConnectionProperties::default().with_connection_name("wharf".into()),
        tls,
        lapin::runtime::default_runtime()?,
    )
    .await?;
    let publisher = connection.create_channel().await?;
    publisher
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    publisher
        .exchange_declare(
            EXCHANGE.into(),
            ExchangeKind::Topic,
            ExchangeDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await?;
    for (group, binding_key) in groups {
        declare_group_queue(&publisher, group, binding_key, queues).await?;
    }
    Ok((connection, publisher))
}

/// The TLS settings lapin takes, from the checked PEM files.
fn lapin_tls(pem: TlsPem) -> Result<OwnedTLSConfig> {
    let cert_chain = pem
        .ca
        .map(String::from_utf8)
        .transpose()
        .map_err(|_| anyhow::anyhow!("tls.ca: the PEM bundle is not text"))?;
    Ok(OwnedTLSConfig {
        identity: pem
            .identity
            .map(|(pem, key)| OwnedIdentity::PKCS8 { pem, key }),
        cert_chain,
    })
}

/// Splits `list`, comma-separated AMQP URLs (the nodes of one RabbitMQ
/// cluster), checking each; an error names the bad entry without its
/// credentials.
pub fn parse_nodes(list: &str) -> Result<Vec<String>, String> {
    let urls: Vec<String> = list
        .split(',')
        .map(str::trim)
        .filter(|entry| !entry.is_empty())
        .map(|entry| {
            entry
                .parse::<lapin::uri::AMQPUri>()
                .map(|_| entry.to_string())
                .map_err(|why| format!("{} is not an AMQP URL: {why}", redact(entry)))
        })
        .collect::<Result<_, _>>()?;
    if urls.is_empty() {
        return Err("no RabbitMQ node given".into());
    }
    Ok(urls)
}

/// What kind of queue RabbitMQ keeps a group's messages in (`queues` under
/// `[messaging]`, `--queue-type`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum QueueType {
    /// Quorum queues when more than one node is listed, classic ones on a
    /// single address: on one node a quorum queue keeps no more copies, and
    /// RabbitMQ can leave it without a leader after a crash
    /// (rabbitmq-server#10070).
    #[default]
    Auto,
    /// Replicated by Raft on a majority of the cluster's nodes: a message
    /// confirmed survives the loss of a minority of them.
    Quorum,
    /// Kept on the one node that declared it: lost with that node's disk,
    /// unavailable while it is down; slightly faster.
    Classic,
}

impl std::str::FromStr for QueueType {
    type Err = String;

    fn from_str(text: &str) -> Result<QueueType, String> {
        match text.trim() {
            "auto" => Ok(QueueType::Auto),
            "quorum" => Ok(QueueType::Quorum),
            "classic" => Ok(QueueType::Classic),
            other => Err(format!(
                "queue type {other:?}: use \"auto\" (the default), \"quorum\" (replicated) or \"classic\" (one node)"
            )),
        }
    }
}

impl std::fmt::Display for QueueType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            QueueType::Auto => "auto",
            QueueType::Quorum => "quorum",
            QueueType::Classic => "classic",
        })
    }
}

impl QueueType {
    /// The kind used on a RabbitMQ reached through `nodes` addresses.
    pub fn resolve(self, nodes: usize) -> QueueType {
        match self {
            QueueType::Auto if nodes > 1 => QueueType::Quorum,
            QueueType::Auto => QueueType::Classic,
            kind => kind,
        }
    }

    /// The declare arguments that make a queue of this kind.
    fn arguments(self) -> FieldTable {
        let mut arguments = FieldTable::default();
        if self == QueueType::Quorum {
            arguments.insert("x-queue-type".into(), long_string("quorum"));
        }
        arguments
    }
}

/// What the broker's queues are: their kind and bounds.
#[derive(Debug, Clone, Copy)]
struct QueueSettings {
    limits: MessagingLimits,
    kind: QueueType,
}

/// The queue of group `group`.
fn group_queue(group: &str) -> String {
    format!("wharf.{group}")
}

/// The smallest delay on the ladder at least `delay`.
fn ladder_delay(delay: Duration) -> u64 {
    let wanted = delay.as_millis() as u64;
    DELAY_LADDER_MS
        .iter()
        .copied()
        .find(|&step| step >= wanted)
        .unwrap_or(DELAY_LADDER_MS[DELAY_LADDER_MS.len() - 1])
}

/// The live connection and its publishing channel.
struct Link {
    connection: Arc<Connection>,
    publisher: Channel,
    /// When `publisher` was opened.
    opened: std::time::Instant,
}

impl Link {
    /// Whether this link is (still) on `connection`.
    fn is_on(&self, connection: &Arc<Connection>) -> bool {
        Arc::ptr_eq(&self.connection, connection)
    }
}

/// The RabbitMQ broker.
pub struct RabbitBroker {
    /// The cluster's nodes, as configured.
    urls: Vec<String>,
    /// The node tried first: the one that last answered.
    preferred: std::sync::atomic::AtomicUsize,
    /// Where connections' I/O runs: the runtime the broker was created on,
    /// not whichever server thread first needed a connection.
    runtime: tokio::runtime::Handle,
    link: tokio::sync::Mutex<Option<Link>>,
    last_attempt: Mutex<Option<Instant>>,
    /// What kind of queues, and their bounds.
    queues: QueueSettings,
    /// What `amqps://` connections trust and present (empty: the system's
    /// roots, no client certificate). Never logged: it holds the key.
    tls: OwnedTLSConfig,
    /// Every group this host has asked to join, with its binding key: their
    /// queues are declared on each new connection before anything is
    /// published, so a message published while a trigger is still
    /// (re)joining has a queue to wait in (the exchange drops a message no
    /// queue is bound for).
    groups: Mutex<HashMap<String, String>>,
    /// Owners this host has read or recorded: an owner never changes
    /// until its group is deleted, so re-joining after a node is lost
    /// needs no answer from the owner queue (a classic queue, which lives
    /// on one node).
    owners: Mutex<HashMap<String, String>>,
    shown_url: String,
}

impl RabbitBroker {
    /// The owner of `group` this host already knows.
    fn known_owner(&self, group: &str) -> Option<String> {
        self.owners
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(group)
            .cloned()
    }

    /// A broker on the RabbitMQ node(s) in `list` (comma-separated AMQP
    /// URLs, tried in turn), group queues of `kind` bounded by `limits`. Connects on first use (and again after a failure): a host
    /// whose RabbitMQ is down at start still starts. Must be called inside a
    /// Tokio runtime, which the connections then use.
    pub fn connect(
        list: &str,
        limits: MessagingLimits,
        kind: QueueType,
        tls: &BackendTls,
    ) -> Result<Arc<RabbitBroker>> {
        let urls = parse_nodes(list).map_err(anyhow::Error::msg)?;
        let kind = kind.resolve(urls.len());
        let mut secure = false;
        for url in &urls {
            secure |= check_backend_url(url, "amqps:", tls)?;
        }
        let tls = if secure {
            ensure_crypto_provider();
            lapin_tls(tls.pem()?)?
        } else {
            OwnedTLSConfig::default()
        };
        Ok(Arc::new(RabbitBroker {
            shown_url: urls
                .iter()
                .map(|url| redact(url))
                .collect::<Vec<_>>()
                .join(","),
            urls,
            preferred: std::sync::atomic::AtomicUsize::new(0),
            runtime: tokio::runtime::Handle::current(),
            link: tokio::sync::Mutex::new(None),
            last_attempt: Mutex::new(None),
            queues: QueueSettings { limits, kind },
            tls,
            groups: Mutex::new(HashMap::new()),
            owners: Mutex::new(HashMap::new()),
        }))
    }

    /// The live connection, connecting first if there is none (at most once
    /// per [`RECONNECT_EVERY`]).
    async fn link(&self) -> BrokerResult<(Arc<Connection>, Channel)> {
        let mut link = self.link.lock().await;
        if let Some(current) = link.as_ref()
            && current.connection.status().connected()
            && current.publisher.status().connected()
        {
            return Ok((current.connection.clone(), current.publisher.clone()));
        }
        *link = None;
        // At most one attempt per RECONNECT_EVERY: a caller arriving sooner
        // waits for the next one (holding the lock, so callers queue behind
        // a single attempt) rather than failing while the broker may
        // already be back.
        let previous = *self.last_attempt.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(wait) = previous.and_then(|at| RECONNECT_EVERY.checked_sub(at.elapsed())) {
            tokio::time::sleep(wait).await;
        }
        *self.last_attempt.lock().unwrap_or_else(|e| e.into_inner()) = Some(Instant::now());
        let groups: Vec<(String, String)> = self
            .groups
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(group, key)| (group.clone(), key.clone()))
            .collect();
        // Each node in turn, from the one that last answered: a node that
        // is down costs one refused connection, a silent one its timeout.
        let first = self.preferred.load(std::sync::atomic::Ordering::Relaxed);
        let mut failures = Vec::new();
        for offset in 0..self.urls.len() {
            let index = (first + offset) % self.urls.len();
            let url = self.urls[index].clone();
            let shown = redact(&url);
            // Checked when the broker was configured (`parse_nodes`).
            let uri = match url.parse::<lapin::uri::AMQPUri>() {
                Ok(uri) => uri,
                Err(err) => {
                    failures.push(format!("{shown}: {err}"));
                    continue;
                }
            };
            let (groups, queues, tls) = (groups.clone(), self.queues, self.tls.clone());
            let connecting = self
                .runtime
                .spawn(async move { open_link(uri, &groups, &queues, tls).await });
            match tokio::time::timeout(CONNECT_TIMEOUT, connecting).await {
                Ok(Ok(Ok((connection, publisher)))) => {
                    self.preferred
                        .store(index, std::sync::atomic::Ordering::Relaxed);
                    let connection = Arc::new(connection);
                    *link = Some(Link {
                        connection: connection.clone(),
                        publisher: publisher.clone(),
                        opened: std::time::Instant::now(),
                    });
                    return Ok((connection, publisher));
                }
                Ok(Ok(Err(err))) => failures.push(format!("{shown}: {err}")),
                Ok(Err(err)) => failures.push(format!("{shown}: {err}")),
                Err(_) => failures.push(format!("{shown}: timed out")),
            }
        }
        Err(unavailable(format!(
            "connecting to RabbitMQ: {}",
            failures.join("; ")
        )))
    }

    /// Drops the link if it is still `connection`: the next call connects
    /// anew, from the next node on.
    async fn forget_link(&self, connection: &Arc<Connection>) {
        let mut link = self.link.lock().await;
        if link
            .as_ref()
            .is_some_and(|current| current.is_on(connection))
        {
            *link = None;
            let next =
                (self.preferred.load(std::sync::atomic::Ordering::Relaxed) + 1) % self.urls.len();
            self.preferred
                .store(next, std::sync::atomic::Ordering::Relaxed);
        }
    }

    /// Gives the link a new publishing channel, if it is still on
    /// `connection` and its channel is older than [`RENEW_EVERY`].
    /// RabbitMQ 3.10 can leave a channel that published to a quorum queue
    /// while its leader changed refusing every later publish to it (a
    /// negative confirm, as for a full queue) for good; a channel opened
    /// after the change is served normally. Seen in the node-loss test: more
    /// than five minutes of refusals on the old channel, one to three with
    /// renewal.
    async fn renew_publisher(&self, connection: &Arc<Connection>) {
        let mut link = self.link.lock().await;
        let Some(current) = link
            .as_mut()
            .filter(|current| current.is_on(connection) && current.opened.elapsed() >= RENEW_EVERY)
        else {
            return;
        };
        let renewed = async {
            let channel = current.connection.create_channel().await?;
            channel
                .confirm_select(ConfirmSelectOptions::default())
                .await?;
            lapin::Result::Ok(channel)
        };
        // Bounded: callers queue behind the link's lock.
        match tokio::time::timeout(CONNECT_TIMEOUT, renewed).await {
            Ok(Ok(channel)) => {
                let old = std::mem::replace(&mut current.publisher, channel);
                current.opened = std::time::Instant::now();
                self.runtime.spawn(async move {
                    let _ = old.close(200, "replaced".into()).await;
                });
            }
            // The connection is failing: the next call reconnects.
            Ok(Err(_)) | Err(_) => *link = None,
        }
    }

    async fn inbox_consumer(&self, queue: &str) -> BrokerResult<lapin::Consumer> {
        let (connection, _) = self.link().await?;
        let channel = connection.create_channel().await.map_err(classify)?;
        channel
            .queue_declare(
                queue.into(),
                QueueDeclareOptions {
                    exclusive: true,
                    auto_delete: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .map_err(classify)?;
        channel
            .basic_consume(
                queue.into(),
                "wharf-inbox".into(),
                BasicConsumeOptions {
                    no_ack: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .map_err(classify)
    }
}

impl MessageBroker for Arc<RabbitBroker> {
    type Consumer = RabbitConsumer;

    fn kind(&self) -> &'static str {
        "rabbitmq"
    }

    /// Whether the broker is connected now.
    fn status(&self) -> BrokerStatus {
        let up = self
            .link
            .try_lock()
            .map(|link| {
                link.as_ref()
                    .is_some_and(|link| link.connection.status().connected())
            })
            // Someone is using or (re)connecting the link right now.
            .unwrap_or(true);
        BrokerStatus {
            kind: "rabbitmq",
            up,
            detail: format!(
                "{}: {}",
                self.shown_url,
                if up { "connected" } else { "disconnected" }
            ),
        }
    }

    /// Publishes `message` to the exchange and waits for the confirm.
    async fn publish(&self, message: Message) -> BrokerResult<()> {
        let (connection, channel) = self.link().await?;
        let properties = properties_of(&message, &[]);
        let published = publish_confirmed(
            &channel,
            EXCHANGE,
            &message.topic,
            &message.body,
            properties,
        );
        match tokio::time::timeout(CONFIRM_TIMEOUT, published).await {
            Ok(Err(BrokerError::Full(why))) => {
                self.renew_publisher(&connection).await;
                Err(BrokerError::Full(why))
            }
            Ok(Err(BrokerError::Unavailable(why))) => {
                self.forget_link(&connection).await;
                Err(BrokerError::Unavailable(why))
            }
            Ok(result) => result,
            Err(_) => {
                self.forget_link(&connection).await;
                Err(unavailable(format!(
                    "no confirm within {CONFIRM_TIMEOUT:?}; reconnecting"
                )))
            }
        }
    }

    /// Declares the group's queue and binding and consumes it.
    async fn subscribe(&self, subscription: &Subscription) -> BrokerResult<RabbitConsumer> {
        let binding_key = subscription.pattern.to_amqp();
        self.groups
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(subscription.group.clone(), binding_key.clone());
        let (connection, _) = self.link().await?;
        let channel = connection.create_channel().await.map_err(classify)?;
        let queue = declare_group_queue(&channel, &subscription.group, &binding_key, &self.queues)
            .await
            .map_err(classify)?;
        let prefetch = u16::try_from(subscription.prefetch.max(1)).unwrap_or(u16::MAX);
        channel
            .basic_qos(prefetch, BasicQosOptions::default())
            .await
            .map_err(classify)?;
        let consumer = channel
            .basic_consume(
                queue.as_str().into(),
                ShortString::from(format!("wharf-{}", new_message_id())),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(classify)?;
        Ok(RabbitConsumer {
            consumer,
            channel: Arc::new(ChannelGuard(channel)),
            group: subscription.group.clone(),
            queues: self.queues,
        })
    }

    /// Deletes the group's queue and its dead-letter queue (its retry
    /// queues expire on their own).
    async fn delete_group(&self, group: &str) -> BrokerResult<bool> {
        self.groups
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(group);
        self.owners
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(group);
        let (connection, _) = self.link().await?;
        let queue = group_queue(group);
        // A passive declare that fails closes its channel: a channel of its own.
        let probe = connection.create_channel().await.map_err(classify)?;
        let existed = probe
            .queue_declare(
                queue.as_str().into(),
                QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .is_ok();
        let _ = probe.close(200, "done".into()).await;
        let channel = connection.create_channel().await.map_err(classify)?;
        for name in [queue, dead_queue(group), owner_queue(group)] {
            channel
                .queue_delete(name.as_str().into(), QueueDeleteOptions::default())
                .await
                .map_err(classify)?;
        }
        let _ = channel.close(200, "done".into()).await;
        Ok(existed)
    }

    /// Records `service` as the group's owner unless it has one; the owner.
    async fn claim_group(&self, group: &str, service: &str) -> BrokerResult<String> {
        if let Some(owner) = self.known_owner(group) {
            return Ok(owner);
        }
        let (connection, _) = self.link().await?;
        let channel = connection.create_channel().await.map_err(classify)?;
        let answer = claim_on(&channel, group, service).await;
        let _ = channel.close(200, "done".into()).await;
        if let Ok(owner) = &answer {
            self.owners
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(group.to_string(), owner.clone());
        }
        answer
    }

    /// How many dead letters the group has (a passive declare's count).
    async fn count_dead_letters(&self, group: &str) -> BrokerResult<u64> {
        let (connection, _) = self.link().await?;
        // A passive declare of a missing queue closes its channel.
        let channel = connection.create_channel().await.map_err(classify)?;
        let declared = channel
            .queue_declare(
                dead_queue(group).as_str().into(),
                QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await;
        let _ = channel.close(200, "done".into()).await;
        Ok(declared.map_or(0, |queue| u64::from(queue.message_count())))
    }

    /// A page of the group's dead letters, oldest first: read and put back
    /// (unacknowledged, so RabbitMQ requeues them in place). A queue has no
    /// sequence numbers, so a position is an index from the head: reading
    /// after it walks past the earlier letters (holding none of them).
    async fn dead_letters(
        &self,
        group: &str,
        query: DeadLetterQuery,
    ) -> BrokerResult<Vec<DeadLetter>> {
        let (connection, _) = self.link().await?;
        let channel = connection.create_channel().await.map_err(classify)?;
        let queue = declare_dead_queue(&channel, group, &self.queues).await?;
        let mut letters = Vec::new();
        let mut last_tag = None;
        let first = query.after.map_or(0, |after| after.saturating_add(1));
        let mut index = 0u64;
        while letters.len() < query.limit {
            let got = channel
                .basic_get(queue.as_str().into(), BasicGetOptions { no_ack: false })
                .await
                .map_err(classify)?;
            let Some(got) = got else { break };
            let delivery = got.delivery;
            last_tag = Some(delivery.delivery_tag);
            let position = index;
            index += 1;
            if position < first {
                continue;
            }
            let attempts = header_text(&delivery.properties, header::ATTEMPT)
                .and_then(|n| n.parse().ok())
                .unwrap_or(0);
            let reason = header_text(&delivery.properties, header::REASON).unwrap_or_default();
            let dead_at = header_text(&delivery.properties, header::DEAD_AT)
                .and_then(|ms| ms.parse::<u64>().ok())
                .map_or(SystemTime::UNIX_EPOCH, |ms| {
                    SystemTime::UNIX_EPOCH + Duration::from_millis(ms)
                });
            let body_size = delivery.data.len() as u64;
            let mut body = delivery.data;
            body.truncate(query.body_limit);
            letters.push(DeadLetter {
                group: group.to_string(),
                message: message_of(delivery.routing_key.as_str(), &delivery.properties, body),
                body_size,
                position,
                attempts,
                reason,
                dead_at,
            });
        }
        if let Some(tag) = last_tag {
            channel
                .basic_nack(
                    tag,
                    BasicNackOptions {
                        multiple: true,
                        requeue: true,
                    },
                )
                .await
                .map_err(classify)?;
        }
        let _ = channel.close(200, "done".into()).await;
        Ok(letters)
    }

    /// Sends a reply to a requester's inbox (on any host).
    async fn send_reply(&self, reply_to: &str, message: Message) -> BrokerResult<()> {
        let (_, channel) = self.link().await?;
        let properties = properties_of(&message, &[(header::INBOX, long_string(reply_to))]);
        publish_confirmed(
            &channel,
            "",
            inbox_queue(reply_to),
            &message.body,
            properties,
        )
        .await
    }

    /// Delivers replies sent to this host's inboxes from any host, for as
    /// long as the broker lives: consumes the host's exclusive inbox queue,
    /// declared again after every reconnect.
    fn listen_for_replies(&self, inboxes: Arc<Inboxes>) {
        let broker = Arc::downgrade(self);
        tokio::spawn(async move {
            let queue = inbox_queue(inboxes.prefix()).to_string();
            loop {
                let Some(this) = broker.upgrade() else { return };
                let consumer = this.inbox_consumer(&queue).await;
                drop(this);
                if let Ok(mut consumer) = consumer {
                    while let Some(Ok(delivery)) = consumer.next().await {
                        let address = header_text(&delivery.properties, header::INBOX);
                        let message = message_of(
                            delivery.routing_key.as_str(),
                            &delivery.properties,
                            delivery.data,
                        );
                        if let Some(address) = address {
                            inboxes.deliver(&address, message);
                        }
                    }
                }
                tokio::time::sleep(RECONNECT_EVERY).await;
            }
        });
    }
}

/// The queue of the host an inbox address belongs to: its first two tokens
/// (`_inbox.HOST`).
fn inbox_queue(address: &str) -> &str {
    let mut dots = address.match_indices('.').map(|(at, _)| at);
    match (dots.next(), dots.next()) {
        (Some(_), Some(second)) => &address[..second],
        _ => address.trim_end_matches('.'),
    }
}

/// The queue of `group`'s dead letters.
fn dead_queue(group: &str) -> String {
    format!("wharf.dead.{group}")
}

/// The queue holding `group`'s owner.
fn owner_queue(group: &str) -> String {
    format!("wharf.owner.{group}")
}

/// Claims `group` for `service` on `channel`; the owner.
async fn claim_on(channel: &Channel, group: &str, service: &str) -> BrokerResult<String> {
    let queue = owner_queue(group);
    // Classic: reading the owner puts its message back, which a quorum
    // queue counts as a delivery and, past its delivery limit, drops.
    declare_bounded_queue(
        channel,
        &queue,
        QueueType::Classic,
        1,
        None,
        "reject-publish",
    )
    .await
    .map_err(classify)?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .map_err(classify)?;
    let claimed = publish_confirmed(
        channel,
        "",
        &queue,
        service.as_bytes(),
        BasicProperties::default().with_delivery_mode(2),
    )
    .await;
    match claimed {
        Ok(()) => return Ok(service.to_string()),
        Err(BrokerError::Full(_)) => {}
        Err(err) => return Err(err),
    }
    let got = channel
        .basic_get(queue.as_str().into(), BasicGetOptions { no_ack: false })
        .await
        .map_err(classify)?;
    let Some(got) = got else {
        return Err(BrokerError::Other(format!(
            "rabbitmq: the owner of group {group} could be neither written nor read"
        )));
    };
    let owner = String::from_utf8_lossy(&got.delivery.data).into_owned();
    channel
        .basic_nack(
            got.delivery.delivery_tag,
            BasicNackOptions {
                multiple: false,
                requeue: true,
            },
        )
        .await
        .map_err(classify)?;
    Ok(owner)
}

/// Declares `group`'s durable queue, bounded by `limits`, and binds it to
/// the exchange with `binding_key`; returns its name.
async fn declare_group_queue(
    channel: &Channel,
    group: &str,
    binding_key: &str,
    queues: &QueueSettings,
) -> lapin::Result<String> {
    let queue = group_queue(group);
    declare_bounded_queue(
        channel,
        &queue,
        queues.kind,
        bound(queues.limits.max_pending),
        Some(bound(queues.limits.max_group_bytes)),
        "reject-publish",
    )
    .await?;
    channel
        .queue_bind(
            queue.as_str().into(),
            EXCHANGE.into(),
            binding_key.into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
    Ok(queue)
}

async fn declare_dead_queue(
    channel: &Channel,
    group: &str,
    queues: &QueueSettings,
) -> BrokerResult<String> {
    let queue = dead_queue(group);
    declare_bounded_queue(
        channel,
        &queue,
        queues.kind,
        bound(queues.limits.max_dead_letters),
        Some(bound(queues.limits.max_dead_bytes)),
        "drop-head",
    )
    .await
    .map_err(classify)?;
    Ok(queue)
}

/// A bound as a queue argument takes it.
fn bound(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

/// Declares the durable queue `queue` of `kind`, holding at most
/// `max_length` messages and `max_bytes` bytes of bodies; `overflow` is
/// what RabbitMQ does past that (`reject-publish`: refuse new ones;
/// `drop-head`: drop the oldest).
async fn declare_bounded_queue(
    channel: &Channel,
    queue: &str,
    kind: QueueType,
    max_length: i64,
    max_bytes: Option<i64>,
    overflow: &str,
) -> lapin::Result<()> {
    let mut arguments = kind.arguments();
    arguments.insert("x-max-length".into(), AMQPValue::LongLongInt(max_length));
    if let Some(max_bytes) = max_bytes {
        arguments.insert(
            "x-max-length-bytes".into(),
            AMQPValue::LongLongInt(max_bytes),
        );
    }
    arguments.insert("x-overflow".into(), long_string(overflow));
    channel
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            arguments,
        )
        .await?;
    Ok(())
}

/// Publishes and waits for the broker's confirm; a negative one means the
/// queue is full.
async fn publish_confirmed(
    channel: &Channel,
    exchange: &str,
    routing_key: &str,
    body: &[u8],
    properties: BasicProperties,
) -> BrokerResult<()> {
    let confirm = channel
        .basic_publish(
            exchange.into(),
            routing_key.into(),
            BasicPublishOptions::default(),
            body,
            properties,
        )
        .await
        .map_err(classify)?
        .await
        .map_err(classify)?;
    match confirm {
        Confirmation::Nack(_) => Err(BrokerError::Full(
            "rabbitmq refused the message: a queue it is routed to is full (or lost its node)"
                .into(),
        )),
        Confirmation::Ack(_) | Confirmation::NotRequested => Ok(()),
    }
}

/// A consumer's channel, closed when the consumer and every delivery it
/// handed out are gone: RabbitMQ then requeues what was fetched but never
/// settled, at once, and acknowledgements of deliveries still being
/// handled after their consumer stopped still reach it.
struct ChannelGuard(Channel);

impl Drop for ChannelGuard {
    fn drop(&mut self) {
        let channel = self.0.clone();
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                let _ = channel.close(200, "consumer stopped".into()).await;
            });
        }
    }
}

/// A consumer of one group on RabbitMQ.
pub struct RabbitConsumer {
    consumer: lapin::Consumer,
    channel: Arc<ChannelGuard>,
    group: String,
    /// What its dead-letter queue is declared as.
    queues: QueueSettings,
}

impl BrokerConsumer for RabbitConsumer {
    type Delivery = RabbitDelivery;

    /// The next delivery; an error means the consumer must be recreated.
    async fn next(&mut self) -> BrokerResult<RabbitDelivery> {
        match self.consumer.next().await {
            Some(Ok(delivery)) => {
                let counted = header_text(&delivery.properties, header::ATTEMPT)
                    .and_then(|n| n.parse::<u32>().ok())
                    .unwrap_or(1);
                let attempt = counted + u32::from(delivery.redelivered);
                let message = message_of(
                    delivery.routing_key.as_str(),
                    &delivery.properties,
                    delivery.data.clone(),
                );
                Ok(RabbitDelivery {
                    raw: delivery,
                    received: Received { message, attempt },
                    channel: self.channel.clone(),
                    group: self.group.clone(),
                    queues: self.queues,
                })
            }
            Some(Err(err)) => Err(classify(err)),
            None => Err(unavailable("the consumer was cancelled")),
        }
    }
}

/// One delivery from RabbitMQ.
pub struct RabbitDelivery {
    raw: AmqpDelivery,
    received: Received,
    channel: Arc<ChannelGuard>,
    group: String,
    queues: QueueSettings,
}

impl BrokerDelivery for RabbitDelivery {
    /// The message; the attempt is Wharf's count, plus one if RabbitMQ
    /// redelivered it.
    fn received(&self) -> &Received {
        &self.received
    }

    /// Acknowledges the message.
    async fn ack(self) -> BrokerResult<()> {
        self.raw
            .acker
            .ack(BasicAckOptions::default())
            .await
            .map(drop)
            .map_err(classify)
    }

    /// Publishes the next attempt to the delay queue, then acknowledges
    /// this one (a crash in between delivers it twice, never zero times).
    async fn retry(self, delay: Duration) -> BrokerResult<()> {
        let delay_ms = ladder_delay(delay);
        let target = group_queue(&self.group);
        let queue = format!("wharf.retry.{}.{delay_ms}", self.group);
        let mut arguments = self.queues.kind.arguments();
        if self.queues.kind == QueueType::Quorum {
            // The move back into the group's queue is confirmed, so a
            // node lost in between loses no retry; RabbitMQ needs the
            // source queue to refuse rather than drop for that.
            arguments.insert(
                "x-dead-letter-strategy".into(),
                long_string("at-least-once"),
            );
            arguments.insert("x-overflow".into(), long_string("reject-publish"));
        }
        arguments.insert(
            "x-message-ttl".into(),
            AMQPValue::LongLongInt(delay_ms as i64),
        );
        arguments.insert("x-dead-letter-exchange".into(), long_string(""));
        arguments.insert("x-dead-letter-routing-key".into(), long_string(&target));
        // Unused delay queues go away (long after their messages expired).
        arguments.insert(
            "x-expires".into(),
            AMQPValue::LongLongInt((delay_ms + 600_000) as i64),
        );
        let channel = &self.channel.0;
        channel
            .queue_declare(
                queue.as_str().into(),
                QueueDeclareOptions {
                    durable: true,
                    ..Default::default()
                },
                arguments,
            )
            .await
            .map_err(classify)?;
        let next_attempt = (self.received.attempt + 1) as i64;
        let properties = properties_of(
            &self.received.message,
            &[(header::ATTEMPT, AMQPValue::LongLongInt(next_attempt))],
        );
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(classify)?;
        publish_confirmed(channel, "", &queue, &self.received.message.body, properties).await?;
        self.ack().await
    }

    /// Copies the message to the group's dead-letter queue, then
    /// acknowledges it. The queue drops its oldest letters itself: 0
    /// pruned here.
    async fn dead_letter(self, reason: String) -> BrokerResult<u64> {
        let reason = reason.as_str();
        let channel = &self.channel.0;
        let queue = declare_dead_queue(channel, &self.group, &self.queues).await?;
        let properties = properties_of(
            &self.received.message,
            &[
                (
                    header::ATTEMPT,
                    AMQPValue::LongLongInt(self.received.attempt as i64),
                ),
                (header::REASON, long_string(reason)),
                (
                    header::DEAD_AT,
                    AMQPValue::LongLongInt(millis(SystemTime::now()) as i64),
                ),
            ],
        );
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(classify)?;
        publish_confirmed(channel, "", &queue, &self.received.message.body, properties).await?;
        self.ack().await?;
        Ok(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_round_up_to_the_ladder() {
        assert_eq!(ladder_delay(Duration::ZERO), 100);
        assert_eq!(ladder_delay(Duration::from_millis(101)), 250);
        assert_eq!(ladder_delay(Duration::from_secs(3)), 5_000);
        assert_eq!(ladder_delay(Duration::from_secs(86_400)), 3_600_000);
    }

    #[test]
    fn inbox_queues_and_redaction() {
        assert_eq!(inbox_queue("_inbox.abc.17"), "_inbox.abc");
        assert_eq!(inbox_queue("_inbox.abc."), "_inbox.abc");
        assert_eq!(
            redact("amqp://guest:secret@broker.example/%2f"),
            "amqp://guest:***@broker.example/%2f"
        );
        assert_eq!(redact("amqp://localhost"), "amqp://localhost");
    }
}
