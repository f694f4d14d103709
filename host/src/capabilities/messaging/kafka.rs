//! The Apache Kafka broker (`kafka://HOST:PORT[,HOST:PORT…]`, `kafkas://`
//! over TLS), through librdkafka.
//!
//! Kafka's model, mapped:
//!
//! - A Wharf topic is the Kafka topic of the same name, created on first
//!   use with `[messaging] partitions` partitions and `replicas` copies.
//!   Each record's payload is the message body; its headers are the
//!   message's metadata, `content-type`, and Wharf's own `wharf-*` fields
//!   (id, publication time, reply address, attempt). A record from a
//!   producer that is not Wharf is a message too: its headers are its
//!   metadata, its key is the `message-key` metadata.
//! - The record key chooses the partition: the publisher's `message-key`
//!   metadata, else the publishing service's name, so one publisher's
//!   messages keep their order (as with every broker) while different
//!   publishers spread over the partitions.
//! - A trigger group is a Kafka consumer group (same name). Offsets are
//!   committed only for settled deliveries, each partition up to its oldest
//!   delivery still in flight ([`offsets`]): a crash or a rebalance
//!   redelivers, never skips. A new group starts at the oldest record its
//!   topics still hold.
//! - Patterns with wildcards are regex subscriptions (`orders.*` is
//!   `^orders\.[^.]+$`), re-checked against the pattern for every record;
//!   topics starting with `_` (Kafka's and Wharf's own) never match.
//! - A retry is a copy of the record in the group's topic
//!   `_wharf.retry.GROUP`, carrying its attempt and when it is due; the
//!   original is settled at once, so a failing message never blocks its
//!   partition. The group consumes its retry topic too, holding a record
//!   until it is due. Dead letters are records of `_wharf.dead.GROUP`,
//!   read back by offset for the admin endpoint.
//! - Group owners are records of `_wharf.owners` (key: the group); the
//!   first claim in the log wins, on every host. Replies to requests go
//!   through `_wharf.replies`, which every host reads from its end.
//! - Publishing is idempotent with `acks=all`: a publish returns once every
//!   in-sync replica has the record.
//!
//! Kafka cannot refuse a publish because a group has too much waiting: the
//! topics' retention bounds what they keep, so `max_pending`, `max_bytes`
//! and the dead-letter bounds do not apply (publisher quotas do).

mod offsets;
mod records;
mod settings;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, SystemTime};

use anyhow::{Context as _, Result};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::ClientContext;
use rdkafka::config::{ClientConfig, RDKafkaLogLevel};
use rdkafka::consumer::{BaseConsumer, Consumer as _, ConsumerContext, Rebalance, StreamConsumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, Message as _, OwnedHeaders, OwnedMessage};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer as _};
use rdkafka::{Offset, TopicPartitionList};
use tokio::sync::mpsc;

use crate::capabilities::messaging::broker::{
    BrokerConsumer, BrokerDelivery, BrokerError, BrokerResult, BrokerStatus, DeadLetter,
    DeadLetterQuery, MessageBroker, Received, Subscription,
};
use crate::capabilities::messaging::inbox::Inboxes;
use crate::capabilities::messaging::message::Message;
use crate::capabilities::messaging::topic::TopicPattern;
use crate::capabilities::nats::Replicas;
use offsets::{OffsetTracker, Ticket};
use records::{
    from_millis, header, header_number, header_text, headers_of, message_of, millis,
    subscription_of,
};
pub use settings::KafkaSettings;
use settings::base_config;

/// Prefix of each group's retry topic.
const RETRY_PREFIX: &str = "_wharf.retry.";
/// Prefix of each group's dead-letter topic.
const DEAD_PREFIX: &str = "_wharf.dead.";
/// The topic of group owners.
const OWNERS_TOPIC: &str = "_wharf.owners";
/// The topic of marks before which a deleted group's dead letters are gone.
const CLEARED_TOPIC: &str = "_wharf.cleared";
/// The topic replies to requests travel through.
const REPLIES_TOPIC: &str = "_wharf.replies";
/// The group id of consumers that only read assigned partitions (librdkafka
/// wants one): never joined, never committed to.
const READER_GROUP: &str = "_wharf.reader";
/// How long a blocking client call (metadata, offsets) may wait.
const CALL_TIMEOUT: Duration = Duration::from_secs(5);
/// How long an operation waits for brokers last seen unreachable to
/// answer (a busy broker drops connections and answers late).
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long an admin operation may take on the broker.
const ADMIN_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a publish may wait for the broker before it fails.
const PUBLISH_TIMEOUT: Duration = Duration::from_secs(30);
/// Partitions of each topic Wharf creates, unless configured.
pub const DEFAULT_PARTITIONS: u32 = 3;

fn retry_topic(group: &str) -> String {
    format!("{RETRY_PREFIX}{group}")
}

fn dead_topic(group: &str) -> String {
    format!("{DEAD_PREFIX}{group}")
}

