//! The RabbitMQ transport (feature `amqp`): strategy §1.2's task queue, on lapin 4
//! and tokio.
//!
//! RabbitMQ is where the strategy wants reliability and persistence, so this
//! transport takes the slow-but-sure path at every step:
//!
//! * **Topology.** One durable topic exchange (named in [`AmqpConfig`]); per
//!   consumer group and topic one durable queue, `<exchange>.<topic>.<group>`,
//!   bound by routing key = topic (the event type), and beside it the group's
//!   dead-letter queue `<queue>.dlq`. Classic or quorum queues, chosen in the
//!   config ([`QueueType`]).
//! * **Publishing.** Messages are persistent (delivery mode 2) and carry a
//!   content type, `message_id` = the event id, `type` = the event type and a
//!   timestamp; the [`RawMessage`] headers travel as AMQP headers. Every
//!   publish is *mandatory* and *confirmed*: [`Publisher::publish`] returns
//!   `Ok` only after the broker's ack; a nack, or a `basic.return` because no
//!   queue is bound for the topic, is an error. Each publish uses a channel
//!   of its own from a pool, so a return can never be attributed to another
//!   caller's message; up to [`AmqpConfig::publish_window`] publishes are in
//!   flight at once, and [`Publisher::publish_batch`] keeps that many
//!   confirms outstanding on one channel, so throughput does not pay a round
//!   trip per message.
//! * **Consuming.** Manual acks; the prefetch is
//!   [`SubscribeOptions::prefetch`], and it bounds everything the
//!   subscription holds. `nack(delay)` holds the message for the delay in
//!   the subscription's timer queue, still counting against the prefetch,
//!   and then hands it out again ([Delayed nacks](#delayed-nacks) says how
//!   and why). A delivery dropped unsettled is rejected with requeue at
//!   once, so it never sits on the channel until the connection closes. Each subscription samples its queue's depth (a passive
//!   declare) every [`AmqpConfig::lag_every`] into the
//!   `switchboard_consumer_lag` gauge.
//! * **Dead letters.** A confirmed publish of the message to `<queue>.dlq`
//!   with the reason, attempts, original routing key, group, last error and
//!   time in headers, then an ack of the original. Quorum queues are also
//!   declared with broker-side dead-lettering to the same queue
//!   (`x-dead-letter-strategy = at-least-once`, which needs
//!   `x-overflow = reject-publish`).
//! * **Two connections.** Publishers use one, consumers the other: RabbitMQ
//!   blocks a connection that publishes during a memory or disk alarm, and a
//!   blocked connection carries nothing, acks included. The consumers' own
//!   publishes (dead letters, republished nacks) go through the publishing
//!   connection, so the consuming one never publishes and is never blocked.
//! * **Deadlines.** [`AmqpConfig::publish_timeout`] bounds all of a publish:
//!   a place in the window, a connection, the broker unblocking the
//!   connection (nothing is sent while it is blocked) and the confirms. Past
//!   it the publish fails with a retryable [`ErrorKind::Timeout`] (or
//!   [`ErrorKind::Connection`] while reconnecting), so a consumer's dead
//!   letter or republish holds its delivery and permit at most that long.
//!   `connection_state` says [`ConnectionState::Blocked`] while the broker
//!   blocks publishing; [`AmqpTransport::health`] gives both connections and
//!   the broker's reason.
//! * **Connection loss.** A supervisor task owns each connection: heartbeats
//!   every few seconds notice a dead peer, and it reconnects with an
//!   exponential backoff (`backon`), declares everything again and hands the
//!   new connection to publishers and consumers, which resume by themselves.
//!   [`AmqpTransport::connection_state`] exposes the state as a
//!   [`tokio::sync::watch`]. A publish whose connection fails is tried again
//!   on the next connection until [`AmqpConfig::publish_timeout`], then
//!   returned as an error — never dropped silently (a retry after a lost
//!   confirm may duplicate a message: consumers deduplicate on `event_id`).
//! * **Declarations.** One the broker refuses (say `PRECONDITION_FAILED`)
//!   fails the `subscribe` or `declare` that needed it, with the broker's
//!   reason, and is not remembered; reconnections declare each remembered
//!   queue on a channel of its own and go on past a refusal, so one queue
//!   never keeps the transport down.
//!
//! # Delayed nacks
//!
//! A nacked message waits out its delay **in the subscription**, unacked on
//! its channel, in the subscription's timer queue (one per subscription,
//! not a task per nack), holding its prefetch permit; the broker's prefetch
//! (`basic.qos`) counts it too. When the delay is over the same
//! subscription hands it out again, one attempt more. So while a dependency
//! is down, a consumer holds `prefetch` messages and retries them instead of
//! walking the backlog.
//!
//! It goes back to the broker — republished, confirmed, to the back of its
//! group's queue with its attempt count and its count of deliveries without
//! an outcome in headers, the original acked — when the subscription stops,
//! and when it has been held for [`HOLD_LIMIT`] (RabbitMQ closes a channel
//! that keeps a delivery unacked past its `consumer_timeout`, 30 minutes by
//! default). A connection lost during the delay gives it back to the broker
//! at once (delivered again early, never lost); the copy held here is then
//! dropped, not handed out.
//!
//! Why not a broker-side delay queue (a TTL queue dead-lettering back): the
//! message would leave the consumer's prefetch, so the consumer would pull,
//! nack and park the whole backlog at broker speed; and without a plugin
//! RabbitMQ expires only the head of a queue, so one queue cannot hold
//! several delays. Scheduled publishing, where no consumer holds anything,
//! is a different problem.
//!
//! Why republish instead of `basic.reject` with requeue when giving back: a
//! reject puts the message at the *front* of a classic queue and raises a
//! quorum queue's `x-delivery-count`, which must keep counting only
//! deliveries that ended without an outcome for the poison guard
//! ([`SubscribeOptions::max_deliveries`]).
//!
//!
//! ```no_run
//! use switchboard::transport::amqp::{AmqpConfig, AmqpTransport, QueueType};
//! use switchboard::{Publisher, RawMessage, Topology, Transport};
//!
//! # async fn run() -> Result<(), switchboard::Error> {
//! let transport = AmqpTransport::connect(
//!     AmqpConfig::new("amqp://guest:guest@127.0.0.1:5672/%2f")
//!         .with_exchange("platform")
//!         .with_queue_type(QueueType::Quorum),
//! )
//! .await?;
//! transport.declare(&Topology::new().with_groups("trade.executed", ["game", "market"])).await?;
//! transport.publish("trade.executed", RawMessage::new(r#"{"order_id":"123"}"#)).await?;
//! # Ok(()) }
//! ```

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::watch;

