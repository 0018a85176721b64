//! Settings of the Redis Pub/Sub transport and what a subscription listens
//! to.

use std::time::Duration;

use super::frame::FrameVersion;
use crate::error::{Error, ErrorKind};
use crate::transport::validate_name;

/// Which message a subscription drops when its inbox is full (see
/// [Back-pressure](super#back-pressure)).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum DropPolicy {
    /// Drop the oldest message waiting in the inbox to make room for the one
    /// that just arrived: consumers see the latest state (the default).
    #[default]
    DropOldest,
    /// Drop the message that just arrived: consumers see what arrived first.
    DropNewest,
}

/// Settings of a [`RedisPubSubTransport`](super::RedisPubSubTransport).
///
/// ```
/// use std::time::Duration;
/// use switchboard::transport::redis_pubsub::{DropPolicy, RedisPubSubOptions};
///
/// let options = RedisPubSubOptions::default()
///     .with_response_timeout(Duration::from_secs(2))
///     .with_client_name_prefix("market-prices")
///     .with_inbox_capacity(256)
///     .with_drop_policy(DropPolicy::DropNewest);
/// assert_eq!(options.response_timeout(), Duration::from_secs(2));
/// assert_eq!(options.inbox_capacity(), 256);
/// assert_eq!(options.drop_policy(), DropPolicy::DropNewest);
/// ```
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RedisPubSubOptions {
    pub(super) response_timeout: Duration,
    pub(super) connection_timeout: Duration,
    pub(super) reconnect_min_delay: Duration,
    pub(super) reconnect_max_delay: Duration,
    pub(super) client_name_prefix: String,
    pub(super) inbox_capacity: usize,
    pub(super) drop_policy: DropPolicy,
    pub(super) ping_interval: Duration,
    pub(super) ping_timeout: Duration,
    pub(super) tls_ca_pem: Option<String>,
    pub(super) frame_version: FrameVersion,
}

impl Default for RedisPubSubOptions {
    fn default() -> Self {
        Self {
            response_timeout: Duration::from_secs(5),
            connection_timeout: crate::transport::redis_support::DEFAULT_CONNECT_TIMEOUT,
            reconnect_min_delay: Duration::from_millis(50),
            reconnect_max_delay: Duration::from_secs(5),
            client_name_prefix: "switchboard-pubsub".to_owned(),
            inbox_capacity: 1024,
            drop_policy: DropPolicy::DropOldest,
            ping_interval: Duration::from_secs(5),
            ping_timeout: Duration::from_secs(2),
            tls_ca_pem: None,
            frame_version: FrameVersion::V1,
        }
    }
}

impl RedisPubSubOptions {
    /// Trusts the CA `pem` for a `rediss://` URL instead of the system's
    /// roots; needs the `redis-tls` feature. A certificate it does not
    /// vouch for fails `connect` with `ErrorKind::Rejected`, not retried.
    pub fn with_tls_ca_pem(mut self, pem: impl Into<String>) -> Self {
        self.tls_ca_pem = Some(pem.into());
        self
    }

    /// How long a command (PUBLISH, SUBSCRIBE) may wait for its reply
    /// (default 5 s).
    pub fn with_response_timeout(mut self, timeout: Duration) -> Self {
        self.response_timeout = timeout;
        self
    }

    /// How long opening a connection may take (default 5 s): `connect`
    /// to a Redis that is down or does not answer fails with a retryable
    /// [`ErrorKind::Connection`](crate::ErrorKind::Connection) within it,
    /// and a subscription's reconnection attempt gives up after it and
    /// tries again. At least 1 ms.
    pub fn with_connection_timeout(mut self, timeout: Duration) -> Self {
        self.connection_timeout = timeout;
        self
    }

    /// The first and the longest pause between reconnection attempts of a
    /// subscription (default 50 ms and 5 s; exponential, with jitter).
    pub fn with_reconnect_delays(mut self, min: Duration, max: Duration) -> Self {
        self.reconnect_min_delay = min;
        self.reconnect_max_delay = max.max(min);
        self
    }

