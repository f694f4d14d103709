//! Many hosts as one cluster on NATS JetStream: three hosts (each with its
//! own services directory and data) on one `nats-server` of the test's own.
//! A deploy on any host reaches every host; removals too; a host joining
//! with a stale directory catches up before it is ready; two deploys at
//! once converge; schedules run once per tick and messages once per group
//! across the cluster.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use wharf::Config;
use wharf::cluster::ClusterConfig;

use crate::support::{
    HaproxyServer, NatsServer, ServiceDir, TestServer, WharfProcess, client, eventually, free_port,
    get, guest_bytes,
};

const PATIENCE: Duration = Duration::from_secs(30);

/// One host of the cluster and its directories.
struct Member {
    server: TestServer,
    dir: ServiceDir,
    _data: ServiceDir,
}

async fn member(nats: &NatsServer, cluster: &str, id: &str, dir: ServiceDir) -> Member {
    member_with(nats, cluster, id, dir, |_| {}).await
}

async fn member_with(
    nats: &NatsServer,
    cluster: &str,
    id: &str,
    dir: ServiceDir,
    configure: impl FnOnce(&mut Config),
) -> Member {
    let data = ServiceDir::new();
    let mut config = Config::for_dir(dir.path()).data_dir(Some(data.path().to_path_buf()));
    config.cluster = Some(ClusterConfig {
        url: nats.url(),
        name: cluster.to_string(),
        credentials: None,
        host_id: Some(id.to_string()),
        replicas: wharf::Replicas::Auto,
        tls: wharf::BackendTls::default(),
    });
    configure(&mut config);
    let server = TestServer::start(config).await;
    Member {
        server,
        dir,
        _data: data,
    }
}

async fn cluster_of(nats: &NatsServer, name: &str, size: usize) -> Vec<Member> {
    let mut members = Vec::new();
    for i in 0..size {
        members.push(member(nats, name, &format!("h{i}"), ServiceDir::new()).await);
    }
    for m in &members {
        wait_ready(m).await;
    }
    members
}

async fn wait_ready(member: &Member) {
    let host = member.server.host.clone();
    eventually(PATIENCE, "the host caught up with the cluster", || {
        let ready = host.is_ready();
        async move { ready }
    })
    .await;
}

/// The digest `member` serves for `service`, if any.
fn digest(member: &Member, service: &str) -> Option<String> {
    member
        .server
        .host
        .services()
        .service(service)
        .map(|d| d.digest().to_string())
}

async fn wait_all_serve(members: &[Member], service: &str, expected: Option<&str>) {
    eventually(
        PATIENCE,
        &format!("every host serving {service} at {expected:?}"),
        || {
            let all = members
                .iter()
                .all(|m| digest(m, service).as_deref() == expected);
            async move { all }
        },
    )
    .await;
}