use super::{
    Capabilities, DeadLetterQueue, DeliveryMode, Publisher, RawMessage, SubscribeOptions,
    Subscriber, Subscription, Transport, validate_name,
};
use crate::error::{Error, ErrorKind};
use crate::topology::Topology;

mod acker;
mod connection;
mod consumer;
mod dlq;
mod properties;
mod publisher;

pub use acker::HOLD_LIMIT;
pub use connection::ConnectionState;
use connection::{Role, Supervisor};

const NAME: &str = "amqp";

/// Classic or quorum queues.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum QueueType {
    /// Classic queues: the broker keeps no delivery count, so the transport
    /// counts attempts in a header when it republishes a nacked message.
    #[default]
    Classic,
    /// Quorum queues (replicated): the broker counts returns in
    /// `x-delivery-count`, which the attempts of an unguarded subscription
    /// come from; nacks and the poison guard work as on classic queues.
    Quorum,
}

/// How to reach RabbitMQ and how to lay out exchanges and queues.
///
/// ```
/// use std::time::Duration;
/// use switchboard::transport::amqp::{AmqpConfig, QueueType};
///
/// let config = AmqpConfig::new("amqp://127.0.0.1:5672/%2f")
///     .with_exchange("platform")
///     .with_queue_type(QueueType::Quorum)
///     .with_publish_window(512)
///     .with_heartbeat(Duration::from_secs(3));
/// assert_eq!(config.exchange, "platform");
/// assert_eq!(config.queue_name("trade.executed", "game").unwrap(), "platform.trade.executed.game");
///
/// let secret = AmqpConfig::new("amqp://app:s3cret@rabbit:5672/%2f");
/// assert!(!format!("{secret:?}").contains("s3cret"), "Debug hides the password");
/// ```
#[derive(Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct AmqpConfig {
    /// The AMQP URI, such as `amqp://guest:guest@127.0.0.1:5672/%2f`.
    pub uri: String,
    /// The topic exchange every message is published to (default
    /// `"switchboard"`). Queue names start with it.
    pub exchange: String,
    /// Delete the exchange once its last queue is unbound (default `false`);
    /// for tests, next to [`queue_expires`](Self::queue_expires).
    pub exchange_auto_delete: bool,
    /// Classic (default) or quorum queues.
    pub queue_type: QueueType,
    /// `x-expires` on every queue this transport declares: the broker deletes
    /// a queue unused for this long. For tests, so a failed run leaves
    /// nothing behind; `None` (the default) for production.
    pub queue_expires: Option<Duration>,
    /// Publishes in flight at once, and confirms outstanding in one
    /// `publish_batch` (default 256).
    pub publish_window: usize,
    /// The deadline of each publish, over all it waits for — a place in the
    /// window, a connection, the broker unblocking a blocked connection, the
    /// confirm — and the tries after a lost connection; past it the publish
    /// fails with a retryable error (default 30 s). `declare`, `subscribe`
    /// and the dead-letter operations wait as long for a connection, and
    /// declarations as long for the broker's answer.
    pub publish_timeout: Duration,
    /// The AMQP heartbeat, so a dead peer is noticed (default 5 s).
    pub heartbeat: Duration,
    /// The first and the longest wait between reconnection attempts
    /// (default 100 ms and 5 s, doubling).
    pub reconnect_delay: (Duration, Duration),
    /// The content type set on published messages (default
    /// `application/json`).
    pub content_type: String,
    /// How often each subscription samples its queue's depth into the
    /// `switchboard_consumer_lag` gauge (default 5 s).
    pub lag_every: Duration,
    /// Extra CA certificates (PEM) trusted for an `amqps://` URI, next to
    /// the webpki roots: a private CA's certificate. Needs the `amqp-tls`
    /// feature, as any `amqps://` URI does (default `None`).
    pub tls_ca_pem: Option<String>,
}

