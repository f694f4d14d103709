//! The live dashboard on the admin address: `GET /` is one self-contained
//! page (no CDN: its script and styles are inside it), which polls
//! `GET /dashboard/state` every second. The state is the services with
//! their traffic and latency buckets, the deploy history, the last log
//! lines, the host's memory and uptime, and the backends, consumer groups
//! and cluster when there are any.
//!
//! Log lines and the deploy history come from [`LogRingLayer`], a
//! `tracing` layer the CLI installs (an embedder adds it to its own
//! subscriber to have them on its dashboard).

use std::collections::VecDeque;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, SystemTime};

use serde::Serialize;
use serde_json::{Value, json};
use tracing::field::{Field, Visit};
use tracing_subscriber::layer::Context;

use crate::base::metrics::{LATENCY_BUCKETS, latency_bucket_bound};
use crate::host::Host;

/// The page: HTML, styles and script in one file.
pub const PAGE: &str = include_str!("dashboard.html");

/// Log lines kept for the dashboard.
const LOG_LINES: usize = 500;
/// Deploy events kept for the dashboard.
const HISTORY: usize = 200;

/// One log line as the dashboard shows it.
#[derive(Debug, Clone, Serialize)]
pub struct LogLine {
    /// Its place in the log (increasing), for `?since=`.
    pub seq: u64,
    /// When (ms since the epoch).
    pub time_ms: u64,
    /// `ERROR`, `WARN`, `INFO`, `DEBUG` or `TRACE`.
    pub level: &'static str,
    /// The module that logged it.
    pub target: &'static str,
    /// The message.
    pub message: String,
    /// Its service, if it names one.
    pub service: Option<String>,
    /// Its request id, if it has one.
    pub request_id: Option<String>,
    /// Its deploy event (`deploy`, `replace`, `reject`, `remove`, …).
    pub event: Option<String>,
    /// The other fields, `key=value` separated by spaces.
    pub fields: String,
}

#[derive(Default)]
struct Ring {
    next: u64,
    lines: VecDeque<LogLine>,
    history: VecDeque<LogLine>,
}

fn ring() -> &'static Mutex<Ring> {
    static RING: OnceLock<Mutex<Ring>> = OnceLock::new();
    RING.get_or_init(Default::default)
}

/// A `tracing` layer keeping the last log lines and deploy events for the
/// dashboard (process-wide).
#[derive(Debug, Clone, Copy, Default)]
pub struct LogRingLayer;

#[derive(Default)]
struct Fields {
    message: String,
    service: Option<String>,
    request_id: Option<String>,
    event: Option<String>,
    rest: String,
}

