//! A `wharf serve` child process for benchmarks: started on a free port,
//! its address read from the "listening on" line, its log kept, killed on
//! drop.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context as _, Result, bail};

/// A running `wharf serve`.
pub struct WharfProcess {
    child: Child,
    base: String,
    /// The admin endpoint's `http://HOST:PORT`, when started with `--admin`.
    admin: Option<String>,
    log: Arc<Mutex<Vec<String>>>,
}

impl WharfProcess {
    /// Runs `wharf serve DIR --listen 127.0.0.1:0 ARGS...` and waits until it
    /// is listening (which is after every service in DIR is loaded).
    pub fn start(binary: &Path, dir: &Path, args: &[&str]) -> Result<WharfProcess> {
        let mut child = Command::new(binary)
            .arg("serve")
            .arg(dir)
            .args(["--listen", "127.0.0.1:0"])
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {}", binary.display()))?;
        let stderr = child.stderr.take().context("no stderr pipe")?;
        let log = Arc::new(Mutex::new(Vec::new()));
        let (addr_tx, addr_rx) = std::sync::mpsc::channel();
        let (admin_tx, admin_rx) = std::sync::mpsc::channel();
        std::thread::spawn({
            let log = log.clone();
            move || {
                for line in BufReader::new(stderr).lines() {
                    let Ok(line) = line else { break };
                    if let Some(addr) = line.strip_prefix("wharf: listening on ") {
                        let _ = addr_tx.send(addr.trim().to_string());
                    }
                    if let Some(addr) = line.strip_prefix("wharf: admin listening on ") {
                        let _ = admin_tx.send(addr.trim().to_string());
                    }
                    log.lock().unwrap_or_else(|e| e.into_inner()).push(line);
                }
            }
        });
        match addr_rx.recv_timeout(Duration::from_secs(600)) {
            Ok(base) => {
                // The admin line comes before the public one.
                let admin = admin_rx.try_recv().ok();
                Ok(WharfProcess {
                    child,
                    base,
                    admin,
                    log,
                })
            }
            Err(_) => {
                let _ = child.kill();
                let log = log.lock().unwrap_or_else(|e| e.into_inner()).join("\n");
                bail!("wharf did not start listening; log:\n{log}")
            }
        }
    }

    /// The process id, for reading its memory.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// `http://HOST:PORT` + `path`.
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// `http://ADMIN` + `path` (the host must run with `--admin`).
    pub fn admin_url(&self, path: &str) -> Result<String> {
        match &self.admin {
            Some(admin) => Ok(format!("{admin}{path}")),
            None => bail!("this wharf has no admin endpoint (start it with --admin)"),
        }
    }

    /// Every log line containing `needle`.
    pub fn log_lines_containing(&self, needle: &str) -> Vec<String> {
        self.log
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter(|line| line.contains(needle))
            .cloned()
            .collect()
    }

    /// The first log line containing `needle`.
    pub fn log_line_containing(&self, needle: &str) -> Option<String> {
        self.log
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .find(|line| line.contains(needle))
            .cloned()
    }
}

impl Drop for WharfProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
