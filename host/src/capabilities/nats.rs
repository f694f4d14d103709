//! The one way Wharf talks to NATS, shared by the key-value backend, the
//! broker and the cluster: a connection to a list of servers (any of which
//! may be down; the client tries the others and reconnects in the
//! background), its status for readiness, and the JetStream key-value
//! buckets every user creates the same way.
//!
//! Connections are shared: every user naming the same servers with the same
//! credentials gets the same client, so a host whose key-value store,
//! broker and cluster all live on one NATS keeps one connection to it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use anyhow::{Context as _, Result};
use async_nats::jetstream::{self, kv};
use async_nats::{ConnectOptions, ServerAddr};

use crate::base::redact;
use crate::capabilities::tls::BackendTls;

/// How long one connection attempt may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// Most copies [`Replicas::Auto`] asks for: three survive the loss of any
/// one server and keep a majority; more only slow every write.
pub const AUTO_REPLICAS_CAP: usize = 3;

/// Most copies JetStream keeps of a stream.
pub const MAX_REPLICAS: usize = 5;

/// How many servers keep a copy of each bucket, stream and object store
/// Wharf creates in JetStream (`replicas` under `[cluster]`, `[keyvalue]`
/// or `[messaging]`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Replicas {
    /// As many as the NATS cluster has servers, at most three (one on a
    /// single server).
    #[default]
    Auto,
    /// Exactly this many (1 to 5).
    Exactly(usize),
}

impl std::str::FromStr for Replicas {
    type Err = String;

    fn from_str(text: &str) -> Result<Replicas, String> {
        let text = text.trim();
        if text == "auto" {
            return Ok(Replicas::Auto);
        }
        match text.parse::<usize>() {
            Ok(n) if (1..=MAX_REPLICAS).contains(&n) => Ok(Replicas::Exactly(n)),
            _ => Err(format!(
                "replicas {text:?}: use \"auto\" or a number from 1 to {MAX_REPLICAS}"
            )),
        }
    }
}

impl std::fmt::Display for Replicas {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Replicas::Auto => f.write_str("auto"),
            Replicas::Exactly(n) => write!(f, "{n}"),
        }
    }
}

impl Replicas {
    /// The number of copies on a NATS cluster of `servers` servers.
    pub fn resolve(self, servers: usize) -> usize {
        match self {
            Replicas::Auto => servers.clamp(1, AUTO_REPLICAS_CAP),
            Replicas::Exactly(n) => n,
        }
    }
}

/// A connection to NATS and its JetStream context.
pub struct NatsConnection {
    client: async_nats::Client,
    jetstream: jetstream::Context,
    /// The servers, without credentials, for people.
    shown: String,
    /// How many servers the operator listed.
    listed: usize,
    /// Whether the warning about the server's replicated compare-and-swap
    /// has been logged.
    warned_about_swaps: std::sync::atomic::AtomicBool,
}

/// What tells one shared connection from another: the servers as given,
/// the credentials' text and the TLS files.
type ConnectionKey = (String, Option<String>, BackendTls);

/// Every connection still in use, by what it connects to.
fn connections() -> &'static Mutex<HashMap<ConnectionKey, Weak<NatsConnection>>> {
    static CONNECTIONS: std::sync::OnceLock<Mutex<HashMap<ConnectionKey, Weak<NatsConnection>>>> =
        std::sync::OnceLock::new();
    CONNECTIONS.get_or_init(Default::default)
}

/// Whether `version` ("2.9.10") is older than `than`; an unreadable
/// version is not.
fn version_before(version: &str, than: (u64, u64, u64)) -> bool {
    let mut parts = version
        .split(['.', '-'])
        .map(|part| part.parse::<u64>().ok());
    match (parts.next(), parts.next(), parts.next()) {
        (Some(Some(major)), Some(Some(minor)), Some(Some(patch))) => (major, minor, patch) < than,
        _ => false,
    }
}

/// Whether a JetStream error says the cluster has too few servers to place
/// the copies asked for.
fn is_unplaceable(error: &str) -> bool {
    error.contains("insufficient resources") || error.contains("no suitable peers")
}

/// Parses `list`, comma-separated NATS URLs (`nats://`, `tls://`, with
/// optional credentials in each), into server addresses; an error names the
/// bad entry without its credentials.
pub fn parse_servers(list: &str) -> Result<Vec<ServerAddr>, String> {
    let servers: Vec<ServerAddr> = list
        .split(',')
        .map(str::trim)
        .filter(|entry| !entry.is_empty())
        .map(|entry| {
            entry.parse::<ServerAddr>().map_err(|err| {
                format!("{} is not a NATS server address: {err}", redact::url(entry))
            })
        })
        .collect::<Result<_, _>>()?;
    if servers.is_empty() {
        return Err("no NATS server given".into());
    }
    Ok(servers)
}

