//! A deliberately misbehaving service for Wharf's isolation tests. Each path
//! is one way a buggy or hostile guest can try to hurt its host:
//!
//! | path | behaviour |
//! | --- | --- |
//! | `/busy-loop` | spins forever on the CPU |
//! | `/memory-bomb` | allocates and touches memory until growth fails |
//! | `/recursion` | recurses until the wasm stack overflows |
//! | `/trap` | panics (a wasm trap) before responding |
//! | `/no-response` | returns without ever setting a response |
//! | `/never-responds` | blocks forever inside a host call |
//! | `/trap-after-response` | sends headers and part of the body, then traps |
//! | `/huge-response?mb=N` | streams N MiB (default 100) |
//! | `/sleep?ms=N` | sleeps N ms (default 1000), then answers 200 |
//! | `/read-file?path=P` | tries to read a host file |
//! | `/env` | lists the environment variables it can see |
//! | `/stdio` | writes lines to stdout and stderr, then answers |
//! | `/outbound?url=U` | makes an outgoing HTTP GET to U |
//! | `/call-self?name=N` | calls `http://N.internal/call-self?name=N`: a loop |
//! | `/count` | answers how many requests this instance has handled |
//! | `/fail-when-reused` | answers on a fresh instance, traps on a reused one |
//!
//! Anything else answers 200 with `hostile: ok`.

use std::hint::black_box;
use std::sync::atomic::{AtomicU32, Ordering};

use kit::wasip2;
use wasip2::http::types::{IncomingRequest, ResponseOutparam};

struct Hostile;

/// Requests this instance has handled (instance state, for reuse tests).
static HANDLED: AtomicU32 = AtomicU32::new(0);

impl wasip2::exports::http::incoming_handler::Guest for Hostile {
    fn handle(request: IncomingRequest, out: ResponseOutparam) {
        let path = request.path_with_query().unwrap_or_default();
        let route = path.split('?').next().unwrap_or_default();
        let text = &[("content-type", "text/plain")];
        match route {
            "/busy-loop" => busy_loop(),
            "/memory-bomb" => {
                let held = memory_bomb();
                kit::respond(out, 200, text, format!("held {held} MiB").as_bytes());
            }
            "/recursion" => {
                let depth = recurse(black_box(1));
                kit::respond(out, 200, text, format!("depth {depth}").as_bytes());
            }
            "/trap" => panic!("hostile guest traps on purpose"),
            "/no-response" => drop(out),
            // Returns while still owning the response handle: it is never
            // set nor dropped.
            "/leak-response" => std::mem::forget(out),
            "/never-responds" => {
                wasip2::clocks::monotonic_clock::subscribe_duration(u64::MAX).block();
                kit::respond(out, 200, text, b"woke up");
            }
            "/trap-after-response" => {
                let mut body = kit::start_response(out, 200, text);
                body.write(b"partial body, then a trap\n");
                panic!("hostile guest traps after sending headers");
            }
            "/huge-response" => {
                let mib: usize = param(&path, "mb", 100);
                let mut body =
                    kit::start_response(out, 200, &[("content-type", "application/octet-stream")]);
                let chunk = vec![b'x'; 64 * 1024];
                for _ in 0..mib * 16 {
                    if !body.write(&chunk) {
                        return;
                    }
                }
                body.finish();
            }
            "/sleep" => {
                let ms: u64 = param(&path, "ms", 1000);
                println!("sleeping {ms} ms");
                std::thread::sleep(std::time::Duration::from_millis(ms));
                kit::respond(out, 200, text, format!("slept {ms} ms").as_bytes());
            }
            "/read-file" => {
                let target = kit::query_param(&path, "path").unwrap_or("/etc/passwd");
                match std::fs::read(target) {
                    Ok(bytes) => kit::respond(out, 200, text, &bytes),
                    Err(err) => {
                        kit::respond(out, 403, text, format!("read {target}: {err}").as_bytes())
                    }
                }
            }
            "/env" => {
                let vars: Vec<String> = std::env::vars().map(|(k, v)| format!("{k}={v}")).collect();
                kit::respond(out, 200, text, vars.join("\n").as_bytes());
            }
            "/stdio" => {
                println!("hostile: a line on stdout");
                eprintln!("hostile: a line on stderr");
                kit::respond(out, 200, text, b"wrote to stdout and stderr");
            }
            "/outbound" => {
                let url = kit::query_param(&path, "url").unwrap_or("http://example.com/");
                match kit::fetch("GET", url, &[], &[]) {
                    Ok(reply) => {
                        let status = reply.status.to_string();
                        kit::respond(out, 200, &[("x-upstream-status", &status)], &reply.body)
                    }
                    Err(err) => {
                        kit::respond(out, 502, text, format!("outbound {url}: {err}").as_bytes())
                    }
                }
            }
            "/call-self" => {
                let name = kit::query_param(&path, "name").unwrap_or("hostile");
                let url = format!("http://{name}.internal/call-self?name={name}");
                match kit::fetch("GET", &url, &[], &[]) {
                    Ok(reply) => {
                        let mut body = b"hop\n".to_vec();
                        body.extend_from_slice(&reply.body);
                        kit::respond(out, reply.status, text, &body)
                    }
                    Err(err) => {
                        kit::respond(out, 502, text, format!("call-self: {err}").as_bytes())
                    }
                }
            }
            "/count" => {
                let n = HANDLED.fetch_add(1, Ordering::Relaxed) + 1;
                kit::respond(out, 200, text, n.to_string().as_bytes());
            }
            "/fail-when-reused" => {
                if HANDLED.fetch_add(1, Ordering::Relaxed) > 0 {
                    panic!("this guest cannot serve a second request");
                }
                kit::respond(out, 200, text, b"served by a fresh instance");
            }
            _ => kit::respond(out, 200, text, b"hostile: ok"),
        }
    }
}

wasip2::http::proxy::export!(Hostile with_types_in wasip2);

fn param<T: std::str::FromStr>(path: &str, name: &str, default: T) -> T {
    kit::query_param(path, name)
        .and_then(|value| value.parse().ok())
        .unwrap_or(default)
}

fn busy_loop() -> ! {
    let mut counter: u64 = 0;
    loop {
        counter = black_box(counter.wrapping_add(1));
    }
}

/// Grabs memory a MiB at a time, touching every page, until allocation fails
/// (which aborts: a trap). Returns only if the host never says no.
fn memory_bomb() -> usize {
    let mut held: Vec<Vec<u8>> = Vec::new();
    for _ in 0..64 * 1024 {
        held.push(black_box(vec![0xA5; 1024 * 1024]));
    }
    held.len()
}

fn recurse(depth: u64) -> u64 {
    // The frame holds a buffer so the stack fills quickly.
    let frame = black_box([depth as u8; 256]);
    if depth == u64::MAX {
        return depth;
    }
    let next = recurse(black_box(depth + 1));
    next + u64::from(frame[0])
}
