//! Tools no package manager here offers, built from crates.io once per
//! machine into a cache outside any checkout (`$XDG_CACHE_HOME/wharf-tools`,
//! else `~/.cache/wharf-tools`): a clean clone's test run builds them at
//! most once, and `cargo clean` never throws them away.
//!
//! - tansu, a Kafka-API broker (SQLite storage): the Kafka tests' broker.
//!   Apache Kafka itself is not in the registries this machine reaches.

use std::path::PathBuf;

use anyhow::{Context as _, Result};

use crate::{cargo, run};

/// The tansu release the Kafka tests run against (the tests name it too).
pub const TANSU_VERSION: &str = "0.6.0";

/// The tools cache.
pub fn tools_dir() -> Result<PathBuf> {
    std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".cache")))
        .map(|cache| cache.join("wharf-tools"))
        .context("neither XDG_CACHE_HOME nor HOME is set: no place for the tools cache")
}

/// The tansu binary, built into the tools cache if it is not there yet
/// (about ten minutes on two cores, once). Installed all or nothing: built
/// into a temporary directory, then renamed into place.
pub fn ensure_tansu() -> Result<PathBuf> {
    let dir = tools_dir()?.join(format!("tansu-{TANSU_VERSION}"));
    let binary = dir.join("bin").join("tansu");
    if binary.is_file() {
        return Ok(binary);
    }
    let parent = tools_dir()?;
    std::fs::create_dir_all(&parent).with_context(|| format!("creating {}", parent.display()))?;
    let building = tempfile::Builder::new()
        .prefix(".tansu-building-")
        .tempdir_in(&parent)
        .context("creating a build directory in the tools cache")?;
    eprintln!(
        "xtask: building tansu {TANSU_VERSION} (the Kafka-API broker of the Kafka tests) into {}; once per machine",
        dir.display()
    );
    run(cargo()
        .args([
            "install",
            "tansu",
            "--version",
            TANSU_VERSION,
            "--locked",
            "--features",
            "libsql",
            "--root",
        ])
        .arg(building.path())
        .env("CARGO_TARGET_DIR", building.path().join("target")))?;
    let _ = std::fs::remove_dir_all(building.path().join("target"));
    let _ = std::fs::remove_dir_all(&dir);
    // Renamed away, the guard's own clean-up finds nothing to delete.
    std::fs::rename(building.path(), &dir)
        .with_context(|| format!("moving tansu into {}", dir.display()))?;
    Ok(binary)
}
