//! `wasi:keyvalue` and `wasi:config`: one conformance suite of key-value
//! behaviour run against every backend (embedded SQLite, a Redis server and
//! a NATS JetStream server of the test's own), driven over HTTP through
//! guests built against both interface versions; then persistence, faults
//! and configuration.

use std::time::Duration;

use serde_json::Value;
use wharf::Config;
use wharf::KeyValueChoice;

use crate::support::{
    NatsServer, RedisServer, ServiceDir, TestServer, WharfProcess, client, eventually, get,
    guest_bytes,
};

/// The services every suite run deploys: `kv` (draft2) and `kv-draft`
/// (draft) sharing `default`, with key and value limits small enough to
/// reach, and `kv-small`, the only writer of `small`, a bucket whose own
/// quota (set for the host in `wharf.toml`) is small.
fn services() -> ServiceDir {
    let dir = ServiceDir::new();
    dir.install("kv", "kv");
    dir.install("kv-small", "kv");
    dir.install_bytes("kv-draft.wasm", &guest_bytes("kv_draft"));
    dir.write(
        "kv.toml",
        br#"[keyvalue]
buckets = ["default", "pages"]
[limits]
kv_key_size = "64B"
kv_value_size = "2KiB"
[config]
greeting = "hello"
[secrets]
token = { env = "WHARF_KV_TEST_TOKEN" }
"#,
    );
    dir.write("kv-small.toml", b"[keyvalue]\nbuckets = [\"small\"]\n");
    dir.write(
        "wharf.toml",
        b"[limits]\nkv_bucket_quota = \"1MiB\"\n[keyvalue]\nquotas = { small = \"16KiB\" }\n[secrets]\nenv = [\"WHARF_KV_TEST_TOKEN\"]\n",
    );
    dir.write(
        "kv-draft.toml",
        b"[keyvalue]\nbuckets = [\"default\", \"pages\"]\n[config]\nregion = \"eu\"\n",
    );
    dir
}

async fn start(backend: KeyValueChoice, dir: &ServiceDir, data: &ServiceDir) -> TestServer {
    // SAFETY: tests only read this variable; setting it to the same value
    // from several tests is harmless.
    unsafe { std::env::set_var("WHARF_KV_TEST_TOKEN", "t0ken") };
    let mut config = Config::for_dir(dir.path()).data_dir(Some(data.path().to_path_buf()));
    config.keyvalue = Some(backend);
    TestServer::start(config).await
}

/// Sends a request and returns status and body.
async fn call(server: &TestServer, method: &str, path: &str, body: &[u8]) -> (u16, String) {
    let request = client()
        .request(method.parse().unwrap(), server.url(path))
        .body(body.to_vec());
    let response = request.send().await.expect("request");
    let status = response.status().as_u16();
    (status, response.text().await.unwrap_or_default())
}

