//! What starts a service besides an HTTP request, as its manifest declares
//! it: messages on a topic (`[[trigger.message]]`) and a clock
//! (`[[trigger.schedule]]`). Parsed and checked here, run by the `serve`
//! layer's trigger runtime.
//!
//! ```toml
//! [[trigger.message]]
//! topic = "orders.created"   # wildcards allowed
//! group = "billing"          # default: the service name
//! path = "/on-order"         # POSTed here; without it, the messaging export
//! max_attempts = 5           # then it is a dead letter
//! concurrency = 16           # messages in flight for this trigger
//! retry_delay = "1s"         # doubled after each failed attempt
//! [[trigger.schedule]]
//! cron = "0 */5 * * * *"     # sec min hour day month weekday (UTC); or:
//! every = "30s"
//! path = "/tick"
//! ```

use std::str::FromStr as _;
use std::time::Duration;

use serde::Deserialize;

use crate::base::limits::parse_duration_within;
use crate::capabilities::messaging::topic::TopicPattern;

/// Default deliveries of one message before it is dead-lettered.
pub const DEFAULT_MAX_ATTEMPTS: u32 = 5;
/// Most attempts a trigger may ask for.
pub const MAX_ATTEMPTS: u32 = 100;
/// Default messages in flight per trigger.
pub const DEFAULT_CONCURRENCY: u32 = 16;
/// Most messages in flight a trigger may ask for.
pub const MAX_CONCURRENCY: u32 = 1024;
/// Default delay before the second attempt.
pub const DEFAULT_RETRY_DELAY: Duration = Duration::from_secs(1);
/// Longest delay between attempts, however many failed.
pub const MAX_RETRY_DELAY: Duration = Duration::from_secs(300);
/// Shortest schedule interval.
pub const MIN_EVERY: Duration = Duration::from_secs(1);
/// Longest schedule interval: a year.
pub const MAX_EVERY: Duration = Duration::from_secs(366 * 24 * 60 * 60);
/// Longest group name.
pub const MAX_GROUP_NAME: usize = 64;

/// One `[[trigger.message]]` as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct MessageTriggerTable {
    topic: Option<String>,
    group: Option<String>,
    path: Option<String>,
    max_attempts: Option<i64>,
    concurrency: Option<i64>,
    retry_delay: Option<String>,
}

/// One `[[trigger.schedule]]` as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ScheduleTriggerTable {
    cron: Option<String>,
    every: Option<String>,
    path: Option<String>,
}

/// The `[trigger]` table as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct TriggerTable {
    #[serde(default)]
    message: Vec<MessageTriggerTable>,
    #[serde(default)]
    schedule: Vec<ScheduleTriggerTable>,
}

/// A service triggered by messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MessageTrigger {
    /// The topics.
    pub topic: TopicPattern,
    /// The consumer group; `None` until the service's name fills it in.
    pub group: Option<String>,
    /// Where each message is POSTed; `None`: through the messaging export.
    pub path: Option<String>,
    /// Deliveries before the message is dead-lettered.
    pub max_attempts: u32,
    /// Messages in flight at once.
    pub concurrency: u32,
    /// Delay before the second attempt, doubled after each failure.
    pub retry_delay: Duration,
}

impl MessageTrigger {
    /// The group, once resolved (the service name by default).
    pub fn group(&self) -> &str {
        self.group.as_deref().unwrap_or_default()
    }

    /// How long to wait before the attempt after `attempt` failed.
    pub fn backoff(&self, attempt: u32) -> Duration {
        let doublings = attempt.saturating_sub(1).min(20);
        self.retry_delay
            .saturating_mul(1 << doublings)
            .min(MAX_RETRY_DELAY)
    }
}

/// When a scheduled trigger fires.
#[derive(Debug, Clone)]
pub enum When {
    /// A cron expression with seconds (UTC).
    Cron(Box<cron::Schedule>),
    /// A fixed interval.
    Every(Duration),
}

