//! Building the example and test services in every language:
//!
//! - Rust: the `guests/` cargo workspace for `wasm32-wasip2` (the target is
//!   installed through rustup if missing) → `guests/target/wasm32-wasip2/release/NAME.wasm`.
//! - JavaScript: every `guests/js/NAME/index.js` with ComponentizeJS (npm
//!   packages installed into `guests/js/node_modules` from the lock file) →
//!   `guests/target/js/NAME.wasm`.
//! - Python: every `guests/python/NAME/app.py` with componentize-py (installed
//!   into the venv `guests/python/.venv`) → `guests/target/python/NAME.wasm`.
//!
//! Installs and builds are skipped when their outputs are newer than their
//! inputs, so repeated runs take seconds.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::SystemTime;

use anyhow::{Context as _, Result, bail};

use crate::{cargo, root, run, system};

/// The wasm target Rust guests are built for.
pub const GUEST_TARGET: &str = "wasm32-wasip2";

/// Which languages to build.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lang {
    /// Rust guests.
    Rust,
    /// JavaScript guests.
    Js,
    /// Python guests.
    Python,
}

impl Lang {
    /// Every language.
    pub const ALL: [Lang; 3] = [Lang::Rust, Lang::Js, Lang::Python];

    /// Parses `rust`, `js` or `python`.
    pub fn parse(text: &str) -> Result<Lang> {
        match text {
            "rust" => Ok(Lang::Rust),
            "js" | "javascript" => Ok(Lang::Js),
            "python" | "py" => Ok(Lang::Python),
            other => bail!("unknown guest language {other:?}; use rust, js or python"),
        }
    }
}

/// Where built guests land.
pub struct Built {
    /// Rust guests.
    pub rust: PathBuf,
    /// JavaScript guests.
    pub js: PathBuf,
    /// Python guests.
    pub python: PathBuf,
}

impl Built {
    fn at(guests: &Path) -> Built {
        let target = guests.join("target");
        Built {
            rust: target.join(GUEST_TARGET).join("release"),
            js: target.join("js"),
            python: target.join("python"),
        }
    }
}

/// Builds the guests of `langs`.
pub fn build(langs: &[Lang]) -> Result<Built> {
    let guests = root().join("guests");
    let built = Built::at(&guests);
    for lang in langs {
        match lang {
            Lang::Rust => build_rust(&guests)?,
            Lang::Js => build_js(&guests, &built.js)?,
            Lang::Python => build_python(&guests, &built.python)?,
        }
    }
    Ok(built)
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

fn build_rust(guests: &Path) -> Result<()> {
    ensure_guest_target()?;
    run(cargo()
        .current_dir(guests)
        .args(["build", "--release", "--target", GUEST_TARGET]))
}

/// The newest modification time among `paths` (directories: recursively).
fn newest(paths: &[PathBuf]) -> SystemTime {
    let mut newest = SystemTime::UNIX_EPOCH;
    for path in paths {
        let Ok(meta) = std::fs::metadata(path) else {
            continue;
        };
        if meta.is_dir() {
            let children: Vec<PathBuf> = std::fs::read_dir(path)
                .into_iter()
                .flatten()
                .flatten()
                .map(|e| e.path())
                .filter(|p| !p.ends_with("node_modules") && !p.ends_with(".venv"))
                .collect();
            newest = newest.max(self::newest(&children));
        } else if let Ok(modified) = meta.modified() {
            newest = newest.max(modified);
        }
    }
    newest
}

/// Whether `output` is missing or older than any of `inputs`.
fn stale(output: &Path, inputs: &[PathBuf]) -> bool {
    match std::fs::metadata(output).and_then(|m| m.modified()) {
        Ok(built) => newest(inputs) > built,
        Err(_) => true,
    }
}

/// The service directories under `dir` that hold `entry`.
fn services(dir: &Path, entry: &str) -> Result<Vec<(String, PathBuf)>> {
    let mut found = Vec::new();
    for item in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let path = item?.path();
        if path.join(entry).is_file()
            && let Some(name) = path.file_name().and_then(|n| n.to_str())
        {
            found.push((name.to_string(), path));
        }
    }
    found.sort();
    Ok(found)
}

