//! `wasi:config` for guests: configuration and secrets from the service's
//! manifest, never from the host's environment wholesale.
//!
//! ```toml
//! [config]
//! api_url = "https://api.example.com"
//! [secrets]
//! db_password = { env = "ORDERS_DB_PASSWORD" }     # the host's variable, or
//! signing_key = { file = "/run/secrets/signing" }  # a file; both read at deploy
//! ```
//!
//! Secrets are resolved when the service is deployed (a missing one rejects
//! the deployment, and the previous version keeps serving); a guest reads
//! them through the same store as plain values, but they are never logged
//! and never shown by `/services` or the admin API (only their names).
//! Provided at `wasi:config@0.2.0-rc.1` (wasmtime, wasmCloud 2),
//! `@0.2.0-draft` and `@0.2.0-draft-2024-09-27` (Spin), which share a shape.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use wasmtime::component::{HasData, Linker};

use crate::base::files::RegularFile;

/// Largest secret file read.
pub const MAX_SECRET_FILE: u64 = 1 << 20;

/// Where a secret's value comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SecretSource {
    /// A host environment variable, by name.
    Env(String),
    /// A file (its whole content, one trailing newline dropped): an
    /// absolute path.
    File(PathBuf),
}

/// What the operator hands out for secrets: the directories whose files
/// and the environment variables a manifest may name as secret sources
/// (`[secrets]` in `wharf.toml`, `--secret-dir`, `--secret-env`). Nothing by
/// default: a manifest picks only from what was handed out, so a service's
/// manifest can never read the host's files or environment on its own.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SecretSources {
    /// Canonical directories: a file is handed out if the path it really
    /// is (after every symlink) lies inside one.
    dirs: Vec<PathBuf>,
    /// Variable names, exact or a prefix ending in `*` (`ORDERS_*`).
    env: Vec<String>,
}

impl SecretSources {
    /// Sources from directories (made canonical here: each must exist) and
    /// variable patterns; an error names the bad entry.
    pub fn new(
        dirs: impl IntoIterator<Item = PathBuf>,
        env: impl IntoIterator<Item = String>,
    ) -> Result<SecretSources, String> {
        let mut sources = SecretSources::default();
        for dir in dirs {
            let canonical = std::fs::canonicalize(&dir)
                .map_err(|err| format!("secret directory {}: {err}", dir.display()))?;
            if !canonical.is_dir() {
                return Err(format!(
                    "secret directory {} is not a directory",
                    dir.display()
                ));
            }
            if canonical == Path::new("/") {
                return Err(
                    "secret directory /: handing out the whole file system defeats the point; name the directories that hold secrets".into(),
                );
            }
            if !sources.dirs.contains(&canonical) {
                sources.dirs.push(canonical);
            }
        }
        for pattern in env {
            let name = pattern.strip_suffix('*').unwrap_or(&pattern);
            let valid =
                !name.is_empty() && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
            if !valid {
                return Err(format!(
                    "secret variable {pattern:?}: use a variable name of letters, digits and '_', or a non-empty prefix ending in '*' (like \"ORDERS_*\")"
                ));
            }
            if !sources.env.contains(&pattern) {
                sources.env.push(pattern);
            }
        }
        Ok(sources)
    }

    /// These sources and `other`'s together.
    pub fn merged(&self, other: &SecretSources) -> SecretSources {
        let mut merged = self.clone();
        for dir in &other.dirs {
            if !merged.dirs.contains(dir) {
                merged.dirs.push(dir.clone());
            }
        }
        for pattern in &other.env {
            if !merged.env.contains(pattern) {
                merged.env.push(pattern.clone());
            }
        }
        merged
    }

    /// The directories handed out.
    pub fn dirs(&self) -> &[PathBuf] {
        &self.dirs
    }

    /// The variable patterns handed out.
    pub fn env(&self) -> &[String] {
        &self.env
    }

    /// Whether variable `name` is handed out.
    pub fn allows_env(&self, name: &str) -> bool {
        self.env
            .iter()
            .any(|pattern| match pattern.strip_suffix('*') {
                Some(prefix) => name.starts_with(prefix),
                None => name == pattern,
            })
    }

    /// Whether the file that really is at `real_path` is handed out.
    pub fn allows_file(&self, real_path: &Path) -> bool {
        self.dirs.iter().any(|dir| real_path.starts_with(dir))
    }
}

