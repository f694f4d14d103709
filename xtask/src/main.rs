//! Build orchestration for Wharf: `cargo xtask <command>`.
//!
//! - `guests`: build every example and test guest (installs the
//!   `wasm32-wasip2` target if it is missing).
//! - `demo [--listen ADDR]`: build the guests, put them in
//!   `examples/services/` and serve that directory.
//! - `test`: build the guests, then run formatting and lint checks and every
//!   test. This is what CI runs.
//! - `bench reload`: reload and start-up times (see `reload.rs`).
//! - `bench isolation`: what a hostile neighbour costs (see `isolation.rs`).

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

use anyhow::{Context as _, Result, bail};

mod isolation;
mod load;
mod process;
mod reload;
mod stats;

/// The wasm target guests are built for.
const GUEST_TARGET: &str = "wasm32-wasip2";

/// Rust guests copied into the demo directory.
const DEMO_GUESTS: &[&str] = &["hello", "echo", "users", "orders", "gateway"];

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("guests") => build_guests().map(|_| ()),
        Some("demo") => demo(&args[1..]),
        Some("test") => test(),
        Some("bench") => bench(&args[1..]),
        _ => {
            eprintln!(
                "usage: cargo xtask <command>\n\n\
                 commands:\n  \
                 guests              build the example and test guests\n  \
                 demo [--listen A]   build the guests and serve examples/services\n  \
                 test                build the guests and run every check and test (CI)\n  \
                 bench reload        reload and start-up times (writes target/bench/reload.md)\n  \
                 bench isolation     a neighbour's cost to hello (writes target/bench/isolation.md)"
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
fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives inside the workspace")
        .to_path_buf()
}

fn cargo() -> Command {
    Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_string()))
}

fn run(command: &mut Command) -> Result<()> {
    eprintln!("xtask: running {command:?}");
    let status = command
        .status()
        .with_context(|| format!("cannot start {command:?}"))?;
    if !status.success() {
        bail!("{command:?} failed with {status}");
    }
    Ok(())
}

/// Installs the guest target through rustup if it is missing.
fn ensure_guest_target() -> Result<()> {
    let installed = Command::new("rustup")
        .args(["target", "list", "--installed"])
        .output()
        .context("cannot run rustup (is Rust installed with rustup?)")?;
    let list = String::from_utf8_lossy(&installed.stdout);
    if !list.lines().any(|line| line.trim() == GUEST_TARGET) {
        run(Command::new("rustup").args(["target", "add", GUEST_TARGET]))?;
    }
    Ok(())
}

/// Builds the Rust guests; returns the directory holding the `.wasm` files.
fn build_guests() -> Result<PathBuf> {
    ensure_guest_target()?;
    let guests = root().join("guests");
    run(cargo()
        .current_dir(&guests)
        .args(["build", "--release", "--target", GUEST_TARGET]))?;
    Ok(guests.join("target").join(GUEST_TARGET).join("release"))
}

fn demo(args: &[String]) -> Result<()> {
    let built = build_guests()?;
    let services = root().join("examples").join("services");
    for guest in DEMO_GUESTS {
        let from = built.join(format!("{guest}.wasm"));
        let to = services.join(format!("{guest}.wasm"));
        std::fs::copy(&from, &to)
            .with_context(|| format!("copying {} to {}", from.display(), to.display()))?;
    }
    let listen = match args {
        [] => "127.0.0.1:8080".to_string(),
        [flag, addr] if flag == "--listen" => addr.clone(),
        _ => bail!("usage: cargo xtask demo [--listen ADDR]"),
    };
    eprintln!(
        "xtask: serving {} — try: curl http://{listen}/hello",
        services.display()
    );
    run(cargo().current_dir(root()).args([
        "run",
        "--package",
        "wharf",
        "--",
        "serve",
        &services.display().to_string(),
        "--listen",
        &listen,
    ]))
}

fn test() -> Result<()> {
    build_guests()?;
    let root = root();
    run(cargo()
        .current_dir(&root)
        .args(["fmt", "--all", "--", "--check"]))?;
    run(cargo()
        .current_dir(root.join("guests"))
        .args(["fmt", "--all", "--", "--check"]))?;
    run(cargo().current_dir(&root).args([
        "clippy",
        "--workspace",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))?;
    run(cargo()
        .current_dir(&root)
        .args(["test", "--workspace", "--all-targets"]))?;
    run(cargo()
        .current_dir(&root)
        .args(["test", "--workspace", "--doc"]))
}

/// Builds the release `wharf` binary and returns its path.
fn build_release_wharf() -> Result<PathBuf> {
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
            let guests = build_guests()?;
            let wharf = build_release_wharf()?;
            let mut subjects = vec![("hello".to_string(), guests.join("hello.wasm"))];
            for (label, path) in large_guests() {
                if path.exists() {
                    subjects.push((label, path));
                } else {
                    eprintln!("xtask: {} not built; skipping it", path.display());
                }
            }
            reload::run(&wharf, &subjects, &out_dir.join("reload.md"))
        }
        Some("isolation") => {
            let guests = build_guests()?;
            let wharf = build_release_wharf()?;
            isolation::run(&wharf, &guests, &out_dir.join("isolation.md"))
        }
        _ => bail!("usage: cargo xtask bench reload|isolation"),
    }
}

/// Large guests measured beside hello when they are built.
fn large_guests() -> Vec<(String, PathBuf)> {
    Vec::new()
}
