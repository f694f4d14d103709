//! Publishing with a plain HTTP request, for guests without messaging
//! bindings (JavaScript `fetch`, Python `urllib`): a POST from the guest to
//! `http://messages.internal/TOPIC` publishes its body to TOPIC.
//!
//! | answer | when |
//! | --- | --- |
//! | 202 `{"id": …, "topic": …}` | the broker accepted the message |
//! | 200 (the reply's body) | `?reply-within=DURATION`: the first reply to the request |
//! | 400 | not a valid topic, or a bad `reply-within` |
//! | 403 | the service's `[messaging] publish` does not name the topic |
//! | 405 | not a POST |
//! | 413 | the body is over [`MAX_MESSAGE_SIZE`] |
//! | 429 | the service used its publishing quota (with `Retry-After`) |
//! | 503 | the broker is full or cannot be reached (with `Retry-After`) |
//! | 504 | no reply, or the broker did not answer, in time |
//!
//! The body's `content-type` travels with the message, and a `message-key`
//! header becomes its `message-key` metadata (its partition key on Kafka);
//! the publishing request's id and trace context are stamped on it as for
//! every publish.

use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::{HeaderValue, StatusCode};
use http_body_util::BodyExt as _;
use wasmtime_wasi_http::WasiBody;

use crate::base::limits::parse_duration_within;
use crate::base::respond;
use crate::capabilities::call::CallContext;
use crate::capabilities::messaging::broker::BrokerError;
use crate::capabilities::messaging::message::Message;
use crate::capabilities::messaging::{
    MAX_MESSAGE_SIZE, MAX_REPLY_WAIT, MessagingAccess, MessagingError,
};

/// The host name guests publish to.
pub const MESSAGES_HOST: &str = "messages.internal";

/// Why a body could not be read.
enum BodyError {
    TooLarge,
    Broken(String),
}

/// Reads `body` whole, refusing more than `limit` bytes.
async fn read_bounded(mut body: WasiBody, limit: usize) -> Result<Bytes, BodyError> {
    let mut collected = BytesMut::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|err| BodyError::Broken(format!("{err:?}")))?;
        if let Ok(data) = frame.into_data() {
            if collected.len() + data.len() > limit {
                return Err(BodyError::TooLarge);
            }
            collected.extend_from_slice(&data);
        }
    }
    Ok(collected.freeze())
}

fn answer(status: StatusCode, text: &str) -> http::Response<WasiBody> {
    respond::text(status, text)
}

/// The duration in `?reply-within=…`, if the query has one.
fn reply_within(query: Option<&str>) -> Result<Option<Duration>, String> {
    let Some(query) = query else { return Ok(None) };
    for pair in query.split('&') {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        if key == "reply-within" {
            return parse_duration_within(value, Duration::from_millis(1), MAX_REPLY_WAIT)
                .map(Some)
                .map_err(|why| format!("reply-within: {why}"));
        }
    }
    Ok(None)
}

