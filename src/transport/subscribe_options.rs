//! How a subscriber takes part ([`SubscribeOptions`]), how long a message
//! no member can read is given back ([`GiveBackLimit`]), and the names
//! transports accept ([`validate_name`]).

use std::time::Duration;

use chrono::Utc;

use super::delivery::Delivery;
use super::ordering_key::OrderingKey;
use crate::error::{Error, ErrorKind};
use crate::topology::validate_name;

/// How a subscriber takes part: its group, how many messages it handles at
/// once, and how many it may hold unsettled.
///
/// ```
/// use switchboard::SubscribeOptions;
///
/// let options = SubscribeOptions::new("game").with_concurrency(8);
/// assert_eq!(options.prefetch, 64);
/// assert!(options.validate().is_ok());
/// let guarded = SubscribeOptions::new("game").with_max_deliveries(5);
/// assert_eq!(guarded.max_deliveries, Some(5));
/// assert_eq!(guarded.give_back_limit.max_age, std::time::Duration::from_secs(600));
/// assert!(SubscribeOptions::new("game").with_concurrency(0).validate().is_err());
/// ```
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubscribeOptions {
    /// The consumer group. With [`DeliveryMode::Competing`](crate::DeliveryMode)
    /// each group gets every message and one member of the group handles it.
    pub group: String,
    /// Handlers in flight at once (default 1, which keeps order).
    pub concurrency: usize,
    /// The most messages the subscription holds at once (default 64; at
    /// least `concurrency` to reach full concurrency): read ahead, in a
    /// handler, and nacked while waiting out their delay all count.
    pub prefetch: usize,
    /// The poison guard (default off): a delivery whose
    /// [`delivery_count`](Delivery::delivery_count) is above this goes to
    /// the dead-letter queue, with reason "delivered N times without an
    /// outcome", **before** a handler of the [`EventBus`](crate::EventBus)
    /// runs — a message that crashes its consumer cannot come back forever.
    /// Nacks are outcomes and do not count.
    pub max_deliveries: Option<u32>,
    /// How long, and how often, a message this consumer cannot read (an
    /// envelope of a major version it does not know) is given back to the
    /// group for another member before the [`EventBus`](crate::EventBus)
    /// dead-letters it (default: for 10 minutes after its first give-back,
    /// however often). See [`GiveBackLimit`].
    pub give_back_limit: GiveBackLimit,
    /// Handle messages of the same key one at a time, in order, and
    /// different keys in parallel (default `None`: no order beyond
    /// `concurrency = 1`). Used by the [`EventBus`](crate::EventBus)
    /// consume loop; a raw [`Subscription`](crate::Subscription) hands
    /// deliveries out as the transport reads them. See [`OrderingKey`]. A
    /// batch consumer hands a key's messages to its handler several at a
    /// time, in order (see
    /// [`EventBus::subscribe_batch`](crate::EventBus::subscribe_batch)).
    ///
    /// A message whose outcome is a retry after a delay (an open breaker,
    /// a duplicate still in progress) is not nacked to the transport: the
    /// subscription holds it, with its prefetch permit, through the delay
    /// and hands it to the handler again before any later message of its
    /// key, so held messages of a blocked key can never starve its own
    /// redelivery of a permit. Past 10 minutes of such retries it is nacked
    /// to the transport after all (a RabbitMQ consumer must not hold a
    /// message for ever) and its key goes on, with a warning. On stop,
    /// messages held for their key and never started go back to the
    /// transport unhandled, as deliveries whose consumer went away.
    pub ordering_key: Option<OrderingKey>,
}

/// When a message that members of a group keep giving back (none of them
/// knows its major version) is dead-lettered instead, with reason "no member
/// of group … knows version … of …".
///
/// During a rolling deploy a producer on the new major version may reach
/// the group before its new members do; the old members give those
/// messages back ([`Delivery::give_back`]) for a new member to take, and go
/// on handling what they can read at full speed. The limit is for when no
/// such member comes: a message is dead-lettered once it was first given
/// back `max_age` ago, or has been given back `max_times` times. The age
/// counts from the first give-back ([`crate::transport::header::GIVEN_BACK_AT`]), not from
/// publication, so an old backlog is not dead-lettered for being old.
///
/// ```
/// use std::time::Duration;
/// use switchboard::{GiveBackLimit, SubscribeOptions};
///
/// let limit = GiveBackLimit::default();
/// assert_eq!(limit.max_age, Duration::from_secs(600));
/// assert_eq!(limit.max_times, None);
/// // Dead-letter what this consumer cannot read at once, as before giving back existed:
/// let strict = SubscribeOptions::new("game").with_give_back_limit(GiveBackLimit::default().with_max_times(0));
/// assert_eq!(strict.give_back_limit.max_times, Some(0));
/// ```
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GiveBackLimit {
    /// How long after its first give-back a message may still be given back
    /// (default [`GiveBackLimit::DEFAULT_MAX_AGE`], 10 minutes).
    pub max_age: Duration,
    /// How many times it may be given back (default `None`: only the age
    /// counts). How fast a message comes back to a member that cannot read
    /// it is the transport's: after a pause doubling up to 1 s in memory,
    /// at most every `claim_every` on Redis Streams, at the broker's pace on
    /// RabbitMQ (where it goes to the back of the queue); so a count means
    /// different times on different transports. `Some(0)` never gives back.
    pub max_times: Option<u32>,
}

