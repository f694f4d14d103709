//! The misbehaving test service of `guests/hostile`, built for WASI 0.3
//! (`wasi:http/handler@0.3.0`), where one instance may serve several
//! requests at once:
//!
//! | path | behaviour |
//! | --- | --- |
//! | `/busy-loop` | spins forever on the CPU |
//! | `/memory-bomb` | allocates and touches memory until growth fails |
//! | `/trap` | panics (a wasm trap) before responding |
//! | `/trap-after-response` | answers, writes part of the body, then traps |
//! | `/never-responds` | waits forever without answering |
//! | `/huge-response?mb=N` | streams N MiB (default 100) |
//! | `/sleep?ms=N` | waits N ms (default 1000), then answers with the most requests this instance has had in flight at once |
//! | `/count` | answers how many requests this instance has handled |
//! | `/stdio` | writes lines to stdout and stderr, then answers |
//!
//! Anything else answers 200 with `hostile: ok`.

use std::cell::Cell;
use std::hint::black_box;

use kit3::wasip3;
use kit3::wasip3::clocks::monotonic_clock::wait_for;
use kit3::wasip3::http::types::{ErrorCode, Request, Response};

wasip3::http::service::export!(Hostile);

struct Hostile;

thread_local! {
    /// Requests this instance has handled.
    static HANDLED: Cell<u32> = const { Cell::new(0) };
    /// Requests in `/sleep` right now, and the most there have been.
    static SLEEPING: Cell<(u32, u32)> = const { Cell::new((0, 0)) };
}

const MIB: usize = 1 << 20;

impl wasip3::exports::http::handler::Guest for Hostile {
    async fn handle(request: Request) -> Result<Response, ErrorCode> {
        HANDLED.set(HANDLED.get() + 1);
        let path = request.get_path_with_query().unwrap_or_default();
        let route = path.split('?').next().unwrap_or_default();
        match route {
            "/busy-loop" => busy_loop(),
            "/memory-bomb" => kit3::text(200, &format!("held {} MiB", memory_bomb())),
            "/trap" => panic!("hostile guest traps on purpose"),
            "/trap-after-response" => kit3::streaming_response(
                200,
                &[("content-type", "text/plain")],
                |mut body| async move {
                    body.write_all(b"partial ".to_vec()).await;
                    panic!("hostile guest traps mid-body on purpose");
                },
            ),
            "/never-responds" => {
                wait_for(u64::MAX).await;
                kit3::text(200, "woke up")
            }
            "/huge-response" => {
                let mb: usize = kit3::query_param(&path, "mb")
                    .and_then(|mb| mb.parse().ok())
                    .unwrap_or(100);
                kit3::streaming_response(
                    200,
                    &[("content-type", "application/octet-stream")],
                    |mut body| async move {
                        for _ in 0..mb {
                            if !body.write_all(vec![b'x'; MIB]).await.is_empty() {
                                return;
                            }
                        }
                    },
                )
            }
            "/sleep" => {
                let ms: u64 = kit3::query_param(&path, "ms")
                    .and_then(|ms| ms.parse().ok())
                    .unwrap_or(1000);
                let (now, peak) = SLEEPING.get();
                SLEEPING.set((now + 1, peak.max(now + 1)));
                wait_for(ms * 1_000_000).await;
                let (now, peak) = SLEEPING.get();
                SLEEPING.set((now - 1, peak));
                kit3::text(200, &format!("slept {ms} ms; peak {peak}"))
            }
            "/count" => kit3::text(200, &HANDLED.get().to_string()),
            "/stdio" => {
                println!("hostile-p3 says hello on stdout");
                eprintln!("hostile-p3 says hello on stderr");
                kit3::text(200, "wrote to stdout and stderr")
            }
            _ => kit3::text(200, "hostile: ok"),
        }
    }
}

fn busy_loop() -> ! {
    let mut n: u64 = 0;
    loop {
        n = black_box(n.wrapping_add(1));
    }
}

/// Allocates 1 MiB at a time, touching every page, until allocation fails
/// (which aborts: the memory cap turns into a trap).
fn memory_bomb() -> usize {
    let mut held: Vec<Vec<u8>> = Vec::new();
    loop {
        let mut block = vec![0u8; MIB];
        for page in block.chunks_mut(4096) {
            page[0] = 1;
        }
        held.push(black_box(block));
        if held.len() > 1 << 16 {
            return held.len();
        }
    }
}
