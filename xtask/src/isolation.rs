//! `cargo xtask bench isolation [--wharf BINARY]`: what a misbehaving
//! neighbour costs a well-behaved service. The hello service is loaded with
//! wrk alone, then while other clients keep 2 or 64 busy-looping requests
//! (CPU until their deadline) or 2 memory-bombing ones (grow to the cap,
//! trap) running against a hostile service on the same host. Rounds are
//! interleaved. `--wharf` measures another build (an older one, say) with
//! the same load.

use std::fmt::Write as _;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Result;

use crate::load::{self, Load, LoadResult};
use crate::process::WharfProcess;

const ROUNDS: usize = 3;

/// The noisy rounds: a label, the hostile path, and how many requests to it
/// are kept running at once.
const NEIGHBOURS: &[(&str, &str, usize)] = &[
    (
        "2 busy loops (CPU until their 2 s deadline)",
        "/hostile/busy-loop",
        2,
    ),
    ("64 busy loops", "/hostile/busy-loop", 64),
    (
        "2 memory bombs (128 MiB, then a trap)",
        "/hostile/memory-bomb",
        2,
    ),
];

/// Keeps `clients` requests to `url` running until dropped.
struct Noise {
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Noise {
    fn start(url: &str, clients: usize) -> Noise {
        let stop = Arc::new(AtomicBool::new(false));
        let threads = (0..clients)
            .map(|_| {
                let (url, stop) = (url.to_string(), stop.clone());
                std::thread::spawn(move || {
                    let agent: ureq::Agent = ureq::Agent::config_builder()
                        .http_status_as_error(false)
                        .timeout_global(Some(Duration::from_secs(30)))
                        .build()
                        .into();
                    while !stop.load(Ordering::Relaxed) {
                        let _ = agent.get(&url).call();
                    }
                })
            })
            .collect();
        Noise { stop, threads }
    }
}

impl Drop for Noise {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

fn mean(results: &[LoadResult], f: impl Fn(&LoadResult) -> f64) -> f64 {
    results.iter().map(f).sum::<f64>() / results.len().max(1) as f64
}

/// Runs the isolation benchmark and writes the report to `out`.
pub fn run(wharf_bin: &Path, guests: &Path, out: &Path) -> Result<()> {
    load::require_wrk()?;
    let dir = tempfile::tempdir()?;
    std::fs::copy(guests.join("hello.wasm"), dir.path().join("hello.wasm"))?;
    std::fs::copy(guests.join("hostile.wasm"), dir.path().join("hostile.wasm"))?;
    std::fs::write(
        dir.path().join("hostile.toml"),
        "[limits]\ntimeout = \"2s\"\nmemory = \"128MiB\"\n",
    )?;
    let data = tempfile::tempdir()?;
    let mut args = vec!["--log".to_string(), "error".to_string()];
    if supports_data_dir(wharf_bin) {
        args.push("--data-dir".to_string());
        args.push(data.path().display().to_string());
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let wharf = WharfProcess::start(wharf_bin, dir.path(), &args)?;
    let hello = wharf.url("/hello");
    let load = Load {
        threads: 1,
        connections: 32,
        duration: Duration::from_secs(10),
    };
    load::run(
        &hello,
        Load {
            duration: Duration::from_secs(3),
            ..load
        },
    )?;

    let mut alone = Vec::new();
    let mut noisy: Vec<Vec<LoadResult>> = vec![Vec::new(); NEIGHBOURS.len()];
    for round in 1..=ROUNDS {
        eprintln!("xtask: isolation round {round}/{ROUNDS}");
        let result = load::run(&hello, load)?;
        eprintln!(
            "xtask:   none: {:.0}/s p99 {:.1} ms",
            result.rps, result.p99_ms
        );
        alone.push(result);
        for (results, (label, path, clients)) in noisy.iter_mut().zip(NEIGHBOURS) {
            let _noise = Noise::start(&wharf.url(path), *clients);
            std::thread::sleep(Duration::from_millis(500));
            let result = load::run(&hello, load)?;
            eprintln!(
                "xtask:   {label}: {:.0}/s p99 {:.1} ms",
                result.rps, result.p99_ms
            );
            results.push(result);
        }
    }

    let base = mean(&alone, |r| r.rps);
    let mut report = String::new();
    let _ = writeln!(
        report,
        "## Isolation: hello under `wrk -t1 -c32 -d10s`, {ROUNDS} interleaved rounds, hostile requests always running beside it\n\nBinary: `{}`\n",
        wharf_bin.display()
    );
    let _ = writeln!(
        report,
        "| neighbour | requests/s | vs alone | p50 ms | p99 ms | errors |"
    );
    let _ = writeln!(report, "| --- | --- | --- | --- | --- | --- |");
    let rows = std::iter::once(("none", &alone)).chain(
        NEIGHBOURS
            .iter()
            .map(|(label, _, _)| *label)
            .zip(noisy.iter()),
    );
    for (label, results) in rows {
        let rps = mean(results, |r| r.rps);
        let _ = writeln!(
            report,
            "| {label} | {rps:.0} | {:.2} | {:.2} | {:.2} | {} |",
            rps / base,
            mean(results, |r| r.p50_ms),
            mean(results, |r| r.p99_ms),
            results.iter().map(|r| r.errors).sum::<u64>()
        );
    }
    println!("{report}");
    std::fs::create_dir_all(out.parent().unwrap_or(Path::new(".")))?;
    std::fs::write(out, &report)?;
    eprintln!("xtask: report written to {}", out.display());
    Ok(())
}

/// Whether `wharf_bin` knows `--data-dir` (older builds do not).
fn supports_data_dir(wharf_bin: &Path) -> bool {
    std::process::Command::new(wharf_bin)
        .args(["serve", "--help"])
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("--data-dir"))
}
