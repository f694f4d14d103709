//! A message as Wharf carries it, whichever broker carries it.

use std::time::SystemTime;

use bytes::Bytes;

/// The metadata key a publisher sets to choose its message's partition key
/// (see [`Message::key`]).
pub const MESSAGE_KEY: &str = "message-key";

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
    /// Its partition key, on brokers that partition topics (Kafka): the
    /// publisher's `message-key` metadata, else the publishing service, so
    /// one publisher's messages keep their order. Other brokers ignore it.
    pub key: Option<String>,
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
            key: None,
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
