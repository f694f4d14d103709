//! Servers the benchmarks start for themselves (NATS, Redis, RabbitMQ):
//! on free loopback ports, with temporary data, killed when dropped.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};

/// Server processes the bench started, killed (last first) on drop, and
/// their data directory, removed after.
pub struct Daemon {
    pub children: Vec<Child>,
    pub dir: tempfile::TempDir,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        for child in self.children.iter_mut().rev() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Runs `command` (output discarded) as a daemon keeping its data in
/// `dir`, and waits until it listens on `port`.
pub fn spawn_daemon(
    mut command: Command,
    dir: tempfile::TempDir,
    port: u16,
    what: &str,
) -> Result<Daemon> {
    let child = command
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("starting {what}"))?;
    let daemon = Daemon {
        children: vec![child],
        dir,
    };
    wait_for(port, what, Duration::from_secs(30))?;
    Ok(daemon)
}

/// A free TCP port on 127.0.0.1.
pub fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Waits up to `limit` for something to accept connections on `port`.
pub fn wait_for(port: u16, what: &str, limit: Duration) -> Result<()> {
    let deadline = Instant::now() + limit;
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if Instant::now() > deadline {
            bail!("{what} did not start listening on {port}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// `name` in /usr/sbin (where Debian puts servers) if it is there, else on
/// the PATH.
pub fn program(name: &str) -> PathBuf {
    let sbin = PathBuf::from("/usr/sbin").join(name);
    if sbin.exists() {
        sbin
    } else {
        PathBuf::from(name)
    }
}

/// A `nats-server -js`, and its URL.
pub fn start_nats() -> Result<(Daemon, String)> {
    start_nats_server(None)
}

/// Writes a CA (`ca.pem`) and a server certificate for 127.0.0.1 it signed
/// (`server.pem`, `server-key.pem`) into `dir`.
pub fn write_pki(dir: &Path) -> Result<()> {
    let named = |sans: Vec<String>, name: &str| -> Result<rcgen::CertificateParams> {
        let mut params = rcgen::CertificateParams::new(sans)?;
        params.distinguished_name = rcgen::DistinguishedName::new();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        Ok(params)
    };
    let ca_key = rcgen::KeyPair::generate()?;
    let mut ca_params = named(Vec::new(), "Wharf bench CA")?;
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key)?;
    std::fs::write(dir.join("ca.pem"), ca.pem())?;
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let key = rcgen::KeyPair::generate()?;
    let server = named(vec!["127.0.0.1".into()], "Wharf bench server")?.signed_by(&key, &issuer)?;
    std::fs::write(dir.join("server.pem"), server.pem())?;
    std::fs::write(dir.join("server-key.pem"), key.serialize_pem())?;
    Ok(())
}

/// A TLS-only `nats-server -js` with the certificate in `pki` (clients
/// need no certificate of their own); its `tls://` URL.
pub fn start_nats_tls(pki: &Path) -> Result<(Daemon, String)> {
    start_nats_server(Some(pki))
}

/// A `nats-server -js` on a free port with its store in a temporary
/// directory; TLS-only with the certificate in `pki`, if given.
fn start_nats_server(pki: Option<&Path>) -> Result<(Daemon, String)> {
    let dir = tempfile::tempdir()?;
    let port = free_port()?;
    let mut command = Command::new(program("nats-server"));
    command
        .args(["-js", "-a", "127.0.0.1", "-p", &port.to_string()])
        .arg("-sd")
        .arg(dir.path());
    if let Some(pki) = pki {
        command
            .arg("--tls")
            .arg("--tlscert")
            .arg(pki.join("server.pem"))
            .arg("--tlskey")
            .arg(pki.join("server-key.pem"));
    }
    let daemon = spawn_daemon(command, dir, port, "nats-server")?;
    let scheme = if pki.is_some() { "tls" } else { "nats" };
    Ok((daemon, format!("{scheme}://127.0.0.1:{port}")))
}

/// A Kafka-API broker of the bench's own: tansu (built into the tools
/// cache if needed) on a free port, storing in SQLite in a temporary
/// directory.
pub fn start_tansu() -> Result<(Daemon, String)> {
    let program = crate::tools::ensure_tansu()?;
    let dir = tempfile::tempdir()?;
    let port = free_port()?;
    let listener = format!("tcp://127.0.0.1:{port}");
    let mut command = Command::new(program);
    command
        .arg("broker")
        .args(["--listener-url", &listener])
        .args(["--advertised-listener-url", &listener])
        // tansu reads the database's path relative to its directory.
        .current_dir(dir.path())
        .args(["--storage-engine", "sqlite://tansu.db"])
        .env("RUST_LOG", "warn");
    let daemon = spawn_daemon(command, dir, port, "tansu")?;
    index_tansu_headers(&daemon.dir.path().join("tansu.db"))?;
    Ok((daemon, format!("kafka://127.0.0.1:{port}")))
}

/// Adds the index tansu 0.6 lacks to its SQLite database `db`: its
/// `header` table has none on the record a header belongs to, so each
/// fetch of a record with headers scans every header stored, and a topic
/// of such records (Wharf's carry six) slows down as it grows — from
/// 2,000 to under 200 messages/s within 30,000 messages. tansu creates its
/// schema before it listens, so the table exists once it does.
fn index_tansu_headers(db: &Path) -> Result<()> {
    let connection = rusqlite::Connection::open(db)
        .with_context(|| format!("opening tansu's database {}", db.display()))?;
    connection.busy_timeout(Duration::from_secs(10))?;
    connection
        .execute_batch(
            "create index if not exists wharf_header_record on header (topition, offset_id)",
        )
        .context("indexing tansu's record headers")
}