impl SecretSource {
    /// Reads the value now, if `sources` hands it out. Blocking (a file
    /// read: regular files only, opened without blocking, at most
    /// [`MAX_SECRET_FILE`] bytes). An error says what is wrong without
    /// repeating the variable's name or the file's path, in case the value
    /// itself was written there by mistake (the caller names the key).
    pub fn resolve(&self, sources: &SecretSources) -> Result<String, String> {
        match self {
            SecretSource::Env(variable) => {
                if !sources.allows_env(variable) {
                    return Err(
                        "the environment variable it names is not handed out for secrets; the operator lists the variables manifests may name under [secrets] env in wharf.toml or with --secret-env".into(),
                    );
                }
                std::env::var(variable)
                    .map_err(|_| "the environment variable it names is not set".to_string())
            }
            SecretSource::File(path) => {
                if !path.is_absolute() {
                    return Err(
                        "the file it names is not an absolute path; name the file by its full path"
                            .into(),
                    );
                }
                let file = RegularFile::open(path).map_err(|_| {
                    "the file it names cannot be read as a regular file (missing, unreadable, or a directory, device, FIFO or socket)".to_string()
                })?;
                if !sources.allows_file(file.real_path()) {
                    return Err(
                        "the file it names is not in a directory handed out for secrets; the operator lists them under [secrets] dirs in wharf.toml or with --secret-dir".into(),
                    );
                }
                let bytes = file.read_to_end(MAX_SECRET_FILE).map_err(|_| {
                    format!(
                        "the file it names cannot be read whole (at most {MAX_SECRET_FILE} bytes)"
                    )
                })?;
                let text = String::from_utf8(bytes)
                    .map_err(|_| "the file it names is not UTF-8 text".to_string())?;
                Ok(text
                    .strip_suffix('\n')
                    .map(|t| t.strip_suffix('\r').unwrap_or(t))
                    .unwrap_or(&text)
                    .to_string())
            }
        }
    }
}

/// One configured value.
#[derive(Clone, PartialEq, Eq)]
struct Entry {
    value: String,
    secret: bool,
}

impl std::fmt::Debug for Entry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.secret {
            f.write_str("<secret>")
        } else {
            write!(f, "{:?}", self.value)
        }
    }
}

/// A service's configuration: plain values and resolved secrets. Its
/// `Debug` form never shows a secret.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConfigValues {
    entries: BTreeMap<String, Entry>,
}

impl ConfigValues {
    /// Plain `values` and resolved `secrets` (a name in both is the caller's
    /// error to refuse first).
    pub fn new(
        values: BTreeMap<String, String>,
        secrets: BTreeMap<String, String>,
    ) -> ConfigValues {
        let plain = values.into_iter().map(|(k, value)| {
            (
                k,
                Entry {
                    value,
                    secret: false,
                },
            )
        });
        let secret = secrets.into_iter().map(|(k, value)| {
            (
                k,
                Entry {
                    value,
                    secret: true,
                },
            )
        });
        ConfigValues {
            entries: plain.chain(secret).collect(),
        }
    }

    /// The value of `key`.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.entries.get(key).map(|e| e.value.as_str())
    }

    /// Every key and value, secrets included (for the guest).
    pub fn all(&self) -> Vec<(String, String)> {
        self.entries
            .iter()
            .map(|(k, e)| (k.clone(), e.value.clone()))
            .collect()
    }

    /// The plain (non-secret) keys and values, for the service list.
    pub fn plain(&self) -> BTreeMap<&str, &str> {
        self.entries
            .iter()
            .filter(|(_, e)| !e.secret)
            .map(|(k, e)| (k.as_str(), e.value.as_str()))
            .collect()
    }

    /// The secrets' names, for the service list.
    pub fn secret_names(&self) -> Vec<&str> {
        self.entries
            .iter()
            .filter(|(_, e)| e.secret)
            .map(|(k, _)| k.as_str())
            .collect()
    }

    /// Whether nothing is configured.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// The configuration a store's guest sees.
pub struct ConfigCtx {
    values: Arc<ConfigValues>,
}

impl ConfigCtx {
    /// A context serving `values`.
    pub fn new(values: Arc<ConfigValues>) -> ConfigCtx {
        ConfigCtx { values }
    }
}

/// Marks [`ConfigCtx`] as the data the generated bindings work on.
pub struct Config;

impl HasData for Config {
    type Data<'a> = &'a ConfigCtx;
}

mod rc1 {
    wasmtime::component::bindgen!({
        path: "../wit/config-0.2.0-rc.1",
        world: "wasi:config/imports@0.2.0-rc.1",
        imports: { default: trappable },
    });
}