fn wasm_digest(bytes: &[u8]) -> String {
    use sha2::Digest as _;
    format!("sha256:{:x}", sha2::Sha256::digest(bytes))
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

#[tokio::test(flavor = "multi_thread")]
async fn a_deploy_on_one_host_reaches_every_host_and_so_does_a_removal() {
    let nats = NatsServer::start();
    let members = cluster_of(&nats, "spread", 3).await;
    let versions = [guest_bytes("hello"), guest_bytes("echo")];

    // Twenty deploys, each dropped into one host's directory in turn.
    let mut took = Vec::new();
    for round in 0..20 {
        let bytes = &versions[round % 2];
        let expected = wasm_digest(bytes);
        let started = Instant::now();
        members[round % 3].dir.install_bytes("svc.wasm", bytes);
        wait_all_serve(&members, "svc", Some(&expected)).await;
        took.push(started.elapsed());
    }
    took.sort();
    eprintln!(
        "cluster: deploy on one host until all three serve it, over 20 deploys: p50 {:?}, p99 {:?}, max {:?}",
        percentile(&took, 50.0),
        percentile(&took, 99.0),
        took[took.len() - 1]
    );
    // Every host serves it over HTTP.
    for m in &members {
        let (status, _) = get(&m.server.url("/svc/")).await.expect("answer");
        assert_eq!(status, 200);
    }
    // Every host's heartbeat and the index agree.
    let view = members[0]
        .server
        .host
        .cluster()
        .unwrap()
        .view()
        .await
        .unwrap();
    assert_eq!(view.hosts.len(), 3, "{view:?}");
    let generation = view.services["svc"].generation;
    eventually(
        PATIENCE,
        "every heartbeat at the index's generation",
        || {
            let cluster = members[1].server.host.cluster().unwrap().clone();
            async move {
                cluster.view().await.is_ok_and(|view| {
                    view.hosts
                        .iter()
                        .all(|h| h.services.get("svc").map(|s| s.generation) == Some(generation))
                })
            }
        },
    )
    .await;

    // A removal on one host removes it everywhere.
    members[1].dir.remove("svc.wasm");
    wait_all_serve(&members, "svc", None).await;
    for m in &members {
        assert!(!m.dir.path().join("svc.wasm").exists());
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_host_joining_with_a_stale_directory_catches_up_before_it_is_ready() {
    let nats = NatsServer::start();
    let members = cluster_of(&nats, "join", 2).await;
    let hello = guest_bytes("hello");
    let echo = guest_bytes("echo");
    members[0].dir.install_bytes("svc.wasm", &echo);
    members[0].dir.install_bytes("gone.wasm", &hello);
    wait_all_serve(&members, "svc", Some(&wasm_digest(&echo))).await;
    wait_all_serve(&members, "gone", Some(&wasm_digest(&hello))).await;
    members[0].dir.remove("gone.wasm");
    wait_all_serve(&members, "gone", None).await;

    // A host whose directory still has the old svc and the removed gone,
    // and a service of its own the cluster never had.
    let stale = ServiceDir::new();
    stale.install_bytes("svc.wasm", &hello);
    stale.install_bytes("gone.wasm", &hello);
    stale.install_bytes("mine.wasm", &hello);
    let joining = member(&nats, "join", "late", stale).await;
    wait_ready(&joining).await;
    // Ready means caught up: the index's svc, no gone, and its own service
    // published to everyone.
    assert_eq!(digest(&joining, "svc"), Some(wasm_digest(&echo)));
    assert_eq!(digest(&joining, "gone"), None);
    assert!(!joining.dir.path().join("gone.wasm").exists());
    wait_all_serve(&members, "mine", Some(&wasm_digest(&hello))).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn two_deploys_at_once_on_two_hosts_converge_on_one_version() {
    let nats = NatsServer::start();
    let members = cluster_of(&nats, "race", 3).await;
    let hello = guest_bytes("hello");
    members[0].dir.install_bytes("svc.wasm", &hello);
    wait_all_serve(&members, "svc", Some(&wasm_digest(&hello))).await;
    let manifest = |m: &Member| {
        m.server
            .host
            .services()
            .service("svc")
            .and_then(|d| d.manifest().map(str::to_string))
    };
    for round in 0..5 {
        // Two new versions (the manifest differs) on two hosts at once.
        let one = format!("[env]\nWHO = \"{round}-one\"\n");
        let two = format!("[env]\nWHO = \"{round}-two\"\n");
        members[1].dir.write("svc.toml", one.as_bytes());
        members[2].dir.write("svc.toml", two.as_bytes());
        eventually(
            PATIENCE,
            "every host on one of the two new versions",
            || {
                let manifests: Vec<Option<String>> = members.iter().map(manifest).collect();
                let same = manifests.windows(2).all(|w| w[0] == w[1])
                    && (manifests[0].as_deref() == Some(one.as_str())
                        || manifests[0].as_deref() == Some(two.as_str()));
                async move { same }
            },
        )
        .await;
        // Every heartbeat reports the index's generation: each host has
        // applied the index's last word. The version they serve is still
        // one and the same.
        let cluster = members[0].server.host.cluster().unwrap().clone();
        eventually(
            PATIENCE,
            "every heartbeat at the index's generation",
            || {
                let cluster = cluster.clone();
                async move {
                    cluster.view().await.is_ok_and(|view| {
                        let generation = view.services.get("svc").and_then(|s| s.generation);
                        view.hosts.len() == 3
                            && view.hosts.iter().all(|h| {
                                h.services.get("svc").and_then(|s| s.generation) == generation
                            })
                    })
                }
            },
        )
        .await;
        let winner = manifest(&members[0]);
        for m in &members {
            assert_eq!(manifest(m), winner, "round {round}");
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn schedules_run_once_per_tick_and_messages_once_per_group_across_the_cluster() {
    let nats = NatsServer::start();
    let members = cluster_of(&nats, "work", 3).await;
    let messenger = guest_bytes("messenger");
    // Deployed on one host, run on all three; their key-value and messages
    // default to the cluster's NATS, so the counts are cluster-wide.
    members[0].dir.write(
        "ticker.toml",
        b"[keyvalue]\nbuckets = [\"msgs\"]\n[[trigger.schedule]]\nevery = \"1s\"\npath = \"/tick?name=cluster\"\n",
    );
    members[0].dir.install_bytes("ticker.wasm", &messenger);
    members[0].dir.write(
        "pub.toml",
        b"[keyvalue]\nbuckets = [\"msgs\"]\n[messaging]\npublish = [\"work.>\"]\n",
    );
    members[0].dir.install_bytes("pub.wasm", &messenger);
    members[0].dir.write(
        "rec.toml",
        b"[keyvalue]\nbuckets = [\"msgs\"]\n[messaging]\nsubscribe = [\"work.t\"]\n[[trigger.message]]\ntopic = \"work.t\"\ngroup = \"workers\"\npath = \"/record\"\n",
    );
    members[0].dir.install_bytes("rec.wasm", &messenger);
    let digest_of_messenger = wasm_digest(&messenger);
    for service in ["ticker", "pub", "rec"] {
        wait_all_serve(&members, service, Some(&digest_of_messenger)).await;
    }
    // Each due time is recorded with how many times it ran: once each,
    // whichever of the three hosts claimed it.
    let url = members[1].server.url("/pub/seen?group=tick-cluster");
    let dues = || {
        let url = url.clone();
        async move {
            get(&url)
                .await
                .and_then(|(_, body)| serde_json::from_str::<BTreeMap<String, u64>>(&body).ok())
                .unwrap_or_default()
        }
    };
    eventually(PATIENCE, "six ticks run", || {
        let dues = dues();
        async move { dues.await.len() >= 6 }
    })
    .await;
    let seen = dues().await;
    assert!(
        seen.values().all(|&times| times == 1),
        "a tick ran more than once across three hosts: {seen:?}"
    );
    let total: u64 = get(&members[0].server.url("/pub/count?key=ticks:cluster"))
        .await
        .and_then(|(_, n)| n.trim().parse().ok())
        .unwrap_or(0);
    assert!(
        total >= seen.len() as u64,
        "{total} ticks counted, {seen:?} recorded"
    );

    // Sixty messages published through one host: each handled once by the
    // group, whichever host handled it.
    let response = client()
        .post(
            members[2]
                .server
                .url("/pub/publish?topic=work.t&n=60&prefix=w"),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let url = members[1].server.url("/pub/seen?group=workers");
    eventually(PATIENCE, "every message handled", || {
        let url = url.clone();
        async move {
            get(&url)
                .await
                .and_then(|(_, body)| serde_json::from_str::<BTreeMap<String, u64>>(&body).ok())
                .is_some_and(|seen| seen.len() == 60)
        }
    })
    .await;
    // One more message, published after the sixty: once the group has
    // handled it, any second delivery of the sixty would have come first.
    let response = client()
        .post(
            members[0]
                .server
                .url("/pub/publish?topic=work.t&n=1&prefix=end-"),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    eventually(PATIENCE, "the last message handled", || {
        let url = url.clone();
        async move {
            get(&url)
                .await
                .and_then(|(_, body)| serde_json::from_str::<BTreeMap<String, u64>>(&body).ok())
                .is_some_and(|seen| seen.contains_key("end-0"))
        }
    })
    .await;
    let (_, body) = get(&url).await.unwrap();
    let seen: BTreeMap<String, u64> = serde_json::from_str(&body).unwrap();
    assert_eq!(seen.len(), 61, "{seen:?}");
    assert!(
        seen.values().all(|&n| n == 1),
        "a message handled twice in one group: {seen:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn hosts_keep_serving_while_nats_is_down_and_resynchronise_when_it_returns() {
    let mut nats = NatsServer::start();
    let members = cluster_of(&nats, "outage", 2).await;
    let hello = guest_bytes("hello");
    let echo = guest_bytes("echo");
    members[0].dir.install_bytes("svc.wasm", &hello);
    wait_all_serve(&members, "svc", Some(&wasm_digest(&hello))).await;

    nats.stop();
    // Both keep serving what they have, and stay ready for the load
    // balancer.
    for m in &members {
        assert_eq!(get(&m.server.url("/svc/")).await.map(|r| r.0), Some(200));
        assert!(m.server.host.is_ready());
    }
    // A change made during the outage is served where it was made...
    members[0].dir.install_bytes("svc.wasm", &echo);
    eventually(PATIENCE, "the local change served locally", || {
        let served = digest(&members[0], "svc");
        let expected = Some(wasm_digest(&echo));
        async move { served == expected }
    })
    .await;
    assert_eq!(digest(&members[1], "svc"), Some(wasm_digest(&hello)));

    // ...and published when NATS is back.
    nats.restart();
    wait_all_serve(&members, "svc", Some(&wasm_digest(&echo))).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_host_that_cannot_deploy_a_version_keeps_its_own_and_the_cluster_shows_why() {
    let nats = NatsServer::start();
    let mut members = cluster_of(&nats, "diverge", 2).await;
    // A host that lets one service have at most 64 MiB.
    let small = member_with(&nats, "diverge", "small", ServiceDir::new(), |config| {
        config.engine.max_service_memory = 64 << 20;
        config.limits.memory = 32 << 20;
    })
    .await;
    wait_ready(&small).await;
    members.push(small);
    let hello = guest_bytes("hello");
    members[0].dir.install_bytes("svc.wasm", &hello);
    wait_all_serve(&members, "svc", Some(&wasm_digest(&hello))).await;

    // A version that asks for 100 MiB: the two others take it, the small
    // one keeps the version it has and says why.
    let big = "[limits]\nmemory = \"100MiB\"\n";
    members[0].dir.write("svc.toml", big.as_bytes());
    let manifest = |m: &Member| {
        m.server
            .host
            .services()
            .service("svc")
            .and_then(|d| d.manifest().map(str::to_string))
    };
    eventually(
        PATIENCE,
        "the two roomy hosts on the 100 MiB version",
        || {
            let done = members[..2]
                .iter()
                .all(|m| manifest(m).as_deref() == Some(big));
            async move { done }
        },
    )
    .await;
    let cluster = members[0].server.host.cluster().unwrap().clone();
    eventually(
        PATIENCE,
        "/cluster showing the small host's divergence",
        || {
            let cluster = cluster.clone();
            async move {
                cluster.view().await.is_ok_and(|view| {
                    view.diverged.len() == 1
                        && view.diverged[0].host == "small"
                        && view.diverged[0].service == "svc"
                        && view.diverged[0]
                            .reason
                            .as_deref()
                            .is_some_and(|r| r.contains("--max-service-memory"))
                })
            }
        },
    )
    .await;
    assert_eq!(manifest(&members[2]), None);
    assert_eq!(
        get(&members[2].server.url("/svc/")).await.map(|r| r.0),
        Some(200),
        "the small host keeps serving the version it has"
    );
    // It does not publish its old version back either: once the small
    // host's heartbeats show it has lived through a recheck of its local
    // versions (every 5 s) since the divergence, the index and the others
    // still have the big version.
    let view = cluster.view().await.unwrap();
    let generation = view.services["svc"].generation;
    let since = view
        .hosts
        .iter()
        .find(|h| h.id == "small")
        .map(|h| h.heartbeat_ms)
        .unwrap();
    eventually(PATIENCE, "the small host through a recheck", || {
        let cluster = cluster.clone();
        async move {
            cluster.view().await.is_ok_and(|view| {
                view.hosts
                    .iter()
                    .any(|h| h.id == "small" && h.heartbeat_ms >= since + 6_000)
            })
        }
    })
    .await;
    let view = cluster.view().await.unwrap();
    assert_eq!(view.services["svc"].generation, generation);
    assert_eq!(manifest(&members[0]).as_deref(), Some(big));

    // A version it can take heals the divergence (with the memory limit
    // the small host already applies: the manifest's text still counts).
    let fits = "[limits]\nmemory = \"32MiB\"\n";
    members[1].dir.write("svc.toml", fits.as_bytes());
    eventually(PATIENCE, "every host on the 32 MiB version", || {
        let done = members.iter().all(|m| manifest(m).as_deref() == Some(fits));
        async move { done }
    })
    .await;
    eventually(PATIENCE, "no divergence left", || {
        let cluster = cluster.clone();
        async move {
            cluster
                .view()
                .await
                .is_ok_and(|view| view.diverged.is_empty())
        }
    })
    .await;
}

/// One host of the load-balanced cluster: a `wharf` process on fixed
/// ports, so it can be killed and started again where HAProxy expects it.
struct Node {
    process: Option<WharfProcess>,
    id: String,
    dir: ServiceDir,
    data: ServiceDir,
    public: u16,
    admin: u16,
}

impl Node {
    fn start(nats: &NatsServer, id: &str) -> Node {
        let mut node = Node {
            process: None,
            id: id.to_string(),
            dir: ServiceDir::new(),
            data: ServiceDir::new(),
            public: free_port(),
            admin: free_port(),
        };
        node.run(nats);
        node
    }

    fn run(&mut self, nats: &NatsServer) {
        self.process = Some(WharfProcess::start_with(|command| {
            command
                .arg("serve")
                .arg(self.dir.path())
                .args(["--listen", &format!("127.0.0.1:{}", self.public)])
                .args(["--admin", &format!("127.0.0.1:{}", self.admin)])
                .arg("--data-dir")
                .arg(self.data.path())
                .args(["--cluster", &nats.url(), "--cluster-name", "lb"])
                .args(["--cluster-host-id", &self.id]);
        }));
    }

    /// `kill -9`: no drain, no goodbye.
    fn kill(&mut self) {
        if let Some(process) = self.process.take() {
            crate::support::send_signal(process.pid(), "KILL");
        }
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.public)
    }

    async fn ready(&self) -> bool {
        get(&format!("http://127.0.0.1:{}/readyz", self.admin))
            .await
            .is_some_and(|(status, _)| status == 200)
    }
}

async fn admin_json(node: &Node, path: &str) -> Option<serde_json::Value> {
    let (status, body) = get(&format!("http://127.0.0.1:{}{path}", node.admin)).await?;
    (status == 200).then(|| serde_json::from_str(&body).ok())?
}

/// `GET /pub/seen?group=lb` through `lb`: each message body and how many
/// times the group handled it.
async fn seen(lb: &HaproxyServer) -> BTreeMap<String, u64> {
    get(&lb.url("/pub/seen?group=lb"))
        .await
        .filter(|(status, _)| *status == 200)
        .and_then(|(_, body)| serde_json::from_str(&body).ok())
        .unwrap_or_default()
}

/// Publishes `count` messages `PREFIX0…` through `lb`.
async fn publish(lb: &HaproxyServer, prefix: &str, count: u32) -> Option<u16> {
    client()
        .post(lb.url(&format!(
            "/pub/publish?topic=lb.t&n={count}&prefix={prefix}"
        )))
        .send()
        .await
        .ok()
        .map(|r| r.status().as_u16())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_host_killed_under_load_behind_haproxy_loses_no_request_and_no_message() {
    const LOAD_CLIENTS: usize = 16;
    const MESSAGES: u32 = 200;
    let mut nats = NatsServer::start();
    let mut nodes: Vec<Node> = (1..=3)
        .map(|n| Node::start(&nats, &format!("n{n}")))
        .collect();
    let lb = HaproxyServer::start(
        &nodes
            .iter()
            .map(|n| (n.public, n.admin))
            .collect::<Vec<_>>(),
    );
    // A counter, a publisher and a slow consumer group, deployed on one
    // host; state and messages are the cluster's NATS.
    let services: [(&str, &str, &str); 4] = [
        ("counter", "kv", "[keyvalue]\nbuckets = [\"lb\"]\n"),
        (
            "pub",
            "messenger",
            "[keyvalue]\nbuckets = [\"msgs\"]\n[messaging]\npublish = [\"lb.>\"]\n",
        ),
        (
            "rec",
            "messenger",
            "[limits]\ntimeout = \"2s\"\n[keyvalue]\nbuckets = [\"msgs\"]\n[messaging]\nsubscribe = [\"lb.t\"]\n[[trigger.message]]\ntopic = \"lb.t\"\ngroup = \"lb\"\npath = \"/slow?ms=1000\"\n",
        ),
        ("hello", "hello", ""),
    ];
    for (name, guest, manifest) in services {
        if !manifest.is_empty() {
            nodes[0]
                .dir
                .write(&format!("{name}.toml"), manifest.as_bytes());
        }
        nodes[0]
            .dir
            .install_bytes(&format!("{name}.wasm"), &guest_bytes(guest));
    }
    for node in &nodes {
        eventually(PATIENCE, "every host serving all four services", || {
            let urls = [
                "/hello/",
                "/counter/exists?bucket=lb&key=none",
                "/pub/count?key=x",
            ]
            .map(|path| node.url(path));
            async move {
                for url in urls {
                    if get(&url).await.is_none_or(|(s, _)| s != 200) {
                        return false;
                    }
                }
                node.ready().await
            }
        })
        .await;
    }
    eventually(PATIENCE, "the load balancer routing to the hosts", || {
        let url = lb.url("/hello/");
        async move { get(&url).await.is_some_and(|(s, _)| s == 200) }
    })
    .await;

    // A counter incremented through the load balancer: the exact total.
    let increments = (0..8).map(|_| {
        let url = lb.url("/counter/incr?bucket=lb&key=total");
        tokio::spawn(async move {
            for _ in 0..25 {
                let status = client().post(&url).send().await.unwrap().status();
                assert_eq!(status, 200);
            }
        })
    });
    for task in increments.collect::<Vec<_>>() {
        task.await.unwrap();
    }
    assert_eq!(
        get(&lb.url("/counter/get?bucket=lb&key=total")).await,
        Some((200, "200".to_string()))
    );

    // Load through HAProxy; messages published; then one host killed.
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    let stop = std::sync::Arc::new(AtomicBool::new(false));
    let answered = std::sync::Arc::new(AtomicU64::new(0));
    let load: Vec<_> = (0..LOAD_CLIENTS)
        .map(|_| {
            let (url, stop, answered) = (lb.url("/hello/"), stop.clone(), answered.clone());
            tokio::spawn(async move {
                let client = client();
                let (mut ok, mut failed) = (0u64, 0u64);
                while !stop.load(Ordering::Relaxed) {
                    match client.get(&url).send().await {
                        Ok(response) if response.status() == 200 => {
                            ok += 1;
                            answered.fetch_add(1, Ordering::Relaxed);
                        }
                        _ => failed += 1,
                    }
                }
                (ok, failed)
            })
        })
        .collect();
    let started = Instant::now();
    assert_eq!(publish(&lb, "a", MESSAGES).await, Some(200));
    // The load runs through every host before one dies, and runs on the
    // other two for a good while after.
    let served_at_least = |count: u64| {
        let answered = answered.clone();
        move || {
            let done = answered.load(Ordering::Relaxed) >= count;
            async move { done }
        }
    };
    eventually(PATIENCE, "load through the balancer", served_at_least(100)).await;
    nodes[1].kill();
    let before_kill = answered.load(Ordering::Relaxed);
    eventually(
        PATIENCE,
        "load served by the two hosts left",
        served_at_least(before_kill + 3000),
    )
    .await;
    stop.store(true, Ordering::Relaxed);
    let (mut ok, mut failed) = (0, 0);
    for task in load {
        let (o, f) = task.await.unwrap();
        ok += o;
        failed += f;
    }
    eprintln!(
        "cluster: a host killed under load behind HAProxy: {failed} failed of {} requests",
        ok + failed
    );
    assert!(ok > 0);
    assert!(
        failed <= LOAD_CLIENTS as u64,
        "{failed} requests failed: more than the {LOAD_CLIENTS} that can have been in flight"
    );

    // A deploy while it is down; when it comes back it serves that before
    // it says it is ready.
    nodes[0]
        .dir
        .install_bytes("late.wasm", &guest_bytes("hello"));
    eventually(PATIENCE, "the deploy on the live hosts", || {
        let (a, b) = (nodes[0].url("/late/"), nodes[2].url("/late/"));
        async move {
            get(&a).await.is_some_and(|(s, _)| s == 200)
                && get(&b).await.is_some_and(|(s, _)| s == 200)
        }
    })
    .await;
    nodes[1].run(&nats);
    eventually(PATIENCE, "the restarted host ready", || nodes[1].ready()).await;
    assert_eq!(
        get(&nodes[1].url("/late/")).await.map(|r| r.0),
        Some(200),
        "ready before it had caught up with the cluster"
    );

    // NATS restarted: publishes fail clearly meanwhile, and everything
    // resumes when it is back.
    nats.stop();
    let during = publish(&lb, "down", 1).await;
    assert!(
        matches!(during, Some(500..=504)),
        "a publish while NATS is down: {during:?}"
    );
    assert_eq!(get(&lb.url("/hello/")).await.map(|r| r.0), Some(200));
    nats.restart();
    eventually(PATIENCE, "publishing again after NATS returned", || async {
        publish(&lb, "b", MESSAGES).await == Some(200)
    })
    .await;

    // Every message of both batches handled by the group: none lost. Those
    // the killed host held come back after its acknowledgement deadline.
    let expected: Vec<String> = ["a", "b"]
        .iter()
        .flat_map(|prefix| (0..MESSAGES).map(move |i| format!("{prefix}{i}")))
        .collect();
    eventually(
        Duration::from_secs(120),
        "every message handled",
        || async {
            let seen = seen(&lb).await;
            expected.iter().all(|m| seen.contains_key(m))
        },
    )
    .await;
    let handled_all = started.elapsed();
    let seen = seen(&lb).await;
    let duplicated: u64 = expected.iter().map(|m| seen[m].saturating_sub(1)).sum();
    eprintln!(
        "cluster: {} messages across a host kill and a NATS restart: 0 lost, {duplicated} handled twice; all handled {handled_all:?} after the first publish",
        expected.len()
    );
    let cluster = admin_json(&nodes[0], "/cluster")
        .await
        .expect("GET /cluster");
    assert_eq!(
        cluster["hosts"].as_array().map(Vec::len),
        Some(3),
        "{cluster}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_host_joins_the_cluster_its_wharf_toml_names_and_labels_its_metrics() {
    let nats = NatsServer::start();
    let members = cluster_of(&nats, "fromfile", 1).await;
    let dir = ServiceDir::new();
    dir.write(
        "wharf.toml",
        format!("[cluster]\nurl = \"{}\"\nname = \"fromfile\"\n", nats.url()).as_bytes(),
    );
    let data = ServiceDir::new();
    let server =
        TestServer::start(Config::for_dir(dir.path()).data_dir(Some(data.path().to_path_buf())))
            .await;
    let cluster = server
        .host
        .cluster()
        .expect("joined the cluster wharf.toml names");
    assert_eq!(cluster.name(), "fromfile");
    let id = cluster.host_id().to_string();
    let hello = guest_bytes("hello");
    members[0].dir.install_bytes("svc.wasm", &hello);
    eventually(
        PATIENCE,
        "the file-configured host serving the cluster's svc",
        || {
            let url = server.url("/svc/");
            async move { get(&url).await.is_some_and(|(s, _)| s == 200) }
        },
    )
    .await;
    // Every series carries the host's id, so hosts can be told apart.
    for (host, text) in [
        (id.as_str(), server.host.metrics_text()),
        ("h0", members[0].server.host.metrics_text()),
    ] {
        let label = format!("host=\"{host}\"");
        assert!(
            text.lines()
                .filter(|l| l.starts_with("wharf_requests_total"))
                .all(|l| l.contains(&label))
                && text.contains(&label),
            "{text}"
        );
    }
}
