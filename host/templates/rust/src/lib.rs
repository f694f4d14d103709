//! {{name}}: a Wharf service. It answers
//!
//! - `GET /` with a JSON greeting (its text from the GREETING variable),
//! - `GET /hello?name=Ada` with a greeting for the query parameter,
//! - `POST /echo` with the request body it was sent and its length,
//! - `GET /count` with a counter kept in the `{{name}}` bucket,
//! - `POST /publish` by publishing the body to `{{name}}.events`,
//! - anything else with 404 and the method and path it did not know.
//!
//! Wharf strips the service's route (`/{{name}}`) from the path first.

use std::io::{Read as _, Write as _};

mod wharf;

use wasip2::http::types::{
    Fields, IncomingRequest, Method, OutgoingBody, OutgoingResponse, ResponseOutparam,
};

struct Service;

impl wasip2::exports::http::incoming_handler::Guest for Service {
    fn handle(request: IncomingRequest, out: ResponseOutparam) {
        let path_with_query = request.path_with_query().unwrap_or_else(|| "/".into());
        let (path, query) = path_with_query
            .split_once('?')
            .unwrap_or((path_with_query.as_str(), ""));
        let greeting = std::env::var("GREETING").unwrap_or_else(|_| "Hello".into());
        let (status, body) = match (request.method(), path) {
            (Method::Get, "/") => (200, format!(r#"{{"message":"{greeting} from {{name}}!"}}"#)),
            (Method::Get, "/hello") => {
                let name = query_param(query, "name").unwrap_or_else(|| "world".into());
                (200, format!(r#"{{"message":"{greeting}, {}!"}}"#, json_escape(&name)))
            }
            (Method::Post, "/echo") => {
                let body = read_body(&request);
                let text = String::from_utf8_lossy(&body);
                (
                    200,
                    format!(
                        r#"{{"received":"{}","bytes":{}}}"#,
                        json_escape(&text),
                        body.len()
                    ),
                )
            }
            // State: the "{{name}}" bucket, granted in {{name}}.toml.
            (Method::Get, "/count") => match wharf::Bucket::open("{{name}}")
                .and_then(|bucket| bucket.increment("count", 1))
            {
                Ok(count) => (200, format!(r#"{{"count":{count}}}"#)),
                Err(why) => (500, format!(r#"{{"error":"{}"}}"#, json_escape(&why))),
            },
            // Messages: {{name}}.events, granted in {{name}}.toml.
            (Method::Post, "/publish") => {
                let body = read_body(&request);
                match wharf::publish("{{name}}.events", &body, "text/plain") {
                    Ok(sent) => (202, sent),
                    Err(why) => (500, format!(r#"{{"error":"{}"}}"#, json_escape(&why))),
                }
            }
            (method, path) => (
                404,
                format!(
                    r#"{{"error":"no route for {} {}"}}"#,
                    method_name(&method),
                    json_escape(path)
                ),
            ),
        };
        respond(out, status, body.as_bytes());
    }
}

wasip2::http::proxy::export!(Service with_types_in wasip2);

/// Sends a JSON response.
fn respond(out: ResponseOutparam, status: u16, body: &[u8]) {
    let headers = Fields::new();
    let _ = headers.append("content-type", b"application/json");
    let response = OutgoingResponse::new(headers);
    let _ = response.set_status_code(status);
    let outgoing = response.body().expect("a new response has a body");
    ResponseOutparam::set(out, Ok(response));
    if let Ok(mut stream) = outgoing.write() {
        let _ = stream
            .write_all(body)
            .and_then(|()| std::io::Write::flush(&mut stream));
    }
    let _ = OutgoingBody::finish(outgoing, None);
}

/// The method as HTTP spells it.
fn method_name(method: &Method) -> String {
    match method {
        Method::Get => "GET".into(),
        Method::Head => "HEAD".into(),
        Method::Post => "POST".into(),
        Method::Put => "PUT".into(),
        Method::Delete => "DELETE".into(),
        Method::Connect => "CONNECT".into(),
        Method::Options => "OPTIONS".into(),
        Method::Trace => "TRACE".into(),
        Method::Patch => "PATCH".into(),
        Method::Other(other) => other.clone(),
    }
}

/// Reads the whole request body.
fn read_body(request: &IncomingRequest) -> Vec<u8> {
    let mut bytes = Vec::new();
    if let Ok(body) = request.consume()
        && let Ok(mut stream) = body.stream()
    {
        let _ = stream.read_to_end(&mut bytes);
    }
    bytes
}

/// A query parameter, percent-decoded.
fn query_param(query: &str, name: &str) -> Option<String> {
    let raw = query.split('&').find_map(|pair| {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        (key == name).then_some(value)
    })?;
    let mut bytes = Vec::new();
    let mut rest = raw.as_bytes();
    while let Some((&byte, tail)) = rest.split_first() {
        match byte {
            b'%' if tail.len() >= 2 => {
                let hex = std::str::from_utf8(&tail[..2]).ok()?;
                bytes.push(u8::from_str_radix(hex, 16).ok()?);
                rest = &tail[2..];
            }
            b'+' => {
                bytes.push(b' ');
                rest = tail;
            }
            _ => {
                bytes.push(byte);
                rest = tail;
            }
        }
    }
    String::from_utf8(bytes).ok()
}

/// `text` as the inside of a JSON string.
fn json_escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out
}
