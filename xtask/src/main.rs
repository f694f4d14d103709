//! Build orchestration for Wharf: `cargo xtask <command>`.
//!
//! - `guests [rust|js|python...]`: build the example and test guests in
//!   every language (see `guests.rs`; installs what they need).
//! - `wit`: regenerate `wit/` from the WASI WIT in the `wasip2` crate.
//! - `demo [--listen ADDR]`: build the guests, put them in
//!   `examples/services/` and serve that directory.
//! - `install`: put the release `wharf` (the demo's build) on the PATH, in
//!   Cargo's bin directory.
//! - `test`: build the guests, then run formatting and lint checks and every
//!   test. This is what CI runs.
//! - `bench reload`: reload and start-up times (see `reload.rs`).
//! - `bench isolation`: what a hostile neighbour costs (see `isolation.rs`).
//! - `bench kv`: a counter on each key-value backend against Express and
//!   Redis (see `kv.rs`).
//! - `bench messaging`: publish → handler on each broker against Node.js
//!   consumers (amqplib, kafkajs) on the same brokers (see `messaging.rs`).
//! - `bench http`: throughput, latency and memory against `wasmtime serve`,
//!   Express and bare hyper (see `http.rs`).

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::Duration;

use anyhow::{Context as _, Result, bail};

mod daemon;
mod density;
mod guests;
mod http;
mod isolation;
mod kv;
mod load;
mod messaging;
mod process;
mod reload;
mod stats;
mod system;
mod tools;
mod watchdog;

/// Rust guests copied into the demo directory. (The demo's `orders` is the
/// JavaScript one, which publishes `orders.created`.)
const DEMO_RUST: &[&str] = &[
    "hello", "echo", "users", "gateway", "cart", "billing", "report",
];
/// JavaScript guests copied into the demo directory, as (guest, service name).
const DEMO_JS: &[(&str, &str)] = &[
    ("hello", "hello-js"),
    ("team", "team-js"),
    ("visits", "visits-js"),
    ("orders", "orders"),
];
/// Python guests copied into the demo directory, as (guest, service name).
const DEMO_PYTHON: &[(&str, &str)] = &[
    ("hello", "hello-py"),
    ("visits", "visits-py"),
    ("email", "email"),
];

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("guests") => build_guests_for(&args[1..]).map(|_| ()),
        Some("wit") => guests::regenerate_wit(),
        Some("demo") => demo(&args[1..]),
        Some("install") => install(),
        Some("test") => test(),
        Some("bench") => bench(&args[1..]),
        _ => {
            eprintln!(
                "usage: cargo xtask <command>\n\n\
                 commands:\n  \
                 guests [LANG...]    build the example and test guests (rust, js, python; default all)\n  \
                 wit                 regenerate wit/ from the wasip2 crate\n  \
                 demo [--listen A]   build the guests and serve examples/services (admin and dashboard on :9090)\n  \
                 install             put the release wharf on the PATH (~/.cargo/bin)\n  \
                 test                build the guests and run every check and test (CI)\n  \
                 bench reload        reload and start-up times (writes target/bench/reload.md)\n  \
                 bench isolation     a neighbour's cost to hello (writes target/bench/isolation.md)\n  \
                 bench kv            a counter on each key-value backend vs Express + Redis (writes target/bench/kv.md)\n  \
                 bench messaging [--only TEXT]  publish -> handler on each broker vs Node.js + amqplib and kafkajs (rows whose label contains TEXT; writes target/bench/messaging.md)\n  \
                 bench http          Wharf vs wasmtime serve, Express, bare hyper (writes target/bench/http.md, http.svg)\n  \
                 bench density       1,000 and 10,000 services on one host (writes target/bench/density.md)"
            );
            return ExitCode::from(2);
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("xtask: {err:#}");
            ExitCode::FAILURE
        }
    }
}

/// The workspace root (the parent of this crate).
pub(crate) fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives inside the workspace")
        .to_path_buf()
}

pub(crate) fn cargo() -> Command {
    Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_string()))
}