impl AmqpConfig {
    /// The defaults with this URI.
    pub fn new(uri: impl Into<String>) -> Self {
        Self {
            uri: uri.into(),
            exchange: "switchboard".to_owned(),
            exchange_auto_delete: false,
            queue_type: QueueType::Classic,
            queue_expires: None,
            publish_window: 256,
            publish_timeout: Duration::from_secs(30),
            heartbeat: Duration::from_secs(5),
            reconnect_delay: (Duration::from_millis(100), Duration::from_secs(5)),
            content_type: "application/json".to_owned(),
            lag_every: Duration::from_secs(5),
            tls_ca_pem: None,
        }
    }

    /// Sets [`tls_ca_pem`](Self::tls_ca_pem).
    pub fn with_tls_ca_pem(mut self, pem: impl Into<String>) -> Self {
        self.tls_ca_pem = Some(pem.into());
        self
    }

    /// Sets [`lag_every`](Self::lag_every).
    pub fn with_lag_every(mut self, every: Duration) -> Self {
        self.lag_every = every;
        self
    }

    /// Sets [`exchange`](Self::exchange).
    pub fn with_exchange(mut self, exchange: impl Into<String>) -> Self {
        self.exchange = exchange.into();
        self
    }

    /// Sets [`exchange_auto_delete`](Self::exchange_auto_delete).
    pub fn with_exchange_auto_delete(mut self, yes: bool) -> Self {
        self.exchange_auto_delete = yes;
        self
    }

    /// Sets [`queue_type`](Self::queue_type).
    pub fn with_queue_type(mut self, queue_type: QueueType) -> Self {
        self.queue_type = queue_type;
        self
    }

    /// Sets [`queue_expires`](Self::queue_expires).
    pub fn with_queue_expires(mut self, expires: Duration) -> Self {
        self.queue_expires = Some(expires);
        self
    }

