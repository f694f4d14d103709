//! Helpers shared by the example guests: reading a request body and sending a
//! complete response through `wasi:http` with as little ceremony as possible.

use std::io::{Read, Write};

use wasip2::http::types::{
    Fields, IncomingRequest, Method, OutgoingBody, OutgoingResponse, ResponseOutparam, Scheme,
};

pub use wasip2;

/// Reads the whole request body into memory.
pub fn read_body(request: &IncomingRequest) -> Vec<u8> {
    let mut buf = Vec::new();
    let Ok(body) = request.consume() else {
        return buf;
    };
    if let Ok(mut stream) = body.stream() {
        // A broken client stream just ends the body early.
        let _ = stream.read_to_end(&mut buf);
    }
    buf
}

/// The request method as the HTTP token (`GET`, `POST`, ...).
pub fn method_name(method: &Method) -> String {
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

/// The request scheme as text (`http`, `https`, ...), empty if unset.
pub fn scheme_name(scheme: Option<Scheme>) -> String {
    match scheme {
        Some(Scheme::Http) => "http".into(),
        Some(Scheme::Https) => "https".into(),
        Some(Scheme::Other(other)) => other,
        None => String::new(),
    }
}

/// Query parameter `name` from a path such as `/x?a=1&b=2`.
pub fn query_param<'a>(path_with_query: &'a str, name: &str) -> Option<&'a str> {
    let (_, query) = path_with_query.split_once('?')?;
    query.split('&').find_map(|pair| {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        (key == name).then_some(value)
    })
}

/// A query parameter, percent-decoded (`+` is a space); `None` if it is
/// absent or does not decode to UTF-8.
pub fn query_text(path_with_query: &str, name: &str) -> Option<String> {
    let raw = query_param(path_with_query, name)?;
    let mut bytes = Vec::with_capacity(raw.len());
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

/// A response body being written: the body resource and its one stream.
pub struct BodyWriter {
    // Field order is drop order: a child stream must go before its body,
    // or dropping the body traps ("resource has children").
    stream: Option<wasip2::io::streams::OutputStream>,
    body: OutgoingBody,
}

impl BodyWriter {
    fn new(body: OutgoingBody) -> BodyWriter {
        // `write` may be called once per body; a fresh body always allows it.
        let stream = body.write().ok();
        BodyWriter { body, stream }
    }

    /// Writes `bytes`, blocking until the host took them. Returns false if
    /// the stream is closed (the client went away).
    pub fn write(&mut self, bytes: &[u8]) -> bool {
        match &mut self.stream {
            Some(stream) => stream
                .write_all(bytes)
                .and_then(|()| stream.flush())
                .is_ok(),
            None => false,
        }
    }

    /// Ends the body.
    pub fn finish(mut self) {
        // The stream must be dropped before the body is finished.
        drop(self.stream.take());
        let _ = OutgoingBody::finish(self.body, None);
    }
}

/// Starts a response: sets status and headers and hands the outparam the
/// response. Returns the body for the caller to write into and finish.
pub fn start_response(out: ResponseOutparam, status: u16, headers: &[(&str, &str)]) -> BodyWriter {
    let fields = Fields::new();
    for (name, value) in headers {
        // Guests here only use static, valid header names.
        let _ = fields.append(name, &value.as_bytes().to_vec());
    }
    let response = OutgoingResponse::new(fields);
    let _ = response.set_status_code(status);
    let body = response.body().expect("a new response has a body");
    ResponseOutparam::set(out, Ok(response));
    BodyWriter::new(body)
}

/// Sends a complete response with the given status, headers and body.
pub fn respond(out: ResponseOutparam, status: u16, headers: &[(&str, &str)], body: &[u8]) {
    let mut writer = start_response(out, status, headers);
    if !body.is_empty() {
        writer.write(body);
    }
    writer.finish();
}

/// A complete HTTP response received from an outgoing request.
pub struct Reply {
    /// The status code.
    pub status: u16,
    /// The response headers, in order.
    pub headers: Vec<(String, Vec<u8>)>,
    /// The whole response body.
    pub body: Vec<u8>,
}

impl Reply {
    /// The first value of header `name`, as text.
    pub fn header(&self, name: &str) -> Option<String> {
        self.headers
            .iter()
            .find(|(key, _)| key.eq_ignore_ascii_case(name))
            .map(|(_, value)| String::from_utf8_lossy(value).into_owned())
    }
}

/// Sends an HTTP request through `wasi:http/outgoing-handler` and waits for
/// the whole response. `url` is `scheme://authority/path?query`.
pub fn fetch(
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Result<Reply, String> {
    use wasip2::http::outgoing_handler;
    use wasip2::http::types::OutgoingRequest;

    let (scheme, rest) = url
        .split_once("://")
        .ok_or_else(|| format!("{url:?} has no scheme"))?;
    let (authority, path) = match rest.find('/') {
        Some(at) => rest.split_at(at),
        None => (rest, "/"),
    };
    let fields = Fields::new();
    for (name, value) in headers {
        fields
            .append(name, &value.as_bytes().to_vec())
            .map_err(|err| format!("header {name}: {err:?}"))?;
    }
    let request = OutgoingRequest::new(fields);
    let method = match method {
        "GET" => Method::Get,
        "POST" => Method::Post,
        "PUT" => Method::Put,
        "DELETE" => Method::Delete,
        "HEAD" => Method::Head,
        other => Method::Other(other.to_string()),
    };
    let scheme = match scheme {
        "http" => Scheme::Http,
        "https" => Scheme::Https,
        other => Scheme::Other(other.to_string()),
    };
    request
        .set_method(&method)
        .and_then(|()| request.set_scheme(Some(&scheme)))
        .and_then(|()| request.set_authority(Some(authority)))
        .and_then(|()| request.set_path_with_query(Some(path)))
        .map_err(|()| format!("invalid request target {url:?}"))?;
    let outgoing_body = request
        .body()
        .map_err(|()| "request body already taken".to_string())?;
    let pending = outgoing_handler::handle(request, None).map_err(|err| format!("{err:?}"))?;
    let mut writer = BodyWriter::new(outgoing_body);
    // A server may answer before it read the body (a refusal, a 413): then
    // the write fails, and the answer is what the caller wants to see.
    let sent = body.is_empty() || writer.write(body);
    drop(writer.stream.take());
    let finished = OutgoingBody::finish(writer.body, None);
    if sent {
        finished.map_err(|err| format!("{err:?}"))?;
    }

    let response = loop {
        match pending.get() {
            Some(result) => break result,
            None => pending.subscribe().block(),
        }
    };
    let response = response
        .map_err(|()| "response already taken".to_string())?
        .map_err(|err| format!("{err:?}"))?;
    let status = response.status();
    let headers = response.headers().entries();
    let mut bytes = Vec::new();
    if let Ok(incoming) = response.consume() {
        if let Ok(mut stream) = incoming.stream() {
            stream
                .read_to_end(&mut bytes)
                .map_err(|err| format!("reading response body: {err}"))?;
        }
    }
    Ok(Reply {
        status,
        headers,
        body: bytes,
    })
}
