//! The guests tests run: built once per test binary (Rust with cargo,
//! JavaScript with ComponentizeJS, Python with componentize-py).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// The guest target.
const GUEST_TARGET: &str = "wasm32-wasip2";

/// The repository's root.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("host/ is inside the workspace")
        .to_path_buf()
}

/// Path of a built Rust guest, building all guests on first use.
pub fn guest(name: &str) -> PathBuf {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    let dir = BUILT.get_or_init(|| {
        let guests = workspace_root().join("guests");
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_string());
        let status = Command::new(cargo)
            .current_dir(&guests)
            .args(["build", "--release", "--target", GUEST_TARGET])
            .status()
            .expect("run cargo to build the guests");
        assert!(
            status.success(),
            "building the guests failed; is the {GUEST_TARGET} target installed? `cargo xtask test` installs it"
        );
        guests.join("target").join(GUEST_TARGET).join("release")
    });
    let path = dir.join(format!("{name}.wasm"));
    assert!(
        path.exists(),
        "guest {name} was not built: {}",
        path.display()
    );
    path
}

/// Path of a built JavaScript (`js`) or Python (`python`) guest, building
/// them through `cargo xtask guests LANG` on first use (which installs the
/// npm packages or the componentize-py venv if needed; a no-op when the
/// outputs are up to date).
pub fn guest_in(lang: &str, name: &str) -> PathBuf {
    static BUILT: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());
    let mut built = BUILT.lock().unwrap_or_else(|e| e.into_inner());
    if !built.iter().any(|l| l == lang) {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_string());
        let status = Command::new(cargo)
            .current_dir(workspace_root())
            .args(["run", "--quiet", "--package", "xtask", "--", "guests", lang])
            .status()
            .expect("run cargo xtask guests");
        assert!(status.success(), "building the {lang} guests failed");
        built.push(lang.to_string());
    }
    let path = workspace_root()
        .join("guests")
        .join("target")
        .join(lang)
        .join(format!("{name}.wasm"));
    assert!(
        path.exists(),
        "{lang} guest {name} was not built: {}",
        path.display()
    );
    path
}

/// The bytes of a built guest.
pub fn guest_bytes(name: &str) -> Vec<u8> {
    std::fs::read(guest(name)).expect("read guest")
}

/// The smallest valid core WebAssembly module: a module, not a component.
pub const CORE_MODULE: &[u8] = b"\0asm\x01\0\0\0";
