//! `cargo xtask bench reload`: how fast a replaced file is answering, with
//! and without the compiled-code cache, tiered (Winch first) and with
//! Cranelift only, and how fast a host with 100 services starts, cold and
//! warm.
//!
//! Each reload writes a variant of the guest (the same code plus a custom
//! section holding a counter, so every variant has its own digest) under a
//! dotfile name, renames it into place, and polls the service until the new
//! generation answers. The time from the rename to that first answer is the
//! reload time: it includes event delivery, debounce, reading, compiling or
//! loading from cache, the trial instantiation and the registry swap. The
//! poll sleeps 1 ms between requests for a small guest and 20 ms for a large
//! one, which is the resolution of the times.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};

use crate::process::WharfProcess;
use crate::stats::Summary;

/// Reloads per measured series for a small guest.
const RELOADS: usize = 50;
/// Reloads per series for a large guest (one fresh compile takes seconds).
const LARGE_RELOADS: usize = 10;
/// Poll interval for a small guest: the resolution of its reload times.
const SMALL_POLL: Duration = Duration::from_millis(1);
/// Poll interval for a large guest, whose reloads take seconds.
const LARGE_POLL: Duration = Duration::from_millis(20);
/// A guest above this size is measured with [`LARGE_RELOADS`].
const LARGE: usize = 4 << 20;
/// Services in the startup measurement.
const STARTUP_SERVICES: usize = 100;

/// Appends a custom section named `wharf-bench` holding `n`: a different
/// digest, identical behaviour.
pub fn variant(component: &[u8], n: u64) -> Vec<u8> {
    fn leb128(mut value: u64, out: &mut Vec<u8>) {
        loop {
            let byte = (value & 0x7f) as u8;
            value >>= 7;
            if value == 0 {
                out.push(byte);
                return;
            }
            out.push(byte | 0x80);
        }
    }
    let name = b"wharf-bench";
    let mut payload = Vec::new();
    leb128(name.len() as u64, &mut payload);
    payload.extend_from_slice(name);
    payload.extend_from_slice(&n.to_le_bytes());
    let mut bytes = component.to_vec();
    bytes.push(0); // custom section id
    leb128(payload.len() as u64, &mut bytes);
    bytes.extend_from_slice(&payload);
    bytes
}

/// Writes `bytes` as `dir/file` by rename, returning the instant of the rename.
fn install(dir: &Path, file: &str, bytes: &[u8]) -> Result<Instant> {
    let temp = dir.join(format!(".{file}.tmp"));
    std::fs::write(&temp, bytes).with_context(|| format!("writing {}", temp.display()))?;
    let at = Instant::now();
    std::fs::rename(&temp, dir.join(file)).context("renaming into place")?;
    Ok(at)
}

fn generation(agent: &ureq::Agent, url: &str) -> Option<u64> {
    let response = agent.get(url).call().ok()?;
    response
        .headers()
        .get("x-wharf-generation")?
        .to_str()
        .ok()?
        .parse()
        .ok()
}

/// Polls until `url` answers with generation `want`; the time since `since`.
/// Each poll the old version answers costs it a request: `every` must leave
/// the compile its CPU (a JavaScript hello takes about 1 ms of CPU per fresh
/// instance, so polling it every millisecond took a core from the compile).
fn wait_for_generation(
    agent: &ureq::Agent,
    url: &str,
    want: u64,
    since: Instant,
    every: Duration,
) -> Result<Duration> {
    let deadline = since + Duration::from_secs(120);
    loop {
        if generation(agent, url) == Some(want) {
            return Ok(since.elapsed());
        }
        if Instant::now() > deadline {
            bail!("generation {want} never answered at {url}");
        }
        std::thread::sleep(every);
    }
}

