//! Keeps the architecture documented in the crate docs true, from the
//! source files alone:
//!
//! - **Layers import only downwards.** Every path a layer's code names —
//!   `crate::…`, or `super::…` resolved to where it lands — must be in that
//!   layer or one below it; a `super::` that leaves its layer is named as
//!   such (write the `crate::` path, so the direction shows).
//! - **No circles.** Inside every folder, its files and subfolders (each
//!   subfolder seen from outside as one room) must not import each other in
//!   a loop; the same holds between the layers at the top. A folder's
//!   `mod.rs` is its face — it declares its files and hands their names on
//!   (`pub use`) — so a path to a name the face re-exports counts as a path
//!   to the file that defines it, and the face itself takes part in no
//!   circle of its folder.
//!
//! The reading is lexical, as the compiler's would be after macro expansion
//! only approximately: comments and `#[cfg(test)] mod tests` are skipped,
//! and paths inside inline modules are read as if written at file level.
//! The binary (`main.rs` and `cli/`) is checked for circles too; it may use
//! every layer, through the library's public API.

use std::collections::{BTreeMap, BTreeSet};
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

/// Top-level modules outside the layering: the crate root, the binary and
/// its room, and this check.
const UNLAYERED: &[&str] = &["lib", "main", "cli", "layers"];

/// The rank of a top-level module, `None` for names no layer owns.
fn rank(module: &str) -> Option<usize> {
    LAYERS
        .iter()
        .position(|(_, modules)| modules.contains(&module))
}

/// A module's path from the crate root: `["deploy", "source", "files"]`;
/// empty for the crate root.
type ModulePath = Vec<String>;

