//! `cargo xtask bench http`: Wharf against its peers on the same work, in
//! one run. Started side by side:
//!
//! - Wharf (release build) serving the Rust and JavaScript hello services,
//!   one fresh instance per request and, as separate services, with
//!   `[instance] reuse = 128`; and the Rust hello built for WASI 0.3
//!   (`guests/hello-p3`), fresh and with `reuse = 128, concurrent = 16`.
//!   One host serves the Rust services, one the JavaScript ones from
//!   Cranelift's code and one from Winch's (`--tiers winch`), so each
//!   row's peak memory is its own host's;
//! - `wasmtime serve` 48.0.8 on the same components, default and with
//!   `--max-instance-reuse-count 128` (installed with `cargo install` into
//!   `target/bench/tools` if missing); for the 0.3 hello, with the same
//!   reuse and concurrency as Wharf's two 0.3 targets;
//! - the classic Express app (npm) serving the same JSON;
//! - a bare hyper server, the ceiling of this HTTP stack.
//!
//! Each target gets the same `wrk` load; rounds are interleaved so slow
//! drift on the machine hits every target alike. The report (markdown table
//! and SVG chart) goes to `target/bench/`.

use std::fmt::Write as _;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use anyhow::{Context as _, Result, bail};

use crate::guests::Built;
use crate::load::{self, Load, LoadResult};
use crate::{cargo, root, run};

/// wasmtime-cli version compared against (Wharf's wasmtime).
const WASMTIME_VERSION: &str = "48.0.8";
/// Requests one instance serves in the reuse modes.
const REUSE: u32 = 128;
/// Requests one instance of a WASI 0.3 service serves at once in the
/// concurrent mode (`wasmtime serve`'s and Spin's default for 0.3).
const CONCURRENT: u32 = 16;

/// A server process under test.
struct Server {
    child: Child,
    url: String,
}

impl Server {
    /// Starts `command`, waits for an `http://HOST:PORT` address in its
    /// output, and remembers `path` as what to load.
    fn start(label: &str, mut command: Command, path: &str) -> Result<Server> {
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {label}: {command:?}"))?;
        let (tx, rx) = mpsc::channel();
        for pipe in [
            child
                .stdout
                .take()
                .map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
            child
                .stderr
                .take()
                .map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
        ]
        .into_iter()
        .flatten()
        {
            let tx = tx.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                    if let Some(at) = line.find("http://") {
                        let rest = &line[at..];
                        let end = rest[7..]
                            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '.' || c == ':'))
                            .map_or(rest.len(), |e| e + 7);
                        let _ = tx.send(rest[..end].to_string());
                    }
                }
            });
        }
        let base = match rx.recv_timeout(Duration::from_secs(600)) {
            Ok(base) => base.replace("0.0.0.0", "127.0.0.1"),
            Err(_) => {
                let _ = child.kill();
                bail!("{label} did not print an http:// address");
            }
        };
        Ok(Server {
            child,
            url: format!("{base}{path}"),
        })
    }

    /// Peak resident memory so far (VmHWM), in MiB.
    fn peak_rss_mib(&self) -> f64 {
        status_kib(self.child.id(), "VmHWM") as f64 / 1024.0
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A `/proc/PID/status` field in KiB (0 if unreadable).
pub fn status_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|status| {
            status.lines().find_map(|line| {
                line.strip_prefix(&format!("{field}:"))
                    .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            })
        })
        .unwrap_or(0)
}

/// The `wasmtime` binary, installed into `target/bench/tools` if missing.
fn wasmtime_cli() -> Result<PathBuf> {
    let tools = root().join("target").join("bench").join("tools");
    let binary = tools.join("bin").join("wasmtime");
    let installed = Command::new(&binary)
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains(WASMTIME_VERSION))
        .unwrap_or(false);
    if !installed {
        eprintln!("xtask: installing wasmtime-cli {WASMTIME_VERSION} (once; takes a while)");
        run(cargo()
            .args([
                "install",
                "wasmtime-cli",
                "--locked",
                "--version",
                WASMTIME_VERSION,
                "--root",
            ])
            .arg(&tools))?;
    }
    Ok(binary)
}

fn express_app() -> Result<PathBuf> {
    crate::system::ensure(&[&crate::system::NODE, &crate::system::NPM])?;
    let express = root().join("xtask").join("peers").join("express");
    if !express.join("node_modules").join("express").exists() {
        run(Command::new("npm")
            .current_dir(&express)
            .args(["ci", "--no-audit", "--no-fund"]))?;
    }
    Ok(express.join("app.js"))
}

