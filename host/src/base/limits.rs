//! Resource limits of a service (time, memory, concurrency, request body) and
//! the parsing of their human-readable forms (`"30s"`, `"128MiB"`).

use std::time::Duration;

use bytesize::ByteSize;

/// Default wall-clock time a request may run: 30 seconds.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);
/// Default linear-memory cap of one instance: 128 MiB.
pub const DEFAULT_MEMORY: u64 = 128 << 20;
/// Default number of requests one service may run at once.
pub const DEFAULT_CONCURRENCY: u32 = 64;
/// Default largest request body a service accepts: 16 MiB.
pub const DEFAULT_BODY: u64 = 16 << 20;
/// Default CPU time a request may use: 5 seconds, far below the wall-clock
/// timeout, so a busy loop is stopped long before its deadline on an idle
/// host.
pub const DEFAULT_CPU: Duration = Duration::from_secs(5);

/// Default longest key-value key: 1 KiB.
pub const DEFAULT_KV_KEY_SIZE: u64 = 1 << 10;
/// Default largest key-value value: 1 MiB.
pub const DEFAULT_KV_VALUE_SIZE: u64 = 1 << 20;
/// Default most bytes one key-value bucket may hold: 100 MiB.
pub const DEFAULT_KV_BUCKET_QUOTA: u64 = 100 << 20;
/// Default most distinct buckets one service may open (per deployment).
pub const DEFAULT_KV_MAX_BUCKETS: u32 = 64;

/// The largest memory cap a service may ask for. Every pooled memory slot
/// reserves address space for this much, so it is a host-wide ceiling.
pub const MAX_MEMORY: u64 = 4 << 30;

/// Limits applied to every request of one service.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Wall-clock time a request may run, CPU time included; past it the
    /// guest is interrupted and the client gets 504.
    pub timeout: Duration,
    /// Largest linear memory an instance may grow to, in bytes.
    pub memory: u64,
    /// Requests of this service that may run at once; more wait briefly, then
    /// get 503.
    pub concurrency: u32,
    /// Largest request body accepted, in bytes; larger ones get 413.
    pub body: u64,
    /// CPU time a request may use; past it the guest is stopped and the
    /// client gets 504.
    pub cpu: Duration,
    /// Longest key-value key, in bytes.
    pub kv_key_size: u64,
    /// Largest key-value value, in bytes.
    pub kv_value_size: u64,
    /// Most bytes a bucket may hold (keys, values and a fixed overhead per
    /// entry), whoever writes to it: the host's, never a manifest's (see
    /// also `[keyvalue] quotas` in `wharf.toml` for single buckets).
    pub kv_bucket_quota: u64,
    /// Most distinct buckets one service may open: the host's, never a
    /// manifest's.
    pub kv_max_buckets: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            timeout: DEFAULT_TIMEOUT,
            memory: DEFAULT_MEMORY,
            concurrency: DEFAULT_CONCURRENCY,
            body: DEFAULT_BODY,
            cpu: DEFAULT_CPU,
            kv_key_size: DEFAULT_KV_KEY_SIZE,
            kv_value_size: DEFAULT_KV_VALUE_SIZE,
            kv_bucket_quota: DEFAULT_KV_BUCKET_QUOTA,
            kv_max_buckets: DEFAULT_KV_MAX_BUCKETS,
        }
    }
}

/// Limits of which only some are set: a layer (a manifest's `[limits]`, the
/// host's `wharf.toml`, command-line flags) applied over defaults.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PartialLimits {
    /// See [`Limits::timeout`].
    pub timeout: Option<Duration>,
    /// See [`Limits::memory`].
    pub memory: Option<u64>,
    /// See [`Limits::concurrency`].
    pub concurrency: Option<u32>,
    /// See [`Limits::body`].
    pub body: Option<u64>,
    /// See [`Limits::cpu`].
    pub cpu: Option<Duration>,
    /// See [`Limits::kv_key_size`].
    pub kv_key_size: Option<u64>,
    /// See [`Limits::kv_value_size`].
    pub kv_value_size: Option<u64>,
    /// See [`Limits::kv_bucket_quota`].
    pub kv_bucket_quota: Option<u64>,
    /// See [`Limits::kv_max_buckets`].
    pub kv_max_buckets: Option<u32>,
}

