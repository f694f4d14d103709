//! `wharf new NAME --lang LANG`: a ready-to-build service project from
//! templates shipped in the binary — its source (a JSON hello that reads the
//! path, a query parameter and a POST body), the WIT it builds against, the
//! ecosystem's own build file and a commented `NAME.toml`.

use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result, bail};

use crate::deploy::deployment::validate_name;

/// The languages `wharf new` has templates for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Language {
    /// Rust, with the `wasip2` crate's bindings.
    Rust,
    /// JavaScript, built with ComponentizeJS.
    JavaScript,
    /// TypeScript, compiled by `tsc`, then built with ComponentizeJS.
    TypeScript,
    /// Python, built with componentize-py.
    Python,
}

impl std::str::FromStr for Language {
    type Err = String;

    fn from_str(text: &str) -> Result<Language, String> {
        match text.to_ascii_lowercase().as_str() {
            "rust" | "rs" => Ok(Language::Rust),
            "js" | "javascript" => Ok(Language::JavaScript),
            "python" | "py" => Ok(Language::Python),
            "ts" | "typescript" => Ok(Language::TypeScript),
            other => Err(format!("{other:?}: use js, ts, python or rust")),
        }
    }
}

/// The WASI 0.2 dependencies of the proxy world, at the version each
/// toolchain implements.
macro_rules! wasi_deps {
    ($version:literal) => {
        &[
            (
                "wit/deps/cli.wit",
                include_str!(concat!("../../../wit/wasi-", $version, "/deps/cli.wit")),
            ),
            (
                "wit/deps/clocks.wit",
                include_str!(concat!("../../../wit/wasi-", $version, "/deps/clocks.wit")),
            ),
            (
                "wit/deps/filesystem.wit",
                include_str!(concat!(
                    "../../../wit/wasi-",
                    $version,
                    "/deps/filesystem.wit"
                )),
            ),
            (
                "wit/deps/http.wit",
                include_str!(concat!("../../../wit/wasi-", $version, "/deps/http.wit")),
            ),
            (
                "wit/deps/io.wit",
                include_str!(concat!("../../../wit/wasi-", $version, "/deps/io.wit")),
            ),
            (
                "wit/deps/random.wit",
                include_str!(concat!("../../../wit/wasi-", $version, "/deps/random.wit")),
            ),
            (
                "wit/deps/sockets.wit",
                include_str!(concat!("../../../wit/wasi-", $version, "/deps/sockets.wit")),
            ),
        ]
    };
}

type Files = &'static [(&'static str, &'static str)];

const RUST: Files = &[
    (
        "Cargo.toml",
        include_str!("../../templates/rust/Cargo.toml"),
    ),
    (
        "src/lib.rs",
        include_str!("../../templates/rust/src/lib.rs"),
    ),
];
const JAVASCRIPT: Files = &[
    (
        "package.json",
        include_str!("../../templates/js/package.json"),
    ),
    ("build.mjs", include_str!("../../templates/js/build.mjs")),
    ("index.js", include_str!("../../templates/js/index.js")),
    (
        "wit/service.wit",
        "package wharf:service;\n\nworld service {\n  include wasi:http/proxy@0.2.10;\n}\n",
    ),
];
const JAVASCRIPT_WIT: Files = wasi_deps!("0.2.10");
const TYPESCRIPT: Files = &[
    (
        "package.json",
        include_str!("../../templates/ts/package.json"),
    ),
    (
        "tsconfig.json",
        include_str!("../../templates/ts/tsconfig.json"),
    ),
    ("build.mjs", include_str!("../../templates/ts/build.mjs")),
    ("index.ts", include_str!("../../templates/ts/index.ts")),
    (
        "wit/service.wit",
        "package wharf:service;\n\nworld service {\n  include wasi:http/proxy@0.2.10;\n}\n",
    ),
];
const PYTHON: Files = &[
    ("app.py", include_str!("../../templates/python/app.py")),
    (
        "pyproject.toml",
        include_str!("../../templates/python/pyproject.toml"),
    ),
    ("build.sh", include_str!("../../templates/python/build.sh")),
    (
        "wit/service.wit",
        "package wharf:service;\n\nworld service {\n  include wasi:http/proxy@0.2.12;\n}\n",
    ),
];
const PYTHON_WIT: Files = wasi_deps!("0.2.12");
const MANIFEST: &str = include_str!("../../templates/manifest.toml");