    /// Sets [`publish_window`](Self::publish_window).
    pub fn with_publish_window(mut self, window: usize) -> Self {
        self.publish_window = window;
        self
    }

    /// Sets [`publish_timeout`](Self::publish_timeout).
    pub fn with_publish_timeout(mut self, timeout: Duration) -> Self {
        self.publish_timeout = timeout;
        self
    }

    /// Sets [`heartbeat`](Self::heartbeat) (whole seconds, at least one).
    pub fn with_heartbeat(mut self, heartbeat: Duration) -> Self {
        self.heartbeat = heartbeat;
        self
    }

    /// Sets [`reconnect_delay`](Self::reconnect_delay).
    pub fn with_reconnect_delay(mut self, first: Duration, longest: Duration) -> Self {
        self.reconnect_delay = (first, longest);
        self
    }

    /// The queue of `group` for `topic`: `<exchange>.<topic>.<group>`. Its
    /// dead-letter queue is that name with `.dlq` appended; both must fit
    /// AMQP's 255-byte limit.
    pub fn queue_name(&self, topic: &str, group: &str) -> Result<String, Error> {
        let name = format!("{}.{topic}.{group}", self.exchange);
        if name.len() + DLQ_SUFFIX.len() > 255 {
            return Err(Error::new(
                ErrorKind::Rejected,
                format!(
                    "queue name {name:?} is too long: exchange, topic and group together \
                     must leave room for {DLQ_SUFFIX:?} within 255 bytes"
                ),
            ));
        }
        Ok(name)
    }

    fn validate(&self) -> Result<(), Error> {
        let config = |message: String| Error::new(ErrorKind::Config, message);
        validate_name("exchange", &self.exchange)
            .map_err(|error| config(format!("amqp: {}", error.message())))?;
        if self.publish_window == 0 {
            return Err(config("amqp: publish_window must be at least 1".into()));
        }
        if self.lag_every.is_zero() {
            return Err(config("amqp: lag_every must be above zero".into()));
        }
        if self.heartbeat < Duration::from_secs(1) {
            return Err(config("amqp: heartbeat must be at least 1 s".into()));
        }
        if self.reconnect_delay.0.is_zero() || self.reconnect_delay.1 < self.reconnect_delay.0 {
            return Err(config(
                "amqp: reconnect_delay must be (first > 0, longest >= first)".into(),
            ));
        }
        if cfg!(not(feature = "amqp-tls"))
            && (self.tls_ca_pem.is_some() || self.uri.trim_start().starts_with("amqps:"))
        {
            return Err(config(
                "amqp: TLS (an amqps:// URI or tls_ca_pem) needs the `amqp-tls` feature".into(),
            ));
        }
        Ok(())
    }
}

/// Leaves the password out of the URI.
impl fmt::Debug for AmqpConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AmqpConfig")
            .field("uri", &connection::redact(&self.uri))
            .field("exchange", &self.exchange)
            .field("exchange_auto_delete", &self.exchange_auto_delete)
            .field("queue_type", &self.queue_type)
            .field("queue_expires", &self.queue_expires)
            .field("publish_window", &self.publish_window)
            .field("publish_timeout", &self.publish_timeout)
            .field("heartbeat", &self.heartbeat)
            .field("reconnect_delay", &self.reconnect_delay)
            .field("content_type", &self.content_type)
            .field("lag_every", &self.lag_every)
            .field("tls_ca_pem", &self.tls_ca_pem.as_ref().map(|_| "<PEM>"))
            .finish()
    }
}

impl Default for AmqpConfig {
    fn default() -> Self {
        Self::new("amqp://127.0.0.1:5672/%2f")
    }
}

pub(crate) const DLQ_SUFFIX: &str = ".dlq";

/// What [`AmqpTransport::health`] reports.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct AmqpHealth {
    /// The publishing connection (publishers, and the consumers' dead
    /// letters and republished nacks): [`ConnectionState::Blocked`] while
    /// the broker blocks it.
    pub publishing: ConnectionState,
    /// The consuming connection (consumers, their acks and rejects).
    pub consuming: ConnectionState,
    /// The broker's reason while it blocks the publishing connection, such
    /// as `"low on memory"`.
    pub blocked: Option<String>,
}

