//! `cargo xtask bench density`: many services on one host. For each count
//! (1,000 and 10,000 by default) a services directory of that many copies
//! of the Rust hello (hard links of one 83 KB component, as a fleet of small
//! services built from one template would be) is served by a release
//! `wharf serve` with the default settings and `--log warn`:
//!
//! - **ready**: from the process's start until `/readyz` answers 200, from
//!   a cold cache (the first start) and from a warm one (the second, once
//!   the first host has optimised every component and cached the code);
//! - **RSS idle**: resident memory once ready, before any request;
//! - **first request**: the latency of the first request to services never
//!   called before (a sample of 200), p50 and p99;
//! - **RSS after one request each**: once every service has answered one
//!   request (and the idle instances have been swept).
//!
//! Two last rows serve 1,000 *distinct* components (the hello with a custom
//! section that differs), so nothing is shared between them but the engine,
//! and ten distinct builds of the JavaScript hello (12 MiB each, the same
//! SpiderMonkey inside). "All optimised" is from the cold start until no
//! service runs Winch's code any more.
//!
//! Last, a second JavaScript service (a different source, built with the
//! same ComponentizeJS) is dropped into a host serving one: the time until
//! it answers, and until it runs optimised code.
//!
//! The report goes to `target/bench/density.md`.

use std::fmt::Write as _;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};

use crate::http::status_kib;
use crate::process::WharfProcess;
use crate::stats::Summary;

/// Services whose first request is timed, spread over the directory.
const FIRST_REQUEST_SAMPLE: usize = 200;

/// Distinct Rust components in the next to last row.
const DISTINCT: usize = 1000;

/// Distinct JavaScript components (the same hello, each with a custom
/// section of its own, as ten services built with one ComponentizeJS are)
/// in the last row.
const JS_SERVICES: usize = 10;

/// One count's measurements.
struct Row {
    label: String,
    ready_cold: Duration,
    /// From the cold start until every service runs optimised code.
    optimised_cold: Duration,
    ready_warm: Duration,
    rss_idle_mib: f64,
    /// The part of it that is not file-backed (compiled code mapped from
    /// the cache is, and the kernel can drop it under pressure).
    anon_idle_mib: f64,
    first_request: Summary,
    rss_after_mib: f64,
}

/// Runs the benchmark for each of `counts` (copies of the Rust `hello`),
/// then `DISTINCT` distinct Rust components and `JS_SERVICES` distinct
/// builds of `js_hello`, and writes the report.
pub fn run_bench(
    wharf: &Path,
    hello: &Path,
    js_hello: &Path,
    counts: &[usize],
    out_dir: &Path,
) -> Result<()> {
    let mut rows = Vec::new();
    for &count in counts {
        eprintln!("xtask: density: {count} services");
        rows.push(measure(wharf, hello, count, false, count.to_string())?);
    }
    eprintln!("xtask: density: {DISTINCT} distinct services");
    rows.push(measure(
        wharf,
        hello,
        DISTINCT,
        true,
        format!("{DISTINCT} (distinct components)"),
    )?);
    eprintln!("xtask: density: {JS_SERVICES} distinct JavaScript services");
    rows.push(measure(
        wharf,
        js_hello,
        JS_SERVICES,
        true,
        format!(
            "{JS_SERVICES} JavaScript services (distinct builds, {} MiB each)",
            std::fs::metadata(js_hello)?.len() >> 20
        ),
    )?);
    eprintln!("xtask: density: a second JavaScript service");
    let second = second_js_service(
        wharf,
        &js_hello.with_file_name("hello-handler.wasm"),
        &js_hello.with_file_name("order-handler.wasm"),
    )?;
    let mut md = format!(
        "## Density: many services on one host\n\nMachine: {}. `wharf serve --log warn`, default settings; each service a hard link of the Rust hello ({} KB).\n\n| services | ready, cold cache | all optimised, cold cache | ready, warm cache | RSS idle (of it anonymous) | first request p50 / p99 | RSS after one request each |\n| --- | --- | --- | --- | --- | --- | --- |\n",
        crate::http::machine(),
        std::fs::metadata(hello)?.len() / 1024,
    );
    for row in &rows {
        let _ = writeln!(
            md,
            "| {} | {:.2} s | {:.2} s | {:.2} s | {:.0} MiB ({:.0} MiB) | {:.1} / {:.1} ms | {:.0} MiB |",
            row.label,
            row.ready_cold.as_secs_f64(),
            row.optimised_cold.as_secs_f64(),
            row.ready_warm.as_secs_f64(),
            row.rss_idle_mib,
            row.anon_idle_mib,
            row.first_request.p50_ms(),
            row.first_request.p99_ms(),
            row.rss_after_mib,
        );
    }
    let _ = writeln!(
        md,
        "\nA second JavaScript service (order-handler, {} MiB) dropped into a host serving one (hello-handler, optimised): answering after {:.2} s, optimised after {:.2} s.",
        std::fs::metadata(js_hello.with_file_name("order-handler.wasm"))?.len() >> 20,
        second.live.as_secs_f64(),
        second.optimised.as_secs_f64(),
    );
    println!("{md}");
    std::fs::create_dir_all(out_dir)?;
    std::fs::write(out_dir.join("density.md"), &md)?;
    eprintln!(
        "xtask: report written to {}",
        out_dir.join("density.md").display()
    );
    Ok(())
}

