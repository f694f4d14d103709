//! `wharf check`: whether a file will deploy, and why not, without serving
//! it. The component goes through the same compile, link and probe a deploy
//! does (on a private host with no services, no cache and embedded
//! backends), so the verdict is the deploy's own.

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context as _, Result};
use serde::Serialize;
use wasmtime::component::Component;

use crate::base::limits::format_size;
use crate::config::Config;
use crate::deploy::ServiceConfig;
use crate::deploy::spec::{ServiceSpec, check_header, digest_of, validate_name};
use crate::guest::compiled::{export_names, is_http_handler};
use crate::guest::engine::{EngineOptions, Tiers};
use crate::host::Host;

/// What `wharf check` found.
#[derive(Debug, Clone, Serialize)]
pub struct CheckReport {
    /// The service name the file deploys as.
    pub name: String,
    /// The file's size in bytes.
    pub size: u64,
    /// `component`, `core module` or `not WebAssembly`.
    pub kind: String,
    /// The HTTP handler it exports and the WASI version that implies, if any.
    pub http: Option<String>,
    /// Every interface it exports.
    pub exports: Vec<String>,
    /// Every interface it imports, and whether and how Wharf provides it.
    pub imports: Vec<ImportCheck>,
    /// The manifest's error, if a manifest was given and is wrong.
    pub manifest_error: Option<String>,
    /// Time to compile, link and probe it.
    pub compile_ms: Option<f64>,
    /// The size of its compiled code.
    pub compiled_size: Option<u64>,
    /// `None` if it will deploy, else why not.
    pub refused: Option<String>,
}

/// One import of the component.
#[derive(Debug, Clone, Serialize)]
pub struct ImportCheck {
    /// The interface, with its version (`wasi:io/streams@0.2.6`).
    pub name: String,
    /// Whether Wharf links it.
    pub provided: bool,
    /// What the guest gets through it, and the manifest grant it needs.
    pub note: String,
}

impl CheckReport {
    /// Whether the file will deploy.
    pub fn deploys(&self) -> bool {
        self.refused.is_none()
    }

    /// The report as the command prints it.
    pub fn render(&self) -> String {
        use std::fmt::Write as _;
        let mut out = String::new();
        let _ = writeln!(
            out,
            "{}: {}, {}",
            self.name,
            self.kind,
            format_size(self.size)
        );
        match &self.http {
            Some(http) => {
                let _ = writeln!(out, "serves:  {http}");
            }
            None => {
                let _ = writeln!(out, "serves:  no wasi:http handler");
            }
        }
        if !self.exports.is_empty() {
            let _ = writeln!(out, "exports: {}", self.exports.join(", "));
        }
        if !self.imports.is_empty() {
            let width = self.imports.iter().map(|i| i.name.len()).max().unwrap_or(0);
            let _ = writeln!(out, "imports:");
            for import in &self.imports {
                let _ = writeln!(out, "  {:width$}  {}", import.name, import.note);
            }
        }
        if let Some(error) = &self.manifest_error {
            let _ = writeln!(out, "manifest error: {error}");
        }
        if let (Some(ms), Some(size)) = (self.compile_ms, self.compiled_size) {
            let _ = writeln!(
                out,
                "compile: {ms:.0} ms, {} of compiled code",
                format_size(size)
            );
        }
        match &self.refused {
            None => {
                let _ = writeln!(out, "verdict: deploys");
            }
            Some(reason) => {
                let _ = writeln!(out, "verdict: refused: {reason}");
            }
        }
        out
    }
}

