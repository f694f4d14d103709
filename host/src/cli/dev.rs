//! `wharf dev`: the development loop of one service project, like
//! `nodemon`, `wrangler dev` or `spin watch`. In the project's directory it
//! builds the service the project's own way, serves it at
//! `http://ADDR/NAME` with the grants its manifest asks for (and error
//! details in 500s), watches the sources, rebuilds and hot-swaps on every
//! save, and streams the service's log — what the guest prints, its errors
//! and one line per request — to the terminal.
//!
//! A failed build prints the tool's output and keeps the last good version
//! serving.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use tokio::sync::mpsc;
use wharf::SecretSources;
use wharf::{Config, Host};

/// How long the sources must be quiet before a rebuild starts.
const SETTLE: Duration = Duration::from_millis(250);

/// Directories and files a change in which never means a rebuild: tools'
/// outputs and caches.
const IGNORED: &[&str] = &[
    "node_modules",
    "dist",
    "target",
    ".git",
    ".venv",
    "__pycache__",
];

/// `wharf dev`'s arguments.
#[derive(clap::Args, Debug)]
pub struct DevArgs {
    /// The project directory [default: the current one].
    dir: Option<PathBuf>,
    /// Address to serve on.
    #[arg(long, short, default_value = "127.0.0.1:8080", value_name = "ADDR")]
    listen: std::net::SocketAddr,
}

/// How a project is built, and what it builds.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Project {
    dir: PathBuf,
    /// The service name (the manifest is `NAME.toml`).
    name: String,
    /// The build command and its arguments.
    build: Vec<String>,
    /// Where the build puts the component.
    artefact: PathBuf,
    /// Extra directories for the build command's PATH (a Python venv).
    path: Vec<PathBuf>,
}

impl Project {
    /// Finds out what kind of project `dir` is: a `package.json` (npm), a
    /// `Cargo.toml` (cargo) or a `build.sh` beside `app.py`
    /// (componentize-py) — and its service name, from the one `NAME.toml`
    /// manifest there.
    fn detect(dir: &Path) -> Result<Project> {
        let dir = std::fs::canonicalize(dir)
            .with_context(|| format!("the project directory {}", dir.display()))?;
        let name = manifest_name(&dir)?;
        let project = |build: &[&str], artefact: PathBuf, path: Vec<PathBuf>| Project {
            dir: dir.clone(),
            name: name.clone(),
            build: build.iter().map(|s| s.to_string()).collect(),
            artefact,
            path,
        };
        if dir.join("package.json").is_file() {
            return Ok(project(
                &["npm", "run", "build"],
                dir.join(format!("{name}.wasm")),
                Vec::new(),
            ));
        }
        if dir.join("Cargo.toml").is_file() {
            return Ok(project(
                &["cargo", "build", "--release", "--target", "wasm32-wasip2"],
                dir.join("target/wasm32-wasip2/release")
                    .join(format!("{}.wasm", name.replace('-', "_"))),
                Vec::new(),
            ));
        }
        if dir.join("build.sh").is_file() {
            return Ok(project(
                &["sh", "build.sh"],
                dir.join(format!("{name}.wasm")),
                vec![dir.join(".venv/bin")],
            ));
        }
        bail!(
            "{} is not a service project: no package.json, Cargo.toml or build.sh (make one with `wharf new NAME`)",
            dir.display()
        )
    }

    fn manifest(&self) -> PathBuf {
        self.dir.join(format!("{}.toml", self.name))
    }

    /// Runs the build; its output is passed through. Whether it built.
    async fn build(&self) -> bool {
        let started = Instant::now();
        eprintln!(
            "wharf dev: building {} ({})",
            self.name,
            self.build.join(" ")
        );
        let mut command = tokio::process::Command::new(&self.build[0]);
        command
            .args(&self.build[1..])
            .current_dir(&self.dir)
            .stdin(Stdio::null());
        if !self.path.is_empty() {
            let mut paths: Vec<PathBuf> = self.path.clone();
            if let Some(existing) = std::env::var_os("PATH") {
                paths.extend(std::env::split_paths(&existing));
            }
            if let Ok(joined) = std::env::join_paths(paths) {
                command.env("PATH", joined);
            }
        }
        match command.status().await {
            Ok(status) if status.success() => {
                eprintln!(
                    "wharf dev: built in {:.1}s",
                    started.elapsed().as_secs_f64()
                );
                true
            }
            Ok(status) => {
                eprintln!(
                    "wharf dev: the build failed ({status}); the last good version keeps serving"
                );
                false
            }
            Err(err) => {
                eprintln!("wharf dev: cannot run {}: {err}", self.build[0]);
                false
            }
        }
    }
}