impl AmqpHealth {
    /// Both connections are up and publishing is not blocked.
    ///
    /// ```
    /// # use switchboard::transport::amqp::AmqpHealth;
    /// fn ready(health: &AmqpHealth) -> bool {
    ///     health.is_up()
    /// }
    /// ```
    pub fn is_up(&self) -> bool {
        self.publishing == ConnectionState::Connected
            && self.consuming == ConnectionState::Connected
    }
}

/// The RabbitMQ transport. Clones share one connection.
///
/// See the [module docs](self) for what it guarantees and how.
#[derive(Clone)]
pub struct AmqpTransport {
    shared: Arc<Shared>,
}

/// What publishers, consumers and the supervisor share.
pub(crate) struct Shared {
    pub(crate) config: AmqpConfig,
    /// The publishing connection: publishers, declarations, dead letters,
    /// republished nacks and the dead-letter queue's operations.
    pub(crate) supervisor: Supervisor,
    /// The consuming connection: consumers' channels, their acks and
    /// rejects, and the lag samples. Never publishes, so the broker never
    /// blocks it.
    pub(crate) consuming: Supervisor,
    /// Every (topic, group) declared or subscribed successfully, so a new
    /// connection declares them again and the dead-letter queue knows where
    /// to look. A declaration the broker refused is not remembered.
    pub(crate) known: Mutex<BTreeMap<String, BTreeSet<String>>>,
    pub(crate) window: Arc<tokio::sync::Semaphore>,
}

impl Shared {
    pub(crate) fn remember(&self, topic: &str, group: &str) -> bool {
        lock(&self.known)
            .entry(topic.to_owned())
            .or_default()
            .insert(group.to_owned())
    }

    pub(crate) fn groups(&self, topic: &str) -> Vec<String> {
        lock(&self.known)
            .get(topic)
            .map(|groups| groups.iter().cloned().collect())
            .unwrap_or_default()
    }

    pub(crate) fn known_topology(&self) -> Topology {
        lock(&self.known)
            .iter()
            .fold(Topology::new(), |topology, (topic, groups)| {
                topology.with_groups(topic.clone(), groups.iter().cloned())
            })
    }
}

impl AmqpTransport {
    /// Connects (waiting for the first connection, so a wrong URI or a
    /// broker that is down fails here) and starts the supervisor that keeps
    /// the connection up from then on.
    pub async fn connect(config: AmqpConfig) -> Result<Self, Error> {
        config.validate()?;
        let window = Arc::new(tokio::sync::Semaphore::new(
            config
                .publish_window
                .min(tokio::sync::Semaphore::MAX_PERMITS),
        ));
        let supervisor = Supervisor::new(&config, Role::Publishing)?;
        let consuming = Supervisor::new(&config, Role::Consuming)?;
        let shared = Arc::new(Shared {
            config,
            supervisor,
            consuming,
            known: Mutex::default(),
            window,
        });
        connection::start(&shared).await?;
        Ok(Self { shared })
    }

    /// The publishing connection's state, as a watch: `borrow()` for now,
    /// `changed()` or `wait_for(..)` to follow it. It is
    /// [`ConnectionState::Blocked`] while the broker blocks publishing.
    pub fn connection_state(&self) -> watch::Receiver<ConnectionState> {
        self.shared.supervisor.state()
    }

    /// The consuming connection's state, as a watch (consumers have a
    /// connection of their own, so a blocked publisher never stalls acks).
    pub fn consumer_connection_state(&self) -> watch::Receiver<ConnectionState> {
        self.shared.consuming.state()
    }

    /// Both connections' states now, and the broker's reason while it
    /// blocks publishing.
    ///
    /// ```no_run
    /// # async fn run(transport: switchboard::transport::amqp::AmqpTransport) {
    /// use switchboard::transport::amqp::ConnectionState;
    ///
    /// let health = transport.health();
    /// if health.publishing == ConnectionState::Blocked {
    ///     eprintln!("RabbitMQ blocks publishing: {:?}", health.blocked);
    /// }
    /// # }
    /// ```
    pub fn health(&self) -> AmqpHealth {
        AmqpHealth {
            publishing: *self.shared.supervisor.state().borrow(),
            consuming: *self.shared.consuming.state().borrow(),
            blocked: self.shared.supervisor.blocked(),
        }
    }

