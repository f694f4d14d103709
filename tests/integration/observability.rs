//! Operating Wharf: metrics (scraped and parsed like Prometheus would),
//! health and readiness, the services list, the admin deploy API and its
//! token, JSON logs, guest output in the log, and TLS with HTTP/2.

use std::collections::HashMap;
use std::time::Duration;

use serde_json::Value;
use tokio::sync::oneshot;

use crate::support::{
    ServiceDir, TestServer, WharfProcess, admin_services, client, eventually, get, guest_bytes,
};

/// Starts the admin endpoint of `host` on an ephemeral port.
async fn admin_for(host: &wharf::Host, token: Option<&str>) -> (String, oneshot::Sender<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let (tx, rx) = oneshot::channel::<()>();
    let token = token.map(|t| wharf::admin::AdminToken::new(t).unwrap());
    tokio::spawn(wharf::admin::serve(host.clone(), listener, token, async {
        let _ = rx.await;
    }));
    (base, tx)
}

/// Scrapes `/metrics` and parses it with a Prometheus client library.
async fn scrape_metrics(admin: &str) -> prometheus_parse::Scrape {
    let text = client()
        .get(format!("{admin}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let lines = text.lines().map(|line| Ok(line.to_string()));
    prometheus_parse::Scrape::parse(lines).expect("the exposition parses")
}

fn value(scrape: &prometheus_parse::Scrape, name: &str, labels: &[(&str, &str)]) -> f64 {
    scrape
        .samples
        .iter()
        .filter(|s| s.metric == name)
        .find(|s| labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .map(|s| match s.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => v,
            prometheus_parse::Value::Histogram(ref buckets) => {
                buckets.iter().map(|b| b.count).fold(0.0, f64::max)
            }
            _ => f64::NAN,
        })
        .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread")]
async fn metrics_count_a_known_sequence_of_requests() {
    let dir = ServiceDir::new();
    dir.install("hello", "hello");
    dir.install("hostile", "hostile");
    dir.write(
        "hostile.toml",
        b"[limits]\ntimeout = \"1s\"\nconcurrency = 1\n",
    );
    let server = TestServer::for_dir(&dir).await;
    let (admin, _stop) = admin_for(&server.host, None).await;

    for _ in 0..3 {
        assert_eq!(get(&server.url("/hello")).await.unwrap().0, 200);
    }
    assert_eq!(get(&server.url("/hostile/trap")).await.unwrap().0, 500);
    assert_eq!(get(&server.url("/hostile/busy-loop")).await.unwrap().0, 504);
    assert_eq!(
        get(&server.url("/hostile/no-response")).await.unwrap().0,
        500
    );
    assert_eq!(get(&server.url("/nowhere")).await.unwrap().0, 404);

    let scrape = scrape_metrics(&admin).await;
    let hello = [("service", "hello")];
    assert_eq!(
        value(
            &scrape,
            "wharf_requests_total",
            &[("service", "hello"), ("class", "2xx")]
        ),
        3.0
    );
    assert_eq!(
        value(
            &scrape,
            "wharf_requests_total",
            &[("service", "hostile"), ("class", "5xx")]
        ),
        3.0
    );
    assert_eq!(
        value(&scrape, "wharf_timeouts_total", &[("service", "hostile")]),
        1.0
    );
    assert_eq!(
        value(&scrape, "wharf_traps_total", &[("service", "hostile")]),
        2.0
    );
    assert_eq!(value(&scrape, "wharf_requests_in_flight", &hello), 0.0);
    assert_eq!(
        value(
            &scrape,
            "wharf_deploy_events_total",
            &[("service", "hello"), ("event", "deploy")]
        ),
        1.0
    );
    assert_eq!(value(&scrape, "wharf_services", &[]), 2.0);
    assert!(value(&scrape, "wharf_pool_instances_capacity", &[]) >= 1.0);
    assert!(value(&scrape, "wharf_process_resident_memory_bytes", &[]) > 1e6);
    assert!(
        value(&scrape, "wharf_compile_cache_total", &[("result", "miss")])
            + value(&scrape, "wharf_compile_cache_total", &[("result", "hit")])
            >= 2.0
    );

    // A replacement and a rejection are counted too.
    dir.install("hello", "echo");
    dir.install_bytes("hostile.wasm", b"garbage");
    let host = server.host.clone();
    eventually(
        Duration::from_secs(10),
        "the replacement and the rejection",
        || {
            let host = host.clone();
            async move {
                host.services()
                    .service("hello")
                    .is_some_and(|d| d.generation() == 2)
                    && host.rejection("hostile").is_some()
            }
        },
    )
    .await;
    let scrape = scrape_metrics(&admin).await;
    assert_eq!(
        value(
            &scrape,
            "wharf_deploy_events_total",
            &[("service", "hello"), ("event", "replace")]
        ),
        1.0
    );
    assert_eq!(
        value(
            &scrape,
            "wharf_deploy_events_total",
            &[("service", "hostile"), ("event", "reject")]
        ),
        1.0
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_wasi_0_3_service_is_counted_and_listed_like_any_other() {
    let dir = ServiceDir::new();
    dir.install("hostile", "hostile_p3");
    dir.write(
        "hostile.toml",
        b"[limits]\ntimeout = \"1s\"\n[instance]\nreuse = 16\nconcurrent = 4\n",
    );
    let server = TestServer::for_dir(&dir).await;
    let (admin, _stop) = admin_for(&server.host, None).await;
    for _ in 0..2 {
        assert_eq!(get(&server.url("/hostile/")).await.unwrap().0, 200);
    }
    assert_eq!(get(&server.url("/hostile/trap")).await.unwrap().0, 500);
    assert_eq!(
        get(&server.url("/hostile/never-responds")).await.unwrap().0,
        504
    );

    let scrape = scrape_metrics(&admin).await;
    let requests = |class| {
        value(
            &scrape,
            "wharf_requests_total",
            &[("service", "hostile"), ("class", class)],
        )
    };
    assert_eq!((requests("2xx"), requests("5xx")), (2.0, 2.0));
    let hostile = [("service", "hostile")];
    assert_eq!(value(&scrape, "wharf_traps_total", &hostile), 1.0);
    assert_eq!(value(&scrape, "wharf_timeouts_total", &hostile), 1.0);
    assert_eq!(value(&scrape, "wharf_requests_in_flight", &hostile), 0.0);

    let doc = admin_services(&admin).await;
    let service = &doc["services"][0];
    assert_eq!(service["wasi_http"], "wasi:http/handler@0.3.0");
    assert_eq!(service["instance"]["reuse"], 16);
    assert_eq!(service["instance"]["concurrent"], 4);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_services_list_shows_versions_limits_and_errors() {
    let dir = ServiceDir::new();
    dir.install("hello", "hello");
    dir.write(
        "hello.toml",
        b"route = \"/hi\"\n[limits]\nconcurrency = 5\n",
    );
    dir.install_bytes("broken.wasm", b"nope");
    let server = TestServer::for_dir(&dir).await;
    let (admin, _stop) = admin_for(&server.host, None).await;
    let doc = admin_services(&admin).await;
    assert_eq!(doc["ready"], true);
    let services = doc["services"].as_array().unwrap();
    let by_name: HashMap<&str, &Value> = services
        .iter()
        .map(|s| (s["name"].as_str().unwrap(), s))
        .collect();
    let hello = by_name["hello"];
    assert_eq!(hello["route"], "/hi");
    assert_eq!(hello["generation"], 1);
    assert!(hello["digest"].as_str().unwrap().starts_with("sha256:"));
    assert!(hello["source"].as_str().unwrap().ends_with("hello.wasm"));
    assert_eq!(hello["limits"]["concurrency"], 5);
    assert!(hello["loaded_at"].as_str().unwrap().ends_with('Z'));
    assert!(
        by_name["broken"]["last_error"]
            .as_str()
            .unwrap()
            .contains("not a WebAssembly binary")
    );

    assert_eq!(
        client()
            .get(format!("{admin}/healthz"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    assert_eq!(
        client()
            .get(format!("{admin}/readyz"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn readiness_waits_for_the_initial_load() {
    // Many distinct components and no cache: loading takes a while.
    let dir = ServiceDir::new();
    let echo = guest_bytes("echo");
    for n in 0..24u8 {
        let mut bytes = echo.clone();
        bytes.extend_from_slice(&[0, 3, 2, b'v', n]);
        dir.install_bytes(&format!("s{n}.wasm"), &bytes);
    }
    let host = wharf::Host::create(wharf::Config::for_dir(dir.path()).cache_dir(None))
        .await
        .unwrap();
    let (admin, _stop) = admin_for(&host, None).await;
    let response = client()
        .get(format!("{admin}/readyz"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 503);
    assert!(response.text().await.unwrap().contains("loading"));
    assert_eq!(
        client()
            .get(format!("{admin}/healthz"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    let loading = tokio::spawn({
        let host = host.clone();
        async move { host.load().await.unwrap() }
    });
    let report = loading.await.unwrap();
    assert_eq!(report.deployed, 24);
    assert_eq!(
        client()
            .get(format!("{admin}/readyz"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn readiness_turns_off_while_draining() {
    let dir = ServiceDir::new();
    dir.install("hostile", "hostile");
    let mut wharf = WharfProcess::start(dir.path(), &["--admin", "127.0.0.1:0"]);
    let admin = wharf.admin_url();
    assert_eq!(
        client()
            .get(format!("{admin}/readyz"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    let slow_url = wharf.url("/hostile/sleep?ms=1500");
    let slow = tokio::spawn(async move { get(&slow_url).await });
    wharf
        .wait_for_log_line(&["sleeping 1500 ms"], Duration::from_secs(10))
        .await;
    wharf.terminate();
    eventually(Duration::from_secs(5), "readyz to say draining", || async {
        match client().get(format!("{admin}/readyz")).send().await {
            Ok(r) => r.status() == 503,
            Err(_) => false,
        }
    })
    .await;
    assert_eq!(slow.await.unwrap().unwrap().0, 200);
    assert!(wharf.wait_exit(Duration::from_secs(20)).await.success());
}

#[tokio::test(flavor = "multi_thread")]
async fn admin_deploys_need_the_token_and_write_through_the_directory() {
    let dir = ServiceDir::new();
    let token_file = dir.path().join(".token");
    std::fs::write(&token_file, "let-me-in\n").unwrap();
    let wharf = WharfProcess::start(
        dir.path(),
        &[
            "--admin",
            "127.0.0.1:0",
            "--admin-token-file",
            token_file.to_str().unwrap(),
        ],
    );
    let admin = wharf.admin_url();
    let put = |auth: Option<&str>, body: Vec<u8>| {
        let mut request = client().put(format!("{admin}/services/greeter")).body(body);
        if let Some(auth) = auth {
            request = request.header("authorization", auth);
        }
        request.send()
    };

    for auth in [None, Some("Bearer wrong"), Some("let-me-in")] {
        let response = put(auth, guest_bytes("hello")).await.unwrap();
        assert_eq!(response.status(), 401, "{auth:?}");
    }
    wharf
        .wait_for_log_line(&["admin request refused"], Duration::from_secs(5))
        .await;
    assert!(!dir.path().join("greeter.wasm").exists());

    let response = put(Some("Bearer let-me-in"), guest_bytes("hello"))
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let doc: Value = response.json().await.unwrap();
    assert_eq!(doc["generation"], 1);
    assert_eq!(
        std::fs::read(dir.path().join("greeter.wasm")).unwrap(),
        guest_bytes("hello")
    );
    assert_eq!(get(&wharf.url("/greeter")).await.unwrap().0, 200);

    // A broken upload is refused and changes nothing, file included.
    let response = put(Some("Bearer let-me-in"), b"not wasm".to_vec())
        .await
        .unwrap();
    assert_eq!(response.status(), 422);
    assert!(
        response
            .text()
            .await
            .unwrap()
            .contains("not a WebAssembly binary")
    );
    assert_eq!(
        std::fs::read(dir.path().join("greeter.wasm")).unwrap(),
        guest_bytes("hello")
    );

    // Component and manifest together, as multipart.
    let form = reqwest::multipart::Form::new()
        .part(
            "component",
            reqwest::multipart::Part::bytes(guest_bytes("echo")),
        )
        .text("manifest", "route = \"/greet\"\n");
    let response = client()
        .put(format!("{admin}/services/greeter"))
        .header("authorization", "Bearer let-me-in")
        .multipart(form)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let doc: Value = response.json().await.unwrap();
    assert_eq!(
        (doc["generation"].as_u64(), doc["route"].as_str()),
        (Some(2), Some("/greet"))
    );
    assert!(dir.path().join("greeter.toml").exists());
    assert_eq!(get(&wharf.url("/greet/x")).await.unwrap().0, 200);

    let delete = |auth: &str| {
        client()
            .delete(format!("{admin}/services/greeter"))
            .header("authorization", auth)
            .send()
    };
    assert_eq!(delete("Bearer nope").await.unwrap().status(), 401);
    assert_eq!(delete("Bearer let-me-in").await.unwrap().status(), 200);
    assert_eq!(get(&wharf.url("/greet")).await.unwrap().0, 404);
    assert!(!dir.path().join("greeter.wasm").exists() && !dir.path().join("greeter.toml").exists());
    assert_eq!(delete("Bearer let-me-in").await.unwrap().status(), 404);
}

#[tokio::test(flavor = "multi_thread")]
async fn without_a_token_admin_writes_are_disabled() {
    let dir = ServiceDir::new();
    let server = TestServer::for_dir(&dir).await;
    let (admin, _stop) = admin_for(&server.host, None).await;
    let response = client()
        .put(format!("{admin}/services/x"))
        .header("authorization", "Bearer anything")
        .body(guest_bytes("hello"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 403);
    assert!(!dir.path().join("x.wasm").exists());
}

#[tokio::test(flavor = "multi_thread")]
async fn json_logs_carry_access_lines_and_guest_output_with_request_ids() {
    let dir = ServiceDir::new();
    dir.install("hostile", "hostile");
    let wharf = WharfProcess::start(dir.path(), &["--log-format", "json"]);
    let response = client()
        .get(wharf.url("/hostile/stdio"))
        .send()
        .await
        .unwrap();
    let request_id = response.headers()["x-request-id"]
        .to_str()
        .unwrap()
        .to_string();
    wharf
        .wait_for_log_line(&["wharf::access", &request_id], Duration::from_secs(5))
        .await;
    let records: Vec<Value> = wharf
        .log()
        .lines()
        .filter_map(|line| serde_json::from_str(line).ok())
        .filter(|record: &Value| record["request_id"] == request_id.as_str())
        .collect();
    let stdout = records
        .iter()
        .find(|r| r["stream"] == "stdout")
        .expect("guest stdout in the log");
    assert_eq!(stdout["message"], "hostile: a line on stdout");
    assert_eq!(stdout["service"], "hostile");
    let access = records
        .iter()
        .find(|r| r["target"] == "wharf::access")
        .expect("access line");
    assert_eq!(access["status"], 200);
    assert_eq!(access["path"], "/hostile/stdio");
    assert!(records.iter().any(|r| r["stream"] == "stderr"));
}

#[tokio::test(flavor = "multi_thread")]
async fn https_serves_http2_and_http1() {
    let dir = ServiceDir::new();
    dir.install("hello", "hello");
    dir.install("echo", "echo");
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let cert_path = dir.path().join(".cert.pem");
    let key_path = dir.path().join(".key.pem");
    std::fs::write(&cert_path, cert.cert.pem()).unwrap();
    std::fs::write(&key_path, cert.signing_key.serialize_pem()).unwrap();
    let wharf = WharfProcess::start(
        dir.path(),
        &[
            "--tls-cert",
            cert_path.to_str().unwrap(),
            "--tls-key",
            key_path.to_str().unwrap(),
        ],
    );
    assert!(wharf.base.starts_with("https://"), "{}", wharf.base);
    let port = wharf.base.rsplit(':').next().unwrap().to_string();
    let root = reqwest::Certificate::from_pem(cert.cert.pem().as_bytes()).unwrap();

    let h2 = reqwest::Client::builder()
        .add_root_certificate(root.clone())
        .build()
        .unwrap();
    let response = h2
        .get(format!("https://localhost:{port}/hello"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.version(), reqwest::Version::HTTP_2);
    assert!(
        response
            .text()
            .await
            .unwrap()
            .contains("Hello from the microservice!")
    );

    let h1 = reqwest::Client::builder()
        .add_root_certificate(root)
        .http1_only()
        .build()
        .unwrap();
    let response = h1
        .get(format!("https://localhost:{port}/echo"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.version(), reqwest::Version::HTTP_11);
    let doc: Value = response.json().await.unwrap();
    assert_eq!(doc["scheme"], "https");

    // Plain HTTP to the TLS port does not get through.
    assert!(
        get(&format!("http://localhost:{port}/hello"))
            .await
            .is_none_or(|(status, _)| status != 200)
    );
}

/// Starts `wharf serve DIR --admin 127.0.0.1:0` with admin token `token`;
/// returns the process and the admin base URL.
fn wharf_with_admin(dir: &ServiceDir, token: &str, extra: &[&str]) -> (WharfProcess, String) {
    let token_file = dir.path().join(".token");
    std::fs::write(&token_file, format!("{token}\n")).unwrap();
    let mut args = vec![
        "--admin",
        "127.0.0.1:0",
        "--admin-token-file",
        token_file.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    let wharf = WharfProcess::start(dir.path(), &args);
    let admin = wharf.admin_url();
    (wharf, admin)
}

#[tokio::test(flavor = "multi_thread")]
async fn regression_a_service_named_wharf_cannot_touch_wharf_toml() {
    // PUT /services/wharf with a manifest wrote the host-wide wharf.toml
    // (every service's limits changed), and DELETE /services/wharf deleted it.
    let dir = ServiceDir::new();
    dir.install("hello", "hello");
    let settings = "[limits]\ntimeout = \"7s\"\n";
    dir.write("wharf.toml", settings.as_bytes());
    let (wharf, admin) = wharf_with_admin(&dir, "t0ken", &[]);
    for name in ["wharf", "WHARF", "Wharf"] {
        let form = reqwest::multipart::Form::new()
            .part(
                "component",
                reqwest::multipart::Part::bytes(guest_bytes("hello")),
            )
            .text("manifest", "[limits]\ntimeout = \"1s\"\n");
        let response = client()
            .put(format!("{admin}/services/{name}"))
            .header("authorization", "Bearer t0ken")
            .multipart(form)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 400, "{name}");
        assert!(response.text().await.unwrap().contains("reserved"));
        let response = client()
            .delete(format!("{admin}/services/{name}"))
            .header("authorization", "Bearer t0ken")
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 400, "{name}");
    }
    assert_eq!(
        std::fs::read_to_string(dir.path().join("wharf.toml")).unwrap(),
        settings
    );
    // A file dropped in under the reserved name is rejected, with a reason.
    dir.install("wharf", "hello");
    eventually(
        Duration::from_secs(10),
        "the reserved name's rejection",
        || async {
            let doc: Value = client()
                .get(format!("{admin}/services"))
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            doc["services"].as_array().unwrap().iter().any(|s| {
                s["name"] == "wharf"
                    && s["generation"].is_null()
                    && s["last_error"]
                        .as_str()
                        .is_some_and(|e| e.contains("reserved"))
            })
        },
    )
    .await;
    assert_eq!(get(&wharf.url("/wharf")).await.unwrap().0, 404);
    assert_eq!(get(&wharf.url("/hello")).await.unwrap().0, 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn regression_manifest_rejections_have_the_same_shape_as_component_rejections() {
    // A bad manifest was logged by another target, without the file= field
    // that component rejections have.
    let dir = ServiceDir::new();
    dir.install("hello", "hello");
    let wharf = WharfProcess::start(dir.path(), &["--log-format", "json"]);
    dir.write("hello.toml", b"[limits]\ntimeout = \"forever\"\n");
    dir.install_bytes("other.wasm", b"garbage");
    for (service, file) in [("hello", "hello.toml"), ("other", "other.wasm")] {
        wharf
            .wait_for_log_line(&["\"event\":\"reject\"", file], Duration::from_secs(10))
            .await;
        let record: Value = wharf
            .log()
            .lines()
            .filter_map(|line| serde_json::from_str::<Value>(line).ok())
            .find(|r| r["event"] == "reject" && r["service"] == service)
            .expect("a reject record");
        assert_eq!(record["target"], "wharf::deploy", "{record}");
        assert!(record["file"].as_str().unwrap().ends_with(file), "{record}");
        assert!(record["reason"].as_str().is_some(), "{record}");
    }
}