/// The conformance suite: the same behaviour from every backend.
async fn conformance(backend: KeyValueChoice) {
    let dir = services();
    let data = ServiceDir::new();
    let server = start(backend.clone(), &dir, &data).await;
    let label = format!("{backend:?}");

    // get / set / exists / delete, and sharing across services and versions.
    assert_eq!(
        call(&server, "GET", "/kv/get?key=a", b"").await.0,
        404,
        "{label}"
    );
    assert_eq!(call(&server, "PUT", "/kv/set?key=a", b"one").await.0, 204);
    assert_eq!(
        call(&server, "GET", "/kv/get?key=a", b"").await,
        (200, "one".into())
    );
    assert_eq!(
        call(&server, "GET", "/kv-draft/get?key=a", b"").await,
        (200, "one".into())
    );
    assert_eq!(
        call(&server, "GET", "/kv/exists?key=a", b"").await.1,
        "true"
    );
    assert_eq!(
        call(&server, "PUT", "/kv-draft/set?key=a", b"two").await.0,
        204
    );
    assert_eq!(call(&server, "GET", "/kv/get?key=a", b"").await.1, "two");
    // The empty name, which components built for wasmtime serve -Skeyvalue
    // and wasmCloud open, is the bucket "default" (granted like any other).
    assert_eq!(
        call(&server, "GET", "/kv/get?bucket=&key=a", b"").await,
        (200, "two".into()),
        "{label}"
    );
    assert_eq!(
        call(&server, "DELETE", "/kv/delete?key=a", b"").await.0,
        204
    );
    assert_eq!(
        call(&server, "GET", "/kv/exists?key=a", b"").await.1,
        "false"
    );
    assert_eq!(
        call(&server, "DELETE", "/kv/delete?key=a", b"").await.0,
        204,
        "deleting nothing is fine"
    );
    // Keys with characters some backends must escape.
    for key in ["a.b", "cart%2F42", "x%3Dy", "sp%20ace"] {
        assert_eq!(
            call(
                &server,
                "PUT",
                &format!("/kv/set?key={key}"),
                key.as_bytes()
            )
            .await
            .0,
            204,
            "{label} {key}"
        );
        assert_eq!(
            call(&server, "GET", &format!("/kv-draft/get?key={key}"), b"").await,
            (200, key.to_string()),
            "{label}"
        );
    }

    // list-keys, paged (1000 a page): 1,200 keys, both cursor kinds.
    for chunk in 0..12 {
        let keys: Vec<String> = (chunk * 100..(chunk + 1) * 100)
            .map(|i| format!("k{i:04}"))
            .collect();
        let (status, body) = call(
            &server,
            "POST",
            &format!("/kv/set-many?bucket=pages&keys={}", keys.join(",")),
            b"",
        )
        .await;
        assert_eq!(status, 204, "{label}: {body}");
    }
    for service in ["kv", "kv-draft"] {
        let (status, body) = call(
            &server,
            "GET",
            &format!("/{service}/keys?bucket=pages"),
            b"",
        )
        .await;
        assert_eq!(status, 200, "{label}: {body}");
        let mut keys: Vec<String> = serde_json::from_str(&body).unwrap();
        assert_eq!(keys.len(), 1200, "{label} {service}: every key once");
        keys.sort();
        keys.dedup();
        assert_eq!(keys.len(), 1200, "{label} {service}: no key twice");
        assert_eq!(keys[0], "k0000");
    }
    let (_, first) = call(&server, "GET", "/kv/list?bucket=pages", b"").await;
    let first: Value = serde_json::from_str(&first).unwrap();
    assert!(
        first["cursor"].is_string(),
        "{label}: a second page: {first}"
    );

    // batch.
    assert_eq!(
        call(&server, "POST", "/kv/set-many?keys=p,q", b"").await.0,
        204
    );
    assert_eq!(
        call(&server, "GET", "/kv-draft/get-many?keys=p,missing,q", b"")
            .await
            .1,
        "p=p,-,q=q"
    );
    assert_eq!(
        call(&server, "POST", "/kv/delete-many?keys=p,q", b"")
            .await
            .0,
        204
    );
    assert_eq!(
        call(&server, "GET", "/kv/get-many?keys=p,q", b"").await.1,
        "-,-"
    );

    // increment: atomic, signed in draft2, text the other version reads.
    assert_eq!(
        call(&server, "POST", "/kv/incr?key=n&delta=5", b"").await.1,
        "5"
    );
    assert_eq!(
        call(&server, "POST", "/kv/incr?key=n&delta=-2", b"")
            .await
            .1,
        "3"
    );
    assert_eq!(
        call(&server, "POST", "/kv-draft/incr?key=n&delta=10", b"")
            .await
            .1,
        "13"
    );
    assert_eq!(call(&server, "GET", "/kv/get?key=n", b"").await.1, "13");
    assert_eq!(
        call(&server, "PUT", "/kv/set?key=word", b"not a number")
            .await
            .0,
        204
    );
    let (status, body) = call(&server, "POST", "/kv/incr?key=word", b"").await;
    assert_eq!(status, 500, "{label}");
    assert!(body.contains("not a whole number"), "{label}: {body}");

    // compare-and-swap: a swap over a newer value fails and hands back a
    // handle on it, whose swap then succeeds.
    let (status, body) = call(&server, "POST", "/kv/cas-race?key=c", b"").await;
    assert_eq!(status, 200, "{label}: {body}");
    assert_eq!(
        call(&server, "GET", "/kv/get?key=c", b"").await.1,
        "second try"
    );
    assert_eq!(
        call(&server, "POST", "/kv/swap?key=fresh", b"v").await.1,
        "swapped"
    );

    // Grants: a bucket not in the manifest, a name no store can have.
    assert_eq!(
        call(&server, "GET", "/kv/get?bucket=secret&key=a", b"").await,
        (403, "access-denied".into())
    );
    assert_eq!(
        call(&server, "GET", "/kv/get?bucket=small&key=a", b"").await,
        (403, "access-denied".into())
    );
    assert_eq!(
        call(&server, "GET", "/kv/get?bucket=no%20such&key=a", b"").await,
        (404, "no-such-store".into())
    );

    // Limits: key size, value size, bucket quota — errors, and the service
    // keeps serving.
    let long_key = "k".repeat(65);
    let (status, body) = call(&server, "PUT", &format!("/kv/set?key={long_key}"), b"v").await;
    assert_eq!(status, 500, "{label}");
    assert!(body.contains("over the limit"), "{label}: {body}");
    let (status, body) = call(&server, "PUT", "/kv/set?key=big", &[b'x'; 2049]).await;
    assert_eq!(status, 500, "{label}");
    assert!(body.contains("over the limit"), "{label}: {body}");
    let mut quota_hit = None;
    for i in 0..20 {
        let (status, body) = call(
            &server,
            "PUT",
            &format!("/kv-small/set?bucket=small&key=v{i}"),
            &[b'y'; 2000],
        )
        .await;
        if status != 204 {
            quota_hit = Some(body);
            break;
        }
    }
    let quota = quota_hit.unwrap_or_else(|| panic!("{label}: 40 KB went into a 16 KiB bucket"));
    assert!(quota.contains("quota"), "{label}: {quota}");
    assert_eq!(
        call(&server, "GET", "/kv/get?key=c", b"").await.0,
        200,
        "{label}: still serving"
    );

    // 32 clients x 1,000 increments, concurrently: the exact total.
    let tasks: Vec<_> = (0..32)
        .map(|_| {
            let url = server.url("/kv/incr?key=total&times=1000");
            tokio::spawn(async move {
                let response = client().post(url).send().await.unwrap();
                assert_eq!(response.status(), 200);
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
    assert_eq!(
        call(&server, "GET", "/kv/get?key=total", b"").await.1,
        "32000",
        "{label}"
    );

    // The service list names each service's buckets, and config keys and
    // secret names, never secret values.
    let metrics = server.host.metrics_text();
    assert!(
        metrics.contains(&format!(
            "wharf_keyvalue_operations_total{{service=\"kv\",backend=\"{}\",op=\"increment\",result=\"ok\"}}",
            server.host.backend_statuses()[0].1.kind
        )),
        "{metrics}"
    );
    assert!(
        metrics.contains("wharf_backend_up{capability=\"keyvalue\""),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn conformance_on_the_embedded_store() {
    conformance(KeyValueChoice::Embedded).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn conformance_on_redis() {
    let redis = RedisServer::start();
    conformance(KeyValueChoice::Redis(redis.url())).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn conformance_on_nats_jetstream() {
    let nats = NatsServer::start();
    conformance(KeyValueChoice::Nats(nats.url())).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn config_values_and_secrets_reach_the_guest_and_stay_out_of_the_service_list() {
    let dir = services();
    let data = ServiceDir::new();
    let server = start(KeyValueChoice::Embedded, &dir, &data).await;
    // wasi:config@0.2.0-rc.1 and @0.2.0-draft-2024-09-27.
    assert_eq!(
        get(&server.url("/kv/config?key=greeting")).await.unwrap(),
        (200, "hello".into())
    );
    assert_eq!(
        get(&server.url("/kv/config?key=token")).await.unwrap(),
        (200, "t0ken".into())
    );
    assert_eq!(
        get(&server.url("/kv/config?key=nope")).await.unwrap().0,
        404
    );
    assert_eq!(
        get(&server.url("/kv-draft/config?key=region"))
            .await
            .unwrap(),
        (200, "eu".into())
    );
    let (listener, admin) = {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let admin = format!("http://{}", listener.local_addr().unwrap());
        (listener, admin)
    };
    tokio::spawn(wharf::admin::serve(
        server.host.clone(),
        listener,
        None,
        std::future::pending(),
    ));
    let text = client()
        .get(format!("{admin}/services"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        !text.contains("t0ken"),
        "a secret value in the service list: {text}"
    );
    let doc: Value = serde_json::from_str(&text).unwrap();
    let kv = doc["services"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "kv")
        .unwrap();
    assert_eq!(kv["secrets"], serde_json::json!(["token"]));
    assert_eq!(kv["config"]["greeting"], "hello");
    assert_eq!(
        kv["keyvalue"]["buckets"],
        serde_json::json!(["default", "pages"])
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_missing_secret_rejects_the_deployment_and_the_previous_version_keeps_serving() {
    let dir = ServiceDir::new();
    dir.install("svc", "kv");
    dir.write("svc.toml", b"[config]\nmode = \"one\"\n");
    let server = TestServer::for_dir(&dir).await;
    assert_eq!(
        get(&server.url("/svc/config?key=mode")).await.unwrap().1,
        "one"
    );
    dir.write(
        "wharf.toml",
        b"[secrets]\nenv = [\"WHARF_SURELY_UNSET_SECRET\"]\n",
    );
    dir.write(
        "svc.toml",
        b"[config]\nmode = \"two\"\n[secrets]\nkey = { env = \"WHARF_SURELY_UNSET_SECRET\" }\n",
    );
    let host = server.host.clone();
    eventually(Duration::from_secs(10), "the rejection", || {
        let host = host.clone();
        async move { host.rejection("svc").is_some() }
    })
    .await;
    let reason = server.host.rejection("svc").unwrap().reason;
    assert!(
        reason.contains("secrets.key: the environment variable it names is not set"),
        "{reason}"
    );
    assert_eq!(
        get(&server.url("/svc/config?key=mode")).await.unwrap().1,
        "one"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn embedded_state_survives_restarts_replacements_and_kill_9() {
    let dir = ServiceDir::new();
    let data = ServiceDir::new();
    dir.install("kv", "kv");
    dir.write("kv.toml", b"[keyvalue]\nbuckets = [\"default\"]\n");
    let args = ["--data-dir", data.path().to_str().unwrap()];
    let mut wharf = WharfProcess::start(dir.path(), &args);
    let set = |url: String, value: &'static str| async move {
        client()
            .put(url)
            .body(value)
            .send()
            .await
            .unwrap()
            .status()
            .as_u16()
    };
    assert_eq!(
        set(wharf.url("/kv/set?key=kept"), "across everything").await,
        204
    );
    // A replacement (a new version of the service) sees the same state.
    dir.install("kv", "kv");
    dir.write(
        "kv.toml",
        b"[keyvalue]\nbuckets = [\"default\"]\n[config]\nv = \"2\"\n",
    );
    eventually(Duration::from_secs(10), "the replacement", || async {
        get(&wharf.url("/kv/config?key=v"))
            .await
            .is_some_and(|(_, b)| b == "2")
    })
    .await;
    assert_eq!(
        get(&wharf.url("/kv/get?key=kept")).await.unwrap().1,
        "across everything"
    );
    // A graceful restart.
    wharf.terminate();
    assert!(wharf.wait_exit(Duration::from_secs(20)).await.success());
    let mut wharf = WharfProcess::start(dir.path(), &args);
    assert_eq!(
        get(&wharf.url("/kv/get?key=kept")).await.unwrap().1,
        "across everything"
    );

    // kill -9 during a write storm: every acknowledged write is there after.
    let acknowledged = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let writers: Vec<_> = (0..8)
        .map(|writer| {
            let base = wharf.base.clone();
            let acknowledged = acknowledged.clone();
            tokio::spawn(async move {
                let client = client();
                for i in 0.. {
                    let key = format!("w{writer}-{i}");
                    let sent = client
                        .put(format!("{base}/kv/set?key={key}"))
                        .body(key.clone())
                        .send()
                        .await;
                    match sent {
                        Ok(response) if response.status() == 204 => {
                            acknowledged.lock().unwrap().push(key)
                        }
                        _ => return,
                    }
                }
            })
        })
        .collect();
    eventually(Duration::from_secs(20), "a few hundred writes", || {
        let acknowledged = acknowledged.clone();
        async move { acknowledged.lock().unwrap().len() >= 300 }
    })
    .await;
    std::process::Command::new("kill")
        .args(["-KILL", &wharf.pid().to_string()])
        .status()
        .unwrap();
    let _ = wharf.wait_exit(Duration::from_secs(10)).await;
    for writer in writers {
        let _ = writer.await;
    }
    let acknowledged = acknowledged.lock().unwrap().clone();
    let wharf = WharfProcess::start(dir.path(), &args);
    let (_, body) = get(&wharf.url("/kv/keys")).await.unwrap();
    let stored: std::collections::HashSet<String> = serde_json::from_str(&body).unwrap();
    let lost: Vec<&String> = acknowledged
        .iter()
        .filter(|k| !stored.contains(*k))
        .collect();
    assert!(
        lost.is_empty(),
        "{} of {} acknowledged writes lost: {lost:?}",
        lost.len(),
        acknowledged.len()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_redis_restart_mid_run_is_reconnected_and_other_services_keep_serving() {
    let mut redis = RedisServer::start();
    let dir = services();
    dir.install("hello", "hello");
    let data = ServiceDir::new();
    let server = start(KeyValueChoice::Redis(redis.url()), &dir, &data).await;
    assert_eq!(call(&server, "PUT", "/kv/set?key=a", b"1").await.0, 204);
    redis.stop();
    // Down: key-value calls fail with an error the guest handles (a 5xx it
    // chose), within the request's time, and other services serve.
    let started = std::time::Instant::now();
    let (status, body) = call(&server, "GET", "/kv/get?key=a", b"").await;
    assert_eq!(status, 500, "{body}");
    assert!(
        body.contains("unavailable") || body.contains("redis"),
        "{body}"
    );
    assert!(started.elapsed() < Duration::from_secs(25));
    assert_eq!(get(&server.url("/hello")).await.unwrap().0, 200);
    let host = server.host.clone();
    eventually(
        Duration::from_secs(15),
        "the backend to be reported down",
        || {
            let host = host.clone();
            async move { !host.backend_statuses()[0].1.up }
        },
    )
    .await;
    // Back: reconnected, with backoff, without a restart of the host.
    redis.restart();
    eventually(
        Duration::from_secs(30),
        "key-value calls to work again",
        || async { call(&server, "PUT", "/kv/set?key=b", b"2").await.0 == 204 },
    )
    .await;
    assert_eq!(call(&server, "GET", "/kv/get?key=b", b"").await.1, "2");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_host_whose_backend_is_down_at_start_still_starts() {
    // Nothing listens on this port.
    let port = crate::support::free_port();
    let dir = services();
    dir.install("hello", "hello");
    let data = ServiceDir::new();
    let server = start(
        KeyValueChoice::Redis(format!("redis://127.0.0.1:{port}")),
        &dir,
        &data,
    )
    .await;
    assert_eq!(get(&server.url("/hello")).await.unwrap().0, 200);
    let (status, _) = call(&server, "GET", "/kv/get?key=a", b"").await;
    assert_eq!(status, 500);
}
