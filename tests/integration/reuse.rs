//! Instance reuse (`[instance] reuse = N`): instances serve N requests in
//! turn, are discarded after a failure, and a reused instance's crash is
//! retried on a fresh instance when the request can be repeated.

use crate::support::{ServiceDir, TestServer, client, get};

async fn server(manifest: &str) -> (ServiceDir, TestServer) {
    let dir = ServiceDir::new();
    dir.install("svc", "hostile");
    dir.write("svc.toml", manifest.as_bytes());
    let server = TestServer::without_tier_swaps(&dir).await;
    (dir, server)
}

async fn count(server: &TestServer) -> String {
    let (status, body) = get(&server.url("/svc/count")).await.unwrap();
    assert_eq!(status, 200, "{body}");
    body
}

#[tokio::test(flavor = "multi_thread")]
async fn by_default_every_request_gets_a_fresh_instance() {
    let (_dir, server) = server("").await;
    for _ in 0..4 {
        assert_eq!(count(&server).await, "1");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn an_instance_serves_up_to_n_requests_in_turn() {
    let (_dir, server) = server("[instance]\nreuse = 3\n").await;
    let mut seen = Vec::new();
    for _ in 0..7 {
        seen.push(count(&server).await);
    }
    assert_eq!(seen, ["1", "2", "3", "1", "2", "3", "1"]);
    assert_eq!(
        server
            .host
            .services()
            .service("svc")
            .unwrap()
            .warm_instances(),
        1
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_trap_discards_the_instance() {
    let (_dir, server) = server("[instance]\nreuse = 100\n").await;
    assert_eq!(count(&server).await, "1");
    assert_eq!(count(&server).await, "2");
    // A request with a body is not repeated: the crash is the answer.
    let response = client()
        .post(server.url("/svc/trap"))
        .body("x")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 500);
    assert_eq!(count(&server).await, "1", "the crashed instance was reused");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_instance_that_sends_no_response_is_discarded() {
    let (_dir, server) = server("[instance]\nreuse = 100\n").await;
    for path in ["/svc/no-response", "/svc/leak-response"] {
        // Warm up an instance, so the request below lands on a reused one.
        count(&server).await;
        // Fails on the reused instance, then again on a fresh one.
        let (status, body) = get(&server.url(path)).await.unwrap();
        assert_eq!(status, 500, "{path}: {body}");
        assert!(
            body.contains("without sending a response"),
            "{path}: {body}"
        );
        assert_eq!(
            count(&server).await,
            "1",
            "{path}: the failed instance was reused"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_reused_instance_that_fails_is_retried_on_a_fresh_one_when_safe() {
    let (_dir, server) = server("[instance]\nreuse = 10\n").await;
    let fail_when_reused = server.url("/svc/fail-when-reused");
    // A fresh instance serves the first request and is kept warm.
    assert_eq!(get(&fail_when_reused).await.unwrap().0, 200);
    // A POST with a body cannot be repeated: the caller sees the crash.
    let response = client()
        .post(&fail_when_reused)
        .body("payload")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 500);
    // Every GET succeeds: each lands on a reused instance that crashes, and
    // is repeated on a fresh one.
    for _ in 0..4 {
        let (status, body) = get(&fail_when_reused).await.unwrap();
        assert_eq!((status, body.as_str()), (200, "served by a fresh instance"));
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn reuse_is_turned_off_for_a_guest_that_keeps_failing_it() {
    let (_dir, server) = server("[instance]\nreuse = 10\n").await;
    let service = || server.host.services().service("svc").unwrap().clone();
    // The first request is fresh; the next three crash their reused
    // instances (and are retried), which turns reuse off.
    for _ in 0..4 {
        assert_eq!(
            get(&server.url("/svc/fail-when-reused")).await.unwrap().0,
            200
        );
    }
    assert_eq!(service().warm_instances(), 0);
    // From now on every request gets a fresh instance.
    for _ in 0..3 {
        assert_eq!(count(&server).await, "1");
    }
    assert_eq!(service().warm_instances(), 0);
    assert!(!service().reuses_instances());
}

#[tokio::test(flavor = "multi_thread")]
async fn reused_instances_get_each_requests_own_id_and_limits() {
    let (_dir, server) = server("[instance]\nreuse = 10\n[limits]\ntimeout = \"1s\"\n").await;
    for _ in 0..3 {
        assert_eq!(get(&server.url("/svc/")).await.unwrap().0, 200);
    }
    // A fresh deadline per request: a busy loop on a warm instance still
    // stops after 1s.
    let started = std::time::Instant::now();
    assert_eq!(get(&server.url("/svc/busy-loop")).await.unwrap().0, 504);
    assert!(started.elapsed() < std::time::Duration::from_secs(5));
    let response = client()
        .get(server.url("/svc/"))
        .header("x-request-id", "mine")
        .send()
        .await
        .unwrap();
    assert_eq!(response.headers()["x-request-id"], "mine");
}