/// Checks `wasm` as service `name` with the manifest text `manifest`.
pub async fn check(name: &str, wasm: Vec<u8>, manifest: Option<&str>) -> Result<CheckReport> {
    let mut report = CheckReport {
        name: name.to_string(),
        size: wasm.len() as u64,
        kind: kind_of(&wasm).to_string(),
        http: None,
        exports: Vec::new(),
        imports: Vec::new(),
        manifest_error: None,
        compile_ms: None,
        compiled_size: None,
        refused: None,
    };
    if let Err(reason) = validate_name(name) {
        report.refused = Some(reason);
        return Ok(report);
    }
    if let Err(err) = check_header(&wasm) {
        report.refused = Some(format!("{err:#}"));
        return Ok(report);
    }
    let host = Host::create(Config {
        services_dir: None,
        watch: false,
        engine: EngineOptions {
            pooling: false,
            max_instances: 8,
            cache_dir: None,
            // Compile time and size of the code that serves for good.
            tiers: Some(Tiers::Cranelift),
            ..EngineOptions::default()
        },
        ..Config::default()
    })
    .await
    .context("starting a private host to check on")?;
    let deployer = host.deployer();
    let config = match host.service_config(name, manifest).await {
        Ok(config) => config,
        Err(reason) => {
            report.manifest_error = Some(reason.clone());
            report.refused = Some(reason);
            // The component is still worth checking, with the defaults.
            ServiceConfig::defaults(name, deployer.defaults())
        }
    };
    let wasm: Arc<[u8]> = Arc::from(wasm);
    let spec = ServiceSpec {
        name: name.to_string(),
        config,
        wasm: wasm.clone(),
        source: None,
        digest: Some(digest_of(&wasm)),
        manifest: manifest.map(Arc::from),
    };
    let started = Instant::now();
    match deployer.validate(spec).await {
        Ok(deployment) => {
            report.compile_ms = Some(started.elapsed().as_secs_f64() * 1000.0);
            let component = deployment.guest().pre().component();
            report.imports = imports_of(component, None);
            report.exports = export_names(component);
            report.compiled_size = component.serialize().ok().map(|code| code.len() as u64);
        }
        Err(err) => {
            let reason = format!("{err:#}");
            // Compiled again on its own, to list what it imports and
            // exports (nothing to list if it does not compile at all).
            let runtime = deployer.runtime().clone();
            let unlinked = tokio::task::spawn_blocking(move || {
                let uncached = crate::deploy::compile::cache::CodeCaches::default();
                let init = crate::guest::engine::MemoryInit::for_component_size(wasm.len());
                let tier = runtime.tiers().first();
                crate::deploy::compile::tiering::compile_tier(
                    &runtime, &uncached, &wasm, "", init, tier,
                )
                .map(|compiled| compiled.component)
            })
            .await
            .ok()
            .and_then(Result::ok);
            if let Some(component) = &unlinked {
                report.imports = imports_of(component, Some(&reason));
                report.exports = export_names(component);
            }
            report.refused.get_or_insert(reason);
        }
    }
    report.http = describe_http(&report.exports);
    Ok(report)
}

/// Reads `path` and its manifest (`manifest`, else `NAME.toml` beside it if
/// there is one) and checks them; the name is the file's stem unless given.
pub async fn check_file(
    path: &Path,
    manifest: Option<&Path>,
    name: Option<&str>,
) -> Result<CheckReport> {
    let wasm = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let name = match name {
        Some(name) => name.to_string(),
        None => path
            .file_stem()
            .and_then(|s| s.to_str())
            .context("the file name is not a service name; give one with --name")?
            .to_string(),
    };
    let manifest = match manifest {
        Some(path) => Some(
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?,
        ),
        None => None,
    };
    check(&name, wasm, manifest.as_deref()).await
}

fn kind_of(bytes: &[u8]) -> &'static str {
    if bytes.len() < 8 || &bytes[..4] != b"\0asm" {
        return "not WebAssembly";
    }
    match u16::from_le_bytes([bytes[6], bytes[7]]) {
        0 => "a core WebAssembly module",
        1 => "a WebAssembly component",
        _ => "WebAssembly of an unknown layer",
    }
}