fn measure(wharf: &Path, hello: &Path, count: usize, distinct: bool, label: String) -> Result<Row> {
    let services = tempfile::tempdir()?;
    let cache = tempfile::tempdir()?;
    let data = tempfile::tempdir()?;
    if distinct {
        let bytes = std::fs::read(hello)?;
        for n in 0..count {
            std::fs::write(
                services.path().join(format!("s{n:05}.wasm")),
                crate::reload::variant(&bytes, n as u64),
            )?;
        }
    } else {
        // One copy of the component; every service a hard link to it.
        let original = services.path().join(".hello.component");
        std::fs::copy(hello, &original)?;
        for n in 0..count {
            std::fs::hard_link(&original, services.path().join(format!("s{n:05}.wasm")))
                .context("linking a service")?;
        }
    }
    let (ready_cold, optimised_cold) = {
        let started = Instant::now();
        let (cold, ready) = start_ready(
            wharf,
            services.path(),
            &serve_args(cache.path(), data.path()),
        )?;
        // Only optimised code is cached: the warm start measures a host
        // that ran long enough to optimise every component, as a host
        // restarted in production has.
        wait_optimised(&cold)?;
        (ready, started.elapsed())
    };
    let (host, ready_warm) = start_ready(
        wharf,
        services.path(),
        &serve_args(cache.path(), data.path()),
    )?;
    let pid = host.pid();
    let rss_idle_mib = status_kib(pid, "VmRSS") as f64 / 1024.0;
    let anon_idle_mib = status_kib(pid, "RssAnon") as f64 / 1024.0;
    let agent = ureq::Agent::new_with_defaults();
    let step = (count / FIRST_REQUEST_SAMPLE).max(1);
    let mut first = Vec::new();
    for n in (0..count).step_by(step).take(FIRST_REQUEST_SAMPLE) {
        let url = host.url(&format!("/s{n:05}"));
        let started = Instant::now();
        let status = agent
            .get(&url)
            .call()
            .map(|r| r.status().as_u16())
            .with_context(|| format!("GET {url}"))?;
        first.push(started.elapsed());
        if status != 200 {
            bail!("GET {url} answered {status}");
        }
    }
    for n in 0..count {
        let _ = agent.get(&host.url(&format!("/s{n:05}"))).call();
    }
    // Idle instances are swept after 5 s unused.
    std::thread::sleep(Duration::from_secs(7));
    let rss_after_mib = status_kib(pid, "VmRSS") as f64 / 1024.0;
    Ok(Row {
        label,
        ready_cold,
        optimised_cold,
        ready_warm,
        rss_idle_mib,
        anon_idle_mib,
        first_request: Summary::of(&first),
        rss_after_mib,
    })
}

/// `wharf serve`'s arguments in this benchmark: quiet, an admin endpoint
/// on a free port, the cache and data in `cache` and `data`.
fn serve_args(cache: &Path, data: &Path) -> Vec<String> {
    vec![
        "--log".to_string(),
        "warn".to_string(),
        "--admin".to_string(),
        "127.0.0.1:0".to_string(),
        "--cache-dir".to_string(),
        cache.display().to_string(),
        "--data-dir".to_string(),
        data.display().to_string(),
    ]
}

/// How long a newly dropped service took to answer and to be optimised.
struct Arrival {
    live: Duration,
    optimised: Duration,
}

/// Serves `first` until it runs optimised code, then drops `second` (a
/// different service built with the same ComponentizeJS) into the
/// directory and times it: until it answers (anything but 404), and until
/// it runs optimised code.
fn second_js_service(wharf: &Path, first: &Path, second: &Path) -> Result<Arrival> {
    let services = tempfile::tempdir()?;
    let cache = tempfile::tempdir()?;
    let data = tempfile::tempdir()?;
    std::fs::copy(first, services.path().join("first.wasm"))?;
    let (host, _) = start_ready(
        wharf,
        services.path(),
        &serve_args(cache.path(), data.path()),
    )?;
    wait_optimised(&host)?;
    let staged = services.path().join(".second.wasm.part");
    std::fs::copy(second, &staged)?;
    let url = host.url("/second");
    let agent = ureq::Agent::new_with_defaults();
    let started = Instant::now();
    std::fs::rename(&staged, services.path().join("second.wasm"))?;
    loop {
        match agent.get(&url).call() {
            Err(ureq::Error::StatusCode(404)) => {}
            Ok(_) | Err(ureq::Error::StatusCode(_)) => break,
            Err(err) => return Err(err).with_context(|| format!("GET {url}")),
        }
        if started.elapsed() > Duration::from_secs(300) {
            bail!("the second service did not answer within 5 minutes");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let live = started.elapsed();
    wait_optimised(&host)?;
    Ok(Arrival {
        live,
        optimised: started.elapsed(),
    })
}

/// Waits until no service of `host` runs Winch's code any more: its
/// background Cranelift compiles are done and in the cache.
fn wait_optimised(host: &WharfProcess) -> Result<()> {
    let services = host.admin_url("/services")?;
    let agent = ureq::Agent::new_with_defaults();
    let started = Instant::now();
    loop {
        let listing = agent
            .get(&services)
            .call()
            .context("listing the services")?
            .into_body()
            .read_to_string()
            .context("listing the services")?;
        if !listing.contains("\"tier\":\"winch\"") {
            return Ok(());
        }
        if started.elapsed() > Duration::from_secs(1800) {
            bail!("the services were not optimised within 30 minutes");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Starts `wharf serve` and measures the time until `/readyz` says ready.
fn start_ready(wharf: &Path, dir: &Path, args: &[String]) -> Result<(WharfProcess, Duration)> {
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let started = Instant::now();
    let host = WharfProcess::start(wharf, dir, &args)?;
    let readyz = host.admin_url("/readyz")?;
    let agent = ureq::Agent::new_with_defaults();
    loop {
        if agent
            .get(&readyz)
            .call()
            .is_ok_and(|r| r.status().as_u16() == 200)
        {
            return Ok((host, started.elapsed()));
        }
        if started.elapsed() > Duration::from_secs(900) {
            bail!("not ready after 15 minutes");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}