pub(crate) fn run(command: &mut Command) -> Result<()> {
    eprintln!("xtask: running {command:?}");
    let status = command
        .status()
        .with_context(|| format!("cannot start {command:?}"))?;
    if !status.success() {
        bail!("{command:?} failed with {status}");
    }
    Ok(())
}

/// Builds the guests of the languages named in `args` (all if none).
fn build_guests_for(args: &[String]) -> Result<guests::Built> {
    let langs = if args.is_empty() {
        guests::Lang::ALL.to_vec()
    } else {
        args.iter()
            .map(|a| guests::Lang::parse(a))
            .collect::<Result<Vec<_>>>()?
    };
    guests::build(&langs)
}

fn demo(args: &[String]) -> Result<()> {
    let (mut listen, mut admin) = ("127.0.0.1:8080".to_string(), "127.0.0.1:9090".to_string());
    let mut rest = args.iter();
    while let Some(flag) = rest.next() {
        let value = rest.next().cloned();
        match (flag.as_str(), value) {
            ("--listen", Some(addr)) => listen = addr,
            ("--admin", Some(addr)) => admin = addr,
            _ => bail!("usage: cargo xtask demo [--listen ADDR] [--admin ADDR]"),
        }
    }
    eprintln!(
        "xtask: building the demo. The first run compiles Wharf in release mode and builds the \
         Rust, JavaScript and Python services (12 to 17 minutes on a 2-core machine); later \
         runs take seconds."
    );
    // Release: the demo is what people measure by hand.
    let wharf = build_release_wharf()?;
    let built = guests::build(&guests::Lang::ALL)?;
    let services = root().join("examples").join("services");
    let demo = DEMO_RUST
        .iter()
        .map(|name| (built.rust.join(format!("{name}.wasm")), name.to_string()))
        .chain(
            DEMO_JS
                .iter()
                .map(|(src, name)| (built.js.join(format!("{src}.wasm")), name.to_string())),
        )
        .chain(
            DEMO_PYTHON
                .iter()
                .map(|(src, name)| (built.python.join(format!("{src}.wasm")), name.to_string())),
        );
    for (from, name) in demo {
        let to = services.join(format!("{name}.wasm"));
        std::fs::copy(&from, &to)
            .with_context(|| format!("copying {} to {}", from.display(), to.display()))?;
    }
    eprintln!(
        "xtask: starting {} serve {} --listen {listen}; the first start compiles each service \
         (the JavaScript and Python ones take several seconds: the log says which)",
        wharf.display(),
        services.display()
    );
    serve_demo(&wharf, &services, &listen, &admin)
}

/// Runs `wharf serve` on the demo directory, passing its log through, and
/// prints what to try once it is listening (not before: the first start
/// compiles every service). Returns when the host exits (Ctrl-C).
fn serve_demo(wharf: &Path, services: &Path, listen: &str, admin: &str) -> Result<()> {
    use std::io::{BufRead as _, BufReader};
    let mut child = Command::new(wharf)
        .arg("serve")
        .arg(services)
        .args(["--listen", listen, "--admin", admin])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {}", wharf.display()))?;
    let stderr = child.stderr.take().context("no stderr pipe")?;
    let mut dashboard = String::new();
    for line in BufReader::new(stderr).lines() {
        let line = line?;
        eprintln!("{line}");
        if let Some(address) = line.strip_prefix("wharf: admin listening on ") {
            dashboard = format!("The dashboard: {}/\n", address.trim());
        }
        if let Some(address) = line.strip_prefix("wharf: listening on ") {
            let base = address.trim();
            eprintln!(
                "\nxtask: the demo is up. Try:\n  \
                 curl {base}/hello\n  \
                 curl -d 'hi' {base}/echo/x\n  \
                 curl '{base}/gateway?user=1'\n  \
                 curl {base}/hello-js\n  \
                 curl {base}/hello-py\n  \
                 curl {base}/team-js\n  \
                 curl -d apple {base}/cart/ada   (state that survives restarts)\n  \
                 curl {base}/visits-js\n  \
                 curl {base}/visits-py\n  \
                 curl -d '{{\"user_id\":1,\"item\":\"coffee\",\"amount_cents\":450}}' {base}/orders\n  \
                 curl {base}/billing   curl {base}/email   curl {base}/report   (triggered by the order)\n\
                 {dashboard}\
                 Ctrl-C stops it. To use `wharf new`, `wharf dev` and the other commands, put this build on\n\
                 the PATH with `cargo xtask install`.\n"
            );
        }
    }
    let status = child.wait().context("waiting for wharf")?;
    if !status.success() {
        bail!("wharf exited with {status}");
    }
    Ok(())
}

