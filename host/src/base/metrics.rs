//! Metrics in the Prometheus text format, through `prometheus-client`: per
//! service request counts by status class, latency, in-flight, timeouts,
//! traps and rejections; deploy events, compile times and cache results;
//! process-wide instance-pool use and resident memory.
//!
//! Per-service handles are created once per service and shared by its
//! deployments, so the request path only touches atomics.

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// Labels naming a service.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ServiceLabels {
    service: String,
}

/// HTTP status classes.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
enum StatusClass {
    Informational,
    Success,
    Redirection,
    ClientError,
    ServerError,
}

const CLASSES: [StatusClass; 5] = [
    StatusClass::Informational,
    StatusClass::Success,
    StatusClass::Redirection,
    StatusClass::ClientError,
    StatusClass::ServerError,
];

/// Label values written as fixed strings.
macro_rules! label_values {
    ($($ty:ident { $($variant:ident => $text:literal),* $(,)? })*) => {$(
        impl EncodeLabelValue for $ty {
            fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
                use std::fmt::Write as _;
                encoder.write_str(match self { $($ty::$variant => $text),* })
            }
        }
    )*};
}

label_values! {
    StatusClass {
        Informational => "1xx",
        Success => "2xx",
        Redirection => "3xx",
        ClientError => "4xx",
        ServerError => "5xx",
    }
    RejectReason { Busy => "busy", Overloaded => "overloaded", BodyTooLarge => "body_too_large" }
    DeployEvent { Deploy => "deploy", Replace => "replace", Reject => "reject", Remove => "remove" }
    CacheResult { Hit => "hit", Miss => "miss" }
    PublishResult {
        Ok => "ok",
        Invalid => "invalid",
        Denied => "denied",
        Full => "full",
        Throttled => "throttled",
        Unavailable => "unavailable",
        Error => "error",
    }
    HandledOutcome { Acked => "acked", Retried => "retried", DeadLettered => "dead_lettered" }
    ScheduleOutcome { Ok => "ok", Failed => "failed", Skipped => "skipped" }
}

/// How a publish ended, for the metrics.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum PublishResult {
    /// The broker accepted the message.
    Ok,
    /// Not a valid topic or message.
    Invalid,
    /// The service may not publish to the topic.
    Denied,
    /// The broker is full.
    Full,
    /// The service used its publishing quota.
    Throttled,
    /// The broker cannot be reached.
    Unavailable,
    /// Anything else.
    Error,
}

/// What became of one delivery of a message to a trigger.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum HandledOutcome {
    /// The handler succeeded; the message is done.
    Acked,
    /// The handler failed; the message comes again later.
    Retried,
    /// The handler failed its last attempt; the message is a dead letter.
    DeadLettered,
}