/// Whether the brokers answered lately, shared by every client of one
/// broker.
#[derive(Default)]
struct Link {
    up: AtomicBool,
    /// Why the brokers refused Wharf's credentials (SASL) when it last
    /// signed in, if they did.
    refused: Mutex<Option<String>>,
    detail: Mutex<String>,
}

impl Link {
    fn set(&self, up: bool, detail: String) {
        self.up.store(up, Ordering::Relaxed);
        if up && let Ok(mut refused) = self.refused.lock() {
            *refused = None;
        }
        self.note(detail);
    }

    /// The brokers refused the credentials: down, and saying why until
    /// they accept them.
    fn refuse(&self, why: String) {
        self.set(false, why.clone());
        if let Ok(mut refused) = self.refused.lock() {
            *refused = Some(why);
        }
    }

    fn refused(&self) -> Option<String> {
        self.refused.lock().ok().and_then(|refused| refused.clone())
    }

    fn detail(&self) -> String {
        self.detail
            .lock()
            .map(|detail| detail.clone())
            .unwrap_or_default()
    }

    /// Changes what the status says, not whether the link is up.
    fn note(&self, detail: String) {
        if let Ok(mut current) = self.detail.lock() {
            *current = detail;
        }
    }
}

/// What librdkafka reports about a client: its log, and errors that say
/// the brokers are gone.
#[derive(Clone)]
struct LinkContext {
    link: Arc<Link>,
}

impl ClientContext for LinkContext {
    fn log(&self, level: RDKafkaLogLevel, facility: &str, line: &str) {
        match level {
            RDKafkaLogLevel::Emerg
            | RDKafkaLogLevel::Alert
            | RDKafkaLogLevel::Critical
            | RDKafkaLogLevel::Error => tracing::warn!(facility, "kafka: {line}"),
            _ => tracing::debug!(facility, "kafka: {line}"),
        }
    }

    fn error(&self, error: KafkaError, reason: &str) {
        match error.rdkafka_error_code() {
            Some(RDKafkaErrorCode::AllBrokersDown) => {
                self.link.set(false, format!("all brokers down: {reason}"));
            }
            Some(RDKafkaErrorCode::Authentication) => {
                tracing::warn!("kafka: the brokers refused Wharf's credentials: {reason}");
                self.link
                    .refuse(format!("the brokers refused the credentials: {reason}"));
            }
            _ => {}
        }
        tracing::debug!("kafka: {error}: {reason}");
    }
}

impl ConsumerContext for LinkContext {}

fn classify(err: &KafkaError) -> BrokerError {
    use RDKafkaErrorCode as Code;
    match err.rdkafka_error_code() {
        Some(Code::QueueFull) => BrokerError::Full(format!("kafka: {err}")),
        Some(
            Code::AllBrokersDown
            | Code::MessageTimedOut
            | Code::BrokerTransportFailure
            | Code::LeaderNotAvailable
            | Code::NotLeaderForPartition
            | Code::RequestTimedOut
            | Code::NotEnoughReplicas
            | Code::NotEnoughReplicasAfterAppend
            | Code::OperationTimedOut,
        ) => BrokerError::Unavailable(format!("kafka: {err}")),
        _ => BrokerError::Other(format!("kafka: {err}")),
    }
}

/// What every client of one broker shares.
struct Shared {
    config: ClientConfig,
    producer: FutureProducer<LinkContext>,
    admin: AdminClient<LinkContext>,
    link: Arc<Link>,
    partitions: u32,
    replicas: Replicas,
    /// Copies each new topic gets, once known.
    replication: tokio::sync::OnceCell<i32>,
    /// Topics known to exist.
    topics: Mutex<HashSet<String>>,
    /// The servers, for status lines.
    servers: String,
}

impl Shared {
    /// How many copies a new topic gets: the setting, with `auto` the
    /// number of brokers (at most three).
    async fn replication(&self) -> BrokerResult<i32> {
        self.replication
            .get_or_try_init(|| async {
                let brokers = match self.replicas {
                    Replicas::Exactly(n) => return Ok(n as i32),
                    Replicas::Auto => self.broker_count().await?,
                };
                Ok(Replicas::Auto.resolve(brokers) as i32)
            })
            .await
            .copied()
    }

    /// Ok if the brokers answered lately, or answer now (within
    /// [`PROBE_TIMEOUT`]): operations fail fast, and clearly, while the
    /// brokers cannot be reached, instead of waiting out librdkafka's
    /// retries.
    async fn reachable(&self) -> BrokerResult<()> {
        if self.link.up.load(Ordering::Relaxed) {
            return Ok(());
        }
        let producer = self.producer.clone();
        let probe = blocking(move || {
            producer
                .client()
                .fetch_metadata(None, PROBE_TIMEOUT)
                .map(|metadata| metadata.brokers().len())
                .map_err(|err| classify(&err))
        })
        .await;
        match probe {
            Ok(brokers) => {
                self.link.set(
                    true,
                    format!("connected to {} ({brokers} brokers)", self.servers),
                );
                Ok(())
            }
            Err(err) => Err(BrokerError::Unavailable(match self.link.refused() {
                Some(why) => format!("kafka: {}: {why}", self.servers),
                None => format!("kafka: {} cannot be reached ({err})", self.servers),
            })),
        }
    }