impl PartialEq for When {
    fn eq(&self, other: &When) -> bool {
        match (self, other) {
            (When::Cron(a), When::Cron(b)) => a.source() == b.source(),
            (When::Every(a), When::Every(b)) => a == b,
            _ => false,
        }
    }
}

impl Eq for When {}

impl std::fmt::Display for When {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            When::Cron(schedule) => write!(f, "cron {:?}", schedule.source()),
            When::Every(every) => write!(f, "every {}", humantime::format_duration(*every)),
        }
    }
}

/// A service run on a clock.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScheduleTrigger {
    /// When it runs.
    pub when: When,
    /// Where each run is POSTed.
    pub path: String,
}

/// Everything that triggers a service besides HTTP requests.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Triggers {
    /// Message triggers, in manifest order.
    pub messages: Vec<MessageTrigger>,
    /// Schedules, in manifest order.
    pub schedules: Vec<ScheduleTrigger>,
}

impl Triggers {
    /// Whether nothing but HTTP starts the service.
    pub fn is_empty(&self) -> bool {
        self.messages.is_empty() && self.schedules.is_empty()
    }

    /// Fills in the default group (the service's name) and checks that no
    /// two triggers of the service share a group.
    pub fn resolve(&mut self, service: &str) -> Result<(), String> {
        let mut seen: Vec<String> = Vec::new();
        for (index, trigger) in self.messages.iter_mut().enumerate() {
            let group = trigger.group.get_or_insert_with(|| service.to_string());
            if seen.contains(group) {
                return Err(format!(
                    "trigger.message[{index}].group: {group:?} is already the group of another trigger of this service; give each trigger its own group"
                ));
            }
            seen.push(group.clone());
        }
        Ok(())
    }
}

/// Checks a consumer group's name: like a bucket's, usable as it is by
/// every broker.
pub fn validate_group(name: &str) -> Result<(), String> {
    let valid = !name.is_empty()
        && name.len() <= MAX_GROUP_NAME
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if valid {
        Ok(())
    } else {
        Err(format!(
            "{name:?} is not a valid group name: use 1-{MAX_GROUP_NAME} letters, digits, '-' or '_'"
        ))
    }
}

fn validate_path(key: &str, path: &str) -> Result<String, String> {
    if !path.starts_with('/') || path.contains('#') || path.contains(char::is_whitespace) {
        return Err(format!(
            "{key}: {path:?} must be a path starting with \"/\" (a query may follow), without fragment or spaces"
        ));
    }
    http::uri::PathAndQuery::try_from(path)
        .map_err(|err| format!("{key}: {path:?} is not a valid path: {err}"))?;
    Ok(path.to_string())
}

fn bounded(key: &str, value: Option<i64>, default: u32, max: u32) -> Result<u32, String> {
    match value {
        None => Ok(default),
        Some(n) => match u32::try_from(n) {
            Ok(n) if (1..=max).contains(&n) => Ok(n),
            _ => Err(format!("{key}: {n} is not a whole number from 1 to {max}")),
        },
    }
}

