//! The demo's report service, run by a schedule trigger: each tick POSTs
//! `/tick`, which reads the counters the orders, billing and email services
//! keep in the `demo` bucket and stores a report (and logs a line when
//! something changed). `GET /` answers the latest report.

use kit::wasip2;
use serde_json::{Value, json};
use wasip2::http::types::{IncomingRequest, ResponseOutparam};

mod keyvalue {
    wit_bindgen::generate!({
        path: "../../wit/keyvalue-0.2.0-draft",
        world: "wasi:keyvalue/imports@0.2.0-draft",
        generate_all,
    });
}

use keyvalue::wasi::keyvalue::store;

struct Report;

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

fn tick(scheduled_ms: &str) -> Result<Value, String> {
    let bucket = store::open("demo").map_err(kv_error)?;
    let report = json!({
        "orders": counter(&bucket, "orders")?,
        "invoices": counter(&bucket, "invoices")?,
        "billed_cents": counter(&bucket, "billed_cents")?,
        "emails": counter(&bucket, "emails")?,
    });
    let previous = bucket.get("report").map_err(kv_error)?;
    let previous: Value = previous
        .and_then(|bytes| serde_json::from_slice(&bytes).ok())
        .unwrap_or(Value::Null);
    if previous.get("totals") != Some(&report) {
        println!("report: {report}");
    }
    let stored = json!({"totals": report, "at_ms": scheduled_ms});
    bucket
        .set("report", stored.to_string().as_bytes())
        .map_err(kv_error)?;
    Ok(stored)
}

fn latest() -> Result<Value, String> {
    let bucket = store::open("demo").map_err(kv_error)?;
    Ok(bucket
        .get("report")
        .map_err(kv_error)?
        .and_then(|bytes| serde_json::from_slice(&bytes).ok())
        .unwrap_or_else(|| json!({"totals": null, "note": "no tick yet"})))
}

impl wasip2::exports::http::incoming_handler::Guest for Report {
    fn handle(request: IncomingRequest, out: ResponseOutparam) {
        let path = request.path_with_query().unwrap_or_default();
        let result = if path.starts_with("/tick") {
            let at = request
                .headers()
                .get(&"x-wharf-scheduled-ms".to_string())
                .first()
                .map(|v| String::from_utf8_lossy(v).into_owned())
                .unwrap_or_default();
            tick(&at)
        } else {
            latest()
        };
        let (status, body) = match result {
            Ok(value) => (200, value),
            Err(err) => (503, json!({ "error": err })),
        };
        kit::respond(
            out,
            status,
            &[("content-type", "application/json")],
            body.to_string().as_bytes(),
        );
    }
}

wasip2::http::proxy::export!(Report with_types_in wasip2);
