//! The real servers backend tests use — Redis, NATS JetStream, RabbitMQ,
//! a Kafka-API broker (tansu), HAProxy — each started on ephemeral loopback ports with temporary data,
//! and killed when the test (or the test binary) ends.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use tempfile::TempDir;

use super::guests::workspace_root;
use super::pki::Pki;

/// A free TCP port on 127.0.0.1 (bound and released; a server started on it
/// right after almost always gets it).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// Waits up to `limit` until something accepts TCP connections on `port`.
fn wait_for_port_within(port: u16, what: &str, child: &mut Child, limit: Duration) {
    let deadline = Instant::now() + limit;
    loop {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return;
        }
        if let Ok(Some(status)) = child.try_wait() {
            panic!("{what} exited with {status} before accepting connections");
        }
        assert!(
            Instant::now() < deadline,
            "{what} did not start listening on {port}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Finds a server program on the PATH (or in /usr/sbin, where Debian puts
/// some), with a clear failure if it is not installed.
fn server_program(name: &str, package: &str) -> PathBuf {
    let candidates = std::env::var_os("PATH")
        .map(|path| std::env::split_paths(&path).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/usr/bin")]);
    for dir in candidates {
        let path = dir.join(name);
        if path.is_file() {
            return path;
        }
    }
    panic!("{name} is not installed: `cargo xtask test` installs the Debian package {package}")
}

/// A server program of the test's own on a loopback port: started by its
/// command, stopped on drop, restartable on the same port (its data stays
/// wherever the command keeps it).
pub struct ServerProcess {
    /// What the server is (`tansu`, `redis-server`), for messages.
    pub what: &'static str,
    command: Box<dyn Fn() -> Command + Send + Sync>,
    startup: Duration,
    child: Option<Child>,
    pub port: u16,
}

impl ServerProcess {
    /// Runs `command()` and waits up to `startup` until `port` accepts
    /// connections.
    pub fn start(
        what: &'static str,
        port: u16,
        startup: Duration,
        command: impl Fn() -> Command + Send + Sync + 'static,
    ) -> ServerProcess {
        let mut server = ServerProcess::launch(what, port, startup, command);
        server.wait_ready();
        server
    }

    /// Runs `command()` without waiting for it: several servers can boot
    /// at once; [`wait_ready`](ServerProcess::wait_ready) then waits.
    pub fn launch(
        what: &'static str,
        port: u16,
        startup: Duration,
        command: impl Fn() -> Command + Send + Sync + 'static,
    ) -> ServerProcess {
        let mut server = ServerProcess {
            what,
            command: Box::new(command),
            startup,
            child: None,
            port,
        };
        server.spawn();
        server
    }

    fn spawn(&mut self) {
        let mut command = (self.command)();
        command.stdout(Stdio::null()).stderr(Stdio::null());
        let child = command
            .spawn()
            .unwrap_or_else(|err| panic!("start {}: {err}", self.what));
        self.child = Some(child);
    }

    /// Waits up to the startup time until the port accepts connections.
    pub fn wait_ready(&mut self) {
        let child = self.child.as_mut().expect("a launched server");
        wait_for_port_within(self.port, self.what, child, self.startup);
    }

    fn run(&mut self) {
        self.spawn();
        self.wait_ready();
    }

    /// Sends the running server the signal `name` (as `kill -NAME`).
    pub fn signal(&self, name: &str) {
        let child = self.child.as_ref().expect("a running server");
        send_signal(child.id(), name);
    }

    /// Kills the server.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again on the same port.
    pub fn restart(&mut self) {
        self.stop();
        self.run();
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A `redis-server` of the test's own, on a free loopback port, with its
/// data in a temporary directory (no persistence: a restart empties it).
pub struct RedisServer {
    server: ServerProcess,
    _dir: TempDir,
}

impl RedisServer {
    pub fn start() -> RedisServer {
        let dir = TempDir::new().expect("temp dir");
        let (port, path) = (free_port(), dir.path().to_path_buf());
        let program = server_program("redis-server", "redis-server");
        let server = ServerProcess::start("redis-server", port, STARTUP, move || {
            let mut command = Command::new(&program);
            command
                .args(["--bind", "127.0.0.1", "--port", &port.to_string()])
                .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
                .arg("--dir")
                .arg(&path);
            command
        });
        RedisServer { server, _dir: dir }
    }

    /// A `redis-server` that speaks TLS only, with `pki`'s server
    /// certificate, requiring client certificates signed by its CA.
    pub fn start_tls(pki: &Pki) -> RedisServer {
        let dir = TempDir::new().expect("temp dir");
        let (port, path) = (free_port(), dir.path().to_path_buf());
        let program = server_program("redis-server", "redis-server");
        let files = [
            ("--tls-cert-file", pki.path("server.pem")),
            ("--tls-key-file", pki.path("server-key.pem")),
            ("--tls-ca-cert-file", pki.path("ca.pem")),
        ];
        let server = ServerProcess::start("redis-server (TLS)", port, STARTUP, move || {
            let mut command = Command::new(&program);
            command
                .args(["--bind", "127.0.0.1", "--port", "0"])
                .args(["--tls-port", &port.to_string(), "--tls-auth-clients", "yes"])
                .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
                .arg("--dir")
                .arg(&path);
            for (flag, file) in &files {
                command.arg(flag).arg(file);
            }
            command
        });
        RedisServer { server, _dir: dir }
    }

    /// `redis://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }
}

/// A `nats-server` with JetStream of the test's own, on a free loopback
/// port, storing in a temporary directory (kept across restarts).
pub struct NatsServer {
    server: ServerProcess,
    _dir: TempDir,
}

impl NatsServer {
    pub fn start() -> NatsServer {
        NatsServer::start_on(free_port())
    }

    /// Starts one on `port` (for a host configured before its broker).
    pub fn start_on(port: u16) -> NatsServer {
        NatsServer::start_with(port, &[])
    }

    /// Starts one on `port` with `extra` arguments (say `--user U --pass P`).
    pub fn start_with(port: u16, extra: &[&str]) -> NatsServer {
        let dir = TempDir::new().expect("temp dir");
        let path = dir.path().to_path_buf();
        let program = server_program("nats-server", "nats-server");
        let extra: Vec<String> = extra.iter().map(|arg| arg.to_string()).collect();
        let server = ServerProcess::start("nats-server", port, STARTUP, move || {
            let mut command = Command::new(&program);
            command
                .args(["-js", "-a", "127.0.0.1", "-p", &port.to_string()])
                .arg("-sd")
                .arg(&path)
                .args(&extra);
            command
        });
        NatsServer { server, _dir: dir }
    }

    /// `nats://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }
}

/// A JetStream cluster of `nats-server`s of the test's own, routed to each
/// other on loopback ports, each storing in its own temporary directory: a
/// server can be killed (`kill -9`), lose its disk, and come back.
pub struct NatsCluster {
    nodes: Vec<ServerProcess>,
    stores: Vec<PathBuf>,
    logs: Vec<PathBuf>,
    /// Each server's monitoring port (`/jsz`).
    monitors: Vec<u16>,
    _dir: TempDir,
}

impl NatsCluster {
    /// Starts `size` servers named `n0`, `n1`, … in one cluster.
    pub fn start(size: usize) -> NatsCluster {
        let dir = TempDir::new().expect("temp dir");
        let program = server_program("nats-server", "nats-server");
        let ports: Vec<(u16, u16)> = (0..size).map(|_| (free_port(), free_port())).collect();
        let monitors: Vec<u16> = (0..size).map(|_| free_port()).collect();
        let routes = ports
            .iter()
            .map(|(_, route)| format!("nats://127.0.0.1:{route}"))
            .collect::<Vec<_>>()
            .join(",");
        let mut nodes = Vec::new();
        let mut stores = Vec::new();
        let mut logs = Vec::new();
        for (i, &(port, route)) in ports.iter().enumerate() {
            let store = dir.path().join(format!("n{i}"));
            let log = dir.path().join(format!("n{i}.log"));
            stores.push(store.clone());
            logs.push(log.clone());
            let (program, routes, monitor) = (program.clone(), routes.clone(), monitors[i]);
            nodes.push(ServerProcess::start(
                "nats-server",
                port,
                STARTUP,
                move || {
                    let mut command = Command::new(&program);
                    command
                        .args(["-js", "-a", "127.0.0.1", "-p", &port.to_string()])
                        .args(["-n", &format!("n{i}"), "--cluster_name", "wharf-test"])
                        .args(["--cluster", &format!("nats://127.0.0.1:{route}")])
                        .args(["--routes", &routes])
                        .arg("-sd")
                        .arg(&store)
                        .arg("-l")
                        .arg(&log)
                        .args(["-m", &monitor.to_string()]);
                    command
                },
            ));
        }
        NatsCluster {
            nodes,
            stores,
            logs,
            monitors,
            _dir: dir,
        }
    }

    /// The last `lines` lines server `i` logged (its log survives a loss),
    /// for a failure to show what the servers were doing.
    pub fn log_tail(&self, i: usize, lines: usize) -> String {
        let log = std::fs::read_to_string(&self.logs[i]).unwrap_or_default();
        let all: Vec<&str> = log.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// Whether JetStream's metadata group (which streams exist, on which
    /// servers) has a leader that sees every server current; if not, why.
    /// Its copies are what a lost server must get back before another may
    /// go: otherwise a server that forgot its votes can elect a leader
    /// that forgot a stream's deletion.
    pub async fn metadata_whole(&self) -> Result<(), String> {
        let http = reqwest::Client::new();
        let mut seen = Vec::new();
        for (i, port) in self.monitors.iter().enumerate() {
            let jsz = http
                .get(format!("http://127.0.0.1:{port}/jsz"))
                .timeout(std::time::Duration::from_secs(2))
                .send()
                .await;
            let jsz: serde_json::Value = match jsz {
                Ok(response) => response.json().await.map_err(|err| err.to_string())?,
                Err(err) => {
                    seen.push(format!("n{i}: {err}"));
                    continue;
                }
            };
            let meta = &jsz["meta_cluster"];
            if meta["leader"].as_str() != Some(&format!("n{i}")) {
                continue;
            }
            let replicas = meta["replicas"].as_array().cloned().unwrap_or_default();
            let behind: Vec<String> = replicas
                .iter()
                .filter(|peer| peer["current"].as_bool() != Some(true))
                .map(|peer| format!("{} lag {}", peer["name"], peer["lag"]))
                .collect();
            if replicas.len() + 1 < self.nodes.len() {
                return Err(format!(
                    "metadata leader n{i} sees {} other servers",
                    replicas.len()
                ));
            }
            return if behind.is_empty() {
                Ok(())
            } else {
                Err(format!("metadata leader n{i}: behind: {behind:?}"))
            };
        }
        Err(format!("no metadata leader ({seen:?})"))
    }

    /// The number of servers.
    pub fn servers(&self) -> usize {
        self.nodes.len()
    }

    /// Every server's client address, comma-separated, in order.
    pub fn url(&self) -> String {
        self.nodes
            .iter()
            .map(|node| format!("nats://127.0.0.1:{}", node.port))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The index of the server named `name` (`n0`, …).
    pub fn index_of(&self, name: &str) -> usize {
        name.strip_prefix('n')
            .and_then(|i| i.parse().ok())
            .filter(|&i| i < self.nodes.len())
            .unwrap_or_else(|| panic!("{name:?} is not a server of this cluster"))
    }

    /// Kills server `i` with SIGKILL.
    pub fn kill(&mut self, i: usize) {
        self.nodes[i].stop();
    }

    /// Kills server `i` and deletes its store: the machine is lost and
    /// replaced by an empty one.
    pub fn lose(&mut self, i: usize) {
        self.kill(i);
        let _ = std::fs::remove_dir_all(&self.stores[i]);
    }

    /// Starts server `i` again on its ports.
    pub fn revive(&mut self, i: usize) {
        self.nodes[i].restart();
    }
}

/// HAProxy of the test's own, balancing `backends` (each a public address
/// and the admin port whose `/readyz` says whether it takes requests) the
/// way `examples/cluster/haproxy.cfg` does, on a free loopback port.
pub struct HaproxyServer {
    server: ServerProcess,
    _dir: TempDir,
}

impl HaproxyServer {
    pub fn start(backends: &[(u16, u16)]) -> HaproxyServer {
        let dir = TempDir::new().expect("temp dir");
        let port = free_port();
        let recipe = workspace_root().join("examples/cluster/haproxy.cfg");
        let recipe = std::fs::read_to_string(&recipe).expect("read examples/cluster/haproxy.cfg");
        // The recipe's settings, with this test's ports.
        let mut config: String = recipe
            .lines()
            .filter(|line| {
                let line = line.trim_start();
                !line.starts_with("bind ") && !line.starts_with("server ")
            })
            .map(|line| format!("{line}\n"))
            .collect();
        config = config.replace(
            "frontend wharf\n",
            &format!("frontend wharf\n    bind 127.0.0.1:{port}\n"),
        );
        for (i, (public, admin)) in backends.iter().enumerate() {
            config.push_str(&format!(
                "    server h{i} 127.0.0.1:{public} check port {admin}\n"
            ));
        }
        HaproxyServer::run(dir, port, &config)
    }

    /// A TLS terminator on `port`: connections are TLS with the server
    /// certificate and key of `cert_and_key` (one PEM file), their bytes
    /// passed on in the clear to `target`. For servers without a TLS
    /// listener of their own (tansu 0.6's `--cert` and `--key` cannot be
    /// given together).
    pub fn tls_terminator(port: u16, cert_and_key: &std::path::Path, target: u16) -> HaproxyServer {
        let dir = TempDir::new().expect("temp dir");
        let config = format!(
            "global\n    maxconn 256\ndefaults\n    mode tcp\n    timeout connect 5s\n    timeout client 1h\n    timeout server 1h\nfrontend tls\n    bind 127.0.0.1:{port} ssl crt {}\n    default_backend plain\nbackend plain\n    server s 127.0.0.1:{target}\n",
            cert_and_key.display()
        );
        HaproxyServer::run(dir, port, &config)
    }

    /// Runs HAProxy on `port` with `config`, written into `dir`.
    fn run(dir: TempDir, port: u16, config: &str) -> HaproxyServer {
        let path = dir.path().join("haproxy.cfg");
        std::fs::write(&path, config).expect("write haproxy.cfg");
        let program = server_program("haproxy", "haproxy");
        let server = ServerProcess::start("haproxy", port, STARTUP, move || {
            let mut command = Command::new(&program);
            command.arg("-f").arg(&path).arg("-db");
            die_with_parent(&mut command);
            command
        });
        HaproxyServer { server, _dir: dir }
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }
}

/// A RabbitMQ broker of the test's own: `epmd` and the broker on free
/// loopback ports, its data in a temporary directory (kept across
/// restarts). Both die with the thread that started them
/// (`PR_SET_PDEATHSIG`), so a test binary that exits or crashes never
/// leaves a broker behind.
pub struct RabbitServer {
    broker: ServerProcess,
    _epmd: ServerProcess,
    /// Where it also listens for AMQP over TLS (`amqps`), requiring a
    /// client certificate signed by `pki`'s CA.
    pub tls_port: u16,
    pub pki: Pki,
    _dir: TempDir,
}

/// The shared broker, once it is up: its ports and its PKI's files.
struct SharedRabbit {
    port: u16,
    tls_port: u16,
    pki_dir: PathBuf,
}

static SHARED_RABBIT: OnceLock<SharedRabbit> = OnceLock::new();

impl RabbitServer {
    /// Starts a broker for one test (about 15 s on this machine).
    pub fn start() -> RabbitServer {
        let program = PathBuf::from("/usr/lib/rabbitmq/bin/rabbitmq-server");
        assert!(
            program.is_file(),
            "RabbitMQ is not installed: `cargo xtask test` installs the Debian package rabbitmq-server"
        );
        let dir = TempDir::new().expect("temp dir");
        std::fs::write(dir.path().join("plugins"), "[].").expect("write the plugins file");
        let (port, epmd_port, dist_port) = (free_port(), free_port(), free_port());
        let (tls_port, pki) = (free_port(), Pki::new());
        std::fs::write(
            dir.path().join("rabbitmq.conf"),
            format!(
                "listeners.ssl.default = {tls_port}\n\
                 ssl_options.cacertfile = {}\n\
                 ssl_options.certfile = {}\n\
                 ssl_options.keyfile = {}\n\
                 ssl_options.verify = verify_peer\n\
                 ssl_options.fail_if_no_peer_cert = true\n",
                pki.arg("ca.pem"),
                pki.arg("server.pem"),
                pki.arg("server-key.pem"),
            ),
        )
        .expect("write rabbitmq.conf");
        let epmd = start_epmd(epmd_port);
        let node = format!("wharf-test-{port}@localhost");
        let ports = RabbitPorts {
            amqp: port,
            dist: dist_port,
            epmd: epmd_port,
        };
        let broker = rabbit_node(dir.path(), node, ports);
        RabbitServer {
            broker,
            _epmd: epmd,
            tls_port,
            pki,
            _dir: dir,
        }
    }

    /// The URL of one broker the whole test binary shares (started on
    /// first use; tests on it keep to topics and groups of their own).
    pub fn shared_url() -> String {
        amqp_url(RabbitServer::shared().port)
    }

    /// The shared broker's `amqps://` URL and the directory of its PKI's
    /// files (see [`Pki`]): it requires a client certificate.
    pub fn shared_tls() -> (String, PathBuf) {
        let shared = RabbitServer::shared();
        (
            format!("amqps://guest:guest@127.0.0.1:{}/%2f", shared.tls_port),
            shared.pki_dir.clone(),
        )
    }

    fn shared() -> &'static SharedRabbit {
        SHARED_RABBIT.get_or_init(|| {
            // Started on a thread that lives as long as the process, so
            // the broker lives that long too, and no longer.
            let (tx, rx) = std::sync::mpsc::channel();
            std::thread::Builder::new()
                .name("shared-rabbitmq".into())
                .spawn(move || {
                    let server = RabbitServer::start();
                    tx.send(SharedRabbit {
                        port: server.port,
                        tls_port: server.tls_port,
                        pki_dir: server.pki.path("."),
                    })
                    .expect("report the ports");
                    loop {
                        std::thread::park();
                        let _ = &server;
                    }
                })
                .expect("spawn the rabbitmq thread");
            rx.recv().expect("the shared rabbitmq started")
        })
    }

    /// `amqp://guest:guest@127.0.0.1:PORT/%2f`.
    pub fn url(&self) -> String {
        amqp_url(self.port)
    }
}

/// The version of tansu, the Kafka-API broker the tests run against;
/// `cargo xtask test` installs it into the tools cache.
pub const TANSU_VERSION: &str = "0.6.0";

/// Where `cargo xtask test` installs the tools no package manager here
/// offers: `$XDG_CACHE_HOME/wharf-tools` (else `~/.cache/wharf-tools`),
/// outside any checkout, so each machine builds them once.
pub fn tools_dir() -> PathBuf {
    std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".cache")))
        .expect("HOME or XDG_CACHE_HOME")
        .join("wharf-tools")
}

/// tansu, as `cargo xtask test` installs it.
fn tansu_program() -> PathBuf {
    let program = tools_dir()
        .join(format!("tansu-{TANSU_VERSION}"))
        .join("bin")
        .join("tansu");
    assert!(
        program.is_file(),
        "{} is missing: `cargo xtask test` installs tansu {TANSU_VERSION}, the Kafka-API broker these tests use",
        program.display()
    );
    program
}

/// A Kafka-API broker of the test's own: tansu on a free loopback port,
/// storing in SQLite in a temporary directory, so a restart keeps every
/// record.
pub struct KafkaServer {
    server: ServerProcess,
    _dir: TempDir,
}

static SHARED_KAFKA: OnceLock<u16> = OnceLock::new();

impl KafkaServer {
    pub fn start() -> KafkaServer {
        KafkaServer::start_with(&[])
    }

    /// Starts one with `extra` arguments (`--cert`, `--key` for TLS).
    pub fn start_with(extra: &[&str]) -> KafkaServer {
        let port = free_port();
        KafkaServer::start_advertising(port, port, extra)
    }

    /// Starts one on `port` that tells clients to connect to `advertised`
    /// (a relay in front of it, say), with `extra` arguments.
    pub fn start_advertising(port: u16, advertised: u16, extra: &[&str]) -> KafkaServer {
        let dir = TempDir::new().expect("temp dir");
        KafkaServer::start_in(dir, port, advertised, extra)
    }

    /// Starts one that requires SASL/SCRAM (`--authentication`), knowing
    /// the SCRAM-SHA-512 user `name` with `password`: the user is created
    /// through the broker's own API while it is still open, then it is
    /// restarted closed, on the same port and data.
    pub fn with_scram_user(name: &str, password: &str) -> KafkaServer {
        let port = free_port();
        let open = KafkaServer::start_advertising(port, port, &[]);
        let created = Command::new(tansu_program())
            .args(["user", "create", "--broker"])
            .arg(format!("tcp://127.0.0.1:{port}"))
            .args([name, password, "--mechanism", "scram512"])
            .output()
            .expect("run tansu user create");
        assert!(
            created.status.success(),
            "tansu user create: {}",
            String::from_utf8_lossy(&created.stderr)
        );
        let KafkaServer {
            mut server,
            _dir: dir,
        } = open;
        server.stop();
        drop(server);
        KafkaServer::start_in(dir, port, port, &["--authentication"])
    }

    /// Starts one keeping its data in `dir`.
    fn start_in(dir: TempDir, port: u16, advertised: u16, extra: &[&str]) -> KafkaServer {
        let program = tansu_program();
        let data = dir.path().to_path_buf();
        let extra: Vec<String> = extra.iter().map(|arg| arg.to_string()).collect();
        let server = ServerProcess::start("tansu", port, STARTUP, move || {
            let mut command = Command::new(&program);
            command
                .arg("broker")
                .args(["--listener-url", &format!("tcp://127.0.0.1:{port}")])
                .args([
                    "--advertised-listener-url",
                    &format!("tcp://127.0.0.1:{advertised}"),
                ])
                // tansu reads the database's path relative to its directory.
                .current_dir(&data)
                .args(["--storage-engine", "sqlite://tansu.db"])
                .args(&extra)
                .env("RUST_LOG", "warn");
            die_with_parent(&mut command);
            command
        });
        index_tansu_headers(&dir.path().join("tansu.db"));
        KafkaServer { server, _dir: dir }
    }

    /// `kafka://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("kafka://127.0.0.1:{}", self.port)
    }

    /// The URL of one broker the whole test binary shares (started on
    /// first use; tests on it keep to topics and groups of their own).
    pub fn shared_url() -> String {
        let port = SHARED_KAFKA.get_or_init(|| {
            // Started on a thread that lives as long as the process, so
            // the broker lives that long too, and no longer.
            let (tx, rx) = std::sync::mpsc::channel();
            std::thread::Builder::new()
                .name("shared-kafka".into())
                .spawn(move || {
                    let server = KafkaServer::start();
                    tx.send(server.port).expect("report the port");
                    loop {
                        std::thread::park();
                        let _ = &server;
                    }
                })
                .expect("spawn the kafka thread");
            rx.recv().expect("the shared kafka started")
        });
        format!("kafka://127.0.0.1:{port}")
    }
}

/// Adds the index tansu 0.6 lacks to its SQLite database `db`: its `header`
/// table has none on the record a header belongs to, so each fetch of a
/// record with headers scans every header stored and a topic of Wharf's
/// records (six headers each) slows down as it grows. tansu creates its
/// schema before it listens, so the table exists once it does.
fn index_tansu_headers(db: &Path) {
    let connection = rusqlite::Connection::open(db).expect("open tansu's database");
    connection
        .busy_timeout(Duration::from_secs(10))
        .expect("a busy timeout");
    connection
        .execute_batch(
            "create index if not exists wharf_header_record on header (topition, offset_id)",
        )
        .expect("index tansu's record headers");
}

/// The servers above are their process: `port`, `stop` and `restart`.
macro_rules! server_process {
    ($($server:ident . $field:ident),*) => {$(
        impl std::ops::Deref for $server {
            type Target = ServerProcess;
            fn deref(&self) -> &ServerProcess {
                &self.$field
            }
        }
        impl std::ops::DerefMut for $server {
            fn deref_mut(&mut self) -> &mut ServerProcess {
                &mut self.$field
            }
        }
    )*};
}
server_process!(
    RedisServer.server,
    NatsServer.server,
    HaproxyServer.server,
    RabbitServer.broker,
    KafkaServer.server
);

/// How long a server (but RabbitMQ) may take to start listening.
const STARTUP: Duration = Duration::from_secs(30);

/// An `epmd` (Erlang's port mapper, which RabbitMQ nodes find each other
/// through) of the test's own on `port`.
fn start_epmd(port: u16) -> ServerProcess {
    let program = server_program("epmd", "erlang-base");
    ServerProcess::start("epmd", port, STARTUP, move || {
        let mut epmd = Command::new(&program);
        epmd.args(["-port", &port.to_string()]);
        die_with_parent(&mut epmd);
        epmd
    })
}

/// The ports of one private RabbitMQ node.
#[derive(Clone, Copy)]
struct RabbitPorts {
    amqp: u16,
    dist: u16,
    epmd: u16,
}

/// Starts the RabbitMQ node `node` keeping its files in `dir` (which holds
/// its `plugins` file and, if any, `rabbitmq.conf`), and waits until it
/// accepts AMQP connections.
fn rabbit_node(dir: &Path, node: String, ports: RabbitPorts) -> ServerProcess {
    let mut server = launch_rabbit_node(dir, node, ports);
    server.wait_ready();
    server
}

/// Starts the RabbitMQ node `node` (see [`rabbit_node`]) without waiting.
fn launch_rabbit_node(dir: &Path, node: String, ports: RabbitPorts) -> ServerProcess {
    let program = PathBuf::from("/usr/lib/rabbitmq/bin/rabbitmq-server");
    let dir = dir.to_path_buf();
    ServerProcess::launch(
        "rabbitmq-server",
        ports.amqp,
        Duration::from_secs(120),
        move || {
            let mut broker = Command::new(&program);
            broker
                // Run the broker in the foreground, replacing the
                // script: the child is the Erlang VM itself.
                .env("RUNNING_UNDER_SYSTEMD", "true")
                .env("HOME", &dir)
                .env("RABBITMQ_NODENAME", &node)
                .env("RABBITMQ_NODE_IP_ADDRESS", "127.0.0.1")
                .env("RABBITMQ_NODE_PORT", ports.amqp.to_string())
                .env("RABBITMQ_DIST_PORT", ports.dist.to_string())
                .env("ERL_EPMD_PORT", ports.epmd.to_string())
                .env("RABBITMQ_MNESIA_BASE", dir.join("mnesia"))
                .env("RABBITMQ_LOG_BASE", dir.join("log"))
                .env("RABBITMQ_ENABLED_PLUGINS_FILE", dir.join("plugins"))
                // A node that stops answering is declared down after about
                // this many seconds (Erlang's default, 60, is longer than
                // the tests wait; operators shorten it the same way).
                .env(
                    "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS",
                    "-kernel net_ticktime 8",
                );
            if dir.join("rabbitmq.conf").is_file() {
                broker.env("RABBITMQ_CONFIG_FILE", dir.join("rabbitmq.conf"));
            }
            die_with_parent(&mut broker);
            broker
        },
    )
}

/// A RabbitMQ cluster of the test's own: three private nodes on loopback
/// ports (one `epmd`, one Erlang cookie), the second and third joined to
/// the first. A node can be killed (`kill -9`).
pub struct RabbitCluster {
    nodes: Vec<ServerProcess>,
    _epmd: ServerProcess,
    _dirs: Vec<TempDir>,
}

impl RabbitCluster {
    /// Starts `size` nodes at once and joins them into one cluster (about
    /// half a minute here).
    pub fn start(size: usize) -> RabbitCluster {
        assert!(
            Path::new("/usr/lib/rabbitmq/bin/rabbitmq-server").is_file(),
            "RabbitMQ is not installed: `cargo xtask test` installs the Debian package rabbitmq-server"
        );
        let epmd_port = free_port();
        let epmd = start_epmd(epmd_port);
        let cookie = format!("WHARFTESTCOOKIE{}", free_port());
        let nodes: Vec<(TempDir, String, RabbitPorts)> = (0..size)
            .map(|_| {
                let dir = TempDir::new().expect("temp dir");
                std::fs::write(dir.path().join("plugins"), "[].").expect("write the plugins file");
                let cookie_file = dir.path().join(".erlang.cookie");
                std::fs::write(&cookie_file, &cookie).expect("write the cookie");
                use std::os::unix::fs::PermissionsExt as _;
                std::fs::set_permissions(&cookie_file, std::fs::Permissions::from_mode(0o400))
                    .expect("make the cookie private");
                let ports = RabbitPorts {
                    amqp: free_port(),
                    dist: free_port(),
                    epmd: epmd_port,
                };
                (
                    dir,
                    format!("wharf-cluster-{}@localhost", ports.amqp),
                    ports,
                )
            })
            .collect();
        // Booted side by side: each takes ~10 s of mostly waiting.
        let mut started: Vec<ServerProcess> = nodes
            .iter()
            .map(|(dir, node, ports)| launch_rabbit_node(dir.path(), node.clone(), *ports))
            .collect();
        for node in &mut started {
            node.wait_ready();
        }
        let seed = &nodes[0].1;
        for (dir, node, _) in &nodes[1..] {
            for args in [
                vec!["stop_app"],
                vec!["join_cluster", seed.as_str()],
                vec!["start_app"],
            ] {
                rabbitmqctl(dir.path(), epmd_port, node, &args);
            }
        }
        let running = rabbitmqctl(nodes[0].0.path(), epmd_port, seed, &["cluster_status"]);
        for (_, node, _) in &nodes {
            assert!(
                running.contains(node.as_str()),
                "{node} not in the cluster:\n{running}"
            );
        }
        RabbitCluster {
            nodes: started,
            _epmd: epmd,
            _dirs: nodes.into_iter().map(|(dir, _, _)| dir).collect(),
        }
    }

    /// Every node's `amqp://` URL, comma-separated, in order.
    pub fn url(&self) -> String {
        self.nodes
            .iter()
            .map(|node| amqp_url(node.port))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Kills node `i` with SIGKILL.
    pub fn kill(&mut self, i: usize) {
        self.nodes[i].stop();
    }

    /// Stops node `i` with SIGSTOP: its connections stay open and silent,
    /// as a machine switched off would leave them. (Killed when the
    /// cluster is dropped.)
    pub fn freeze(&mut self, i: usize) {
        self.nodes[i].signal("STOP");
    }
}

/// Sends process `pid` the signal `name` (as `kill -NAME PID`).
pub fn send_signal(pid: u32, name: &str) {
    let status = Command::new("kill")
        .arg(format!("-{name}"))
        .arg(pid.to_string())
        .status()
        .expect("run kill");
    assert!(status.success(), "kill -{name} {pid}: {status}");
}

/// Runs `rabbitmqctl ARGS` against `node` with the cookie in `home`; what
/// it printed. Panics, with its output, if it fails.
fn rabbitmqctl(home: &Path, epmd_port: u16, node: &str, args: &[&str]) -> String {
    let output = Command::new("/usr/lib/rabbitmq/bin/rabbitmqctl")
        .env("HOME", home)
        .env("ERL_EPMD_PORT", epmd_port.to_string())
        .args(["-n", node])
        .args(args)
        .output()
        .expect("run rabbitmqctl");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        output.status.success(),
        "rabbitmqctl -n {node} {args:?} failed:\n{said}"
    );
    said
}

fn amqp_url(port: u16) -> String {
    format!("amqp://guest:guest@127.0.0.1:{port}/%2f")
}

/// Makes the child get SIGKILL when the thread that spawned it ends.
fn die_with_parent(command: &mut Command) {
    use std::os::unix::process::CommandExt as _;
    // SAFETY: prctl is async-signal-safe and touches only the child.
    unsafe {
        command.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}
