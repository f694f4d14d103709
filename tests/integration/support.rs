//! Test helpers: building the guests once, temporary services directories,
//! the `wharf` binary as a child process, an in-process host on an ephemeral
//! port, and polling with deadlines (never fixed sleeps).

#![allow(dead_code)]

use std::future::Future;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use tempfile::TempDir;
use tokio::sync::oneshot;
use wharf::Tiers;
use wharf::{Config, Host};

/// The guest target.
const GUEST_TARGET: &str = "wasm32-wasip2";

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("host/ is inside the workspace")
        .to_path_buf()
}

/// Path of a built Rust guest, building all guests on first use.
pub fn guest(name: &str) -> PathBuf {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    let dir = BUILT.get_or_init(|| {
        let guests = workspace_root().join("guests");
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_string());
        let status = Command::new(cargo)
            .current_dir(&guests)
            .args(["build", "--release", "--target", GUEST_TARGET])
            .status()
            .expect("run cargo to build the guests");
        assert!(
            status.success(),
            "building the guests failed; is the {GUEST_TARGET} target installed? `cargo xtask test` installs it"
        );
        guests.join("target").join(GUEST_TARGET).join("release")
    });
    let path = dir.join(format!("{name}.wasm"));
    assert!(
        path.exists(),
        "guest {name} was not built: {}",
        path.display()
    );
    path
}

/// Path of a built JavaScript (`js`) or Python (`python`) guest, building
/// them through `cargo xtask guests LANG` on first use (which installs the
/// npm packages or the componentize-py venv if needed; a no-op when the
/// outputs are up to date).
pub fn guest_in(lang: &str, name: &str) -> PathBuf {
    static BUILT: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());
    let mut built = BUILT.lock().unwrap_or_else(|e| e.into_inner());
    if !built.iter().any(|l| l == lang) {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_string());
        let status = Command::new(cargo)
            .current_dir(workspace_root())
            .args(["run", "--quiet", "--package", "xtask", "--", "guests", lang])
            .status()
            .expect("run cargo xtask guests");
        assert!(status.success(), "building the {lang} guests failed");
        built.push(lang.to_string());
    }
    let path = workspace_root()
        .join("guests")
        .join("target")
        .join(lang)
        .join(format!("{name}.wasm"));
    assert!(
        path.exists(),
        "{lang} guest {name} was not built: {}",
        path.display()
    );
    path
}

/// The bytes of a built guest.
pub fn guest_bytes(name: &str) -> Vec<u8> {
    std::fs::read(guest(name)).expect("read guest")
}

/// The smallest valid core WebAssembly module: a module, not a component.
pub const CORE_MODULE: &[u8] = b"\0asm\x01\0\0\0";

/// A temporary services directory.
pub struct ServiceDir {
    dir: TempDir,
}

