//! Echoes the request it received as JSON, so tests can see exactly what a
//! guest is shown: method, scheme, authority, path with query, headers, body.

use kit::wasip2;
use serde_json::{Value, json};
use wasip2::http::types::{IncomingRequest, ResponseOutparam};

struct Echo;

impl wasip2::exports::http::incoming_handler::Guest for Echo {
    fn handle(request: IncomingRequest, out: ResponseOutparam) {
        let headers: Vec<Value> = request
            .headers()
            .entries()
            .into_iter()
            .map(|(name, value)| json!([name, String::from_utf8_lossy(&value)]))
            .collect();
        let body = kit::read_body(&request);
        let document = json!({
            "method": kit::method_name(&request.method()),
            "scheme": kit::scheme_name(request.scheme()),
            "authority": request.authority().unwrap_or_default(),
            "path": request.path_with_query().unwrap_or_default(),
            "headers": headers,
            "body_len": body.len(),
            "body": String::from_utf8_lossy(&body),
        });
        kit::respond(
            out,
            200,
            &[("content-type", "application/json")],
            document.to_string().as_bytes(),
        );
    }
}

wasip2::http::proxy::export!(Echo with_types_in wasip2);
