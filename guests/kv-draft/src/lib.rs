//! A test service for `wasi:keyvalue@0.2.0-draft` — the version wasmtime's
//! `-Skeyvalue` and wasmCloud components import (numeric cursors, unsigned
//! increments, no compare-and-swap) — and Spin's
//! `wasi:config@0.2.0-draft-2024-09-27`. The same requests as the `kv`
//! service, for the operations this version has:
//!
//! `GET /get`, `PUT /set`, `DELETE /delete`, `GET /exists`, `GET /list`,
//! `GET /keys`, `POST /incr`, `POST /set-many`, `GET /get-many`,
//! `POST /delete-many` (with `bucket=`, `key=`, `keys=`, `cursor=`,
//! `delta=`, `times=`), and `GET /config[?key=K]`.

use kit::wasip2;
use wasip2::http::types::{IncomingRequest, ResponseOutparam};

wit_bindgen::generate!({
    path: "../../wit/keyvalue-0.2.0-draft",
    world: "wasi:keyvalue/imports@0.2.0-draft",
    generate_all,
});

mod config {
    wit_bindgen::generate!({
        path: "../../wit/config-0.2.0-draft-2024-09-27",
        world: "wasi:config/imports@0.2.0-draft-2024-09-27",
        generate_all,
    });
}

use wasi::keyvalue::{atomics, batch, store};

struct KvDraft;

type Answer = (u16, Vec<u8>);

fn text(status: u16, body: impl Into<String>) -> Answer {
    (status, body.into().into_bytes())
}

fn refused(err: store::Error) -> Answer {
    match err {
        store::Error::NoSuchStore => text(404, "no-such-store"),
        store::Error::AccessDenied => text(403, "access-denied"),
        store::Error::Other(why) => text(500, format!("other: {why}")),
    }
}

fn json_keys(keys: &[String]) -> String {
    let items: Vec<String> = keys
        .iter()
        .map(|k| format!("\"{}\"", k.replace('\\', "\\\\").replace('"', "\\\"")))
        .collect();
    format!("[{}]", items.join(","))
}

fn handle(request: &IncomingRequest) -> Result<Answer, Answer> {
    let path = request.path_with_query().unwrap_or_default();
    let route = path.split('?').next().unwrap_or_default().to_string();
    let param = |name: &str| kit::query_text(&path, name);
    if route == "/config" {
        return Ok(match param("key") {
            Some(key) => match config::wasi::config::store::get(&key) {
                Ok(Some(value)) => text(200, value),
                Ok(None) => text(404, "not configured"),
                Err(err) => text(500, format!("{err:?}")),
            },
            None => match config::wasi::config::store::get_all() {
                Ok(all) => {
                    let pairs: Vec<String> = all.iter().map(|(k, v)| format!("{k}={v}")).collect();
                    text(200, pairs.join("\n"))
                }
                Err(err) => text(500, format!("{err:?}")),
            },
        });
    }
    let bucket_name = param("bucket").unwrap_or_else(|| "default".into());
    let bucket = store::open(&bucket_name).map_err(refused)?;
    let key = || param("key").ok_or_else(|| text(400, "key= is missing"));
    let keys = || -> Vec<String> {
        param("keys")
            .unwrap_or_default()
            .split(',')
            .filter(|k| !k.is_empty())
            .map(str::to_string)
            .collect()
    };
    Ok(match route.as_str() {
        "/open" => text(200, "opened"),
        "/get" => match bucket.get(&key()?).map_err(refused)? {
            Some(value) => (200, value),
            None => text(404, "absent"),
        },
        "/set" => {
            bucket
                .set(&key()?, &kit::read_body(request))
                .map_err(refused)?;
            text(204, "")
        }
        "/delete" => {
            bucket.delete(&key()?).map_err(refused)?;
            text(204, "")
        }
        "/exists" => text(200, bucket.exists(&key()?).map_err(refused)?.to_string()),
        "/list" => {
            let cursor = param("cursor").and_then(|c| c.parse().ok());
            let page = bucket.list_keys(cursor).map_err(refused)?;
            let next = page.cursor.map_or("null".to_string(), |c| c.to_string());
            text(
                200,
                format!("{{\"keys\":{},\"cursor\":{next}}}", json_keys(&page.keys)),
            )
        }
        "/keys" => {
            let mut all = Vec::new();
            let mut cursor = None;
            loop {
                let page = bucket.list_keys(cursor).map_err(refused)?;
                all.extend(page.keys);
                match page.cursor {
                    Some(next) => cursor = Some(next),
                    None => break,
                }
            }
            text(200, json_keys(&all))
        }
        "/incr" => {
            let key = key()?;
            let delta: u64 = param("delta").and_then(|d| d.parse().ok()).unwrap_or(1);
            let times: u32 = param("times").and_then(|t| t.parse().ok()).unwrap_or(1);
            let mut value = 0;
            for _ in 0..times {
                value = atomics::increment(&bucket, &key, delta).map_err(refused)?;
            }
            text(200, value.to_string())
        }
        "/set-many" => {
            let pairs: Vec<(String, Vec<u8>)> = keys()
                .into_iter()
                .map(|k| (k.clone(), k.into_bytes()))
                .collect();
            batch::set_many(&bucket, &pairs).map_err(refused)?;
            text(204, "")
        }
        "/get-many" => {
            let found = batch::get_many(&bucket, &keys()).map_err(refused)?;
            let shown: Vec<String> = found
                .into_iter()
                .map(|entry| match entry {
                    Some((k, v)) => format!("{k}={}", String::from_utf8_lossy(&v)),
                    None => "-".to_string(),
                })
                .collect();
            text(200, shown.join(","))
        }
        "/delete-many" => {
            batch::delete_many(&bucket, &keys()).map_err(refused)?;
            text(204, "")
        }
        _ => text(404, format!("no such operation {route}")),
    })
}

impl wasip2::exports::http::incoming_handler::Guest for KvDraft {
    fn handle(request: IncomingRequest, out: ResponseOutparam) {
        let (status, body) = handle(&request).unwrap_or_else(|answer| answer);
        kit::respond(out, status, &[("content-type", "text/plain")], &body);
    }
}

wasip2::http::proxy::export!(KvDraft with_types_in wasip2);
