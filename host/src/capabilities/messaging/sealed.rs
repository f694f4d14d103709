//! Encryption at rest around any broker: a message's body is sealed (see
//! [`at_rest`](crate::capabilities::at_rest)) before the broker stores it
//! and opened when it is delivered, so the embedded broker's file, a NATS
//! stream, a RabbitMQ queue or a Kafka topic holds no body in the clear.
//! Topics, ids, metadata and keys stay readable: brokers route by them.
//!
//! A delivery whose body does not open (published by a producer that is not
//! Wharf, before encryption was turned on, or sealed with a key this host
//! does not have) never reaches a handler: it goes to the group's dead
//! letters with the reason, where the admin endpoint shows it as stored.
//! Replies to requests from other hosts are not sealed: they are answers in
//! transit, not queued data (on Kafka they pass through `_wharf.replies`).

use std::sync::Arc;
use std::time::Duration;

use crate::capabilities::at_rest::{SEAL_OVERHEAD, Sealer};
use crate::capabilities::messaging::MAX_MESSAGE_SIZE;
use crate::capabilities::messaging::broker::{
    Broker, BrokerConsumer, BrokerDelivery, BrokerResult, BrokerStatus, Consumer, DeadLetter,
    DeadLetterQuery, Delivery, MessageBroker, Received, Subscription,
};
use crate::capabilities::messaging::inbox::Inboxes;
use crate::capabilities::messaging::message::Message;

/// What every sealed body is bound to: it opens only as a message body.
const CONTEXT: &[u8] = b"wharf-message\0";

/// Dead letters read from the broker at once while a page is opened: each
/// is read whole (a cut sealed body does not open), so this bounds the
/// memory a page costs to this many largest messages.
const OPEN_CHUNK: usize = 10;

/// A broker whose message bodies are sealed with `sealer`.
pub struct SealedBroker {
    inner: Broker,
    sealer: Arc<Sealer>,
}

impl SealedBroker {
    /// `inner`, storing only sealed bodies.
    pub fn new(inner: Broker, sealer: Arc<Sealer>) -> SealedBroker {
        SealedBroker { inner, sealer }
    }
}

/// `message` with its body opened by `sealer`, or why it does not open.
fn opened(sealer: &Sealer, message: &Message) -> Result<Message, String> {
    let body = sealer.open(CONTEXT, &message.body)?;
    Ok(Message {
        body: body.into(),
        ..message.clone()
    })
}

impl MessageBroker for SealedBroker {
    type Consumer = SealedConsumer;

    fn kind(&self) -> &'static str {
        self.inner.kind()
    }

    fn status(&self) -> BrokerStatus {
        let mut status = self.inner.status();
        status.detail = format!(
            "{}; message bodies encrypted (key {})",
            status.detail,
            self.sealer.key_id()
        );
        status
    }

    async fn publish(&self, mut message: Message) -> BrokerResult<()> {
        let sealed = self
            .sealer
            .seal(CONTEXT, &message.body)
            .map_err(crate::capabilities::messaging::broker::BrokerError::Other)?;
        message.body = sealed.into();
        self.inner.publish(message).await
    }

    async fn subscribe(&self, subscription: &Subscription) -> BrokerResult<SealedConsumer> {
        Ok(SealedConsumer {
            inner: self.inner.subscribe(subscription).await?,
            sealer: self.sealer.clone(),
            group: subscription.group.clone(),
        })
    }

    async fn delete_group(&self, group: &str) -> BrokerResult<bool> {
        self.inner.delete_group(group).await
    }

    async fn dead_letters(
        &self,
        group: &str,
        query: DeadLetterQuery,
    ) -> BrokerResult<Vec<DeadLetter>> {
        let mut letters = Vec::new();
        let mut after = query.after;
        while letters.len() < query.limit {
            let asked = OPEN_CHUNK.min(query.limit - letters.len());
            let chunk = self
                .inner
                .dead_letters(
                    group,
                    DeadLetterQuery {
                        after,
                        limit: asked,
                        body_limit: MAX_MESSAGE_SIZE + SEAL_OVERHEAD,
                    },
                )
                .await?;
            let read = chunk.len();
            for mut letter in chunk {
                after = Some(letter.position);
                // One that does not open is shown as stored: it is here
                // because it did not.
                if let Ok(message) = opened(&self.sealer, &letter.message) {
                    letter.body_size = message.body.len() as u64;
                    letter.message = message;
                }
                letter.message.body = letter
                    .message
                    .body
                    .slice(..letter.message.body.len().min(query.body_limit));
                letters.push(letter);
            }
            if read < asked {
                break;
            }
        }
        Ok(letters)
    }

    async fn count_dead_letters(&self, group: &str) -> BrokerResult<u64> {
        self.inner.count_dead_letters(group).await
    }

    async fn claim_group(&self, group: &str, service: &str) -> BrokerResult<String> {
        self.inner.claim_group(group, service).await
    }

    fn listen_for_replies(&self, inboxes: Arc<Inboxes>) {
        self.inner.listen_for_replies(&inboxes);
    }

    async fn send_reply(&self, reply_to: &str, message: Message) -> BrokerResult<()> {
        self.inner.send_reply(reply_to, message).await
    }
}

/// A consumer of a [`SealedBroker`]'s group: hands out opened deliveries,
/// and dead-letters those that do not open.
pub struct SealedConsumer {
    inner: Consumer,
    sealer: Arc<Sealer>,
    group: String,
}