    async fn broker_count(&self) -> BrokerResult<usize> {
        let producer = self.producer.clone();
        let metadata = tokio::task::spawn_blocking(move || {
            producer.client().fetch_metadata(None, CALL_TIMEOUT)
        })
        .await
        .map_err(|err| BrokerError::Other(format!("kafka: {err}")))?
        .map_err(|err| classify(&err))?;
        Ok(metadata.brokers().len())
    }

    /// Creates `topic` with `partitions` partitions unless it exists.
    /// A broker that refuses to create topics (no permission) is left to
    /// refuse the records too, if the topic is really missing.
    async fn ensure_topic(
        &self,
        topic: &str,
        partitions: u32,
        retention_ms: i64,
    ) -> BrokerResult<()> {
        self.reachable().await?;
        if self
            .topics
            .lock()
            .is_ok_and(|topics| topics.contains(topic))
        {
            return Ok(());
        }
        let replication = self.replication().await?;
        let retention = retention_ms.to_string();
        let new = NewTopic::new(
            topic,
            i32::try_from(partitions).unwrap_or(1),
            TopicReplication::Fixed(replication),
        )
        .set("retention.ms", &retention);
        let options = AdminOptions::new().operation_timeout(Some(ADMIN_TIMEOUT));
        let results = self
            .admin
            .create_topics([&new], &options)
            .await
            .map_err(|err| classify(&err))?;
        for result in results {
            match result {
                Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                Err((
                    _,
                    code @ (RDKafkaErrorCode::TopicAuthorizationFailed
                    | RDKafkaErrorCode::ClusterAuthorizationFailed),
                )) => {
                    tracing::debug!(
                        topic,
                        "kafka: may not create the topic ({code}); using it as it is"
                    );
                }
                Err((_, code)) => {
                    return Err(classify(&KafkaError::AdminOp(code)));
                }
            }
        }
        if let Ok(mut topics) = self.topics.lock() {
            topics.insert(topic.to_string());
        }
        Ok(())
    }

    /// Sends one record and waits until the brokers have it.
    async fn send(
        &self,
        topic: &str,
        key: Option<&[u8]>,
        payload: &[u8],
        headers: OwnedHeaders,
    ) -> BrokerResult<(i32, i64)> {
        let mut record = FutureRecord::to(topic).payload(payload).headers(headers);
        if let Some(key) = key {
            record = record.key(key);
        }
        match self.producer.send(record, Duration::from_millis(100)).await {
            Ok(delivery) => {
                self.link
                    .set(true, format!("connected to {}", self.servers));
                Ok((delivery.partition, delivery.offset))
            }
            Err((err, _)) => Err(classify(&err)),
        }
    }

    /// Every record of partition 0 of `topic` from `start` (the oldest if
    /// `None`) up to `limit` of them, as far as the end it had when asked.
    /// Blocking.
    fn read(
        &self,
        topic: &str,
        start: Option<i64>,
        limit: usize,
    ) -> BrokerResult<Vec<OwnedMessage>> {
        let consumer: BaseConsumer = self
            .config
            .clone()
            // librdkafka assigns partitions only with a group id; this
            // consumer never joins the group nor commits.
            .set("group.id", READER_GROUP)
            .set("enable.auto.commit", "false")
            .set("enable.partition.eof", "false")
            .create()
            .map_err(|err| classify(&err))?;
        let (low, high) = match consumer.fetch_watermarks(topic, 0, CALL_TIMEOUT) {
            Ok(marks) => marks,
            Err(err)
                if err.rdkafka_error_code() == Some(RDKafkaErrorCode::UnknownTopicOrPartition) =>
            {
                return Ok(Vec::new());
            }
            Err(err) => return Err(classify(&err)),
        };
        let start = start.map_or(low, |start| start.max(low));
        if start >= high || limit == 0 {
            return Ok(Vec::new());
        }
        let wanted = usize::try_from(high - start)
            .unwrap_or(usize::MAX)
            .min(limit);
        let mut partitions = TopicPartitionList::new();
        partitions
            .add_partition_offset(topic, 0, Offset::Offset(start))
            .map_err(|err| classify(&err))?;
        consumer.assign(&partitions).map_err(|err| classify(&err))?;
        let deadline = std::time::Instant::now() + CALL_TIMEOUT;
        let mut records = Vec::with_capacity(wanted);
        while records.len() < wanted {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                return Err(BrokerError::Unavailable(format!(
                    "kafka: reading {topic} took longer than {}s",
                    CALL_TIMEOUT.as_secs()
                )));
            }
            match consumer.poll(left) {
                Some(Ok(record)) if record.offset() < high => records.push(record.detach()),
                Some(Ok(_)) => break,
                Some(Err(err)) => return Err(classify(&err)),
                None => {}
            }
        }
        Ok(records)
    }

    /// The oldest and next offsets of partition 0 of `topic`; (0, 0) for a
    /// topic that does not exist. Blocking.
    fn watermarks(&self, topic: &str) -> BrokerResult<(i64, i64)> {
        match self
            .producer
            .client()
            .fetch_watermarks(topic, 0, CALL_TIMEOUT)
        {
            Ok(marks) => Ok(marks),
            Err(err)
                if err.rdkafka_error_code() == Some(RDKafkaErrorCode::UnknownTopicOrPartition) =>
            {
                Ok((0, 0))
            }
            Err(err) => Err(classify(&err)),
        }
    }

    /// The offset of `group`'s dead-letter topic before which letters were
    /// cleared by deleting the group (its newest mark). Blocking.
    fn cleared(&self, group: &str) -> BrokerResult<i64> {
        let mut cleared = 0;
        for record in self.read(CLEARED_TOPIC, None, usize::MAX)? {
            if record.key() == Some(group.as_bytes())
                && let Some(mark) = record
                    .payload()
                    .and_then(|p| std::str::from_utf8(p).ok())
                    .and_then(|text| text.parse::<i64>().ok())
            {
                cleared = mark;
            }
        }
        Ok(cleared)
    }

    /// The owner of every group, from the owners topic: the first claim
    /// after the group's last deletion. Blocking.
    fn owners(&self) -> BrokerResult<HashMap<String, String>> {
        let mut owners = HashMap::new();
        for record in self.read(OWNERS_TOPIC, None, usize::MAX)? {
            let Some(group) = record
                .key()
                .map(|k| String::from_utf8_lossy(k).into_owned())
            else {
                continue;
            };
            match record.payload().filter(|p| !p.is_empty()) {
                Some(owner) => {
                    owners
                        .entry(group)
                        .or_insert_with(|| String::from_utf8_lossy(owner).into_owned());
                }
                None => {
                    owners.remove(&group);
                }
            }
        }
        Ok(owners)
    }
}

