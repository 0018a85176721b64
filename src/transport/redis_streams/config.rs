//! Settings of the Redis Streams transport.

use std::collections::BTreeMap;
use std::time::Duration;

use super::GroupStart;
use super::trim::TrimPolicy;
use crate::error::{Error, ErrorKind};

/// Settings of a [`RedisStreamsTransport`](super::RedisStreamsTransport).
///
/// ```
/// use std::time::Duration;
/// use switchboard::transport::redis_streams::{GroupStart, RedisStreamsConfig};
///
/// let config = RedisStreamsConfig::default()
///     .with_claim_idle(Duration::from_secs(60))
///     .with_group_start(GroupStart::End)
///     .with_consumer_name("game-7f9c");
/// assert_eq!(config.claim_idle, Duration::from_secs(60));
/// assert_eq!(config.max_len, None, "no trimming unless asked for");
/// ```
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RedisStreamsConfig {
    /// How long an entry must have been idle in another consumer's pending
    /// list before a live consumer takes it over (default 30 s). A consumer
    /// renews the entries it holds every [`lease_every`](Self::lease_every),
    /// so this bounds how long a *dead* consumer's entries wait, not how long
    /// a handler may take.
    pub claim_idle: Duration,
    /// How often a subscription renews the lease on every entry it holds
    /// (default a third of `claim_idle`): buffered, in a handler, or waiting
    /// out a nack's delay. A renewal claims only entries still pending for
    /// this consumer, in one script call per batch.
    pub lease_every: Option<Duration>,
    /// How often a subscription samples its group's lag (`XINFO GROUPS`)
    /// into the `switchboard_consumer_lag` gauge (default 5 s).
    pub lag_every: Duration,
    /// How often a subscription looks for idle entries to take over
    /// (default a quarter of `claim_idle`).
    pub claim_every: Option<Duration>,
    /// The `BLOCK` time of a read (default 5 s). A stopping subscription
    /// interrupts it with `CLIENT UNBLOCK` (not on a cluster, where stopping
    /// may wait this long).
    pub block: Duration,
    /// The most entries one read asks for (default 128); fewer when the
    /// subscription's prefetch has less room.
    pub batch: usize,
    /// How often this transport's mover looks for scheduled messages that
    /// are due ([`publish_at`](crate::Publisher::publish_at)) and moves them
    /// into their streams (default 100 ms): the most a scheduled message is
    /// late, besides the round trip.
    pub schedule_tick: Duration,
    /// The most scheduled messages one mover script moves per topic
    /// (default 100, its `LIMIT`); a full batch is followed at once by the
    /// next, so the cost of one call stays bounded while a backlog drains.
    pub schedule_batch: usize,
    /// `MAXLEN ~ n` on every `XADD` (default `None`: no trimming). Trimming
    /// can drop entries no group has acknowledged yet. The same as
    /// [`TrimPolicy::MaxLen`] for every topic; not together with a
    /// [`trim`](Self::trim) policy.
    pub max_len: Option<usize>,
    /// How every topic's stream is trimmed unless
    /// [`topic_trim`](Self::topic_trim) names it (default
    /// [`TrimPolicy::None`]).
    pub trim: TrimPolicy,
    /// Trim policies of single topics, over [`trim`](Self::trim): for
    /// example [`TrimPolicy::MaxAge`] for a stream replicas follow without
    /// a group, next to [`TrimPolicy::KeepNeeded`] for the rest.
    pub topic_trim: BTreeMap<String, TrimPolicy>,
    /// The most entries a dead-letter stream keeps (default `None`:
    /// unbounded). At the bound, each new dead letter evicts the oldest
    /// (`XADD MAXLEN =`), with a warning and the
    /// `switchboard_dead_letters_evicted_total` counter: the evicted
    /// letter is gone for good, so alert on it.
    pub dlq_max_len: Option<usize>,
    /// Where a group this transport creates starts (default
    /// [`GroupStart::Beginning`]).
    pub group_start: GroupStart,
    /// This process's consumer name in every group (default a random UUID).
    /// Subscriptions get `<name>-<n>`, `n` counting the subscriptions to one
    /// topic and group. A name that stays the same across restarts (a pod
    /// name) lets a restarted subscriber re-read its own pending entries at
    /// once instead of waiting for `claim_idle`. Consumers are never
    /// deleted from their group (`XGROUP DELCONSUMER` would drop what they
    /// still hold), so with random names old ones pile up in
    /// `XINFO CONSUMERS` until an operator removes them.
    pub consumer_name: String,
    /// Put before every topic to form the stream key (default empty).
    pub key_prefix: String,
    /// Wrap stream keys in a hash tag (`{topic}` and `{topic}.dlq`) so a
    /// stream and its dead letters share a cluster slot. `None` (default):
    /// on for cluster connections, off otherwise.
    pub hash_tag: Option<bool>,
    /// How long the shared command connection waits for a reply (default
    /// 5 s; redis-rs's own default is 500 ms).
    pub response_timeout: Duration,
    /// How long `connect` may take, all attempts included (default 5 s): a
    /// Redis that is down or unreachable fails `connect` within it with a
    /// retryable [`ErrorKind::Connection`]. It also bounds each later
    /// connection attempt (a reconnect, a subscription's reading
    /// connection).
    pub connect_timeout: Duration,
    /// The CA (PEM) trusted for a `rediss://` URL instead of the system's
    /// roots (default `None`); needs the `redis-tls` feature, on the
    /// crate's one crypto provider (aws-lc-rs). A certificate it does not
    /// vouch for fails `connect` with [`ErrorKind::Rejected`], not retried.
    pub tls_ca_pem: Option<String>,
}

