//! The HTTP body type Wharf serves and the host's own small responses
//! (404, 413, 500, 503, 504 ...), always with a one-line text body.

use bytes::Bytes;
use http::{HeaderValue, StatusCode};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Empty, Full};

/// The body of every response Wharf produces: a guest's streamed body or one
/// of the host's own. It is the body type of wasmtime's wasi:http.
pub type Body = UnsyncBoxBody<Bytes, wasmtime_wasi_http::Error>;

/// A body holding `bytes`.
pub fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed_unsync()
}

/// An empty body.
pub fn empty() -> Body {
    Empty::new().map_err(|never| match never {}).boxed_unsync()
}

/// A `text/plain` response whose body is `message` and a newline.
pub fn text(status: StatusCode, message: &str) -> http::Response<Body> {
    let mut response = http::Response::new(full(format!("{message}\n")));
    *response.status_mut() = status;
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}