fn hyper_hello() -> Result<PathBuf> {
    run(cargo()
        .current_dir(root())
        .args(["build", "--release", "--package", "hyper-hello"]))?;
    Ok(root().join("target").join("release").join("hyper-hello"))
}

/// Which targets to run.
#[derive(Debug, Clone, Copy)]
pub struct Options {
    /// Interleaved rounds.
    pub rounds: usize,
    /// Load per round and target.
    pub load: Load,
    /// Include the JavaScript targets.
    pub js: bool,
}

/// Results of one target over all rounds.
struct Series {
    label: String,
    results: Vec<LoadResult>,
    peak_rss_mib: f64,
}

impl Series {
    fn mean(&self, f: impl Fn(&LoadResult) -> f64) -> f64 {
        self.results.iter().map(f).sum::<f64>() / self.results.len().max(1) as f64
    }
}

/// Adds `server` to the processes under test; its index there.
fn keep(processes: &mut Vec<Server>, server: Server) -> usize {
    processes.push(server);
    processes.len() - 1
}

/// Runs the comparison and writes `http.md` and `http.svg` into `out_dir`.
pub fn run_bench(wharf_bin: &Path, built: &Built, options: Options, out_dir: &Path) -> Result<()> {
    load::require_wrk()?;
    let wasmtime = wasmtime_cli()?;
    let express = express_app()?;
    let hyper = hyper_hello()?;

    let rust_hello = built.rust.join("hello.wasm");
    let js_hello = built.js.join("hello.wasm");
    // The fetch-event hello fails on a reused instance (StarlingMonkey
    // #247); the reuse modes run the same service written as an exported
    // wasi:http handler.
    let js_handler = built.js.join("hello-handler.wasm");
    // Builds, stringifies, parses and filters a 2.4 KB order per request.
    let js_order = built.js.join("order-handler.wasm");
    let p3_hello = built.rust.join("hello_p3.wasm");
    let reuse = format!("[instance]\nreuse = {REUSE}\n");
    let cache = root().join("target").join("bench").join("cache");
    // One Wharf host for the Rust services and one per JavaScript tier, so
    // each reports its own peak memory. `--tiers` is explicit: the
    // Cranelift rows must never measure Winch code still being optimised.
    let wharf_host = |label: &str,
                      tiers: &str,
                      log: &str,
                      services: &[(&str, &Path, Option<String>)]|
     -> Result<(Server, tempfile::TempDir)> {
        let dir = tempfile::tempdir()?;
        for (name, component, manifest) in services {
            std::fs::copy(component, dir.path().join(format!("{name}.wasm")))?;
            if let Some(manifest) = manifest {
                std::fs::write(dir.path().join(format!("{name}.toml")), manifest)?;
            }
        }
        let mut command = Command::new(wharf_bin);
        command
            .arg("serve")
            .arg(dir.path())
            .args(["--listen", "127.0.0.1:0", "--log", log, "--tiers", tiers])
            .arg("--cache-dir")
            .arg(&cache);
        Ok((Server::start(label, command, "")?, dir))
    };
    // `reuse` and `concurrent` are passed explicitly: wasmtime serve's
    // defaults differ between WASI 0.2 (1, 1) and 0.3 (128, 16).
    let wasmtime_serve = |label: &str, component: &Path, reuse: u32, concurrent: u32| {
        let mut command = Command::new(&wasmtime);
        command.args(["serve", "--addr", "127.0.0.1:0", "-Scli"]);
        command.arg(format!("--max-instance-reuse-count={reuse}"));
        command.arg(format!(
            "--max-instance-concurrent-reuse-count={concurrent}"
        ));
        command.arg(component);
        Server::start(label, command, "/")
    };

    // The processes under test, and (label, URL, index of its process) in
    // the order they are measured each round.
    let mut processes: Vec<Server> = Vec::new();
    let mut dirs = Vec::new();
    let mut targets: Vec<(String, String, usize)> = Vec::new();
    let (rust_host, dir) = wharf_host(
        "wharf",
        "cranelift",
        "warn",
        &[
            ("hello", &rust_hello, None),
            ("hello-reuse", &rust_hello, Some(reuse.clone())),
            ("p3", &p3_hello, None),
            (
                "p3-shared",
                &p3_hello,
                Some(format!("{reuse}concurrent = {CONCURRENT}\n")),
            ),
        ],
    )?;
    dirs.push(dir);
    let base = rust_host.url.clone();
    let rust_index = keep(&mut processes, rust_host);
    for (label, path) in [
        ("Wharf, Rust hello", "/hello"),
        ("Wharf, Rust hello, reuse 128", "/hello-reuse"),
        ("Wharf, Rust 0.3 hello", "/p3"),
        (
            "Wharf, Rust 0.3 hello, reuse 128, concurrent 16",
            "/p3-shared",
        ),
    ] {
        targets.push((label.to_string(), format!("{base}{path}"), rust_index));
    }
    // The same hello on a host with its default log: one access line per
    // request, written to a pipe as a service manager would read it.
    let (logged_host, dir) = wharf_host(
        "wharf-logged",
        "cranelift",
        "info",
        &[("hello", &rust_hello, None)],
    )?;
    dirs.push(dir);
    let base = logged_host.url.clone();
    let logged_index = keep(&mut processes, logged_host);
    targets.push((
        "Wharf, Rust hello, default log (access lines)".to_string(),
        format!("{base}/hello"),
        logged_index,
    ));
    if options.js {
        for (tiers, tier_label) in [("cranelift", "Cranelift"), ("winch", "Winch")] {
            let (host, dir) = wharf_host(
                &format!("wharf-js-{tiers}"),
                tiers,
                "warn",
                &[
                    ("js", &js_hello, None),
                    ("js-reuse", &js_handler, Some(reuse.clone())),
                    ("js-order", &js_order, Some(reuse.clone())),
                ],
            )?;
            dirs.push(dir);
            let base = host.url.clone();
            let index = keep(&mut processes, host);
            targets.push((
                format!("Wharf, JS hello, {tier_label}"),
                format!("{base}/js"),
                index,
            ));
            targets.push((
                format!("Wharf, JS hello (handler), reuse 128, {tier_label}"),
                format!("{base}/js-reuse"),
                index,
            ));
            targets.push((
                format!("Wharf, JS JSON order (handler), reuse 128, {tier_label}"),
                format!("{base}/js-order/order"),
                index,
            ));
        }
    }
    let mut peers: Vec<(String, Server)> = vec![
        (
            "wasmtime serve, Rust hello".to_string(),
            wasmtime_serve("wasmtime", &rust_hello, 1, 1)?,
        ),
        (
            "wasmtime serve, Rust hello, reuse 128".to_string(),
            wasmtime_serve("wasmtime-reuse", &rust_hello, REUSE, 1)?,
        ),
        (
            "wasmtime serve, Rust 0.3 hello".to_string(),
            wasmtime_serve("wasmtime-p3", &p3_hello, 1, 1)?,
        ),
        (
            "wasmtime serve, Rust 0.3 hello, reuse 128, concurrent 16".to_string(),
            wasmtime_serve("wasmtime-p3-shared", &p3_hello, REUSE, CONCURRENT)?,
        ),
    ];
    if options.js {
        peers.push((
            "wasmtime serve, JS hello".to_string(),
            wasmtime_serve("wasmtime-js", &js_hello, 1, 1)?,
        ));
        peers.push((
            "wasmtime serve, JS hello (handler), reuse 128".to_string(),
            wasmtime_serve("wasmtime-js-reuse", &js_handler, REUSE, 1)?,
        ));
        let mut order = wasmtime_serve("wasmtime-js-order", &js_order, REUSE, 1)?;
        order.url.push_str("order");
        peers.push((
            "wasmtime serve, JS JSON order (handler), reuse 128".to_string(),
            order,
        ));
    }
    let mut node = Command::new("node");
    node.arg(&express).arg("0");
    peers.push((
        "Node.js + Express".to_string(),
        Server::start("express", node, "/hello")?,
    ));
    if options.js {
        let mut node = Command::new("node");
        node.arg(&express).arg("0");
        peers.push((
            "Node.js + Express, JSON order".to_string(),
            Server::start("express-order", node, "/order")?,
        ));
    }
    let mut bare = Command::new(&hyper);
    bare.arg("127.0.0.1:0");
    peers.push((
        "bare hyper".to_string(),
        Server::start("hyper", bare, "/hello")?,
    ));
    for (label, server) in peers {
        let url = server.url.clone();
        targets.push((label, url, keep(&mut processes, server)));
    }

    let mut series: Vec<Series> = targets
        .iter()
        .map(|(label, ..)| Series {
            label: label.clone(),
            results: Vec::new(),
            peak_rss_mib: 0.0,
        })
        .collect();
    // Every target must answer its URL with 200 before it is measured: a
    // 404 served fast is not the same work.
    let agent = ureq::Agent::new_with_defaults();
    for (label, url, _) in &targets {
        let status = agent
            .get(url)
            .call()
            .map(|response| response.status().as_u16())
            .with_context(|| format!("{label}: GET {url}"))?;
        if status != 200 {
            bail!("{label}: GET {url} answered {status}, not 200");
        }
    }
    let warm = Load {
        duration: Duration::from_secs(2),
        ..options.load
    };
    for (_, url, _) in &targets {
        load::run(url, warm)?;
    }
    for round in 1..=options.rounds {
        for ((label, url, _), series) in targets.iter().zip(series.iter_mut()) {
            eprintln!("xtask: round {round}/{}: {label}", options.rounds);
            series.results.push(load::run(url, options.load)?);
        }
    }
    for ((_, _, process), series) in targets.iter().zip(series.iter_mut()) {
        series.peak_rss_mib = processes[*process].peak_rss_mib();
    }
    let idle = idle_memory(wharf_bin, &rust_hello, &express, &cache)?;
    write_report(&series, options, &idle, out_dir)
}

