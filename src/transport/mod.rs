//! The untyped delivery contract every transport keeps, and the transports.
//!
//! Transports move bytes; typing lives in [`EventBus`](crate::EventBus). The
//! traits here are object-safe, so a service holds an `Arc<dyn Transport>`
//! picked from configuration.
//!
//! # The contract
//!
//! * [`Publisher::publish`] returns `Ok` only once the transport has accepted
//!   the message as far as its guarantee goes (the in-memory queue holds it;
//!   Redis replied to XADD; RabbitMQ confirmed; a push receiver answered OK
//!   after its handler ran). An `Err` means the message may or may not have
//!   been taken: at-least-once publishers send it again and consumers
//!   deduplicate on `event_id`.
//! * [`Subscriber::subscribe`] returns a [`Subscription`] only once it is
//!   live, so a message published after `subscribe` returns reaches it.
//! * With [`DeliveryMode::Competing`], each consumer group gets every message
//!   of the topic and exactly one member of a group handles it; with
//!   [`DeliveryMode::Broadcast`], every live subscriber gets every message.
//! * A [`Delivery`] is settled once: `ack`, `nack(delay)`, `give_back()`
//!   or `dead_letter(reason)` — or by an [`Outcome`](crate::Outcome) with
//!   [`Delivery::settle`]. An operation the transport cannot do fails with
//!   [`ErrorKind::Unsupported`](crate::ErrorKind::Unsupported), never a silent
//!   success. What happens to a delivery dropped unsettled is what
//!   [`Capabilities::redelivers_unacked`] says.
//! * `concurrency = 1` with [`Capabilities::ordered`] delivers a group's
//!   messages in publish order (a nacked message comes again after its
//!   delay, behind what was delivered meanwhile).
//! * [`SubscribeOptions::prefetch`] bounds everything a subscription holds:
//!   read ahead, in a handler, and nacked while waiting out the delay. A
//!   nacked message keeps its place in the prefetch and the same
//!   subscription hands it out again, so a consumer whose dependency is down
//!   retries `prefetch` messages instead of walking the backlog; no transport
//!   spawns a task per nack, and no queue inside a transport is unbounded
//!   (the conformance suite's requeue storm checks it).
//! * [`Delivery::delivery_count`] counts the deliveries of a message that
//!   ended without an outcome (crash, lost connection, dropped unsettled);
//!   [`SubscribeOptions::max_deliveries`] is the consume loop's poison guard
//!   on it.
//! * [`Transport::declare`] creates what a [`Topology`] names (stream groups,
//!   queues) so nothing published before a subscriber's first start is lost.
//! * [`Transport::close`] refuses new work with
//!   [`ErrorKind::Closed`](crate::ErrorKind::Closed), ends every
//!   subscription (its stream yields `None`) and waits for it, then closes
//!   the connections, within [`CLOSE_TIMEOUT`]; [`Transport::health`] says
//!   how the transport is in one [`TransportHealth`] for all. See
//!   [`lifecycle`].
//!
//! The conformance suite in `switchboard::testing` (feature `test-util`)
//! checks all of this against any transport.

use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};

use crate::error::Error;
use crate::topology::Topology;

#[cfg(feature = "amqp")]
#[cfg_attr(docsrs, doc(cfg(feature = "amqp")))]
pub mod amqp;
pub(crate) mod delay;
pub(crate) mod delivery;
#[cfg(feature = "grpc")]
pub mod grpc;
#[cfg(feature = "http")]
pub mod http;
pub mod lifecycle;
pub mod memory;
mod ordering_key;
#[cfg(any(feature = "grpc", feature = "http"))]
pub mod push;
#[cfg(any(
    feature = "redis-streams",
    feature = "redis-pubsub",
    feature = "amqp",
    feature = "grpc",
    feature = "http",
    feature = "file-transfer"
))]
pub(crate) mod redact;
#[cfg(feature = "redis-pubsub")]
pub mod redis_pubsub;
#[cfg(feature = "redis-streams")]
#[cfg_attr(docsrs, doc(cfg(feature = "redis-streams")))]
pub mod redis_streams;
#[cfg(any(feature = "redis-streams", feature = "redis-pubsub"))]
pub(crate) mod redis_support;
mod settle_error;
mod subscribe_options;
mod subscription;