impl TriggerTable {
    /// Validates the triggers; `readable` is the service's
    /// `[messaging] subscribe` grant: every trigger's topic must be within
    /// it, so a service without one has no message triggers. Errors name the
    /// key.
    pub(crate) fn validate(self, readable: &[TopicPattern]) -> Result<Triggers, String> {
        let mut triggers = Triggers::default();
        for (index, table) in self.message.into_iter().enumerate() {
            let key = |name: &str| format!("trigger.message[{index}].{name}");
            let topic = table.topic.ok_or_else(|| {
                format!(
                    "{}: missing; say which topic triggers the service",
                    key("topic")
                )
            })?;
            let topic =
                TopicPattern::parse(&topic).map_err(|why| format!("{}: {why}", key("topic")))?;
            if !readable.iter().any(|grant| grant.covers(&topic)) {
                return Err(format!(
                    "{}: the service may not subscribe to {:?}: add it (or a pattern covering it) to subscribe under [messaging] in its manifest",
                    key("topic"),
                    topic.as_str()
                ));
            }
            let group = table
                .group
                .map(|group| validate_group(&group).map(|()| group))
                .transpose()
                .map_err(|why| format!("{}: {why}", key("group")))?;
            let path = table
                .path
                .map(|path| validate_path(&key("path"), &path))
                .transpose()?;
            let max_attempts = bounded(
                &key("max_attempts"),
                table.max_attempts,
                DEFAULT_MAX_ATTEMPTS,
                MAX_ATTEMPTS,
            )?;
            let concurrency = bounded(
                &key("concurrency"),
                table.concurrency,
                DEFAULT_CONCURRENCY,
                MAX_CONCURRENCY,
            )?;
            let retry_delay = match table.retry_delay {
                None => DEFAULT_RETRY_DELAY,
                Some(text) => {
                    parse_duration_within(&text, Duration::from_millis(1), MAX_RETRY_DELAY)
                        .map_err(|why| format!("{}: {why}", key("retry_delay")))?
                }
            };
            triggers.messages.push(MessageTrigger {
                topic,
                group,
                path,
                max_attempts,
                concurrency,
                retry_delay,
            });
        }
        for (index, table) in self.schedule.into_iter().enumerate() {
            let key = |name: &str| format!("trigger.schedule[{index}].{name}");
            let when = match (table.cron, table.every) {
                (Some(expression), None) => When::Cron(Box::new(
                    cron::Schedule::from_str(&expression).map_err(|err| {
                        format!(
                            "{}: {expression:?} is not a cron expression with seconds (\"sec min hour day month weekday\", like \"0 */5 * * * *\"): {err}",
                            key("cron")
                        )
                    })?,
                )),
                (None, Some(text)) => {
                    let every = parse_duration_within(&text, Duration::ZERO, MAX_EVERY)
                        .map_err(|why| format!("{}: {why}", key("every")))?;
                    if every < MIN_EVERY {
                        return Err(format!(
                            "{}: {text:?} is too often; the shortest interval is {}",
                            key("every"),
                            humantime::format_duration(MIN_EVERY)
                        ));
                    }
                    When::Every(every)
                }
                _ => {
                    return Err(format!(
                        "trigger.schedule[{index}]: give exactly one of cron = \"…\" or every = \"…\""
                    ));
                }
            };
            let path = table.path.ok_or_else(|| {
                format!(
                    "{}: missing; say which path each run is POSTed to",
                    key("path")
                )
            })?;
            let path = validate_path(&key("path"), &path)?;
            triggers.schedules.push(ScheduleTrigger { when, path });
        }
        Ok(triggers)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Triggers, String> {
        #[derive(Deserialize)]
        struct File {
            #[serde(default)]
            trigger: TriggerTable,
        }
        let file: File = toml::from_str(text).map_err(|e| e.to_string())?;
        file.trigger.validate(&[TopicPattern::parse(">").unwrap()])
    }

    #[test]
    fn full_triggers_and_defaults() {
        let mut triggers = parse(
            r#"
            [[trigger.message]]
            topic = "orders.*"
            [[trigger.message]]
            topic = "payments.done"
            group = "ledger"
            path = "/paid"
            max_attempts = 3
            concurrency = 4
            retry_delay = "250ms"
            [[trigger.schedule]]
            cron = "0 */5 * * * *"
            path = "/tick"
            [[trigger.schedule]]
            every = "30s"
            path = "/sweep"
            "#,
        )
        .unwrap();
        triggers.resolve("billing").unwrap();
        let first = &triggers.messages[0];
        assert_eq!(first.group(), "billing");
        assert_eq!(first.path, None);
        assert_eq!(first.max_attempts, DEFAULT_MAX_ATTEMPTS);
        let second = &triggers.messages[1];
        assert_eq!(
            (second.group(), second.path.as_deref()),
            ("ledger", Some("/paid"))
        );
        assert_eq!(second.backoff(1), Duration::from_millis(250));
        assert_eq!(second.backoff(3), Duration::from_secs(1));
        assert_eq!(second.backoff(60), MAX_RETRY_DELAY);
        assert_eq!(
            triggers.schedules[1].when,
            When::Every(Duration::from_secs(30))
        );
    }

    #[test]
    fn bad_triggers_name_the_key() {
        for (text, needle) in [
            (
                "[[trigger.message]]\ngroup = \"g\"",
                "trigger.message[0].topic: missing",
            ),
            (
                "[[trigger.message]]\ntopic = \"a..b\"",
                "trigger.message[0].topic:",
            ),
            (
                "[[trigger.message]]\ntopic = \"a\"\ngroup = \"a b\"",
                "trigger.message[0].group:",
            ),
            (
                "[[trigger.message]]\ntopic = \"a\"\npath = \"x\"",
                "trigger.message[0].path:",
            ),
            (
                "[[trigger.message]]\ntopic = \"a\"\nmax_attempts = 0",
                "trigger.message[0].max_attempts:",
            ),
            (
                "[[trigger.message]]\ntopic = \"a\"\nconcurrency = 5000",
                "trigger.message[0].concurrency:",
            ),
            (
                "[[trigger.message]]\ntopic = \"a\"\nretry_delay = \"soon\"",
                "trigger.message[0].retry_delay:",
            ),
            (
                "[[trigger.message]]\ntopic = \"a\"\nqueue = \"q\"",
                "unknown field `queue`",
            ),
            (
                "[[trigger.schedule]]\ncron = \"every minute\"\npath = \"/t\"",
                "trigger.schedule[0].cron:",
            ),
            (
                "[[trigger.schedule]]\nevery = \"10ms\"\npath = \"/t\"",
                "too often",
            ),
            ("[[trigger.schedule]]\npath = \"/t\"", "exactly one of cron"),
            (
                "[[trigger.schedule]]\nevery = \"300000000000y\"\npath = \"/t\"",
                "longest allowed",
            ),
            (
                "[[trigger.message]]\ntopic = \"a\"\nretry_delay = \"300000000000y\"",
                "longest allowed",
            ),
            (
                "[[trigger.schedule]]\nevery = \"1m\"",
                "trigger.schedule[0].path: missing",
            ),
        ] {
            let err = parse(text).unwrap_err();
            assert!(err.contains(needle), "{text:?}: {err}");
        }
        let mut two =
            parse("[[trigger.message]]\ntopic = \"a\"\n[[trigger.message]]\ntopic = \"b\"")
                .unwrap();
        assert!(
            two.resolve("svc")
                .unwrap_err()
                .contains("trigger.message[1].group")
        );
    }

    #[test]
    fn triggers_must_be_within_the_subscribe_list() {
        let readable = [TopicPattern::parse("orders.*").unwrap()];
        let table = |topic: &str| TriggerTable {
            message: vec![MessageTriggerTable {
                topic: Some(topic.into()),
                ..Default::default()
            }],
            schedule: Vec::new(),
        };
        assert!(table("orders.created").validate(&readable).is_ok());
        assert!(table("orders.*").validate(&readable).is_ok());
        let err = table("orders.>").validate(&readable).unwrap_err();
        assert!(err.contains("may not subscribe"), "{err}");
        assert!(table("payments.done").validate(&readable).is_err());
    }

    #[test]
    fn regression_subscriptions_need_a_grant() {
        let table = TriggerTable {
            message: vec![MessageTriggerTable {
                topic: Some(">".into()),
                ..Default::default()
            }],
            schedule: Vec::new(),
        };
        let err = table.validate(&[]).unwrap_err();
        assert!(
            err.contains("trigger.message[0].topic") && err.contains("\">\""),
            "{err}"
        );
    }
}