impl PartialLimits {
    /// `base` with every limit set here replaced.
    pub fn apply(&self, base: Limits) -> Limits {
        Limits {
            timeout: self.timeout.unwrap_or(base.timeout),
            memory: self.memory.unwrap_or(base.memory),
            concurrency: self.concurrency.unwrap_or(base.concurrency),
            body: self.body.unwrap_or(base.body),
            cpu: self.cpu.unwrap_or(base.cpu),
            kv_key_size: self.kv_key_size.unwrap_or(base.kv_key_size),
            kv_value_size: self.kv_value_size.unwrap_or(base.kv_value_size),
            kv_bucket_quota: self.kv_bucket_quota.unwrap_or(base.kv_bucket_quota),
            kv_max_buckets: self.kv_max_buckets.unwrap_or(base.kv_max_buckets),
        }
    }
}

/// The `[limits]` table of a manifest or of `wharf.toml`, as written.
#[derive(Debug, Clone, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsTable {
    timeout: Option<String>,
    memory: Option<String>,
    concurrency: Option<i64>,
    body: Option<String>,
    cpu: Option<String>,
    kv_key_size: Option<String>,
    kv_value_size: Option<String>,
    kv_bucket_quota: Option<String>,
    kv_max_buckets: Option<i64>,
}

impl LimitsTable {
    /// Validates every value; an error names the key (`limits.timeout`) and
    /// what was expected.
    pub fn validate(&self) -> Result<PartialLimits, String> {
        fn key<T>(name: &str, value: Result<T, String>) -> Result<T, String> {
            value.map_err(|why| format!("limits.{name}: {why}"))
        }
        Ok(PartialLimits {
            timeout: self
                .timeout
                .as_deref()
                .map(|t| key("timeout", parse_duration(t)))
                .transpose()?,
            memory: self
                .memory
                .as_deref()
                .map(|m| key("memory", parse_memory(m)))
                .transpose()?,
            concurrency: self
                .concurrency
                .map(|c| key("concurrency", parse_concurrency(&c.to_string())))
                .transpose()?,
            body: self
                .body
                .as_deref()
                .map(|b| key("body", parse_size(b)))
                .transpose()?,
            cpu: self
                .cpu
                .as_deref()
                .map(|c| key("cpu", parse_duration(c)))
                .transpose()?,
            kv_key_size: self
                .kv_key_size
                .as_deref()
                .map(|s| key("kv_key_size", parse_size(s)))
                .transpose()?,
            kv_value_size: self
                .kv_value_size
                .as_deref()
                .map(|s| key("kv_value_size", parse_size(s)))
                .transpose()?,
            kv_bucket_quota: self
                .kv_bucket_quota
                .as_deref()
                .map(|s| key("kv_bucket_quota", parse_size(s)))
                .transpose()?,
            kv_max_buckets: self
                .kv_max_buckets
                .map(|n| {
                    key(
                        "kv_max_buckets",
                        u32::try_from(n)
                            .ok()
                            .filter(|n| (1..=100_000).contains(n))
                            .ok_or_else(|| format!("{n} is not a whole number from 1 to 100000")),
                    )
                })
                .transpose()?,
        })
    }
}

/// The longest duration any setting takes (a time limit, a drain, a client
/// timeout): one day. Every duration Wharf reads is bounded when parsed, so
/// no deadline computed from one can overflow.
pub const MAX_DURATION: Duration = Duration::from_secs(24 * 60 * 60);

/// Parses a duration such as `30s`, `250ms` or `2m`: above zero and at most
/// [`MAX_DURATION`].
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    parse_duration_within(text, Duration::from_nanos(1), MAX_DURATION)
}

/// Parses a duration such as `30s`, `250ms` or `2m`, from `min` to `max`
/// inclusive: the one parser of every duration that comes from outside
/// (settings, manifests, a guest's query), so none is unbounded.
pub fn parse_duration_within(text: &str, min: Duration, max: Duration) -> Result<Duration, String> {
    let duration = humantime::parse_duration(text.trim())
        .map_err(|err| format!("{text:?} is not a duration like \"30s\" or \"500ms\": {err}"))?;
    if duration.is_zero() && !min.is_zero() {
        return Err(format!("{text:?} must be longer than zero"));
    }
    if duration < min {
        return Err(format!(
            "{text:?} is shorter than the shortest allowed, {}",
            humantime::format_duration(min)
        ));
    }
    if duration > max {
        return Err(format!(
            "{text:?} is longer than the longest allowed, {}",
            humantime::format_duration(max)
        ));
    }
    Ok(duration)
}

/// The instant `after` past `from`, or [`MAX_DURATION`] past it if that
/// would overflow: deadlines never panic, whatever duration reaches them.
pub fn deadline_after(from: std::time::Instant, after: Duration) -> std::time::Instant {
    from.checked_add(after)
        .or_else(|| from.checked_add(MAX_DURATION))
        .unwrap_or(from)
}

