//! What bounds a broker's queues and each publisher, whichever broker it
//! is, and the layers they are set in (`wharf.toml`'s `[messaging]`, flags).

/// What bounds a broker's queues, in messages and in bytes, and what
/// one service may publish: every bound refuses with [`BrokerError::Full`](crate::capabilities::messaging::broker::BrokerError::Full)
/// (or, for a publisher's quota, [`BrokerError::Quota`](crate::capabilities::messaging::broker::BrokerError::Quota)) instead of letting a
/// flood fill memory or disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MessagingLimits {
    /// Deliveries (embedded; messages on NATS; per group on RabbitMQ)
    /// waiting at once.
    pub max_pending: u64,
    /// Bytes the broker holds in all: waiting messages and dead letters
    /// (embedded: everything; NATS: each of its two streams).
    pub max_bytes: u64,
    /// Bytes waiting for one group (embedded and RabbitMQ; NATS bounds its
    /// stream only).
    pub max_group_bytes: u64,
    /// Dead letters kept per group; past it the oldest are dropped.
    pub max_dead_letters: u64,
    /// Dead-letter bytes kept per group (embedded and RabbitMQ); past it
    /// the oldest are dropped.
    pub max_dead_bytes: u64,
    /// Messages one service may publish per second, in bursts of up to a
    /// second's worth; `None`: no limit.
    pub publish_rate: Option<u64>,
    /// Message bytes one service may publish per second, in bursts of up
    /// to a second's worth; `None`: no limit.
    pub publish_bytes: Option<u64>,
}

/// Messaging bounds of which only some are set: a layer (`[messaging]` in
/// `wharf.toml`, command-line flags) applied over defaults.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PartialMessagingLimits {
    /// See [`MessagingLimits::max_pending`].
    pub max_pending: Option<u64>,
    /// See [`MessagingLimits::max_bytes`].
    pub max_bytes: Option<u64>,
    /// See [`MessagingLimits::max_group_bytes`].
    pub max_group_bytes: Option<u64>,
    /// See [`MessagingLimits::max_dead_letters`].
    pub max_dead_letters: Option<u64>,
    /// See [`MessagingLimits::max_dead_bytes`].
    pub max_dead_bytes: Option<u64>,
    /// See [`MessagingLimits::publish_rate`] (`Some(None)`: no limit).
    pub publish_rate: Option<Option<u64>>,
    /// See [`MessagingLimits::publish_bytes`] (`Some(None)`: no limit).
    pub publish_bytes: Option<Option<u64>>,
}

impl PartialMessagingLimits {
    /// `base` with every bound set here replaced.
    pub fn apply(&self, base: MessagingLimits) -> MessagingLimits {
        MessagingLimits {
            max_pending: self.max_pending.unwrap_or(base.max_pending),
            max_bytes: self.max_bytes.unwrap_or(base.max_bytes),
            max_group_bytes: self.max_group_bytes.unwrap_or(base.max_group_bytes),
            max_dead_letters: self.max_dead_letters.unwrap_or(base.max_dead_letters),
            max_dead_bytes: self.max_dead_bytes.unwrap_or(base.max_dead_bytes),
            publish_rate: self.publish_rate.unwrap_or(base.publish_rate),
            publish_bytes: self.publish_bytes.unwrap_or(base.publish_bytes),
        }
    }
}

/// Default most deliveries waiting.
pub const DEFAULT_MAX_PENDING: u64 = 1_000_000;
/// Default most bytes a broker holds: 1 GiB.
pub const DEFAULT_MAX_BYTES: u64 = 1 << 30;
/// Default most bytes waiting for one group: 256 MiB.
pub const DEFAULT_MAX_GROUP_BYTES: u64 = 256 << 20;
/// Default dead letters kept per group.
pub const DEFAULT_MAX_DEAD_LETTERS: u64 = 10_000;
/// Default dead-letter bytes kept per group: 64 MiB.
pub const DEFAULT_MAX_DEAD_BYTES: u64 = 64 << 20;
/// Default message bytes one service may publish per second: 64 MiB.
pub const DEFAULT_PUBLISH_BYTES: u64 = 64 << 20;

impl Default for MessagingLimits {
    fn default() -> Self {
        MessagingLimits {
            max_pending: DEFAULT_MAX_PENDING,
            max_bytes: DEFAULT_MAX_BYTES,
            max_group_bytes: DEFAULT_MAX_GROUP_BYTES,
            max_dead_letters: DEFAULT_MAX_DEAD_LETTERS,
            max_dead_bytes: DEFAULT_MAX_DEAD_BYTES,
            publish_rate: None,
            publish_bytes: Some(DEFAULT_PUBLISH_BYTES),
        }
    }
}
