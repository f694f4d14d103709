//! The demo's billing service. It exports two interfaces:
//!
//! - `wasi:messaging/incoming-handler`: its trigger hands it every
//!   `orders.created` message; it writes one invoice per order into the
//!   `demo` bucket. Delivery is at least once, so the order id is the
//!   invoice's key and a redelivered order is billed only once.
//! - `wasi:http/incoming-handler`: `GET /` answers
//!   `{"invoices": N, "billed_cents": C}`, `GET /ORDER_ID` one invoice.

use kit::wasip2;
use serde_json::{Value, json};
use wasip2::http::types::{IncomingRequest, ResponseOutparam};

mod messaging {
    wit_bindgen::generate!({
        path: "../../wit/messaging-0.2.0-draft",
        world: "wasi:messaging/messaging-core@0.2.0-draft",
        generate_all,
        pub_export_macro: true,
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
use messaging::wasi::messaging::types::{Error, Message};

struct Billing;

fn kv_error(err: store::Error) -> String {
    match err {
        store::Error::NoSuchStore => "no-such-store".into(),
        store::Error::AccessDenied => "access-denied".into(),
        store::Error::Other(why) => why,
    }
}

fn counter(bucket: &store::Bucket, key: &str) -> Result<u64, String> {
    Ok(bucket
        .get(key)
        .map_err(kv_error)?
        .and_then(|value| String::from_utf8(value).ok()?.parse().ok())
        .unwrap_or(0))
}

/// Writes the invoice for `order` unless it exists already.
fn bill(order: &Value) -> Result<(), String> {
    let id = order["id"].as_u64().ok_or("the order has no numeric id")?;
    let cents = order["amount_cents"].as_u64().unwrap_or(0);
    let bucket = store::open("demo").map_err(kv_error)?;
    let key = format!("invoice:{id}");
    if bucket.exists(&key).map_err(kv_error)? {
        return Ok(()); // a redelivery: billed already
    }
    let invoice = json!({"order": id, "user_id": order["user_id"], "amount_cents": cents});
    bucket
        .set(&key, invoice.to_string().as_bytes())
        .map_err(kv_error)?;
    atomics::increment(&bucket, "invoices", 1).map_err(kv_error)?;
    atomics::increment(&bucket, "billed_cents", cents).map_err(kv_error)?;
    println!("billing: invoiced order {id} for {cents} cents");
    Ok(())
}

impl messaging::exports::wasi::messaging::incoming_handler::Guest for Billing {
    fn handle(message: Message) -> Result<(), Error> {
        let order: Value = serde_json::from_slice(&message.data())
            .map_err(|err| Error::Other(format!("not an order: {err}")))?;
        bill(&order).map_err(Error::Other)
    }
}

fn answer(path: &str) -> Result<(u16, Value), String> {
    let bucket = store::open("demo").map_err(kv_error)?;
    let id = path.trim_matches('/');
    if id.is_empty() {
        return Ok((
            200,
            json!({
                "invoices": counter(&bucket, "invoices")?,
                "billed_cents": counter(&bucket, "billed_cents")?,
            }),
        ));
    }
    match bucket.get(&format!("invoice:{id}")).map_err(kv_error)? {
        Some(invoice) => Ok((200, serde_json::from_slice(&invoice).unwrap_or(Value::Null))),
        None => Ok((404, json!({"error": format!("no invoice for order {id}")}))),
    }
}

impl wasip2::exports::http::incoming_handler::Guest for Billing {
    fn handle(request: IncomingRequest, out: ResponseOutparam) {
        let path = request.path_with_query().unwrap_or_default();
        let path = path.split('?').next().unwrap_or("/");
        let (status, body) = answer(path).unwrap_or_else(|err| (503, json!({ "error": err })));
        kit::respond(
            out,
            status,
            &[("content-type", "application/json")],
            body.to_string().as_bytes(),
        );
    }
}

wasip2::http::proxy::export!(Billing with_types_in wasip2);
messaging::export!(Billing with_types_in messaging);
