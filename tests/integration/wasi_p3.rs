//! WASI 0.3 services (`wasi:http/handler@0.3.0`): served beside 0.2 ones
//! with the same routes, limits, calls and logs; several requests at once in
//! one instance when the manifest allows; and the hostile-guest suite, run
//! against the 0.3 build of the hostile guest.

use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::future::join_all;

use crate::support::{
    ServiceDir, TestServer, WharfProcess, client, eventually, get, while_neighbour_answers,
};

/// The hostile service's time limit in these tests.
const LIMIT: &str = "2s";

async fn hostile_server(manifest: &str) -> (ServiceDir, TestServer) {
    let dir = ServiceDir::new();
    dir.install("hostile", "hostile_p3");
    dir.write("hostile.toml", manifest.as_bytes());
    dir.install("hello", "hello");
    let server = TestServer::without_tier_swaps(&dir).await;
    (dir, server)
}

fn limits() -> String {
    format!("[limits]\ntimeout = \"{LIMIT}\"\nmemory = \"32MiB\"\n")
}

/// A manifest letting one instance serve `concurrent` requests at once and
/// `reuse` in all.
fn shared(concurrent: u32, reuse: u32) -> String {
    format!(
        "{}[instance]\nreuse = {reuse}\nconcurrent = {concurrent}\n",
        limits()
    )
}

/// The "peak N" a `/sleep` answer reports: the most requests its instance
/// had in flight at once.
fn peak(body: &str) -> u32 {
    body.rsplit("peak ")
        .next()
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("no peak in {body:?}"))
}

#[tokio::test(flavor = "multi_thread")]
async fn a_wasi_0_3_service_is_served_beside_0_2_ones() {
    let dir = ServiceDir::new();
    dir.install("hello", "hello");
    dir.install("hello3", "hello_p3");
    let server = TestServer::for_dir(&dir).await;
    let two = get(&server.url("/hello")).await.expect("0.2 hello");
    let three = get(&server.url("/hello3")).await.expect("0.3 hello");
    assert_eq!(two, three);
    assert_eq!(three.0, 200);
    assert!(
        three.1.contains("Hello from the microservice!"),
        "{three:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_0_3_service_sees_its_route_stripped_its_request_id_and_trace() {
    let dir = ServiceDir::new();
    dir.install("echo", "echo_p3");
    dir.write("echo.toml", b"route = \"/api/echo\"\n");
    let server = TestServer::for_dir(&dir).await;
    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let response = client()
        .post(server.url("/api/echo/orders/7?full=1"))
        .header("traceparent", format!("00-{trace_id}-00f067aa0ba902b7-01"))
        .header("x-request-id", "p3-request")
        .body("the body")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let header = |name: &str| {
        response
            .headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string()
    };
    assert_eq!(header("x-echo-method"), "POST");
    assert_eq!(header("x-echo-path"), "/orders/7?full=1");
    assert_eq!(header("x-echo-scheme"), "http");
    assert_eq!(
        header("x-echo-authority"),
        server.base.trim_start_matches("http://")
    );
    assert_eq!(header("x-echo-request-id"), "p3-request");
    assert_eq!(header("x-request-id"), "p3-request");
    // The guest sees the caller's trace with the host's span as parent.
    let traceparent = header("x-echo-traceparent");
    assert!(traceparent.contains(trace_id), "{traceparent}");
    assert!(!traceparent.contains("00f067aa0ba902b7"), "{traceparent}");
    assert_eq!(response.text().await.unwrap(), "the body");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_0_3_echo_streams_its_body_both_ways() {
    let dir = ServiceDir::new();
    dir.install("echo", "echo_p3");
    let server = TestServer::for_dir(&dir).await;
    let (sender, receiver) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(4);
    let body = reqwest::Body::wrap_stream(tokio_stream_of(receiver));
    sender
        .send(Ok(Bytes::from_static(b"first;")))
        .await
        .unwrap();
    let mut response = client()
        .post(server.url("/echo"))
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    // The first chunk comes back while the request body is still open.
    let first = tokio::time::timeout(Duration::from_secs(10), response.chunk())
        .await
        .expect("the first chunk is echoed before the request ends")
        .unwrap()
        .unwrap();
    assert_eq!(&first[..], b"first;");
    sender
        .send(Ok(Bytes::from_static(b"second")))
        .await
        .unwrap();
    drop(sender);
    let mut rest = Vec::new();
    while let Some(chunk) = response.chunk().await.unwrap() {
        rest.extend_from_slice(&chunk);
    }
    assert_eq!(rest, b"second");

    // A large body makes the round trip intact.
    let large: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
    let echoed = client()
        .post(server.url("/echo"))
        .body(large.clone())
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    assert!(echoed[..] == large[..], "{} bytes came back", echoed.len());
}

/// A stream of the items `receiver` gets, for a streaming request body.
fn tokio_stream_of<T: Send + 'static>(
    receiver: tokio::sync::mpsc::Receiver<T>,
) -> impl futures_util::Stream<Item = T> + Send + 'static {
    futures_util::stream::unfold(receiver, |mut receiver| async move {
        receiver.recv().await.map(|item| (item, receiver))
    })
}