/// Publishes the body of `request` (addressed to `messages.internal`) on
/// behalf of the request in `context`, and answers as the module docs say.
pub(crate) async fn publish(
    access: Option<Arc<MessagingAccess>>,
    request: http::Request<WasiBody>,
    context: CallContext,
) -> http::Response<WasiBody> {
    if request.method() != http::Method::POST {
        let mut response = answer(
            StatusCode::METHOD_NOT_ALLOWED,
            "publish with POST http://messages.internal/TOPIC",
        );
        response
            .headers_mut()
            .insert(http::header::ALLOW, HeaderValue::from_static("POST"));
        return response;
    }
    let Some(access) = access else {
        return answer(
            StatusCode::SERVICE_UNAVAILABLE,
            "this host has no message broker",
        );
    };
    let (parts, body) = request.into_parts();
    let topic = parts.uri.path().trim_start_matches('/').to_string();
    let wait = match reply_within(parts.uri.query()) {
        Ok(wait) => wait,
        Err(why) => return answer(StatusCode::BAD_REQUEST, &why),
    };
    // Refuse before reading a body that would be thrown away.
    if let Err(err) = access.check(&topic, &[]) {
        return refused(&err);
    }
    let body = match read_bounded(body, MAX_MESSAGE_SIZE).await {
        Ok(body) => body,
        Err(BodyError::TooLarge) => {
            return answer(
                StatusCode::PAYLOAD_TOO_LARGE,
                &format!("messages are at most {MAX_MESSAGE_SIZE} bytes"),
            );
        }
        Err(BodyError::Broken(why)) => {
            return answer(
                StatusCode::BAD_REQUEST,
                &format!("reading the body failed: {why}"),
            );
        }
    };
    let mut message = Message::new(&topic, body);
    message.content_type = parts
        .headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    if let Some(key) = parts
        .headers
        .get(super::message::MESSAGE_KEY)
        .and_then(|v| v.to_str().ok())
    {
        message
            .metadata
            .push((super::message::MESSAGE_KEY.to_string(), key.to_string()));
    }
    let id = message.id.clone();
    match wait {
        None => match access.publish(message, &context).await {
            Ok(()) => {
                let body = serde_json::json!({ "id": id, "topic": topic }).to_string();
                let mut response = http::Response::new(respond::full(body));
                *response.status_mut() = StatusCode::ACCEPTED;
                response.headers_mut().insert(
                    http::header::CONTENT_TYPE,
                    HeaderValue::from_static("application/json"),
                );
                response
            }
            Err(err) => refused(&err),
        },
        Some(wait) => match access.request(message, &context, wait, 1).await {
            Ok(replies) => {
                let Some(reply) = replies.into_iter().next() else {
                    return answer(StatusCode::GATEWAY_TIMEOUT, "no reply");
                };
                let mut response = http::Response::new(respond::full(reply.body));
                if let Some(value) = reply
                    .content_type
                    .as_deref()
                    .and_then(|t| HeaderValue::from_str(t).ok())
                {
                    response
                        .headers_mut()
                        .insert(http::header::CONTENT_TYPE, value);
                }
                response
            }
            Err(err) => refused(&err),
        },
    }
}

/// The answer to a publish that failed.
fn refused(err: &MessagingError) -> http::Response<WasiBody> {
    let (status, retry_after) = match err {
        MessagingError::Invalid(_) => (StatusCode::BAD_REQUEST, None),
        MessagingError::Denied(_) => (StatusCode::FORBIDDEN, None),
        MessagingError::Broker(BrokerError::Full(_) | BrokerError::Unavailable(_)) => {
            (StatusCode::SERVICE_UNAVAILABLE, Some(1))
        }
        MessagingError::Broker(BrokerError::Quota(_, wait)) => {
            // Whole seconds, rounded up: never "0".
            let seconds = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
            (StatusCode::TOO_MANY_REQUESTS, Some(seconds.max(1)))
        }
        MessagingError::Broker(BrokerError::Other(_)) => (StatusCode::BAD_GATEWAY, None),
        MessagingError::Timeout(_) => (StatusCode::GATEWAY_TIMEOUT, None),
    };
    let mut response = answer(status, &err.to_string());
    if let Some(seconds) = retry_after {
        response
            .headers_mut()
            .insert(http::header::RETRY_AFTER, HeaderValue::from(seconds));
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_tell_when_to_come_back() {
        let retry_after = |err: MessagingError| {
            let response = refused(&err);
            let header = response
                .headers()
                .get(http::header::RETRY_AFTER)
                .map(|v| v.to_str().unwrap().to_string());
            (response.status().as_u16(), header)
        };
        assert_eq!(
            retry_after(MessagingError::Broker(BrokerError::Quota(
                "q".into(),
                Duration::from_millis(1500)
            ))),
            (429, Some("2".into()))
        );
        assert_eq!(
            retry_after(MessagingError::Broker(BrokerError::Quota(
                "q".into(),
                Duration::ZERO
            ))),
            (429, Some("1".into()))
        );
        assert_eq!(
            retry_after(MessagingError::Broker(BrokerError::Full("f".into()))),
            (503, Some("1".into()))
        );
        assert_eq!(retry_after(MessagingError::Denied("d".into())), (403, None));
    }

    #[test]
    fn reply_within_is_parsed_from_the_query() {
        assert_eq!(reply_within(None), Ok(None));
        assert_eq!(reply_within(Some("a=1")), Ok(None));
        assert_eq!(
            reply_within(Some("a=1&reply-within=2s")),
            Ok(Some(Duration::from_secs(2)))
        );
        assert!(reply_within(Some("reply-within=soon")).is_err());
        let err = reply_within(Some("reply-within=300000000000y")).unwrap_err();
        assert!(err.contains("longest allowed"), "{err}");
    }
}
