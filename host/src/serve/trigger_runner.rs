//! The trigger runtime: runs services on messages and on schedules, as
//! their manifests say (`deploy::triggers`), for as long as they are
//! deployed.
//!
//! A supervisor follows the registry: for every deployed service's trigger
//! it keeps one task running, started when the trigger appears and stopped
//! when it goes away or changes. A redeploy that leaves a trigger as it was
//! keeps its task (and its place in the queue): each message goes to the
//! version deployed when it arrives.
//!
//! **Messages.** A trigger's task joins its consumer group on the broker
//! (again after the broker comes back, with backoff) and takes at most
//! `concurrency` messages at a time: the next is fetched only when a
//! handler finishes, so a slow handler slows its consumer, not the host's
//! memory. Each message goes to the service — POSTed to the trigger's path,
//! or through its messaging export — under the service's limits. Success
//! (2xx, `ok`) acknowledges it; anything else — an error status, a trap,
//! the time limit — asks for it again after `retry_delay`, doubled each
//! time, and after `max_attempts` it becomes a dead letter. A message that
//! arrives with more attempts than allowed (its handlers kept crashing the
//! host, or timing out on a host that died) is dead-lettered unhandled.
//!
//! **Schedules** fire on the host's clock (cron expressions in UTC). A tick
//! whose previous run is still going is skipped, not queued; ticks missed
//! while the host was down are not caught up.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::HeaderValue;
use http_body_util::BodyExt as _;
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;

use crate::base::metrics::{HandledOutcome, ScheduleOutcome};
use crate::base::respond;
use crate::base::trace::{TRACEPARENT, TraceContext};
use crate::capabilities::messaging::broker::{BrokerError, Delivery, Subscription};
use crate::capabilities::messaging::message::Message;
use crate::capabilities::messaging::{MAX_MESSAGE_SIZE, MessagingHub, REQUEST_ID_KEY};
use crate::deploy::Deployment;
use crate::deploy::source::cluster::Cluster;
use crate::deploy::triggers::{MessageTrigger, ScheduleTrigger, When};
use crate::serve::dispatch::{Cause, Dispatcher};

/// Headers a message's POST carries.
pub mod header {
    /// The topic the message was published to.
    pub const TOPIC: &str = "x-wharf-topic";
    /// The message's id, the same on every attempt.
    pub const MESSAGE_ID: &str = "x-wharf-message-id";
    /// Which attempt this is: 1 for the first.
    pub const ATTEMPT: &str = "x-wharf-attempt";
    /// The trigger's consumer group.
    pub const GROUP: &str = "x-wharf-group";
    /// When the message was published (milliseconds since the epoch).
    pub const PUBLISHED: &str = "x-wharf-published-ms";
    /// Which schedule fired.
    pub const SCHEDULE: &str = "x-wharf-schedule";
    /// When the run was due (milliseconds since the epoch).
    pub const SCHEDULED_AT: &str = "x-wharf-scheduled-ms";
}

/// The broker's grace beyond a handler's time limit before it hands an
/// unacknowledged message to another consumer.
const ACK_GRACE: Duration = Duration::from_secs(30);
/// Shortest and longest wait before joining a group again after a failure.
const RESUBSCRIBE_BACKOFF: (Duration, Duration) =
    (Duration::from_millis(100), Duration::from_secs(15));

/// Longest wait for the broker to set up a group's subscription.
const SUBSCRIBE_TIMEOUT: Duration = Duration::from_secs(10);

/// Which trigger a task runs: the service and the trigger as declared.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum TriggerKey {
    Message(String, String),
    Schedule(String, String),
}

/// How far the supervisor has got: which registry change it has acted on,
/// and how many message triggers are still making their first attempt to
/// join their group. A group gets the messages published after it joined,
/// so the host says it is loaded only once its triggers have tried.
#[derive(Clone, Default)]
pub(crate) struct TriggerProgress {
    inner: Arc<ProgressInner>,
}

