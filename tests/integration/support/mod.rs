//! Test helpers, by kind: the guests ([`guests`]), hosts under test
//! ([`hosts`]: a services directory, an in-process host, the `wharf`
//! binary), the real servers backend tests start ([`servers`]) and the
//! certificates for their TLS ([`pki`]), and here
//! what every test uses: an HTTP client and polling with deadlines (never
//! fixed sleeps).

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

mod guests;
mod hosts;
mod pki;
mod servers;

pub use guests::*;
pub use hosts::*;
pub use pki::*;
pub use servers::*;

/// Polls `check` until it returns true or `timeout` passes.
pub async fn eventually<F, Fut>(timeout: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if check().await {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A plain HTTP client for tests (no connection reuse surprises: a pool
/// is fine, tests only talk to their own host).
pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(60))
        .build()
        .expect("build HTTP client")
}

/// GET `url`, returning status and body text; `None` if the request failed.
pub async fn get(url: &str) -> Option<(u16, String)> {
    let response = client().get(url).send().await.ok()?;
    let status = response.status().as_u16();
    Some((status, response.text().await.ok()?))
}

/// Runs `hostile_path` while the neighbour `/hello` (the Rust hello) is
/// called in a loop; returns the
/// hostile status, body and duration, and asserts every neighbour call was
/// a correct 200.
pub async fn while_neighbour_answers(
    server: &TestServer,
    hostile_path: &str,
) -> (u16, String, Duration) {
    let done = Arc::new(AtomicBool::new(false));
    let neighbour = tokio::spawn({
        let url = server.url("/hello");
        let done = done.clone();
        async move {
            let client = client();
            let mut answered = 0;
            // At least one answer even when the hostile request ends first
            // (a trap is quick; the neighbour's first request may not be).
            while answered == 0 || !done.load(Ordering::Relaxed) {
                let response = client.get(&url).send().await.expect("neighbour request");
                assert_eq!(response.status(), 200, "the neighbour failed");
                let body = response.text().await.expect("neighbour body");
                assert!(body.contains("Hello from the microservice!"), "{body}");
                answered += 1;
            }
            answered
        }
    });
    let started = Instant::now();
    let response = client()
        .get(server.url(hostile_path))
        .send()
        .await
        .expect("hostile request");
    let status = response.status().as_u16();
    let body = response.text().await.unwrap_or_default();
    let elapsed = started.elapsed();
    done.store(true, Ordering::Relaxed);
    let answered = neighbour.await.expect("neighbour task");
    assert!(answered > 0, "the neighbour never got an answer");
    (status, body, elapsed)
}

/// POSTs `body` to `path` on `server`; the status and the body answered.
pub async fn post(server: &TestServer, path: &str, body: &str) -> (u16, String) {
    let response = client()
        .post(server.url(path))
        .body(body.to_string())
        .send()
        .await
        .expect("request");
    let status = response.status().as_u16();
    (status, response.text().await.unwrap_or_default())
}

/// The admin endpoint's service list (`GET ADMIN/services`).
pub async fn admin_services(admin: &str) -> serde_json::Value {
    client()
        .get(format!("{admin}/services"))
        .send()
        .await
        .expect("GET /services")
        .json()
        .await
        .expect("the service list is JSON")
}