impl Default for RedisStreamsConfig {
    fn default() -> Self {
        Self {
            claim_idle: Duration::from_secs(30),
            lease_every: None,
            lag_every: Duration::from_secs(5),
            claim_every: None,
            block: Duration::from_secs(5),
            batch: 128,
            schedule_tick: Duration::from_millis(100),
            schedule_batch: 100,
            max_len: None,
            trim: TrimPolicy::None,
            topic_trim: BTreeMap::new(),
            dlq_max_len: None,
            group_start: GroupStart::Beginning,
            consumer_name: uuid::Uuid::new_v4().simple().to_string(),
            key_prefix: String::new(),
            hash_tag: None,
            response_timeout: Duration::from_secs(5),
            connect_timeout: crate::transport::redis_support::DEFAULT_CONNECT_TIMEOUT,
            tls_ca_pem: None,
        }
    }
}

impl RedisStreamsConfig {
    /// Sets [`claim_idle`](Self::claim_idle).
    pub fn with_claim_idle(mut self, idle: Duration) -> Self {
        self.claim_idle = idle;
        self
    }

    /// Sets [`lease_every`](Self::lease_every).
    pub fn with_lease_every(mut self, every: Duration) -> Self {
        self.lease_every = Some(every);
        self
    }

    /// Sets [`lag_every`](Self::lag_every).
    pub fn with_lag_every(mut self, every: Duration) -> Self {
        self.lag_every = every;
        self
    }

    /// Sets [`claim_every`](Self::claim_every).
    pub fn with_claim_every(mut self, every: Duration) -> Self {
        self.claim_every = Some(every);
        self
    }

    /// Sets [`schedule_tick`](Self::schedule_tick).
    pub fn with_schedule_tick(mut self, tick: Duration) -> Self {
        self.schedule_tick = tick;
        self
    }

    /// Sets [`schedule_batch`](Self::schedule_batch).
    pub fn with_schedule_batch(mut self, batch: usize) -> Self {
        self.schedule_batch = batch;
        self
    }

    /// Sets [`block`](Self::block).
    pub fn with_block(mut self, block: Duration) -> Self {
        self.block = block;
        self
    }

    /// Sets [`batch`](Self::batch).
    pub fn with_batch(mut self, batch: usize) -> Self {
        self.batch = batch;
        self
    }