/// The name of the one `NAME.toml` manifest in `dir` (not a tool's file).
fn manifest_name(dir: &Path) -> Result<String> {
    const TOOLS: &[&str] = &["Cargo", "pyproject", "wharf", "tsconfig", "rust-toolchain"];
    let mut names = Vec::new();
    for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let entry = entry?;
        let file = entry.file_name();
        let Some(stem) = file.to_str().and_then(|f| f.strip_suffix(".toml")) else {
            continue;
        };
        if !TOOLS.contains(&stem) && entry.path().is_file() {
            names.push(stem.to_string());
        }
    }
    match names.as_slice() {
        [name] => Ok(name.clone()),
        [] => bail!(
            "no NAME.toml manifest in {}: a service project has one (`wharf new NAME` writes it)",
            dir.display()
        ),
        many => bail!(
            "several manifests in {} ({}): keep the one named after the service",
            dir.display(),
            many.join(", ")
        ),
    }
}

/// The manifest as `wharf dev` serves it: the project's, with error details
/// in 500s (`[http] expose_errors`), and the secret sources it names handed
/// out (this is the developer's own machine).
fn dev_manifest(text: &str) -> Result<(String, SecretSources)> {
    let mut table: toml::Table = toml::from_str(text).context("the manifest is not valid TOML")?;
    let http = table
        .entry("http")
        .or_insert_with(|| toml::Value::Table(toml::Table::new()));
    if let Some(http) = http.as_table_mut() {
        http.insert("expose_errors".into(), toml::Value::Boolean(true));
    }
    let (mut dirs, mut env) = (Vec::new(), Vec::new());
    if let Some(secrets) = table.get("secrets").and_then(|s| s.as_table()) {
        for source in secrets.values().filter_map(|v| v.as_table()) {
            if let Some(name) = source.get("env").and_then(|v| v.as_str()) {
                env.push(name.to_string());
            }
            if let Some(parent) = source
                .get("file")
                .and_then(|v| v.as_str())
                .and_then(|file| Path::new(file).parent())
                .filter(|parent| parent.is_dir())
            {
                dirs.push(parent.to_path_buf());
            }
        }
    }
    let sources = SecretSources::new(dirs, env).map_err(anyhow::Error::msg)?;
    Ok((toml::to_string(&table)?, sources))
}

/// Writes `bytes` to `path` all or nothing: a temporary name, fsync, rename.
fn install(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write as _;
    let dir = path.parent().context("an installed file has a directory")?;
    let mut temp = tempfile::Builder::new()
        .prefix(".wharf-dev-")
        .tempfile_in(dir)
        .with_context(|| format!("writing into {}", dir.display()))?;
    temp.write_all(bytes)?;
    temp.as_file().sync_all()?;
    temp.persist(path)
        .with_context(|| format!("installing {}", path.display()))?;
    Ok(())
}

/// Copies the built component and the dev manifest into `services`;
/// returns the secret sources the manifest names.
fn install_service(project: &Project, services: &Path) -> Result<SecretSources> {
    let text = std::fs::read_to_string(project.manifest())
        .with_context(|| format!("reading {}", project.manifest().display()))?;
    let (manifest, sources) =
        dev_manifest(&text).with_context(|| format!("in {}", project.manifest().display()))?;
    let wasm = std::fs::read(&project.artefact)
        .with_context(|| format!("reading {}", project.artefact.display()))?;
    // The manifest first: the component's arrival deploys the pair.
    install(
        &services.join(format!("{}.toml", project.name)),
        manifest.as_bytes(),
    )?;
    install(&services.join(format!("{}.wasm", project.name)), &wasm)?;
    Ok(sources)
}

/// Whether a change at `path` (inside `project`) is one to rebuild for.
fn is_source(project: &Path, path: &Path) -> bool {
    let Ok(relative) = path.strip_prefix(project) else {
        return false;
    };
    let ignored_dir = relative.components().any(|part| {
        part.as_os_str()
            .to_str()
            .is_some_and(|part| IGNORED.contains(&part))
    });
    let name = relative
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or_default();
    !ignored_dir
        && !name.ends_with(".wasm")
        && !name.starts_with('.')
        && !name.ends_with('~')
        && !name.is_empty()
}