/// The Kafka broker.
pub struct KafkaBroker {
    shared: Arc<Shared>,
}

impl KafkaBroker {
    /// A broker on the Kafka servers of `url`; the clients connect in the
    /// background, so a host whose Kafka is down at start still starts.
    pub fn connect(url: &str, settings: KafkaSettings) -> Result<Arc<KafkaBroker>> {
        let config = base_config(url, &settings)?;
        let link = Arc::new(Link::default());
        // The servers as parsed once into the configuration.
        let servers = config
            .get("bootstrap.servers")
            .unwrap_or_default()
            .to_string();
        link.set(false, format!("connecting to {servers}"));
        let context = LinkContext { link: link.clone() };
        let producer: FutureProducer<LinkContext> = config
            .clone()
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("linger.ms", "1")
            .set(
                "message.timeout.ms",
                PUBLISH_TIMEOUT.as_millis().to_string(),
            )
            .create_with_context(context.clone())
            .context("creating the Kafka producer")?;
        let admin: AdminClient<LinkContext> = config
            .create_with_context(context)
            .context("creating the Kafka admin client")?;
        let shared = Arc::new(Shared {
            config,
            producer,
            admin,
            link,
            partitions: settings.partitions.max(1),
            replicas: settings.replicas,
            replication: tokio::sync::OnceCell::new(),
            topics: Mutex::new(HashSet::new()),
            servers,
        });
        watch_link(Arc::downgrade(&shared));
        Ok(Arc::new(KafkaBroker { shared }))
    }
}

/// Asks the brokers for their metadata every few seconds, for
/// [`MessageBroker::status`], for as long as the broker lives.
fn watch_link(shared: Weak<Shared>) {
    tokio::spawn(async move {
        loop {
            let Some(this) = shared.upgrade() else { return };
            let producer = this.producer.clone();
            let answer = tokio::task::spawn_blocking(move || {
                producer
                    .client()
                    .fetch_metadata(None, CALL_TIMEOUT)
                    .map(|metadata| metadata.brokers().len())
            })
            .await;
            match answer {
                Ok(Ok(brokers)) => this.link.set(
                    true,
                    format!("connected to {} ({brokers} brokers)", this.servers),
                ),
                // A busy broker answers metadata late; that is not a lost
                // link (librdkafka reports that as all brokers down), and
                // publishes must not fail fast on it: they wait for the
                // broker's acknowledgement as long as a publish may.
                Ok(Err(err))
                    if err.rdkafka_error_code() == Some(RDKafkaErrorCode::OperationTimedOut) =>
                {
                    this.link
                        .note(format!("{}: answering slowly ({err})", this.servers));
                }
                Ok(Err(err)) => this.link.set(false, format!("{}: {err}", this.servers)),
                Err(_) => {}
            }
            drop(this);
            tokio::time::sleep(Duration::from_secs(3)).await;
        }
    });
}

/// Retention of the owners topic: forever.
const KEEP_FOREVER: i64 = -1;
/// Retention of the replies topic: replies are read at once or never.
const REPLY_RETENTION_MS: i64 = 10 * 60 * 1000;
/// Retention of topics Wharf creates for messages: a week, Kafka's own
/// default.
const MESSAGE_RETENTION_MS: i64 = 7 * 24 * 60 * 60 * 1000;

