//! `cargo xtask bench kv`: a counter incremented once per request, on each
//! key-value backend, beside the same endpoint in Node.js + Express with the
//! `redis` npm client (the seed's stack) and beside Wharf's own hello.
//!
//! Started side by side: a `redis-server` (and a TLS-only one, with a CA the
//! bench makes) and a `nats-server -js` of the bench's own (ephemeral ports,
//! temporary data), one Wharf host per backend (embedded, Redis, Redis over
//! TLS, NATS, and embedded with values encrypted at rest)
//! serving the `kv` test guest, whose
//! `/kv/incr?key=hits` increments one counter, plus Wharf's hello, and the
//! Express counter. Each gets the same `wrk` load, in interleaved rounds.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context as _, Result};

use crate::daemon::{Daemon, free_port, program, spawn_daemon, start_nats, wait_for, write_pki};
use crate::load::{self, Load, LoadResult};
use crate::process::WharfProcess;
use crate::{root, run, system};

fn start_redis() -> Result<(Daemon, String)> {
    let dir = tempfile::tempdir()?;
    let port = free_port()?;
    let mut command = Command::new(program("redis-server"));
    command
        .args(["--bind", "127.0.0.1", "--port", &port.to_string()])
        .args(["--save", "", "--appendonly", "no"])
        .arg("--dir")
        .arg(dir.path());
    let daemon = spawn_daemon(command, dir, port, "redis-server")?;
    Ok((daemon, format!("redis://127.0.0.1:{port}")))
}

/// The Express counter app, with its npm packages installed.
/// A TLS-only `redis-server` with the certificate in `pki` (clients need
/// no certificate of their own); its `rediss://` URL.
fn start_redis_tls(pki: &Path) -> Result<(Daemon, String)> {
    let dir = tempfile::tempdir()?;
    let port = free_port()?;
    let mut command = Command::new(program("redis-server"));
    command
        .args(["--bind", "127.0.0.1", "--port", "0"])
        .args(["--tls-port", &port.to_string()])
        .arg("--tls-cert-file")
        .arg(pki.join("server.pem"))
        .arg("--tls-key-file")
        .arg(pki.join("server-key.pem"))
        .arg("--tls-ca-cert-file")
        .arg(pki.join("ca.pem"))
        .args(["--tls-auth-clients", "no"])
        .args(["--save", "", "--appendonly", "no"])
        .arg("--dir")
        .arg(dir.path());
    let daemon = spawn_daemon(command, dir, port, "redis-server (TLS)")?;
    Ok((daemon, format!("rediss://127.0.0.1:{port}")))
}

fn express_counter() -> Result<PathBuf> {
    system::ensure(&[&system::NODE, &system::NPM])?;
    let dir = root().join("xtask").join("peers").join("express");
    if !dir.join("node_modules").join("redis").exists() {
        run(Command::new("npm")
            .current_dir(&dir)
            .args(["ci", "--no-audit", "--no-fund"]))?;
    }
    Ok(dir.join("counter.js"))
}

/// One target: a label and the URL to load.
struct Target {
    label: String,
    url: String,
    results: Vec<LoadResult>,
}

fn mean(results: &[LoadResult], f: impl Fn(&LoadResult) -> f64) -> f64 {
    results.iter().map(f).sum::<f64>() / results.len().max(1) as f64
}