    /// The start of each subscription's `CLIENT SETNAME`; a random suffix
    /// makes every name unique (default `switchboard-pubsub`). Redis allows
    /// no spaces in it.
    pub fn with_client_name_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.client_name_prefix = prefix.into();
        self
    }

    /// How many received messages each subscription keeps waiting for its
    /// consumer, besides the `prefetch` deliveries handed out (default 1024;
    /// at least 1, or
    /// [`RedisPubSubTransport::connect_with`](super::RedisPubSubTransport::connect_with)
    /// fails with [`ErrorKind::Config`]).
    pub fn with_inbox_capacity(mut self, capacity: usize) -> Self {
        self.inbox_capacity = capacity;
        self
    }

    /// Which message a subscription drops when its inbox is full (default
    /// [`DropPolicy::DropOldest`]).
    pub fn with_drop_policy(mut self, policy: DropPolicy) -> Self {
        self.drop_policy = policy;
        self
    }

    /// The frame this transport writes for a message with headers (default
    /// [`FrameVersion::V1`]); it reads both. Switch to `V2` once every
    /// subscriber runs this release or later (see
    /// [Wire format](super#wire-format)).
    ///
    /// ```
    /// use switchboard::transport::redis_pubsub::{FrameVersion, RedisPubSubOptions};
    ///
    /// let options = RedisPubSubOptions::default().with_frame_version(FrameVersion::V2);
    /// assert_eq!(options.frame_version(), FrameVersion::V2);
    /// ```
    pub fn with_frame_version(mut self, version: FrameVersion) -> Self {
        self.frame_version = version;
        self
    }

    /// The frame this transport writes for a message with headers.
    pub fn frame_version(&self) -> FrameVersion {
        self.frame_version
    }

    /// How often a subscription that heard nothing since the last check
    /// pings its connection, and how long the answer may take (default 5 s
    /// and 2 s). A connection that does not answer in time is taken for
    /// lost (half-open: the peer hung or vanished without closing the
    /// socket) and replaced, as a closed one is; so a stalled subscription
    /// is noticed within two intervals and the timeout (12 s by default)
    /// instead of never. An interval of zero turns the pings off.
    ///
    /// ```
    /// use std::time::Duration;
    /// use switchboard::transport::redis_pubsub::RedisPubSubOptions;
    ///
    /// let options = RedisPubSubOptions::default()
    ///     .with_ping(Duration::from_secs(1), Duration::from_millis(500));
    /// assert_eq!(options.ping_interval(), Duration::from_secs(1));
    /// assert_eq!(options.ping_timeout(), Duration::from_millis(500));
    /// assert_eq!(RedisPubSubOptions::default().ping_interval(), Duration::from_secs(5));
    /// ```
    pub fn with_ping(mut self, interval: Duration, timeout: Duration) -> Self {
        self.ping_interval = interval;
        self.ping_timeout = timeout;
        self
    }

    /// How often a silent subscription pings its connection.
    pub fn ping_interval(&self) -> Duration {
        self.ping_interval
    }

    /// How long a ping's answer may take.
    pub fn ping_timeout(&self) -> Duration {
        self.ping_timeout
    }

    /// The inbox capacity of each subscription.
    pub fn inbox_capacity(&self) -> usize {
        self.inbox_capacity
    }

    /// The drop policy of each subscription's inbox.
    pub fn drop_policy(&self) -> DropPolicy {
        self.drop_policy
    }

    /// The response timeout.
    pub fn response_timeout(&self) -> Duration {
        self.response_timeout
    }

    /// The connection timeout.
    pub fn connection_timeout(&self) -> Duration {
        self.connection_timeout
    }
}

/// What a subscription listens to.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Channels {
    /// One topic (`SUBSCRIBE`); a name as [`validate_name`] accepts.
    Topic(String),
    /// Every channel matching a Redis glob (`PSUBSCRIBE`), such as
    /// `price.*`: the characters of a topic name plus `* ? [ ] ^ \`.
    Pattern(String),
}

impl Channels {
    pub(super) fn validate(&self) -> Result<(), Error> {
        match self {
            Self::Topic(topic) => validate_name("topic", topic),
            Self::Pattern(pattern) => {
                let allowed = |b: u8| {
                    b.is_ascii_alphanumeric()
                        || matches!(b, b'.' | b'_' | b'-' | b':' | b'*' | b'?' | b'[' | b']')
                        || matches!(b, b'^' | b'\\')
                };
                if pattern.is_empty() || pattern.len() > 255 || !pattern.bytes().all(allowed) {
                    return Err(Error::new(
                        ErrorKind::Rejected,
                        format!(
                            "invalid channel pattern {pattern:?}: use 1 to 255 ASCII letters, \
                             digits, . _ - : and the glob characters * ? [ ] ^ \\"
                        ),
                    ));
                }
                Ok(())
            }
        }
    }

    pub(super) fn name(&self) -> &str {
        match self {
            Self::Topic(name) | Self::Pattern(name) => name,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_allow_globs_and_refuse_the_rest() {
        assert!(Channels::Pattern("price.*".into()).validate().is_ok());
        assert!(Channels::Pattern("h?llo.[ab]".into()).validate().is_ok());
        assert!(Channels::Pattern("two words*".into()).validate().is_err());
        assert!(Channels::Pattern(String::new()).validate().is_err());
        assert!(Channels::Topic("price.*".into()).validate().is_err());
    }
}
