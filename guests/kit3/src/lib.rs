//! Helpers shared by the WASI 0.3 example guests (`wasi:http/handler@0.3.0`,
//! written with the `wasip3` crate): read a body, answer with bytes or a
//! stream, send a request to a URL.

pub use wasip3;

use wasip3::http::types::{ErrorCode, Fields, Method, Request, Response, Scheme};
use wasip3::wit_bindgen::rt::async_support::{StreamReader, StreamWriter};
use wasip3::wit_bindgen::{self, StreamResult};
use wasip3::{wit_future, wit_stream};

/// How much of a body is read at a time.
const CHUNK: usize = 16 * 1024;

/// A response with `status`, `headers` and a body written by `write`, a
/// task that runs after the handler has returned the response.
pub fn streaming_response<F, Fut>(
    status: u16,
    headers: &[(&str, &str)],
    write: F,
) -> Result<Response, ErrorCode>
where
    F: FnOnce(StreamWriter<u8>) -> Fut,
    Fut: Future<Output = ()> + 'static,
{
    let fields = Fields::new();
    for (name, value) in headers {
        fields
            .append(name, value.as_bytes())
            .map_err(|err| ErrorCode::InternalError(Some(format!("header {name}: {err:?}"))))?;
    }
    let (body_tx, body_rx) = wit_stream::new();
    let (_trailers_tx, trailers_rx) = wit_future::new(|| Ok(None));
    let (response, _sent) = Response::new(fields, Some(body_rx), trailers_rx);
    response
        .set_status_code(status)
        .map_err(|()| ErrorCode::InternalError(Some(format!("bad status {status}"))))?;
    wit_bindgen::spawn_local(write(body_tx));
    Ok(response)
}

/// A response with `status`, `headers` and `body`.
pub fn respond(
    status: u16,
    headers: &[(&str, &str)],
    body: Vec<u8>,
) -> Result<Response, ErrorCode> {
    streaming_response(status, headers, |mut writer| async move {
        writer.write_all(body).await;
    })
}

/// A plain-text response.
pub fn text(status: u16, body: &str) -> Result<Response, ErrorCode> {
    respond(
        status,
        &[("content-type", "text/plain")],
        body.as_bytes().to_vec(),
    )
}

/// Reads `stream` to its end.
pub async fn read_all(mut stream: StreamReader<u8>) -> Vec<u8> {
    let mut body = Vec::new();
    loop {
        let (result, chunk) = stream.read(Vec::with_capacity(CHUNK)).await;
        body.extend_from_slice(&chunk);
        if !matches!(result, StreamResult::Complete(_)) {
            return body;
        }
    }
}

/// The body stream of `request`.
pub fn request_body(request: Request) -> StreamReader<u8> {
    let (_done_tx, done_rx) = wit_future::new(|| Ok(()));
    let (body, _trailers) = Request::consume_body(request, done_rx);
    body
}

/// The value of query parameter `name` in `path`, if present.
pub fn query_param(path: &str, name: &str) -> Option<String> {
    let query = path.split_once('?')?.1;
    query.split('&').find_map(|pair| {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        (key == name).then(|| value.to_string())
    })
}

/// The first value of header `name` of `fields`, as text.
pub fn header(fields: &Fields, name: &str) -> Option<String> {
    let values = fields.get(name);
    let value = values.first()?;
    Some(String::from_utf8_lossy(value).into_owned())
}

/// A response received from [`get`]: status and body.
pub struct Reply {
    /// The status code.
    pub status: u16,
    /// The whole body.
    pub body: Vec<u8>,
}

/// Sends a GET to `url` (`http://host[:port]/path`) through
/// `wasi:http/client` and reads the whole response.
pub async fn get(url: &str) -> Result<Reply, String> {
    let (scheme, rest) = url.split_once("://").ok_or("the URL has no scheme")?;
    let (authority, path) = match rest.find('/') {
        Some(slash) => (&rest[..slash], &rest[slash..]),
        None => (rest, "/"),
    };
    let (_trailers_tx, trailers_rx) = wit_future::new(|| Ok(None));
    let (request, _sent) = Request::new(Fields::new(), None, trailers_rx, None);
    let _ = request.set_method(&Method::Get);
    let scheme = match scheme {
        "http" => Scheme::Http,
        "https" => Scheme::Https,
        other => Scheme::Other(other.to_string()),
    };
    request
        .set_scheme(Some(&scheme))
        .map_err(|()| "bad scheme".to_string())?;
    request
        .set_authority(Some(authority))
        .map_err(|()| format!("bad authority {authority:?}"))?;
    request
        .set_path_with_query(Some(path))
        .map_err(|()| format!("bad path {path:?}"))?;
    let response = wasip3::http::client::send(request)
        .await
        .map_err(|code| format!("{code:?}"))?;
    let status = response.get_status_code();
    let (_done_tx, done_rx) = wit_future::new(|| Ok(()));
    let (body, _trailers) = Response::consume_body(response, done_rx);
    Ok(Reply {
        status,
        body: read_all(body).await,
    })
}
