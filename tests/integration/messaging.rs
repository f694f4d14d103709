//! Messaging and schedules: one conformance suite (publish three ways,
//! fan-out to two groups, sharing within a group, retry, dead letters,
//! ordering, request-reply through HTTP handlers and both messaging
//! exports, schedules) run against every broker — embedded, a NATS
//! JetStream server and a RabbitMQ broker of the test's own — then the
//! faults: a broker down at start, a broker restarted mid-stream, the host
//! killed mid-stream, back-pressure from a slow handler, bad manifests.
//!
//! The guests record what they handle in the `msgs` key-value bucket, so
//! every test counts messages published against messages handled.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use serde_json::Value;
use wharf::Config;
use wharf::messaging::{
    Broker, BrokerChoice, DEFAULT_MAX_PENDING, DeadLetter, DeadLetterQuery, QueueType,
};

use crate::support::{
    NatsServer, RabbitServer, ServerProcess, ServiceDir, TestServer, WharfProcess, client,
    eventually, get, guest_bytes, post,
};

/// How long a test waits for messages to arrive.
pub(crate) const PATIENCE: Duration = Duration::from_secs(60);
/// How long a request-reply that must succeed may wait for its reply: the
/// guest's default (2 s) is short for a quorum queue's fsyncs on a slow,
/// busy CI machine. Well inside the guest's own 30 s time limit.
const REPLY_PATIENCE_MS: u32 = 20_000;

/// Installs the messenger guest as `name` with `manifest`.
pub(crate) fn messenger(dir: &ServiceDir, name: &str, manifest: &str) {
    dir.install_bytes(&format!("{name}.wasm"), &guest_bytes("messenger"));
    dir.write(&format!("{name}.toml"), manifest.as_bytes());
}

/// A trigger manifest for the messenger: records in `msgs`, subscribes to
/// and handles `topic` in `group` at `path`.
pub(crate) fn handler_manifest(topic: &str, group: &str, path: &str, extra: &str) -> String {
    format!(
        "[keyvalue]\nbuckets = [\"msgs\"]\n[messaging]\nsubscribe = [\"{topic}\"]\n[[trigger.message]]\ntopic = \"{topic}\"\ngroup = \"{group}\"\npath = \"{path}\"\nretry_delay = \"100ms\"\n{extra}"
    )
}

/// Up to `limit` dead letters of `group`, whole.
pub(crate) async fn dead(
    broker: &Broker,
    group: &str,
    limit: usize,
) -> Result<Vec<DeadLetter>, String> {
    let query = DeadLetterQuery {
        after: None,
        limit,
        body_limit: 1 << 20,
    };
    broker
        .dead_letters(group, query)
        .await
        .map_err(|err| err.to_string())
}

pub(crate) async fn start(broker: BrokerChoice, dir: &ServiceDir, data: &ServiceDir) -> TestServer {
    start_bounded(broker, dir, data, DEFAULT_MAX_PENDING).await
}

async fn start_bounded(
    broker: BrokerChoice,
    dir: &ServiceDir,
    data: &ServiceDir,
    max_pending: u64,
) -> TestServer {
    let mut config = Config::for_dir(dir.path()).data_dir(Some(data.path().to_path_buf()));
    config.messaging = Some(broker);
    config.messaging_overrides.max_pending = Some(max_pending);
    TestServer::start(config).await
}

/// What group `group` has recorded: body → times handled.
pub(crate) async fn seen(server: &TestServer, group: &str) -> BTreeMap<String, u64> {
    let Some((200, body)) = get(&server.url(&format!("/pub/seen?group={group}"))).await else {
        return BTreeMap::new();
    };
    serde_json::from_str(&body).unwrap_or_default()
}