fn test() -> Result<()> {
    // The backend tests start servers of their own from these packages.
    system::ensure(&[
        &system::REDIS,
        &system::NATS,
        &system::RABBITMQ,
        &system::HAPROXY,
        &system::CHROMIUM,
        &system::OPENSSL_DEV,
    ])?;
    // The Kafka tests' broker, built once per machine: beside the guests'
    // builds (mostly single-threaded Node.js and Python steps) and the
    // formatting checks, which leave a core idle.
    let tansu = std::thread::spawn(tools::ensure_tansu);
    guests::build(&guests::Lang::ALL)?;
    let root = root();
    run(cargo()
        .current_dir(&root)
        .args(["fmt", "--all", "--", "--check"]))?;
    run(cargo()
        .current_dir(root.join("guests"))
        .args(["fmt", "--all", "--", "--check"]))?;
    tansu
        .join()
        .map_err(|_| anyhow::anyhow!("building tansu panicked"))??;
    run(cargo().current_dir(&root).args([
        "clippy",
        "--workspace",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))?;
    // Building is bounded by itself; running is watched: a hung test fails
    // the run with its stacks long before CI's own limit.
    run(cargo()
        .current_dir(&root)
        .args(["test", "--workspace", "--all-targets", "--no-run"]))?;
    watchdog::run_with_limit(
        cargo()
            .current_dir(&root)
            .args(["test", "--workspace", "--all-targets"]),
        TEST_TIME_LIMIT,
    )?;
    run(cargo()
        .current_dir(&root)
        .args(["test", "--workspace", "--doc"]))
}

/// How long the built tests may run: the whole suite takes about ten
/// minutes on a 2-core machine.
const TEST_TIME_LIMIT: Duration = Duration::from_secs(30 * 60);

/// Copies the release `wharf` (built if needed: the demo's build) into
/// Cargo's bin directory, which rustup put on the PATH — all or nothing,
/// so a running `wharf` is never half overwritten.
fn install() -> Result<()> {
    let built = build_release_wharf()?;
    let bin = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".cargo")))
        .context("neither CARGO_HOME nor HOME is set: cannot tell where Cargo's bin directory is")?
        .join("bin");
    std::fs::create_dir_all(&bin).with_context(|| format!("creating {}", bin.display()))?;
    let target = bin.join("wharf");
    let temp = bin.join(".wharf.installing");
    std::fs::copy(&built, &temp)
        .with_context(|| format!("copying {} to {}", built.display(), temp.display()))?;
    std::fs::File::open(&temp)
        .and_then(|file| file.sync_all())
        .with_context(|| format!("syncing {}", temp.display()))?;
    std::fs::rename(&temp, &target).with_context(|| format!("installing {}", target.display()))?;
    eprintln!(
        "xtask: installed {}; `wharf --version` works wherever ~/.cargo/bin is on the PATH (rustup put it there)",
        target.display()
    );
    Ok(())
}

/// Builds the release `wharf` binary and returns its path.
fn build_release_wharf() -> Result<PathBuf> {
    // librdkafka, the Kafka client, is built against OpenSSL.
    system::ensure(&[&system::OPENSSL_DEV])?;
    let root = root();
    run(cargo().current_dir(&root).args([
        "build",
        "--release",
        "--package",
        "wharf",
        "--bin",
        "wharf",
    ]))?;
    Ok(root.join("target").join("release").join("wharf"))
}

