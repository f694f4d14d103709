//! How a host joins a cluster: the settings, checked, and the host's
//! default name in it.

use std::path::PathBuf;

use crate::capabilities::nats::Replicas;
use crate::capabilities::tls::BackendTls;

/// How a host joins a cluster (`--cluster`, or `[cluster]` in `wharf.toml`).
#[derive(Clone, PartialEq, Eq)]
pub struct ClusterConfig {
    /// The NATS server(s): `nats://host:port[,nats://…]`.
    pub url: String,
    /// The cluster's name: clusters sharing a NATS server stay apart.
    pub name: String,
    /// A NATS credentials file, if the server needs one.
    pub credentials: Option<PathBuf>,
    /// This host's name in the cluster (default: the machine's host name
    /// and the process id).
    pub host_id: Option<String>,
    /// How many NATS servers keep a copy of the cluster's index, component
    /// store and schedule ticks.
    pub replicas: Replicas,
    /// TLS to the cluster's NATS (default: the host's `[tls]`).
    pub tls: BackendTls,
}

/// Shows the address without its credentials.
impl std::fmt::Debug for ClusterConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterConfig")
            .field("url", &crate::base::redact::url(&self.url))
            .field("name", &self.name)
            .field("credentials", &self.credentials)
            .field("host_id", &self.host_id)
            .field("replicas", &self.replicas)
            .field("tls", &self.tls)
            .finish()
    }
}

impl ClusterConfig {
    /// A cluster named `default` on `url`.
    pub fn new(url: impl Into<String>) -> ClusterConfig {
        ClusterConfig {
            url: url.into(),
            name: "default".into(),
            credentials: None,
            host_id: None,
            replicas: Replicas::Auto,
            tls: BackendTls::default(),
        }
    }

    /// Checks the name: it becomes part of JetStream bucket names.
    pub fn validate(&self) -> Result<(), String> {
        let valid = !self.name.is_empty()
            && self.name.len() <= 32
            && self
                .name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        if !valid {
            return Err(format!(
                "cluster name {:?}: use 1-32 letters, digits, '-' or '_'",
                self.name
            ));
        }
        if !self.url.starts_with("nats://") && !self.url.starts_with("tls://") {
            return Err(format!(
                "cluster URL {:?}: expected nats://HOST:PORT[,…]",
                self.url
            ));
        }
        Ok(())
    }
}

pub use crate::capabilities::MAX_CREDENTIALS_FILE;

/// `HOSTNAME-PID`: unique among the processes of a machine, readable.
pub(crate) fn default_host_id() -> String {
    let hostname = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|name| name.trim().to_string())
        .filter(|name| !name.is_empty())
        .unwrap_or_else(|| "host".into());
    let hostname: String = hostname
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '-'
            }
        })
        .collect();
    format!("{hostname}-{}", std::process::id())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cluster_names_and_urls_are_checked() {
        assert!(
            ClusterConfig::new("nats://cluster-nats.example")
                .validate()
                .is_ok()
        );
        let mut bad = ClusterConfig::new("nats://cluster-nats.example");
        bad.name = "a.b".into();
        assert!(bad.validate().is_err());
        assert!(ClusterConfig::new("http://x").validate().is_err());
    }

    #[test]
    fn host_ids_are_key_safe() {
        let id = default_host_id();
        assert!(
            id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-'),
            "{id}"
        );
    }
}