/// Parses a size such as `128MiB`, `16 MiB`, `1GiB` or a plain byte count.
/// Must be above zero.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let size: ByteSize = text
        .trim()
        .parse()
        .map_err(|err| format!("{text:?} is not a size like \"128MiB\": {err}"))?;
    if size.as_u64() == 0 {
        return Err(format!("{text:?} must be larger than zero"));
    }
    Ok(size.as_u64())
}

/// Formats a byte count the way limits are written, e.g. `128 MiB`.
pub fn format_size(bytes: u64) -> String {
    ByteSize(bytes).display().iec().to_string()
}

/// Parses a memory cap and checks it against [`MAX_MEMORY`].
pub fn parse_memory(text: &str) -> Result<u64, String> {
    let bytes = parse_size(text)?;
    if bytes > MAX_MEMORY {
        return Err(format!(
            "{text:?} is above the largest memory cap, {}",
            format_size(MAX_MEMORY)
        ));
    }
    Ok(bytes)
}

/// Parses a concurrency limit: a whole number from 1 to 100000.
pub fn parse_concurrency(text: &str) -> Result<u32, String> {
    match text.trim().parse::<u32>() {
        Ok(n) if (1..=100_000).contains(&n) => Ok(n),
        _ => Err(format!("{text:?} is not a whole number from 1 to 100000")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("30s").unwrap(), Duration::from_secs(30));
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration(" 2m ").unwrap(), Duration::from_secs(120));
        assert!(
            parse_duration("0s")
                .unwrap_err()
                .contains("longer than zero")
        );
        assert!(parse_duration("soon").is_err());
        assert!(parse_duration("30").is_err());
    }

    #[test]
    fn regression_overflowing_durations_are_refused_when_parsed() {
        for text in ["300000000000y", "25h", "2days"] {
            let err = parse_duration(text).unwrap_err();
            assert!(err.contains("longest allowed"), "{text}: {err}");
        }
        assert_eq!(parse_duration("24h").unwrap(), MAX_DURATION);
        let now = std::time::Instant::now();
        assert!(deadline_after(now, Duration::MAX) > now);
        assert!(
            parse_duration_within("1s", Duration::from_secs(2), MAX_DURATION)
                .unwrap_err()
                .contains("shortest")
        );
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("128MiB").unwrap(), 128 << 20);
        assert_eq!(parse_size("16 MiB").unwrap(), 16 << 20);
        assert_eq!(parse_size("1GiB").unwrap(), 1 << 30);
        assert_eq!(parse_size("1000").unwrap(), 1000);
        assert_eq!(parse_size("1MB").unwrap(), 1_000_000);
        assert!(parse_size("0").is_err());
        assert!(parse_size("lots").is_err());
        assert!(parse_size("-1MiB").is_err());
    }

    #[test]
    fn memory_is_capped() {
        assert_eq!(parse_memory("4GiB").unwrap(), MAX_MEMORY);
        assert!(
            parse_memory("5GiB")
                .unwrap_err()
                .contains("largest memory cap")
        );
    }

    #[test]
    fn concurrency_range() {
        assert_eq!(parse_concurrency("64").unwrap(), 64);
        assert!(parse_concurrency("0").is_err());
        assert!(parse_concurrency("many").is_err());
    }

    #[test]
    fn partial_limits_layer_over_defaults() {
        let layer = PartialLimits {
            timeout: Some(Duration::from_secs(5)),
            body: Some(1024),
            ..PartialLimits::default()
        };
        let limits = layer.apply(Limits::default());
        assert_eq!(limits.timeout, Duration::from_secs(5));
        assert_eq!(limits.body, 1024);
        assert_eq!(limits.memory, DEFAULT_MEMORY);
        assert_eq!(limits.concurrency, DEFAULT_CONCURRENCY);
    }

    #[test]
    fn limits_tables_name_the_bad_key() {
        let table: LimitsTable = toml::from_str("timeout = \"soon\"").unwrap();
        assert!(table.validate().unwrap_err().starts_with("limits.timeout:"));
        let table: LimitsTable = toml::from_str("concurrency = 0").unwrap();
        assert!(
            table
                .validate()
                .unwrap_err()
                .starts_with("limits.concurrency:")
        );
        let table: LimitsTable = toml::from_str("memory = \"64MiB\"\nbody = \"1KiB\"").unwrap();
        let partial = table.validate().unwrap();
        assert_eq!((partial.memory, partial.body), (Some(64 << 20), Some(1024)));
        assert!(toml::from_str::<LimitsTable>("cpu = 1").is_err());
    }

    #[test]
    fn size_formatting() {
        assert_eq!(format_size(128 << 20), "128.0 MiB");
    }
}
