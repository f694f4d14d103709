//! Encryption on the wire: a `nats-server`, a `redis-server`, RabbitMQ and
//! a Kafka-API broker (tansu) of the test's own that speak TLS, with certificates the test makes
//! (`rcgen`), reached by Wharf with `[tls]`, through a relay that records
//! every byte. A secret written through key-value or sent as a message
//! never appears in them; a wrong CA fails clearly; mutual TLS works where
//! the server requires it; plain-text URLs are refused once `[tls]` is set.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use wharf::messaging::BrokerChoice;
use wharf::{AtRestKeys, BackendTls, Config, Host, KeyValueChoice};

use crate::support::{
    HaproxyServer, KafkaServer, NatsServer, Pki, RabbitServer, RedisServer, ServiceDir, TestServer,
    client, eventually, free_port, get, guest_bytes, post,
};

/// A TCP relay on a free loopback port to `target`, recording every byte
/// in both directions.
struct Relay {
    port: u16,
    seen: Arc<Mutex<Vec<u8>>>,
}

impl Relay {
    /// What it saw, after checking that it saw a conversation (more than a
    /// handshake) and never `secret`.
    fn bytes_without(&self, secret: &str) -> Vec<u8> {
        let wire = self.bytes();
        assert!(wire.len() > 1000, "the relay saw {} bytes", wire.len());
        assert!(
            !contains(&wire, secret.as_bytes()),
            "the secret crossed the wire in the clear"
        );
        wire
    }

    async fn start(target: u16) -> Relay {
        let port = free_port();
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
            .await
            .expect("bind the relay");
        let seen = Arc::new(Mutex::new(Vec::new()));
        let recorded = seen.clone();
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = tokio::net::TcpStream::connect(("127.0.0.1", target)).await else {
                    continue;
                };
                let (client_read, client_write) = client.into_split();
                let (server_read, server_write) = server.into_split();
                tokio::spawn(pipe(client_read, server_write, recorded.clone()));
                tokio::spawn(pipe(server_read, client_write, recorded.clone()));
            }
        });
        Relay { port, seen }
    }

    fn bytes(&self) -> Vec<u8> {
        self.seen.lock().map(|b| b.clone()).unwrap_or_default()
    }
}

async fn pipe(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    seen: Arc<Mutex<Vec<u8>>>,
) {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut buffer = vec![0u8; 16 << 10];
    while let Ok(n) = from.read(&mut buffer).await {
        if n == 0 {
            break;
        }
        if let Ok(mut seen) = seen.lock() {
            seen.extend_from_slice(&buffer[..n]);
        }
        if to.write_all(&buffer[..n]).await.is_err() {
            break;
        }
    }
    let _ = to.shutdown().await;
}

/// A host whose key-value backend is the NATS at `url`, with `tls`, serving
/// the key-value test guest as `kv`.
async fn host(url: String, tls: BackendTls) -> (TestServer, ServiceDir) {
    host_with(KeyValueChoice::Nats(url), tls).await
}

/// A host whose key-value backend is `backend`, with `tls`, serving the
/// key-value test guest as `kv`.
async fn host_with(backend: KeyValueChoice, tls: BackendTls) -> (TestServer, ServiceDir) {
    let dir = ServiceDir::new();
    dir.install_bytes("kv.wasm", &guest_bytes("kv"));
    dir.write("kv.toml", b"[keyvalue]\nbuckets = [\"vault\"]\n");
    let mut config = Config::for_dir(dir.path());
    config.keyvalue = Some(backend);
    config.backend_tls = Some(tls);
    (TestServer::start(config).await, dir)
}

