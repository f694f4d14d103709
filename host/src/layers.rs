//! Keeps the layering documented in the crate docs true: every `crate::`
//! path in a layer's code must name that layer or one below it.

use std::path::{Path, PathBuf};

/// The layers, lowest first, and the top-level modules each one owns. A
/// module may use modules of its own rank or lower.
const LAYERS: &[(&str, &[&str])] = &[
    ("base", &["base"]),
    ("capabilities", &["capabilities"]),
    ("guest", &["guest"]),
    ("deploy", &["deploy"]),
    ("serve", &["serve"]),
    ("host", &["host", "config"]),
    ("ops", &["ops"]),
];

/// The rank of a top-level module, `None` for names no layer owns.
fn rank(module: &str) -> Option<usize> {
    LAYERS
        .iter()
        .position(|(_, modules)| modules.contains(&module))
}

/// The top-level module a source file belongs to (`guest` for
/// `guest/invoke.rs`, `host` for `host.rs`); `None` for the crate root and
/// the binary, which may use everything.
fn module_of(src: &Path, file: &Path) -> Option<String> {
    let relative = file.strip_prefix(src).ok()?;
    let first = relative.components().next()?.as_os_str().to_str()?;
    let module = first.strip_suffix(".rs").unwrap_or(first);
    match module {
        // The binary and its room (`cli/`) may use the whole library.
        "lib" | "main" | "layers" | "cli" => None,
        other => Some(other.to_string()),
    }
}

fn rust_files(dir: &Path, found: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("read the source directory") {
        let path = entry.expect("directory entry").path();
        if path.is_dir() {
            rust_files(&path, found);
        } else if path.extension().is_some_and(|e| e == "rs") {
            found.push(path);
        }
    }
}

/// Every `crate::NAME` in the code (not comments) of `text`, with its line.
fn crate_paths(text: &str) -> Vec<(usize, String)> {
    let mut paths = Vec::new();
    for (number, line) in text.lines().enumerate() {
        let code = line.split("//").next().unwrap_or_default();
        let mut rest = code;
        while let Some(at) = rest.find("crate::") {
            let before = rest[..at].chars().next_back();
            rest = &rest[at + "crate::".len()..];
            // `$crate::` and identifiers ending in "crate" are not this.
            if before.is_some_and(|c| c.is_alphanumeric() || c == '_' || c == '$') {
                continue;
            }
            let name: String = rest
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect();
            paths.push((number + 1, name));
        }
    }
    paths
}

#[test]
fn layers_import_only_downwards() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut violations = Vec::new();
    for file in &files {
        let Some(module) = module_of(&src, file) else {
            continue;
        };
        let shown = file.strip_prefix(&src).unwrap_or(file).display();
        let Some(own) = rank(&module) else {
            violations.push(format!(
                "{shown}: top-level module `{module}` belongs to no layer (add it to LAYERS in layers.rs and to the table in lib.rs)"
            ));
            continue;
        };
        let text = std::fs::read_to_string(file).expect("read a source file");
        if let Some(number) = text.lines().position(|line| {
            line.split("//")
                .next()
                .unwrap_or_default()
                .contains("super::super")
        }) {
            violations.push(format!(
                "{shown}:{}: `super::super` reaches out of the layer; use a `crate::` path",
                number + 1
            ));
        }
        for (line, name) in crate_paths(&text) {
            match rank(&name) {
                Some(target) if target <= own => {}
                Some(_) => violations.push(format!(
                    "{shown}:{line}: the {} layer uses `crate::{name}`, a layer above it",
                    LAYERS[own].0
                )),
                None => violations.push(format!(
                    "{shown}:{line}: `crate::{name}` is not a layer; name the layer's path (e.g. `crate::base::limits::Limits`)"
                )),
            }
        }
    }
    assert!(
        violations.is_empty(),
        "layering violations:\n{}",
        violations.join("\n")
    );
}

#[test]
fn crate_paths_are_found_in_code_only() {
    let text = "use crate::guest::Guest;\n// crate::ops in a comment\nlet x = crate::base::respond::empty(); // crate::host\n$crate::foo; mycrate::bar;";
    assert_eq!(
        crate_paths(text),
        [(1, "guest".to_string()), (3, "base".to_string())]
    );
}

#[test]
fn ranks_follow_the_documented_order() {
    assert!(rank("base") < rank("capabilities"));
    assert!(rank("capabilities") < rank("guest"));
    assert!(rank("guest") < rank("deploy"));
    assert!(rank("deploy") < rank("serve"));
    assert!(rank("serve") < rank("host"));
    assert_eq!(rank("config"), rank("host"));
    assert!(rank("host") < rank("ops"));
    assert_eq!(rank("lib"), None);
}