/// A project `wharf new` made.
#[derive(Debug)]
pub struct Project {
    /// Its directory.
    pub dir: PathBuf,
    /// The files written, relative to it.
    pub files: Vec<String>,
    /// The commands that build it and deploy the result.
    pub next_steps: String,
}

/// Writes a new service project for `name` in `language` into `dir` (which
/// must not exist, or be empty).
pub fn create(name: &str, language: Language, dir: &Path) -> Result<Project> {
    validate_name(name).map_err(anyhow::Error::msg)?;
    if dir.exists()
        && std::fs::read_dir(dir)
            .with_context(|| format!("reading {}", dir.display()))?
            .next()
            .is_some()
    {
        bail!("{} exists and is not empty", dir.display());
    }
    let sets: &[Files] = match language {
        Language::Rust => &[RUST],
        Language::JavaScript => &[JAVASCRIPT, JAVASCRIPT_WIT],
        Language::TypeScript => &[TYPESCRIPT, JAVASCRIPT_WIT],
        Language::Python => &[PYTHON, PYTHON_WIT],
    };
    let mut files = Vec::new();
    let manifest = format!("{name}.toml");
    for (path, text) in sets
        .iter()
        .flat_map(|set| set.iter().copied())
        .chain([(manifest.as_str(), MANIFEST)])
    {
        let target = dir.join(path);
        if let Some(parent) = target.parent() {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("creating {}", parent.display()))?;
        }
        std::fs::write(&target, text.replace("{{name}}", name))
            .with_context(|| format!("writing {}", target.display()))?;
        files.push(path.to_string());
    }
    #[cfg(unix)]
    if language == Language::Python {
        use std::os::unix::fs::PermissionsExt as _;
        let script = dir.join("build.sh");
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755))
            .with_context(|| format!("making {} executable", script.display()))?;
    }
    let shown = dir.display();
    let artefact = match language {
        Language::Rust => format!(
            "target/wasm32-wasip2/release/{}.wasm",
            name.replace('-', "_")
        ),
        Language::JavaScript | Language::TypeScript | Language::Python => format!("{name}.wasm"),
    };
    let build = match language {
        Language::Rust => {
            "rustup target add wasm32-wasip2\n  cargo build --release --target wasm32-wasip2"
                .to_string()
        }
        Language::JavaScript | Language::TypeScript => "npm install\n  npm run build".to_string(),
        Language::Python => {
            "python3 -m venv .venv && . .venv/bin/activate && pip install .\n  sh build.sh"
                .to_string()
        }
    };
    let next_steps = format!(
        "cd {shown}\n  {build}\n  wharf check {artefact} --manifest {name}.toml --name {name}\n  cp {name}.toml path/to/services/ && cp {artefact} path/to/services/{name}.wasm   # a running `wharf serve` deploys it at /{name}\n  # or: wharf deploy {artefact} --manifest {name}.toml --name {name} --to http://HOST:ADMIN_PORT"
    );
    Ok(Project {
        dir: dir.to_path_buf(),
        files,
        next_steps,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn languages_parse_with_a_clear_refusal() {
        assert_eq!("JS".parse::<Language>(), Ok(Language::JavaScript));
        assert_eq!("py".parse::<Language>(), Ok(Language::Python));
        assert_eq!("ts".parse::<Language>(), Ok(Language::TypeScript));
        assert!(
            "cobol"
                .parse::<Language>()
                .unwrap_err()
                .contains("js, ts, python or rust")
        );
    }

    #[test]
    fn a_project_is_written_with_its_name_and_never_over_files() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("orders");
        let project = create("orders", Language::JavaScript, &target).unwrap();
        assert!(project.files.contains(&"orders.toml".to_string()));
        let package = std::fs::read_to_string(target.join("package.json")).unwrap();
        assert!(package.contains("\"name\": \"orders\""), "{package}");
        assert!(!package.contains("{{name}}"));
        assert!(target.join("wit/deps/http.wit").is_file());
        assert!(
            create("orders", Language::Rust, &target)
                .unwrap_err()
                .to_string()
                .contains("not empty")
        );
        assert!(create("Bad Name", Language::Rust, &dir.path().join("x")).is_err());
    }
}