impl MessageBroker for Arc<KafkaBroker> {
    type Consumer = KafkaConsumer;

    fn kind(&self) -> &'static str {
        "kafka"
    }

    fn status(&self) -> BrokerStatus {
        let link = &self.shared.link;
        BrokerStatus {
            kind: "kafka",
            up: link.up.load(Ordering::Relaxed),
            detail: link.detail(),
        }
    }

    /// Sends the record (idempotent, `acks=all`); returns once the brokers
    /// have it.
    async fn publish(&self, message: Message) -> BrokerResult<()> {
        let shared = &self.shared;
        shared
            .ensure_topic(&message.topic, shared.partitions, MESSAGE_RETENTION_MS)
            .await?;
        shared
            .send(
                &message.topic,
                message.key.as_deref().map(str::as_bytes),
                &message.body,
                headers_of(&message),
            )
            .await?;
        Ok(())
    }

    /// Joins the consumer group, subscribed to the pattern and the group's
    /// retry topic.
    async fn subscribe(&self, subscription: &Subscription) -> BrokerResult<KafkaConsumer> {
        let shared = &self.shared;
        let group = subscription.group.as_str();
        let retry = retry_topic(group);
        shared.ensure_topic(&retry, 1, MESSAGE_RETENTION_MS).await?;
        shared
            .ensure_topic(&dead_topic(group), 1, KEEP_FOREVER)
            .await?;
        let topic = subscription_of(&subscription.pattern);
        let wildcard = topic.starts_with('^');
        if !wildcard {
            shared
                .ensure_topic(&topic, shared.partitions, MESSAGE_RETENTION_MS)
                .await?;
        }
        let tracker = Arc::new(Mutex::new(OffsetTracker::default()));
        let context = GroupContext {
            link: LinkContext {
                link: shared.link.clone(),
            },
            tracker: tracker.clone(),
        };
        let prefetch = subscription.prefetch.max(1);
        let consumer: StreamConsumer<GroupContext> = shared
            .config
            .clone()
            .set("group.id", group)
            // Offsets are stored only for settled deliveries, then
            // committed every 200 ms and before a partition is taken away.
            .set("enable.auto.commit", "true")
            .set("auto.commit.interval.ms", "200")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "earliest")
            // A host gone for 30 s loses its partitions; a busy broker
            // slow to answer heartbeats does not make it lose them sooner.
            .set("session.timeout.ms", "30000")
            .set("heartbeat.interval.ms", "3000")
            .set("fetch.wait.max.ms", "100")
            // Wildcards: new topics are noticed within a second.
            .set(
                "topic.metadata.refresh.interval.ms",
                if wildcard { "1000" } else { "30000" },
            )
            // What librdkafka fetches ahead, per partition: a few batches,
            // not its default 64 MiB.
            .set("queued.min.messages", (prefetch * 4).max(100).to_string())
            .set("queued.max.messages.kbytes", "2048")
            .create_with_context(context)
            .map_err(|err| classify(&err))?;
        consumer
            .subscribe(&[topic.as_str(), retry.as_str()])
            .map_err(|err| classify(&err))?;
        let (due_sender, due) = mpsc::unbounded_channel();
        Ok(KafkaConsumer {
            consumer: Arc::new(Closing(Some(consumer))),
            tracker,
            pattern: subscription.pattern.clone(),
            group: group.to_string(),
            retry,
            due_sender,
            due,
            shared: shared.clone(),
        })
    }

    /// Forgets the group: its owner, its dead letters (a mark in
    /// `_wharf.cleared` hides those before it: topics are left alone, since
    /// many Kafka clusters forbid deleting them) and the consumer group
    /// itself (its committed offsets; Kafka keeps those of a group with
    /// members still running). Whether the group had an owner or offsets.
    async fn delete_group(&self, group: &str) -> BrokerResult<bool> {
        let shared = self.shared.clone();
        shared.ensure_topic(OWNERS_TOPIC, 1, KEEP_FOREVER).await?;
        shared.ensure_topic(CLEARED_TOPIC, 1, KEEP_FOREVER).await?;
        let reader = shared.clone();
        let had_owner = blocking(move || reader.owners()).await?.contains_key(group);
        shared
            .send(
                OWNERS_TOPIC,
                Some(group.as_bytes()),
                &[],
                OwnedHeaders::new(),
            )
            .await?;
        let dead = dead_topic(group);
        let watcher = shared.clone();
        let end = blocking(move || watcher.watermarks(&dead)).await?.1;
        shared
            .send(
                CLEARED_TOPIC,
                Some(group.as_bytes()),
                end.to_string().as_bytes(),
                OwnedHeaders::new(),
            )
            .await?;
        let options = AdminOptions::new().operation_timeout(Some(ADMIN_TIMEOUT));
        let mut had_offsets = false;
        match shared.admin.delete_groups(&[group], &options).await {
            Ok(results) => {
                for result in results {
                    match result {
                        Ok(_) | Err((_, RDKafkaErrorCode::NonEmptyGroup)) => had_offsets = true,
                        Err((_, RDKafkaErrorCode::GroupIdNotFound)) => {}
                        Err((_, code)) => {
                            tracing::warn!(
                                group,
                                "kafka: the consumer group was not deleted: {code}"
                            );
                        }
                    }
                }
            }
            Err(err) => tracing::warn!(group, "kafka: the consumer group was not deleted: {err}"),
        }
        Ok(had_owner || had_offsets)
    }

    /// A page of the group's dead letters, oldest first; positions are
    /// offsets in its dead-letter topic.
    async fn dead_letters(
        &self,
        group: &str,
        query: DeadLetterQuery,
    ) -> BrokerResult<Vec<DeadLetter>> {
        let shared = self.shared.clone();
        shared.ensure_topic(CLEARED_TOPIC, 1, KEEP_FOREVER).await?;
        let topic = dead_topic(group);
        let group = group.to_string();
        blocking(move || {
            let cleared = shared.cleared(&group)?;
            let start = query.after.map_or(cleared, |after| {
                (after.saturating_add(1) as i64).max(cleared)
            });
            let records = shared.read(&topic, Some(start), query.limit)?;
            Ok(records
                .iter()
                .map(|record| {
                    let (message, body_size) = message_of(record, query.body_limit);
                    DeadLetter {
                        group: group.clone(),
                        message,
                        body_size,
                        position: record.offset().max(0) as u64,
                        attempts: header_number(record, header::ATTEMPT).unwrap_or(0) as u32,
                        reason: header_text(record, header::REASON)
                            .map(|r| r.into_owned())
                            .unwrap_or_default(),
                        dead_at: header_number(record, header::DEAD_AT)
                            .map_or(SystemTime::UNIX_EPOCH, from_millis),
                    }
                })
                .collect())
        })
        .await
    }

    /// How many dead letters the group has: its topic's offsets, nothing
    /// read.
    async fn count_dead_letters(&self, group: &str) -> BrokerResult<u64> {
        let shared = self.shared.clone();
        shared.ensure_topic(CLEARED_TOPIC, 1, KEEP_FOREVER).await?;
        let group = group.to_string();
        blocking(move || {
            let (low, high) = shared.watermarks(&dead_topic(&group))?;
            let from = low.max(shared.cleared(&group)?);
            Ok((high - from).max(0) as u64)
        })
        .await
    }

    /// Appends `service`'s claim to the owners topic unless the group has
    /// an owner; the first claim in the topic wins on every host.
    async fn claim_group(&self, group: &str, service: &str) -> BrokerResult<String> {
        let shared = self.shared.clone();
        shared.ensure_topic(OWNERS_TOPIC, 1, KEEP_FOREVER).await?;
        let reader = shared.clone();
        if let Some(owner) = blocking(move || reader.owners()).await?.remove(group) {
            return Ok(owner);
        }
        shared
            .send(
                OWNERS_TOPIC,
                Some(group.as_bytes()),
                service.as_bytes(),
                OwnedHeaders::new(),
            )
            .await?;
        let reader = shared.clone();
        blocking(move || reader.owners())
            .await?
            .remove(group)
            .ok_or_else(|| {
                BrokerError::Other(format!(
                    "kafka: the owner of group {group} was written but not read back"
                ))
            })
    }

    /// Reads the replies topic from its end, handing this host's replies
    /// to their inboxes, for as long as the broker lives.
    fn listen_for_replies(&self, inboxes: Arc<Inboxes>) {
        let shared = Arc::downgrade(&self.shared);
        tokio::spawn(async move {
            loop {
                let Some(this) = shared.upgrade() else { return };
                let consumer = replies_consumer(&this).await;
                drop(this);
                match consumer {
                    Ok(consumer) => {
                        forward_replies(&consumer, &inboxes, &shared).await;
                        return;
                    }
                    Err(err) => {
                        tracing::debug!("kafka: reading replies failed ({err}); retrying");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                }
            }
        });
    }

    /// Sends a reply through the replies topic.
    async fn send_reply(&self, reply_to: &str, mut message: Message) -> BrokerResult<()> {
        let shared = &self.shared;
        shared
            .ensure_topic(REPLIES_TOPIC, 1, REPLY_RETENTION_MS)
            .await?;
        message.reply_to = Some(reply_to.to_string());
        shared
            .send(REPLIES_TOPIC, None, &message.body, headers_of(&message))
            .await?;
        Ok(())
    }
}

