//! The WASI 0.3 echo service: streams the request body back while it is
//! still arriving (a chunk read is a chunk written), and says in `x-echo-*`
//! headers what the guest was shown: method, scheme, authority, path, and
//! the request id and `traceparent` the host passed on.

use kit3::wasip3;
use kit3::wasip3::http::types::{ErrorCode, Method, Request, Response, Scheme};
use kit3::wasip3::wit_bindgen::StreamResult;

wasip3::http::service::export!(Echo);

struct Echo;

impl wasip3::exports::http::handler::Guest for Echo {
    async fn handle(request: Request) -> Result<Response, ErrorCode> {
        let headers = request.get_headers();
        let seen = [
            ("x-echo-method", method_name(&request.get_method())),
            ("x-echo-scheme", scheme_name(request.get_scheme())),
            (
                "x-echo-authority",
                request.get_authority().unwrap_or_default(),
            ),
            (
                "x-echo-path",
                request.get_path_with_query().unwrap_or_default(),
            ),
            (
                "x-echo-request-id",
                kit3::header(&headers, "x-request-id").unwrap_or_default(),
            ),
            (
                "x-echo-traceparent",
                kit3::header(&headers, "traceparent").unwrap_or_default(),
            ),
        ];
        let content_type = kit3::header(&headers, "content-type")
            .unwrap_or_else(|| "application/octet-stream".to_string());
        let mut response_headers: Vec<(&str, &str)> = seen
            .iter()
            .map(|(name, value)| (*name, value.as_str()))
            .collect();
        response_headers.push(("content-type", &content_type));
        let mut incoming = kit3::request_body(request);
        kit3::streaming_response(200, &response_headers, |mut outgoing| async move {
            loop {
                let (result, chunk) = incoming.read(Vec::with_capacity(16 * 1024)).await;
                if !chunk.is_empty() && !outgoing.write_all(chunk).await.is_empty() {
                    return; // the client went away
                }
                if !matches!(result, StreamResult::Complete(_)) {
                    return;
                }
            }
        })
    }
}

fn method_name(method: &Method) -> String {
    match method {
        Method::Get => "GET",
        Method::Head => "HEAD",
        Method::Post => "POST",
        Method::Put => "PUT",
        Method::Delete => "DELETE",
        Method::Connect => "CONNECT",
        Method::Options => "OPTIONS",
        Method::Trace => "TRACE",
        Method::Patch => "PATCH",
        Method::Other(other) => other,
    }
    .to_string()
}

fn scheme_name(scheme: Option<Scheme>) -> String {
    match scheme {
        Some(Scheme::Http) => "http".to_string(),
        Some(Scheme::Https) => "https".to_string(),
        Some(Scheme::Other(other)) => other,
        None => String::new(),
    }
}