    /// The configuration.
    pub fn config(&self) -> &AmqpConfig {
        &self.shared.config
    }
}

#[async_trait]
impl Publisher for AmqpTransport {
    async fn publish(&self, topic: &str, message: RawMessage) -> Result<(), Error> {
        publisher::publish(&self.shared, topic, message).await
    }

    async fn publish_batch(&self, topic: &str, messages: Vec<RawMessage>) -> Result<(), Error> {
        publisher::publish_batch(&self.shared, topic, messages).await
    }
}

#[async_trait]
impl Subscriber for AmqpTransport {
    async fn subscribe(
        &self,
        topic: &str,
        options: SubscribeOptions,
    ) -> Result<Subscription, Error> {
        consumer::subscribe(&self.shared, topic, options).await
    }
}

#[async_trait]
impl Transport for AmqpTransport {
    fn name(&self) -> &'static str {
        NAME
    }

    /// Competing groups, persistent, ordered (one queue with one consumer
    /// delivers in publish order; a nack moves a message to the back and a
    /// redelivery after a lost connection comes out of order), redelivers
    /// what was never settled, nack and dead letters.
    fn capabilities(&self) -> Capabilities {
        Capabilities::new(DeliveryMode::Competing)
            .with_persistent(true)
            .with_ordered(true)
            .with_redelivers_unacked(true)
            .with_nack(true)
            .with_dead_letter(true)
    }

    async fn declare(&self, topology: &Topology) -> Result<(), Error> {
        topology.validate()?;
        for (topic, group) in topology.subscriptions() {
            self.shared.config.queue_name(topic, group)?;
        }
        let deadline = tokio::time::Instant::now() + self.shared.config.publish_timeout;
        let link = self.shared.supervisor.wait_link(deadline).await?;
        let declared = connection::declare_on(&self.shared.config, &link, topology);
        let guarded = self.shared.supervisor.guard(link.generation, declared);
        tokio::time::timeout_at(deadline, guarded)
            .await
            .unwrap_or_else(|_| {
                Err(Error::new(
                    ErrorKind::Timeout,
                    "amqp: the broker did not answer the declarations within the publish timeout",
                ))
            })
            .inspect_err(|error| self.shared.supervisor.failed(&link, error))?;
        // Only what the broker accepted is declared again on reconnects: a
        // refused queue would fail every later connection.
        for (topic, group) in topology.subscriptions() {
            self.shared.remember(topic, group);
        }
        Ok(())
    }

    fn dead_letters(&self) -> Result<&dyn DeadLetterQueue, Error> {
        Ok(self)
    }
}

impl fmt::Debug for AmqpTransport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AmqpTransport")
            .field("exchange", &self.shared.config.exchange)
            .field("queue_type", &self.shared.config.queue_type)
            .field("health", &self.health())
            .finish_non_exhaustive()
    }
}

// A poisoned lock only means another thread panicked while inserting into a
// plain set; the data is still usable.
pub(crate) fn lock<T>(lock: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    lock.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Without `amqp-tls` there is no TLS stack: say so instead of failing
    /// to connect later with a less helpful error.
    #[cfg(not(feature = "amqp-tls"))]
    #[test]
    fn tls_without_the_feature_is_a_config_error() {
        for config in [
            AmqpConfig::new("amqps://rabbit:5671/%2f"),
            AmqpConfig::default().with_tls_ca_pem("-----BEGIN CERTIFICATE-----"),
        ] {
            let error = config.validate().unwrap_err();
            assert_eq!(error.kind(), ErrorKind::Config);
            assert!(error.message().contains("amqp-tls"), "{error}");
        }
    }

    #[cfg(feature = "amqp-tls")]
    #[test]
    fn amqps_with_the_feature_is_valid_and_debug_hides_the_pem() {
        let config = AmqpConfig::new("amqps://rabbit:5671/%2f").with_tls_ca_pem("SECRET-PEM");
        config.validate().expect("valid");
        assert!(!format!("{config:?}").contains("SECRET-PEM"));
    }
}