#[tokio::test(flavor = "multi_thread")]
async fn wasi_0_2_and_0_3_services_call_each_other() {
    let dir = ServiceDir::new();
    dir.install("hello", "hello");
    dir.install("hello3", "hello_p3");
    dir.install("caller", "caller_p3");
    dir.write(
        "caller.toml",
        b"[outbound]\nallow = [\"http://hello.internal\", \"http://hello3.internal\"]\n",
    );
    dir.install("hostile2", "hostile");
    dir.write(
        "hostile2.toml",
        b"[outbound]\nallow = [\"http://hello3.internal\"]\n",
    );
    let server = TestServer::for_dir(&dir).await;
    // 0.3 calls 0.2 and 0.3.
    for callee in ["hello", "hello3"] {
        let url = format!("http://{callee}.internal/");
        let (status, body) = get(&server.url(&format!("/caller?url={url}")))
            .await
            .unwrap();
        assert_eq!(status, 200, "{body}");
        assert!(body.starts_with(&format!("called {url}: 200")), "{body}");
        assert!(body.contains("Hello from the microservice!"), "{body}");
    }
    // 0.2 calls 0.3.
    let (status, body) = get(&server.url("/hostile2/outbound?url=http://hello3.internal/"))
        .await
        .unwrap();
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("Hello from the microservice!"), "{body}");
    // The allow-list binds a 0.3 caller like any other.
    let (status, body) = get(&server.url("/caller?url=http://hostile2.internal/"))
        .await
        .unwrap();
    assert_eq!(status, 502, "{body}");
    assert!(body.contains("HttpRequestDenied"), "{body}");
}

