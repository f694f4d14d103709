//! A shopping-cart microservice whose state lives in `wasi:keyvalue`, so it
//! outlives every request, instance, reload and restart:
//!
//! | request | answer |
//! | --- | --- |
//! | `GET /` | `{"visits": N}`: a counter incremented atomically per visit |
//! | `GET /USER` | `{"user": USER, "items": [...]}` |
//! | `POST /USER` (body: an item) | adds the item (compare-and-swap, so concurrent adds are never lost); the cart |
//! | `DELETE /USER` | empties the cart |
//!
//! Its manifest grants it the `default` bucket (`[keyvalue] buckets =
//! ["default"]`); the greeting comes from `wasi:config` (`[config] greeting`).

use kit::wasip2;
use wasip2::http::types::{IncomingRequest, Method, ResponseOutparam};

wit_bindgen::generate!({
    path: "../../wit/keyvalue-0.2.0-draft2",
    world: "wasi:keyvalue/imports@0.2.0-draft2",
    generate_all,
});

mod config {
    wit_bindgen::generate!({
        path: "../../wit/config-0.2.0-rc.1",
        world: "wasi:config/imports@0.2.0-rc.1",
        generate_all,
    });
}

use wasi::keyvalue::{atomics, store};

/// Attempts at adding an item while other requests change the same cart.
const ADD_ATTEMPTS: usize = 32;

struct Cart;

fn json_string(text: &str) -> String {
    let mut out = String::from("\"");
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// The items of a stored cart: one per line.
fn items(stored: Option<Vec<u8>>) -> Vec<String> {
    stored
        .map(|bytes| {
            String::from_utf8_lossy(&bytes)
                .lines()
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default()
}

fn cart_json(user: &str, items: &[String]) -> String {
    let items: Vec<String> = items.iter().map(|i| json_string(i)).collect();
    format!(
        "{{\"user\":{},\"items\":[{}]}}",
        json_string(user),
        items.join(",")
    )
}

fn error(err: store::Error) -> (u16, String) {
    let why = match err {
        store::Error::NoSuchStore => "no such store".to_string(),
        store::Error::AccessDenied => "access denied (is the bucket in the manifest?)".to_string(),
        store::Error::Other(why) => why,
    };
    (503, format!("{{\"error\":{}}}", json_string(&why)))
}

fn handle(request: &IncomingRequest) -> Result<(u16, String), (u16, String)> {
    let path = request.path_with_query().unwrap_or_default();
    let user = path
        .split('?')
        .next()
        .unwrap_or_default()
        .trim_matches('/')
        .to_string();
    let bucket = store::open("default").map_err(error)?;
    if user.is_empty() {
        let visits = atomics::increment(&bucket, "visits", 1).map_err(error)?;
        let greeting = config::wasi::config::store::get("greeting")
            .ok()
            .flatten()
            .unwrap_or_else(|| "Welcome".to_string());
        return Ok((
            200,
            format!(
                "{{\"greeting\":{},\"visits\":{visits}}}",
                json_string(&greeting)
            ),
        ));
    }
    let key = format!("cart:{user}");
    match request.method() {
        Method::Get => Ok((
            200,
            cart_json(&user, &items(bucket.get(&key).map_err(error)?)),
        )),
        Method::Delete => {
            bucket.delete(&key).map_err(error)?;
            Ok((200, cart_json(&user, &[])))
        }
        Method::Post => {
            let item = String::from_utf8_lossy(&kit::read_body(request))
                .trim()
                .replace('\n', " ");
            if item.is_empty() {
                return Err((400, "{\"error\":\"the body names the item to add\"}".into()));
            }
            let mut cas = atomics::Cas::new(&bucket, &key).map_err(error)?;
            for _ in 0..ADD_ATTEMPTS {
                let mut list = items(cas.current().map_err(error)?);
                list.push(item.clone());
                match atomics::swap(cas, list.join("\n").as_bytes()) {
                    Ok(()) => return Ok((200, cart_json(&user, &list))),
                    Err(atomics::CasError::CasFailed(fresh)) => cas = fresh,
                    Err(atomics::CasError::StoreError(err)) => return Err(error(err)),
                }
            }
            Err((
                409,
                "{\"error\":\"the cart kept changing; try again\"}".into(),
            ))
        }
        _ => Err((405, "{\"error\":\"use GET, POST or DELETE\"}".into())),
    }
}

impl wasip2::exports::http::incoming_handler::Guest for Cart {
    fn handle(request: IncomingRequest, out: ResponseOutparam) {
        let (status, body) = handle(&request).unwrap_or_else(|err| err);
        kit::respond(
            out,
            status,
            &[("content-type", "application/json")],
            body.as_bytes(),
        );
    }
}

wasip2::http::proxy::export!(Cart with_types_in wasip2);
