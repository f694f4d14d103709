//! The manual: every link in `README.md` and `docs/` leads somewhere, and
//! every `wharf` and `cargo xtask` command they show is one the binaries
//! have, with flags they accept.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

fn repository() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// `README.md` and every page of `docs/`, with their text.
fn pages() -> Vec<(PathBuf, String)> {
    let root = repository();
    let mut paths = vec![root.join("README.md")];
    let mut docs: Vec<PathBuf> = std::fs::read_dir(root.join("docs"))
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.extension().is_some_and(|e| e == "md"))
        .collect();
    docs.sort();
    paths.extend(docs);
    paths
        .into_iter()
        .map(|path| {
            let text = std::fs::read_to_string(&path).unwrap();
            (path, text)
        })
        .collect()
}

/// The anchor GitHub gives a heading: lower case, punctuation dropped,
/// spaces as hyphens.
fn anchor_of(heading: &str) -> String {
    heading
        .trim()
        .chars()
        .filter_map(|c| match c {
            ' ' => Some('-'),
            c if c.is_alphanumeric() || c == '-' || c == '_' => Some(c.to_ascii_lowercase()),
            _ => None,
        })
        .collect()
}

/// The anchors of a page's headings (outside code blocks).
fn anchors(text: &str) -> BTreeSet<String> {
    let mut in_code = false;
    let mut anchors = BTreeSet::new();
    for line in text.lines() {
        if line.starts_with("```") {
            in_code = !in_code;
        } else if !in_code && line.starts_with('#') {
            anchors.insert(anchor_of(line.trim_start_matches('#')));
        }
    }
    anchors
}

/// The targets of a page's Markdown links `[text](target)`.
fn links(text: &str) -> Vec<String> {
    let mut found = Vec::new();
    let mut rest = text;
    while let Some(at) = rest.find("](") {
        rest = &rest[at + 2..];
        if let Some(end) = rest.find(')') {
            found.push(rest[..end].to_string());
        }
    }
    found
}

#[test]
fn every_link_in_the_manual_leads_to_a_file_and_heading_that_exist() {
    let pages = pages();
    let headings: BTreeMap<PathBuf, BTreeSet<String>> = pages
        .iter()
        .map(|(path, text)| (path.canonicalize().unwrap(), anchors(text)))
        .collect();
    let mut broken = Vec::new();
    let mut checked = 0;
    for (page, text) in &pages {
        let dir = page.parent().unwrap();
        for link in links(text) {
            if link.starts_with("http://") || link.starts_with("https://") {
                continue;
            }
            let (file, anchor) = link.split_once('#').unwrap_or((&link, ""));
            let target = if file.is_empty() {
                page.clone()
            } else {
                dir.join(file)
            };
            checked += 1;
            let Ok(target) = target.canonicalize() else {
                broken.push(format!("{}: {link}: no such file", page.display()));
                continue;
            };
            if !anchor.is_empty()
                && headings
                    .get(&target)
                    .is_none_or(|anchors| !anchors.contains(anchor))
            {
                broken.push(format!("{}: {link}: no such heading", page.display()));
            }
        }
    }
    assert!(checked >= 30, "too few links found: {checked}");
    assert!(broken.is_empty(), "broken links:\n{}", broken.join("\n"));
}

/// Every command line the pages show, from code blocks and inline code:
/// the words after `prefix` up to a comment or the next command.
fn commands(text: &str, prefix: &str) -> Vec<Vec<String>> {
    let mut lines: Vec<String> = Vec::new();
    let mut in_code = false;
    for line in text.lines() {
        if line.starts_with("```") {
            in_code = !in_code;
        } else if in_code {
            lines.push(line.trim_start_matches("$ ").to_string());
        } else {
            // Inline code spans.
            lines.extend(line.split('`').skip(1).step_by(2).map(str::to_string));
        }
    }
    let mut found = Vec::new();
    for line in lines {
        for part in line
            .split("&&")
            .flat_map(|p| p.split('|'))
            .flat_map(|p| p.split(';'))
        {
            let part = part.split(" #").next().unwrap_or_default().trim();
            if let Some(rest) = part.strip_prefix(prefix) {
                let words = rest
                    .split_whitespace()
                    .map(|w| w.trim_matches(|c| c == '[' || c == ']').to_string())
                    .filter(|w| !w.is_empty())
                    .collect();
                found.push(words);
            }
        }
    }
    found
}

#[test]
fn every_command_in_the_manual_is_a_real_subcommand_with_real_flags() {
    let help = |args: &[&str]| {
        let output = Command::new(env!("CARGO_BIN_EXE_wharf"))
            .args(args)
            .arg("--help")
            .output()
            .unwrap();
        (
            output.status.success(),
            String::from_utf8_lossy(&output.stdout).into_owned(),
        )
    };
    let xtask = std::fs::read_to_string(repository().join("xtask/src/main.rs")).unwrap();
    let mut helps: BTreeMap<String, String> = BTreeMap::new();
    let mut wrong = Vec::new();
    let mut checked = 0;
    for (page, text) in pages() {
        let page = page.file_name().unwrap().to_string_lossy().into_owned();
        for words in commands(&text, "wharf ") {
            let Some(subcommand) = words.first() else {
                continue;
            };
            // `wharf --help`, and `wharf` named in prose or a diagram.
            if !subcommand.chars().all(|c| c.is_ascii_lowercase()) {
                continue;
            }
            let usage = helps.entry(subcommand.clone()).or_insert_with(|| {
                let (known, usage) = help(&[subcommand]);
                if known { usage } else { String::new() }
            });
            checked += 1;
            if usage.is_empty() {
                wrong.push(format!("{page}: `wharf {subcommand}` is no subcommand"));
                continue;
            }
            for word in &words[1..] {
                let flag = word.split('=').next().unwrap_or_default();
                if flag.starts_with("--")
                    && flag.len() > 2
                    && flag != "--help"
                    && !usage.contains(&format!("{flag} "))
                    && !usage.contains(&format!("{flag}\n"))
                    && !usage.contains(&format!("{flag}="))
                {
                    wrong.push(format!("{page}: `wharf {subcommand}` has no flag {flag}"));
                }
            }
        }
        for words in commands(&text, "cargo xtask ") {
            let Some(task) = words.first() else { continue };
            checked += 1;
            if !xtask.contains(&format!("Some(\"{task}\")")) {
                wrong.push(format!("{page}: `cargo xtask {task}` is no task"));
            } else if task == "bench"
                && let Some(what) = words
                    .get(1)
                    .filter(|w| w.chars().all(|c| c.is_ascii_lowercase()))
                && !xtask.contains(&format!("bench {what} "))
            {
                wrong.push(format!(
                    "{page}: `cargo xtask bench {what}` is no benchmark"
                ));
            }
        }
    }
    assert!(checked >= 20, "too few commands found: {checked}");
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

#[test]
fn the_readme_stays_a_front_page() {
    let readme = std::fs::read_to_string(repository().join("README.md")).unwrap();
    let lines = readme.lines().count();
    assert!(
        lines <= 300,
        "README.md has {lines} lines; the manual belongs in docs/"
    );
}