impl NatsConnection {
    /// The connection to the servers in `list` (comma-separated URLs) with
    /// the NATS `credentials` file text, if any, over TLS as `tls` says
    /// (TLS is required whenever `tls` is set): an existing one if another
    /// user already opened it, else a new one, which connects in the
    /// background (a host whose NATS is down at start still starts).
    pub async fn shared(
        list: &str,
        credentials: Option<&str>,
        tls: &BackendTls,
    ) -> Result<Arc<NatsConnection>> {
        let servers = parse_servers(list).map_err(anyhow::Error::msg)?;
        let key = (
            list.trim().to_string(),
            credentials.map(str::to_string),
            tls.clone(),
        );
        if let Some(existing) = connections()
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&key)
            .and_then(Weak::upgrade)
        {
            return Ok(existing);
        }
        let mut options = ConnectOptions::new()
            .retry_on_initial_connect()
            .connection_timeout(CONNECT_TIMEOUT)
            .name("wharf");
        if let Some(credentials) = credentials {
            options = options
                .credentials(credentials)
                .context("the NATS credentials are not valid")?;
        }
        if tls.is_set() {
            let files = tls.clone();
            let config = tokio::task::spawn_blocking(move || files.client_config())
                .await
                .context("reading the TLS files")?
                .context("NATS over TLS")?;
            options = options.require_tls(true);
            options = match config {
                Some(config) => options.tls_client_config(config),
                None => match (&tls.cert, &tls.key) {
                    (Some(cert), Some(key)) => {
                        options.add_client_certificate(cert.clone(), key.clone())
                    }
                    _ => options,
                },
            };
        }
        let shown = redact::url(list);
        let listed = servers.len();
        let client = options
            .connect(servers)
            .await
            .with_context(|| format!("connecting to NATS at {shown}"))?;
        let connection = Arc::new(NatsConnection {
            jetstream: jetstream::new(client.clone()),
            client,
            shown,
            listed,
            warned_about_swaps: std::sync::atomic::AtomicBool::new(false),
        });
        let mut shared = connections().lock().unwrap_or_else(|e| e.into_inner());
        shared.retain(|_, weak| weak.strong_count() > 0);
        // Two users may have connected at once: the first one kept wins.
        if let Some(existing) = shared.get(&key).and_then(Weak::upgrade) {
            return Ok(existing);
        }
        shared.insert(key, Arc::downgrade(&connection));
        Ok(connection)
    }

    /// The client.
    pub fn client(&self) -> &async_nats::Client {
        &self.client
    }

    /// The JetStream context.
    pub fn jetstream(&self) -> &jetstream::Context {
        &self.jetstream
    }

    /// Whether the client is connected now, and a line saying so.
    pub fn state(&self) -> (bool, String) {
        let state = self.client.connection_state();
        (
            state == async_nats::connection::State::Connected,
            format!("{}: {state}", self.shown),
        )
    }

    /// Waits up to `wait` for the client to be connected (it connects in
    /// the background, and a request may come first); an error says it is
    /// not, rather than holding the caller.
    pub async fn connected(&self, wait: Duration) -> Result<(), String> {
        let deadline = tokio::time::Instant::now() + wait;
        while self.client.connection_state() != async_nats::connection::State::Connected {
            if tokio::time::Instant::now() >= deadline {
                return Err(format!("not connected to {}", self.shown));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Ok(())
    }

    /// The number of copies `wanted` means on this cluster: as many servers
    /// as the operator listed or the connected one reported when the
    /// connection was made, whichever is more (one outside a cluster; the
    /// client does not follow later changes, so a server down at connect
    /// time still counts when it was listed). With more than one on a
    /// server older than 2.9.21, warns once: those accept two concurrent
    /// compare-and-swaps of one key in a replicated stream
    /// (nats-server#4320), which key-value increments rely on.
    pub fn replicas(&self, wanted: Replicas) -> usize {
        let info = self.client.server_info();
        let copies = wanted.resolve(info.connect_urls.len().max(self.listed).max(1));
        if copies > 1
            && version_before(&info.version, (2, 9, 21))
            && !self
                .warned_about_swaps
                .swap(true, std::sync::atomic::Ordering::Relaxed)
        {
            tracing::warn!(
                server_version = %info.version,
                copies,
                "this NATS server accepts two concurrent compare-and-swaps of one key in a replicated bucket (nats-server#4320, fixed in 2.9.21): concurrent increments of one key from several hosts can lose updates; upgrade NATS"
            );
        }
        copies
    }

    /// The stream `config` describes, created if missing; an existing one
    /// keeping fewer copies than `config.num_replicas` is raised to it
    /// (JetStream copies the data to the new servers). If it cannot be
    /// raised, the stream is still returned and a warning says why. A new
    /// stream the cluster cannot place with that many copies now (a server
    /// is down) is created with as many as it can, with a warning, and
    /// raised when it is opened again.
    pub async fn stream(
        &self,
        config: jetstream::stream::Config,
    ) -> Result<jetstream::stream::Stream, String> {
        let name = config.name.clone();
        let wanted = config.num_replicas;
        let mut copies = wanted;
        let mut stream = loop {
            let attempt = jetstream::stream::Config {
                num_replicas: copies,
                ..config.clone()
            };
            match self.jetstream.get_or_create_stream(attempt).await {
                Ok(stream) => break stream,
                Err(err) if copies > 1 && is_unplaceable(&err.to_string()) => {
                    tracing::warn!(
                        stream = %name,
                        wanted,
                        copies = copies - 1,
                        error = %err,
                        "the NATS cluster cannot place this many copies of a new stream now (a server is down?): creating it with fewer, raised when it is opened again"
                    );
                    copies -= 1;
                }
                Err(err) => return Err(format!("creating stream {name}: {err}")),
            }
        };
        self.keep_copies(&mut stream, wanted).await;
        Ok(stream)
    }

    /// Raises `stream` to `wanted` copies if it keeps fewer.
    pub async fn keep_copies(&self, stream: &mut jetstream::stream::Stream, wanted: usize) {
        let current = match stream.info().await {
            Ok(info) => info.config.clone(),
            Err(err) => {
                tracing::warn!(error = %err, "reading a stream's copies");
                return;
            }
        };
        if current.num_replicas >= wanted {
            return;
        }
        let (name, had) = (current.name.clone(), current.num_replicas);
        // Direct reads stay as they were: every host holding the stream
        // open reads the way it was opened, and a change would break them.
        let raised = jetstream::stream::Config {
            num_replicas: wanted,
            ..current
        };
        match self.jetstream.update_stream(raised).await {
            Ok(_) => {
                tracing::info!(stream = %name, from = had, to = wanted, "raised a stream's copies")
            }
            Err(err) => tracing::warn!(
                stream = %name,
                copies = had,
                wanted,
                error = %err,
                "a stream keeps fewer copies than configured and could not be raised: it does not survive the loss of its server"
            ),
        }
    }

    /// The key-value bucket `bucket`, created as `spec` says if it is
    /// missing. Its stream is created directly, as JetStream's key-value
    /// layer defines it, rather than with `create_key_value`, which first
    /// asks for account details in a form only servers from 2.10 give
    /// (Debian's NATS is 2.9).
    pub async fn key_value(&self, bucket: &str, spec: KeyValueSpec) -> Result<kv::Store, String> {
        let duplicate_window = if spec.max_age.is_zero() {
            Duration::from_secs(120)
        } else {
            spec.max_age.min(Duration::from_secs(120))
        };
        self.stream(jetstream::stream::Config {
            name: format!("KV_{bucket}"),
            subjects: vec![format!("$KV.{bucket}.>")],
            max_messages_per_subject: spec.history,
            max_age: spec.max_age,
            max_bytes: -1,
            max_message_size: spec.max_value_size,
            storage: jetstream::stream::StorageType::File,
            allow_rollup: true,
            deny_delete: true,
            // A copy answers direct reads even while it is behind: with
            // more than one, reads go to the leader, so an acknowledged
            // write is always read back.
            allow_direct: spec.replicas == 1,
            discard: jetstream::stream::DiscardPolicy::New,
            duplicate_window,
            num_replicas: spec.replicas,
            ..Default::default()
        })
        .await
        .map_err(|err| format!("bucket {bucket}: {err}"))?;
        self.jetstream
            .get_key_value(bucket)
            .await
            .map_err(|err| format!("opening bucket {bucket}: {err}"))
    }
}

/// How a key-value bucket is created.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyValueSpec {
    /// Values kept per key.
    pub history: i64,
    /// How long an entry lives (zero: for ever).
    pub max_age: Duration,
    /// Largest value (-1: the server's limit).
    pub max_value_size: i32,
    /// Servers holding a copy (see [`NatsConnection::replicas`]).
    pub replicas: usize,
}