impl ServiceDir {
    pub fn new() -> ServiceDir {
        ServiceDir {
            dir: tempfile::tempdir().expect("create temp dir"),
        }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Installs `bytes` as `file` atomically: written beside it under a
    /// dotfile name, then renamed into place (what deploy tools do).
    pub fn install_bytes(&self, file: &str, bytes: &[u8]) {
        let temp = self.path().join(format!(".{file}.tmp"));
        std::fs::write(&temp, bytes).expect("write temp file");
        std::fs::rename(&temp, self.path().join(file)).expect("rename into place");
    }

    /// Installs a JavaScript or Python guest as service `name` atomically.
    pub fn install_from(&self, name: &str, lang: &str, guest_name: &str) {
        let bytes = std::fs::read(guest_in(lang, guest_name)).expect("read guest");
        self.install_bytes(&format!("{name}.wasm"), &bytes);
    }

    /// Installs guest `guest` as service `name` atomically.
    pub fn install(&self, name: &str, guest_name: &str) {
        self.install_bytes(&format!("{name}.wasm"), &guest_bytes(guest_name));
    }

    /// Writes `file` in place (not atomically), like `cp` does.
    pub fn write(&self, file: &str, bytes: &[u8]) {
        std::fs::write(self.path().join(file), bytes).expect("write file");
    }

    pub fn remove(&self, file: &str) {
        std::fs::remove_file(self.path().join(file)).expect("remove file");
    }
}

/// Polls `check` until it returns true or `timeout` passes.
pub async fn eventually<F, Fut>(timeout: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if check().await {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A plain HTTP client for tests (no connection reuse surprises: a pool
/// is fine, tests only talk to their own host).
pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(60))
        .build()
        .expect("build HTTP client")
}

/// GET `url`, returning status and body text; `None` if the request failed.
pub async fn get(url: &str) -> Option<(u16, String)> {
    let response = client().get(url).send().await.ok()?;
    let status = response.status().as_u16();
    Some((status, response.text().await.ok()?))
}

/// An in-process host serving on an ephemeral port; shut down on drop.
pub struct TestServer {
    pub host: Host,
    pub base: String,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

impl TestServer {
    /// Builds a host for `config` and serves it on 127.0.0.1:0.
    pub async fn start(config: Config) -> TestServer {
        let host = Host::new(config).await.expect("build host");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let base = format!("http://{}", listener.local_addr().expect("local addr"));
        let (tx, rx) = oneshot::channel::<()>();
        let serving = host.clone();
        let task = tokio::spawn(async move {
            serving
                .serve(listener, async {
                    let _ = rx.await;
                })
                .await
        });
        TestServer {
            host,
            base,
            shutdown: Some(tx),
            task: Some(task),
        }
    }

    /// A host serving `dir`, watched, with default limits.
    pub async fn for_dir(dir: &ServiceDir) -> TestServer {
        TestServer::start(Config::for_dir(dir.path())).await
    }

    /// A host serving `dir` with Cranelift's code from the start, for tests
    /// that follow one instance across requests: under tiered compilation
    /// the optimised code takes over with an empty pool, at a moment a cold
    /// cache on a busy machine makes unpredictable.
    pub async fn without_tier_swaps(dir: &ServiceDir) -> TestServer {
        TestServer::start(Config::for_dir(dir.path()).tiers(Tiers::Cranelift)).await
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// Stops serving and waits until the server has drained.
    pub async fn stop(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            task.await.expect("server task").expect("server result");
        }
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

/// The `wharf` binary running as a child process.
pub struct WharfProcess {
    child: Child,
    pub base: String,
    log: Arc<Mutex<String>>,
    /// The temporary data directory, if the helper made one.
    _data: Option<TempDir>,
}

impl WharfProcess {
    /// Runs `wharf serve DIR --listen 127.0.0.1:0 ARGS...` and waits until it
    /// prints its address.
    pub fn start(dir: &Path, args: &[&str]) -> WharfProcess {
        WharfProcess::start_with(|command| {
            command
                .arg("serve")
                .arg(dir)
                .args(["--listen", "127.0.0.1:0"])
                .args(args);
        })
    }

    /// Runs the `wharf` binary with the arguments, environment and working
    /// directory `configure` gives it, and waits until it prints its address.
    /// Unless the arguments name a `--data-dir`, the host gets a temporary
    /// one, removed with the process (tests never write to the user's data
    /// directory).
    pub fn start_with(configure: impl FnOnce(&mut Command)) -> WharfProcess {
        WharfProcess::start_announcing("wharf: listening on ", configure)
    }

    /// Like [`start_with`](WharfProcess::start_with), for a command that
    /// announces its address with a line starting with `announcement`
    /// (`wharf dev` says "wharf dev: listening on ").
    pub fn start_announcing(
        announcement: &'static str,
        configure: impl FnOnce(&mut Command),
    ) -> WharfProcess {
        let mut command = Command::new(env!("CARGO_BIN_EXE_wharf"));
        command
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        configure(&mut command);
        let serves = command.get_args().next().is_some_and(|arg| arg == "serve");
        let data = (serves && !command.get_args().any(|arg| arg == "--data-dir"))
            .then(|| TempDir::new().expect("a temporary data directory"));
        if let Some(data) = &data {
            command.arg("--data-dir").arg(data.path());
        }
        let mut child = command.spawn().expect("start wharf");
        let stderr = child.stderr.take().expect("piped stderr");
        let log = Arc::new(Mutex::new(String::new()));
        let (addr_tx, addr_rx) = std::sync::mpsc::channel();
        std::thread::spawn({
            let log = log.clone();
            move || {
                for line in BufReader::new(stderr).lines() {
                    let Ok(line) = line else { break };
                    // The public listener's line (the admin one says "admin
                    // listening on").
                    if let Some(addr) = line.strip_prefix(announcement) {
                        let _ = addr_tx.send(addr.trim().to_string());
                    }
                    let mut log = log.lock().unwrap();
                    log.push_str(&line);
                    log.push('\n');
                }
            }
        });
        let base = match addr_rx.recv_timeout(Duration::from_secs(120)) {
            Ok(base) => base,
            Err(_) => {
                let _ = child.kill();
                panic!(
                    "wharf did not print its address; log:\n{}",
                    log.lock().unwrap()
                );
            }
        };
        WharfProcess {
            child,
            base,
            log,
            _data: data,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// The admin endpoint's base URL (`http://HOST:PORT`), for a process
    /// started with `--admin`.
    pub fn admin_url(&self) -> String {
        self.log()
            .lines()
            .find_map(|l| l.split("admin listening on ").nth(1).map(str::to_string))
            .expect("an admin address line: start wharf with --admin")
    }

    /// Everything the process has logged so far.
    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// Waits until the log contains a line with every one of `needles`.
    pub async fn wait_for_log_line(&self, needles: &[&str], timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            if self
                .log()
                .lines()
                .any(|line| needles.iter().all(|n| line.contains(n)))
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "no log line with {needles:?} after {timeout:?}; log:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// A `/proc/PID/status` field in KiB, e.g. `VmRSS` or `VmHWM`.
    pub fn memory_kib(&self, field: &str) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .expect("read /proc status");
        status
            .lines()
            .find_map(|line| line.strip_prefix(&format!("{field}:")))
            .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or_else(|| panic!("no {field} in /proc status"))
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends SIGTERM.
    pub fn terminate(&self) {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -TERM failed");
    }

    /// Waits for the process to exit, up to `timeout`.
    pub async fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "wharf did not exit within {timeout:?}; log:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

impl Drop for WharfProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Limits the size of any file a command (and its children) may write to
/// `bytes`, the way a full disk would: writes past it fail with "File too
/// large" (SIGXFSZ, which would kill the process instead, is ignored).
pub fn limit_file_size(command: &mut Command, bytes: u64) {
    use std::os::unix::process::CommandExt as _;
    // SAFETY: between fork and exec only async-signal-safe calls are made
    // (setrlimit and signal), and nothing is allocated.
    unsafe {
        command.pre_exec(move || {
            let limit = libc::rlimit {
                rlim_cur: bytes,
                rlim_max: bytes,
            };
            if libc::setrlimit(libc::RLIMIT_FSIZE, &limit) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
            Ok(())
        });
    }
}

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
    what: &'static str,
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
        let mut server = ServerProcess {
            what,
            command: Box::new(command),
            startup,
            child: None,
            port,
        };
        server.run();
        server
    }

    fn run(&mut self) {
        let mut command = (self.command)();
        command.stdout(Stdio::null()).stderr(Stdio::null());
        let mut child = command
            .spawn()
            .unwrap_or_else(|err| panic!("start {}: {err}", self.what));
        wait_for_port_within(self.port, self.what, &mut child, self.startup);
        self.child = Some(child);
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
    _dir: TempDir,
}

/// Where the shared broker listens, once it is up.
static SHARED_RABBIT: OnceLock<u16> = OnceLock::new();

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
        let epmd_program = server_program("epmd", "erlang-base");
        let epmd = ServerProcess::start("epmd", epmd_port, STARTUP, move || {
            let mut epmd = Command::new(&epmd_program);
            epmd.args(["-port", &epmd_port.to_string()]);
            die_with_parent(&mut epmd);
            epmd
        });
        let dir_path = dir.path().to_path_buf();
        let node = format!("wharf-test-{port}@localhost");
        let broker = ServerProcess::start(
            "rabbitmq-server",
            port,
            Duration::from_secs(120),
            move || {
                let dir = &dir_path;
                let mut broker = Command::new(&program);
                broker
                    // Run the broker in the foreground, replacing the
                    // script: the child is the Erlang VM itself.
                    .env("RUNNING_UNDER_SYSTEMD", "true")
                    .env("HOME", dir)
                    .env("RABBITMQ_NODENAME", &node)
                    .env("RABBITMQ_NODE_IP_ADDRESS", "127.0.0.1")
                    .env("RABBITMQ_NODE_PORT", port.to_string())
                    .env("RABBITMQ_DIST_PORT", dist_port.to_string())
                    .env("ERL_EPMD_PORT", epmd_port.to_string())
                    .env("RABBITMQ_MNESIA_BASE", dir.join("mnesia"))
                    .env("RABBITMQ_LOG_BASE", dir.join("log"))
                    .env("RABBITMQ_ENABLED_PLUGINS_FILE", dir.join("plugins"))
                    .env("RABBITMQ_CONFIG_FILE", dir.join("none"));
                die_with_parent(&mut broker);
                broker
            },
        );
        RabbitServer {
            broker,
            _epmd: epmd,
            _dir: dir,
        }
    }

    /// The URL of one broker the whole test binary shares (started on
    /// first use; tests on it keep to topics and groups of their own).
    pub fn shared_url() -> String {
        let port = *SHARED_RABBIT.get_or_init(|| {
            // Started on a thread that lives as long as the process, so
            // the broker lives that long too, and no longer.
            let (tx, rx) = std::sync::mpsc::channel();
            std::thread::Builder::new()
                .name("shared-rabbitmq".into())
                .spawn(move || {
                    let server = RabbitServer::start();
                    tx.send(server.port).expect("report the port");
                    loop {
                        std::thread::park();
                        let _ = &server;
                    }
                })
                .expect("spawn the rabbitmq thread");
            rx.recv().expect("the shared rabbitmq started")
        });
        amqp_url(port)
    }

    /// `amqp://guest:guest@127.0.0.1:PORT/%2f`.
    pub fn url(&self) -> String {
        amqp_url(self.port)
    }
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
    RabbitServer.broker
);

/// How long a server (but RabbitMQ) may take to start listening.
const STARTUP: Duration = Duration::from_secs(30);

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

/// Runs `hostile_path` while the neighbour `/hello` (the Rust hello) is
/// called in a loop; returns the
/// hostile status, body and duration, and asserts every neighbour call was
/// a correct 200.
pub async fn while_neighbour_answers(
    server: &TestServer,
    hostile_path: &str,
) -> (u16, String, Duration) {
    let done = Arc::new(AtomicBool::new(false));
    let neighbour = tokio::spawn({
        let url = server.url("/hello");
        let done = done.clone();
        async move {
            let client = client();
            let mut answered = 0;
            while !done.load(Ordering::Relaxed) {
                let response = client.get(&url).send().await.expect("neighbour request");
                assert_eq!(response.status(), 200, "the neighbour failed");
                let body = response.text().await.expect("neighbour body");
                assert!(body.contains("Hello from the microservice!"), "{body}");
                answered += 1;
            }
            answered
        }
    });
    let started = Instant::now();
    let response = client()
        .get(server.url(hostile_path))
        .send()
        .await
        .expect("hostile request");
    let status = response.status().as_u16();
    let body = response.text().await.unwrap_or_default();
    let elapsed = started.elapsed();
    done.store(true, Ordering::Relaxed);
    let answered = neighbour.await.expect("neighbour task");
    assert!(answered > 0, "the neighbour never got an answer");
    (status, body, elapsed)
}

/// The admin endpoint's service list (`GET ADMIN/services`).
pub async fn admin_services(admin: &str) -> serde_json::Value {
    client()
        .get(format!("{admin}/services"))
        .send()
        .await
        .expect("GET /services")
        .json()
        .await
        .expect("the service list is JSON")
}