pub use delivery::{
    Acker, DeadLetter, Delivery, GiveBackLimit, RawMessage, SettleError, Settled, SubscribeOptions,
    Subscription, validate_name,
};
pub(crate) use lifecycle::Lifecycle;
pub use lifecycle::{CLOSE_TIMEOUT, HealthState, TransportHealth};
pub use ordering_key::OrderingKey;

/// Names of the headers this crate reads and writes on a [`RawMessage`].
pub mod header {
    /// The envelope's `event_id`, set by the typed bus on publish.
    pub const EVENT_ID: &str = "event-id";
    /// The envelope's `event_type`, set by the typed bus on publish.
    pub const EVENT_TYPE: &str = "event-type";
    /// How many times members of the group have given the message back
    /// ([`Delivery::give_back`](super::Delivery::give_back)); kept with the
    /// message by the transport.
    pub const GIVEN_BACK: &str = "switchboard-given-back";
    /// When the message was first given back (RFC 3339, UTC).
    pub const GIVEN_BACK_AT: &str = "switchboard-given-back-at";
}

/// Sends messages to a topic.
///
/// `publish` returns `Ok` only once the transport has accepted the message as
/// far as its guarantee goes (see [the contract](self#the-contract)); an
/// `Err` leaves it unknown whether the message was taken, so at-least-once
/// publishers send it again and consumers deduplicate on `event_id`. An
/// invalid topic name (see [`validate_name`]) is refused with
/// [`ErrorKind::Rejected`](crate::ErrorKind::Rejected).
#[async_trait]
pub trait Publisher: Send + Sync {
    /// Publishes one message; returns once the transport has accepted it as
    /// far as its guarantee goes.
    async fn publish(&self, topic: &str, message: RawMessage) -> Result<(), Error>;

    /// Publishes several messages, in order, in as few round trips as the
    /// transport allows. On `Err` any prefix may have been accepted.
    async fn publish_batch(&self, topic: &str, messages: Vec<RawMessage>) -> Result<(), Error> {
        for message in messages {
            self.publish(topic, message).await?;
        }
        Ok(())
    }

    /// Publishes one message to be delivered at `at`, not before; returns
    /// once the transport has taken it as far as its guarantee goes (a
    /// persistent transport keeps it through a restart). Delivery is then
    /// as for [`publish`](Self::publish): every group of the topic gets it.
    /// A time already past delivers at once.
    ///
    /// Only transports with [`Capabilities::scheduled`] do this; the
    /// default fails with
    /// [`ErrorKind::Unsupported`](crate::ErrorKind::Unsupported), never a
    /// silent immediate publish. How late after `at` a message may arrive
    /// is each transport's stated tolerance (see
    /// [`Capabilities::scheduled`]).
    ///
    /// ```
    /// use std::time::Duration;
    /// use switchboard::{MemoryTransport, Publisher, RawMessage, SubscribeOptions, Subscriber};
    ///
    /// # tokio::runtime::Runtime::new().unwrap().block_on(async {
    /// let transport = MemoryTransport::new();
    /// let mut subscription = transport.subscribe("reminder.due", SubscribeOptions::new("mail")).await?;
    /// let at = chrono::Utc::now() + Duration::from_millis(50);
    /// transport.publish_at("reminder.due", RawMessage::new("pay the invoice"), at).await?;
    /// let delivery = subscription.recv().await.expect("delivered at its time");
    /// assert!(chrono::Utc::now() >= at);
    /// delivery.ack().await?;
    /// # Ok::<(), switchboard::Error>(())
    /// # }).unwrap();
    /// ```
    async fn publish_at(
        &self,
        topic: &str,
        message: RawMessage,
        at: DateTime<Utc>,
    ) -> Result<(), Error> {
        let _ = (topic, message, at);
        Err(Error::new(
            crate::error::ErrorKind::Unsupported,
            "this transport cannot schedule a publish (publish_at / publish_after): \
             its capabilities do not claim `scheduled`",
        ))
    }

