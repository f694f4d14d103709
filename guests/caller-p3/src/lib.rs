//! A WASI 0.3 service calling another: `GET /?url=http://NAME.internal/PATH`
//! sends a GET there through `wasi:http/client` (in-process for
//! `NAME.internal`, whatever WASI version NAME is built for) and answers
//! `called URL: STATUS` and the callee's body. Its manifest must allow the
//! URL (`[outbound] allow`).

use kit3::wasip3;
use kit3::wasip3::http::types::{ErrorCode, Request, Response};

wasip3::http::service::export!(Caller);

struct Caller;

impl wasip3::exports::http::handler::Guest for Caller {
    async fn handle(request: Request) -> Result<Response, ErrorCode> {
        let path = request.get_path_with_query().unwrap_or_default();
        let Some(url) = kit3::query_param(&path, "url") else {
            return kit3::text(400, "give ?url=http://NAME.internal/PATH");
        };
        match kit3::get(&url).await {
            Ok(reply) => {
                let mut body = format!("called {url}: {}\n", reply.status).into_bytes();
                body.extend_from_slice(&reply.body);
                kit3::respond(200, &[("content-type", "text/plain")], body)
            }
            Err(error) => kit3::text(502, &format!("calling {url} failed: {error}")),
        }
    }
}
