//! Hosts under test: a temporary services directory, an in-process host on
//! an ephemeral port, and the `wharf` binary as a child process.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tempfile::TempDir;
use tokio::sync::oneshot;
use wharf::Tiers;
use wharf::{Config, Host};

use super::guests::{guest_bytes, guest_in};

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
        super::send_signal(self.child.id(), "TERM");
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
