//! A test service for messaging. It publishes through each of the three
//! ways a guest can — `wasi:messaging@0.2.0-draft`, `wasmcloud:messaging@0.2.0`
//! and an HTTP POST to `messages.internal` — and handles the messages and
//! schedule ticks a trigger POSTs to it, recording each in the `msgs`
//! key-value bucket so tests can count what arrived:
//!
//! | request | what it does |
//! | --- | --- |
//! | `POST /publish?topic=T[&n=N][&prefix=P][&via=wasi\|wasmcloud\|http]` | publishes the body, or N messages `P0`…`P(N-1)` |
//! | `POST /publish?topic=T&key=K` | publishes with the `message-key` metadata K (wasi:messaging) |
//! | `POST /publish?topic=T&stamp=1` | publishes `stamp=NANOS`, the wall-clock time of the publish |
//! | `POST /request?topic=T[&timeout_ms=MS][&via=…]` | sends the body as a request: 200 with the reply |
//! | `POST /record` | handler: records the message (`seen:GROUP:BODY` += 1) |
//! | `POST /fail` | handler: fails every message whose body starts with `poison`, records the rest |
//! | `POST /append` | handler: appends the body to `log:GROUP` (for ordering; use with concurrency 1) |
//! | `POST /flaky` | handler: fails the first two attempts, then records |
//! | `POST /slow?ms=MS` | handler: waits, then records |
//! | `POST /reply` | handler: answers `re:BODY` (the reply to a request) |
//! | `POST /tick?name=N` | schedule: counts `ticks:N`, and each due time under group `tick-N` |
//! | `POST /noop` | handler: does nothing (the benchmark's trivial handler) |
//! | `POST /latency` | handler: logs `latency_us=N`, the time since the body's `stamp=` (see `/publish`) |
//! | `GET /seen?group=G` | `{"BODY": times, …}` for group G |
//! | `GET /count?key=K` | the counter K |
//! | `GET /last?group=G` | the last recorded message's headers, as JSON |
//!
//! A failed publish answers 403 (permission denied), 503 (broker
//! unavailable), 504 (timeout) or 500, with the error as the body.

use kit::wasip2;
use wasip2::http::types::{IncomingRequest, ResponseOutparam};

mod messaging {
    wit_bindgen::generate!({
        path: "../../wit/messaging-0.2.0-draft",
        world: "wasi:messaging/imports-request-reply@0.2.0-draft",
        generate_all,
    });
}

mod wasmcloud {
    wit_bindgen::generate!({
        path: "../../wit/wasmcloud-messaging-0.2.0",
        world: "wasmcloud:messaging/messaging@0.2.0",
        generate_all,
    });
}

mod keyvalue {
    wit_bindgen::generate!({
        path: "../../wit/keyvalue-0.2.0-draft",
        world: "wasi:keyvalue/imports@0.2.0-draft",
        generate_all,
    });
}

use keyvalue::wasi::keyvalue::{atomics, store};
use messaging::wasi::messaging::{producer, request_reply, types as wasi};
use wasmcloud::wasmcloud::messaging::{consumer, types::BrokerMessage};

/// Where the handlers record what they received.
const BUCKET: &str = "msgs";

struct Messenger;

/// What a request answers: status and body.
type Answer = (u16, Vec<u8>);

fn text(status: u16, body: impl Into<String>) -> Answer {
    (status, body.into().into_bytes())
}

fn wasi_error(err: wasi::Error) -> Answer {
    match err {
        wasi::Error::Timeout => text(504, "timeout"),
        wasi::Error::Connection(why) => text(503, format!("connection: {why}")),
        wasi::Error::PermissionDenied(why) => text(403, format!("permission-denied: {why}")),
        wasi::Error::Other(why) => text(500, format!("other: {why}")),
    }
}

/// wasmcloud:messaging errors are plain strings: the host's wording says
/// which kind.
fn wasmcloud_error(why: String) -> Answer {
    let status = if why.contains("may not") || why.contains("not granted") {
        403
    } else if why.contains("unavailable") || why.contains("full") {
        503
    } else if why.contains("no reply") || why.contains("time") {
        504
    } else {
        500
    };
    text(status, why)
}

fn kv_error(err: store::Error) -> Answer {
    match err {
        store::Error::NoSuchStore => text(500, "no-such-store"),
        store::Error::AccessDenied => text(500, "access-denied"),
        store::Error::Other(why) => text(500, format!("key-value: {why}")),
    }
}

fn header(request: &IncomingRequest, name: &str) -> String {
    request
        .headers()
        .get(&name.to_string())
        .first()
        .map(|value| String::from_utf8_lossy(value).into_owned())
        .unwrap_or_default()
}