/// Writes `value` and reads it back; the two statuses and what was read.
async fn write_and_read(server: &TestServer, value: &str) -> (u16, u16, String) {
    let http = client();
    let put = http
        .put(server.url("/kv/set?bucket=vault&key=secret"))
        .body(value.to_string())
        .timeout(Duration::from_secs(20))
        .send()
        .await
        .expect("the host answers");
    let put_status = put.status().as_u16();
    let get = http
        .get(server.url("/kv/get?bucket=vault&key=secret"))
        .timeout(Duration::from_secs(20))
        .send()
        .await
        .expect("the host answers");
    (
        put_status,
        get.status().as_u16(),
        get.text().await.unwrap_or_default(),
    )
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack
        .windows(needle.len())
        .any(|window| window == needle)
}

fn files(pki: &Pki, ca: &str, client: bool) -> BackendTls {
    let path = |name: &str| -> Option<PathBuf> { Some(pki.path(name)) };
    BackendTls {
        ca: path(ca),
        cert: client.then(|| pki.path("client.pem")),
        key: client.then(|| pki.path("client-key.pem")),
    }
}

fn tls_nats(pki: &Pki, mutual: bool) -> NatsServer {
    let mut args = vec![
        "--tls".to_string(),
        "--tlscert".to_string(),
        pki.arg("server.pem"),
        "--tlskey".to_string(),
        pki.arg("server-key.pem"),
    ];
    if mutual {
        args.extend([
            "--tlsverify".to_string(),
            "--tlscacert".to_string(),
            pki.arg("ca.pem"),
        ]);
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    NatsServer::start_with(free_port(), &args)
}

#[tokio::test(flavor = "multi_thread")]
async fn key_value_over_tls_never_shows_a_value_on_the_wire_and_a_wrong_ca_fails_clearly() {
    let pki = Pki::new();
    let nats = tls_nats(&pki, false);
    let relay = Relay::start(nats.port).await;
    let url = format!("tls://127.0.0.1:{}", relay.port);

    let secret = "TOP-SECRET-4f9a1c-VALUE";
    let (server, _dir) = host(url.clone(), files(&pki, "ca.pem", false)).await;
    assert_eq!(
        write_and_read(&server, secret).await,
        (204, 200, secret.to_string())
    );
    let wire = relay.bytes_without(secret);
    assert!(
        !contains(&wire, b"vault"),
        "the bucket's name crossed the wire in the clear"
    );
    server.stop().await;

    // A CA that did not sign the server's certificate: writes fail, and
    // the backend's status says why.
    let (server, _dir) = host(url, files(&pki, "other-ca.pem", false)).await;
    let (put, _, _) = write_and_read(&server, secret).await;
    assert!(
        put >= 500,
        "a write through an unverified server answered {put}"
    );
    let statuses = server.host.backend_statuses();
    assert!(
        statuses
            .iter()
            .any(|(_, status)| status.kind == "nats" && !status.up),
        "{statuses:?}"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn mutual_tls_works_where_the_server_requires_a_client_certificate() {
    let pki = Pki::new();
    let nats = tls_nats(&pki, true);
    let url = format!("tls://127.0.0.1:{}", nats.port);

    let (server, _dir) = host(url.clone(), files(&pki, "ca.pem", true)).await;
    assert_eq!(
        write_and_read(&server, "mutual").await,
        (204, 200, "mutual".to_string())
    );
    server.stop().await;

    // Without a client certificate the server refuses the connection.
    let (server, _dir) = host(url, files(&pki, "ca.pem", false)).await;
    let (put, _, _) = write_and_read(&server, "nobody").await;
    assert!(
        put >= 500,
        "a write without a client certificate answered {put}"
    );
    server.stop().await;
}

#[test]
fn regression_tls_files_must_be_regular_files() {
    // A device reads for ever; the same rule as every file a setting names.
    let tls = BackendTls {
        ca: Some(Path::new("/dev/zero").to_path_buf()),
        ..BackendTls::default()
    };
    let err = format!("{:#}", tls.client_config().unwrap_err());
    assert!(err.contains("tls.ca"), "{err}");
}

#[tokio::test(flavor = "multi_thread")]
async fn redis_over_tls_never_shows_a_value_on_the_wire_and_needs_the_right_ca_and_certificate() {
    let pki = Pki::new();
    let redis = RedisServer::start_tls(&pki);
    let relay = Relay::start(redis.port).await;
    let url = format!("rediss://127.0.0.1:{}", relay.port);

    let secret = "TOP-SECRET-77d0e2-REDIS";
    let (server, _dir) = host_with(
        KeyValueChoice::Redis(url.clone()),
        files(&pki, "ca.pem", true),
    )
    .await;
    assert_eq!(
        write_and_read(&server, secret).await,
        (204, 200, secret.to_string())
    );
    relay.bytes_without(secret);
    server.stop().await;

    // Without the client certificate the server refuses; with a CA that
    // did not sign the server's certificate Wharf refuses. Both fail the
    // write, and nothing reaches Redis.
    for (ca, client_cert) in [("ca.pem", false), ("other-ca.pem", true)] {
        let (server, _dir) = host_with(
            KeyValueChoice::Redis(url.clone()),
            files(&pki, ca, client_cert),
        )
        .await;
        let (put, _, _) = write_and_read(&server, "nobody").await;
        assert!(put >= 500, "{ca}, client certificate {client_cert}: {put}");
        server.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn messages_over_rabbitmq_tls_never_show_on_the_wire_and_need_the_client_certificate() {
    let (url, pki_dir) = RabbitServer::shared_tls();
    let tls_port: u16 = url
        .rsplit(':')
        .next()
        .and_then(|tail| tail.split('/').next())
        .and_then(|port| port.parse().ok())
        .expect("the port in the amqps URL");
    let relay = Relay::start(tls_port).await;
    let relayed = url.replace(&format!(":{tls_port}/"), &format!(":{}/", relay.port));
    let files = |client_cert: bool| BackendTls {
        ca: Some(pki_dir.join("ca.pem")),
        cert: client_cert.then(|| pki_dir.join("client.pem")),
        key: client_cert.then(|| pki_dir.join("client-key.pem")),
    };

    let secret = "TOP-SECRET-c41b9e-AMQP";
    let (server, _dir) = messaging_host(BrokerChoice::Rabbit(relayed), files(true)).await;
    let (status, body) = post(&server, PUBLISH, secret).await;
    assert_eq!(status, 200, "{body}");
    eventually(Duration::from_secs(60), "the message handled", || async {
        get(&server.url("/pub/seen?group=enc-tls"))
            .await
            .is_some_and(|(_, seen)| seen.contains(secret))
    })
    .await;
    let wire = relay.bytes();
    assert!(wire.len() > 1000, "the relay saw {} bytes", wire.len());
    assert!(
        !contains(&wire, secret.as_bytes()),
        "the message crossed the wire in the clear"
    );
    server.stop().await;

    // The listener requires a client certificate: without one, publishing
    // fails (503, the broker unavailable), clearly and without a hang.
    let (server, _dir) = messaging_host(BrokerChoice::Rabbit(url.clone()), files(false)).await;
    let (status, body) = post(&server, PUBLISH, "nobody").await;
    assert_eq!(status, 503, "{body}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn messages_over_kafka_tls_never_show_on_the_wire_and_need_the_right_ca() {
    let pki = Pki::new();
    // wharf → relay (records) → HAProxy (TLS) → tansu, which advertises the
    // relay, so every connection crosses it.
    let (tls_port, kafka_port) = (free_port(), free_port());
    let relay = Relay::start(tls_port).await;
    let _kafka = KafkaServer::start_advertising(kafka_port, relay.port, &[]);
    let cert_and_key = pki.path("server-and-key.pem");
    let mut pem = std::fs::read(pki.path("server.pem")).unwrap();
    pem.extend(std::fs::read(pki.path("server-key.pem")).unwrap());
    std::fs::write(&cert_and_key, pem).unwrap();
    let _tls = HaproxyServer::tls_terminator(tls_port, &cert_and_key, kafka_port);
    let url = format!("kafkas://127.0.0.1:{}", relay.port);
    let secret = "TOP-SECRET-7d02aa-KAFKA";
    let (server, _dir) = messaging_host(
        BrokerChoice::Kafka(url.clone()),
        files(&pki, "ca.pem", false),
    )
    .await;
    let (status, body) = post(&server, PUBLISH, secret).await;
    assert_eq!(status, 200, "{body}");
    eventually(Duration::from_secs(60), "the message handled", || async {
        get(&server.url("/pub/seen?group=enc-tls"))
            .await
            .is_some_and(|(_, seen)| seen.contains(secret))
    })
    .await;
    relay.bytes_without(secret);
    server.stop().await;

    // A CA that did not sign the broker's certificate: publishing fails
    // (503, the broker unavailable), clearly and without a hang.
    let (server, _dir) =
        messaging_host(BrokerChoice::Kafka(url), files(&pki, "other-ca.pem", false)).await;
    let (status, body) = post(&server, PUBLISH, "nobody").await;
    assert_eq!(status, 503, "{body}");
    server.stop().await;
}

/// A host on the broker `broker` with `tls`: `pub` publishes to `enc.tls`,
/// `rec` records it in group `enc-tls`.
async fn messaging_host(broker: BrokerChoice, tls: BackendTls) -> (TestServer, ServiceDir) {
    let dir = ServiceDir::new();
    for (name, manifest) in [
        (
            "pub",
            "[keyvalue]\nbuckets = [\"msgs\"]\n[messaging]\npublish = [\"enc.tls\"]\n",
        ),
        (
            "rec",
            "[keyvalue]\nbuckets = [\"msgs\"]\n[messaging]\nsubscribe = [\"enc.tls\"]\n[[trigger.message]]\ntopic = \"enc.tls\"\ngroup = \"enc-tls\"\npath = \"/record\"\n",
        ),
    ] {
        dir.install_bytes(&format!("{name}.wasm"), &guest_bytes("messenger"));
        dir.write(&format!("{name}.toml"), manifest.as_bytes());
    }
    let mut config = Config::for_dir(dir.path());
    config.messaging = Some(broker);
    config.backend_tls = Some(tls);
    (TestServer::start(config).await, dir)
}

/// Where `messaging_host`'s publisher publishes the request's body.
const PUBLISH: &str = "/pub/publish?topic=enc.tls";

#[tokio::test(flavor = "multi_thread")]
async fn with_tls_set_plain_urls_and_insecure_fragments_are_refused_at_start() {
    let pki = Pki::new();
    let tls = files(&pki, "ca.pem", false);
    // Refused at start, before any connection: nothing listens on the port.
    let port = free_port();
    let cases = [
        (
            Some(KeyValueChoice::Redis(format!("redis://127.0.0.1:{port}"))),
            None,
            "use rediss://",
        ),
        (
            Some(KeyValueChoice::Redis(format!(
                "rediss://127.0.0.1:{port}/#insecure"
            ))),
            None,
            "always verifies",
        ),
        (
            None,
            Some(BrokerChoice::Rabbit(format!(
                "amqp://guest:guest@127.0.0.1:{port}/%2f"
            ))),
            "use amqps://",
        ),
    ];
    for (keyvalue, messaging, expected) in cases {
        let dir = ServiceDir::new();
        let mut config = Config::for_dir(dir.path());
        config.keyvalue = keyvalue;
        config.messaging = messaging;
        config.backend_tls = Some(tls.clone());
        let err = match Host::new(config).await {
            Ok(_) => panic!("a host started where {expected:?} was expected"),
            Err(err) => format!("{err:#}"),
        };
        assert!(err.contains(expected), "{err}");
        assert!(!err.contains("guest:guest"), "credentials in {err}");
    }
}

/// lapin was built without its async TLS feature, and then treats
/// `amqps://` like `amqp://`: it spoke plain AMQP, credentials and
/// messages in the clear, to whatever listened. An `amqps://` URL naming a
/// plain-text listener must fail instead.
#[tokio::test(flavor = "multi_thread")]
async fn regression_amqps_never_falls_back_to_plain_text() {
    let (_, pki_dir) = RabbitServer::shared_tls();
    let plain_port = RabbitServer::shared_url().replacen("amqp://", "amqps://", 1);
    let tls = BackendTls {
        ca: Some(pki_dir.join("ca.pem")),
        cert: Some(pki_dir.join("client.pem")),
        key: Some(pki_dir.join("client-key.pem")),
    };
    let (server, _dir) = messaging_host(BrokerChoice::Rabbit(plain_port.clone()), tls).await;
    let (status, body) = post(&server, PUBLISH, "in the clear?").await;
    assert_eq!(status, 503, "{body}");
    server.stop().await;
}

/// A host with the embedded store in `data` (or `backend`), encrypting
/// values at rest with `key`, serving the key-value guest as `kv`.
async fn sealed_host(
    data: &ServiceDir,
    backend: Option<KeyValueChoice>,
    key: &Path,
) -> (TestServer, ServiceDir) {
    let dir = ServiceDir::new();
    dir.install_bytes("kv.wasm", &guest_bytes("kv"));
    dir.write("kv.toml", b"[keyvalue]\nbuckets = [\"vault\"]\n");
    let mut config = Config::for_dir(dir.path()).data_dir(Some(data.path().to_path_buf()));
    config.keyvalue = backend;
    config.encryption = Some(AtRestKeys {
        key: key.to_path_buf(),
        previous: Vec::new(),
    });
    (TestServer::start(config).await, dir)
}

/// Increments the `visits` counter `times` times; the last value.
async fn count_visits(server: &TestServer, times: u32) -> String {
    let counted = client()
        .post(server.url(&format!("/kv/incr?bucket=vault&key=visits&times={times}")))
        .send()
        .await
        .expect("the host answers");
    counted.text().await.unwrap_or_default()
}

/// Every byte of every file under `dir`.
fn bytes_under(dir: &Path) -> Vec<u8> {
    let mut all = Vec::new();
    for entry in std::fs::read_dir(dir)
        .expect("read the data directory")
        .flatten()
    {
        let path = entry.path();
        if path.is_dir() {
            all.extend(bytes_under(&path));
        } else if let Ok(bytes) = std::fs::read(&path) {
            all.extend(bytes);
        }
    }
    all
}

/// Every byte of every file under `dir`, read once they hold `stored` (a
/// name the store keeps as it is). A stopped host's store thread closes a
/// moment after the host's last handle is gone, moving its write-ahead log
/// into the database file and deleting the log: a walk during that move can
/// read the file before and miss the log after, and see neither.
async fn bytes_under_once_stored(dir: &Path, stored: &[u8]) -> Vec<u8> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let bytes = bytes_under(dir);
        if contains(&bytes, stored) {
            return bytes;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no file under {} holds {:?}",
            dir.display(),
            String::from_utf8_lossy(stored)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn values_are_encrypted_at_rest_and_open_only_with_their_key() {
    let keys = tempfile::tempdir().expect("temp dir");
    let key = keys.path().join("wharf.key");
    std::fs::write(&key, format!("{}\n", "3c".repeat(32))).expect("write the key");
    let other = keys.path().join("other.key");
    std::fs::write(&other, "a7".repeat(32)).expect("write the key");
    let data = ServiceDir::new();
    let secret = "TOP-SECRET-5e2f08-AT-REST";

    let (server, _dir) = sealed_host(&data, None, &key).await;
    assert_eq!(
        write_and_read(&server, secret).await,
        (204, 200, secret.to_string())
    );
    assert_eq!(count_visits(&server, 5).await, "5");
    server.stop().await;
    // The key's name is stored as it is; the value is not.
    let on_disk = bytes_under_once_stored(data.path(), b"secret").await;
    assert!(
        !contains(&on_disk, secret.as_bytes()),
        "the value is on disk in the clear"
    );

    // A restart with the same key reads it back; with another key the read
    // fails, naming the key the value needs.
    let (server, _dir) = sealed_host(&data, None, &key).await;
    let (status, body) = get(&server.url("/kv/get?bucket=vault&key=secret"))
        .await
        .expect("the host answers");
    assert_eq!((status, body.as_str()), (200, secret));
    server.stop().await;
    let (server, _dir) = sealed_host(&data, None, &other).await;
    let (status, body) = get(&server.url("/kv/get?bucket=vault&key=secret"))
        .await
        .expect("the host answers");
    assert!(status >= 500, "{status} {body}");
    assert!(body.contains("does not have"), "{body}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn with_encryption_redis_only_ever_sees_sealed_values() {
    let keys = tempfile::tempdir().expect("temp dir");
    let key = keys.path().join("wharf.key");
    std::fs::write(&key, "5d".repeat(32)).expect("write the key");
    let redis = RedisServer::start();
    let relay = Relay::start(redis.port).await;
    let data = ServiceDir::new();
    let backend = KeyValueChoice::Redis(format!("redis://127.0.0.1:{}", relay.port));
    let (server, _dir) = sealed_host(&data, Some(backend), &key).await;
    let secret = "TOP-SECRET-91aa4c-IN-REDIS";
    assert_eq!(
        write_and_read(&server, secret).await,
        (204, 200, secret.to_string())
    );
    assert_eq!(count_visits(&server, 3).await, "3");
    let wire = relay.bytes();
    assert!(contains(&wire, b"secret"), "the relay saw no key");
    assert!(
        !contains(&wire, secret.as_bytes()),
        "the value reached Redis in the clear"
    );
    server.stop().await;
}

/// A host on `broker` (its store in `data`), sealing with `key`: `pub`
/// publishes to `enc.tls`, `rec` appends each body to the value of
/// `log:enc-tls` (not to a key's name: names are stored as they are), and
/// `dead` fails a body starting `poison` once in group `enc-dead`, which
/// keeps it as a dead letter.
async fn sealed_messaging_host(
    broker: BrokerChoice,
    data: &ServiceDir,
    key: &Path,
) -> (TestServer, ServiceDir) {
    let dir = ServiceDir::new();
    for (name, manifest) in [
        (
            "pub",
            "[keyvalue]\nbuckets = [\"msgs\"]\n[messaging]\npublish = [\"enc.tls\"]\n",
        ),
        (
            "rec",
            "[keyvalue]\nbuckets = [\"msgs\"]\n[messaging]\nsubscribe = [\"enc.tls\"]\n[[trigger.message]]\ntopic = \"enc.tls\"\ngroup = \"enc-tls\"\npath = \"/append\"\n",
        ),
        (
            "dead",
            "[messaging]\nsubscribe = [\"enc.tls\"]\n[[trigger.message]]\ntopic = \"enc.tls\"\ngroup = \"enc-dead\"\npath = \"/fail\"\nmax_attempts = 1\n",
        ),
    ] {
        dir.install_bytes(&format!("{name}.wasm"), &guest_bytes("messenger"));
        dir.write(&format!("{name}.toml"), manifest.as_bytes());
    }
    let mut config = Config::for_dir(dir.path()).data_dir(Some(data.path().to_path_buf()));
    config.messaging = Some(broker);
    config.encryption = Some(AtRestKeys {
        key: key.to_path_buf(),
        previous: Vec::new(),
    });
    (TestServer::start(config).await, dir)
}

/// The body of `enc-dead`'s first dead letter, once there is one.
async fn first_dead_body(server: &TestServer) -> Vec<u8> {
    let broker = server.host.broker().expect("messaging").clone();
    let query = wharf::messaging::DeadLetterQuery {
        after: None,
        limit: 1,
        body_limit: 1 << 20,
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(letters) = broker.dead_letters("enc-dead", query).await
            && let Some(letter) = letters.first()
        {
            return letter.message.body.to_vec();
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no dead letter in enc-dead after 60 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Publishes `secret` through `server`'s `pub` and waits until `rec`
/// handled it and `enc-dead` keeps it.
async fn publish_sealed(server: &TestServer, secret: &str) {
    let (status, body) = post(server, PUBLISH, secret).await;
    assert_eq!(status, 200, "{body}");
    eventually(Duration::from_secs(60), "the message handled", || async {
        get(&server.url("/rec/count?key=log:enc-tls"))
            .await
            .is_some_and(|(_, log)| log == secret)
    })
    .await;
    assert_eq!(first_dead_body(server).await, secret.as_bytes());
}

#[tokio::test(flavor = "multi_thread")]
async fn queued_messages_are_encrypted_at_rest_and_open_only_with_their_key() {
    let keys = tempfile::tempdir().expect("temp dir");
    let key = keys.path().join("wharf.key");
    std::fs::write(&key, "6e".repeat(32)).expect("write the key");
    let other = keys.path().join("other.key");
    std::fs::write(&other, "b1".repeat(32)).expect("write the key");
    let data = ServiceDir::new();
    let secret = "poison-TOP-SECRET-0c9d13-QUEUED";

    let (server, _dir) = sealed_messaging_host(BrokerChoice::Embedded, &data, &key).await;
    publish_sealed(&server, secret).await;
    server.stop().await;
    // The topic is stored as it is; the body is not.
    let on_disk = bytes_under_once_stored(data.path(), b"enc.tls").await;
    assert!(
        !contains(&on_disk, secret.as_bytes()),
        "a message is on disk in the clear"
    );

    // The same key opens the dead letter after a restart; another shows it
    // only as stored.
    let (server, _dir) = sealed_messaging_host(BrokerChoice::Embedded, &data, &key).await;
    assert_eq!(first_dead_body(&server).await, secret.as_bytes());
    server.stop().await;
    let (server, _dir) = sealed_messaging_host(BrokerChoice::Embedded, &data, &other).await;
    let stored = first_dead_body(&server).await;
    assert!(!stored.is_empty() && !contains(&stored, secret.as_bytes()));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn with_encryption_nats_only_ever_sees_sealed_message_bodies() {
    let keys = tempfile::tempdir().expect("temp dir");
    let key = keys.path().join("wharf.key");
    std::fs::write(&key, "4f".repeat(32)).expect("write the key");
    let nats = NatsServer::start();
    let nats_port: u16 = nats
        .url()
        .rsplit(':')
        .next()
        .and_then(|port| port.parse().ok())
        .expect("the port in the NATS URL");
    let relay = Relay::start(nats_port).await;
    let data = ServiceDir::new();
    let broker = BrokerChoice::Nats(format!("nats://127.0.0.1:{}", relay.port));
    let (server, _dir) = sealed_messaging_host(broker, &data, &key).await;
    let secret = "poison-TOP-SECRET-e5a270-IN-NATS";
    publish_sealed(&server, secret).await;
    let wire = relay.bytes_without(secret);
    assert!(contains(&wire, b"enc.tls"), "the relay saw no topic");
    server.stop().await;
}

/// The admin token of `sealed_process`'s hosts.
const ADMIN_TOKEN: &str = "rekey-t0ken";

/// `wharf serve` of `dir` with its store in `data` and an admin endpoint
/// taking writes with [`ADMIN_TOKEN`]; `wharf.toml` names the keys.
fn sealed_process(dir: &ServiceDir, data: &Path, keys: &str) -> crate::support::WharfProcess {
    dir.write("wharf.toml", keys.as_bytes());
    crate::support::WharfProcess::start_with(|command| {
        command
            .arg("serve")
            .arg(dir.path())
            .args(["--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0"])
            .arg("--data-dir")
            .arg(data)
            .env("WHARF_ADMIN_TOKEN", ADMIN_TOKEN);
    })
}

/// Runs `wharf rekey` against `host`'s admin endpoint.
async fn rekey(host: &crate::support::WharfProcess) -> std::process::Output {
    let admin = host.admin_url();
    tokio::task::spawn_blocking(move || {
        crate::commands::wharf(
            &["rekey", "--to", &admin],
            &[("WHARF_ADMIN_TOKEN", ADMIN_TOKEN)],
        )
    })
    .await
    .expect("run wharf rekey")
}

#[tokio::test(flavor = "multi_thread")]
async fn rekey_under_load_reseals_every_value_and_the_old_key_can_be_retired() {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

    let keys = tempfile::tempdir().expect("temp dir");
    let (old, new) = (keys.path().join("old.key"), keys.path().join("new.key"));
    std::fs::write(&old, "0d".repeat(32)).expect("write the key");
    std::fs::write(&new, "e4".repeat(32)).expect("write the key");
    let data = tempfile::tempdir().expect("temp dir");
    let dir = ServiceDir::new();
    dir.install_bytes("kv.wasm", &guest_bytes("kv"));
    dir.write("kv.toml", b"[keyvalue]\nbuckets = [\"vault\"]\n");
    let http = client();

    // Values sealed with the old key.
    let only_old = format!("[encryption]\nkey = {old:?}\n");
    let mut host = sealed_process(&dir, data.path(), &only_old);
    for i in 0..40 {
        let put = http
            .put(host.url(&format!("/kv/set?bucket=vault&key=k{i}")))
            .body(format!("value-{i}"))
            .send()
            .await
            .expect("the host answers");
        assert_eq!(put.status().as_u16(), 204);
    }
    let counted = http
        .post(host.url("/kv/incr?bucket=vault&key=visits&times=10"))
        .send()
        .await
        .expect("the host answers");
    assert_eq!(counted.text().await.unwrap_or_default(), "10");
    host.terminate();
    host.wait_exit(Duration::from_secs(30)).await;

    // The new key current, the old one only opening; rekey while a client
    // keeps incrementing.
    let rotating = format!("[encryption]\nkey = {new:?}\nprevious = [{old:?}]\n");
    let mut host = sealed_process(&dir, data.path(), &rotating);
    let stop = Arc::new(AtomicBool::new(false));
    let increments = Arc::new(AtomicU64::new(0));
    let load = tokio::spawn({
        let (url, stop, increments, http) = (
            host.url("/kv/incr?bucket=vault&key=visits"),
            stop.clone(),
            increments.clone(),
            http.clone(),
        );
        async move {
            while !stop.load(Ordering::Acquire) {
                let answer = http.post(&url).send().await;
                if answer.is_ok_and(|r| r.status().is_success()) {
                    increments.fetch_add(1, Ordering::AcqRel);
                }
            }
        }
    });
    let output = rekey(&host).await;
    let said = crate::commands::stdout(&output);
    assert!(
        output.status.success(),
        "{said}{}",
        crate::commands::stderr(&output)
    );
    assert!(said.starts_with("vault: 41 keys, "), "{said}");
    assert!(said.contains(", 0 do not open"), "{said}");
    stop.store(true, Ordering::Release);
    load.await.expect("the load");
    let incremented = increments.load(Ordering::Acquire);
    assert!(
        incremented > 0,
        "no increment went through during the rekey"
    );
    host.terminate();
    host.wait_exit(Duration::from_secs(30)).await;

    // The old key retired: every value opens, no increment was lost.
    let only_new = format!("[encryption]\nkey = {new:?}\n");
    let host = sealed_process(&dir, data.path(), &only_new);
    for i in 0..40 {
        let (status, body) = get(&host.url(&format!("/kv/get?bucket=vault&key=k{i}")))
            .await
            .expect("the host answers");
        assert_eq!((status, body), (200, format!("value-{i}")));
    }
    let (status, visits) = get(&host.url("/kv/get?bucket=vault&key=visits"))
        .await
        .expect("the host answers");
    assert_eq!((status, visits), (200, (10 + incremented).to_string()));

    // Rekeying again finds every value current.
    let output = rekey(&host).await;
    let said = crate::commands::stdout(&output);
    assert!(
        said.contains("0 sealed again, 41 already current"),
        "{said}"
    );
}
