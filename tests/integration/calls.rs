//! Service-to-service calls: `http://NAME.internal` routed in-process, the
//! allow-list, loop cutting, deadlines, and request id and trace context
//! reaching the callee.

use std::time::{Duration, Instant};

use serde_json::Value;
use wharf::Config;

use crate::support::{ServiceDir, TestServer, client, get};

const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CLIENT_SPAN: &str = "00f067aa0ba902b7";

fn microservices(gateway_manifest: Option<&str>) -> ServiceDir {
    let dir = ServiceDir::new();
    for name in ["gateway", "users", "orders"] {
        dir.install(name, name);
    }
    if let Some(manifest) = gateway_manifest {
        dir.write("gateway.toml", manifest.as_bytes());
    }
    dir
}

const ALLOW_BOTH: &str =
    "[outbound]\nallow = [\"http://users.internal\", \"http://orders.internal\"]\n";

#[tokio::test(flavor = "multi_thread")]
async fn the_gateway_merges_users_and_orders_in_process() {
    let dir = microservices(Some(ALLOW_BOTH));
    let server = TestServer::for_dir(&dir).await;
    let (status, body) = get(&server.url("/gateway")).await.unwrap();
    assert_eq!(status, 200, "{body}");
    let doc: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(doc["users"].as_array().unwrap().len(), 3);
    assert_eq!(doc["orders"].as_array().unwrap().len(), 3);
    assert_eq!(doc["users"][0]["name"], "Ada");

    // One user: that user and their orders, not everyone.
    let (_, body) = get(&server.url("/gateway?user=1")).await.unwrap();
    let doc: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(doc["user"]["name"], "Ada", "{doc}");
    assert!(doc.get("users").is_none(), "{doc}");
    let items: Vec<&str> = doc["orders"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o["item"].as_str().unwrap())
        .collect();
    assert_eq!(items, ["keyboard", "coffee"]);

    // No socket was involved: the callees were counted as hops from the gateway.
    let metrics = server.host.metrics_text();
    assert!(
        metrics.contains("wharf_requests_total{service=\"users\",class=\"2xx\"} 2"),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_wildcard_internal_allow_works_too() {
    let dir = microservices(Some("[outbound]\nallow = [\"http://*.internal\"]\n"));
    let server = TestServer::for_dir(&dir).await;
    assert_eq!(get(&server.url("/gateway")).await.unwrap().0, 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn regression_allow_list_bypass_through_letter_case() {
    // With `http://*.internal` allowed, an upper-case NAME.INTERNAL passed
    // the allow check but missed the in-process route, so it went to DNS
    // and the network. Every spelling must stay in-process.
    let dir = ServiceDir::new();
    dir.install("hostile", "hostile");
    dir.install("hello", "hello");
    dir.write(
        "hostile.toml",
        b"[outbound]\nallow = [\"http://*.internal\"]\n",
    );
    let server = TestServer::for_dir(&dir).await;
    for target in [
        "http://HELLO.INTERNAL/",
        "http://Hello.Internal/",
        "http://hello.internal./",
    ] {
        let (status, body) = get(&server.url(&format!("/hostile/outbound?url={target}")))
            .await
            .unwrap();
        assert_eq!(status, 200, "{target}: {body}");
        assert!(
            body.contains("Hello from the microservice!"),
            "{target}: {body}"
        );
    }
    let metrics = server.host.metrics_text();
    assert!(
        metrics.contains("wharf_requests_total{service=\"hello\",class=\"2xx\"} 3"),
        "the calls reached hello in-process: {metrics}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn calls_need_an_allow_entry() {
    for manifest in [
        None,
        Some("[outbound]\nallow = [\"http://users.internal\"]\n"),
    ] {
        let dir = microservices(manifest);
        let server = TestServer::for_dir(&dir).await;
        let (status, body) = get(&server.url("/gateway")).await.unwrap();
        assert_eq!(status, 502, "{body}");
        assert!(body.contains("HttpRequestDenied"), "{body}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn callee_failures_come_back_as_their_status() {
    let dir = microservices(Some(ALLOW_BOTH));
    dir.remove("users.wasm");
    let server = TestServer::for_dir(&dir).await;
    let (status, body) = get(&server.url("/gateway")).await.unwrap();
    assert_eq!(status, 404, "{body}");
    assert!(body.contains("users answered 404"), "{body}");
}

#[tokio::test(flavor = "multi_thread")]
async fn call_loops_are_cut_with_508() {
    let dir = ServiceDir::new();
    dir.install("looper", "hostile");
    dir.write(
        "looper.toml",
        b"[outbound]\nallow = [\"http://*.internal\"]\n",
    );
    let mut config = Config::for_dir(dir.path());
    config.max_call_depth = 3;
    let server = TestServer::start(config).await;
    let (status, body) = get(&server.url("/looper/call-self?name=looper"))
        .await
        .unwrap();
    assert_eq!(status, 508, "{body}");
    assert_eq!(body.matches("hop\n").count(), 4, "{body}");
    assert!(body.contains("call chain longer than 3 hops"), "{body}");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_callee_sees_the_request_id_a_new_span_and_its_own_path() {
    let dir = ServiceDir::new();
    dir.install("caller", "hostile");
    dir.write(
        "caller.toml",
        b"[outbound]\nallow = [\"http://echo.internal\"]\n",
    );
    dir.install("echo", "echo");
    let server = TestServer::for_dir(&dir).await;
    let response = client()
        .get(server.url("/caller/outbound?url=http://echo.internal/inner/path?q=1"))
        .header("x-request-id", "req-42")
        .header("traceparent", format!("00-{TRACE_ID}-{CLIENT_SPAN}-01"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["x-request-id"], "req-42");
    let doc: Value = response.json().await.unwrap();
    let header = |name: &str| {
        doc["headers"]
            .as_array()
            .unwrap()
            .iter()
            .find(|h| h[0] == name)
            .map(|h| h[1].as_str().unwrap().to_string())
    };
    assert_eq!(doc["path"], "/inner/path?q=1");
    assert_eq!(doc["authority"], "echo.internal");
    assert_eq!(header("x-request-id").as_deref(), Some("req-42"));
    assert_eq!(header("x-wharf-hops").as_deref(), Some("1"));
    let traceparent = header("traceparent").expect("traceparent reaches the callee");
    let parts: Vec<&str> = traceparent.split('-').collect();
    assert_eq!(parts[1], TRACE_ID, "{traceparent}");
    assert_ne!(parts[2], CLIENT_SPAN, "a new span per hop: {traceparent}");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_callers_deadline_bounds_the_callee() {
    let dir = ServiceDir::new();
    dir.install("caller", "hostile");
    dir.write(
        "caller.toml",
        b"[outbound]\nallow = [\"http://sleeper.internal\"]\n[limits]\ntimeout = \"1s\"\n",
    );
    dir.install("sleeper", "hostile");
    dir.write("sleeper.toml", b"[limits]\ntimeout = \"60s\"\n");
    let server = TestServer::for_dir(&dir).await;
    let started = Instant::now();
    let (status, body) =
        get(&server.url("/caller/outbound?url=http://sleeper.internal/sleep?ms=20000"))
            .await
            .unwrap();
    assert_eq!(status, 504, "{body}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    // The callee was stopped with its caller, not left sleeping.
    let host = server.host.clone();
    crate::support::eventually(Duration::from_secs(5), "the callee to stop", || {
        let host = host.clone();
        async move {
            host.services()
                .service("sleeper")
                .unwrap()
                .admission()
                .in_use()
                == 0
        }
    })
    .await;
}