/// How one scheduled run went.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum ScheduleOutcome {
    /// The handler answered 2xx.
    Ok,
    /// It failed.
    Failed,
    /// The tick was skipped: the previous run was still going.
    Skipped,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PublishLabels {
    service: String,
    result: PublishResult,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HandledLabels {
    service: String,
    group: String,
    outcome: HandledOutcome,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct GroupLabels {
    group: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ScheduleLabels {
    service: String,
    outcome: ScheduleOutcome,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    service: String,
    class: StatusClass,
}

/// Why a request was refused before its guest ran.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum RejectReason {
    /// The service's concurrency limit (503).
    Busy,
    /// The host's instance pool (503).
    Overloaded,
    /// The request body limit (413).
    BodyTooLarge,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RejectLabels {
    service: String,
    reason: RejectReason,
}

/// A change to a service.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum DeployEvent {
    /// First deployment.
    Deploy,
    /// A new version replaced the running one.
    Replace,
    /// A new version was rejected.
    Reject,
    /// The service was removed.
    Remove,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DeployLabels {
    service: String,
    event: DeployEvent,
}

#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
enum CacheResult {
    Hit,
    Miss,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CacheLabels {
    result: CacheResult,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

fn latency_histogram() -> Histogram {
    // 0.1 ms .. ~26 s.
    Histogram::new(exponential_buckets(
        0.0001,
        2.0,
        (LATENCY_BUCKETS - 1) as u16,
    ))
}

/// The latency bucket of `seconds`: the first whose bound it does not
/// exceed, computed rather than searched (this runs on every request).
fn latency_bucket(seconds: f64) -> usize {
    if seconds <= 0.0001 {
        return 0;
    }
    ((seconds / 0.0001).log2().ceil() as usize).min(LATENCY_BUCKETS - 1)
}

/// Latency buckets: upper bounds 0.1 ms × 2^i for i < 19, then +Inf.
pub const LATENCY_BUCKETS: usize = 20;

/// The upper bound of latency bucket `i`, in seconds (`INFINITY` for the
/// last).
pub fn latency_bucket_bound(i: usize) -> f64 {
    if i + 1 >= LATENCY_BUCKETS {
        f64::INFINITY
    } else {
        0.0001 * f64::powi(2.0, i as i32)
    }
}

fn compile_histogram() -> Histogram {
    // 1 ms .. ~65 s.
    Histogram::new(exponential_buckets(0.001, 2.0, 17))
}

/// The handles one service's requests update.
#[derive(Debug)]
pub struct ServiceMetrics {
    requests: [Counter; 5],
    latency: Histogram,
    /// The same latencies, counted per bucket where the dashboard can read
    /// them (the Prometheus histogram does not expose its buckets).
    latency_counts: [std::sync::atomic::AtomicU64; LATENCY_BUCKETS],
    in_flight: Gauge,
    timeouts: Counter,
    cpu_limited: Counter,
    cpu: Counter<f64, std::sync::atomic::AtomicU64>,
    traps: Counter,
    busy: Counter,
    overloaded: Counter,
    body_too_large: Counter,
}

impl ServiceMetrics {
    /// Counts a response by status class and records its latency.
    pub fn observe(&self, status: u16, latency: Duration) {
        let class = usize::from(status / 100).clamp(1, 5) - 1;
        self.requests[class].inc();
        let seconds = latency.as_secs_f64();
        self.latency.observe(seconds);
        self.latency_counts[latency_bucket(seconds)]
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    /// Responses so far per latency bucket (see [`latency_bucket_bound`]).
    pub fn latency_counts(&self) -> [u64; LATENCY_BUCKETS] {
        std::array::from_fn(|i| self.latency_counts[i].load(std::sync::atomic::Ordering::Relaxed))
    }

    /// Responses so far: all of them, and those with a 5xx status.
    pub fn answered(&self) -> (u64, u64) {
        let total = self.requests.iter().map(Counter::get).sum();
        (total, self.requests[4].get())
    }

    /// Requests of this service running now.
    pub fn running(&self) -> u64 {
        self.in_flight.get().max(0) as u64
    }

    /// Marks a request in flight until the guard is dropped.
    pub fn in_flight(&self) -> InFlight {
        self.in_flight.inc();
        InFlight(self.in_flight.clone())
    }

    /// Counts a guest stopped at its deadline.
    pub fn timed_out(&self) {
        self.timeouts.inc();
    }

    /// Counts a guest stopped for using up its CPU budget.
    pub fn cpu_limited(&self) {
        self.cpu_limited.inc();
    }

    /// Adds the CPU time one request's guest used.
    pub fn used_cpu(&self, cpu: Duration) {
        self.cpu.inc_by(cpu.as_secs_f64());
    }

    /// Counts a guest that crashed (trap, memory limit, exit, no response).
    pub fn trapped(&self) {
        self.traps.inc();
    }

    /// Counts a request refused before its guest ran.
    pub fn rejected(&self, reason: RejectReason) {
        match reason {
            RejectReason::Busy => self.busy.inc(),
            RejectReason::Overloaded => self.overloaded.inc(),
            RejectReason::BodyTooLarge => self.body_too_large.inc(),
        };
    }
}

/// Keeps a request counted as in flight.
#[derive(Debug)]
pub struct InFlight(Gauge);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// Labels of a key-value operation.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KeyValueLabels {
    service: String,
    backend: &'static str,
    op: &'static str,
    result: &'static str,
}

/// Labels of a key-value operation's latency.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KeyValueLatencyLabels {
    backend: &'static str,
    op: &'static str,
}

/// Labels of a backend's reachability.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BackendLabels {
    capability: &'static str,
    backend: &'static str,
}

/// A key-value operation, as counted.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum KeyValueOp {
    /// `get` (and each key of `get-many`).
    Get,
    /// `set` (and each pair of `set-many`).
    Set,
    /// `delete` (and each key of `delete-many`).
    Delete,
    /// `exists`.
    Exists,
    /// One page of `list-keys`.
    ListKeys,
    /// `increment`.
    Increment,
    /// Reading a value for a compare-and-swap.
    CasRead,
    /// `swap`.
    Swap,
}

impl KeyValueOp {
    /// Every operation, in label order.
    pub const ALL: [KeyValueOp; 8] = [
        KeyValueOp::Get,
        KeyValueOp::Set,
        KeyValueOp::Delete,
        KeyValueOp::Exists,
        KeyValueOp::ListKeys,
        KeyValueOp::Increment,
        KeyValueOp::CasRead,
        KeyValueOp::Swap,
    ];

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            KeyValueOp::Get => "get",
            KeyValueOp::Set => "set",
            KeyValueOp::Delete => "delete",
            KeyValueOp::Exists => "exists",
            KeyValueOp::ListKeys => "list-keys",
            KeyValueOp::Increment => "increment",
            KeyValueOp::CasRead => "cas-read",
            KeyValueOp::Swap => "swap",
        }
    }
}