/// Runs the bench and writes `kv.md` into `out_dir`.
pub fn run_bench(wharf_bin: &Path, guests: &Path, out_dir: &Path) -> Result<()> {
    load::require_wrk()?;
    system::ensure(&[&system::REDIS, &system::NATS])?;
    let express = express_counter()?;
    let (_redis, redis_url) = start_redis()?;
    let (_nats, nats_url) = start_nats()?;
    let pki = tempfile::tempdir()?;
    write_pki(pki.path())?;
    let (_redis_tls, redis_tls_url) = start_redis_tls(pki.path())?;
    let ca = pki.path().join("ca.pem").display().to_string();

    // (label, backend, values encrypted at rest, TLS to the backend). The
    // embedded store encrypted: each increment a compare-and-swap on a
    // sealed value.
    let backends = [
        ("the embedded store", "embedded".to_string(), false, false),
        ("Redis", redis_url.clone(), false, false),
        ("Redis over TLS (`rediss://`)", redis_tls_url, false, true),
        ("NATS JetStream", nats_url, false, false),
        (
            "the embedded store, encrypted (`--encryption-key`)",
            "embedded".to_string(),
            true,
            false,
        ),
    ];
    let keys = tempfile::tempdir()?;
    let key = keys.path().join("bench.key");
    std::fs::write(&key, "5a".repeat(32))?;
    let key_path = key.display().to_string();
    let mut hosts = Vec::new();
    let mut targets = Vec::new();
    for (label, backend, encrypted, tls) in &backends {
        let services = tempfile::tempdir()?;
        let data = tempfile::tempdir()?;
        std::fs::copy(guests.join("kv.wasm"), services.path().join("kv.wasm"))?;
        std::fs::copy(
            guests.join("hello.wasm"),
            services.path().join("hello.wasm"),
        )?;
        std::fs::write(
            services.path().join("kv.toml"),
            "[keyvalue]\nbuckets = [\"default\"]\n",
        )?;
        let data_path = data.path().display().to_string();
        let mut args = vec!["--log", "error", "--kv", backend, "--data-dir", &data_path];
        if *encrypted {
            args.extend(["--encryption-key", key_path.as_str()]);
        }
        if *tls {
            args.extend(["--backend-tls-ca", ca.as_str()]);
        }
        let wharf = WharfProcess::start(wharf_bin, services.path(), &args)?;
        if *label == "the embedded store" {
            targets.push(Target {
                label: "Wharf, Rust hello (no state)".into(),
                url: wharf.url("/hello"),
                results: Vec::new(),
            });
        }
        targets.push(Target {
            label: format!("Wharf, counter on {label}"),
            url: wharf.url("/kv/incr?key=hits"),
            results: Vec::new(),
        });
        hosts.push((wharf, services, data));
    }
    let port = free_port()?;
    let node = Command::new("node")
        .arg(&express)
        .arg(port.to_string())
        .arg(&redis_url)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting the Express counter")?;
    let _express = Daemon {
        children: vec![node],
        dir: tempfile::tempdir()?,
    };
    wait_for(port, "the Express counter", Duration::from_secs(30))?;
    targets.push(Target {
        label: "Node.js + Express + redis (npm)".into(),
        url: format!("http://127.0.0.1:{port}/incr"),
        results: Vec::new(),
    });

    let load = Load {
        threads: 1,
        connections: 32,
        duration: Duration::from_secs(10),
    };
    for target in &targets {
        load::run(
            &target.url,
            Load {
                duration: Duration::from_secs(2),
                ..load
            },
        )?;
    }
    const ROUNDS: usize = 3;
    for round in 1..=ROUNDS {
        eprintln!("xtask: kv round {round}/{ROUNDS}");
        for target in &mut targets {
            target.results.push(load::run(&target.url, load)?);
        }
    }

    let rps = |label: &str| {
        targets
            .iter()
            .find(|t| t.label.contains(label))
            .map_or(0.0, |t| mean(&t.results, |r| r.rps))
    };
    let mut report = String::new();
    let _ = writeln!(
        report,
        "## Key-value: a counter incremented per request, `wrk -t1 -c32 -d10s`, {ROUNDS} interleaved rounds\n"
    );
    let _ = writeln!(report, "| target | requests/s | p50 ms | p99 ms | errors |");
    let _ = writeln!(report, "| --- | --- | --- | --- | --- |");
    for target in &targets {
        let _ = writeln!(
            report,
            "| {} | {:.0} | {:.2} | {:.2} | {} |",
            target.label,
            mean(&target.results, |r| r.rps),
            mean(&target.results, |r| r.p50_ms),
            mean(&target.results, |r| r.p99_ms),
            target.results.iter().map(|r| r.errors).sum::<u64>()
        );
    }
    let express_rps = rps("Express");
    let _ = writeln!(
        report,
        "\nEmbedded counter: {:.2}x Express + Redis (goal 2x), {:.2}x Wharf's stateless hello (goal 0.5x). \
         Redis counter: {:.2}x Express + Redis. NATS counter: {:.2}x Express + Redis. \
         Encrypted embedded counter: {:.2}x the plain one.",
        rps("counter on the embedded store") / express_rps,
        rps("counter on the embedded store") / rps("hello"),
        rps("counter on Redis") / express_rps,
        rps("counter on NATS") / express_rps,
        rps("encrypted") / rps("counter on the embedded store"),
    );
    println!("{report}");
    std::fs::create_dir_all(out_dir)?;
    let out = out_dir.join("kv.md");
    std::fs::write(&out, &report)?;
    eprintln!("xtask: report written to {}", out.display());
    drop(hosts);
    Ok(())
}