mod draft {
    wasmtime::component::bindgen!({
        path: "../wit/config-0.2.0-draft",
        world: "wasi:config/imports@0.2.0-draft",
        imports: { default: trappable },
    });
}

mod spin {
    wasmtime::component::bindgen!({
        path: "../wit/config-0.2.0-draft-2024-09-27",
        world: "wasi:config/imports@0.2.0-draft-2024-09-27",
        imports: { default: trappable },
    });
}

macro_rules! store_host {
    ($module:ident) => {
        impl $module::wasi::config::store::Host for &ConfigCtx {
            fn get(
                &mut self,
                key: String,
            ) -> wasmtime::Result<Result<Option<String>, $module::wasi::config::store::Error>> {
                Ok(Ok(self.values.get(&key).map(str::to_string)))
            }

            fn get_all(
                &mut self,
            ) -> wasmtime::Result<Result<Vec<(String, String)>, $module::wasi::config::store::Error>>
            {
                Ok(Ok(self.values.all()))
            }
        }
    };
}

store_host!(rc1);
store_host!(draft);
store_host!(spin);

/// Adds the three `wasi:config` versions to `linker`, reaching each store's
/// configuration through `get`.
pub fn add_to_linker<T: Send + 'static>(
    linker: &mut Linker<T>,
    get: fn(&mut T) -> &ConfigCtx,
) -> wasmtime::Result<()> {
    rc1::wasi::config::store::add_to_linker::<T, Config>(linker, get)?;
    draft::wasi::config::store::add_to_linker::<T, Config>(linker, get)?;
    spin::wasi::config::store::add_to_linker::<T, Config>(linker, get)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_served_but_never_shown() {
        let values = ConfigValues::new(
            BTreeMap::from([("api_url".into(), "https://x".into())]),
            BTreeMap::from([("password".into(), "hunter2".into())]),
        );
        assert_eq!(values.get("password"), Some("hunter2"));
        assert_eq!(values.all().len(), 2);
        assert_eq!(values.secret_names(), ["password"]);
        assert!(!values.plain().contains_key("password"));
        assert!(!format!("{values:?}").contains("hunter2"));
    }

    #[test]
    fn secret_sources_resolve_or_say_what_is_missing() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("secret");
        std::fs::write(&file, "s3cret\n").unwrap();
        let sources = SecretSources::new(
            [dir.path().to_path_buf()],
            ["WHARF_TEST_SURELY_*".to_string()],
        )
        .unwrap();
        assert_eq!(
            SecretSource::File(file).resolve(&sources).unwrap(),
            "s3cret"
        );
        let missing = SecretSource::Env("WHARF_TEST_SURELY_UNSET_VARIABLE".into())
            .resolve(&sources)
            .unwrap_err();
        assert!(missing.contains("is not set"), "{missing}");
        assert!(!missing.contains("WHARF_TEST"), "{missing}");
    }

    #[test]
    fn regression_secrets_read_only_what_the_operator_handed_out() {
        let handed = tempfile::tempdir().unwrap();
        let other = tempfile::tempdir().unwrap();
        let outside = other.path().join("key");
        std::fs::write(&outside, "not yours").unwrap();
        // A symlink inside a handed-out directory to a file outside it.
        let link = handed.path().join("link");
        std::os::unix::fs::symlink(&outside, &link).unwrap();
        let sources = SecretSources::new([handed.path().to_path_buf()], ["APP_*".into()]).unwrap();
        for path in [
            outside.clone(),
            link,
            PathBuf::from("/proc/self/environ"),
            PathBuf::from("/etc/passwd"),
        ] {
            let err = SecretSource::File(path.clone())
                .resolve(&sources)
                .unwrap_err();
            assert!(
                err.contains("not in a directory handed out"),
                "{}: {err}",
                path.display()
            );
            assert!(!err.contains("not yours") && !err.contains(&*path.to_string_lossy()));
        }
        let err = SecretSource::File("/dev/zero".into())
            .resolve(&SecretSources::new([PathBuf::from("/dev")], []).unwrap())
            .unwrap_err();
        assert!(err.contains("regular file"), "{err}");
        let err = SecretSource::Env("HOME".into())
            .resolve(&sources)
            .unwrap_err();
        assert!(err.contains("not handed out"), "{err}");
        assert!(
            SecretSource::File("relative".into())
                .resolve(&sources)
                .is_err()
        );
        assert!(sources.allows_env("APP_KEY") && !sources.allows_env("APPKEY"));
        assert!(SecretSources::new([], ["*".into()]).is_err());
        assert!(SecretSources::new([PathBuf::from("/")], []).is_err());
    }
}
