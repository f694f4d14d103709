//! The gateway of the microservice demo: calls the `users` and `orders`
//! services (in-process, through `http://NAME.internal`) and merges their
//! JSON — the classic "microservice 1 calls microservice 2" shape. Needs
//! `allow = ["http://users.internal", "http://orders.internal"]` in its
//! manifest.
//!
//! - `GET /` — every user and the orders: `{"users": [...], "orders": ...}`
//! - `GET /?user=ID` — that user and their orders: `{"user": {...}, "orders": ...}`

use kit::wasip2;
use serde_json::{Value, json};
use wasip2::http::types::{IncomingRequest, ResponseOutparam};

struct Gateway;

/// Calls a service and parses its JSON answer.
fn call(service: &str, path: &str) -> Result<Value, (u16, String)> {
    let url = format!("http://{service}.internal{path}");
    let reply =
        kit::fetch("GET", &url, &[], &[]).map_err(|err| (502, format!("{service}: {err}")))?;
    if reply.status != 200 {
        return Err((reply.status, format!("{service} answered {}", reply.status)));
    }
    serde_json::from_slice(&reply.body).map_err(|err| (502, format!("{service}: bad JSON: {err}")))
}

impl wasip2::exports::http::incoming_handler::Guest for Gateway {
    fn handle(request: IncomingRequest, out: ResponseOutparam) {
        let path = request.path_with_query().unwrap_or_default();
        let merged = match kit::query_param(&path, "user") {
            Some(user) => call("users", &format!("/{user}")).and_then(|found| {
                let orders = call("orders", &format!("/?user={user}"))?;
                Ok(json!({"user": found, "orders": orders}))
            }),
            None => call("users", "/").and_then(|users| {
                let orders = call("orders", "/")?;
                Ok(json!({"users": users, "orders": orders}))
            }),
        };
        let json_type = &[("content-type", "application/json")];
        match merged {
            Ok(document) => kit::respond(out, 200, json_type, document.to_string().as_bytes()),
            Err((status, error)) => {
                let status = if status >= 400 { status } else { 502 };
                kit::respond(
                    out,
                    status,
                    json_type,
                    json!({"error": error}).to_string().as_bytes(),
                )
            }
        }
    }
}

wasip2::http::proxy::export!(Gateway with_types_in wasip2);
