//! Many hosts as one cluster on NATS JetStream: three hosts (each with its
//! own services directory and data) on one `nats-server` of the test's own.
//! A deploy on any host reaches every host; removals too; a host joining
//! with a stale directory catches up before it is ready; two deploys at
//! once converge; schedules run once per tick and messages once per group
//! across the cluster.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use wharf::Config;
use wharf::deploy::cluster::ClusterConfig;

use crate::support::{NatsServer, ServiceDir, TestServer, client, eventually, get, guest_bytes};

const PATIENCE: Duration = Duration::from_secs(30);

/// One host of the cluster and its directories.
struct Member {
    server: TestServer,
    dir: ServiceDir,
    _data: ServiceDir,
}

async fn member(nats: &NatsServer, cluster: &str, id: &str, dir: ServiceDir) -> Member {
    let data = ServiceDir::new();
    let mut config = Config::for_dir(dir.path()).data_dir(Some(data.path().to_path_buf()));
    config.cluster = Some(ClusterConfig {
        url: nats.url(),
        name: cluster.to_string(),
        credentials: None,
        host_id: Some(id.to_string()),
    });
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
        // It stays that way, and every heartbeat reports the index's
        // generation.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let winner = manifest(&members[0]);
        for m in &members {
            assert_eq!(manifest(m), winner, "round {round}");
        }
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
        b"[keyvalue]\nbuckets = [\"msgs\"]\n[[trigger.message]]\ntopic = \"work.t\"\ngroup = \"workers\"\npath = \"/record\"\n",
    );
    members[0].dir.install_bytes("rec.wasm", &messenger);
    let digest_of_messenger = wasm_digest(&messenger);
    for service in ["ticker", "pub", "rec"] {
        wait_all_serve(&members, service, Some(&digest_of_messenger)).await;
    }
    let ticks = |m: &Member| {
        let url = m.server.url("/pub/count?key=ticks:cluster");
        async move {
            get(&url)
                .await
                .and_then(|(_, n)| n.trim().parse::<u64>().ok())
                .unwrap_or(0)
        }
    };
    let first = ticks(&members[0]).await;
    let started = Instant::now();
    tokio::time::sleep(Duration::from_secs(5)).await;
    let last = ticks(&members[1]).await;
    let seconds = started.elapsed().as_secs_f64();
    let ran = last - first;
    assert!(
        ran as f64 <= seconds + 1.0 && ran + 1 >= seconds as u64,
        "{ran} ticks in {seconds:.1} s across three hosts: each tick must run exactly once"
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
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (_, body) = get(&url).await.unwrap();
    let seen: BTreeMap<String, u64> = serde_json::from_str(&body).unwrap();
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
