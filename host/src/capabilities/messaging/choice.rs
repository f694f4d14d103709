//! Which broker a host uses, as configured (`--broker`, or `backend` under
//! `[messaging]` in `wharf.toml`): the one place brokers are chosen and
//! opened.

use std::sync::Arc;

use crate::capabilities::at_rest::Sealer;
use crate::capabilities::messaging::broker::Broker;
use crate::capabilities::messaging::embedded::EmbeddedBroker;
use crate::capabilities::messaging::kafka::{DEFAULT_PARTITIONS, KafkaBroker, KafkaSettings};
use crate::capabilities::messaging::limits::MessagingLimits;
use crate::capabilities::messaging::nats::NatsBroker;
use crate::capabilities::messaging::rabbitmq::{QueueType, RabbitBroker};
use crate::capabilities::messaging::sealed::SealedBroker;
use crate::capabilities::nats::Replicas;
use crate::capabilities::tls::BackendTls;

/// Which broker a host uses, as configured (`--broker`, or `backend` under
/// `[messaging]` in `wharf.toml`).
#[derive(Clone, Default, PartialEq, Eq)]
pub enum BrokerChoice {
    /// SQLite in the data directory (in memory without one).
    #[default]
    Embedded,
    /// NATS JetStream: `nats://host:port[,…]`.
    Nats(String),
    /// RabbitMQ: `amqp://user:password@host:port/vhost[,amqp://…]`, the
    /// nodes of one cluster, tried in turn.
    Rabbit(String),
    /// Apache Kafka: `kafka://host:port[,host:port…]` (`kafkas://` over
    /// TLS).
    Kafka(String),
}

/// Shows the address without its credentials.
impl std::fmt::Debug for BrokerChoice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BrokerChoice::Embedded => f.write_str("Embedded"),
            BrokerChoice::Nats(url) => write!(f, "Nats({:?})", crate::base::redact::url(url)),
            BrokerChoice::Rabbit(url) => write!(f, "Rabbit({:?})", crate::base::redact::url(url)),
            BrokerChoice::Kafka(url) => write!(f, "Kafka({:?})", crate::base::redact::url(url)),
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
        } else if text.starts_with("kafka://") || text.starts_with("kafkas://") {
            Ok(BrokerChoice::Kafka(text.to_string()))
        } else {
            Err(format!(
                "{text:?} is not a message broker: use \"embedded\", \"nats://HOST:PORT\", \"amqp://USER:PASSWORD@HOST:PORT/VHOST\" or \"kafka://HOST:PORT\""
            ))
        }
    }
}

/// What shapes the queues of whichever broker is chosen.
#[derive(Debug, Clone, Default)]
pub struct BrokerSettings {
    /// What bounds the queues.
    pub limits: MessagingLimits,
    /// How many NATS servers keep each stream.
    pub replicas: Replicas,
    /// What kind of queue RabbitMQ keeps each group in.
    pub queues: QueueType,
    /// TLS to the broker.
    pub tls: BackendTls,
    /// The text of the credentials file the broker signs in with, if it
    /// needs one: NATS's `.creds`, Kafka's SASL properties.
    pub credentials: Option<String>,
    /// Partitions of each Kafka topic Wharf creates (`None`: three).
    pub partitions: Option<u32>,
    /// Seals message bodies before the broker stores them, if given.
    pub sealer: Option<Arc<Sealer>>,
}

impl BrokerChoice {
    /// Opens the chosen broker, its queues bounded by `limits`: the embedded
    /// queue at `data_dir` (in memory without one); NATS, RabbitMQ
    /// and Kafka connect in the background. With a sealer, message bodies
    /// are encrypted before they reach it.
    pub async fn open(
        &self,
        data_dir: Option<&std::path::Path>,
        mut settings: BrokerSettings,
    ) -> anyhow::Result<Broker> {
        let sealer = settings.sealer.take();
        let broker = self.open_plain(data_dir, settings).await?;
        Ok(match sealer {
            Some(sealer) => Broker::new(SealedBroker::new(broker, sealer)),
            None => broker,
        })
    }

    /// The chosen broker, storing bodies as they are.
    async fn open_plain(
        &self,
        data_dir: Option<&std::path::Path>,
        settings: BrokerSettings,
    ) -> anyhow::Result<Broker> {
        let limits = settings.limits;
        Ok(match self {
            BrokerChoice::Embedded => {
                let path = data_dir.map(|dir| dir.join("messages.sqlite3"));
                let broker = tokio::task::spawn_blocking(move || {
                    EmbeddedBroker::open(path.as_deref(), limits)
                })
                .await??;
                Broker::new(Arc::new(broker))
            }
            BrokerChoice::Nats(url) => Broker::new(
                NatsBroker::connect(
                    url,
                    limits,
                    settings.replicas,
                    &settings.tls,
                    settings.credentials.as_deref(),
                )
                .await?,
            ),
            BrokerChoice::Rabbit(url) => Broker::new(RabbitBroker::connect(
                url,
                limits,
                settings.queues,
                &settings.tls,
            )?),
            BrokerChoice::Kafka(url) => Broker::new(KafkaBroker::connect(
                url,
                KafkaSettings {
                    partitions: settings.partitions.unwrap_or(DEFAULT_PARTITIONS),
                    replicas: settings.replicas,
                    tls: settings.tls,
                    credentials: settings.credentials,
                },
            )?),
        })
    }
}
