//! A test service for `wasi:keyvalue@0.2.0-draft2` — the version Spin 4
//! components import — and `wasi:config@0.2.0-rc.1`. Every operation is one
//! HTTP request, so the host's integration tests can drive the whole
//! interface over HTTP:
//!
//! | request | operation |
//! | --- | --- |
//! | `GET /get?bucket=B&key=K` | `get`: 200 with the value, 404 if absent |
//! | `PUT /set?bucket=B&key=K` (body: the value) | `set`: 204 |
//! | `DELETE /delete?bucket=B&key=K` | `delete`: 204 |
//! | `GET /exists?bucket=B&key=K` | `exists`: `true` or `false` |
//! | `GET /list?bucket=B[&cursor=C]` | one page of `list-keys`: `{"keys": [...], "cursor": ...}` |
//! | `GET /keys?bucket=B` | every key, paging through `list-keys` |
//! | `POST /incr?bucket=B&key=K[&delta=D][&times=N]` | `increment` N times: the last value |
//! | `POST /swap?bucket=B&key=K` (body: the value) | `cas` + `swap`: `swapped` |
//! | `POST /cas-race?bucket=B&key=K` | reads for a swap, writes meanwhile, swaps: the swap must fail, then the retry on the handle it returns succeed |
//! | `POST /set-many?bucket=B&keys=a,b` / `GET /get-many?…` / `POST /delete-many?…` | `batch`; values are the keys |
//! | `GET /config?key=K` | `wasi:config` `get`; `GET /config` lists all |
//!
//! A key-value error answers 403 (`access-denied`), 404 (`no-such-store`)
//! or 500 (`other: …`), with the error as the body.

use kit::wasip2;
use wasip2::http::types::{IncomingRequest, ResponseOutparam};

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

use wasi::keyvalue::{atomics, batch, store};

struct Kv;

/// What a request answers: status and body.
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

fn json_keys(keys: &[String]) -> String {
    let items: Vec<String> = keys.iter().map(|k| json_string(k)).collect();
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
    let body = || kit::read_body(request);
    Ok(match route.as_str() {
        "/open" => text(200, "opened"),
        "/get" => match bucket.get(&key()?).map_err(refused)? {
            Some(value) => (200, value),
            None => text(404, "absent"),
        },
        "/set" => {
            bucket.set(&key()?, &body()).map_err(refused)?;
            text(204, "")
        }
        "/delete" => {
            bucket.delete(&key()?).map_err(refused)?;
            text(204, "")
        }
        "/exists" => text(200, bucket.exists(&key()?).map_err(refused)?.to_string()),
        "/list" => {
            let page = bucket
                .list_keys(param("cursor").as_deref())
                .map_err(refused)?;
            let cursor = page
                .cursor
                .as_deref()
                .map_or("null".to_string(), json_string);
            text(
                200,
                format!("{{\"keys\":{},\"cursor\":{cursor}}}", json_keys(&page.keys)),
            )
        }
        "/keys" => {
            let mut all = Vec::new();
            let mut cursor: Option<String> = None;
            loop {
                let page = bucket.list_keys(cursor.as_deref()).map_err(refused)?;
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
            let delta: i64 = param("delta").and_then(|d| d.parse().ok()).unwrap_or(1);
            let times: u32 = param("times").and_then(|t| t.parse().ok()).unwrap_or(1);
            let mut value = 0;
            for _ in 0..times {
                value = atomics::increment(&bucket, &key, delta).map_err(refused)?;
            }
            text(200, value.to_string())
        }
        "/swap" => {
            let cas = atomics::Cas::new(&bucket, &key()?).map_err(refused)?;
            match atomics::swap(cas, &body()) {
                Ok(()) => text(200, "swapped"),
                Err(atomics::CasError::CasFailed(_)) => text(409, "cas-failed"),
                Err(atomics::CasError::StoreError(err)) => refused(err),
            }
        }
        "/cas-race" => {
            let key = key()?;
            let cas = atomics::Cas::new(&bucket, &key).map_err(refused)?;
            let seen = cas.current().map_err(refused)?;
            // Another writer gets there first.
            bucket.set(&key, b"meanwhile").map_err(refused)?;
            match atomics::swap(cas, b"first try") {
                Ok(()) => text(500, "the swap succeeded over a newer value"),
                Err(atomics::CasError::StoreError(err)) => refused(err),
                Err(atomics::CasError::CasFailed(fresh)) => {
                    let now = fresh.current().map_err(refused)?;
                    if now.as_deref() != Some(&b"meanwhile"[..]) {
                        return Ok(text(500, "the fresh handle did not hold the current value"));
                    }
                    match atomics::swap(fresh, b"second try") {
                        Ok(()) => text(
                            200,
                            format!(
                                "retried; first saw {}",
                                seen.map_or("nothing".into(), |v| String::from_utf8_lossy(&v)
                                    .into_owned())
                            ),
                        ),
                        Err(_) => text(500, "the retry failed"),
                    }
                }
            }
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

impl wasip2::exports::http::incoming_handler::Guest for Kv {
    fn handle(request: IncomingRequest, out: ResponseOutparam) {
        let (status, body) = handle(&request).unwrap_or_else(|answer| answer);
        kit::respond(out, status, &[("content-type", "text/plain")], &body);
    }
}

wasip2::http::proxy::export!(Kv with_types_in wasip2);