/// Publishes `body` to `topic` the way `via` says (with `key` as its
/// `message-key` metadata, through wasi:messaging).
fn publish(via: &str, topic: &str, body: &[u8], key: Option<&str>) -> Result<(), Answer> {
    match via {
        "wasmcloud" => consumer::publish(&BrokerMessage {
            subject: topic.to_string(),
            body: body.to_vec(),
            reply_to: None,
        })
        .map_err(wasmcloud_error),
        "http" => {
            let reply = kit::fetch(
                "POST",
                &format!("http://messages.internal/{topic}"),
                &[("content-type", "text/plain")],
                body,
            )
            .map_err(|why| text(500, why))?;
            if reply.status == 202 {
                Ok(())
            } else {
                Err((reply.status, reply.body))
            }
        }
        _ => {
            let client = wasi::Client::connect("default").map_err(wasi_error)?;
            let message = wasi::Message::new(body);
            message.set_content_type("text/plain");
            message.add_metadata("sent-by", "messenger");
            if let Some(key) = key {
                message.add_metadata("message-key", key);
            }
            producer::send(&client, &topic.to_string(), message).map_err(wasi_error)
        }
    }
}

/// Sends `body` as a request to `topic` and returns the first reply.
fn request(via: &str, topic: &str, body: &[u8], timeout_ms: u32) -> Result<Vec<u8>, Answer> {
    match via {
        "wasmcloud" => consumer::request(topic, body, timeout_ms)
            .map(|reply| reply.body)
            .map_err(wasmcloud_error),
        "http" => {
            let reply = kit::fetch(
                "POST",
                &format!("http://messages.internal/{topic}?reply-within={timeout_ms}ms"),
                &[],
                body,
            )
            .map_err(|why| text(500, why))?;
            if reply.status == 200 {
                Ok(reply.body)
            } else {
                Err((reply.status, reply.body))
            }
        }
        _ => {
            let client = wasi::Client::connect("default").map_err(wasi_error)?;
            let message = wasi::Message::new(body);
            let options = request_reply::RequestOptions::new();
            options.set_timeout_ms(timeout_ms);
            let replies =
                request_reply::request(&client, &topic.to_string(), &message, Some(options))
                    .map_err(wasi_error)?;
            replies
                .first()
                .map(|reply| reply.data())
                .ok_or_else(|| text(504, "no reply"))
        }
    }
}

fn bucket() -> Result<store::Bucket, Answer> {
    store::open(BUCKET).map_err(kv_error)
}

/// Records a handled message under its group.
fn record(request: &IncomingRequest, body: &[u8]) -> Result<Answer, Answer> {
    let bucket = bucket()?;
    let group = header(request, "x-wharf-group");
    let last = format!(
        "{{\"topic\":{:?},\"attempt\":{:?},\"message_id\":{:?},\"published_ms\":{:?},\"request_id\":{:?},\"traceparent\":{:?},\"content_type\":{:?},\"sent_by\":{:?}}}",
        header(request, "x-wharf-topic"),
        header(request, "x-wharf-attempt"),
        header(request, "x-wharf-message-id"),
        header(request, "x-wharf-published-ms"),
        header(request, "x-request-id"),
        header(request, "traceparent"),
        header(request, "content-type"),
        header(request, "sent-by"),
    );
    bucket
        .set(&format!("last:{group}"), &last.into_bytes())
        .map_err(kv_error)?;
    // Counted last, so a message that shows in `/seen` already has its
    // headers in `/last` (tests read one after waiting on the other).
    let key = format!("seen:{group}:{}", String::from_utf8_lossy(body));
    atomics::increment(&bucket, &key, 1).map_err(kv_error)?;
    Ok(text(200, "recorded"))
}

/// Every key under `prefix` with its counter, as a JSON object.
fn seen(prefix: &str) -> Result<Answer, Answer> {
    let bucket = bucket()?;
    let mut cursor = None;
    let mut entries = Vec::new();
    loop {
        let page = bucket.list_keys(cursor).map_err(kv_error)?;
        for key in page.keys {
            if let Some(body) = key.strip_prefix(prefix) {
                let times = bucket
                    .get(&key)
                    .map_err(kv_error)?
                    .map(|value| String::from_utf8_lossy(&value).into_owned())
                    .unwrap_or_else(|| "0".into());
                entries.push(format!("{body:?}:{times}"));
            }
        }
        match page.cursor {
            Some(next) => cursor = Some(next),
            None => break,
        }
    }
    Ok(text(200, format!("{{{}}}", entries.join(","))))
}

fn wall_clock_nanos() -> u128 {
    let now = wasip2::clocks::wall_clock::now();
    u128::from(now.seconds) * 1_000_000_000 + u128::from(now.nanoseconds)
}

fn sleep_ms(ms: u64) {
    wasip2::clocks::monotonic_clock::subscribe_duration(ms * 1_000_000).block();
}