impl Visit for Fields {
    fn record_str(&mut self, field: &Field, value: &str) {
        match field.name() {
            "message" => self.message = value.to_string(),
            "service" => self.service = Some(value.to_string()),
            "request_id" => self.request_id = Some(value.to_string()),
            "event" => self.event = Some(value.to_string()),
            name => self.push_rest(name, format_args!("{value}")),
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        use std::fmt::Write as _;
        match field.name() {
            "message" => {
                let _ = write!(self.message, "{value:?}");
            }
            "service" => self.service = Some(format!("{value:?}")),
            "request_id" => self.request_id = Some(format!("{value:?}")),
            "event" => self.event = Some(format!("{value:?}").trim_matches('"').to_string()),
            name => self.push_rest(name, format_args!("{value:?}")),
        }
    }
}

impl Fields {
    /// Appends `name=value` to the other fields, formatted in place.
    fn push_rest(&mut self, name: &str, value: std::fmt::Arguments<'_>) {
        use std::fmt::Write as _;
        if !self.rest.is_empty() {
            self.rest.push(' ');
        }
        let _ = write!(self.rest, "{name}={value}");
    }
}

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for LogRingLayer {
    fn on_event(&self, event: &tracing::Event<'_>, _: Context<'_, S>) {
        let mut fields = Fields::default();
        event.record(&mut fields);
        let time_ms = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let mut ring = ring().lock().unwrap_or_else(|e| e.into_inner());
        let line = LogLine {
            seq: ring.next,
            time_ms,
            level: event.metadata().level().as_str(),
            target: event.metadata().target(),
            message: fields.message,
            service: fields.service,
            request_id: fields.request_id,
            event: fields.event,
            fields: fields.rest,
        };
        ring.next += 1;
        if line.event.is_some() && line.target.starts_with("wharf::deploy") {
            if ring.history.len() == HISTORY {
                ring.history.pop_front();
            }
            ring.history.push_back(line.clone());
        }
        if ring.lines.len() == LOG_LINES {
            ring.lines.pop_front();
        }
        ring.lines.push_back(line);
    }
}

/// The dashboard's state. `logs`: whether to include log lines (they may
/// carry what guests print, so with a token configured they need it), those
/// after `since`.
pub async fn state(host: &Host, logs: bool, since: Option<u64>) -> Value {
    let (history, lines) = {
        let ring = ring().lock().unwrap_or_else(|e| e.into_inner());
        let lines: Vec<LogLine> = if logs {
            ring.lines
                .iter()
                .filter(|l| since.is_none_or(|s| l.seq > s))
                .cloned()
                .collect()
        } else {
            Vec::new()
        };
        (ring.history.iter().cloned().collect::<Vec<_>>(), lines)
    };
    let snapshot = host.services();
    let rejections = host.rejections();
    let (instances_in_use, instances_capacity) = host.instance_slots();
    let services: Vec<Value> = snapshot
        .services()
        .map(|d| {
            let (total, errors) = d.metrics().answered();
            json!({
                "name": d.name(),
                "route": d.route().as_str(),
                "generation": d.generation(),
                "digest": d.digest(),
                "wasi_http": d.guest().exports().http_export,
                "memory_init": d.compile_info().memory_init.as_str(),
                "tier": d.tier().as_str(),
                "requests": total,
                "server_errors": errors,
                "in_flight": d.metrics().running(),
                "latency_counts": d.metrics().latency_counts().to_vec(),
                "reuse": d.config().reuse,
                "warm": d.warm_instances(),
                "buckets": d.config().keyvalue.entries(),
                "groups": d.config().triggers.messages.iter().map(|t| t.group().to_string()).collect::<Vec<_>>(),
                "last_error": rejections.get(d.name()).map(|r| r.reason.clone()),
            })
        })
        .collect();
    let rejected: Vec<Value> = rejections
        .iter()
        .filter(|(name, _)| snapshot.service(name).is_none())
        .map(|(name, r)| json!({ "name": name, "last_error": r.reason }))
        .collect();
    let backends: Vec<Value> = host
        .backend_statuses()
        .into_iter()
        .map(|(capability, status)| {
            json!({ "capability": capability, "backend": status.kind, "up": status.up, "detail": status.detail })
        })
        .collect();
    let mut dead_letters = serde_json::Map::new();
    if let Some(messaging) = host.messaging() {
        let groups: std::collections::BTreeSet<String> = snapshot
            .services()
            .flat_map(|d| {
                d.config()
                    .triggers
                    .messages
                    .iter()
                    .map(|t| t.group().to_string())
                    .collect::<Vec<_>>()
            })
            .collect();
        for group in groups {
            // Counted, never read: a poll costs the same whatever the
            // letters weigh.
            let count = tokio::time::timeout(
                Duration::from_millis(500),
                messaging.broker().count_dead_letters(&group),
            )
            .await
            .ok()
            .and_then(Result::ok);
            dead_letters.insert(group, json!(count));
        }
    }
    let cluster = match host.cluster() {
        None => Value::Null,
        Some(cluster) => match tokio::time::timeout(Duration::from_secs(1), cluster.view()).await {
            Ok(Ok(view)) => serde_json::to_value(view).unwrap_or(Value::Null),
            _ => json!({ "error": "the cluster's NATS does not answer" }),
        },
    };
    json!({
        "host": {
            "version": env!("CARGO_PKG_VERSION"),
            "uptime_s": host.uptime().as_secs(),
            "resident_bytes": crate::base::metrics::resident_memory_bytes(),
            "ready": host.is_ready(),
            "services": snapshot.services().count(),
            "instances_in_use": instances_in_use,
            "instances_capacity": instances_capacity,
        },
        "latency_bounds": (0..LATENCY_BUCKETS).map(|i| {
            let bound = latency_bucket_bound(i);
            if bound.is_finite() { json!(bound) } else { Value::Null }
        }).collect::<Vec<_>>(),
        "services": services,
        "rejected": rejected,
        "history": history,
        "logs": if logs { json!(lines) } else { Value::Null },
        "backends": backends,
        "dead_letters": dead_letters,
        "cluster": cluster,
    })
}
