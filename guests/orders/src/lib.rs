//! An orders microservice: `GET /` lists orders, `GET /?user=ID` filters
//! them by user.

use kit::wasip2;
use serde_json::json;
use wasip2::http::types::{IncomingRequest, ResponseOutparam};

struct Orders;

const ORDERS: &[(u64, u64, &str)] = &[
    (100, 1, "keyboard"),
    (101, 2, "compiler"),
    (102, 1, "coffee"),
];

impl wasip2::exports::http::incoming_handler::Guest for Orders {
    fn handle(request: IncomingRequest, out: ResponseOutparam) {
        let path = request.path_with_query().unwrap_or_default();
        let user: Option<u64> = kit::query_param(&path, "user").and_then(|u| u.parse().ok());
        let orders: Vec<_> = ORDERS
            .iter()
            .filter(|(_, owner, _)| user.is_none_or(|u| u == *owner))
            .map(|(id, owner, item)| json!({"id": id, "user_id": owner, "item": item}))
            .collect();
        kit::respond(
            out,
            200,
            &[("content-type", "application/json")],
            json!(orders).to_string().as_bytes(),
        );
    }
}

wasip2::http::proxy::export!(Orders with_types_in wasip2);
