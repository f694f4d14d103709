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

/// What the echo service at `url` saw of a GET.
async fn echo_at(url: &str) -> Value {
    let response = client().get(url).send().await.expect("send");
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
    // The authority is not repeated as a header, as under wasmtime serve.
    assert_eq!(header(&doc, "host"), None);
}

#[tokio::test(flavor = "multi_thread")]
async fn regression_a_guest_sees_no_request_id_or_trace_the_client_did_not_send() {
    // Components built for wasmtime serve compared the headers they got
    // with the ones sent, and failed on the x-request-id and traceparent
    // Wharf added. They now appear only when sent, or when asked for.
    let (dir, server) = demo_server().await;
    let plain = echo(&server, client().get(server.url("/echo/x"))).await;
    assert_eq!(header(&plain, "x-request-id"), None);
    assert_eq!(header(&plain, "traceparent"), None);
    let sent = echo(
        &server,
        client()
            .get(server.url("/echo/x"))
            .header("x-request-id", "mine-1"),
    )
    .await;
    assert_eq!(header(&sent, "x-request-id"), Some("mine-1"));
    std::fs::write(
        dir.path().join("echo.toml"),
        "[http]\nrequest_id_header = true\n",
    )
    .unwrap();
    crate::support::eventually(std::time::Duration::from_secs(30), "the manifest", || {
        let url = server.url("/echo/x");
        async move {
            let doc = echo_at(&url).await;
            header(&doc, "x-request-id").is_some() && header(&doc, "traceparent").is_some()
        }
    })
    .await;
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
async fn regression_404_lists_no_routes_to_anonymous_clients() {
    // The 404 page listed every route to anyone; the list belongs to the
    // admin API. The answer names only the path that was asked for.
    let (_dir, server) = demo_server().await;
    let (status, body) = get(&server.url("/nowhere")).await.unwrap();
    assert_eq!(status, 404);
    assert_eq!(body, "no service at /nowhere\n");
    for route in ["/echo", "/hello", "/hostile"] {
        assert!(!body.contains(route), "{body}");
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

/// Sends `request` as raw bytes and returns the status line of the answer.
async fn raw_status_line(base: &str, request: &[u8]) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let addr = base.trim_start_matches("http://");
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream.write_all(request).await.unwrap();
    let mut answer = Vec::new();
    let mut buf = [0u8; 4096];
    while !answer.windows(2).any(|w| w == b"\r\n") {
        let read = tokio::time::timeout(std::time::Duration::from_secs(10), stream.read(&mut buf))
            .await
            .expect("an answer in time")
            .unwrap();
        if read == 0 {
            break;
        }
        answer.extend_from_slice(&buf[..read]);
    }
    String::from_utf8_lossy(&answer)
        .lines()
        .next()
        .unwrap_or_default()
        .to_string()
}

#[tokio::test(flavor = "multi_thread")]
async fn regression_http11_without_exactly_one_host_header_is_400() {
    // RFC 9112 §3.2: a server must answer 400 to an HTTP/1.1 request with
    // no Host header or more than one; both were served.
    let (_dir, server) = demo_server().await;
    let no_host = raw_status_line(&server.base, b"GET /hello HTTP/1.1\r\n\r\n").await;
    assert!(no_host.starts_with("HTTP/1.1 400"), "{no_host}");
    let two_hosts = raw_status_line(
        &server.base,
        b"GET /hello HTTP/1.1\r\nHost: a.example\r\nHost: b.example\r\n\r\n",
    )
    .await;
    assert!(two_hosts.starts_with("HTTP/1.1 400"), "{two_hosts}");
    let one_host = raw_status_line(
        &server.base,
        b"GET /hello HTTP/1.1\r\nHost: a.example\r\n\r\n",
    )
    .await;
    assert!(one_host.starts_with("HTTP/1.1 200"), "{one_host}");
    // HTTP/1.0 has no such rule.
    let http10 = raw_status_line(&server.base, b"GET /hello HTTP/1.0\r\n\r\n").await;
    assert!(http10.starts_with("HTTP/1.0 200"), "{http10}");
}

#[tokio::test(flavor = "multi_thread")]
async fn regression_idle_http2_connections_time_out_even_when_the_client_answers_pings() {
    // An h2 client that answers pings but sends nothing kept its connection
    // open forever (200 of them still open after 100 s).
    let dir = ServiceDir::new();
    dir.install("hello", "hello");
    let mut config = wharf::Config::for_dir(dir.path());
    config.client_timeout = std::time::Duration::from_secs(1);
    let server = TestServer::start(config).await;
    let addr = server.base.trim_start_matches("http://").to_string();
    let stream = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let (mut sender, connection) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(stream),
    )
    .await
    .unwrap();
    // hyper's client connection answers the server's pings by itself.
    let connection = tokio::spawn(connection);
    let request = http::Request::get(format!("http://{addr}/hello"))
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .unwrap();
    let response = sender.send_request(request).await.unwrap();
    assert_eq!(response.status(), 200);
    drop(response);
    // Now nothing is open: the server closes the connection after about
    // the client timeout.
    let closed = tokio::time::timeout(std::time::Duration::from_secs(15), connection).await;
    assert!(closed.is_ok(), "the idle h2 connection was never closed");
    let host = server.host.clone();
    crate::support::eventually(
        std::time::Duration::from_secs(5),
        "the server to count the connection closed",
        || {
            let host = host.clone();
            async move { host.open_connections() == 0 }
        },
    )
    .await;
}