/// Waits until `group` has handled every body in `expected` (at least once).
pub(crate) async fn wait_seen(server: &TestServer, group: &str, expected: &BTreeSet<String>) {
    let mut last = BTreeMap::new();
    let deadline = std::time::Instant::now() + PATIENCE;
    while std::time::Instant::now() < deadline {
        last = seen(server, group).await;
        if expected.iter().all(|body| last.contains_key(body)) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let missing: Vec<_> = expected.iter().filter(|b| !last.contains_key(*b)).collect();
    panic!("group {group} never handled {missing:?} (handled {last:?})");
}

pub(crate) fn bodies(prefix: &str, n: usize) -> BTreeSet<String> {
    (0..n).map(|i| format!("{prefix}{i}")).collect()
}

/// The services of one conformance run; `tag` keeps its topics and groups
/// apart from other runs on a shared broker.
fn conformance_services(tag: &str) -> ServiceDir {
    let dir = ServiceDir::new();
    messenger(
        &dir,
        "pub",
        &format!(
            "[keyvalue]\nbuckets = [\"msgs\"]\n[messaging]\npublish = [\"{tag}.>\", \"ask.{tag}.>\"]\n"
        ),
    );
    messenger(
        &dir,
        "rec-a",
        &handler_manifest(
            &format!("{tag}.fan"),
            &format!("{tag}-a"),
            "/record",
            "concurrency = 4",
        ),
    );
    messenger(
        &dir,
        "rec-b",
        &handler_manifest(&format!("{tag}.*"), &format!("{tag}-b"), "/record", ""),
    );
    messenger(
        &dir,
        "share",
        &handler_manifest(
            &format!("{tag}.share"),
            &format!("{tag}-shared"),
            "/record",
            "concurrency = 8",
        ),
    );
    messenger(
        &dir,
        "flaky",
        &handler_manifest(
            &format!("{tag}.flaky"),
            &format!("{tag}-flaky"),
            "/flaky",
            "",
        ),
    );
    messenger(
        &dir,
        "poison",
        &handler_manifest(
            &format!("{tag}.poison"),
            &format!("{tag}-poison"),
            "/fail",
            "max_attempts = 3",
        ),
    );
    messenger(
        &dir,
        "ordered",
        &handler_manifest(
            &format!("{tag}.order"),
            &format!("{tag}-order"),
            "/append",
            "concurrency = 1",
        ),
    );
    messenger(
        &dir,
        "replier",
        &handler_manifest(
            &format!("ask.{tag}.http"),
            &format!("{tag}-ask"),
            "/reply",
            "",
        ),
    );
    messenger(
        &dir,
        "ticker",
        &format!(
            "[keyvalue]\nbuckets = [\"msgs\"]\n[[trigger.schedule]]\nevery = \"1s\"\npath = \"/tick?name={tag}\"\n"
        ),
    );
    dir.install_bytes("wasi-h.wasm", &guest_bytes("msg_handler"));
    dir.write(
        "wasi-h.toml",
        format!(
            "[keyvalue]\nbuckets = [\"msgs\"]\n[messaging]\nsubscribe = [\"{tag}.h\", \"ask.{tag}.wasi\"]\n[[trigger.message]]\ntopic = \"{tag}.h\"\ngroup = \"{tag}-wasi\"\n[[trigger.message]]\ntopic = \"ask.{tag}.wasi\"\ngroup = \"{tag}-wasi-ask\"\n"
        )
        .as_bytes(),
    );
    dir.install_bytes("wc-h.wasm", &guest_bytes("wasmcloud_handler"));
    dir.write(
        "wc-h.toml",
        format!(
            "[keyvalue]\nbuckets = [\"msgs\"]\n[messaging]\npublish = []\nsubscribe = [\"{tag}.h\", \"ask.{tag}.wc\"]\n[[trigger.message]]\ntopic = \"{tag}.h\"\ngroup = \"{tag}-wc\"\n[[trigger.message]]\ntopic = \"ask.{tag}.wc\"\ngroup = \"{tag}-wc-ask\"\n"
        )
        .as_bytes(),
    );
    dir
}

/// The conformance suite: the same behaviour from every broker.
pub(crate) async fn conformance(broker: BrokerChoice, tag: &str) {
    conformance_with(broker, tag, None).await;
}

/// The conformance suite with RabbitMQ's group queues of kind `queues`.
async fn conformance_with(broker: BrokerChoice, tag: &str, queues: Option<QueueType>) {
    let dir = conformance_services(tag);
    let data = ServiceDir::new();
    let mut config = Config::for_dir(dir.path()).data_dir(Some(data.path().to_path_buf()));
    config.messaging = Some(broker.clone());
    config.queues = queues;
    let server = TestServer::start(config).await;
    let label = format!("{broker:?} {queues:?}");

    // Publishing the three ways: wasi:messaging, wasmcloud:messaging and a
    // POST to messages.internal. Fan-out: each group gets every message.
    for (via, prefix) in [("wasi", "f"), ("wasmcloud", "g"), ("http", "h")] {
        let (status, body) = post(
            &server,
            &format!("/pub/publish?topic={tag}.fan&n=10&prefix={prefix}&via={via}"),
            "",
        )
        .await;
        assert_eq!(status, 200, "{label}: publish via {via}: {body}");
    }
    let fanned: BTreeSet<String> = ["f", "g", "h"]
        .iter()
        .flat_map(|prefix| bodies(prefix, 10))
        .collect();
    wait_seen(&server, &format!("{tag}-a"), &fanned).await;
    wait_seen(&server, &format!("{tag}-b"), &fanned).await;

    // The message's metadata reaches the handler: topic, content type, the
    // guest's own metadata, the publishing request's id and trace.
    let (status, last) = get(&server.url(&format!("/pub/last?group={tag}-a")))
        .await
        .unwrap();
    assert_eq!(status, 200, "{label}: {last}");
    let last: Value = serde_json::from_str(&last).unwrap();
    assert_eq!(last["topic"], format!("{tag}.fan"), "{label}: {last}");
    assert!(
        !last["message_id"].as_str().unwrap().is_empty(),
        "{label}: {last}"
    );
    assert!(
        !last["request_id"].as_str().unwrap().is_empty(),
        "{label}: {last}"
    );
    assert!(
        last["traceparent"].as_str().unwrap().starts_with("00-"),
        "{label}: {last}"
    );

    // Within a group each message is handled once, however many handlers
    // run at once.
    let (status, body) = post(
        &server,
        &format!("/pub/publish?topic={tag}.share&n=30&prefix=s"),
        "",
    )
    .await;
    assert_eq!(status, 200, "{label}: {body}");
    let shared = bodies("s", 30);
    wait_seen(&server, &format!("{tag}-shared"), &shared).await;
    // One more, published after the thirty: once the group has handled it,
    // a second delivery of any of the thirty would have come first.
    let (status, body) = post(
        &server,
        &format!("/pub/publish?topic={tag}.share&n=1&prefix=end-"),
        "",
    )
    .await;
    assert_eq!(status, 200, "{label}: {body}");
    wait_seen(&server, &format!("{tag}-shared"), &bodies("end-", 1)).await;
    let counts = seen(&server, &format!("{tag}-shared")).await;
    assert_eq!(counts.len(), 31, "{label}: {counts:?}");
    assert!(
        counts.values().all(|&times| times == 1),
        "{label}: a message handled twice within one group: {counts:?}"
    );
    // ...and the wildcard subscriber `{tag}.*` got them as well.
    wait_seen(&server, &format!("{tag}-b"), &shared).await;

    // Retry: the flaky handler fails the first two attempts.
    let (status, _) = post(&server, &format!("/pub/publish?topic={tag}.flaky"), "again").await;
    assert_eq!(status, 200);
    wait_seen(
        &server,
        &format!("{tag}-flaky"),
        &["again".to_string()].into(),
    )
    .await;
    let (status, last) = get(&server.url(&format!("/pub/last?group={tag}-flaky")))
        .await
        .unwrap();
    assert_eq!(status, 200, "{label}: {last}");
    let last: Value = serde_json::from_str(&last).unwrap();
    assert_eq!(last["attempt"], "3", "{label}: {last}");

    // Dead letters: a poison message is tried max_attempts times, then set
    // aside; the messages around it are handled.
    for body in ["ok-1", "poison-1", "ok-2"] {
        let (status, _) = post(&server, &format!("/pub/publish?topic={tag}.poison"), body).await;
        assert_eq!(status, 200);
    }
    wait_seen(
        &server,
        &format!("{tag}-poison"),
        &["ok-1".into(), "ok-2".into()].into(),
    )
    .await;
    let broker = server.host.broker().expect("messaging").clone();
    let group = format!("{tag}-poison");
    eventually(PATIENCE, "the poison message in the dead letters", || {
        let broker = broker.clone();
        let group = group.clone();
        let label = label.clone();
        async move {
            match dead(&broker, &group, 10).await {
                Ok(letters) => letters.len() == 1,
                Err(why) => {
                    eprintln!("{label}: reading the dead letters: {why}");
                    false
                }
            }
        }
    })
    .await;
    let letters = dead(&broker, &group, 10).await.unwrap();
    assert_eq!(letters[0].message.body, "poison-1", "{label}");
    // A letter just read is put back; on a quorum queue the count sees it
    // again once the return is through Raft, a moment later.
    eventually(PATIENCE, "the dead letter counted", || {
        let broker = broker.clone();
        let group = group.clone();
        async move { broker.count_dead_letters(&group).await == Ok(1) }
    })
    .await;
    // Read in pages: nothing after the last one, and a body cut short.
    let after = DeadLetterQuery {
        after: Some(letters[0].position),
        limit: 10,
        body_limit: 1 << 20,
    };
    assert_eq!(
        broker.dead_letters(&group, after).await.map(|l| l.len()),
        Ok(0),
        "{label}"
    );
    let cut = DeadLetterQuery {
        after: None,
        limit: 10,
        body_limit: 3,
    };
    let cut = broker.dead_letters(&group, cut).await.unwrap();
    assert_eq!(
        (&cut[0].message.body[..], cut[0].body_size),
        (&b"poi"[..], 8),
        "{label}"
    );
    assert_eq!(letters[0].attempts, 3, "{label}");
    assert!(
        letters[0].reason.contains("500"),
        "{label}: {}",
        letters[0].reason
    );
    assert_eq!(seen(&server, &group).await.get("poison-1"), None);

    // Ordering, as documented: with concurrency 1 and no retries, a group
    // handles one publisher's messages in the order they were published.
    let (status, _) = post(
        &server,
        &format!("/pub/publish?topic={tag}.order&n=20&prefix=o"),
        "",
    )
    .await;
    assert_eq!(status, 200);
    let expected: Vec<String> = (0..20).map(|i| format!("o{i}")).collect();
    let key = format!("/pub/count?key=log:{tag}-order");
    eventually(PATIENCE, "the ordered log", || {
        let url = server.url(&key);
        async move {
            get(&url)
                .await
                .is_some_and(|(_, log)| log.split(',').count() >= 20)
        }
    })
    .await;
    let (_, log) = get(&server.url(&key)).await.unwrap();
    assert_eq!(log.split(',').collect::<Vec<_>>(), expected, "{label}");

    // Request-reply: an HTTP handler's 2xx body is the reply, whichever way
    // the request was sent; the two messaging exports answer too.
    for via in ["wasi", "wasmcloud", "http"] {
        let (status, reply) = post(
            &server,
            &format!("/pub/request?topic=ask.{tag}.http&via={via}&timeout_ms={REPLY_PATIENCE_MS}"),
            "q",
        )
        .await;
        assert_eq!(
            (status, reply.as_str()),
            (200, "re:q"),
            "{label}: request via {via}"
        );
    }
    let (status, reply) = post(
        &server,
        &format!("/pub/request?topic=ask.{tag}.wasi&timeout_ms={REPLY_PATIENCE_MS}"),
        "w",
    )
    .await;
    assert_eq!(
        (status, reply.as_str()),
        (200, "re:w"),
        "{label}: wasi:messaging export reply"
    );
    let (status, reply) = post(
        &server,
        &format!("/pub/request?topic=ask.{tag}.wc&via=wasmcloud&timeout_ms={REPLY_PATIENCE_MS}"),
        "c",
    )
    .await;
    assert_eq!(
        (status, reply.as_str()),
        (200, "re:c"),
        "{label}: wasmcloud export reply"
    );
    // Nobody answers: a timeout, not a hang.
    let (status, body) = post(
        &server,
        &format!("/pub/request?topic={tag}.no.one&timeout_ms=300"),
        "x",
    )
    .await;
    assert_eq!(status, 504, "{label}: {body}");

    // Both messaging exports are triggered.
    let (status, _) = post(&server, &format!("/pub/publish?topic={tag}.h"), "exported").await;
    assert_eq!(status, 200);
    let exported: BTreeSet<String> = ["exported".to_string()].into();
    wait_seen(&server, "wasi-handler", &exported).await;
    wait_seen(&server, "wasmcloud-handler", &exported).await;

    // Grants: a topic outside the publish list is refused, every way.
    for via in ["wasi", "wasmcloud", "http"] {
        let (status, body) = post(
            &server,
            &format!("/pub/publish?topic=elsewhere.x&via={via}"),
            "",
        )
        .await;
        assert_eq!(status, 403, "{label}: via {via}: {body}");
    }
    // A service with no grant cannot publish at all.
    let (status, _) = post(&server, &format!("/rec-a/publish?topic={tag}.fan"), "").await;
    assert_eq!(status, 403, "{label}");

    // Schedules tick.
    eventually(PATIENCE, "two schedule ticks", || {
        let url = server.url(&format!("/pub/count?key=ticks:{tag}"));
        async move {
            get(&url)
                .await
                .and_then(|(_, n)| n.parse::<u64>().ok())
                .is_some_and(|n| n >= 2)
        }
    })
    .await;

    // Metrics count what happened.
    let metrics = server.host.metrics_text();
    let messaging_lines: Vec<&str> = metrics
        .lines()
        .filter(|line| line.contains("messages_") || line.contains("schedule_runs"))
        .collect();
    for expected in [
        "wharf_messages_published_total{service=\"pub\",result=\"ok\"}",
        "wharf_messages_published_total{service=\"pub\",result=\"denied\"}",
        "wharf_messages_handled_total{service=\"poison\",group=\"GROUP\",outcome=\"dead_lettered\"} 1",
        "wharf_schedule_runs_total{service=\"ticker\",outcome=\"ok\"}",
    ] {
        let expected = expected.replace("GROUP", &format!("{tag}-poison"));
        assert!(
            messaging_lines
                .iter()
                .any(|line| line.starts_with(&expected)),
            "{label}: no {expected} in {messaging_lines:#?}"
        );
    }

    // Deleting a group on the broker drops its dead letters with it.
    let deleted = &broker.delete_group(&group).await;
    assert!(matches!(deleted, Ok(true)), "{label}: {deleted:?}");
    let letters = dead(&broker, &group, 10).await.unwrap();
    assert!(
        letters.is_empty(),
        "{label}: {} dead letters left",
        letters.len()
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn conformance_embedded() {
    conformance(BrokerChoice::Embedded, "emb").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn conformance_nats() {
    let nats = NatsServer::start();
    conformance(BrokerChoice::Nats(nats.url()), "nats").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn conformance_rabbitmq() {
    let url = RabbitServer::shared_url();
    conformance(BrokerChoice::Rabbit(url), "rmq").await;
}

/// Quorum queues (the default on a cluster) keep every promise classic
/// ones do: retries through delay queues dead-lettered back at least once,
/// bounded queues, dead letters.
#[tokio::test(flavor = "multi_thread")]
async fn conformance_rabbitmq_quorum_queues() {
    let url = RabbitServer::shared_url();
    conformance_with(BrokerChoice::Rabbit(url), "rmqq", Some(QueueType::Quorum)).await;
}

/// A publisher and one recording group on `topic`.
pub(crate) fn pair(topic: &str, group: &str, path: &str, extra: &str) -> ServiceDir {
    let dir = ServiceDir::new();
    messenger(
        &dir,
        "pub",
        &format!("[keyvalue]\nbuckets = [\"msgs\"]\n[messaging]\npublish = [\"{topic}\"]\n"),
    );
    messenger(&dir, "rec", &handler_manifest(topic, group, path, extra));
    dir
}

/// Publishes one message per request, `count` times, calling `midway` after
/// half; returns the bodies the host accepted (answered 200).
pub(crate) async fn publish_through<F, Fut>(
    server: &TestServer,
    topic: &str,
    count: usize,
    midway: F,
) -> BTreeSet<String>
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let mut accepted = BTreeSet::new();
    let mut midway = Some(midway);
    for i in 0..count {
        if i == count / 2
            && let Some(midway) = midway.take()
        {
            midway().await;
        }
        let body = format!("m{i}");
        let (status, why) = post(server, &format!("/pub/publish?topic={topic}"), &body).await;
        match status {
            200 => {
                accepted.insert(body);
            }
            503 | 504 => tokio::time::sleep(Duration::from_millis(20)).await,
            other => panic!("publish answered {other}: {why}"),
        }
    }
    accepted
}

#[tokio::test(flavor = "multi_thread")]
async fn broker_down_at_start_then_attached() {
    let port = crate::support::free_port();
    let dir = pair("late.t", "late", "/record", "");
    let data = ServiceDir::new();
    let server = start(
        BrokerChoice::Nats(format!("nats://127.0.0.1:{port}")),
        &dir,
        &data,
    )
    .await;

    // The host serves HTTP; publishing fails clearly; readiness says which
    // backend is down.
    assert_eq!(
        get(&server.url("/pub/count?key=x")).await.map(|r| r.0),
        Some(200)
    );
    let (status, body) = post(&server, "/pub/publish?topic=late.t", "early").await;
    assert_eq!(status, 503, "{body}");
    let (status, body) = post(&server, "/pub/publish?topic=late.t&via=http", "early").await;
    assert_eq!(status, 503, "{body}");
    let messaging = |server: &TestServer| {
        server
            .host
            .backend_statuses()
            .into_iter()
            .find(|(capability, _)| *capability == "messaging")
            .map(|(_, status)| status.up)
    };
    assert_eq!(messaging(&server), Some(false));
    assert!(
        server
            .host
            .metrics_text()
            .contains("capability=\"messaging\",backend=\"nats\"} 0")
    );

    // The broker comes up: publishing works and the trigger attaches.
    let _nats = NatsServer::start_on(port);
    eventually(PATIENCE, "publishing once NATS is up", || {
        let url = server.url("/pub/publish?topic=late.t");
        async move {
            client()
                .post(url)
                .body("late")
                .send()
                .await
                .is_ok_and(|r| r.status() == 200)
        }
    })
    .await;
    wait_seen(&server, "late", &["late".to_string()].into()).await;
    assert_eq!(messaging(&server), Some(true));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn nats_restarted_mid_stream_loses_nothing() {
    let mut nats = NatsServer::start();
    let dir = pair("restart.t", "restart", "/record", "");
    let data = ServiceDir::new();
    let server = start(BrokerChoice::Nats(nats.url()), &dir, &data).await;
    let accepted = publish_through(&server, "restart.t", 60, || {
        nats.restart();
        async {}
    })
    .await;
    assert!(
        accepted.len() >= 30,
        "only {} of 60 accepted",
        accepted.len()
    );
    wait_seen(&server, "restart", &accepted).await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn rabbitmq_restarted_mid_stream_loses_nothing() {
    let mut rabbit = RabbitServer::start();
    let broker = BrokerChoice::Rabbit(rabbit.url());
    restarted_mid_stream_loses_nothing(broker, &mut rabbit).await;
}

/// 40 messages published one by one while `server` (the broker `broker`
/// names) is restarted halfway: at least half are accepted, every accepted
/// one is handled, and publishing works again afterwards.
pub(crate) async fn restarted_mid_stream_loses_nothing(
    broker: BrokerChoice,
    server_process: &mut ServerProcess,
) {
    let dir = pair("restart.t", "restart", "/record", "");
    let data = ServiceDir::new();
    let server = start(broker, &dir, &data).await;
    let accepted = publish_through(&server, "restart.t", 40, || {
        server_process.restart();
        async {}
    })
    .await;
    eprintln!(
        "{} restarted mid-stream: {} of 40 accepted",
        server_process.what,
        accepted.len()
    );
    assert!(
        accepted.len() >= 20,
        "only {} of 40 accepted",
        accepted.len()
    );
    wait_seen(&server, "restart", &accepted).await;
    // The broker is back, and so is publishing.
    let (status, body) = post(&server, "/pub/publish?topic=restart.t", "after").await;
    assert_eq!(status, 200, "{body}");
    wait_seen(&server, "restart", &["after".to_string()].into()).await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn host_killed_mid_stream_delivers_everything_after_restart() {
    let dir = pair("crash.t", "crash", "/slow?ms=20", "concurrency = 2");
    let data = tempfile::TempDir::new().unwrap();
    let data_arg = data.path().to_str().unwrap().to_string();
    let host = WharfProcess::start(dir.path(), &["--data-dir", &data_arg]);
    let publish = client()
        .post(host.url("/pub/publish?topic=crash.t&n=200&prefix=k"))
        .send()
        .await
        .unwrap();
    assert_eq!(publish.status(), 200, "{}", publish.text().await.unwrap());
    // Some handled, most not: kill -9.
    eventually(PATIENCE, "the first messages handled", || {
        let url = host.url("/pub/seen?group=crash");
        async move {
            get(&url)
                .await
                .and_then(|(_, body)| serde_json::from_str::<BTreeMap<String, u64>>(&body).ok())
                .is_some_and(|seen| seen.len() >= 5)
        }
    })
    .await;
    drop(host);

    let host = WharfProcess::start(dir.path(), &["--data-dir", &data_arg]);
    let expected = bodies("k", 200);
    eventually(PATIENCE, "every message handled after the restart", || {
        let url = host.url("/pub/seen?group=crash");
        let expected = expected.clone();
        async move {
            get(&url)
                .await
                .and_then(|(_, body)| serde_json::from_str::<BTreeMap<String, u64>>(&body).ok())
                .is_some_and(|seen| expected.iter().all(|body| seen.contains_key(body)))
        }
    })
    .await;
    // At least once: only the messages in flight at the kill (two at most,
    // the trigger's concurrency) may have run twice.
    let (_, body) = get(&host.url("/pub/seen?group=crash")).await.unwrap();
    let seen: BTreeMap<String, u64> = serde_json::from_str(&body).unwrap();
    let twice = seen.values().filter(|&&n| n > 1).count();
    assert!(twice <= 2, "{twice} messages handled twice: {seen:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn slow_handler_is_bounded_and_publishers_feel_back_pressure() {
    let dir = pair("slow.t", "slow", "/slow?ms=50", "concurrency = 2");
    let data = ServiceDir::new();
    let server = start_bounded(BrokerChoice::Embedded, &dir, &data, 20).await;
    // 60 messages into a queue of 20 with a handler at ~40/s: some are
    // refused as "full" (503), none of the accepted ones is lost.
    let mut accepted = BTreeSet::new();
    let mut refused = 0;
    let mut peak_in_flight = 0;
    for i in 0..60 {
        let body = format!("s{i}");
        let (status, why) = post(&server, "/pub/publish?topic=slow.t&via=http", &body).await;
        match status {
            200 => {
                accepted.insert(body);
            }
            503 => {
                assert!(why.contains("full"), "{why}");
                refused += 1;
            }
            other => panic!("publish answered {other}: {why}"),
        }
        peak_in_flight = peak_in_flight.max(in_flight(&server, "rec"));
    }
    assert!(refused > 0, "a bounded queue never pushed back");
    wait_seen(&server, "slow", &accepted).await;
    assert!(
        peak_in_flight <= 2,
        "{peak_in_flight} messages in flight for a concurrency of 2"
    );
    server.stop().await;
}

/// The service's in-flight requests, from the metrics.
fn in_flight(server: &TestServer, service: &str) -> u64 {
    let needle = format!("wharf_requests_in_flight{{service=\"{service}\"}} ");
    server
        .host
        .metrics_text()
        .lines()
        .find_map(|line| line.strip_prefix(&needle).and_then(|n| n.parse().ok()))
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_triggers_are_rejected_with_the_key_and_the_old_version_keeps_running() {
    let dir = pair("bad.t", "bad", "/record", "");
    let data = ServiceDir::new();
    let server = start(BrokerChoice::Embedded, &dir, &data).await;
    let (status, _) = post(&server, "/pub/publish?topic=bad.t", "before").await;
    assert_eq!(status, 200);
    wait_seen(&server, "bad", &["before".to_string()].into()).await;

    for (manifest, expected) in [
        (
            "[[trigger.schedule]]\ncron = \"every tuesday\"\npath = \"/tick\"\n",
            "trigger.schedule[0].cron",
        ),
        (
            "[[trigger.message]]\ntopic = \"bad.t\"\npath = \"/record\"\ncolour = \"red\"\n",
            "colour",
        ),
        (
            "[[trigger.message]]\ntopic = \"bad..t\"\npath = \"/record\"\n",
            "trigger.message[0].topic",
        ),
        (
            "[[trigger.message]]\ntopic = \"bad.t\"\nmax_attempts = 0\n",
            "trigger.message[0].max_attempts",
        ),
    ] {
        dir.write(
            "rec.toml",
            format!(
                "[keyvalue]\nbuckets = [\"msgs\"]\n[messaging]\nsubscribe = [\"bad.t\"]\n{manifest}"
            )
            .as_bytes(),
        );
        eventually(
            PATIENCE,
            &format!("the rejection naming {expected}"),
            || {
                let reason = server
                    .host
                    .rejections()
                    .get("rec")
                    .map(|r| r.reason.clone())
                    .unwrap_or_default();
                async move { reason.contains(expected) }
            },
        )
        .await;
        let reason = server.host.rejections().get("rec").unwrap().reason.clone();
        assert!(reason.contains("rec.toml"), "{reason}");
    }
    // The previous version is still subscribed and handling.
    let (status, _) = post(&server, "/pub/publish?topic=bad.t", "after").await;
    assert_eq!(status, 200);
    wait_seen(&server, "bad", &["after".to_string()].into()).await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_messaging_only_service_answers_http_with_404() {
    // A service that exports wasi:messaging but no HTTP handler cannot be
    // reached over HTTP: 404, not a trap.
    let dir = ServiceDir::new();
    dir.install_bytes("wasi-h.wasm", &guest_bytes("msg_handler"));
    dir.write("wasi-h.toml", b"[keyvalue]\nbuckets = [\"msgs\"]\n");
    let server = TestServer::for_dir(&dir).await;
    let (status, body) = get(&server.url("/wasi-h/")).await.unwrap();
    assert_eq!(status, 404, "{body}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_abandoned_group_holds_messages_until_the_admin_deletes_it() {
    let dir = pair("orph.t", "orphan", "/record", "");
    messenger(
        &dir,
        "live",
        &handler_manifest("other.t", "inuse", "/record", ""),
    );
    let token_file = dir.path().join(".token");
    std::fs::write(&token_file, "s3cret").unwrap();
    let wharf = WharfProcess::start_with(|command| {
        command
            .arg("serve")
            .arg(dir.path())
            .args(["--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0"])
            .arg("--admin-token-file")
            .arg(&token_file)
            .args(["--max-pending-messages", "3"]);
    });
    let admin = wharf
        .log()
        .lines()
        .find_map(|l| l.split("admin listening on ").nth(1).map(str::to_string))
        .expect("admin address line");
    let publish = |body: &str| {
        let request = client()
            .post(wharf.url("/pub/publish?topic=orph.t&via=http"))
            .body(body.to_string());
        async move {
            let response = request.send().await.unwrap();
            (response.status().as_u16(), response.text().await.unwrap())
        }
    };

    // The recording service is removed; its group stays bound on the
    // broker (so a service put back loses nothing), and messages for it
    // pile up until the broker's bound.
    dir.remove("rec.wasm");
    dir.remove("rec.toml");
    // (Not "GET /rec/ is 404": the guest itself answers 404 for `/`.)
    eventually(PATIENCE, "rec removed", || {
        let removed = wharf
            .log()
            .lines()
            .any(|line| line.contains("service removed") && line.contains("service=rec"));
        async move { removed }
    })
    .await;
    for i in 0..3 {
        assert_eq!(publish(&format!("m{i}")).await.0, 200);
    }
    let (status, body) = publish("one too many").await;
    assert_eq!(status, 503, "{body}\n{}", wharf.log());
    assert!(body.contains("full"), "{body}");

    let delete = |group: &str, token: Option<&str>| {
        let mut request = client().delete(format!("{admin}/messages/groups/{group}"));
        if let Some(token) = token {
            request = request.header("authorization", format!("Bearer {token}"));
        }
        async move {
            let response = request.send().await.unwrap();
            (response.status().as_u16(), response.text().await.unwrap())
        }
    };
    assert_eq!(delete("orphan", None).await.0, 401);
    let (status, body) = delete("inuse", Some("s3cret")).await;
    assert_eq!(status, 409, "{body}");
    assert!(body.contains("live"), "{body}");
    let (status, body) = delete("orphan", Some("s3cret")).await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("\"deleted\":true"), "{body}");

    // Nothing waits for the group any more: publishing flows again.
    for i in 0..5 {
        let (status, body) = publish(&format!("after{i}")).await;
        assert_eq!(status, 200, "{body}");
    }
    let (_, body) = delete("orphan", Some("s3cret")).await;
    assert!(body.contains("\"deleted\":false"), "{body}");
}