/// One source file: where it is, the module it is, and whether it is a
/// folder's face (`mod.rs`, or a crate root).
struct SourceFile {
    shown: String,
    module: ModulePath,
    is_face: bool,
    text: String,
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

/// Reads every `.rs` file under `src` as a module of the crate.
fn read_tree(src: &Path) -> Vec<SourceFile> {
    let mut paths = Vec::new();
    rust_files(src, &mut paths);
    paths.sort();
    paths
        .into_iter()
        .map(|path| {
            let relative = path.strip_prefix(src).expect("under src");
            let mut module: ModulePath = relative
                .components()
                .map(|c| c.as_os_str().to_string_lossy().into_owned())
                .collect();
            let file = module.pop().unwrap_or_default();
            let stem = file.strip_suffix(".rs").unwrap_or(&file).to_string();
            let is_face = stem == "mod" || (module.is_empty() && matches!(&*stem, "lib" | "main"));
            if !is_face {
                module.push(stem);
            }
            SourceFile {
                shown: relative.display().to_string(),
                module,
                is_face,
                text: code_of(&std::fs::read_to_string(&path).expect("read a source file")),
            }
        })
        .collect()
}

/// The code of `text`: without comments, and without the unit tests
/// (everything from `#[cfg(test)]` followed by a `mod` line).
fn code_of(text: &str) -> String {
    let mut code = String::with_capacity(text.len());
    let mut lines = text.lines().peekable();
    while let Some(line) = lines.next() {
        if line.trim() == "#[cfg(test)]"
            && lines
                .peek()
                .is_some_and(|next| next.trim_start().starts_with("mod "))
        {
            break;
        }
        code.push_str(line.split("//").next().unwrap_or_default());
        code.push('\n');
    }
    code
}

/// Every path in `code` that starts with `crate::` or `super::` (groups
/// `{a, b::c}` expanded), as its segments after the prefix, with the line
/// it starts on.
fn paths_in(code: &str) -> Vec<(usize, String, Vec<String>)> {
    let bytes = code.as_bytes();
    let mut found = Vec::new();
    for prefix in ["crate::", "super::"] {
        let mut from = 0;
        while let Some(at) = code[from..].find(prefix).map(|i| i + from) {
            from = at + prefix.len();
            let before = code[..at].chars().next_back();
            // `$crate::`, `mycrate::` and the second `super::` of a chain
            // are not the start of a path.
            if before.is_some_and(|c| c.is_alphanumeric() || c == '_' || c == '$' || c == ':') {
                continue;
            }
            let line = code[..at].matches('\n').count() + 1;
            let head = prefix.trim_end_matches("::").to_string();
            let mut position = at + prefix.len();
            for path in parse_path(bytes, &mut position) {
                found.push((line, head.clone(), path));
            }
        }
    }
    found
}

/// Parses a path's segments from `bytes[*at..]`: `a::b::{c, d::e}` gives
/// `[a, b, c]` and `[a, b, d, e]`.
fn parse_path(bytes: &[u8], at: &mut usize) -> Vec<Vec<String>> {
    let skip_space = |at: &mut usize| {
        while *at < bytes.len() && bytes[*at].is_ascii_whitespace() {
            *at += 1;
        }
    };
    let mut segments = Vec::new();
    loop {
        skip_space(at);
        if *at < bytes.len() && bytes[*at] == b'{' {
            *at += 1;
            let mut paths = Vec::new();
            loop {
                skip_space(at);
                if *at >= bytes.len() || bytes[*at] == b'}' {
                    *at += 1;
                    break;
                }
                for tail in parse_path(bytes, at) {
                    let mut path = segments.clone();
                    path.extend(tail);
                    paths.push(path);
                }
                skip_space(at);
                // Past `as NAME` to the next item.
                while *at < bytes.len() && bytes[*at] != b',' && bytes[*at] != b'}' {
                    *at += 1;
                }
                if *at < bytes.len() && bytes[*at] == b',' {
                    *at += 1;
                }
            }
            return paths;
        }
        let start = *at;
        while *at < bytes.len()
            && (bytes[*at].is_ascii_alphanumeric() || bytes[*at] == b'_' || bytes[*at] == b'*')
        {
            *at += 1;
        }
        if *at == start {
            break;
        }
        segments.push(String::from_utf8_lossy(&bytes[start..*at]).into_owned());
        if bytes.get(*at..*at + 2) == Some(b"::") {
            *at += 2;
        } else {
            break;
        }
    }
    vec![segments]
}

/// What the check knows of the crate: its modules, and the names each face
/// re-exports (face module → name → the module it comes from).
struct Tree {
    modules: BTreeSet<ModulePath>,
    reexports: BTreeMap<ModulePath, BTreeMap<String, ModulePath>>,
}

impl Tree {
    fn new(files: &[SourceFile]) -> Tree {
        let modules: BTreeSet<ModulePath> = files.iter().map(|f| f.module.clone()).collect();
        let mut tree = Tree {
            modules,
            reexports: BTreeMap::new(),
        };
        for file in files.iter().filter(|f| f.is_face) {
            let mut names = BTreeMap::new();
            for statement in file.text.split(';') {
                let statement = statement.trim();
                let Some(rest) = ["pub use ", "pub(crate) use "]
                    .iter()
                    .find_map(|p| statement.strip_prefix(p))
                else {
                    continue;
                };
                let mut at = 0;
                for path in parse_path(rest.as_bytes(), &mut at) {
                    let (Some(name), Some(first)) = (path.last(), path.first()) else {
                        continue;
                    };
                    let mut target = file.module.clone();
                    let segments = match first.as_str() {
                        "crate" => {
                            target.clear();
                            &path[1..]
                        }
                        "self" => &path[1..],
                        _ => &path[..],
                    };
                    target.extend(segments[..segments.len().saturating_sub(1)].iter().cloned());
                    names.insert(name.clone(), tree.module_of_path(&target));
                }
            }
            tree.reexports
                .entry(file.module.clone())
                .or_default()
                .extend(names);
        }
        tree
    }

    /// The deepest module `path` names (a path of modules and then items).
    fn module_of_path(&self, path: &[String]) -> ModulePath {
        (0..=path.len())
            .rev()
            .map(|len| path[..len].to_vec())
            .find(|prefix| self.modules.contains(prefix))
            .unwrap_or_default()
    }