impl GiveBackLimit {
    /// The default [`max_age`](Self::max_age): 10 minutes, longer than a
    /// rolling deploy takes.
    pub const DEFAULT_MAX_AGE: Duration = Duration::from_secs(600);

    /// A limit of `max_age` and no count.
    pub const fn new(max_age: Duration) -> Self {
        Self {
            max_age,
            max_times: None,
        }
    }

    /// Sets [`max_age`](Self::max_age).
    pub const fn with_max_age(mut self, max_age: Duration) -> Self {
        self.max_age = max_age;
        self
    }

    /// Also dead-letters a message given back `times` times.
    pub const fn with_max_times(mut self, times: u32) -> Self {
        self.max_times = Some(times);
        self
    }

    /// Why `delivery` must not be given back again, when it must not: it has
    /// been given back `max_times` times, or first `max_age` ago.
    pub fn exceeded(&self, delivery: &Delivery) -> Option<String> {
        let times = delivery.given_back();
        let since = delivery.given_back_since();
        let age = since.map(|since| (Utc::now() - since).to_std().unwrap_or_default());
        let by_count = self.max_times.is_some_and(|max| times >= max);
        let by_age = age.is_some_and(|age| age >= self.max_age);
        if !by_count && !by_age {
            return None;
        }
        Some(match age {
            Some(age) if age < Duration::from_secs(10) => {
                format!("given back {times} times over {} ms", age.as_millis())
            }
            Some(age) => format!("given back {times} times over {} s", age.as_secs()),
            None => format!("given back {times} times"),
        })
    }
}

impl Default for GiveBackLimit {
    fn default() -> Self {
        Self::new(Self::DEFAULT_MAX_AGE)
    }
}

impl SubscribeOptions {
    /// Options for `group` with concurrency 1 and prefetch 64.
    pub fn new(group: impl Into<String>) -> Self {
        Self {
            group: group.into(),
            concurrency: 1,
            prefetch: 64,
            max_deliveries: None,
            give_back_limit: GiveBackLimit::default(),
            ordering_key: None,
        }
    }

    /// Sets how many handlers run at once.
    pub fn with_concurrency(mut self, concurrency: usize) -> Self {
        self.concurrency = concurrency;
        self
    }

    /// Sets how many deliveries may be unsettled at once.
    pub fn with_prefetch(mut self, prefetch: usize) -> Self {
        self.prefetch = prefetch;
        self
    }

    /// Sets the poison guard: deliveries counted above `max` go to the
    /// dead-letter queue before a handler runs (see
    /// [`max_deliveries`](Self::max_deliveries)).
    pub fn with_max_deliveries(mut self, max: u32) -> Self {
        self.max_deliveries = Some(max);
        self
    }

    /// Sets when a message this consumer cannot read stops being given back
    /// to the group and is dead-lettered (see [`GiveBackLimit`]).
    pub fn with_give_back_limit(mut self, limit: GiveBackLimit) -> Self {
        self.give_back_limit = limit;
        self
    }

    /// Orders messages by `key` within this subscription: the same key one
    /// at a time in order, different keys in parallel up to
    /// [`concurrency`](Self::concurrency) (see [`OrderingKey`]).
    pub fn with_ordering_key(mut self, key: OrderingKey) -> Self {
        self.ordering_key = Some(key);
        self
    }

    /// Refuses an invalid group name, zero concurrency, zero prefetch or a
    /// zero poison guard.
    pub fn validate(&self) -> Result<(), Error> {
        validate_name("group", &self.group)?;
        if self.concurrency == 0 {
            return Err(Error::new(
                ErrorKind::Rejected,
                "subscribe option `concurrency` must be at least 1",
            ));
        }
        if self.prefetch == 0 {
            return Err(Error::new(
                ErrorKind::Rejected,
                "subscribe option `prefetch` must be at least 1",
            ));
        }
        if self.max_deliveries == Some(0) {
            return Err(Error::new(
                ErrorKind::Rejected,
                "subscribe option `max_deliveries` must be at least 1 (or unset)",
            ));
        }
        Ok(())
    }
}