fn bench(args: &[String]) -> Result<()> {
    let out_dir = root().join("target").join("bench");
    match args.first().map(String::as_str) {
        Some("reload") => {
            let built = guests::build(&guests::Lang::ALL)?;
            let wharf = build_release_wharf()?;
            let mut subjects = vec![("hello".to_string(), built.rust.join("hello.wasm"))];
            for (label, path) in large_guests(&built) {
                if path.exists() {
                    subjects.push((label, path));
                } else {
                    eprintln!("xtask: {} not built; skipping it", path.display());
                }
            }
            reload::run(&wharf, &subjects, &out_dir.join("reload.md"))
        }
        Some("isolation") => {
            let guests = guests::build(&[guests::Lang::Rust])?.rust;
            let wharf = match args.get(1..) {
                Some([flag, path]) if flag == "--wharf" => PathBuf::from(path),
                Some([]) | None => build_release_wharf()?,
                _ => bail!("usage: cargo xtask bench isolation [--wharf BINARY]"),
            };
            isolation::run(&wharf, &guests, &out_dir.join("isolation.md"))
        }
        Some("messaging") => {
            let only = match args.get(1..) {
                Some([flag, text]) if flag == "--only" => Some(text.as_str()),
                Some([]) | None => None,
                _ => bail!("usage: cargo xtask bench messaging [--only TEXT]"),
            };
            let guests = guests::build(&[guests::Lang::Rust])?.rust;
            let wharf = build_release_wharf()?;
            messaging::run_bench(&wharf, &guests, &out_dir, only)
        }
        Some("density") => {
            let counts = match args.get(1..) {
                Some([flag, list]) if flag == "--services" => list
                    .split(',')
                    .map(|n| n.trim().parse::<usize>())
                    .collect::<Result<Vec<_>, _>>()
                    .context("--services: a comma-separated list of counts")?,
                _ => vec![1000, 10000],
            };
            let built = guests::build(&[guests::Lang::Rust, guests::Lang::Js])?;
            let wharf = build_release_wharf()?;
            density::run_bench(
                &wharf,
                &built.rust.join("hello.wasm"),
                &built.js.join("hello.wasm"),
                &counts,
                &out_dir,
            )
        }
        Some("kv") => {
            let guests = guests::build(&[guests::Lang::Rust])?.rust;
            let wharf = build_release_wharf()?;
            kv::run_bench(&wharf, &guests, &out_dir)
        }
        Some("http") => {
            let mut options = http::Options {
                rounds: 3,
                load: load::Load {
                    threads: 1,
                    connections: 32,
                    duration: std::time::Duration::from_secs(10),
                },
                js: true,
            };
            let mut wharf = None;
            let mut rest = args[1..].iter();
            while let Some(arg) = rest.next() {
                let mut value = || rest.next().context("a value after the flag");
                match arg.as_str() {
                    "--rounds" => options.rounds = value()?.parse()?,
                    "--seconds" => {
                        options.load.duration = std::time::Duration::from_secs(value()?.parse()?)
                    }
                    "--connections" => options.load.connections = value()?.parse()?,
                    "--no-js" => options.js = false,
                    "--wharf" => wharf = Some(PathBuf::from(value()?)),
                    other => bail!("unknown bench http flag {other}"),
                }
            }
            let built = guests::build(&[guests::Lang::Rust, guests::Lang::Js])?;
            // Another build (an older commit's) to compare with, or this one.
            let wharf = match wharf {
                Some(path) => path,
                None => build_release_wharf()?,
            };
            http::run_bench(&wharf, &built, options, &out_dir)
        }
        _ => bail!(
            "usage: cargo xtask bench reload | isolation [--wharf BINARY] | kv | density [--services N,N] | http [--rounds N] [--seconds S] [--connections C] [--no-js] [--wharf BINARY]"
        ),
    }
}

/// Large guests measured beside hello: the JavaScript and Python hellos.
fn large_guests(built: &guests::Built) -> Vec<(String, PathBuf)> {
    vec![
        ("hello (JS)".to_string(), built.js.join("hello.wasm")),
        (
            "hello (Python)".to_string(),
            built.python.join("hello.wasm"),
        ),
    ]
}