/// The key-value counters of one service on one backend, created once so an
/// operation only touches atomics.
#[derive(Debug)]
pub struct KeyValueMetrics {
    /// Per operation: the ok and error counters.
    counts: [[Counter; 2]; 8],
    /// Per operation: the latency histogram.
    latency: [Histogram; 8],
}

impl KeyValueMetrics {
    /// Counts one operation and records how long it took.
    pub fn observe(&self, op: KeyValueOp, ok: bool, elapsed: Duration) {
        let index = op as usize;
        self.counts[index][usize::from(!ok)].inc();
        self.latency[index].observe(elapsed.as_secs_f64());
    }
}

/// Whether one of the host's backends is reachable, for the metrics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendGauge {
    /// The capability it serves: `keyvalue`, `messaging`.
    pub capability: &'static str,
    /// Its kind: `embedded`, `redis`, `nats`, `rabbitmq`.
    pub backend: &'static str,
    /// Whether it is reachable.
    pub up: bool,
}

/// The host's metrics registry.
pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    latency: HistogramFamily<ServiceLabels>,
    in_flight: Family<ServiceLabels, Gauge>,
    timeouts: Family<ServiceLabels, Counter>,
    cpu_limited: Family<ServiceLabels, Counter>,
    cpu: Family<ServiceLabels, Counter<f64, std::sync::atomic::AtomicU64>>,
    traps: Family<ServiceLabels, Counter>,
    rejected: Family<RejectLabels, Counter>,
    deploy_events: Family<DeployLabels, Counter>,
    compile_time: HistogramFamily<ServiceLabels>,
    cache: Family<CacheLabels, Counter>,
    services: Gauge,
    instances_in_use: Gauge,
    instances_capacity: Gauge,
    resident_memory: Gauge,
    open_connections: Gauge,
    keyvalue_operations: Family<KeyValueLabels, Counter>,
    keyvalue_latency: HistogramFamily<KeyValueLatencyLabels>,
    backend_up: Family<BackendLabels, Gauge>,
    messages_published: Family<PublishLabels, Counter>,
    messages_handled: Family<HandledLabels, Counter>,
    dead_letters_pruned: Family<GroupLabels, Counter>,
    message_latency: HistogramFamily<ServiceLabels>,
    schedule_runs: Family<ScheduleLabels, Counter>,
    by_service: Mutex<HashMap<String, Arc<ServiceMetrics>>>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    /// A registry with every Wharf metric registered (under `wharf_`).
    pub fn new() -> Metrics {
        Metrics::for_host(None)
    }

    /// Like [`Metrics::new`], with every series labelled `host="ID"` when
    /// `host` is given (a cluster member's id), so one Prometheus query can
    /// compare the hosts of a cluster.
    pub fn for_host(host: Option<&str>) -> Metrics {
        let mut registry = match host {
            Some(id) => Registry::with_prefix_and_labels(
                "wharf",
                [(Cow::Borrowed("host"), Cow::Owned(id.to_string()))].into_iter(),
            ),
            None => Registry::with_prefix("wharf"),
        };
        let metrics = Metrics {
            requests: Family::default(),
            latency: Family::new_with_constructor(latency_histogram),
            in_flight: Family::default(),
            timeouts: Family::default(),
            cpu_limited: Family::default(),
            cpu: Family::default(),
            traps: Family::default(),
            rejected: Family::default(),
            deploy_events: Family::default(),
            compile_time: Family::new_with_constructor(compile_histogram),
            cache: Family::default(),
            services: Gauge::default(),
            instances_in_use: Gauge::default(),
            instances_capacity: Gauge::default(),
            resident_memory: Gauge::default(),
            open_connections: Gauge::default(),
            keyvalue_operations: Family::default(),
            keyvalue_latency: Family::new_with_constructor(latency_histogram),
            backend_up: Family::default(),
            messages_published: Family::default(),
            messages_handled: Family::default(),
            dead_letters_pruned: Family::default(),
            message_latency: Family::new_with_constructor(latency_histogram),
            schedule_runs: Family::default(),
            by_service: Mutex::new(HashMap::new()),
            registry: Registry::default(),
        };
        registry.register(
            "requests",
            "Requests answered, by service and status class",
            metrics.requests.clone(),
        );
        registry.register(
            "request_duration_seconds",
            "Time from request to response headers, by service",
            metrics.latency.clone(),
        );
        registry.register(
            "requests_in_flight",
            "Requests running now (until the guest ends), by service",
            metrics.in_flight.clone(),
        );
        registry.register(
            "timeouts",
            "Requests stopped at their time limit, by service",
            metrics.timeouts.clone(),
        );
        registry.register(
            "cpu_limited",
            "Requests stopped for using up their CPU budget, by service",
            metrics.cpu_limited.clone(),
        );
        registry.register(
            "cpu_seconds",
            "CPU time guests used running requests, by service",
            metrics.cpu.clone(),
        );
        registry.register(
            "traps",
            "Requests whose guest crashed (trap, memory limit, exit, no response), by service",
            metrics.traps.clone(),
        );
        registry.register(
            "rejected",
            "Requests refused before the guest ran, by service and reason",
            metrics.rejected.clone(),
        );
        registry.register(
            "deploy_events",
            "Deploys, replacements, rejections and removals, by service",
            metrics.deploy_events.clone(),
        );
        registry.register(
            "compile_duration_seconds",
            "Time to compile or load a component from cache, by service",
            metrics.compile_time.clone(),
        );
        registry.register(
            "compile_cache",
            "Compiled-code cache lookups by result",
            metrics.cache.clone(),
        );
        registry.register("services", "Services deployed", metrics.services.clone());
        registry.register(
            "pool_instances_in_use",
            "Instances alive now (instance slots in use)",
            metrics.instances_in_use.clone(),
        );
        registry.register(
            "pool_instances_capacity",
            "Instance slots in total",
            metrics.instances_capacity.clone(),
        );
        registry.register(
            "process_resident_memory_bytes",
            "Resident memory of the host process",
            metrics.resident_memory.clone(),
        );
        registry.register(
            "keyvalue_operations",
            "Key-value operations, by service, backend, operation and result",
            metrics.keyvalue_operations.clone(),
        );
        registry.register(
            "keyvalue_operation_duration_seconds",
            "Time key-value operations took, by backend and operation",
            metrics.keyvalue_latency.clone(),
        );
        registry.register(
            "backend_up",
            "Whether a backend is reachable (1) or not (0), by capability and backend",
            metrics.backend_up.clone(),
        );
        registry.register(
            "messages_published",
            "Messages services published, by service and result",
            metrics.messages_published.clone(),
        );
        registry.register(
            "messages_handled",
            "Deliveries of messages to triggered services, by service, group and outcome",
            metrics.messages_handled.clone(),
        );
        registry.register(
            "dead_letters_pruned",
            "Oldest dead letters dropped to keep a group within its bounds, by group",
            metrics.dead_letters_pruned.clone(),
        );
        registry.register(
            "message_delivery_seconds",
            "Time from publish to a handler's success, by service",
            metrics.message_latency.clone(),
        );
        registry.register(
            "schedule_runs",
            "Scheduled runs, by service and outcome",
            metrics.schedule_runs.clone(),
        );
        registry.register(
            "open_connections",
            "Client connections open now",
            metrics.open_connections.clone(),
        );
        Metrics {
            registry,
            ..metrics
        }
    }

    /// The request-path handles of service `name` (created on first use).
    pub fn service(&self, name: &str) -> Arc<ServiceMetrics> {
        let mut by_service = self.by_service.lock().unwrap_or_else(|e| e.into_inner());
        by_service
            .entry(name.to_string())
            .or_insert_with(|| {
                let labels = ServiceLabels {
                    service: name.to_string(),
                };
                let reject = |reason| {
                    self.rejected
                        .get_or_create(&RejectLabels {
                            service: name.to_string(),
                            reason,
                        })
                        .clone()
                };
                Arc::new(ServiceMetrics {
                    requests: CLASSES.map(|class| {
                        self.requests
                            .get_or_create(&RequestLabels {
                                service: name.to_string(),
                                class,
                            })
                            .clone()
                    }),
                    latency: self.latency.get_or_create(&labels).clone(),
                    latency_counts: std::array::from_fn(|_| Default::default()),
                    in_flight: self.in_flight.get_or_create(&labels).clone(),
                    timeouts: self.timeouts.get_or_create(&labels).clone(),
                    cpu_limited: self.cpu_limited.get_or_create(&labels).clone(),
                    cpu: self.cpu.get_or_create(&labels).clone(),
                    traps: self.traps.get_or_create(&labels).clone(),
                    busy: reject(RejectReason::Busy),
                    overloaded: reject(RejectReason::Overloaded),
                    body_too_large: reject(RejectReason::BodyTooLarge),
                })
            })
            .clone()
    }

    /// The key-value counters of service `name` on `backend`.
    pub fn keyvalue(&self, name: &str, backend: &'static str) -> Arc<KeyValueMetrics> {
        let count = |op: KeyValueOp, result| {
            self.keyvalue_operations
                .get_or_create(&KeyValueLabels {
                    service: name.to_string(),
                    backend,
                    op: op.as_str(),
                    result,
                })
                .clone()
        };
        Arc::new(KeyValueMetrics {
            counts: KeyValueOp::ALL.map(|op| [count(op, "ok"), count(op, "error")]),
            latency: KeyValueOp::ALL.map(|op| {
                self.keyvalue_latency
                    .get_or_create(&KeyValueLatencyLabels {
                        backend,
                        op: op.as_str(),
                    })
                    .clone()
            }),
        })
    }

    /// Records whether the host's backends are reachable (at scrape time).
    pub fn set_backends(&self, backends: &[BackendGauge]) {
        for gauge in backends {
            self.backend_up
                .get_or_create(&BackendLabels {
                    capability: gauge.capability,
                    backend: gauge.backend,
                })
                .set(i64::from(gauge.up));
        }
    }

    /// Records a change to a service.
    pub fn deploy_event(&self, service: &str, event: DeployEvent) {
        self.deploy_events
            .get_or_create(&DeployLabels {
                service: service.to_string(),
                event,
            })
            .inc();
    }

    /// Records how a component was compiled.
    pub fn compiled(&self, service: &str, duration: Duration, cache_hit: bool) {
        self.compile_time
            .get_or_create(&ServiceLabels {
                service: service.to_string(),
            })
            .observe(duration.as_secs_f64());
        let result = if cache_hit {
            CacheResult::Hit
        } else {
            CacheResult::Miss
        };
        self.cache.get_or_create(&CacheLabels { result }).inc();
    }

    /// Counts a publish by service `service`.
    pub fn message_published(&self, service: &str, result: PublishResult) {
        self.messages_published
            .get_or_create(&PublishLabels {
                service: service.to_string(),
                result,
            })
            .inc();
    }

    /// Counts a delivery to service `service` in `group`; `latency` is the
    /// time since the message was published, for a handled one.
    pub fn message_handled(
        &self,
        service: &str,
        group: &str,
        outcome: HandledOutcome,
        latency: Option<Duration>,
    ) {
        self.messages_handled
            .get_or_create(&HandledLabels {
                service: service.to_string(),
                group: group.to_string(),
                outcome,
            })
            .inc();
        if let Some(latency) = latency {
            self.message_latency
                .get_or_create(&ServiceLabels {
                    service: service.to_string(),
                })
                .observe(latency.as_secs_f64());
        }
    }

    /// Counts `pruned` dead letters of `group` dropped to keep it within
    /// its bounds.
    pub fn dead_letters_pruned(&self, group: &str, pruned: u64) {
        if pruned > 0 {
            self.dead_letters_pruned
                .get_or_create(&GroupLabels {
                    group: group.to_string(),
                })
                .inc_by(pruned);
        }
    }

    /// Counts a scheduled run of service `service`.
    pub fn schedule_run(&self, service: &str, outcome: ScheduleOutcome) {
        self.schedule_runs
            .get_or_create(&ScheduleLabels {
                service: service.to_string(),
                outcome,
            })
            .inc();
    }

    /// Counts an opened client connection until the guard is dropped.
    pub fn connection(&self) -> InFlight {
        self.open_connections.inc();
        InFlight(self.open_connections.clone())
    }

    /// Connections open now.
    pub fn open_connections(&self) -> i64 {
        self.open_connections.get()
    }

    /// Renders every metric in the Prometheus text format, after updating
    /// the gauges that are read at scrape time.
    pub fn render(
        &self,
        services: usize,
        instances_in_use: usize,
        instances_capacity: usize,
    ) -> String {
        self.services.set(services as i64);
        self.instances_in_use.set(instances_in_use as i64);
        self.instances_capacity.set(instances_capacity as i64);
        if let Some(rss) = resident_memory_bytes() {
            self.resident_memory.set(rss as i64);
        }
        let mut text = String::new();
        // Encoding into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut text, &self.registry);
        text
    }
}