/// A consumer of the replies topic, from its end.
async fn replies_consumer(shared: &Shared) -> BrokerResult<Closing<LinkContext>> {
    shared
        .ensure_topic(REPLIES_TOPIC, 1, REPLY_RETENTION_MS)
        .await?;
    let consumer: StreamConsumer<LinkContext> = shared
        .config
        .clone()
        .set("group.id", READER_GROUP)
        .set("enable.auto.commit", "false")
        .set("fetch.wait.max.ms", "50")
        .create_with_context(LinkContext {
            link: shared.link.clone(),
        })
        .map_err(|err| classify(&err))?;
    let mut partitions = TopicPartitionList::new();
    partitions
        .add_partition_offset(REPLIES_TOPIC, 0, Offset::End)
        .map_err(|err| classify(&err))?;
    consumer.assign(&partitions).map_err(|err| classify(&err))?;
    Ok(Closing(Some(consumer)))
}

/// Hands each reply addressed to this host to its inbox, until the broker
/// is dropped.
async fn forward_replies(
    consumer: &Closing<LinkContext>,
    inboxes: &Inboxes,
    shared: &Weak<Shared>,
) {
    loop {
        if shared.strong_count() == 0 {
            return;
        }
        match tokio::time::timeout(Duration::from_secs(1), consumer.recv()).await {
            Ok(Ok(record)) => {
                let record = record.detach();
                let Some(address) = header_text(&record, header::REPLY_TO).map(|a| a.into_owned())
                else {
                    continue;
                };
                if inboxes.is_local(&address) {
                    let (message, _) = message_of(&record, usize::MAX);
                    inboxes.deliver(&address, message);
                }
            }
            Ok(Err(err)) => {
                tracing::debug!("kafka: reading replies: {err}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(_) => {}
        }
    }
}

/// A consumer closed on a thread of its own when dropped: closing leaves
/// the group and commits the last offsets, which blocks until the broker
/// answers.
struct Closing<C: ConsumerContext + 'static>(Option<StreamConsumer<C>>);

impl<C: ConsumerContext + 'static> std::ops::Deref for Closing<C> {
    type Target = StreamConsumer<C>;

    fn deref(&self) -> &StreamConsumer<C> {
        self.0.as_ref().expect("a consumer not yet dropped")
    }
}

impl<C: ConsumerContext + 'static> Drop for Closing<C> {
    fn drop(&mut self) {
        if let Some(consumer) = self.0.take() {
            let closed = std::thread::Builder::new()
                .name("kafka-close".into())
                .spawn(move || drop(consumer));
            if let Err(err) = closed {
                tracing::warn!("kafka: closing a consumer: {err}");
            }
        }
    }
}