/// Idle memory: one Wharf host with 100 hello services against 10 Express
/// processes (the same 100 services would need 100).
struct Idle {
    wharf_mib: f64,
    express_mib: f64,
}

fn idle_memory(wharf_bin: &Path, hello: &Path, express: &Path, cache: &Path) -> Result<Idle> {
    let services = tempfile::tempdir()?;
    let bytes = std::fs::read(hello)?;
    for n in 0..100 {
        std::fs::write(services.path().join(format!("s{n:03}.wasm")), &bytes)?;
    }
    let mut command = Command::new(wharf_bin);
    command
        .arg("serve")
        .arg(services.path())
        .args(["--listen", "127.0.0.1:0", "--log", "warn", "--cache-dir"])
        .arg(cache);
    let wharf = Server::start("wharf-100", command, "/s000")?;
    let agent = ureq::Agent::new_with_defaults();
    for n in 0..100 {
        let _ = agent
            .get(wharf.url.replace("/s000", &format!("/s{n:03}")))
            .call();
    }
    std::thread::sleep(Duration::from_secs(1));
    let wharf_mib = status_kib(wharf.child.id(), "VmRSS") as f64 / 1024.0;
    let mut expresses = Vec::new();
    for n in 0..10 {
        let mut node = Command::new("node");
        node.arg(express).arg("0");
        expresses.push(Server::start(&format!("express-{n}"), node, "/hello")?);
    }
    for server in &expresses {
        let _ = agent.get(&server.url).call();
    }
    std::thread::sleep(Duration::from_secs(1));
    let express_mib = expresses
        .iter()
        .map(|s| status_kib(s.child.id(), "VmRSS") as f64 / 1024.0)
        .sum();
    Ok(Idle {
        wharf_mib,
        express_mib,
    })
}

