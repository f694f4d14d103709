//! Least privilege, pinned: one regression test per finding of the second
//! hostile review (issue 26) — replies, secrets, subscriptions and groups,
//! floods, redaction, faked deliveries, secret values in errors, dead-letter
//! reads, overflowing durations, names differing in case, the admin
//! endpoint, key-value quotas. Each drives a real host (in-process or the
//! `wharf` binary) with real guests.

use std::time::{Duration, Instant};

use serde_json::Value;
use wharf::Config;
use wharf::SecretSources;

use wharf::messaging::BrokerChoice;

use crate::support::{
    NatsServer, RabbitServer, ServiceDir, TestServer, WharfProcess, client, eventually, free_port,
    get, guest_bytes,
};

const PATIENCE: Duration = Duration::from_secs(60);
const TOKEN: &str = "least-privilege";

/// Installs the messenger guest as `name` with `manifest`.
fn messenger(dir: &ServiceDir, name: &str, manifest: &str) {
    dir.install_bytes(&format!("{name}.wasm"), &guest_bytes("messenger"));
    dir.write(&format!("{name}.toml"), manifest.as_bytes());
}

async fn post(url: &str, body: &str) -> (u16, String, Option<String>) {
    let response = client()
        .post(url)
        .body(body.to_string())
        .send()
        .await
        .expect("request");
    let status = response.status().as_u16();
    let retry_after = response
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    (
        status,
        response.text().await.unwrap_or_default(),
        retry_after,
    )
}

/// Waits until `server` records a rejection of `service` that contains
/// `needle`, and returns it.
async fn rejection(server: &TestServer, service: &str, needle: &str) -> String {
    let host = server.host.clone();
    eventually(
        PATIENCE,
        &format!("{service} rejected with {needle:?}"),
        || {
            let reason = host
                .rejection(service)
                .map(|r| r.reason)
                .unwrap_or_default();
            async move { reason.contains(needle) }
        },
    )
    .await;
    server
        .host
        .rejection(service)
        .map(|r| r.reason)
        .unwrap_or_default()
}

/// `wharf serve DIR --admin` with the token, and `args`.
fn wharf_with_admin(dir: &ServiceDir, args: &[&str]) -> WharfProcess {
    let token_file = dir.path().join(".token");
    std::fs::write(&token_file, TOKEN).unwrap();
    WharfProcess::start_with(|command| {
        command
            .arg("serve")
            .arg(dir.path())
            .args(["--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0"])
            .arg("--admin-token-file")
            .arg(&token_file)
            .args(args);
    })
}

/// PUTs `component` with `manifest` as service `name`; status and body.
async fn put(admin: &str, name: &str, component: Vec<u8>, manifest: &str) -> (u16, String) {
    let form = reqwest::multipart::Form::new()
        .part("component", reqwest::multipart::Part::bytes(component))
        .text("manifest", manifest.to_string());
    let response = client()
        .put(format!("{admin}/services/{name}"))
        .header("authorization", format!("Bearer {TOKEN}"))
        .multipart(form)
        .timeout(Duration::from_secs(20))
        .send()
        .await
        .expect("the admin endpoint answers");
    let status = response.status().as_u16();
    (status, response.text().await.unwrap_or_default())
}

// 1 and 3: replies and subscriptions.