/// The component's imports with what Wharf gives through each; `missing`
/// is the linker's error, naming the import it lacked.
fn imports_of(component: &Component, missing: Option<&str>) -> Vec<ImportCheck> {
    let ty = component.component_type();
    let engine = component.engine();
    ty.imports(engine)
        .map(|(name, _)| {
            let lacking = missing.is_some_and(|error| error.contains(&format!("`{name}`")));
            let note = match grant_for(name) {
                _ if lacking => "NOT PROVIDED at this version: the deploy fails on it",
                None => "NOT PROVIDED by Wharf (harmless only while nothing in it is used)",
                Some(note) => note,
            };
            ImportCheck {
                name: name.to_string(),
                provided: !lacking && grant_for(name).is_some(),
                note: note.to_string(),
            }
        })
        .collect()
}

/// What a guest gets through an interface Wharf links, and the manifest
/// grant that opens it; `None` for packages Wharf does not link.
fn grant_for(interface: &str) -> Option<&'static str> {
    let package = interface.split('/').next().unwrap_or_default();
    Some(match package {
        "wasi:http" if interface.contains("outgoing-handler") => {
            "provided; requests go only where [outbound] allow says (and NAME.internal)"
        }
        "wasi:keyvalue" => "provided; buckets need [keyvalue] buckets",
        "wasi:config" => "provided; values from [config] and [secrets]",
        "wasi:messaging" | "wasmcloud:messaging" => {
            "provided; publishing needs [messaging] publish"
        }
        "wasi:filesystem" => "provided, with no directories: no file is reachable",
        "wasi:sockets" => "provided, with no network: every socket is refused",
        "wasi:cli" if interface.contains("/environment") => {
            "provided; the variables are the manifest's [env] only"
        }
        "wasi:cli" if interface.contains("/stdout") || interface.contains("/stderr") => {
            "provided; lines go to the host's log with the request id"
        }
        "wasi:cli" if interface.contains("/stdin") => "provided, empty",
        "wasi:cli" | "wasi:io" | "wasi:clocks" | "wasi:random" | "wasi:http" => "provided",
        _ => return None,
    })
}

/// The HTTP world the exports imply.
fn describe_http(exports: &[String]) -> Option<String> {
    let export = exports.iter().find(|e| is_http_handler(e))?;
    let version = export.split('@').nth(1).unwrap_or_default();
    Some(if export.starts_with("wasi:http/handler@") {
        format!("{export}: a WASI {version} HTTP service (async; may serve requests concurrently)")
    } else {
        format!("{export}: a WASI {version} HTTP service")
    })
}

/// The manifest a component's check reads by default: `NAME.toml` beside
/// it, if present.
pub fn sibling_manifest(path: &Path) -> Option<std::path::PathBuf> {
    let candidate = path.with_extension("toml");
    candidate.is_file().then_some(candidate)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_are_told_apart() {
        assert_eq!(kind_of(b"hello"), "not WebAssembly");
        assert_eq!(kind_of(b"\0asm\x01\0\0\0"), "a core WebAssembly module");
        assert_eq!(kind_of(b"\0asm\x0d\0\x01\0"), "a WebAssembly component");
    }

    #[test]
    fn http_exports_name_their_wasi_version() {
        let p2 = describe_http(&["wasi:http/incoming-handler@0.2.6".into()]).unwrap();
        assert!(p2.contains("WASI 0.2.6"), "{p2}");
        let p3 = describe_http(&["wasi:http/handler@0.3.0".into()]).unwrap();
        assert!(p3.contains("WASI 0.3.0"), "{p3}");
        assert_eq!(
            describe_http(&["wasi:messaging/incoming-handler@0.2.0-draft".into()]),
            None
        );
    }

    #[test]
    fn grants_name_the_manifest_table() {
        assert!(
            grant_for("wasi:keyvalue/store@0.2.0-draft2")
                .unwrap()
                .contains("[keyvalue]")
        );
        assert!(
            grant_for("wasi:http/outgoing-handler@0.2.6")
                .unwrap()
                .contains("[outbound]")
        );
        assert_eq!(grant_for("wasi:io/streams@0.2.6"), Some("provided"));
        assert_eq!(grant_for("wasi:nn/graph@0.2.0"), None);
    }
}