/// Runs a blocking client call off the async threads.
async fn blocking<T: Send + 'static>(
    call: impl FnOnce() -> BrokerResult<T> + Send + 'static,
) -> BrokerResult<T> {
    tokio::task::spawn_blocking(call)
        .await
        .map_err(|err| BrokerError::Other(format!("kafka: {err}")))?
}

/// A group consumer's hooks: partitions taken away are forgotten, so their
/// deliveries still running commit nothing.
struct GroupContext {
    link: LinkContext,
    tracker: Arc<Mutex<OffsetTracker>>,
}

impl ClientContext for GroupContext {
    fn log(&self, level: RDKafkaLogLevel, facility: &str, line: &str) {
        self.link.log(level, facility, line);
    }

    fn error(&self, error: KafkaError, reason: &str) {
        self.link.error(error, reason);
    }
}

impl ConsumerContext for GroupContext {
    fn pre_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(partitions) = rebalance
            && let Ok(mut tracker) = self.tracker.lock()
        {
            for element in partitions.elements() {
                tracker.forget(&(element.topic().to_string(), element.partition()));
            }
        }
    }
}

/// A retry record held until it is due.
struct Held {
    received: Received,
    ticket: Ticket,
}

/// A consumer of one group on Kafka.
pub struct KafkaConsumer {
    consumer: Arc<Closing<GroupContext>>,
    tracker: Arc<Mutex<OffsetTracker>>,
    pattern: TopicPattern,
    group: String,
    retry: String,
    due_sender: mpsc::UnboundedSender<Held>,
    due: mpsc::UnboundedReceiver<Held>,
    shared: Arc<Shared>,
}

impl KafkaConsumer {
    fn begin(&self, record: &OwnedMessage) -> Ticket {
        let mut tracker = self.tracker.lock().unwrap_or_else(|e| e.into_inner());
        tracker.begin(
            (record.topic().to_string(), record.partition()),
            record.offset(),
        )
    }

    fn delivery(&self, received: Received, ticket: Ticket) -> KafkaDelivery {
        KafkaDelivery {
            received,
            ticket,
            consumer: self.consumer.clone(),
            tracker: self.tracker.clone(),
            shared: self.shared.clone(),
            group: self.group.clone(),
        }
    }

    /// What to do with a record just fetched: a delivery now, or later
    /// (a retry not due yet), or none (a topic the pattern does not match).
    fn take(&self, record: OwnedMessage) -> Option<KafkaDelivery> {
        let ticket = self.begin(&record);
        let from_retry = record.topic() == self.retry;
        if !from_retry && !self.pattern.matches(record.topic()) {
            settle(&self.consumer, &self.tracker, &ticket);
            return None;
        }
        let (message, _) = message_of(&record, usize::MAX);
        let attempt = if from_retry {
            header_number(&record, header::ATTEMPT).unwrap_or(2).max(1) as u32
        } else {
            1
        };
        let received = Received { message, attempt };
        let due = from_retry
            .then(|| header_number(&record, header::DUE))
            .flatten()
            .map(from_millis)
            .and_then(|due| due.duration_since(SystemTime::now()).ok());
        match due {
            Some(wait) if !wait.is_zero() => {
                let sender = self.due_sender.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(wait).await;
                    let _ = sender.send(Held { received, ticket });
                });
                None
            }
            _ => Some(self.delivery(received, ticket)),
        }
    }
}

