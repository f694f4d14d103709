//! Data that survives the loss of a machine: a JetStream cluster of three
//! `nats-server`s of the test's own, hosts joined to it, and servers lost
//! under load — killed with SIGKILL and their disks deleted, then replaced
//! by empty ones, while clients write keys and publish messages. With three
//! copies nothing acknowledged is lost; with one, the test shows what is.
//!
//! The cases run one after another in one test, each on three servers of
//! its own (started in about a second): a server that lost its disk also
//! forgot its votes, and on servers shared between cases it could help
//! elect a metadata leader that forgot an earlier case's stream deletions,
//! whose ghosts then never catch up.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use wharf::cluster::ClusterConfig;
use wharf::{Config, Replicas};

use crate::support::{NatsCluster, ServiceDir, TestServer, client, eventually, guest_bytes};

const PATIENCE: Duration = Duration::from_secs(60);

/// One host of a Wharf cluster and its directories.
struct Member {
    server: TestServer,
    dir: ServiceDir,
    _data: ServiceDir,
}

/// A host of Wharf cluster `cluster` on the servers `nats`, keeping
/// `replicas` copies of the cluster's own streams and `data_replicas` of
/// its key-value buckets and message streams (both on the cluster's NATS).
async fn member(
    nats: &str,
    cluster: &str,
    id: &str,
    replicas: Replicas,
    data_replicas: Replicas,
) -> Member {
    let (dir, data) = (ServiceDir::new(), ServiceDir::new());
    dir.write(
        "wharf.toml",
        format!(
            "[keyvalue]\nreplicas = \"{data_replicas}\"\n[messaging]\nreplicas = \"{data_replicas}\"\n"
        )
        .as_bytes(),
    );
    let mut config = Config::for_dir(dir.path()).data_dir(Some(data.path().to_path_buf()));
    let mut joined = ClusterConfig::new(nats);
    joined.name = cluster.to_string();
    joined.host_id = Some(id.to_string());
    joined.replicas = replicas;
    config.cluster = Some(joined);
    Member {
        server: TestServer::start(config).await,
        dir,
        _data: data,
    }
}

async fn wait_ready(member: &Member) {
    let host = member.server.host.clone();
    eventually(PATIENCE, "the host joined the cluster", || {
        let ready = host.is_ready();
        async move { ready }
    })
    .await;
}

async fn wait_all_serve(members: &[Member], service: &str) {
    eventually(PATIENCE, &format!("every host serving {service}"), || {
        let all = members
            .iter()
            .all(|m| m.server.host.services().service(service).is_some());
        async move { all }
    })
    .await;
}

async fn jetstream(nats: &str) -> async_nats::jetstream::Context {
    let servers: Vec<async_nats::ServerAddr> = nats
        .split(',')
        .map(|url| url.parse().expect("a NATS URL"))
        .collect();
    let client = async_nats::connect(servers).await.expect("connect to NATS");
    async_nats::jetstream::new(client)
}

