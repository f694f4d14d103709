//! Encryption on the wire: a `nats-server` of the test's own that speaks
//! TLS only, with certificates the test makes (`rcgen`), reached by Wharf
//! with `[tls]` through a relay that records every byte. A secret written
//! through key-value never appears in them; a wrong CA fails clearly;
//! mutual TLS works where the server requires it.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tempfile::TempDir;
use wharf::{BackendTls, Config, KeyValueChoice};

use crate::support::{NatsServer, ServiceDir, TestServer, client, free_port, guest_bytes};

/// A CA, a server certificate for 127.0.0.1 and a client certificate it
/// signed, and a second, unrelated CA.
struct Pki {
    dir: TempDir,
}

impl Pki {
    fn new() -> Pki {
        let dir = TempDir::new().expect("temp dir");
        let write = |name: &str, text: String| {
            std::fs::write(dir.path().join(name), text).expect("write a PEM file")
        };
        let ca_key = rcgen::KeyPair::generate().expect("a CA key");
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca = ca_params.self_signed(&ca_key).expect("the CA");
        write("ca.pem", ca.pem());
        let issuer = rcgen::Issuer::new(ca_params, ca_key);
        for (name, names) in [
            (
                "server",
                vec!["127.0.0.1".to_string(), "localhost".to_string()],
            ),
            ("client", vec!["wharf".to_string()]),
        ] {
            let key = rcgen::KeyPair::generate().expect("a key");
            let cert = rcgen::CertificateParams::new(names)
                .expect("params")
                .signed_by(&key, &issuer)
                .expect("a certificate");
            write(&format!("{name}.pem"), cert.pem());
            write(&format!("{name}-key.pem"), key.serialize_pem());
        }
        let other_key = rcgen::KeyPair::generate().expect("a key");
        let mut other = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
        other.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        write(
            "other-ca.pem",
            other.self_signed(&other_key).expect("a CA").pem(),
        );
        Pki { dir }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn arg(&self, name: &str) -> String {
        self.path(name).display().to_string()
    }
}

/// A TCP relay on a free loopback port to `target`, recording every byte
/// in both directions.
struct Relay {
    port: u16,
    seen: Arc<Mutex<Vec<u8>>>,
}

impl Relay {
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
    let dir = ServiceDir::new();
    dir.install_bytes("kv.wasm", &guest_bytes("kv"));
    dir.write("kv.toml", b"[keyvalue]\nbuckets = [\"vault\"]\n");
    let mut config = Config::for_dir(dir.path());
    config.keyvalue = Some(KeyValueChoice::Nats(url));
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
    let wire = relay.bytes();
    assert!(wire.len() > 1000, "the relay saw {} bytes", wire.len());
    assert!(
        !contains(&wire, secret.as_bytes()),
        "the secret crossed the wire in the clear"
    );
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
