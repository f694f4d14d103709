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
use std::path::PathBuf;
use std::sync::Arc;

use wasmtime::component::{HasData, Linker};

/// Largest secret file read.
const MAX_SECRET_FILE: u64 = 1 << 20;

/// Where a secret's value comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SecretSource {
    /// A host environment variable, by name.
    Env(String),
    /// A file (its whole content, one trailing newline dropped).
    File(PathBuf),
}

impl SecretSource {
    /// Reads the value now. Blocking (a file read); an error says what is
    /// missing without showing any value.
    pub fn resolve(&self) -> Result<String, String> {
        match self {
            SecretSource::Env(variable) => std::env::var(variable)
                .map_err(|_| format!("the environment variable {variable} is not set")),
            SecretSource::File(path) => {
                let meta = std::fs::metadata(path)
                    .map_err(|err| format!("cannot read {}: {err}", path.display()))?;
                if meta.len() > MAX_SECRET_FILE {
                    return Err(format!(
                        "{} is larger than {MAX_SECRET_FILE} bytes",
                        path.display()
                    ));
                }
                let text = std::fs::read_to_string(path)
                    .map_err(|err| format!("cannot read {}: {err}", path.display()))?;
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
        assert_eq!(SecretSource::File(file).resolve().unwrap(), "s3cret");
        let missing = SecretSource::Env("WHARF_TEST_SURELY_UNSET_VARIABLE".into())
            .resolve()
            .unwrap_err();
        assert!(missing.contains("WHARF_TEST_SURELY_UNSET_VARIABLE is not set"));
    }
}