    /// The module that defines what `path` names: the deepest module on
    /// it, followed through the face's re-export of the next name.
    fn target(&self, path: &[String]) -> ModulePath {
        let mut module = self.module_of_path(path);
        let Some(name) = path.get(module.len()) else {
            return module;
        };
        // A face may hand on what another face handed on: follow a few.
        for _ in 0..8 {
            match self
                .reexports
                .get(&module)
                .and_then(|names| names.get(name))
            {
                Some(defined) if *defined != module => module = defined.clone(),
                _ => break,
            }
        }
        module
    }
}

/// One import: from a file (as a module) to the module it reaches.
struct Import {
    from: usize,
    line: usize,
    to: ModulePath,
    via_super: bool,
}

/// Every import of every file, resolved.
fn imports(files: &[SourceFile], tree: &Tree) -> Vec<Import> {
    let mut imports = Vec::new();
    for (index, file) in files.iter().enumerate() {
        // `super` of a file is its folder's parent module for a face, its
        // folder for any other file.
        let mut parent = file.module.clone();
        parent.pop();
        for (line, head, segments) in paths_in(&file.text) {
            let mut path = if head == "crate" {
                Vec::new()
            } else {
                parent.clone()
            };
            let mut segments = segments.as_slice();
            while segments.first().is_some_and(|s| s == "super") {
                path.pop();
                segments = &segments[1..];
            }
            path.extend(segments.iter().cloned());
            imports.push(Import {
                from: index,
                line,
                to: tree.target(&path),
                via_super: head == "super",
            });
        }
    }
    imports
}

/// The layering and circle violations in the crate under `src`.
fn check(src: &Path) -> Vec<String> {
    let files = read_tree(src);
    let tree = Tree::new(&files);
    let imports = imports(&files, &tree);
    let mut violations = layer_violations(&files, &imports);
    violations.extend(circles(&files, &imports));
    violations
}

fn layer_violations(files: &[SourceFile], imports: &[Import]) -> Vec<String> {
    let mut violations = Vec::new();
    for (index, file) in files.iter().enumerate() {
        let Some(top) = file.module.first() else {
            continue;
        };
        if UNLAYERED.contains(&top.as_str()) {
            continue;
        }
        if rank(top).is_none() {
            violations.push(format!(
                "{}: top-level module `{top}` belongs to no layer (add it to LAYERS in layers.rs and to the table in lib.rs)",
                file.shown
            ));
            continue;
        }
        let own = rank(top).unwrap_or_default();
        for import in imports.iter().filter(|i| i.from == index) {
            let Some(target) = import.to.first() else {
                continue;
            };
            if import.via_super && target != top {
                violations.push(format!(
                    "{}:{}: a `super::` path leaves the {} layer for `{target}`; write the `crate::` path",
                    file.shown, import.line, LAYERS[own].0
                ));
                continue;
            }
            match rank(target) {
                Some(rank) if rank <= own => {}
                Some(_) => violations.push(format!(
                    "{}:{}: the {} layer uses `crate::{target}`, a layer above it",
                    file.shown, import.line, LAYERS[own].0
                )),
                None => violations.push(format!(
                    "{}:{}: `crate::{target}` is not a layer; name the layer's path (e.g. `crate::base::limits::Limits`)",
                    file.shown, import.line
                )),
            }
        }
    }
    violations
}

/// The room of `folder` that `module` is in or under: the file or
/// subfolder of `folder` holding it (a subfolder's face is that subfolder,
/// seen from outside). `None` if it is not under `folder`, or is `folder`'s
/// own face.
fn room_of<'m>(folder: &[String], module: &'m [String]) -> Option<&'m str> {
    if !module.starts_with(folder) || module.len() == folder.len() {
        return None;
    }
    Some(module[folder.len()].as_str())
}

/// Circles between the rooms (files and subfolders) of every folder.
fn circles(files: &[SourceFile], imports: &[Import]) -> Vec<String> {
    // Every folder: the module paths that have a face.
    let folders: BTreeSet<ModulePath> = files
        .iter()
        .filter(|f| f.is_face)
        .map(|f| f.module.clone())
        .collect();
    let mut violations = Vec::new();
    for folder in &folders {
        // room -> room -> an example import, for the message.
        let mut edges: BTreeMap<&str, BTreeMap<&str, String>> = BTreeMap::new();
        for import in imports {
            let file = &files[import.from];
            let Some(from) = room_of(folder, &file.module) else {
                continue;
            };
            // A face of this folder's own is not a room of it.
            let Some(to) = room_of(folder, &import.to) else {
                continue;
            };
            if from != to {
                edges
                    .entry(from)
                    .or_default()
                    .entry(to)
                    .or_insert_with(|| format!("{}:{}", file.shown, import.line));
            }
        }
        for circle in find_circles(&edges) {
            let shown: Vec<String> = circle
                .windows(2)
                .map(|pair| format!("{} -> {} ({})", pair[0], pair[1], edges[pair[0]][pair[1]]))
                .collect();
            let place = if folder.is_empty() {
                "the crate's top level".to_string()
            } else {
                format!("{}/", folder.join("/"))
            };
            violations.push(format!(
                "a circle in {place}: {}; move what both use to a room below them",
                shown.join(", ")
            ));
        }
    }
    violations
}

