//! Embedding Wharf in another Rust program: build a host from a services
//! directory, hand it a request in-process (no socket), then serve HTTP until
//! Ctrl-C.
//!
//! Run: `cargo xtask guests && cargo run --example embed -- examples/services`
//! (the directory must hold `hello.wasm`; `cargo xtask demo` puts it there).

use http_body_util::BodyExt;
use wharf::{Config, Host};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let dir = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "examples/services".to_string());

    // Load every service in the directory; `watch(false)` loads it once.
    let host = Host::new(Config::for_dir(&dir).watch(false)).await?;

    // A request handed straight to the host: no TCP, no HTTP parsing.
    let request = http::Request::get("/hello").body(String::new())?;
    let response = host.handle(request).await;
    let status = response.status();
    let body = response.into_body().collect().await?.to_bytes();
    println!(
        "in-process GET /hello -> {status} {}",
        String::from_utf8_lossy(&body)
    );

    // The same host over HTTP.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    println!(
        "listening on http://{} (Ctrl-C to stop)",
        listener.local_addr()?
    );
    host.serve(listener, async {
        let _ = tokio::signal::ctrl_c().await;
    })
    .await
}