    /// [`publish_at`](Self::publish_at) `delay` from now (the caller's
    /// clock). A delay too large for a date is refused with
    /// [`ErrorKind::Rejected`](crate::ErrorKind::Rejected).
    async fn publish_after(
        &self,
        topic: &str,
        message: RawMessage,
        delay: Duration,
    ) -> Result<(), Error> {
        let at = due_after(delay)?;
        self.publish_at(topic, message, at).await
    }
}

/// `at` in Unix milliseconds, rounded up: what a broker keeps as a due time,
/// so a message is never due early.
#[cfg(any(feature = "redis-streams", feature = "amqp"))]
pub(crate) fn due_millis(at: DateTime<Utc>) -> i64 {
    let millis = at.timestamp_millis();
    if at.timestamp_subsec_nanos().is_multiple_of(1_000_000) {
        millis
    } else {
        millis + 1
    }
}

/// The time `delay` from now; a delay past what a date can hold is refused.
pub(crate) fn due_after(delay: Duration) -> Result<DateTime<Utc>, Error> {
    chrono::Duration::from_std(delay)
        .ok()
        .and_then(|delay| Utc::now().checked_add_signed(delay))
        .ok_or_else(|| {
            Error::new(
                crate::error::ErrorKind::Rejected,
                format!("a delay of {delay:?} is past any date this crate can schedule"),
            )
        })
}

/// Receives messages from a topic.
///
/// `subscribe` returns only once the subscription is live: a message
/// published after it returns reaches it. With
/// [`DeliveryMode::Competing`] each group receives every message and one
/// member of the group handles it; the subscription hands out at most
/// `prefetch` unsettled deliveries, each to be settled once (ack, nack or
/// dead-letter); `Subscription::shutdown` stops receiving and waits until
/// every delivery handed out is settled or dropped.
#[async_trait]
pub trait Subscriber: Send + Sync {
    /// Starts receiving `topic` for `options.group`; returns once live.
    async fn subscribe(
        &self,
        topic: &str,
        options: SubscribeOptions,
    ) -> Result<Subscription, Error>;
}

/// A message transport: the in-memory bus, a broker, or a push protocol.
///
/// It keeps [the delivery contract](self#the-contract): what it guarantees
/// is what [`capabilities`](Transport::capabilities) claims, and an
/// operation it cannot do fails with
/// [`ErrorKind::Unsupported`](crate::ErrorKind::Unsupported), never a silent
/// success. The conformance suite (feature `test-util`) checks both.
///
/// ```
/// use std::sync::Arc;
/// use switchboard::{MemoryTransport, Transport};
///
/// let transport: Arc<dyn Transport> = Arc::new(MemoryTransport::new());
/// assert_eq!(transport.name(), "memory");
/// assert!(transport.capabilities().redelivers_unacked);
/// ```
#[async_trait]
pub trait Transport: Publisher + Subscriber {
    /// A short name for logs and errors, such as `"redis-streams"`.
    fn name(&self) -> &'static str;

    /// What this transport guarantees.
    fn capabilities(&self) -> Capabilities;

    /// Creates the groups, queues or streams `topology` names. Idempotent:
    /// what exists already is left as it is.
    async fn declare(&self, topology: &Topology) -> Result<(), Error>;

    /// The dead-letter queue, for transports with
    /// [`Capabilities::dead_letter`]; others return
    /// [`ErrorKind::Unsupported`](crate::ErrorKind::Unsupported).
    fn dead_letters(&self) -> Result<&dyn DeadLetterQueue, Error> {
        Err(Error::unsupported(self.name(), "keep dead letters"))
    }