/// One circle per strongly connected group of rooms, as a closed walk
/// (`[a, b, a]`).
fn find_circles<'a>(edges: &BTreeMap<&'a str, BTreeMap<&'a str, String>>) -> Vec<Vec<&'a str>> {
    let mut circles = Vec::new();
    let mut reported: BTreeSet<&str> = BTreeSet::new();
    for &start in edges.keys() {
        if reported.contains(start) {
            continue;
        }
        // Breadth-first from `start` back to itself: the shortest circle.
        let mut came_from: BTreeMap<&str, &str> = BTreeMap::new();
        let mut queue = std::collections::VecDeque::from([start]);
        let mut closed = None;
        while let Some(room) = queue.pop_front() {
            for &next in edges.get(room).map(|m| m.keys()).into_iter().flatten() {
                if next == start {
                    closed = Some(room);
                    break;
                }
                if !came_from.contains_key(next) {
                    came_from.insert(next, room);
                    queue.push_back(next);
                }
            }
            if closed.is_some() {
                break;
            }
        }
        if let Some(last) = closed {
            // Back from the room that closes the circle to `start`.
            let mut walk = vec![last];
            let mut room = last;
            while let Some(&previous) = came_from.get(room) {
                walk.push(previous);
                room = previous;
            }
            if room != start {
                walk.push(start);
            }
            walk.reverse();
            walk.push(start);
            reported.extend(walk.iter().copied());
            circles.push(walk);
        }
    }
    circles
}

#[test]
fn layers_import_only_downwards_and_no_folder_has_a_circle() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let violations = check(&src);
    assert!(
        violations.is_empty(),
        "architecture violations:\n{}",
        violations.join("\n")
    );
}

#[test]
fn a_planted_violation_of_each_kind_is_caught() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let src = dir.path();
    let write = |path: &str, text: &str| {
        let path = src.join(path);
        std::fs::create_dir_all(path.parent().expect("a parent")).expect("create folders");
        std::fs::write(path, text).expect("write a planted file");
    };
    write("lib.rs", "mod base;\nmod deploy;\nmod guest;\n");
    write("base/mod.rs", "pub mod clock;\n");
    // Upwards, through a grouped `use` over two lines.
    write(
        "base/clock.rs",
        "use crate::{\n    guest::Guest,\n};\npub struct Clock;\n",
    );
    write("guest/mod.rs", "pub mod runner;\npub use runner::Guest;\n");
    // A `super::` out of the layer (down, so only the `super` is wrong).
    write(
        "guest/runner.rs",
        "use super::super::base::clock::Clock;\npub struct Guest;\n",
    );
    // A circle between two files, one side through the face's re-export.
    write(
        "deploy/mod.rs",
        "pub mod a;\npub mod b;\npub use a::Alpha;\n",
    );
    write(
        "deploy/a.rs",
        "use crate::deploy::b::Beta;\npub struct Alpha;\n",
    );
    write(
        "deploy/b.rs",
        "use crate::deploy::Alpha;\npub struct Beta;\n",
    );
    // A circle between two subfolders.
    write("deploy/c/mod.rs", "pub mod x;\n");
    write(
        "deploy/c/x.rs",
        "use crate::deploy::d::y::Y;\npub struct X;\n",
    );
    write("deploy/d/mod.rs", "pub mod y;\n");
    write(
        "deploy/d/y.rs",
        "use crate::deploy::c::x::X;\npub struct Y;\n",
    );
    // Tests and comments are not imports.
    write(
        "base/quiet.rs",
        "// crate::deploy::a::Alpha\n#[cfg(test)]\nmod tests {\n    use crate::deploy::a::Alpha;\n}\n",
    );
    let violations = check(src);
    let has = |needle: &str| violations.iter().any(|v| v.contains(needle));
    assert!(
        has("base/clock.rs:1: the base layer uses `crate::guest`"),
        "{violations:#?}"
    );
    assert!(
        has("guest/runner.rs:1: a `super::` path leaves the guest layer"),
        "{violations:#?}"
    );
    assert!(has("a circle in deploy/: a -> b"), "{violations:#?}");
    assert!(has("a circle in deploy/: c -> d"), "{violations:#?}");
    // The upward import and the downward one close a circle of layers.
    assert!(
        has("a circle in the crate's top level: base -> guest"),
        "{violations:#?}"
    );
    assert!(
        !violations.iter().any(|v| v.contains("quiet")),
        "{violations:#?}"
    );
    assert_eq!(violations.len(), 5, "{violations:#?}");
}

#[test]
fn paths_are_found_in_code_with_groups_expanded() {
    let code = code_of(
        "use crate::guest::{Guest, engine::{Tier, self}};\n// crate::ops\nlet x = crate::base::respond::empty();\n$crate::foo; mycrate::bar; super::super::x::Y;",
    );
    let paths: Vec<(usize, String)> = paths_in(&code)
        .into_iter()
        .map(|(line, head, path)| (line, format!("{head}::{}", path.join("::"))))
        .collect();
    assert_eq!(
        paths,
        [
            (1, "crate::guest::Guest".to_string()),
            (1, "crate::guest::engine::Tier".to_string()),
            (1, "crate::guest::engine::self".to_string()),
            (3, "crate::base::respond::empty".to_string()),
            (4, "super::super::x::Y".to_string()),
        ]
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