impl Default for KeyValueSpec {
    fn default() -> Self {
        KeyValueSpec {
            history: 1,
            max_age: Duration::ZERO,
            max_value_size: -1,
            replicas: 1,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn regression_a_list_of_servers_is_parsed_one_by_one() {
        let servers = parse_servers(
            "nats://a.example:7001, nats://user:pw@b.example:7002,tls://h.example:7003",
        )
        .unwrap();
        assert_eq!(servers.len(), 3);
        let err = parse_servers("nats://a:1,nats://user:hunter2@b:notaport").unwrap_err();
        assert!(err.contains("nats://user:***@b:notaport"), "{err}");
        assert!(!err.contains("hunter2"));
        assert!(parse_servers(" , ").is_err());
    }

    #[test]
    fn server_versions_compare() {
        assert!(version_before("2.9.10", (2, 9, 21)));
        assert!(!version_before("2.9.21", (2, 9, 21)));
        assert!(!version_before("2.10.3-beta", (2, 9, 21)));
        assert!(!version_before("", (2, 9, 21)));
    }

    #[test]
    fn replicas_default_to_the_cluster_size_capped_at_three() {
        assert_eq!(Replicas::Auto.resolve(1), 1);
        assert_eq!(Replicas::Auto.resolve(2), 2);
        assert_eq!(Replicas::Auto.resolve(5), 3);
        assert_eq!(Replicas::Exactly(1).resolve(5), 1);
        assert_eq!("auto".parse(), Ok(Replicas::Auto));
        assert_eq!("3".parse(), Ok(Replicas::Exactly(3)));
        assert!("0".parse::<Replicas>().is_err());
        assert!("6".parse::<Replicas>().is_err());
    }
}
