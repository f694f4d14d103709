//! Serving: routing, prefix stripping, request presentation, bodies, and
//! guests that fail.

use serde_json::Value;

use crate::support::{ServiceDir, TestServer, client, get};

async fn demo_server() -> (ServiceDir, TestServer) {
    let dir = ServiceDir::new();
    dir.install("hello", "hello");
    dir.install("echo", "echo");
    dir.install("hostile", "hostile");
    let server = TestServer::for_dir(&dir).await;
    (dir, server)
}

async fn echo(server: &TestServer, request: reqwest::RequestBuilder) -> Value {
    let _ = server;
    let response = request.send().await.expect("send");
    assert_eq!(response.status(), 200);
    response.json().await.expect("echo answers JSON")
}

fn header<'a>(document: &'a Value, name: &str) -> Option<&'a str> {
    document["headers"]
        .as_array()?
        .iter()
        .find(|pair| pair[0].as_str() == Some(name))
        .and_then(|pair| pair[1].as_str())
}

#[tokio::test(flavor = "multi_thread")]
async fn hello_answers_json() {
    let (_dir, server) = demo_server().await;
    let response = client().get(server.url("/hello")).send().await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-type"], "application/json");
    assert_eq!(response.headers()[wharf::GENERATION_HEADER], "1");
    assert!(response.headers().contains_key(wharf::REQUEST_ID_HEADER));
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["message"], "Hello from the microservice!");
}

#[tokio::test(flavor = "multi_thread")]
async fn guest_sees_stripped_path_query_and_headers() {
    let (_dir, server) = demo_server().await;
    let doc = echo(
        &server,
        client()
            .get(server.url("/echo/orders/42?expand=items&x=1"))
            .header("x-custom", "yes"),
    )
    .await;
    assert_eq!(doc["method"], "GET");
    assert_eq!(doc["path"], "/orders/42?expand=items&x=1");
    assert_eq!(doc["scheme"], "http");
    assert_eq!(doc["authority"], server.base.trim_start_matches("http://"));
    assert_eq!(header(&doc, "x-custom"), Some("yes"));
    assert_eq!(header(&doc, "x-forwarded-prefix"), Some("/echo"));
    assert!(header(&doc, "x-request-id").is_some());
    // The authority is not repeated as a header, as under wasmtime serve.
    assert_eq!(header(&doc, "host"), None);
}

#[tokio::test(flavor = "multi_thread")]
async fn mount_point_itself_is_the_root_path() {
    let (_dir, server) = demo_server().await;
    for (url, path) in [("/echo", "/"), ("/echo/", "/"), ("/echo?q=1", "/?q=1")] {
        let doc = echo(&server, client().get(server.url(url))).await;
        assert_eq!(doc["path"], path, "for {url}");
    }
    // A sibling that only shares the prefix is not the service.
    let (status, _) = get(&server.url("/echoes")).await.unwrap();
    assert_eq!(status, 404);
}

#[tokio::test(flavor = "multi_thread")]
async fn post_with_a_one_mebibyte_body_round_trips() {
    let (_dir, server) = demo_server().await;
    let body: String = (0..1 << 20)
        .map(|i| (b'a' + (i % 26) as u8) as char)
        .collect();
    let doc = echo(
        &server,
        client().post(server.url("/echo/upload")).body(body.clone()),
    )
    .await;
    assert_eq!(doc["method"], "POST");
    assert_eq!(doc["body_len"], 1 << 20);
    assert_eq!(doc["body"].as_str(), Some(body.as_str()));
}

#[tokio::test(flavor = "multi_thread")]
async fn other_methods_reach_the_guest() {
    let (_dir, server) = demo_server().await;
    for method in ["PUT", "DELETE", "PATCH", "OPTIONS"] {
        let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        let doc = echo(
            &server,
            client().request(method.clone(), server.url("/echo")),
        )
        .await;
        assert_eq!(doc["method"], method.as_str());
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn unknown_path_is_404_naming_the_services() {
    let (_dir, server) = demo_server().await;
    let (status, body) = get(&server.url("/nowhere")).await.unwrap();
    assert_eq!(status, 404);
    assert!(body.contains("/nowhere"), "{body}");
    for route in ["/echo", "/hello", "/hostile"] {
        assert!(body.contains(route), "{body}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_trapping_guest_gets_500_and_the_host_keeps_serving() {
    let (_dir, server) = demo_server().await;
    let (status, body) = get(&server.url("/hostile/trap")).await.unwrap();
    assert_eq!(status, 500);
    assert!(body.contains("crashed"), "{body}");
    assert_eq!(body.lines().count(), 1, "one-line reason: {body}");
    let (status, _) = get(&server.url("/hello")).await.unwrap();
    assert_eq!(status, 200);
    // The same service still works for the next request: a fresh instance.
    let (status, body) = get(&server.url("/hostile/")).await.unwrap();
    assert_eq!((status, body.as_str()), (200, "hostile: ok"));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_guest_returning_without_a_response_gets_500() {
    let (_dir, server) = demo_server().await;
    let (status, body) = get(&server.url("/hostile/no-response")).await.unwrap();
    assert_eq!(status, 500);
    assert!(body.contains("without sending a response"), "{body}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_trap_after_the_headers_truncates_the_body() {
    let (_dir, server) = demo_server().await;
    let response = client()
        .get(server.url("/hostile/trap-after-response"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    // The body must not look complete: reading it fails.
    assert!(response.bytes().await.is_err());
    let (status, _) = get(&server.url("/hello")).await.unwrap();
    assert_eq!(status, 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn guests_get_no_host_environment_or_files() {
    let (_dir, server) = demo_server().await;
    // The test process has PATH in its environment; the guest must not see it.
    let (status, env) = get(&server.url("/hostile/env")).await.unwrap();
    assert_eq!(status, 200);
    assert!(!env.contains("PATH="), "guest saw host env: {env}");
    let (status, body) = get(&server.url("/hostile/read-file?path=/etc/hostname"))
        .await
        .unwrap();
    assert_eq!(status, 403, "guest read a host file: {body}");
}