impl BrokerConsumer for KafkaConsumer {
    type Delivery = KafkaDelivery;

    /// The next delivery: a record of the group's topics, or a retry that
    /// came due. Broker outages are waited out (librdkafka reconnects);
    /// only a fatal client error ends the consumer.
    async fn next(&mut self) -> BrokerResult<KafkaDelivery> {
        loop {
            tokio::select! {
                Some(held) = self.due.recv() => {
                    let holds = self
                        .tracker
                        .lock()
                        .is_ok_and(|tracker| tracker.holds(&held.ticket));
                    // Its partition was taken away meanwhile: the new owner
                    // reads it again.
                    if holds {
                        return Ok(self.delivery(held.received, held.ticket));
                    }
                }
                record = self.consumer.recv() => match record {
                    Ok(record) => {
                        let record = record.detach();
                        if let Some(delivery) = self.take(record) {
                            return Ok(delivery);
                        }
                    }
                    Err(err) if err.rdkafka_error_code() == Some(RDKafkaErrorCode::Fatal) => {
                        return Err(classify(&err));
                    }
                    Err(err) => {
                        tracing::debug!(group = %self.group, "kafka: {err}");
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                },
            }
        }
    }
}

/// Marks `ticket`'s delivery settled and stores its partition's new commit
/// point, if it moved (librdkafka commits stored offsets every 200 ms and
/// before giving a partition up).
fn settle(
    consumer: &StreamConsumer<GroupContext>,
    tracker: &Mutex<OffsetTracker>,
    ticket: &Ticket,
) {
    let point = tracker
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .finish(ticket);
    let Some(point) = point else { return };
    let mut offsets = TopicPartitionList::new();
    let (topic, partition) = &ticket.partition;
    if offsets
        .add_partition_offset(topic, *partition, Offset::Offset(point))
        .is_ok()
        && let Err(err) = consumer.store_offsets(&offsets)
    {
        // The partition went to another consumer meanwhile: it redelivers.
        tracing::debug!(topic, partition, "kafka: storing the offset: {err}");
    }
}

/// One delivery from Kafka.
pub struct KafkaDelivery {
    received: Received,
    ticket: Ticket,
    consumer: Arc<Closing<GroupContext>>,
    tracker: Arc<Mutex<OffsetTracker>>,
    shared: Arc<Shared>,
    group: String,
}

impl KafkaDelivery {
    fn settle(&self) {
        settle(&self.consumer, &self.tracker, &self.ticket);
    }

    /// Appends a copy of the record, with `headers`, to `topic` (one of the
    /// group's own, created with `retention_ms` if missing).
    async fn copy_to(
        &self,
        topic: String,
        retention_ms: i64,
        headers: OwnedHeaders,
    ) -> BrokerResult<()> {
        let message = &self.received.message;
        self.shared.ensure_topic(&topic, 1, retention_ms).await?;
        self.shared
            .send(
                &topic,
                message.key.as_deref().map(str::as_bytes),
                &message.body,
                headers,
            )
            .await?;
        Ok(())
    }

    /// The record's headers for a copy in one of the group's own topics.
    fn copy_headers(&self, extra: &[(&str, String)]) -> OwnedHeaders {
        let message = &self.received.message;
        let mut headers = headers_of(message).insert(Header {
            key: header::TOPIC,
            value: Some(message.topic.as_bytes()),
        });
        for (key, value) in extra {
            headers = headers.insert(Header {
                key,
                value: Some(value.as_bytes()),
            });
        }
        headers
    }
}

impl BrokerDelivery for KafkaDelivery {
    fn received(&self) -> &Received {
        &self.received
    }

    /// Settles the record: its offset may be committed.
    async fn ack(self) -> BrokerResult<()> {
        self.settle();
        Ok(())
    }

    /// Copies the record to the group's retry topic, due after `delay`,
    /// then settles the original.
    async fn retry(self, delay: Duration) -> BrokerResult<()> {
        let due = millis(SystemTime::now() + delay);
        let headers = self.copy_headers(&[
            (header::ATTEMPT, (self.received.attempt + 1).to_string()),
            (header::DUE, due.to_string()),
        ]);
        self.copy_to(retry_topic(&self.group), MESSAGE_RETENTION_MS, headers)
            .await?;
        self.settle();
        Ok(())
    }

    /// Appends the record to the group's dead-letter topic, then settles
    /// the original. The topic's retention bounds it: 0 dropped here.
    async fn dead_letter(self, reason: String) -> BrokerResult<u64> {
        let headers = self.copy_headers(&[
            (header::ATTEMPT, self.received.attempt.to_string()),
            (header::REASON, reason),
            (header::DEAD_AT, millis(SystemTime::now()).to_string()),
        ]);
        self.copy_to(dead_topic(&self.group), KEEP_FOREVER, headers)
            .await?;
        self.settle();
        Ok(0)
    }
}