/// Waits until the log says generation `generation` of the service runs
/// optimised code (or times out).
fn wait_for_optimised(wharf: &WharfProcess, generation: u64) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(300);
    let needle = format!("generation={generation} ");
    while Instant::now() < deadline {
        if wharf
            .log_lines_containing("event=\"optimise\"")
            .iter()
            .any(|line| line.contains(&needle))
        {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    bail!("generation {generation} was never optimised")
}

/// Reload series for one guest on a cold cache, compiled tiered (Winch
/// first, measured to the first answer of Winch code; the next reload
/// waits for Cranelift's code to take over, as deploys spaced in time do)
/// and with Cranelift only; then the same variants from the cache.
fn reload_series(wharf_bin: &Path, guest: &Path, label: &str, report: &mut String) -> Result<()> {
    let component = std::fs::read(guest).with_context(|| format!("reading {}", guest.display()))?;
    let (reloads, every) = if component.len() > LARGE {
        (LARGE_RELOADS, LARGE_POLL)
    } else {
        (RELOADS, SMALL_POLL)
    };
    let size = component.len() as f64 / 1024.0;
    for tiers in ["tiered", "cranelift"] {
        let services = tempfile::tempdir()?;
        let cache = tempfile::tempdir()?;
        install(services.path(), "svc.wasm", &variant(&component, 0))?;
        let cache_arg = cache.path().display().to_string();
        let wharf = WharfProcess::start(
            wharf_bin,
            services.path(),
            &[
                "--cache-dir",
                &cache_arg,
                "--tiers",
                tiers,
                "--log",
                "warn,wharf::deploy=info",
            ],
        )?;
        let url = wharf.url("/svc");
        let agent = ureq::Agent::new_with_defaults();
        wait_for_generation(&agent, &url, 1, Instant::now(), every)?;
        let tiered = tiers == "tiered";
        let mut generation = 1;
        let mut fresh = Vec::new();
        let mut cached = Vec::new();
        // The tiered host's cache holds what it optimised; the cache pass
        // is measured on the Cranelift-only host.
        let passes: Vec<&mut Vec<Duration>> = if tiered {
            vec![&mut fresh]
        } else {
            vec![&mut fresh, &mut cached]
        };
        for pass in passes {
            for n in 1..=reloads as u64 {
                if tiered {
                    wait_for_optimised(&wharf, generation)?;
                }
                let at = install(services.path(), "svc.wasm", &variant(&component, n))?;
                generation += 1;
                pass.push(wait_for_generation(&agent, &url, generation, at, every)?);
            }
        }
        let mut rows = vec![(format!("cold cache, {tiers}"), Summary::of(&fresh))];
        if !tiered {
            rows.push(("from the cache".to_string(), Summary::of(&cached)));
        }
        for (mode, summary) in rows {
            let _ = writeln!(
                report,
                "| {label} ({size:.0} KiB) | {mode} | {reloads} | {:.1} | {:.1} | {:.1} |",
                summary.p50_ms(),
                summary.p99_ms(),
                summary.max_ms()
            );
        }
        drop(wharf);
    }
    Ok(())
}

/// Time from process start to "listening" with `count` distinct services.
fn startup(wharf_bin: &Path, guest: &Path, report: &mut String) -> Result<()> {
    let component = std::fs::read(guest)?;
    let services = tempfile::tempdir()?;
    let cache = tempfile::tempdir()?;
    for n in 0..STARTUP_SERVICES {
        std::fs::write(
            services.path().join(format!("s{n:03}.wasm")),
            variant(&component, 1000 + n as u64),
        )?;
    }
    let cache_arg = cache.path().display().to_string();
    for mode in ["cold cache", "warm cache"] {
        let started = Instant::now();
        let wharf = WharfProcess::start(wharf_bin, services.path(), &["--cache-dir", &cache_arg])?;
        let ready = started.elapsed();
        let loaded = wharf
            .log_line_containing("services loaded")
            .and_then(|line| field(&line, "elapsed_ms"))
            .unwrap_or_default();
        let deployed = wharf
            .log_line_containing("services loaded")
            .and_then(|line| field(&line, "deployed"))
            .unwrap_or_default();
        let _ = writeln!(
            report,
            "| {STARTUP_SERVICES} services | {mode} | {deployed} deployed | {loaded} ms | {:.0} ms |",
            ready.as_secs_f64() * 1000.0
        );
        // Tiered: the cache fills as Cranelift's code replaces Winch's.
        let deadline = Instant::now() + Duration::from_secs(600);
        while wharf.log_lines_containing("event=\"optimise\"").len() < STARTUP_SERVICES
            && mode == "cold cache"
        {
            if Instant::now() > deadline {
                bail!("the services were never all optimised");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        drop(wharf);
    }
    Ok(())
}

fn field(line: &str, name: &str) -> Option<String> {
    let at = line.find(&format!("{name}="))? + name.len() + 1;
    Some(line[at..].split_whitespace().next()?.to_string())
}

/// Runs the reload benchmark over `guests` (label, path) and writes the
/// report to `out`.
pub fn run(wharf_bin: &Path, guests: &[(String, PathBuf)], out: &Path) -> Result<()> {
    let mut report = String::new();
    let _ = writeln!(
        report,
        "## Reload: rename into place → first answer from the new version\n"
    );
    let _ = writeln!(
        report,
        "| guest | mode | reloads | p50 ms | p99 ms | max ms |"
    );
    let _ = writeln!(report, "| --- | --- | --- | --- | --- | --- |");
    for (label, path) in guests {
        reload_series(wharf_bin, path, label, &mut report)?;
    }
    let _ = writeln!(
        report,
        "\n## Start: process start → listening, all services loaded\n"
    );
    let _ = writeln!(
        report,
        "| services | cache | result | load (host's own count) | start to listening |"
    );
    let _ = writeln!(report, "| --- | --- | --- | --- | --- |");
    startup(wharf_bin, &guests[0].1, &mut report)?;
    println!("{report}");
    std::fs::create_dir_all(out.parent().unwrap_or(Path::new(".")))?;
    std::fs::write(out, &report).with_context(|| format!("writing {}", out.display()))?;
    eprintln!("xtask: report written to {}", out.display());
    Ok(())
}