/// The process's resident set size, from `/proc/self/statm` (Linux).
pub fn resident_memory_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * 4096)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latencies_fall_in_the_bucket_their_bound_says() {
        for i in 0..LATENCY_BUCKETS - 1 {
            let bound = latency_bucket_bound(i);
            assert_eq!(latency_bucket(bound), i);
            assert_eq!(latency_bucket(bound * 1.01), i + 1);
        }
        assert_eq!(latency_bucket(0.0), 0);
        assert_eq!(latency_bucket(1e6), LATENCY_BUCKETS - 1);
    }

    #[test]
    fn a_cluster_member_labels_every_series_with_its_host() {
        let metrics = Metrics::for_host(Some("h1"));
        metrics.service("hello");
        let text = metrics.render(1, 0, 10);
        let series: Vec<&str> = text.lines().filter(|l| !l.starts_with('#')).collect();
        assert!(!series.is_empty());
        for line in series {
            assert!(line.contains("host=\"h1\""), "{line}");
        }
    }

    #[test]
    fn counters_render_with_labels() {
        let metrics = Metrics::new();
        let hello = metrics.service("hello");
        hello.observe(200, Duration::from_millis(2));
        hello.observe(200, Duration::from_millis(3));
        hello.observe(503, Duration::from_millis(1));
        hello.rejected(RejectReason::Busy);
        {
            let _running = hello.in_flight();
            let text = metrics.render(1, 1, 10);
            assert!(
                text.contains("wharf_requests_in_flight{service=\"hello\"} 1"),
                "{text}"
            );
        }
        metrics.deploy_event("hello", DeployEvent::Deploy);
        metrics.compiled("hello", Duration::from_millis(80), false);
        let text = metrics.render(1, 0, 10);
        for line in [
            "wharf_requests_total{service=\"hello\",class=\"2xx\"} 2",
            "wharf_requests_total{service=\"hello\",class=\"5xx\"} 1",
            "wharf_requests_in_flight{service=\"hello\"} 0",
            "wharf_rejected_total{service=\"hello\",reason=\"busy\"} 1",
            "wharf_deploy_events_total{service=\"hello\",event=\"deploy\"} 1",
            "wharf_compile_cache_total{result=\"miss\"} 1",
            "wharf_request_duration_seconds_count{service=\"hello\"} 3",
            "wharf_pool_instances_capacity 10",
            "wharf_services 1",
        ] {
            assert!(text.contains(line), "missing {line}:\n{text}");
        }
        // The same service gets the same handles.
        assert!(Arc::ptr_eq(&hello, &metrics.service("hello")));
    }
}