impl BrokerConsumer for SealedConsumer {
    type Delivery = SealedDelivery;

    async fn next(&mut self) -> BrokerResult<SealedDelivery> {
        loop {
            let delivery = self.inner.next().await?;
            match opened(&self.sealer, delivery.message()) {
                Ok(message) => {
                    let attempt = delivery.attempt();
                    return Ok(SealedDelivery {
                        received: Received { message, attempt },
                        inner: delivery,
                    });
                }
                Err(why) => {
                    let id = delivery.message().id.clone();
                    tracing::warn!(group = %self.group, message = %id, reason = %why, "a message that does not open goes to the dead letters");
                    // If even that fails, the broker delivers it again.
                    if let Err(err) = delivery.dead_letter(&why).await {
                        tracing::warn!(group = %self.group, message = %id, error = %err, "dead-lettering a message that does not open");
                    }
                }
            }
        }
    }
}

/// A delivery of a [`SealedBroker`]: the message opened; settling goes to
/// the broker's own delivery (a retry keeps the sealed body).
pub struct SealedDelivery {
    received: Received,
    inner: Delivery,
}

impl BrokerDelivery for SealedDelivery {
    fn received(&self) -> &Received {
        &self.received
    }

    async fn ack(self) -> BrokerResult<()> {
        self.inner.ack().await
    }

    async fn retry(self, delay: Duration) -> BrokerResult<()> {
        self.inner.retry(delay).await
    }

    async fn dead_letter(self, reason: String) -> BrokerResult<u64> {
        self.inner.dead_letter(&reason).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::capabilities::at_rest::AtRestKeys;
    use crate::capabilities::messaging::MessagingLimits;
    use crate::capabilities::messaging::embedded::EmbeddedBroker;
    use crate::capabilities::messaging::topic::TopicPattern;

    fn sealer(dir: &std::path::Path) -> Arc<Sealer> {
        let path = dir.join("k.key");
        std::fs::write(&path, "22".repeat(32)).unwrap();
        Arc::new(
            Sealer::load(&AtRestKeys {
                key: path,
                previous: Vec::new(),
            })
            .unwrap(),
        )
    }

    fn subscription(group: &str) -> Subscription {
        Subscription {
            group: group.into(),
            pattern: TopicPattern::parse("orders.*").unwrap(),
            max_attempts: 3,
            ack_wait: Duration::from_secs(30),
            prefetch: 8,
        }
    }

    fn page(body_limit: usize) -> DeadLetterQuery {
        DeadLetterQuery {
            after: None,
            limit: 25,
            body_limit,
        }
    }

    #[tokio::test]
    async fn bodies_are_sealed_in_the_broker_and_those_that_do_not_open_are_dead_lettered() {
        let dir = tempfile::tempdir().unwrap();
        let embedded = Arc::new(EmbeddedBroker::open(None, MessagingLimits::default()).unwrap());
        let plain = Broker::new(embedded.clone());
        let sealed = SealedBroker::new(Broker::new(embedded), sealer(dir.path()));
        let mut consumer = sealed.subscribe(&subscription("billing")).await.unwrap();
        let mut spy = plain.subscribe(&subscription("spy")).await.unwrap();

        // Not sealed (a producer that is not Wharf): never handed out.
        plain
            .publish(Message::new("orders.1", "in the clear".into()))
            .await
            .unwrap();
        let secret = "order 42: TOP-SECRET";
        sealed
            .publish(Message::new("orders.2", secret.into()))
            .await
            .unwrap();

        let delivery = consumer.next().await.unwrap();
        assert_eq!(delivery.received().message.body, secret);
        assert_eq!(delivery.received().message.topic, "orders.2");
        delivery.retry(Duration::ZERO).await.unwrap();
        // A retry keeps it sealed, and it opens again.
        let again = consumer.next().await.unwrap();
        assert_eq!(again.received().message.body, secret);
        assert_eq!(again.received().attempt, 2);
        again.dead_letter("failed".into()).await.unwrap();

        // What the broker holds is sealed.
        let first = spy.next().await.unwrap();
        let second = spy.next().await.unwrap();
        assert_eq!(first.message().body, "in the clear");
        let stored = &second.message().body;
        assert!(!stored.windows(secret.len()).any(|w| w == secret.as_bytes()));

        // Dead letters: the sealed one opened and cut as asked, the one
        // that did not open as stored, with why.
        let letters = sealed.dead_letters("billing", page(5)).await.unwrap();
        assert_eq!(letters.len(), 2, "{letters:?}");
        let unopened = &letters[0];
        assert_eq!(unopened.message.body, "in th");
        assert!(unopened.reason.contains("not encrypted"), "{unopened:?}");
        assert_eq!(letters[1].message.body, "order");
        assert_eq!(letters[1].body_size, secret.len() as u64);
        assert_eq!(letters[1].reason, "failed");
        // Paging goes on from a position.
        let rest = sealed
            .dead_letters(
                "billing",
                DeadLetterQuery {
                    after: Some(letters[0].position),
                    limit: 25,
                    body_limit: 1 << 20,
                },
            )
            .await
            .unwrap();
        assert_eq!(rest.len(), 1);
        assert_eq!(rest[0].message.body, secret);
    }
}
