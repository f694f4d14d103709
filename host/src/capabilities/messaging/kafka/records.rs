//! How a Wharf message is a Kafka record, and back: Wharf's own fields in
//! `wharf-*` headers, the metadata as headers of their own, the key as
//! `message-key`; and how a topic pattern is a subscription.

use std::time::{Duration, SystemTime};

use bytes::Bytes;
use rdkafka::message::{Header, Headers as _, Message as _, OwnedHeaders, OwnedMessage};

use crate::capabilities::messaging::message::{MESSAGE_KEY, Message};
use crate::capabilities::messaging::topic::TopicPattern;

/// Header names of Wharf's own fields.
pub(super) mod header {
    pub const PREFIX: &str = "wharf-";
    pub const ID: &str = "wharf-id";
    pub const PUBLISHED: &str = "wharf-published-ms";
    pub const REPLY_TO: &str = "wharf-reply-to";
    pub const TOPIC: &str = "wharf-topic";
    pub const ATTEMPT: &str = "wharf-attempt";
    pub const DUE: &str = "wharf-due-ms";
    pub const REASON: &str = "wharf-dead-reason";
    pub const DEAD_AT: &str = "wharf-dead-ms";
    pub const CONTENT_TYPE: &str = "content-type";
}

pub(super) fn millis(time: SystemTime) -> u64 {
    time.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

pub(super) fn from_millis(ms: u64) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_millis(ms)
}

/// A pattern as librdkafka subscribes to it: the topic itself, or a regex
/// (`^…$`) for one with wildcards. A leading wildcard never matches a
/// topic starting with `_`.
pub(super) fn subscription_of(pattern: &TopicPattern) -> String {
    let text = pattern.as_str();
    if !text.split('.').any(|token| token == "*" || token == ">") {
        return text.to_string();
    }
    let tokens: Vec<String> = text
        .split('.')
        .enumerate()
        .map(|(index, token)| match (index, token) {
            (0, "*") => "[^._][^.]*".to_string(),
            (0, ">") => "[^._].*".to_string(),
            (_, "*") => "[^.]+".to_string(),
            (_, ">") => ".+".to_string(),
            // Letters, digits, '-' and '_': nothing a regex reads specially.
            (_, exact) => exact.to_string(),
        })
        .collect();
    format!("^{}$", tokens.join("\\."))
}

/// Record headers for `message`: its metadata as headers, and Wharf's own
/// fields.
pub(super) fn headers_of(message: &Message) -> OwnedHeaders {
    let mut headers = OwnedHeaders::new_with_capacity(message.metadata.len() + 4);
    let mut add = |key: &str, value: &str| {
        headers = std::mem::take(&mut headers).insert(Header {
            key,
            value: Some(value.as_bytes()),
        });
    };
    add(header::ID, &message.id);
    add(header::PUBLISHED, &millis(message.published_at).to_string());
    if let Some(content_type) = &message.content_type {
        add(header::CONTENT_TYPE, content_type);
    }
    if let Some(reply_to) = &message.reply_to {
        add(header::REPLY_TO, reply_to);
    }
    for (key, value) in &message.metadata {
        add(key, value);
    }
    headers
}

/// A header's value as text.
pub(super) fn header_text<'a>(
    record: &'a OwnedMessage,
    name: &str,
) -> Option<std::borrow::Cow<'a, str>> {
    record.headers()?.iter().find_map(|h| {
        (h.key.eq_ignore_ascii_case(name))
            .then(|| h.value.map(String::from_utf8_lossy))
            .flatten()
    })
}

pub(super) fn header_number(record: &OwnedMessage, name: &str) -> Option<u64> {
    header_text(record, name)?.parse().ok()
}

/// The message a record carries: Wharf's fields from `wharf-*` headers,
/// every other header as metadata, the key as `message-key`.
pub(super) fn message_of(record: &OwnedMessage, body_limit: usize) -> (Message, u64) {
    let payload = record.payload().unwrap_or_default();
    let body_size = payload.len() as u64;
    let body = Bytes::copy_from_slice(&payload[..payload.len().min(body_limit)]);
    let mut metadata = Vec::new();
    let mut content_type = None;
    if let Some(headers) = record.headers() {
        for h in headers.iter() {
            let value = h.value.map(String::from_utf8_lossy).unwrap_or_default();
            if h.key.eq_ignore_ascii_case(header::CONTENT_TYPE) {
                content_type = Some(value.into_owned());
            } else if !h.key.to_ascii_lowercase().starts_with(header::PREFIX) {
                metadata.push((h.key.to_string(), value.into_owned()));
            }
        }
    }
    if let Some(key) = record.key()
        && !metadata
            .iter()
            .any(|(k, _)| k.eq_ignore_ascii_case(MESSAGE_KEY))
    {
        metadata.push((
            MESSAGE_KEY.to_string(),
            String::from_utf8_lossy(key).into_owned(),
        ));
    }
    let topic = header_text(record, header::TOPIC)
        .map(|t| t.into_owned())
        .unwrap_or_else(|| record.topic().to_string());
    let published_at = header_number(record, header::PUBLISHED)
        .map(from_millis)
        .or_else(|| {
            record
                .timestamp()
                .to_millis()
                .and_then(|ms| u64::try_from(ms).ok())
                .map(from_millis)
        })
        .unwrap_or_else(SystemTime::now);
    let message = Message {
        // A record from another producer: its place, the same on every
        // redelivery.
        id: header_text(record, header::ID).map_or_else(
            || {
                format!(
                    "{}-{}-{}",
                    record.topic(),
                    record.partition(),
                    record.offset()
                )
            },
            |id| id.into_owned(),
        ),
        topic,
        body,
        content_type,
        metadata,
        reply_to: header_text(record, header::REPLY_TO).map(|r| r.into_owned()),
        published_at,
        key: record
            .key()
            .map(|k| String::from_utf8_lossy(k).into_owned()),
    };
    (message, body_size)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wildcard_patterns_become_regexes_that_skip_host_topics() {
        let p = |t| subscription_of(&TopicPattern::parse(t).unwrap());
        assert_eq!(p("orders.created"), "orders.created");
        assert_eq!(p("orders.*"), "^orders\\.[^.]+$");
        assert_eq!(p("orders.>"), "^orders\\..+$");
        assert_eq!(p(">"), "^[^._].*$");
        assert_eq!(p("*.created"), "^[^._][^.]*\\.created$");
    }
}