#[tokio::test(flavor = "multi_thread")]
async fn regression_a_service_cannot_answer_a_request_it_was_not_given() {
    let dir = ServiceDir::new();
    // The legitimate responder: granted the topic it answers.
    dir.install_bytes("replier.wasm", &guest_bytes("wasmcloud_handler"));
    dir.write(
        "replier.toml",
        b"[keyvalue]\nbuckets = [\"msgs\"]\n[messaging]\nsubscribe = [\"ask.price\"]\n[[trigger.message]]\ntopic = \"ask.price\"\n",
    );
    messenger(
        &dir,
        "asker",
        "[keyvalue]\nbuckets = [\"msgs\"]\n[messaging]\npublish = [\"ask.price\"]\n",
    );
    // The spy of the review: its only grant is spy.ping.
    messenger(
        &dir,
        "spy",
        "[keyvalue]\nbuckets = [\"msgs\"]\n[messaging]\npublish = [\"spy.ping\"]\n",
    );
    let server = TestServer::for_dir(&dir).await;

    // Replying to an inbox no request named is refused, every way.
    for via in ["wasmcloud", "wasi"] {
        let (status, body, _) = post(
            &server.url(&format!(
                "/spy/publish?topic=_inbox.0123456789abcdef.0&via={via}"
            )),
            "FORGED-BY-SPY",
        )
        .await;
        assert_eq!(status, 403, "via {via}: {body}");
        assert!(body.contains("may not reply"), "via {via}: {body}");
    }
    let (status, body, _) = post(
        &server.url("/spy/publish?topic=_inbox.0123456789abcdef.0&via=http"),
        "FORGED-BY-SPY",
    )
    .await;
    assert_eq!(status, 400, "{body}");

    // A trigger on every topic without a subscribe grant does not deploy.
    messenger(
        &dir,
        "spy",
        "[keyvalue]\nbuckets = [\"msgs\"]\n[messaging]\npublish = [\"spy.ping\"]\n[[trigger.message]]\ntopic = \">\"\npath = \"/reply\"\n",
    );
    let reason = rejection(&server, "spy", "may not subscribe").await;
    assert!(reason.contains("\">\""), "{reason}");

    // The request goes to the one granted responder, and its answer comes
    // back: the spy's reply never does.
    for _ in 0..3 {
        let (status, body, _) = post(
            &server.url("/asker/request?topic=ask.price&via=wasmcloud&timeout_ms=5000"),
            "q",
        )
        .await;
        assert_eq!((status, body.as_str()), (200, "re:q"));
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn regression_a_service_naming_another_services_group_is_rejected_even_after_a_restart() {
    let dir = ServiceDir::new();
    let data = ServiceDir::new();
    let handler = |topic: &str| {
        format!(
            "[keyvalue]\nbuckets = [\"msgs\"]\n[messaging]\nsubscribe = [\"{topic}\"]\n[[trigger.message]]\ntopic = \"{topic}\"\ngroup = \"billing\"\npath = \"/record\"\n"
        )
    };
    messenger(&dir, "billing", &handler("orders.created"));
    let config = || Config::for_dir(dir.path()).data_dir(Some(data.path().to_path_buf()));
    let server = TestServer::start(config()).await;
    messenger(&dir, "thief", &handler("orders.created"));
    let reason = rejection(&server, "thief", "belongs to service \"billing\"").await;
    assert!(reason.contains("trigger.message[0].group"), "{reason}");
    server.stop().await;

    // The claim is the broker's: after a restart, whichever loads first,
    // the group stays billing's.
    let server = TestServer::start(config()).await;
    let reason = rejection(&server, "thief", "belongs to service \"billing\"").await;
    assert!(!reason.is_empty());
    assert!(
        server.host.services().service("billing").is_some(),
        "billing serves"
    );
    server.stop().await;
}

// 2: secrets.

#[tokio::test(flavor = "multi_thread")]
async fn regression_secrets_come_only_from_what_the_operator_handed_out() {
    let dir = ServiceDir::new();
    let handed = tempfile::tempdir().unwrap();
    std::fs::write(handed.path().join("db"), "s3cret-db\n").unwrap();
    let fifo = handed.path().join("fifo");
    let name = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(name.as_ptr(), 0o600) }, 0);
    dir.write(
        "wharf.toml",
        format!(
            "[secrets]\ndirs = [{:?}]\nenv = [\"WHARF_LP_HANDED_OUT\"]\n",
            handed.path().display().to_string()
        )
        .as_bytes(),
    );
    let wharf = wharf_with_admin(&dir, &[]);
    let admin = wharf.admin_url();
    let kv = guest_bytes("kv");

    // Handed out: served.
    let (status, body) = put(
        &admin,
        "ok",
        kv.clone(),
        &format!(
            "[secrets]\ndb = {{ file = {:?} }}\n",
            handed.path().join("db").display().to_string()
        ),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        get(&wharf.url("/ok/config?key=db")).await.unwrap(),
        (200, "s3cret-db".to_string())
    );

    // Not handed out, a device, a FIFO, the host's environment: each is
    // refused at once with a reason, and the admin endpoint stays up.
    for (file, needle) in [
        ("/proc/self/environ", "not in a directory handed out"),
        ("/etc/hostname", "not in a directory handed out"),
        ("/dev/zero", "regular file"),
        (fifo.to_str().unwrap(), "regular file"),
    ] {
        let started = Instant::now();
        let (status, body) = put(
            &admin,
            "bad",
            kv.clone(),
            &format!("[secrets]\nx = {{ file = {file:?} }}\n"),
        )
        .await;
        assert_eq!(status, 422, "{file}: {body}");
        assert!(body.contains(needle), "{file}: {body}");
        assert!(!body.contains(file), "{file}: the path is echoed: {body}");
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "{file} took {:?}",
            started.elapsed()
        );
    }
    let (status, body) = put(
        &admin,
        "bad",
        kv.clone(),
        "[secrets]\nx = { env = \"HOME\" }\n",
    )
    .await;
    assert_eq!(status, 422, "{body}");
    assert!(body.contains("not handed out"), "{body}");

    // A FIFO named by a manifest dropped into the directory does not stall
    // the watcher: a service dropped after it still deploys.
    dir.write(
        "hang.toml",
        format!(
            "[secrets]\nx = {{ file = {:?} }}\n",
            fifo.display().to_string()
        )
        .as_bytes(),
    );
    dir.install("hang", "kv");
    dir.install("after", "hello");
    eventually(PATIENCE, "a service dropped after the FIFO one", || {
        let url = wharf.url("/after");
        async move { get(&url).await.is_some_and(|(status, _)| status == 200) }
    })
    .await;
    assert_eq!(get(&wharf.url("/hang")).await.map(|r| r.0), Some(404));
}

