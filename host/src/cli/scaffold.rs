//! `wharf new NAME --lang LANG`: a ready-to-build service project from
//! templates shipped in the binary — its source (a JSON hello that reads the
//! path, a query parameter and a POST body), the WIT it builds against, the
//! ecosystem's own build file and a commented `NAME.toml`.

use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result, bail};

use wharf::validate_name;

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

/// The WIT every project carries, self-contained (no symlinks): the WASI
/// 0.2 dependencies of the proxy world at the version each toolchain
/// implements, and wasi:keyvalue and wasi:config.
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
            KEYVALUE_WIT,
            CONFIG_WIT,
        ]
    };
}

type File = (&'static str, &'static str);
type Files = &'static [File];

/// wasi:keyvalue at the version Wharf's JavaScript, Python and Rust helpers use.
const KEYVALUE_WIT: File = (
    "wit/deps/keyvalue.wit",
    include_str!("../../../wit/keyvalue-0.2.0-draft/keyvalue.wit"),
);
/// wasi:config likewise.
const CONFIG_WIT: File = (
    "wit/deps/config.wit",
    include_str!("../../../wit/config-0.2.0-rc.1/config.wit"),
);

const RUST: Files = &[
    (
        "Cargo.toml",
        include_str!("../../templates/rust/Cargo.toml"),
    ),
    (
        "src/lib.rs",
        include_str!("../../templates/rust/src/lib.rs"),
    ),
    (
        "src/wharf.rs",
        include_str!("../../templates/rust/src/wharf.rs"),
    ),
    (
        "wit/world.wit",
        include_str!("../../templates/wit/capabilities.wit"),
    ),
    KEYVALUE_WIT,
    CONFIG_WIT,
    (".gitignore", "target/\n"),
];
/// The JavaScript runtime and build every JavaScript or TypeScript project
/// carries in `wharf/`.
const JS_RUNTIME: Files = &[
    (
        "wharf/index.js",
        include_str!("../../templates/js-runtime/index.js"),
    ),
    (
        "wharf/index.d.ts",
        include_str!("../../templates/js-runtime/index.d.ts"),
    ),
    (
        "wharf/globals.js",
        include_str!("../../templates/js-runtime/globals.js"),
    ),
    (
        "wharf/process.js",
        include_str!("../../templates/js-runtime/process.js"),
    ),
    (
        "wharf/url.js",
        include_str!("../../templates/js-runtime/url.js"),
    ),
    (
        "wharf/build.mjs",
        include_str!("../../templates/js-runtime/build.mjs"),
    ),
    (
        ".gitignore",
        include_str!("../../templates/js-runtime/gitignore"),
    ),
    (
        "wit/service.wit",
        include_str!("../../templates/wit/service-0.2.10.wit"),
    ),
];
const JAVASCRIPT: Files = &[
    (
        "package.json",
        include_str!("../../templates/js/package.json"),
    ),
    ("build.mjs", include_str!("../../templates/js/build.mjs")),
    ("index.js", include_str!("../../templates/js/index.js")),
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
];
const PYTHON: Files = &[
    ("app.py", include_str!("../../templates/python/app.py")),
    ("wharf.py", include_str!("../../templates/python/wharf.py")),
    (
        "pyproject.toml",
        include_str!("../../templates/python/pyproject.toml"),
    ),
    ("build.sh", include_str!("../../templates/python/build.sh")),
    (
        "wit/service.wit",
        include_str!("../../templates/wit/service-0.2.12.wit"),
    ),
    (".gitignore", "__pycache__/\n.venv/\n*.wasm\n"),
];
const PYTHON_WIT: Files = wasi_deps!("0.2.12");
const MANIFEST: &str = include_str!("../../templates/manifest.toml");

/// The manifest's `[instance]` table for `language`. A JavaScript or
/// TypeScript service reuses its instances: starting its engine is most of
/// a request's work (128 requests per instance, as `wasmtime serve` and
/// Spin do), and serve() calls the handler afresh for every request. The
/// other languages start in microseconds and keep a fresh instance each.
fn instance_section(language: Language) -> &'static str {
    match language {
        Language::JavaScript | Language::TypeScript => {
            "# One instance serves this many requests in turn before a fresh one\n\
             # starts: a JavaScript engine costs more to start than most requests\n\
             # cost to serve. As in a Node.js process, what the module keeps in its\n\
             # own variables lives on between those requests (and the requests of\n\
             # different clients); set 1 for a fresh instance per request.\n\
             [instance]\n\
             reuse = 128\n"
        }
        Language::Python | Language::Rust => {
            "# A fresh instance per request (the default); to reuse one instance\n\
             # for up to N requests in turn, keeping its memory between them:\n\
             # [instance]\n\
             # reuse = 128\n"
        }
    }
}

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
        Language::JavaScript => &[JAVASCRIPT, JS_RUNTIME, JAVASCRIPT_WIT],
        Language::TypeScript => &[TYPESCRIPT, JS_RUNTIME, JAVASCRIPT_WIT],
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
        let text = text
            .replace("{{instance}}", instance_section(language))
            .replace("{{name}}", name)
            .replace("{{NAME}}", &name.to_ascii_uppercase().replace('-', "_"));
        std::fs::write(&target, text).with_context(|| format!("writing {}", target.display()))?;
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
        "cd {shown}\n  {build}\n  wharf dev                                # serve it at http://127.0.0.1:8080/{name}, rebuilt on every save\n  wharf check {artefact} --manifest {name}.toml --name {name}\n  wharf deploy {artefact} --manifest {name}.toml --name {name} --to http://HOST:ADMIN_PORT\n  # or copy {name}.toml and {artefact} (as {name}.wasm) into a directory `wharf serve` watches"
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
        // Self-contained: real files, the whole world, the runtime.
        for file in [
            "wit/deps/keyvalue.wit",
            "wit/deps/config.wit",
            "wharf/index.js",
        ] {
            let meta = std::fs::symlink_metadata(target.join(file)).unwrap();
            assert!(meta.is_file(), "{file}");
        }
        let world = std::fs::read_to_string(target.join("wit/service.wit")).unwrap();
        assert!(world.contains("wasi:keyvalue/store@0.2.0-draft"), "{world}");
        let manifest = std::fs::read_to_string(target.join("orders.toml")).unwrap();
        assert!(
            manifest.contains("ORDERS_API_KEY") && !manifest.contains("{{"),
            "{manifest}"
        );
        assert!(
            create("orders", Language::Rust, &target)
                .unwrap_err()
                .to_string()
                .contains("not empty")
        );
        assert!(create("Bad Name", Language::Rust, &dir.path().join("x")).is_err());
    }
}