fn build_js(guests: &Path, out: &Path) -> Result<()> {
    system::ensure(&[&system::NODE, &system::NPM])?;
    let js = guests.join("js");
    let lock = js.join("package-lock.json");
    let installed = js.join("node_modules").join(".package-lock.json");
    if stale(&installed, &[lock.clone(), js.join("package.json")]) {
        run(Command::new("npm")
            .current_dir(&js)
            .args(["ci", "--no-audit", "--no-fund"]))?;
    }
    let wit = root().join("wit").join("wasi-0.2.10");
    for (name, dir) in services(&js, "index.js")? {
        let output = out.join(format!("{name}.wasm"));
        if stale(
            &output,
            &[dir.clone(), js.join("build.mjs"), lock.clone(), wit.clone()],
        ) {
            run(Command::new("node")
                .current_dir(&js)
                .arg("build.mjs")
                .arg(&dir)
                .arg(&output))?;
        }
    }
    Ok(())
}

fn build_python(guests: &Path, out: &Path) -> Result<()> {
    let python = guests.join("python");
    let venv = python.join(".venv");
    let requirements = python.join("requirements.txt");
    let marker = venv.join(".installed");
    if stale(&marker, std::slice::from_ref(&requirements)) {
        system::ensure(&[&system::PYTHON_VENV])?;
        if !venv.join("bin").join("pip").exists() {
            run(Command::new("python3").arg("-m").arg("venv").arg(&venv))?;
        }
        run(Command::new(venv.join("bin").join("pip"))
            .args(["install", "--quiet", "--disable-pip-version-check", "-r"])
            .arg(&requirements))?;
        std::fs::write(&marker, "").context("marking the venv installed")?;
    }
    for (name, dir) in services(&python, "app.py")? {
        // The WIT folder under wit/ is `wasi-0.2.12`, or the one named in
        // NAME/wit (`wasi-0.3.0` for a WASI 0.3 service).
        let wit_dir = std::fs::read_to_string(dir.join("wit"))
            .map(|w| w.trim().to_string())
            .unwrap_or_else(|_| "wasi-0.2.12".to_string());
        let wit = root().join("wit").join(wit_dir);
        let output = out.join(format!("{name}.wasm"));
        if stale(&output, &[dir.clone(), requirements.clone(), wit.clone()]) {
            std::fs::create_dir_all(out)?;
            // The world is `service`, or the one named in NAME/world.
            let world = std::fs::read_to_string(dir.join("world"))
                .map(|w| w.trim().to_string())
                .unwrap_or_else(|_| "service".to_string());
            run(Command::new(venv.join("bin").join("componentize-py"))
                .arg("-d")
                .arg(&wit)
                .args(["-w", &world, "componentize", "-p"])
                .arg(&dir)
                .arg("app")
                .arg("-o")
                .arg(&output))?;
        }
    }
    Ok(())
}

/// Regenerates `wit/` from the WASI WIT shipped in the `wasip2` crate (see
/// `wit/README.md`).
pub fn regenerate_wit() -> Result<()> {
    let guests = root().join("guests");
    run(cargo().current_dir(&guests).arg("fetch"))?;
    let home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
        .context("cannot find the cargo home")?;
    let mut sources = Vec::new();
    for registry in std::fs::read_dir(home.join("registry").join("src"))? {
        for krate in std::fs::read_dir(registry?.path())? {
            let path = krate?.path();
            let name = path
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or_default()
                .to_string();
            if name.starts_with("wasip2-") && name.ends_with("+wasi-0.2.12") {
                sources.push(path.join("wit").join("deps"));
            }
        }
    }
    sources.sort();
    let source = sources
        .pop()
        .context("no wasip2 crate for WASI 0.2.12 in the cargo registry")?;
    let wit = root().join("wit");
    for entry in std::fs::read_dir(&source)? {
        let path = entry?.path();
        let file = path.file_name().context("a file name")?.to_owned();
        let text = std::fs::read_to_string(&path)?;
        std::fs::write(wit.join("wasi-0.2.12").join("deps").join(&file), &text)?;
        let mut older = text.replace("@0.2.12", "@0.2.10");
        // The one item added after 0.2.10, with its doc comment.
        if let Some(at) = older.find("  @since(version = 0.2.12)\n  exit-with-code:") {
            let start = older[..at].trim_end_matches(|c| c != '\n').len();
            let doc_start = older[..start]
                .lines()
                .rev()
                .take_while(|l| l.trim_start().starts_with("///"))
                .map(|l| l.len() + 1)
                .sum::<usize>();
            let end = at + older[at..].find(";\n").context("end of exit-with-code")? + 2;
            older.replace_range(start - doc_start..end, "");
        }
        std::fs::write(wit.join("wasi-0.2.10").join("deps").join(&file), older)?;
    }
    eprintln!("xtask: wit/ regenerated from {}", source.display());
    Ok(())
}