    /// Sets [`max_len`](Self::max_len): approximate trimming, which can drop
    /// unacknowledged entries.
    pub fn with_max_len(mut self, max_len: usize) -> Self {
        self.max_len = Some(max_len);
        self
    }

    /// Sets [`trim`](Self::trim), the policy of every topic not set with
    /// [`with_topic_trim`](Self::with_topic_trim).
    ///
    /// ```
    /// use std::time::Duration;
    /// use switchboard::transport::redis_streams::{KeepNeeded, RedisStreamsConfig, TrimPolicy};
    ///
    /// let config = RedisStreamsConfig::default()
    ///     .with_trim(TrimPolicy::KeepNeeded(KeepNeeded::every(Duration::from_secs(60))));
    /// assert_eq!(
    ///     config.trim_policy("any.topic"),
    ///     &TrimPolicy::KeepNeeded(KeepNeeded::every(Duration::from_secs(60))),
    /// );
    /// ```
    pub fn with_trim(mut self, policy: TrimPolicy) -> Self {
        self.trim = policy;
        self
    }

    /// Sets the trim policy of one topic (in [`topic_trim`](Self::topic_trim)).
    ///
    /// ```
    /// use switchboard::transport::redis_streams::{RedisStreamsConfig, TrimPolicy};
    ///
    /// let config = RedisStreamsConfig::default().with_topic_trim("announcements", TrimPolicy::MaxLen(1000));
    /// assert_eq!(config.trim_policy("announcements"), &TrimPolicy::MaxLen(1000));
    /// assert_eq!(config.trim_policy("trade.executed"), &TrimPolicy::None);
    /// ```
    pub fn with_topic_trim(mut self, topic: impl Into<String>, policy: TrimPolicy) -> Self {
        self.topic_trim.insert(topic.into(), policy);
        self
    }

    /// Sets [`dlq_max_len`](Self::dlq_max_len).
    ///
    /// ```
    /// use switchboard::transport::redis_streams::RedisStreamsConfig;
    ///
    /// let config = RedisStreamsConfig::default().with_dlq_max_len(10_000);
    /// assert_eq!(config.dlq_max_len, Some(10_000));
    /// ```
    pub fn with_dlq_max_len(mut self, max_len: usize) -> Self {
        self.dlq_max_len = Some(max_len);
        self
    }

    /// The trim policy of `topic`: its own, or [`trim`](Self::trim).
    pub fn trim_policy(&self, topic: &str) -> &TrimPolicy {
        self.topic_trim.get(topic).unwrap_or(&self.trim)
    }

    /// `MAXLEN ~ n` for an `XADD` to `topic`, if any.
    pub(super) fn xadd_max_len(&self, topic: &str) -> Option<usize> {
        match self.trim_policy(topic) {
            TrimPolicy::MaxLen(n) => Some(*n),
            _ => self.max_len,
        }
    }

    /// Sets [`group_start`](Self::group_start).
    pub fn with_group_start(mut self, start: GroupStart) -> Self {
        self.group_start = start;
        self
    }

    /// Sets [`consumer_name`](Self::consumer_name).
    pub fn with_consumer_name(mut self, name: impl Into<String>) -> Self {
        self.consumer_name = name.into();
        self
    }