    /// Closes the transport: refuses new work with
    /// [`ErrorKind::Closed`](crate::ErrorKind::Closed), ends the
    /// subscriptions it handed out and waits for them, stops its background
    /// tasks and closes its connections cleanly — all within
    /// [`CLOSE_TIMEOUT`]. Idempotent. See [closing](lifecycle#closing).
    ///
    /// The default does nothing, for transports that own nothing to close.
    ///
    /// ```
    /// use switchboard::{ErrorKind, MemoryTransport, Publisher, RawMessage, Transport};
    ///
    /// # tokio::runtime::Runtime::new().unwrap().block_on(async {
    /// let transport = MemoryTransport::new();
    /// transport.close().await?;
    /// let refused = transport.publish("t", RawMessage::new("x")).await.unwrap_err();
    /// assert_eq!(refused.kind(), ErrorKind::Closed);
    /// # Ok::<(), switchboard::Error>(())
    /// # }).unwrap();
    /// ```
    async fn close(&self) -> Result<(), Error> {
        Ok(())
    }

    /// The newest message published to `topic` that the transport still
    /// holds, read without a consumer group and without settling anything;
    /// `None` when there is none.
    ///
    /// For state that is announced whole each time (a key set, a
    /// configuration): a consumer that starts late reads the current value
    /// at once instead of replaying a history that trimming may have cut.
    /// The in-memory transport keeps the last message of each topic; Redis
    /// Streams reads the stream's last entry (`XREVRANGE … COUNT`), skipping
    /// redriven copies. The default is
    /// [`ErrorKind::Unsupported`](crate::ErrorKind::Unsupported).
    ///
    /// ```
    /// use switchboard::{MemoryTransport, Publisher, RawMessage, Transport};
    ///
    /// # tokio::runtime::Runtime::new().unwrap().block_on(async {
    /// let transport = MemoryTransport::new();
    /// assert!(transport.read_latest("config.changed").await?.is_none());
    /// transport.publish("config.changed", RawMessage::new("v1")).await?;
    /// transport.publish("config.changed", RawMessage::new("v2")).await?;
    /// let latest = transport.read_latest("config.changed").await?.expect("kept");
    /// assert_eq!(latest.body.as_ref(), b"v2");
    /// # Ok::<(), switchboard::Error>(())
    /// # }).unwrap();
    /// ```
    async fn read_latest(&self, topic: &str) -> Result<Option<RawMessage>, Error> {
        let _ = topic;
        Err(Error::unsupported(self.name(), "read the latest message"))
    }

    /// How many messages `group` of `topic` has not been handed yet (its
    /// lag), when the transport can tell; `None` otherwise (the default).
    async fn group_lag(&self, topic: &str, group: &str) -> Result<Option<u64>, Error> {
        let _ = (topic, group);
        Ok(None)
    }

    /// How the transport is now, in one shape for every transport (for a
    /// `/health` endpoint). The default says up.
    fn health(&self) -> TransportHealth {
        TransportHealth::up(self.name())
    }

    /// Deletes everything the transport keeps under `namespace` — the
    /// topics `<namespace>.*` and their dead letters, as an
    /// [`EventBus::with_namespace`](crate::EventBus::with_namespace) bus
    /// made them — and returns how many streams, queues or topics went.
    ///
    /// **For tests and development**: it removes messages no one has read.
    /// The default is [`ErrorKind::Unsupported`](crate::ErrorKind::Unsupported).
    async fn purge_namespace(&self, namespace: &str) -> Result<usize, Error> {
        let _ = namespace;
        Err(Error::unsupported(self.name(), "purge a namespace"))
    }
}

/// How messages are shared among subscribers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DeliveryMode {
    /// Each consumer group gets every message; one member of the group
    /// handles each (work queues, event notification).
    Competing,
    /// Every live subscriber gets every message; groups play no part.
    Broadcast,
}