#[tokio::test(flavor = "multi_thread")]
async fn by_default_each_0_3_request_has_an_instance_of_its_own() {
    let (_dir, server) = hostile_server(&limits()).await;
    let url = server.url("/hostile/sleep?ms=300");
    let answers = join_all((0..4).map(|_| get(&url))).await;
    for (status, body) in answers.into_iter().map(Option::unwrap) {
        assert_eq!(status, 200, "{body}");
        assert_eq!(peak(&body), 1, "{body}");
    }
    for _ in 0..3 {
        assert_eq!(get(&server.url("/hostile/count")).await.unwrap().1, "1");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_0_3_instance_serves_requests_concurrently_when_the_manifest_allows() {
    let (_dir, server) = hostile_server(&shared(8, 100)).await;
    let url = server.url("/hostile/sleep?ms=500");
    let answers = join_all((0..6).map(|_| get(&url))).await;
    let peaks: Vec<u32> = answers
        .iter()
        .map(|answer| {
            let (status, body) = answer.as_ref().unwrap();
            assert_eq!(*status, 200, "{body}");
            peak(body)
        })
        .collect();
    assert!(
        peaks.iter().any(|&p| p >= 2),
        "no instance served two requests at once: {peaks:?}"
    );
    assert!(peaks.iter().all(|&p| p <= 8), "{peaks:?}");
    // And in turn: the instance that slept serves the next requests.
    let count: u32 = get(&server.url("/hostile/count"))
        .await
        .unwrap()
        .1
        .parse()
        .unwrap();
    assert!(count >= 3, "count {count}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_0_3_instance_serves_at_most_concurrent_requests_at_once() {
    let (_dir, server) = hostile_server(&shared(2, 100)).await;
    let url = server.url("/hostile/sleep?ms=400");
    let answers = join_all((0..6).map(|_| get(&url))).await;
    for (status, body) in answers.into_iter().map(Option::unwrap) {
        assert_eq!(status, 200, "{body}");
        assert!(peak(&body) <= 2, "{body}");
    }
}

/// Waits until the `hostile` service has an instance (a worker) running
/// the request sent to it.
async fn wait_for_instance(server: &TestServer) {
    eventually(
        Duration::from_secs(10),
        "the first request in its instance",
        || async {
            server
                .host
                .services()
                .service("hostile")
                .is_some_and(|d| d.warm_instances() == 1 && d.requests_in_flight() == 1)
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_trap_in_a_shared_0_3_instance_fails_the_requests_sharing_it() {
    let (_dir, server) = hostile_server(&shared(4, 100)).await;
    let sleeper = tokio::spawn({
        let url = server.url("/hostile/sleep?ms=1500");
        async move {
            let response = client().get(url).send().await.unwrap();
            (response.status().as_u16(), response.text().await.unwrap())
        }
    });
    // The sleeper is in its instance before the trap arrives.
    wait_for_instance(&server).await;
    let (status, body) = get(&server.url("/hostile/trap")).await.unwrap();
    assert_eq!(status, 500, "{body}");
    assert!(body.contains("crashed"), "{body}");
    let (status, body) = sleeper.await.unwrap();
    assert_eq!(status, 500, "the request sharing the instance: {body}");
    assert!(body.contains("crashed"), "{body}");
    // The next request gets a fresh instance.
    let (status, body) = get(&server.url("/hostile/count")).await.unwrap();
    assert_eq!((status, body.as_str()), (200, "1"));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_0_3_request_past_its_deadline_ends_alone_when_its_neighbours_answer() {
    let (_dir, server) = hostile_server(&shared(4, 100)).await;
    let stuck = tokio::spawn({
        let url = server.url("/hostile/never-responds");
        async move {
            let started = Instant::now();
            let response = client().get(url).send().await.unwrap();
            (response.status().as_u16(), started.elapsed())
        }
    });
    wait_for_instance(&server).await;
    // It shares the stuck request's instance and answers.
    let (status, body) = get(&server.url("/hostile/sleep?ms=100")).await.unwrap();
    assert_eq!(status, 200, "{body}");
    assert_eq!(peak(&body), 1, "{body}");
    let (status, elapsed) = stuck.await.unwrap();
    assert_eq!(status, 504);
    assert!(elapsed < Duration::from_secs(6), "took {elapsed:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn hostile_0_3_a_busy_loop_is_stopped_at_its_deadline() {
    let (_dir, server) = hostile_server(&limits()).await;
    let (status, body, elapsed) = while_neighbour_answers(&server, "/hostile/busy-loop").await;
    assert_eq!(status, 504, "{body}");
    assert!(body.contains(&format!("time limit of {LIMIT}")), "{body}");
    assert!(elapsed < Duration::from_secs(8), "took {elapsed:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn hostile_0_3_a_busy_loop_in_a_shared_instance_is_stopped_too() {
    let (_dir, server) = hostile_server(&shared(4, 100)).await;
    let (status, body, elapsed) = while_neighbour_answers(&server, "/hostile/busy-loop").await;
    assert_eq!(status, 504, "{body}");
    assert!(elapsed < Duration::from_secs(8), "took {elapsed:?}");
    // The stuck instance takes no more requests: the next one answers.
    let (status, body) = get(&server.url("/hostile/count")).await.unwrap();
    assert_eq!((status, body.as_str()), (200, "1"));
}

#[tokio::test(flavor = "multi_thread")]
async fn hostile_0_3_a_memory_bomb_hits_its_cap() {
    let (_dir, server) = hostile_server(&limits()).await;
    let (status, body, _) = while_neighbour_answers(&server, "/hostile/memory-bomb").await;
    assert_eq!(status, 500, "{body}");
    assert!(body.contains("memory limit of 32.0 MiB"), "{body}");
}

#[tokio::test(flavor = "multi_thread")]
async fn hostile_0_3_a_trap_gives_500() {
    let (_dir, server) = hostile_server(&limits()).await;
    let (status, body, _) = while_neighbour_answers(&server, "/hostile/trap").await;
    assert_eq!(status, 500, "{body}");
    assert!(body.contains("crashed"), "{body}");
}

#[tokio::test(flavor = "multi_thread")]
async fn hostile_0_3_a_request_that_never_answers_gets_504() {
    let (_dir, server) = hostile_server(&limits()).await;
    let (status, body, elapsed) = while_neighbour_answers(&server, "/hostile/never-responds").await;
    assert_eq!(status, 504, "{body}");
    assert!(elapsed < Duration::from_secs(8), "took {elapsed:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn hostile_0_3_a_huge_response_streams_through() {
    // The 32 MiB memory cap proves the body streams; the time limit is
    // generous so that a slow, busy machine still gets all 40 MiB through.
    let (_dir, server) = hostile_server("[limits]\ntimeout = \"60s\"\nmemory = \"32MiB\"\n").await;
    let mut response = client()
        .get(server.url("/hostile/huge-response?mb=40"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let mut total = 0usize;
    while let Some(chunk) = response.chunk().await.unwrap() {
        assert!(chunk.iter().all(|&b| b == b'x'));
        total += chunk.len();
    }
    assert_eq!(total, 40 << 20);
}

#[tokio::test(flavor = "multi_thread")]
async fn hostile_0_3_a_trap_after_the_response_started_cuts_the_body() {
    let (_dir, server) = hostile_server(&limits()).await;
    let response = client()
        .get(server.url("/hostile/trap-after-response"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert!(
        response.bytes().await.is_err(),
        "the body must end in an error, not look complete"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn limits_bind_0_3_services_body_and_concurrency() {
    let (_dir, server) =
        hostile_server(&format!("{}body = \"1KiB\"\nconcurrency = 1\n", limits())).await;
    let response = client()
        .post(server.url("/hostile/"))
        .body(vec![b'a'; 4096])
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 413);
    // One slow request holds the only slot; the next waits, then gets 503.
    let slow = tokio::spawn({
        let url = server.url("/hostile/sleep?ms=2500");
        async move { get(&url).await }
    });
    eventually(
        Duration::from_secs(10),
        "the slow request holding the slot",
        || async {
            server
                .host
                .services()
                .service("hostile")
                .is_some_and(|d| d.requests_in_flight() == 1)
        },
    )
    .await;
    let response = client().get(server.url("/hostile/")).send().await.unwrap();
    assert_eq!(response.status(), 503);
    assert!(response.headers().contains_key("retry-after"));
    assert_eq!(
        slow.await.unwrap().unwrap().0,
        504,
        "past the 2s time limit"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_0_3_service_keeps_serving_after_its_failures() {
    let (_dir, server) = hostile_server(&limits()).await;
    for path in [
        "/hostile/trap",
        "/hostile/memory-bomb",
        "/hostile/never-responds",
    ] {
        assert!(get(&server.url(path)).await.unwrap().0 >= 500);
    }
    assert_eq!(
        get(&server.url("/hostile/")).await.unwrap(),
        (200, "hostile: ok".into())
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_0_3_guest_output_and_access_lines_carry_the_request_id() {
    let dir = ServiceDir::new();
    dir.install("hostile", "hostile_p3");
    let wharf = WharfProcess::start(dir.path(), &[]);
    let response = client()
        .get(wharf.url("/hostile/stdio"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let request_id = response.headers()["x-request-id"]
        .to_str()
        .unwrap()
        .to_string();
    let id = format!("request_id={request_id}");
    wharf
        .wait_for_log_line(
            &["hostile-p3 says hello on stdout", &id],
            Duration::from_secs(10),
        )
        .await;
    wharf
        .wait_for_log_line(
            &["hostile-p3 says hello on stderr", &id],
            Duration::from_secs(10),
        )
        .await;
    wharf
        .wait_for_log_line(
            &["wharf::access", "status=200", &id],
            Duration::from_secs(10),
        )
        .await;
}

/// A busy guest still running when its host has shut down and been dropped
/// (a 0.3 instance runs in a task of its own, which outlives the request)
/// kept spinning forever: the host's epoch ticker went with the host, so
/// the guest never reached another yield point or its deadline, and held
/// its thread — and the runtime that thread belongs to — for good. It must
/// still stop at its deadline.
#[test]
fn regression_a_guest_running_when_its_host_is_dropped_still_stops_at_its_deadline() {
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    // A runtime of its own on a thread of its own: with the bug, the
    // spinning guest holds this thread and the channel never hears back.
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime");
        runtime.block_on(async {
            let dir = ServiceDir::new();
            dir.install("hostile", "hostile_p3");
            dir.write("hostile.toml", b"[limits]\ntimeout = \"3s\"\n");
            let mut config = wharf::Config::for_dir(dir.path()).tiers(wharf::Tiers::Cranelift);
            config.drain_timeout = Duration::from_millis(100);
            let host = wharf::Host::new(config).await.expect("build host");
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let url = format!(
                "http://{}/hostile/busy-loop",
                listener.local_addr().unwrap()
            );
            let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
            let serving = tokio::spawn({
                let host = host.clone();
                async move {
                    host.serve(listener, async {
                        let _ = stopped.await;
                    })
                    .await
                }
            });
            let request = tokio::spawn(async move { client().get(url).send().await });
            eventually(Duration::from_secs(30), "the busy loop running", || async {
                host.services()
                    .service("hostile")
                    .is_some_and(|d| d.requests_in_flight() == 1)
            })
            .await;
            // Shut down (the drain gives up on the busy request) and drop
            // every handle on the host while the guest spins.
            let _ = stop.send(());
            serving.await.expect("serving task").expect("serve");
            request.abort();
            drop(host);
            // Time for the guest to reach its 3 s deadline, on this thread.
            tokio::time::sleep(Duration::from_secs(5)).await;
        });
        let _ = done_tx.send(());
    });
    assert!(
        done_rx.recv_timeout(Duration::from_secs(90)).is_ok(),
        "the guest kept its thread after its host was dropped"
    );
}