// 4: floods.

/// A publisher of 64 KiB messages to `big.t` (and small ones to `fast.t`)
/// and a group on `big.t` that takes each message five seconds after it
/// came, with `settings` as the host's `wharf.toml` and `broker` its broker;
/// the services and data directories, and the host.
async fn flood_host(settings: &str, broker: Option<BrokerChoice>) -> ([ServiceDir; 2], TestServer) {
    let dir = ServiceDir::new();
    let data = ServiceDir::new();
    dir.write("wharf.toml", settings.as_bytes());
    messenger(
        &dir,
        "flood",
        "[keyvalue]\nbuckets = [\"msgs\"]\n[messaging]\npublish = [\"big.t\", \"fast.t\"]\n",
    );
    messenger(
        &dir,
        "slow",
        "[keyvalue]\nbuckets = [\"msgs\"]\n[messaging]\nsubscribe = [\"big.t\"]\n[[trigger.message]]\ntopic = \"big.t\"\npath = \"/slow?ms=5000\"\nconcurrency = 1\n",
    );
    let mut config = Config::for_dir(dir.path()).data_dir(Some(data.path().to_path_buf()));
    config.messaging = broker;
    let server = TestServer::start(config).await;
    ([dir, data], server)
}

/// Publishes 64 KiB messages to `big.t` until one is refused with 503;
/// how many were accepted, and the refusal's body.
async fn flood_until_refused(server: &TestServer) -> (usize, String) {
    let body = "x".repeat(64 << 10);
    let mut accepted = 0;
    loop {
        let (status, text, _) =
            post(&server.url("/flood/publish?topic=big.t&via=http"), &body).await;
        match status {
            200 => accepted += 1,
            503 => return (accepted, text),
            other => panic!("publish answered {other}: {text}"),
        }
        assert!(accepted < 64, "256 KiB took {accepted} messages of 64 KiB");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn regression_a_message_flood_is_refused_by_bytes_and_by_quota() {
    let (_dirs, server) = flood_host(
        "[messaging]\nmax_group_bytes = \"256KiB\"\npublish_rate = 50\n",
        None,
    )
    .await;
    let (accepted, refusal) = flood_until_refused(&server).await;
    // 64 KiB bodies with their topic and metadata: three fit in 256 KiB.
    assert_eq!(accepted, 3, "{accepted} accepted");
    assert!(
        refusal.contains("full") && refusal.contains("group slow"),
        "{refusal}"
    );
    // (The messenger passes on the status and body of messages.internal's
    // answer, not its headers: Retry-After is over_http's unit tests'.)

    // A publisher over its rate is told to wait.
    let mut throttled = None;
    for i in 0..500 {
        let (status, text, retry_after) = post(
            &server.url("/flood/publish?topic=fast.t&via=http"),
            &format!("m{i}"),
        )
        .await;
        match status {
            200 => {}
            429 => {
                throttled = Some((text, retry_after));
                break;
            }
            other => panic!("publish answered {other}: {text}"),
        }
    }
    let (text, _) = throttled.expect("50 messages a second were never throttled");
    assert!(
        text.contains("publishes more than this host allows"),
        "{text}"
    );
    assert!(
        server
            .host
            .metrics_text()
            .contains("wharf_messages_published_total{service=\"flood\",result=\"throttled\"}")
    );
    server.stop().await;
}

/// The same flood on NATS JetStream (the stream's byte bound) and on
/// RabbitMQ (the group queue's byte bound): refused as "full" once the
/// bound is reached, not stored until the broker's disk fills.
#[tokio::test(flavor = "multi_thread")]
async fn regression_a_message_flood_is_refused_by_bytes_on_nats_and_rabbitmq() {
    let nats = NatsServer::start();
    for (settings, broker) in [
        (
            "[messaging]\nmax_bytes = \"256KiB\"\n",
            BrokerChoice::Nats(nats.url()),
        ),
        (
            "[messaging]\nmax_group_bytes = \"256KiB\"\n",
            BrokerChoice::Rabbit(RabbitServer::shared_url()),
        ),
    ] {
        let label = format!("{broker:?}");
        let (_dirs, server) = flood_host(settings, Some(broker)).await;
        let (accepted, refusal) = flood_until_refused(&server).await;
        // 64 KiB bodies in a 256 KiB bound: a few, and one the consumer
        // holds unacknowledged (RabbitMQ counts only waiting messages).
        assert!((2..=6).contains(&accepted), "{label}: {accepted} accepted");
        assert!(refusal.contains("full"), "{label}: {refusal}");
        server.stop().await;
    }
}

// 5: credentials in backend addresses.

#[tokio::test(flavor = "multi_thread")]
async fn regression_nats_passwords_are_shown_to_nobody() {
    let port = free_port();
    let _nats = NatsServer::start_with(port, &["--user", "wharf", "--pass", "hunter2secret"]);
    let url = format!("nats://wharf:hunter2secret@127.0.0.1:{port}");
    let dir = ServiceDir::new();
    dir.install("hello", "hello");
    let wharf = wharf_with_admin(&dir, &["--broker", &url, "--kv", &url]);
    let admin = wharf.admin_url();
    for path in ["/services", "/dashboard/state", "/readyz", "/metrics"] {
        let (_, body) = get(&format!("{admin}{path}")).await.unwrap();
        assert!(!body.contains("hunter2secret"), "{path}: {body}");
    }
    let (_, state) = get(&format!("{admin}/dashboard/state")).await.unwrap();
    assert!(state.contains("wharf:***@127.0.0.1"), "{state}");
    assert!(!wharf.log().contains("hunter2secret"), "{}", wharf.log());
}

// 6: faked deliveries.

#[tokio::test(flavor = "multi_thread")]
async fn regression_a_client_cannot_fake_a_message_delivery() {
    let dir = ServiceDir::new();
    messenger(
        &dir,
        "rec",
        "[keyvalue]\nbuckets = [\"msgs\"]\n[messaging]\nsubscribe = [\"real.t\"]\n[[trigger.message]]\ntopic = \"real.t\"\ngroup = \"billing\"\npath = \"/record\"\n",
    );
    let server = TestServer::for_dir(&dir).await;
    let response = client()
        .post(server.url("/rec/record"))
        .header("x-wharf-group", "billing")
        .header("x-wharf-topic", "real.t")
        .header("x-wharf-attempt", "1")
        .body("FAKE")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    // Recorded as what it was: a request with no group.
    let (_, seen) = get(&server.url("/rec/seen?group=billing")).await.unwrap();
    assert!(!seen.contains("FAKE"), "{seen}");
    let (_, seen) = get(&server.url("/rec/seen?group=")).await.unwrap();
    assert!(seen.contains("FAKE"), "{seen}");
    server.stop().await;
}

// 7: secret values in manifest errors.

#[tokio::test(flavor = "multi_thread")]
async fn regression_a_secret_written_as_a_value_is_never_echoed() {
    let dir = ServiceDir::new();
    dir.install("hello", "hello");
    let wharf = wharf_with_admin(&dir, &[]);
    let admin = wharf.admin_url();
    let (status, body) = put(
        &admin,
        "leaky",
        guest_bytes("hello"),
        "[secrets]\ndb_password = \"hunter2secret\"\n",
    )
    .await;
    assert_eq!(status, 422, "{body}");
    assert!(body.contains("secrets.db_password"), "{body}");
    // The same mistake in a dropped file.
    dir.write(
        "hello.toml",
        b"[secrets]\ndb_password = \"hunter2secret\"\n",
    );
    wharf
        .wait_for_log_line(&["reject", "hello.toml"], PATIENCE)
        .await;
    for path in ["/services", "/dashboard/state"] {
        let (_, text) = get(&format!("{admin}{path}")).await.unwrap();
        assert!(text.contains("secrets.db_password"), "{path}: {text}");
        assert!(!text.contains("hunter2secret"), "{path}: {text}");
    }
    assert!(!body.contains("hunter2secret"), "{body}");
    assert!(!wharf.log().contains("hunter2secret"), "{}", wharf.log());
}

// 8: dead-letter reads.

#[tokio::test(flavor = "multi_thread")]
async fn regression_dead_letter_reads_are_paged_and_cut() {
    let dir = ServiceDir::new();
    messenger(
        &dir,
        "pub",
        "[keyvalue]\nbuckets = [\"msgs\"]\n[messaging]\npublish = [\"poison.t\"]\n",
    );
    messenger(
        &dir,
        "sink",
        "[keyvalue]\nbuckets = [\"msgs\"]\n[messaging]\nsubscribe = [\"poison.t\"]\n[[trigger.message]]\ntopic = \"poison.t\"\ngroup = \"sink\"\npath = \"/fail\"\nmax_attempts = 1\n",
    );
    let wharf = wharf_with_admin(&dir, &[]);
    let admin = wharf.admin_url();
    let big = format!("poison-{}", "y".repeat(64 << 10));
    for _ in 0..3 {
        let (status, body, _) =
            post(&wharf.url("/pub/publish?topic=poison.t&via=http"), &big).await;
        assert_eq!(status, 200, "{body}");
    }
    let read = |query: &'static str| {
        let url = format!("{admin}/messages/dead/sink{query}");
        async move {
            let response = client()
                .get(url)
                .header("authorization", format!("Bearer {TOKEN}"))
                .send()
                .await
                .unwrap();
            (response.status().as_u16(), response.text().await.unwrap())
        }
    };
    eventually(PATIENCE, "three dead letters", || async {
        let (_, body) = read("").await;
        serde_json::from_str::<Value>(&body).is_ok_and(|v| v["count"] == 3)
    })
    .await;
    let (status, body) = read("?limit=100000").await;
    assert_eq!(status, 400, "{body}");
    let (_, body) = read("?limit=2").await;
    let page: Value = serde_json::from_str(&body).unwrap();
    let letters = page["dead_letters"].as_array().unwrap();
    assert_eq!(letters.len(), 2);
    assert_eq!(letters[0]["body_truncated"], true);
    assert_eq!(letters[0]["body"].as_str().unwrap().len(), 1024);
    assert_eq!(letters[0]["body_size"], big.len());
    let next = page["next"].as_u64().expect("a next position");
    let url = format!("{admin}/messages/dead/sink?after={next}&bodies=full");
    let rest: Value = client()
        .get(url)
        .header("authorization", format!("Bearer {TOKEN}"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let rest = rest["dead_letters"].as_array().unwrap().clone();
    assert_eq!(rest.len(), 1);
    assert_eq!(rest[0]["body"].as_str().unwrap(), big);
}

// 9: overflowing durations.

#[tokio::test(flavor = "multi_thread")]
async fn regression_an_overflowing_duration_is_refused_not_a_panic() {
    let dir = ServiceDir::new();
    messenger(
        &dir,
        "pub",
        "[keyvalue]\nbuckets = [\"msgs\"]\n[messaging]\npublish = [\"ask.t\"]\n",
    );
    let wharf = wharf_with_admin(&dir, &[]);
    let admin = wharf.admin_url();
    let (status, body) = put(
        &admin,
        "slow",
        guest_bytes("hello"),
        "[limits]\ntimeout = \"300000000000y\"\n",
    )
    .await;
    assert_eq!(status, 422, "{body}");
    assert!(body.contains("longest allowed"), "{body}");
    // A dropped file gets the same answer, and later deploys still happen.
    dir.write("late.toml", b"[limits]\ntimeout = \"300000000000y\"\n");
    dir.install("late", "hello");
    wharf
        .wait_for_log_line(&["reject", "late.toml", "longest allowed"], PATIENCE)
        .await;
    dir.install("later", "hello");
    eventually(PATIENCE, "a later deploy", || {
        let url = wharf.url("/later");
        async move { get(&url).await.is_some_and(|(status, _)| status == 200) }
    })
    .await;
    // A guest's own duration too.
    let (status, body, _) = post(
        &wharf.url("/pub/request?topic=ask.t&via=http&timeout_ms=4000000000"),
        "q",
    )
    .await;
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("reply-within"), "{body}");
    assert!(!wharf.log().contains("panicked"), "{}", wharf.log());
}

// 10: names.

#[tokio::test(flavor = "multi_thread")]
async fn regression_names_differing_only_in_case_are_one_name() {
    let dir = ServiceDir::new();
    dir.install("hello", "hello");
    dir.install("Hello", "echo");
    let server = TestServer::for_dir(&dir).await;
    let reason = rejection(&server, "Hello", "lower-case").await;
    assert!(reason.contains("\"hello\""), "{reason}");
    let (status, body) = get(&server.url("/hello")).await.unwrap();
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("Hello from"), "{body}");
    server.stop().await;
    let new = std::process::Command::new(env!("CARGO_BIN_EXE_wharf"))
        .args(["new", "MyService", "--lang", "rust", "--dir"])
        .arg(dir.path().join("project"))
        .output()
        .unwrap();
    assert!(!new.status.success());
    let stderr = String::from_utf8_lossy(&new.stderr);
    assert!(
        stderr.contains("lower-case") && stderr.contains("myservice"),
        "{stderr}"
    );
}

// 11: the admin endpoint.

#[tokio::test(flavor = "multi_thread")]
async fn regression_the_admin_endpoint_refuses_strange_hosts_and_slows_token_guessing() {
    let dir = ServiceDir::new();
    dir.install("hello", "hello");
    let wharf = wharf_with_admin(&dir, &["--admin-host", "wharf-admin.test"]);
    let admin = wharf.admin_url();
    let with_host = |host: &str| {
        let request = client()
            .get(format!("{admin}/services"))
            .header("host", host.to_string());
        async move { request.send().await.unwrap().status().as_u16() }
    };
    assert_eq!(with_host("attacker.example").await, 421);
    assert_eq!(with_host("localhost.attacker.example:80").await, 421);
    assert_eq!(with_host("wharf-admin.test:9090").await, 200);
    assert_eq!(with_host("127.0.0.1").await, 200);

    let guess = |token: &str| {
        let request = client()
            .get(format!("{admin}/auth"))
            .header("authorization", format!("Bearer {token}"));
        async move {
            let response = request.send().await.unwrap();
            let retry_after = response.headers().get("retry-after").cloned();
            (response.status().as_u16(), retry_after)
        }
    };
    for i in 0..10 {
        assert_eq!(guess(&format!("guess-{i}")).await.0, 401);
    }
    let (status, retry_after) = guess("guess-10").await;
    assert_eq!(status, 429);
    assert!(retry_after.is_some());
    // Blocked means blocked: the right token waits too.
    assert_eq!(guess(TOKEN).await.0, 429);
    wharf
        .wait_for_log_line(&["wrong bearer token", "127.0.0.1"], PATIENCE)
        .await;
    wharf
        .wait_for_log_line(&["admin authentication blocked"], PATIENCE)
        .await;
}

// 12: key-value quotas.

#[tokio::test(flavor = "multi_thread")]
async fn regression_a_buckets_quota_binds_every_writer_and_wildcards_are_bounded() {
    let dir = ServiceDir::new();
    dir.write(
        "wharf.toml",
        b"[limits]\nkv_max_buckets = 3\n[keyvalue]\nquotas = { shared = \"8KiB\" }\n",
    );
    dir.install("small", "kv");
    dir.write("small.toml", b"[keyvalue]\nbuckets = [\"shared\"]\n");
    dir.install("greedy", "kv");
    dir.write("greedy.toml", b"[keyvalue]\nbuckets = [\"*\"]\n");
    let server = TestServer::for_dir(&dir).await;
    let set = |service: &str, bucket: &str, key: String| {
        let url = server.url(&format!("/{service}/set?bucket={bucket}&key={key}"));
        async move { post(&url, &"v".repeat(512)).await }
    };
    // Whoever writes, the shared bucket holds 8 KiB at most.
    let mut written = 0;
    for i in 0..40 {
        let service = if i % 2 == 0 { "small" } else { "greedy" };
        let (status, body, _) = set(service, "shared", format!("k{i}")).await;
        if status != 204 {
            assert!(body.contains("quota"), "{body}");
            break;
        }
        written += 1;
    }
    assert!(
        written * (512 + 3 + 64) <= 8 << 10 && written >= 10,
        "{written} entries of 512 bytes in an 8 KiB bucket"
    );
    // A manifest cannot raise a quota for itself.
    dir.write(
        "greedy.toml",
        b"[keyvalue]\nbuckets = [\"*\"]\n[limits]\nkv_bucket_quota = \"100GiB\"\n",
    );
    rejection(&server, "greedy", "the host's to set").await;
    // "*" opens three buckets here, not unlimited ones.
    for bucket in ["b1", "b2"] {
        let (status, body, _) = set("greedy", bucket, "k".into()).await;
        assert_eq!(status, 204, "{bucket}: {body}");
    }
    let (status, body, _) = set("greedy", "b3", "k".into()).await;
    assert_ne!(status, 204, "a fourth bucket opened: {body}");
    assert!(body.contains("kv_max_buckets"), "{body}");
    server.stop().await;
}

/// Handing out secrets through the embedding API works like the flags.
#[tokio::test(flavor = "multi_thread")]
async fn secret_sources_can_be_handed_out_by_an_embedder() {
    let dir = ServiceDir::new();
    dir.install("kv", "kv");
    dir.write(
        "kv.toml",
        b"[secrets]\ntoken = { env = \"WHARF_LP_EMBEDDER\" }\n",
    );
    // SAFETY: only this test reads this variable.
    unsafe { std::env::set_var("WHARF_LP_EMBEDDER", "from-the-embedder") };
    let mut config = Config::for_dir(dir.path());
    config.secret_sources = SecretSources::new([], ["WHARF_LP_*".to_string()]).unwrap();
    let server = TestServer::start(config).await;
    assert_eq!(
        get(&server.url("/kv/config?key=token")).await.unwrap(),
        (200, "from-the-embedder".to_string())
    );
    server.stop().await;
}