    /// Sets [`key_prefix`](Self::key_prefix).
    pub fn with_key_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.key_prefix = prefix.into();
        self
    }

    /// Sets [`hash_tag`](Self::hash_tag).
    pub fn with_hash_tag(mut self, yes: bool) -> Self {
        self.hash_tag = Some(yes);
        self
    }

    /// Sets [`response_timeout`](Self::response_timeout).
    pub fn with_response_timeout(mut self, timeout: Duration) -> Self {
        self.response_timeout = timeout;
        self
    }

    /// Sets [`connect_timeout`](Self::connect_timeout).
    ///
    /// ```
    /// use std::time::Duration;
    /// use switchboard::transport::redis_streams::RedisStreamsConfig;
    ///
    /// let config = RedisStreamsConfig::default().with_connect_timeout(Duration::from_secs(1));
    /// assert_eq!(config.connect_timeout, Duration::from_secs(1));
    /// ```
    pub fn with_connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// Sets [`tls_ca_pem`](Self::tls_ca_pem).
    ///
    /// ```
    /// use switchboard::transport::redis_streams::RedisStreamsConfig;
    ///
    /// let config = RedisStreamsConfig::default().with_tls_ca_pem("-----BEGIN CERTIFICATE-----");
    /// assert!(config.tls_ca_pem.is_some());
    /// ```
    pub fn with_tls_ca_pem(mut self, pem: impl Into<String>) -> Self {
        self.tls_ca_pem = Some(pem.into());
        self
    }

    pub(super) fn lease_interval(&self) -> Duration {
        self.lease_every
            .unwrap_or(self.claim_idle / 3)
            .max(Duration::from_millis(10))
    }

    pub(super) fn claim_interval(&self) -> Duration {
        self.claim_every
            .unwrap_or(self.claim_idle / 4)
            .max(Duration::from_millis(10))
    }

    pub(super) fn validate(&self) -> Result<(), Error> {
        let invalid = |what: &str| Err(Error::new(ErrorKind::Config, what.to_owned()));
        if self.batch == 0 {
            return invalid("redis-streams: `batch` must be at least 1");
        }
        if self.block.is_zero() {
            return invalid("redis-streams: `block` must be above zero (BLOCK 0 waits forever)");
        }
        if self.claim_idle.is_zero() {
            return invalid("redis-streams: `claim_idle` must be above zero");
        }
        if self
            .lease_every
            .is_some_and(|every| every >= self.claim_idle)
        {
            return invalid(
                "redis-streams: `lease_every` must be shorter than `claim_idle`, \
                 or other members take over entries this consumer still holds",
            );
        }
        crate::transport::redis_support::validate_connect_timeout(
            "redis-streams",
            self.connect_timeout,
        )?;
        if self.schedule_tick.is_zero() || self.schedule_batch == 0 {
            return invalid(
                "redis-streams: `schedule_tick` and `schedule_batch` must be above zero",
            );
        }
        if self.lag_every.is_zero() {
            return invalid("redis-streams: `lag_every` must be above zero");
        }
        if self.consumer_name.is_empty() {
            return invalid("redis-streams: `consumer_name` must not be empty");
        }
        let policies = || std::iter::once(&self.trim).chain(self.topic_trim.values());
        for policy in policies() {
            policy.validate()?;
        }
        if self.max_len.is_some() && policies().any(|policy| *policy != TrimPolicy::None) {
            return invalid(
                "redis-streams: `max_len` and a trim policy together; \
                 use `TrimPolicy::MaxLen` instead of `max_len`",
            );
        }
        if self.dlq_max_len == Some(0) {
            return invalid("redis-streams: `dlq_max_len` must be at least 1");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_refuses_impossible_values() {
        assert!(RedisStreamsConfig::default().validate().is_ok());
        let refused = [
            RedisStreamsConfig::default().with_batch(0),
            RedisStreamsConfig::default().with_block(Duration::ZERO),
            RedisStreamsConfig::default().with_claim_idle(Duration::ZERO),
            RedisStreamsConfig::default().with_lease_every(Duration::from_secs(30)),
            RedisStreamsConfig::default().with_lag_every(Duration::ZERO),
            RedisStreamsConfig::default().with_consumer_name(""),
            RedisStreamsConfig::default().with_dlq_max_len(0),
            RedisStreamsConfig::default().with_topic_trim("t", TrimPolicy::MaxLen(0)),
            RedisStreamsConfig::default()
                .with_max_len(10)
                .with_topic_trim("t", TrimPolicy::max_age(Duration::from_secs(60))),
        ];
        for config in refused {
            let error = config.validate().expect_err("refused");
            assert_eq!(error.kind(), ErrorKind::Config, "{error}");
        }
    }

    #[test]
    fn leases_are_renewed_three_times_per_claim_idle() {
        let config = RedisStreamsConfig::default().with_claim_idle(Duration::from_secs(9));
        assert_eq!(config.lease_interval(), Duration::from_secs(3));
    }
}