#[derive(Default)]
struct ProgressInner {
    /// The registry change count the supervisor last reconciled.
    reconciled: AtomicU64,
    /// Triggers started whose first subscribe has not returned yet.
    joining: AtomicUsize,
}

impl TriggerProgress {
    /// Waits until the supervisor has acted on registry change `version`
    /// (or a later one) and every trigger it started has tried to join
    /// once — succeeded, or found the broker down — or until `limit`.
    /// Returns whether it settled in time.
    pub(crate) async fn settled(&self, version: u64, limit: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let inner = &self.inner;
            if inner.reconciled.load(Ordering::Acquire) >= version
                && inner.joining.load(Ordering::Acquire) == 0
            {
                return true;
            }
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Counts one trigger starting to join; the guard counts it done.
    fn joining(&self) -> Joining {
        self.inner.joining.fetch_add(1, Ordering::AcqRel);
        Joining(Some(self.inner.clone()))
    }
}

/// A trigger's first attempt to join, counted until dropped or `done`.
struct Joining(Option<Arc<ProgressInner>>);

impl Joining {
    fn done(&mut self) {
        if let Some(inner) = self.0.take() {
            inner.joining.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

impl Drop for Joining {
    fn drop(&mut self) {
        self.done();
    }
}

/// Starts the supervisor for `dispatcher`'s services; it stops (with every
/// trigger) when a graceful shutdown begins or the dispatcher is gone.
pub(crate) fn start(
    dispatcher: &Arc<Dispatcher>,
    hub: Option<Arc<MessagingHub>>,
    cluster: Option<Arc<Cluster>>,
) -> TriggerProgress {
    let mut changes = dispatcher.deployer().registry().watch_changes();
    let mut draining = dispatcher.watch_draining();
    let weak = Arc::downgrade(dispatcher);
    let progress = TriggerProgress::default();
    let reporting = progress.clone();
    tokio::spawn(async move {
        let mut running: HashMap<TriggerKey, JoinHandle<()>> = HashMap::new();
        loop {
            let Some(dispatcher) = weak.upgrade() else {
                break;
            };
            let version = *changes.borrow_and_update();
            reconcile(
                &dispatcher,
                &weak,
                hub.as_ref(),
                cluster.as_ref(),
                &reporting,
                &mut running,
            );
            reporting.inner.reconciled.store(version, Ordering::Release);
            drop(dispatcher);
            tokio::select! {
                changed = changes.changed() => if changed.is_err() { break },
                _ = draining.wait_for(|draining| *draining) => break,
            }
        }
        // Handlers already running finish (and acknowledge) on their own.
        for (_, task) in running {
            task.abort();
        }
    });
    progress
}

/// Starts the triggers of the deployed services that have no task yet, and
/// stops those whose trigger is gone.
fn reconcile(
    dispatcher: &Arc<Dispatcher>,
    weak: &Weak<Dispatcher>,
    hub: Option<&Arc<MessagingHub>>,
    cluster: Option<&Arc<Cluster>>,
    progress: &TriggerProgress,
    running: &mut HashMap<TriggerKey, JoinHandle<()>>,
) {
    let snapshot = dispatcher.deployer().registry().snapshot_full();
    let mut wanted: HashMap<TriggerKey, Box<dyn FnOnce() -> JoinHandle<()>>> = HashMap::new();
    for deployment in snapshot.triggered() {
        let service = deployment.name().to_string();
        let timeout = deployment.limits().timeout;
        for trigger in &deployment.config().triggers.messages {
            let Some(hub) = hub.cloned() else { continue };
            let key = TriggerKey::Message(service.clone(), format!("{trigger:?}"));
            let (weak, service, trigger) = (weak.clone(), service.clone(), trigger.clone());
            let progress = progress.clone();
            wanted.insert(
                key,
                Box::new(move || {
                    let joining = progress.joining();
                    tokio::spawn(consume(
                        weak,
                        hub,
                        service,
                        trigger,
                        timeout + ACK_GRACE,
                        joining,
                    ))
                }),
            );
        }
        for (index, trigger) in deployment.config().triggers.schedules.iter().enumerate() {
            let key = TriggerKey::Schedule(service.clone(), format!("{trigger:?}"));
            let (weak, service, trigger) = (weak.clone(), service.clone(), trigger.clone());
            let claim = cluster.cloned().map(|cluster| TickClaim { cluster, index });
            wanted.insert(
                key,
                Box::new(move || tokio::spawn(schedule(weak, service, trigger, claim))),
            );
        }
    }
    running.retain(|key, task| {
        let keep = wanted.contains_key(key) && !task.is_finished();
        if !keep {
            task.abort();
        }
        keep
    });
    for (key, start) in wanted {
        running.entry(key).or_insert_with(start);
    }
}

/// The deployment of `service` now, if any.
fn current(dispatcher: &Dispatcher, service: &str) -> Option<Arc<Deployment>> {
    dispatcher
        .deployer()
        .registry()
        .snapshot()
        .service(service)
        .cloned()
}

/// One message trigger: joins the group and hands its messages to the
/// service, `concurrency` at a time, until stopped.
async fn consume(
    dispatcher: Weak<Dispatcher>,
    hub: Arc<MessagingHub>,
    service: String,
    trigger: MessageTrigger,
    ack_wait: Duration,
    mut joining: Joining,
) {
    let subscription = Subscription {
        group: trigger.group().to_string(),
        pattern: trigger.topic.clone(),
        max_attempts: trigger.max_attempts,
        ack_wait,
        // Twice the handlers: the next batch is at hand when a handler
        // finishes, instead of a round trip to the broker later.
        prefetch: 2 * trigger.concurrency as usize,
    };
    let slots = Arc::new(Semaphore::new(trigger.concurrency as usize));
    let trigger = Arc::new(trigger);
    let mut backoff = RESUBSCRIBE_BACKOFF.0;
    let mut reported_down = false;
    loop {
        let joined = async {
            // Subscribed first, so the broker keeps the group's messages
            // from now on even if the claim below has to wait for it; no
            // message is handed out before the claim says the group is
            // this service's (a consumer dropped unread loses nothing).
            let consumer = hub.broker().subscribe(&subscription).await?;
            let owner = hub
                .broker()
                .claim_group(&subscription.group, &service)
                .await?;
            if owner != service {
                return Ok(Err(owner));
            }
            Ok(Ok(consumer))
        };
        let subscribed = match tokio::time::timeout(SUBSCRIBE_TIMEOUT, joined).await {
            Ok(Ok(Ok(consumer))) => Ok(consumer),
            Ok(Ok(Err(owner))) => {
                let reason = format!(
                    "group {:?} belongs to service {owner:?}, which subscribed it first; this trigger stays off (choose another group)",
                    subscription.group
                );
                tracing::error!(service = %service, group = %subscription.group, "{reason}");
                if let Some(dispatcher) = dispatcher.upgrade() {
                    dispatcher.deployer().note_rejection(&service, reason);
                }
                return;
            }
            Ok(Err(err)) => Err(err),
            Err(_) => Err(BrokerError::Unavailable(format!(
                "joining the group took longer than {}s",
                SUBSCRIBE_TIMEOUT.as_secs()
            ))),
        };
        joining.done();
        let mut consumer = match subscribed {
            Ok(consumer) => consumer,
            Err(err) => {
                if !reported_down {
                    tracing::warn!(
                        service = %service,
                        group = %subscription.group,
                        topic = %subscription.pattern,
                        "the trigger cannot join its group ({err}); retrying until the broker is back"
                    );
                    reported_down = true;
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(RESUBSCRIBE_BACKOFF.1);
                continue;
            }
        };
        tracing::info!(
            service = %service,
            group = %subscription.group,
            topic = %subscription.pattern,
            broker = hub.broker().kind(),
            "message trigger attached"
        );
        backoff = RESUBSCRIBE_BACKOFF.0;
        reported_down = false;
        loop {
            // Fetch only with a free slot: in-flight messages stay bounded.
            let Ok(slot) = slots.clone().acquire_owned().await else {
                return;
            };
            let delivery = match consumer.next().await {
                Ok(delivery) => delivery,
                Err(err) => {
                    tracing::warn!(
                        service = %service,
                        group = %subscription.group,
                        "the trigger lost its consumer ({err}); joining again"
                    );
                    break;
                }
            };
            let (dispatcher, hub, service, trigger) = (
                dispatcher.clone(),
                hub.clone(),
                service.clone(),
                trigger.clone(),
            );
            tokio::spawn(async move {
                let _slot = slot;
                handle(dispatcher, hub, service, trigger, delivery).await;
            });
        }
        tokio::time::sleep(backoff).await;
    }
}

/// Delivers one message and settles it: acknowledged, retried or dead.
async fn handle(
    dispatcher: Weak<Dispatcher>,
    hub: Arc<MessagingHub>,
    service: String,
    trigger: Arc<MessageTrigger>,
    delivery: Delivery,
) {
    let group = trigger.group().to_string();
    let attempt = delivery.attempt();
    let message = delivery.message().clone();
    let metrics = hub.metrics().clone();
    if attempt > trigger.max_attempts {
        let reason = format!(
            "delivered {attempt} times without an answer (its handlers crashed or timed out with their host)"
        );
        settle_dead(delivery, &service, &group, &message, &reason, &hub).await;
        return;
    }
    let outcome = match dispatcher.upgrade() {
        Some(dispatcher) => run_handler(&dispatcher, &service, &trigger, &message, attempt).await,
        None => Err("the host is shutting down".to_string()),
    };
    match outcome {
        Ok(reply) => {
            if let (Some(reply_to), Some(body)) = (&message.reply_to, reply) {
                let mut answer = Message::new(reply_to, body.0);
                answer.content_type = body.1;
                if let Err(err) = hub.reply(reply_to, answer).await {
                    tracing::debug!(service = %service, "reply not delivered: {err}");
                }
            }
            let latency = SystemTime::now().duration_since(message.published_at).ok();
            if let Err(err) = delivery.ack().await {
                tracing::warn!(
                    service = %service,
                    message_id = %message.id,
                    "acknowledging failed ({err}); the message will be delivered again"
                );
            }
            metrics.message_handled(&service, &group, HandledOutcome::Acked, latency);
        }
        Err(reason) if attempt >= trigger.max_attempts => {
            settle_dead(delivery, &service, &group, &message, &reason, &hub).await;
        }
        Err(reason) => {
            let delay = trigger.backoff(attempt);
            tracing::info!(
                service = %service,
                group = %group,
                message_id = %message.id,
                attempt,
                "the handler failed ({reason}); retrying in {}",
                humantime::format_duration(delay)
            );
            if let Err(err) = delivery.retry(delay).await {
                tracing::warn!(
                    service = %service,
                    message_id = %message.id,
                    "asking for a retry failed ({err}); the broker redelivers it when its lease ends"
                );
            }
            metrics.message_handled(&service, &group, HandledOutcome::Retried, None);
        }
    }
}

async fn settle_dead(
    delivery: Delivery,
    service: &str,
    group: &str,
    message: &Message,
    reason: &str,
    hub: &MessagingHub,
) {
    tracing::warn!(
        service = %service,
        group = %group,
        message_id = %message.id,
        topic = %message.topic,
        attempts = delivery.attempt(),
        "the message failed every attempt and is now a dead letter: {reason}"
    );
    match delivery.dead_letter(reason).await {
        Ok(pruned) => hub.metrics().dead_letters_pruned(group, pruned),
        Err(err) => tracing::warn!(
            service = %service,
            message_id = %message.id,
            "storing the dead letter failed ({err}); the message will be delivered again"
        ),
    }
    hub.metrics()
        .message_handled(service, group, HandledOutcome::DeadLettered, None);
}

/// A handler's reply body and content type.
type Reply = (Bytes, Option<String>);

/// Runs the service's handler for one message: `Ok` with the reply body
/// (for an HTTP handler) on success, else why it failed.
async fn run_handler(
    dispatcher: &Dispatcher,
    service: &str,
    trigger: &MessageTrigger,
    message: &Message,
    attempt: u32,
) -> Result<Option<Reply>, String> {
    let Some(deployment) = current(dispatcher, service) else {
        return Err(format!("service {service} is not deployed"));
    };
    let cause = Cause {
        request_id: message.meta(REQUEST_ID_KEY).map(Arc::from),
        trace: message.meta(TRACEPARENT).and_then(TraceContext::parse),
    };
    let Some(path) = &trigger.path else {
        return dispatcher
            .deliver_message(&deployment, message, cause)
            .await
            .map(|()| None)
            .map_err(|failure| failure.reason());
    };
    let request = message_request(path, trigger, message, attempt)?;
    let response = dispatcher.run_triggered(&deployment, request, cause).await;
    let status = response.status();
    let content_type = response
        .headers()
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    // Read to the end: the handler has finished only when its body has.
    let body = http_body_util::Limited::new(response.into_body(), MAX_MESSAGE_SIZE)
        .collect()
        .await;
    match body {
        Ok(body) if status.is_success() => Ok(Some((body.to_bytes(), content_type))),
        Ok(body) => {
            let text = String::from_utf8_lossy(&body.to_bytes()).trim().to_string();
            let shown: String = text.chars().take(200).collect();
            Err(format!("the handler answered {status}: {shown}"))
        }
        Err(err) if status.is_success() => Err(format!("the handler's response failed: {err}")),
        Err(_) => Err(format!("the handler answered {status}")),
    }
}

/// The POST that carries `message` to `path`.
fn message_request(
    path: &str,
    trigger: &MessageTrigger,
    message: &Message,
    attempt: u32,
) -> Result<http::Request<wasmtime_wasi_http::p2::body::HyperIncomingBody>, String> {
    let published = message
        .published_at
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let mut builder = http::Request::post(path)
        .header(http::header::HOST, "localhost")
        .header(
            http::header::CONTENT_TYPE,
            message
                .content_type
                .as_deref()
                .unwrap_or("application/octet-stream"),
        )
        .header(header::TOPIC, &message.topic)
        .header(header::MESSAGE_ID, &message.id)
        .header(header::ATTEMPT, attempt)
        .header(header::GROUP, trigger.group())
        .header(header::PUBLISHED, published);
    if let Some(headers) = builder.headers_mut() {
        if let Ok(length) = HeaderValue::from_str(&message.body.len().to_string()) {
            headers.insert(http::header::CONTENT_LENGTH, length);
        }
        for (key, value) in &message.metadata {
            if let Some((name, value)) = metadata_header(key, value) {
                headers.append(name, value);
            }
        }
    }
    builder
        .body(respond::full(message.body.clone()))
        .map_err(|err| format!("the message cannot be POSTed: {err}"))
}

/// A message's metadata entry as a request header, unless it would stand
/// for something the host sets itself (framing, the request id, the trace,
/// the `x-wharf-` delivery headers) or is not a valid header.
fn metadata_header(key: &str, value: &str) -> Option<(http::HeaderName, HeaderValue)> {
    let name = http::HeaderName::from_bytes(key.as_bytes()).ok()?;
    let reserved = matches!(
        name.as_str(),
        "host"
            | "content-length"
            | "content-type"
            | "transfer-encoding"
            | "connection"
            | "te"
            | "trailer"
            | "upgrade"
            | "keep-alive"
            | "proxy-connection"
    ) || name.as_str() == REQUEST_ID_KEY
        || name.as_str() == TRACEPARENT
        || name.as_str().starts_with("x-wharf-");
    if reserved {
        return None;
    }
    Some((name, HeaderValue::from_str(value).ok()?))
}

/// One schedule: runs the service at every tick until stopped, skipping a
/// tick while the previous run is still going.
async fn schedule(
    dispatcher: Weak<Dispatcher>,
    service: String,
    trigger: ScheduleTrigger,
    claim: Option<TickClaim>,
) {
    let busy = Arc::new(AtomicBool::new(false));
    let trigger = Arc::new(trigger);
    loop {
        let due = match &trigger.when {
            When::Every(every) => {
                // Ticks fall on multiples of the interval since the epoch,
                // so every host of a cluster agrees on them.
                let next = next_multiple(SystemTime::now(), *every);
                let wait = next.duration_since(SystemTime::now()).unwrap_or_default();
                tokio::time::sleep(wait).await;
                next
            }
            When::Cron(cron) => {
                let Some(next) = cron.upcoming(chrono::Utc).next() else {
                    tracing::warn!(service = %service, "the schedule {} never fires again", trigger.when);
                    return;
                };
                let wait = (next - chrono::Utc::now()).to_std().unwrap_or_default();
                tokio::time::sleep(wait).await;
                SystemTime::from(next)
            }
        };
        let Some(dispatcher) = dispatcher.upgrade() else {
            return;
        };
        if let Some(claim) = &claim {
            let due_ms = due
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64);
            if !claim
                .cluster
                .claim_tick(&service, claim.index, due_ms)
                .await
            {
                // Another host of the cluster runs this tick.
                continue;
            }
        }
        let metrics = dispatcher.deployer().metrics().clone();
        if busy.swap(true, Ordering::AcqRel) {
            tracing::warn!(
                service = %service,
                schedule = %trigger.when,
                "skipping a scheduled run: the previous one is still running"
            );
            metrics.schedule_run(&service, ScheduleOutcome::Skipped);
            continue;
        }
        let (busy, service, trigger) = (busy.clone(), service.clone(), trigger.clone());
        tokio::spawn(async move {
            let ok = run_scheduled(&dispatcher, &service, &trigger, due).await;
            let outcome = if ok {
                ScheduleOutcome::Ok
            } else {
                ScheduleOutcome::Failed
            };
            metrics.schedule_run(&service, outcome);
            busy.store(false, Ordering::Release);
        });
    }
}

/// In a cluster, how a schedule claims its ticks: by the schedule's index
/// in its service's manifest.
struct TickClaim {
    cluster: Arc<Cluster>,
    index: usize,
}

/// The first multiple of `every` since the epoch after `now`.
fn next_multiple(now: SystemTime, every: Duration) -> SystemTime {
    let since = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default();
    let every_ms = every.as_millis().max(1);
    let next_ms = (since.as_millis() / every_ms + 1) * every_ms;
    SystemTime::UNIX_EPOCH + Duration::from_millis(next_ms as u64)
}

/// POSTs one scheduled run; true if the service answered 2xx.
async fn run_scheduled(
    dispatcher: &Dispatcher,
    service: &str,
    trigger: &ScheduleTrigger,
    due: SystemTime,
) -> bool {
    let Some(deployment) = current(dispatcher, service) else {
        return false;
    };
    let due_ms = due
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let request = http::Request::post(trigger.path.as_str())
        .header(http::header::HOST, "localhost")
        .header(header::SCHEDULE, trigger.when.to_string())
        .header(header::SCHEDULED_AT, due_ms)
        .header(http::header::CONTENT_LENGTH, 0)
        .body(respond::empty());
    let Ok(request) = request else { return false };
    let response = dispatcher
        .run_triggered(&deployment, request, Cause::default())
        .await;
    let status = response.status();
    // The run is over when its response body is.
    let _ = response.into_body().collect().await;
    if !status.is_success() {
        tracing::warn!(
            service = %service,
            schedule = %trigger.when,
            status = status.as_u16(),
            "a scheduled run failed"
        );
    }
    status.is_success()
}