/// Runs `wharf dev` until Ctrl-C.
pub async fn run(args: DevArgs, shutdown: impl std::future::Future<Output = ()>) -> Result<()> {
    let dir = args.dir.clone().unwrap_or_else(|| PathBuf::from("."));
    let project = Project::detect(&dir)?;
    let services = tempfile::Builder::new()
        .prefix("wharf-dev-services-")
        .tempdir()
        .context("a temporary services directory")?;
    let data = tempfile::Builder::new()
        .prefix("wharf-dev-data-")
        .tempdir()
        .context("a temporary data directory")?;
    eprintln!("wharf dev: {} in {}", project.name, project.dir.display());
    let mut secret_sources = SecretSources::default();
    if project.build().await {
        match install_service(&project, services.path()) {
            Ok(sources) => secret_sources = sources,
            Err(err) => eprintln!("wharf dev: {err:#}"),
        }
    }
    let mut config = Config::for_dir(services.path()).data_dir(Some(data.path().to_path_buf()));
    config.secret_sources = secret_sources;
    let host = Host::new(config).await.context("starting the host")?;
    let serving = host.serve_threads(args.listen, 1, None)?;
    eprintln!("wharf dev: listening on http://{}", serving.local_addr());
    eprintln!(
        "wharf dev: serving http://{}/{} — edit and save to rebuild, Ctrl-C to stop",
        serving.local_addr(),
        project.name
    );

    let (changes_tx, mut changes) = mpsc::unbounded_channel::<PathBuf>();
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        use notify::EventKind;
        use notify::event::ModifyKind;
        // Writes, creations, renames and removals: not the reads a build
        // makes (access events), nor metadata changes.
        let Ok(event) = event else { return };
        let changed = matches!(
            event.kind,
            EventKind::Create(_) | EventKind::Remove(_) | EventKind::Modify(_)
        ) && !matches!(event.kind, EventKind::Modify(ModifyKind::Metadata(_)));
        if changed {
            for path in event.paths {
                let _ = changes_tx.send(path);
            }
        }
    })
    .context("watching the project")?;
    use notify::Watcher as _;
    watcher
        .watch(&project.dir, notify::RecursiveMode::Recursive)
        .with_context(|| format!("watching {}", project.dir.display()))?;

    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            changed = changes.recv() => {
                let Some(first) = changed else { break };
                if !is_source(&project.dir, &first) {
                    continue;
                }
                // Let a burst of saves settle into one rebuild.
                let mut quiet = tokio::time::Instant::now() + SETTLE;
                loop {
                    match tokio::time::timeout_at(quiet, changes.recv()).await {
                        Ok(Some(path)) if is_source(&project.dir, &path) => {
                            quiet = tokio::time::Instant::now() + SETTLE;
                        }
                        Ok(Some(_)) => {}
                        Ok(None) | Err(_) => break,
                    }
                }
                eprintln!("wharf dev: {} changed", first.strip_prefix(&project.dir).unwrap_or(&first).display());
                if project.build().await
                    && let Err(err) = install_service(&project, services.path())
                {
                    eprintln!("wharf dev: {err:#}");
                }
            }
        }
    }
    drop(watcher);
    serving.shutdown().await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_dev_manifest_exposes_errors_and_hands_out_its_secrets() {
        let (text, sources) = dev_manifest(
            "[env]\nA = \"1\"\n[secrets]\nkey = { env = \"SHOP_KEY\" }\nfile = { file = \"/tmp/x\" }\n",
        )
        .unwrap();
        let table: toml::Table = toml::from_str(&text).unwrap();
        assert_eq!(table["http"]["expose_errors"].as_bool(), Some(true));
        assert_eq!(table["env"]["A"].as_str(), Some("1"));
        assert!(sources.allows_env("SHOP_KEY"));
        assert!(!sources.dirs().is_empty());
    }

    #[test]
    fn sources_are_told_from_build_outputs() {
        let project = Path::new("/p");
        assert!(is_source(project, Path::new("/p/index.js")));
        assert!(is_source(project, Path::new("/p/src/lib.rs")));
        for output in [
            "/p/node_modules/x/index.js",
            "/p/dist/service.js",
            "/p/shop.wasm",
            "/p/target/x",
            "/p/.git/HEAD",
            "/p/.index.js.swp",
            "/elsewhere/index.js",
        ] {
            assert!(!is_source(project, Path::new(output)), "{output}");
        }
    }

    #[test]
    fn a_project_is_found_by_its_build_file_and_manifest() {
        let dir = tempfile::tempdir().unwrap();
        assert!(Project::detect(dir.path()).is_err());
        std::fs::write(dir.path().join("shop.toml"), "").unwrap();
        std::fs::write(dir.path().join("package.json"), "{}").unwrap();
        std::fs::write(dir.path().join("tsconfig.json"), "{}").unwrap();
        let project = Project::detect(dir.path()).unwrap();
        assert_eq!(project.name, "shop");
        assert_eq!(project.build, ["npm", "run", "build"]);
        std::fs::write(dir.path().join("other.toml"), "").unwrap();
        assert!(
            Project::detect(dir.path())
                .unwrap_err()
                .to_string()
                .contains("several manifests")
        );
    }
}