/// The machine, for reports: CPU model and count.
pub fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines().find_map(|l| {
                l.strip_prefix("model name")
                    .map(|m| m.trim_start_matches([' ', '\t', ':']).to_string())
            })
        })
        .unwrap_or_else(|| "unknown CPU".to_string());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    format!("{cores} cores ({cpu}), Linux {}", kernel.trim())
}

fn write_report(series: &[Series], options: Options, idle: &Idle, out_dir: &Path) -> Result<()> {
    let find = |label: &str| series.iter().find(|s| s.label == label);
    let mut md = String::new();
    let _ = writeln!(
        md,
        "## HTTP: `wrk -t{} -c{} -d{}s`, {} interleaved rounds, hello JSON\n\nMachine: {}. Wharf with `--log warn` (no access log) unless the row says \"default log\".\n",
        options.load.threads,
        options.load.connections,
        options.load.duration.as_secs(),
        options.rounds,
        machine()
    );
    let _ = writeln!(
        md,
        "| target | requests/s | p50 ms | p99 ms | peak RSS MiB | errors |"
    );
    let _ = writeln!(md, "| --- | --- | --- | --- | --- | --- |");
    for s in series {
        let _ = writeln!(
            md,
            "| {} | {:.0} | {:.2} | {:.2} | {:.0} | {} |",
            s.label,
            s.mean(|r| r.rps),
            s.mean(|r| r.p50_ms),
            s.mean(|r| r.p99_ms),
            s.peak_rss_mib,
            s.results.iter().map(|r| r.errors).sum::<u64>()
        );
    }
    let _ = writeln!(
        md,
        "\n### Ratios\n\n| Wharf | peer | requests/s ratio | p99 Wharf / peer |\n| --- | --- | --- | --- |"
    );
    let pairs = [
        ("Wharf, Rust hello", "wasmtime serve, Rust hello"),
        ("Wharf, Rust hello", "Node.js + Express"),
        ("Wharf, Rust hello", "bare hyper"),
        (
            "Wharf, Rust hello, reuse 128",
            "wasmtime serve, Rust hello, reuse 128",
        ),
        ("Wharf, Rust 0.3 hello", "wasmtime serve, Rust 0.3 hello"),
        (
            "Wharf, Rust 0.3 hello, reuse 128, concurrent 16",
            "wasmtime serve, Rust 0.3 hello, reuse 128, concurrent 16",
        ),
        (
            "Wharf, Rust 0.3 hello, reuse 128, concurrent 16",
            "Wharf, Rust hello",
        ),
        ("Wharf, JS hello, Cranelift", "wasmtime serve, JS hello"),
        ("Wharf, JS hello, Cranelift", "Node.js + Express"),
        (
            "Wharf, JS hello (handler), reuse 128, Cranelift",
            "wasmtime serve, JS hello (handler), reuse 128",
        ),
        (
            "Wharf, JS hello (handler), reuse 128, Cranelift",
            "Node.js + Express",
        ),
        (
            "Wharf, JS JSON order (handler), reuse 128, Cranelift",
            "wasmtime serve, JS JSON order (handler), reuse 128",
        ),
        (
            "Wharf, JS JSON order (handler), reuse 128, Cranelift",
            "Node.js + Express, JSON order",
        ),
        (
            "Wharf, Rust hello, default log (access lines)",
            "Wharf, Rust hello",
        ),
        (
            "Wharf, Rust hello, default log (access lines)",
            "bare hyper",
        ),
        ("Wharf, JS hello, Winch", "Wharf, JS hello, Cranelift"),
        (
            "Wharf, JS hello (handler), reuse 128, Winch",
            "Wharf, JS hello (handler), reuse 128, Cranelift",
        ),
    ];
    for (ours, theirs) in pairs {
        if let (Some(a), Some(b)) = (find(ours), find(theirs)) {
            let _ = writeln!(
                md,
                "| {ours} | {theirs} | {:.2}× | {:.2} / {:.2} ms |",
                a.mean(|r| r.rps) / b.mean(|r| r.rps),
                a.mean(|r| r.p99_ms),
                b.mean(|r| r.p99_ms)
            );
        }
    }
    let _ = writeln!(
        md,
        "\n### Idle memory\n\nOne Wharf host with 100 hello services deployed (each called once): {:.0} MiB RSS. Ten Express processes: {:.0} MiB RSS in total.",
        idle.wharf_mib, idle.express_mib
    );
    println!("{md}");
    std::fs::create_dir_all(out_dir)?;
    std::fs::write(out_dir.join("http.md"), &md)?;
    std::fs::write(out_dir.join("http.svg"), svg_chart(series))?;
    eprintln!(
        "xtask: report written to {}",
        out_dir.join("http.md").display()
    );
    Ok(())
}