/// What a transport guarantees. The conformance suite runs the cases each
/// claim implies and checks that unclaimed operations say `Unsupported`.
///
/// ```
/// use switchboard::{Capabilities, DeliveryMode};
///
/// let caps = Capabilities::new(DeliveryMode::Broadcast);
/// assert!(!caps.persistent && !caps.nack);
/// let caps = Capabilities::new(DeliveryMode::Competing).with_nack(true);
/// assert!(caps.nack);
/// ```
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Capabilities {
    /// Competing groups or broadcast.
    pub delivery: DeliveryMode,
    /// Accepted messages survive a restart of the broker.
    pub persistent: bool,
    /// With concurrency 1, a group receives messages in publish order.
    pub ordered: bool,
    /// The broker keeps messages for a group while none of its consumers is
    /// connected, and delivers again what was handed out but never settled.
    pub redelivers_unacked: bool,
    /// [`Delivery::nack`] is supported.
    pub nack: bool,
    /// [`Delivery::dead_letter`] and [`Transport::dead_letters`] are supported.
    pub dead_letter: bool,
    /// [`Publisher::publish_at`] and [`Publisher::publish_after`] are
    /// supported: a message is delivered not before its time, and late by
    /// at most the transport's stated tolerance (memory: a timer, a few
    /// milliseconds; Redis Streams: the mover's tick; RabbitMQ: the delay
    /// buckets' hops — see each transport's module docs). On a
    /// [`persistent`](Self::persistent) transport a scheduled message
    /// survives a restart.
    pub scheduled: bool,
}

impl Capabilities {
    /// Capabilities with the given delivery mode and every guarantee off.
    pub const fn new(delivery: DeliveryMode) -> Self {
        Self {
            delivery,
            persistent: false,
            ordered: false,
            redelivers_unacked: false,
            nack: false,
            dead_letter: false,
            scheduled: false,
        }
    }

    /// Sets [`persistent`](Self::persistent).
    pub const fn with_persistent(mut self, yes: bool) -> Self {
        self.persistent = yes;
        self
    }

    /// Sets [`ordered`](Self::ordered).
    pub const fn with_ordered(mut self, yes: bool) -> Self {
        self.ordered = yes;
        self
    }

    /// Sets [`redelivers_unacked`](Self::redelivers_unacked).
    pub const fn with_redelivers_unacked(mut self, yes: bool) -> Self {
        self.redelivers_unacked = yes;
        self
    }

    /// Sets [`nack`](Self::nack).
    pub const fn with_nack(mut self, yes: bool) -> Self {
        self.nack = yes;
        self
    }

    /// Sets [`dead_letter`](Self::dead_letter).
    pub const fn with_dead_letter(mut self, yes: bool) -> Self {
        self.dead_letter = yes;
        self
    }

    /// Sets [`scheduled`](Self::scheduled).
    pub const fn with_scheduled(mut self, yes: bool) -> Self {
        self.scheduled = yes;
        self
    }
}

/// A message in a dead-letter queue, with the facts of why it is there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLettered {
    /// The id to inspect or redrive it by: its `event_id` when the message
    /// carried one, otherwise the transport's own id.
    pub id: String,
    /// The topic it was published to.
    pub topic: String,
    /// The consumer group that gave up on it.
    pub group: String,
    /// The message as it was delivered.
    pub message: RawMessage,
    /// Why it was dead-lettered.
    pub reason: String,
    /// How many times it was tried.
    pub attempts: u32,
    /// The last error, when there was one.
    pub last_error: Option<String>,
    /// When it was dead-lettered.
    pub dead_lettered_at: DateTime<Utc>,
}

/// Which dead letters to send back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Redrive {
    /// The one with this [`DeadLettered::id`].
    One(String),
    /// All of the topic's dead letters that are in the queue when the
    /// redrive starts; what is dead-lettered meanwhile (a redriven message
    /// that fails again at once, too) waits for the next redrive, so a
    /// redrive always ends.
    All,
}

/// A transport's dead-letter queue: list, inspect and redrive (strategy §6.3's
/// manual retry).
#[async_trait]
pub trait DeadLetterQueue: Send + Sync {
    /// Up to `limit` dead letters of `topic`, oldest first.
    async fn list(&self, topic: &str, limit: usize) -> Result<Vec<DeadLettered>, Error>;

    /// One dead letter by id;
    /// [`ErrorKind::NotFound`](crate::ErrorKind::NotFound) when absent.
    async fn inspect(&self, topic: &str, id: &str) -> Result<DeadLettered, Error>;

    /// Sends dead letters back to the group that gave up on them and removes
    /// them from the queue; returns how many were sent. [`Redrive::All`]
    /// moves at most the letters that were there when it started.
    async fn redrive(&self, topic: &str, which: Redrive) -> Result<usize, Error>;
}