/// Whether every host serves `service` within `limit`.
async fn all_serve_within(members: &[Member], service: &str, limit: Duration) -> bool {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if members
            .iter()
            .all(|m| m.server.host.services().service(service).is_some())
        {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// How long a replaced server may take to catch up (on a loaded 2-core
/// machine, with writes going on).
const CATCH_UP: Duration = Duration::from_secs(180);

/// Waits until JetStream's metadata, every stream and every consumer have a
/// leader that sees each copy current: a replaced server has caught up. A
/// failure shows what the servers logged.
async fn wait_streams_current(nats: &NatsCluster) {
    let jetstream = jetstream(&nats.url()).await;
    let deadline = tokio::time::Instant::now() + CATCH_UP;
    loop {
        let mut behind = streams_behind(&jetstream).await;
        if let Err(why) = nats.metadata_whole().await {
            behind.push(why);
        }
        if behind.is_empty() {
            return;
        }
        if tokio::time::Instant::now() >= deadline {
            let logs: Vec<String> = (0..nats.servers())
                .map(|i| format!("--- n{i} ---\n{}", nats.log_tail(i, 25)))
                .collect();
            panic!(
                "after {CATCH_UP:?} streams still behind: {behind:?}\n{}",
                logs.join("\n")
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The streams without a leader or with a copy that is not current, and
/// why; empty when every stream is whole.
async fn streams_behind(jetstream: &async_nats::jetstream::Context) -> Vec<String> {
    use futures_util::StreamExt as _;
    let names: Vec<Result<String, String>> = jetstream
        .stream_names()
        .map(|name| name.map_err(|err| err.to_string()))
        .collect()
        .await;
    let mut behind = Vec::new();
    if names.is_empty() {
        behind.push("no streams listed".to_string());
    }
    for name in names {
        let name = match name {
            Ok(name) => name,
            Err(err) => {
                behind.push(format!("listing: {err}"));
                continue;
            }
        };
        let (info, consumers) = match jetstream.get_stream(&name).await {
            Ok(mut stream) => {
                let consumers: Vec<_> = stream.consumers().collect().await;
                (stream.info().await.cloned(), consumers)
            }
            Err(err) => {
                behind.push(format!("{name}: {err}"));
                continue;
            }
        };
        // A stream's consumers are replicated groups of their own: their
        // copies must catch up too before another server may be lost.
        for consumer in consumers {
            match consumer {
                Ok(consumer) => behind.extend(copies_behind(
                    &format!("{name}/{}", consumer.name),
                    consumer.cluster.as_ref(),
                )),
                Err(err) => behind.push(format!("{name}: listing consumers: {err}")),
            }
        }
        match info {
            Ok(info) => behind.extend(copies_behind(&name, info.cluster.as_ref())),
            Err(err) => behind.push(format!("{name}: {err}")),
        }
    }
    behind
}

/// Why the replicated group `what` (a stream or a consumer) is not whole:
/// no leader, or a copy that is offline or not current.
fn copies_behind(
    what: &str,
    cluster: Option<&async_nats::jetstream::stream::ClusterInfo>,
) -> Vec<String> {
    let Some(cluster) = cluster else {
        return vec![format!("{what}: no cluster information")];
    };
    let mut behind = Vec::new();
    if cluster.leader.is_none() {
        behind.push(format!("{what}: no leader"));
    }
    for peer in cluster.replicas.iter().filter(|p| !p.current || p.offline) {
        behind.push(format!(
            "{what}: {} current={} offline={} lag={:?}",
            peer.name, peer.current, peer.offline, peer.lag
        ));
    }
    behind
}

/// The server leading the stream of key-value bucket `bucket`.
async fn leader_of_bucket(nats: &str, bucket: &str) -> String {
    let mut stream = jetstream(nats)
        .await
        .get_stream(format!("KV_wharf-kv-{bucket}"))
        .await
        .expect("the bucket's stream");
    let info = stream.info().await.expect("stream info");
    info.cluster
        .as_ref()
        .and_then(|cluster| cluster.leader.clone())
        .expect("the stream has a leader")
}

/// What a run of writes and publishes under server losses saw.
#[derive(Debug)]
struct Outcome {
    /// Writes the hosts acknowledged (2xx).
    acknowledged: usize,
    /// Acknowledged writes the bucket does not have at the end.
    lost: usize,
    /// Writes that failed or timed out.
    failed: u64,
    /// Publishes the hosts accepted (2xx).
    published: usize,
    /// Accepted publishes the handler gave up on: dead letters, not lost.
    dead_lettered: usize,
    /// Accepted publishes neither handled nor dead-lettered by the end.
    unhandled: usize,
    /// Publishes that failed or timed out.
    publishes_failed: u64,
    /// Services deployed during a loss that some host never served.
    deploys_missing: usize,
}

/// Clients writing at once: while a bucket has no leader each waits out
/// its timeout, and the test measures progress in attempts.
const CLIENTS: usize = 4;

/// Each client's pause after an acknowledged write (some 200 writes a
/// second in all).
const WRITE_PAUSE: Duration = Duration::from_millis(20);

/// The publisher's pause after an accepted publish (some 20 messages a
/// second).
const PUBLISH_PAUSE: Duration = Duration::from_millis(50);

/// What the clients of one kind of load have seen so far.
#[derive(Default)]
struct Load {
    /// The ids whose request was acknowledged.
    acknowledged: std::sync::Mutex<Vec<String>>,
    /// Attempts so far, acknowledged or not.
    attempts: AtomicU64,
    /// Attempts that failed or timed out.
    failed: AtomicU64,
    /// Whether the clients hold off for now.
    paused: AtomicBool,
}

impl Load {
    fn acknowledged(&self) -> usize {
        self.acknowledged.lock().map(|ids| ids.len()).unwrap_or(0)
    }

    fn acknowledged_ids(&self) -> Vec<String> {
        self.acknowledged
            .lock()
            .map(|ids| ids.clone())
            .unwrap_or_default()
    }
}

/// The request a load's client sends: a client, a host's base URL and a
/// new id in, the request out.
type Request = fn(&reqwest::Client, &str, &str) -> reqwest::RequestBuilder;

/// A new key per request (unique keys, not a counter: an increment is a
/// compare-and-swap, and NATS servers before 2.9.21 accept two concurrent
/// swaps of one key in a replicated stream, nats-server#4320, which would
/// be counted here as a loss).
fn write_key(http: &reqwest::Client, base: &str, key: &str) -> reqwest::RequestBuilder {
    http.put(format!("{base}/counter/set?bucket=counts&key={key}"))
        .body("1")
}

/// A message whose body is the id, to the topic the recorder handles.
fn publish_message(http: &reqwest::Client, base: &str, body: &str) -> reqwest::RequestBuilder {
    http.post(format!("{base}/pub/publish?topic=rd.t"))
        .body(body.to_string())
}

/// Sends `request` with a new id each time through `members` in turn, from
/// `clients` clients pausing `pause` after each acknowledged one, until
/// `stop`: every acknowledged id is one the system must keep.
fn load_until(
    members: &[String],
    clients: usize,
    pause: Duration,
    request: Request,
    stop: Arc<AtomicBool>,
    load: Arc<Load>,
) -> tokio::task::JoinHandle<()> {
    let clients: Vec<_> = (0..clients)
        .map(|client_index| {
            let (urls, stop, load) = (members.to_vec(), stop.clone(), load.clone());
            tokio::spawn(async move {
                let http = client();
                let mut n = 0usize;
                while !stop.load(Ordering::Acquire) {
                    if load.paused.load(Ordering::Acquire) {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        continue;
                    }
                    let url = &urls[(client_index + n) % urls.len()];
                    let id = format!("w{client_index}-{n}");
                    n += 1;
                    load.attempts.fetch_add(1, Ordering::AcqRel);
                    let answer = request(&http, url, &id)
                        .timeout(Duration::from_secs(3))
                        .send()
                        .await;
                    match answer {
                        Ok(response) if response.status().is_success() => {
                            if let Ok(mut ids) = load.acknowledged.lock() {
                                ids.push(id);
                            }
                            // A steady load, not a flood: a replaced server
                            // catches up with a stream that keeps growing.
                            tokio::time::sleep(pause).await;
                        }
                        _ => {
                            load.failed.fetch_add(1, Ordering::AcqRel);
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                    }
                }
            })
        })
        .collect();
    tokio::spawn(async move {
        for client in clients {
            client.await.expect("a loading client");
        }
    })
}

/// Waits until `count()` has grown by `more`.
async fn wait_for_more(count: impl Fn() -> u64, more: u64, what: &str) {
    let target = count() + more;
    eventually(PATIENCE, what, || {
        let reached = count() >= target;
        async move { reached }
    })
    .await;
}

/// Two hosts in Wharf cluster `name` keeping `copies` of each key-value
/// bucket and message stream (and three of the cluster's own streams):
/// under writes, publishes and a deploy during each loss, loses the server
/// leading the bucket, replaces it, waits for it to catch up, then does the
/// same to another.
async fn lose_two_servers_under_load(name: &str, copies: usize) -> Outcome {
    let mut nats = NatsCluster::start(3);
    let nats = &mut nats;
    let url = nats.url();
    let (own, data) = (Replicas::Exactly(3), Replicas::Exactly(copies));
    let members = vec![
        member(&url, name, "h0", own, data).await,
        member(&url, name, "h1", own, data).await,
    ];
    for m in &members {
        wait_ready(m).await;
    }
    let dir = &members[0].dir;
    dir.install_bytes("counter.wasm", &guest_bytes("kv"));
    dir.write("counter.toml", b"[keyvalue]\nbuckets = [\"counts\"]\n");
    // A handler that retries a message it could not record (its bucket may
    // be electing a leader) for longer than a server loss lasts.
    for (service, manifest) in [
        ("pub", "[messaging]\npublish = [\"rd.>\"]\n"),
        (
            "rec",
            "[keyvalue]\nbuckets = [\"msgs\"]\n[messaging]\nsubscribe = [\"rd.t\"]\n[[trigger.message]]\ntopic = \"rd.t\"\ngroup = \"rd\"\npath = \"/record\"\nmax_attempts = 10\nretry_delay = \"500ms\"\n",
        ),
    ] {
        dir.install_bytes(&format!("{service}.wasm"), &guest_bytes("messenger"));
        dir.write(&format!("{service}.toml"), manifest.as_bytes());
    }
    for service in ["counter", "pub", "rec"] {
        wait_all_serve(&members, service).await;
    }

    let stop = Arc::new(AtomicBool::new(false));
    let (writes, publishes) = (Arc::new(Load::default()), Arc::new(Load::default()));
    let urls: Vec<String> = members.iter().map(|m| m.server.url("")).collect();
    let loads = [
        load_until(
            &urls,
            CLIENTS,
            WRITE_PAUSE,
            write_key,
            stop.clone(),
            writes.clone(),
        ),
        load_until(
            &urls,
            1,
            PUBLISH_PAUSE,
            publish_message,
            stop.clone(),
            publishes.clone(),
        ),
    ];
    let pause = |paused: bool| {
        for load in [&writes, &publishes] {
            load.paused.store(paused, Ordering::Release);
        }
    };
    let acknowledged = || writes.acknowledged() as u64;
    let attempts = || writes.attempts.load(Ordering::Acquire);
    wait_for_more(acknowledged, 50, "writes before the first loss").await;

    let first = nats.index_of(&leader_of_bucket(&url, "counts").await);
    let second = (first + 1) % 3;
    for (round, lost) in [first, second].into_iter().enumerate() {
        nats.lose(lost);
        // A deploy while the server is gone reaches every host.
        members[round % 2]
            .dir
            .install_bytes(&format!("during-{round}.wasm"), &guest_bytes("hello"));
        // With one copy, writes fail while its server is gone.
        wait_for_more(attempts, 20, "writes while a server is lost").await;
        nats.revive(lost);
        // Writes go on while the replaced server catches up, then hold off
        // until it has: on a busy 2-core machine an old nats-server can
        // catch up more slowly than a stream grows, and never finish.
        wait_for_more(attempts, 20, "writes while the server catches up").await;
        pause(true);
        wait_streams_current(nats).await;
        pause(false);
        wait_for_more(attempts, 20, "writes after the server caught up").await;
    }
    stop.store(true, Ordering::Release);
    for load in loads {
        load.await.expect("the load");
    }

    let mut deploys_missing = 0;
    for round in 0..2 {
        let service = format!("during-{round}");
        if !all_serve_within(&members, &service, PATIENCE).await {
            let serving: Vec<bool> = members
                .iter()
                .map(|m| m.server.host.services().service(&service).is_some())
                .collect();
            let view = members[0].server.host.cluster().cloned();
            let view = match view {
                Some(cluster) => format!("{:?}", cluster.view().await),
                None => "no cluster".into(),
            };
            eprintln!(
                "redundancy: {name}: {service} did not reach every host (serving: {serving:?}); view: {view}"
            );
            deploys_missing += 1;
        }
    }
    let acknowledged = writes.acknowledged_ids();
    let lost = missing_keys(&urls[0], &acknowledged).await;
    let published = publishes.acknowledged_ids();
    // Retries of messages that met a lost server are still due: with
    // three copies wait for all, with one for as long as a retry waits.
    let patience = if copies == 3 { CATCH_UP } else { PATIENCE };
    let broker = members[0].server.host.broker().expect("a broker").clone();
    let (unhandled, dead_lettered) =
        unhandled_messages(&urls[0], &broker, &published, patience).await;
    if unhandled > 0 {
        eprintln!(
            "redundancy: {name}: {}",
            message_state(&url, &urls[0], &published).await
        );
    }
    for m in members {
        m.server.stop().await;
    }
    Outcome {
        acknowledged: acknowledged.len(),
        lost,
        failed: writes.failed.load(Ordering::Acquire),
        published: published.len(),
        dead_lettered,
        unhandled,
        publishes_failed: publishes.failed.load(Ordering::Acquire),
        deploys_missing,
    }
}

/// What the recorder has handled for group `rd`: its `/seen` answer, or
/// nothing while it cannot answer (its bucket cannot be read).
async fn recorded(base: &str) -> String {
    match crate::support::get(&format!("{base}/rec/seen?group=rd")).await {
        Some((200, seen)) => seen,
        _ => String::new(),
    }
}

/// Whether `seen`, a recorder's `/seen` answer, lists message `body`.
fn lists(seen: &str, body: &str) -> bool {
    seen.contains(&format!("{body:?}"))
}

/// What JetStream holds for group `rd` and which of `published` the
/// recorder has not seen: the story of messages not handled.
async fn message_state(nats: &str, base: &str, published: &[String]) -> String {
    let jetstream = jetstream(nats).await;
    let mut story = Vec::new();
    for name in ["WHARF_MESSAGES", "WHARF_DEAD"] {
        match jetstream.get_stream(name).await {
            Ok(mut stream) => match stream.info().await {
                Ok(info) => story.push(format!("{name}: {:?}", info.state)),
                Err(err) => story.push(format!("{name}: {err}")),
            },
            Err(err) => story.push(format!("{name}: {err}")),
        }
    }
    if let Ok(stream) = jetstream.get_stream("WHARF_MESSAGES").await {
        match stream.consumer_info("rd").await {
            Ok(info) => story.push(format!(
                "consumer rd: delivered {:?}, ack floor {:?}, pending {}, ack pending {}, redelivered {}",
                info.delivered, info.ack_floor, info.num_pending, info.num_ack_pending, info.num_redelivered
            )),
            Err(err) => story.push(format!("consumer rd: {err}")),
        }
    }
    let seen = recorded(base).await;
    let missing: Vec<(usize, &String)> = published
        .iter()
        .enumerate()
        .filter(|(_, body)| !lists(&seen, body))
        .collect();
    story.push(format!("not handled (index, body): {missing:?}"));
    story.join("; ")
}

/// How many of the `published` bodies the recorder has not seen within
/// `patience` and are not dead letters of its group either (all of them
/// while its bucket cannot be read), and how many are dead letters.
async fn unhandled_messages(
    base: &str,
    broker: &wharf::messaging::Broker,
    published: &[String],
    patience: Duration,
) -> (usize, usize) {
    let deadline = tokio::time::Instant::now() + patience;
    loop {
        let seen = recorded(base).await;
        let dead: Vec<String> = crate::messaging::dead(broker, "rd", 100)
            .await
            .unwrap_or_default()
            .into_iter()
            .map(|letter| String::from_utf8_lossy(&letter.message.body).into_owned())
            .collect();
        let not_seen: Vec<&String> = published
            .iter()
            .filter(|body| !lists(&seen, body))
            .collect();
        let dead_lettered = not_seen.iter().filter(|body| dead.contains(body)).count();
        let unhandled = not_seen.len() - dead_lettered;
        if unhandled == 0 || tokio::time::Instant::now() >= deadline {
            if dead_lettered > 0 {
                eprintln!("redundancy: dead letters of rd: {dead:?}");
            }
            return (unhandled, dead_lettered);
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// How many of `keys` the bucket does not have (a read that keeps failing
/// counts as missing: the bucket is gone).
async fn missing_keys(base: &str, keys: &[String]) -> usize {
    use futures_util::StreamExt as _;
    let http = client();
    futures_util::stream::iter(keys)
        .map(|key| {
            let (http, url) = (
                http.clone(),
                format!("{base}/counter/get?bucket=counts&key={key}"),
            );
            async move {
                for _ in 0..20 {
                    match http.get(&url).send().await.map(|r| r.status().as_u16()) {
                        Ok(200) => return false,
                        Ok(404) => return true,
                        _ => tokio::time::sleep(Duration::from_millis(200)).await,
                    }
                }
                true
            }
        })
        .buffer_unordered(16)
        .filter(|missing| std::future::ready(*missing))
        .count()
        .await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_nats_cluster_of_three_loses_no_acknowledged_write_or_message_with_three_copies_and_shows_the_loss_with_one()
 {
    let mut nats = NatsCluster::start(3);

    // A host whose first-listed server is down joins through the others;
    // "auto" asks for a copy per listed server, and a new stream gets one
    // on each server that answers.
    nats.kill(0);
    let joined = member(
        &nats.url(),
        "first-down",
        "h0",
        Replicas::Auto,
        Replicas::Auto,
    )
    .await;
    wait_ready(&joined).await;
    joined
        .dir
        .install_bytes("hello.wasm", &guest_bytes("hello"));
    eventually(PATIENCE, "the deploy through the second server", || {
        let served = joined.server.host.services().service("hello").is_some();
        async move { served }
    })
    .await;
    let mut index = jetstream(&nats.url())
        .await
        .get_stream("KV_wharf_first-down_index")
        .await
        .expect("the cluster's index");
    let info = index.info().await.expect("stream info");
    assert_eq!(
        info.config.num_replicas, 2,
        "a new stream gets a copy on each server that answers"
    );
    joined.server.stop().await;
    nats.revive(0);
    wait_streams_current(&nats).await;

    // With every server back, a host opening the same cluster raises the
    // index it finds with two copies to three.
    let rejoined = member(
        &nats.url(),
        "first-down",
        "h1",
        Replicas::Auto,
        Replicas::Auto,
    )
    .await;
    wait_ready(&rejoined).await;
    let info = index.info().await.expect("stream info");
    assert_eq!(
        info.config.num_replicas, 3,
        "an existing stream with fewer copies is raised"
    );
    rejoined.server.stop().await;

    drop(nats);

    let three = lose_two_servers_under_load("three", 3).await;
    let one = lose_two_servers_under_load("one", 1).await;
    for (copies, outcome) in [(3, &three), (1, &one)] {
        eprintln!(
            "redundancy: two NATS servers lost in turn (killed, disk deleted, replaced), replicas {copies}: \
             writes {} acknowledged, {} lost, {} failed or timed out; \
             messages {} accepted, {} never handled ({} more dead-lettered), {} publishes failed or timed out; \
             {} deploys missing",
            outcome.acknowledged,
            outcome.lost,
            outcome.failed,
            outcome.published,
            outcome.unhandled,
            outcome.dead_lettered,
            outcome.publishes_failed,
            outcome.deploys_missing,
        );
    }
    // Three copies: every acknowledged write and accepted message
    // survives; deploys arrive.
    assert_eq!(three.lost, 0, "{three:?}");
    assert_eq!(three.unhandled, 0, "{three:?}");
    assert_eq!(three.deploys_missing, 0, "{three:?}");
    // One copy: the lost server took the bucket's writes with it.
    assert!(one.lost > 0, "{one:?}");
}

/// Messages published in the RabbitMQ node-loss test.
const RABBIT_MESSAGES: usize = 300;
/// After how many publishes the node is killed.
const RABBIT_KILL_AT: usize = 100;

#[tokio::test(flavor = "multi_thread")]
async fn a_rabbitmq_node_of_three_killed_mid_stream_loses_no_accepted_message() {
    lose_a_rabbitmq_node_mid_stream("killed", "rq-kill", |rabbit| rabbit.kill(0)).await;
}

/// A node that stops answering without closing its connections (a machine
/// switched off, a partition) looks connected until heartbeats fail, a
/// minute or more later: publishes waited on its confirms, and every retry
/// went back to the same dead link. Now a publish unconfirmed within 10 s
/// replaces the link, and the next one fails over.
#[tokio::test(flavor = "multi_thread")]
async fn a_rabbitmq_node_that_stops_answering_is_failed_over() {
    lose_a_rabbitmq_node_mid_stream("frozen", "rq-freeze", |rabbit| rabbit.freeze(0)).await;
}

/// Publishes `RABBIT_MESSAGES` messages through a three-node RabbitMQ
/// cluster, losing the node the host talks to (`lose`) after
/// `RABBIT_KILL_AT` of them, and checks every accepted message is handled
/// by the consumer group `group`.
async fn lose_a_rabbitmq_node_mid_stream(
    how: &str,
    group: &str,
    lose: impl Fn(&mut crate::support::RabbitCluster),
) {
    let mut rabbit = crate::support::RabbitCluster::start(3);
    let (dir, data) = (ServiceDir::new(), ServiceDir::new());
    for (name, manifest) in [
        ("pub", "[messaging]\npublish = [\"rq.>\"]\n"),
        (
            "rec",
            &format!(
                "[keyvalue]\nbuckets = [\"msgs\"]\n[messaging]\nsubscribe = [\"rq.t\"]\n[[trigger.message]]\ntopic = \"rq.t\"\ngroup = \"{group}\"\npath = \"/record\"\n"
            ),
        ),
    ] {
        dir.install_bytes(&format!("{name}.wasm"), &guest_bytes("messenger"));
        dir.write(&format!("{name}.toml"), manifest.as_bytes());
    }
    let mut config = Config::for_dir(dir.path()).data_dir(Some(data.path().to_path_buf()));
    config.messaging = Some(wharf::messaging::BrokerChoice::Rabbit(rabbit.url()));
    let server = TestServer::start(config).await;
    let http = client();
    let publish = |body: String| {
        let (http, url) = (http.clone(), server.url("/pub/publish?topic=rq.t"));
        async move {
            http.post(url)
                .body(body)
                .timeout(Duration::from_secs(10))
                .send()
                .await
                .is_ok_and(|r| r.status().is_success())
        }
    };
    let seen = || async {
        crate::support::get(&server.url(&format!("/rec/seen?group={group}")))
            .await
            .map(|(_, seen)| seen)
            .unwrap_or_default()
    };
    // The group's quorum queue exists (on all three nodes) once a message
    // gets through.
    eventually(PATIENCE, "the group consuming", || async {
        publish("warm-up".into()).await && seen().await.contains("warm-up")
    })
    .await;

    // The host talks to the first node: kill it mid-stream. A publish
    // refused while the host fails over to another node is tried again
    // (as a client would); only accepted ones must arrive.
    let mut accepted = Vec::new();
    let mut refused = 0;
    for i in 0..RABBIT_MESSAGES {
        if i == RABBIT_KILL_AT {
            lose(&mut rabbit);
        }
        let body = format!("m{i}");
        let deadline = tokio::time::Instant::now() + PATIENCE;
        while !publish(body.clone()).await {
            refused += 1;
            assert!(
                tokio::time::Instant::now() < deadline,
                "{body} not accepted for {PATIENCE:?} after the node died"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        accepted.push((i, body));
    }
    let missing = || async {
        let seen = seen().await;
        accepted
            .iter()
            .filter(|(_, body)| !lists(&seen, body))
            .count()
    };
    let deadline = tokio::time::Instant::now() + CATCH_UP;
    loop {
        let missing = missing().await;
        if missing == 0 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{missing} of {} accepted messages never handled",
            accepted.len()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    eprintln!(
        "redundancy: RabbitMQ node {how} after {RABBIT_KILL_AT} of {RABBIT_MESSAGES} publishes: {} accepted, all handled; {refused} attempts refused during the fail-over",
        accepted.len()
    );
    server.stop().await;
}