/// A horizontal bar chart of requests per second.
fn svg_chart(series: &[Series]) -> String {
    let max = series.iter().map(|s| s.mean(|r| r.rps)).fold(1.0, f64::max);
    let (row, label_width, bar_width) = (26.0, 300.0, 420.0);
    let height = 40.0 + row * series.len() as f64;
    let mut svg = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{}\" height=\"{height}\" font-family=\"sans-serif\" font-size=\"12\">\n<text x=\"10\" y=\"20\" font-size=\"14\">requests/s (higher is better)</text>\n",
        label_width + bar_width + 90.0
    );
    for (i, s) in series.iter().enumerate() {
        let rps = s.mean(|r| r.rps);
        let y = 34.0 + row * i as f64;
        let width = bar_width * rps / max;
        let colour = if s.label.starts_with("Wharf") {
            "#2b6cb0"
        } else {
            "#a0aec0"
        };
        let _ = writeln!(
            svg,
            "<text x=\"10\" y=\"{:.0}\">{}</text><rect x=\"{label_width}\" y=\"{y:.0}\" width=\"{width:.1}\" height=\"18\" fill=\"{colour}\"/><text x=\"{:.1}\" y=\"{:.0}\">{rps:.0}</text>",
            y + 13.0,
            s.label,
            label_width + width + 6.0,
            y + 13.0
        );
    }
    svg.push_str("</svg>\n");
    svg
}