fn answer(request: &IncomingRequest) -> Result<Answer, Answer> {
    let path = request.path_with_query().unwrap_or_default();
    let route = path.split('?').next().unwrap_or("/").to_string();
    let method = kit::method_name(&request.method());
    let param = |name: &str| kit::query_text(&path, name);
    match (method.as_str(), route.as_str()) {
        ("POST", "/publish") => {
            let topic = param("topic").ok_or_else(|| text(400, "topic= is required"))?;
            let via = param("via").unwrap_or_default();
            let body = if param("stamp").is_some() {
                format!("stamp={}", wall_clock_nanos()).into_bytes()
            } else {
                kit::read_body(request)
            };
            let key = param("key");
            match param("n").and_then(|n| n.parse::<u32>().ok()) {
                None => publish(&via, &topic, &body, key.as_deref())?,
                Some(n) => {
                    let prefix = param("prefix").unwrap_or_default();
                    for i in 0..n {
                        publish(
                            &via,
                            &topic,
                            format!("{prefix}{i}").as_bytes(),
                            key.as_deref(),
                        )?;
                    }
                }
            }
            Ok(text(200, "published"))
        }
        ("POST", "/request") => {
            let topic = param("topic").ok_or_else(|| text(400, "topic= is required"))?;
            let via = param("via").unwrap_or_default();
            let timeout_ms = param("timeout_ms")
                .and_then(|ms| ms.parse().ok())
                .unwrap_or(2000);
            let body = kit::read_body(request);
            Ok((200, self::request(&via, &topic, &body, timeout_ms)?))
        }
        ("POST", "/record") => {
            let body = kit::read_body(request);
            record(request, &body)
        }
        ("POST", "/fail") => {
            let body = kit::read_body(request);
            if body.starts_with(b"poison") {
                return Ok(text(500, "poison: this message always fails"));
            }
            record(request, &body)
        }
        ("POST", "/append") => {
            let bucket = bucket()?;
            let key = format!("log:{}", header(request, "x-wharf-group"));
            let mut log = bucket.get(&key).map_err(kv_error)?.unwrap_or_default();
            if !log.is_empty() {
                log.push(b',');
            }
            log.extend(kit::read_body(request));
            bucket.set(&key, &log).map_err(kv_error)?;
            Ok(text(200, "appended"))
        }
        ("POST", "/flaky") => {
            let attempt: u32 = header(request, "x-wharf-attempt").parse().unwrap_or(0);
            if attempt < 3 {
                return Ok(text(503, format!("failing attempt {attempt}")));
            }
            let body = kit::read_body(request);
            record(request, &body)
        }
        ("POST", "/slow") => {
            let ms = param("ms").and_then(|ms| ms.parse().ok()).unwrap_or(100);
            sleep_ms(ms);
            let body = kit::read_body(request);
            record(request, &body)
        }
        ("POST", "/reply") => {
            let mut reply = b"re:".to_vec();
            reply.extend(kit::read_body(request));
            Ok((200, reply))
        }
        ("POST", "/noop") => Ok(text(200, "")),
        ("POST", "/latency") => {
            let body = kit::read_body(request);
            let stamp: u128 = String::from_utf8_lossy(&body)
                .strip_prefix("stamp=")
                .and_then(|n| n.parse().ok())
                .ok_or_else(|| text(400, "the body is not stamp=NANOS"))?;
            let latency_us = wall_clock_nanos().saturating_sub(stamp) / 1000;
            println!("latency_us={latency_us}");
            Ok(text(200, ""))
        }
        ("POST", "/tick") => {
            let name = param("name").unwrap_or_else(|| "default".into());
            let bucket = bucket()?;
            // Each due time too, so a tick run twice shows (`/seen?group=tick-N`).
            let due = header(request, "x-wharf-scheduled-ms");
            atomics::increment(&bucket, &format!("seen:tick-{name}:{due}"), 1).map_err(kv_error)?;
            atomics::increment(&bucket, &format!("ticks:{name}"), 1).map_err(kv_error)?;
            Ok(text(200, "tick"))
        }
        ("GET", "/seen") => seen(&format!("seen:{}:", param("group").unwrap_or_default())),
        ("GET", "/count") => {
            let key = param("key").ok_or_else(|| text(400, "key= is required"))?;
            let value = bucket()?
                .get(&key)
                .map_err(kv_error)?
                .unwrap_or_else(|| b"0".to_vec());
            Ok((200, value))
        }
        ("GET", "/last") => {
            let group = param("group").unwrap_or_default();
            match bucket()?.get(&format!("last:{group}")).map_err(kv_error)? {
                Some(last) => Ok((200, last)),
                None => Ok(text(404, "nothing recorded")),
            }
        }
        _ => Ok(text(404, "no such route")),
    }
}

impl wasip2::exports::http::incoming_handler::Guest for Messenger {
    fn handle(request: IncomingRequest, out: ResponseOutparam) {
        let (status, body) = answer(&request).unwrap_or_else(|err| err);
        kit::respond(out, status, &[("content-type", "text/plain")], &body);
    }
}

wasip2::http::proxy::export!(Messenger with_types_in wasip2);
