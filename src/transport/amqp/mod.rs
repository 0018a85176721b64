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
//!   queue is bound for the topic, is an error — unless the publisher chose
//!   [`Unroutable::Discard`] ([`AmqpConfig::unroutable`]), for topics where a
//!   message nobody subscribed to yet is worth nothing. Each publish uses a channel
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
//!   blocks publishing; [`AmqpTransport::connection_health`] gives both connections and
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
//! * **Several nodes.** [`AmqpConfig::new_cluster`] or
//!   [`AmqpConfig::with_nodes`] list a cluster's nodes: each connection goes
//!   to the first that answers, and after a loss the next round of attempts
//!   starts at the node after the lost one, so both connections move to a
//!   survivor, declare again there and consumers resume.
//!   [`AmqpHealth::publishing_node`] and [`AmqpHealth::consuming_node`] name
//!   the node in use (`host:port`).
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
//! default). When the subscription stops with some of the delay still to
//! wait, the copy goes through the [delay buckets](#scheduled-messages) of
//! scheduled messages instead, addressed to its **one group's queue** (a
//! scheduled publish goes through the topic exchange to every group), so a
//! consumer restarting meanwhile does not get it early. A connection lost
//! during the delay gives it back to the broker at once (delivered again
//! early, never lost); the copy held here is then dropped, not handed out.
//!
//! Why not a broker-side delay queue (a TTL queue dead-lettering back): the
//! message would leave the consumer's prefetch, so the consumer would pull,
//! nack and park the whole backlog at broker speed; and without a plugin
//! RabbitMQ expires only the head of a queue, so one queue cannot hold
//! several delays. Scheduled publishing, where no consumer holds anything,
//! is a different problem, solved with buckets below.
//!
//! # Scheduled messages
//!
//! [`Publisher::publish_at`] needs no plugin. A message waits in a ladder of
//! **delay buckets**: durable quorum queues `<exchange>.delay.<ttl>ms`, each
//! with one `x-message-ttl` for all its messages (RabbitMQ expires only a
//! queue's head, so a queue of one TTL expires in order), TTLs of
//! [`BUCKET_UNIT`] (10 ms) × 2^k up to about 15.5 days, dead-lettering
//! **at least once** (`x-dead-letter-strategy = at-least-once`,
//! `x-overflow = reject-publish`) to `<exchange>.delay.due`
//! ([`AmqpConfig::due_queue`]). Every transport runs a **mover** that
//! consumes the due queue on its consuming connection: a message whose time
//! has not come goes into the largest bucket that does not overshoot what is
//! left (rounded up to 10 ms), one whose time has come is published through
//! the topic exchange with its topic as routing key — so every group bound
//! to the topic gets it, as with [`Publisher::publish`] — and each is acked
//! only once the broker confirmed the copy. So an arbitrary time takes one
//! hop per binary digit of the delay in 10 ms units (1.5 s: 4 hops; a day:
//! at most 23), never a queue per distinct delay; several movers compete
//! for the due queue without duplicating work; and everything waits in
//! durable queues, so closing or restarting every service loses nothing
//! (at least once: a mover that dies between the confirm and the ack
//! leaves a copy to be sent again; `cargo test --all-features --test amqp
//! schedule` closes a transport after scheduling and connects a new one).
//!
//! A crash of the broker (its process killed, the node restarted on its
//! data) loses nothing either, **provided the buckets existed a few seconds
//! before it**: declare them at start-up with
//! [`AmqpTransport::declare_delay_buckets`]. Why: RabbitMQ (seen on
//! 3.10.8) keeps a new quorum queue's name in a disk-table write cache for
//! up to about 3 s; a node killed within that window comes back with the
//! queue's member unregistered, and restarts it as a new, empty member that
//! never elects a leader — its messages are gone and it confirms no publish
//! again (`rabbitmq-queues quorum_status` shows a follower at term 0). A
//! bucket first declared just before the crash, by a scheduled publish,
//! loses what it held; one declared earlier keeps everything. The same
//! holds for any quorum queue, the groups' own with [`QueueType::Quorum`]:
//! declare at start-up, and delete and declare again a queue left in that
//! state. `cargo test --all-features --test amqp_liveness
//! scheduled_messages_survive_a_killed_node` declares the buckets, kills a
//! private node with SIGKILL while 30 scheduled messages wait, and gets
//! every one after the restart, none early (it runs in `scripts/chaos`).
//!
//! A scheduled message is never early by the movers' clocks (keep them in
//! sync, as with NTP), and late by tens of milliseconds per hop (a bucket's
//! expiry, a confirmed publish) plus at most 10 ms of rounding: 59–156 ms
//! for delays up to 1.5 s here (`cargo test --all-features --test amqp
//! scheduled_messages_arrive -- --nocapture` prints it; the conformance
//! tolerance is 3 s). Each hop of each message is one confirmed publish, so
//! a burst of messages due together queues behind the movers (each sends up
//! to 64 at once) and the broker: run more movers (services) for more. Buckets and the due queue
//! are new names declared on first use: no existing queue gets an argument
//! (RabbitMQ refuses a changed argument with `PRECONDITION_FAILED`). With
//! [`AmqpConfig::queue_expires`] set, the due queue expires like the
//! groups' queues once no transport consumes it, and each bucket no sooner
//! than twice its TTL after its last use. A message that comes due for a
//! topic no queue is bound to any more is dropped with an error log and the
//! `switchboard_dropped_total` counter (reason `unroutable`).
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

use async_trait::async_trait;
use tokio::sync::watch;

use super::{
    Capabilities, DeadLetterQueue, DeliveryMode, Lifecycle, Publisher, RawMessage,
    SubscribeOptions, Subscriber, Subscription, Transport, TransportHealth,
};
use crate::error::{Error, ErrorKind};
use crate::topology::Topology;

mod ack_batch;
mod acker;
mod close;
mod config;
mod connection;
mod consumer;
mod declare;
mod dlq;
mod error;
mod lag;
mod mover;
mod open;
mod properties;
mod publisher;
mod schedule;

pub use acker::HOLD_LIMIT;
pub use config::{AmqpConfig, QueueType, Unroutable};
pub use connection::ConnectionState;
use connection::{Role, Supervisor};
pub use schedule::BUCKET_UNIT;

const NAME: &str = "amqp";

pub(crate) const DLQ_SUFFIX: &str = ".dlq";

/// What [`AmqpTransport::connection_health`] reports.
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
    /// The node (`host:port`, no credentials) the publishing connection
    /// goes to; `None` while it reconnects.
    pub publishing_node: Option<String>,
    /// The node (`host:port`) the consuming connection goes to; `None`
    /// while it reconnects.
    pub consuming_node: Option<String>,
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
    /// Closing: refuses new work, ends the subscriptions, stops the
    /// supervisors.
    pub(crate) lifecycle: Lifecycle,
    /// Scheduled messages: the delay buckets declared, and the mover.
    pub(crate) scheduled: schedule::Scheduled,
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
            lifecycle: Lifecycle::new(NAME),
            scheduled: schedule::Scheduled::default(),
        });
        connection::start(&shared).await?;
        schedule::start_mover(&shared);
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

    /// Both connections' states and nodes now, and the broker's reason
    /// while it blocks publishing.
    ///
    /// ```no_run
    /// # async fn run(transport: switchboard::transport::amqp::AmqpTransport) {
    /// use switchboard::transport::amqp::ConnectionState;
    ///
    /// let health = transport.connection_health();
    /// if health.publishing == ConnectionState::Blocked {
    ///     eprintln!("RabbitMQ blocks publishing: {:?}", health.blocked);
    /// }
    /// println!("publishing through {:?}", health.publishing_node);
    /// # }
    /// ```
    ///
    /// [`Transport::health`] sums it up in the shape every transport
    /// shares.
    pub fn connection_health(&self) -> AmqpHealth {
        AmqpHealth {
            publishing: *self.shared.supervisor.state().borrow(),
            consuming: *self.shared.consuming.state().borrow(),
            blocked: self.shared.supervisor.blocked(),
            publishing_node: self.shared.supervisor.node(),
            consuming_node: self.shared.consuming.node(),
        }
    }

    /// The configuration.
    pub fn config(&self) -> &AmqpConfig {
        &self.shared.config
    }

    /// Declares, ahead of any scheduled publish, the due queue and every
    /// delay bucket a delay of up to `longest` passes through (13 buckets for
    /// a minute, 24 for a day, 28 at most),
    /// so that no bucket is new while messages wait in it. Call it at
    /// start-up, next to [`Transport::declare`], in services that schedule
    /// (see [scheduled messages](self#scheduled-messages) for why a bucket
    /// created moments before a broker crash loses what it holds); without
    /// it each bucket is declared on first use. Each bucket is a quorum
    /// queue, declared once per connection; declaring one that exists with
    /// the same arguments changes nothing.
    ///
    /// ```no_run
    /// # async fn run(transport: switchboard::transport::amqp::AmqpTransport) -> Result<(), switchboard::Error> {
    /// use std::time::Duration;
    ///
    /// // Orders may be scheduled up to a week ahead.
    /// transport.declare_delay_buckets(Duration::from_secs(7 * 86_400)).await?;
    /// # Ok(()) }
    /// ```
    pub async fn declare_delay_buckets(&self, longest: std::time::Duration) -> Result<(), Error> {
        self.shared.lifecycle.check()?;
        schedule::declare_buckets(&self.shared, longest).await
    }
}

#[async_trait]
impl Publisher for AmqpTransport {
    async fn publish(&self, topic: &str, message: RawMessage) -> Result<(), Error> {
        self.shared.lifecycle.check()?;
        publisher::publish(&self.shared, topic, message).await
    }

    async fn publish_batch(&self, topic: &str, messages: Vec<RawMessage>) -> Result<(), Error> {
        self.shared.lifecycle.check()?;
        publisher::publish_batch(&self.shared, topic, messages).await
    }

    /// Into the delay bucket for the time left, confirmed; a mover sends it
    /// through the topic exchange when due (see
    /// [scheduled messages](self#scheduled-messages)).
    async fn publish_at(
        &self,
        topic: &str,
        message: RawMessage,
        at: chrono::DateTime<chrono::Utc>,
    ) -> Result<(), Error> {
        self.shared.lifecycle.check()?;
        schedule::publish_at(&self.shared, topic, message, at).await
    }
}

#[async_trait]
impl Subscriber for AmqpTransport {
    async fn subscribe(
        &self,
        topic: &str,
        options: SubscribeOptions,
    ) -> Result<Subscription, Error> {
        self.shared.lifecycle.check()?;
        let subscription = consumer::subscribe(&self.shared, topic, options).await?;
        Ok(self.shared.lifecycle.track(subscription))
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
            .with_scheduled(true)
    }

    async fn declare(&self, topology: &Topology) -> Result<(), Error> {
        self.shared.lifecycle.check()?;
        topology.validate()?;
        for (topic, group) in topology.subscriptions() {
            self.shared.config.queue_name(topic, group)?;
        }
        let deadline = tokio::time::Instant::now() + self.shared.config.publish_timeout;
        let link = self.shared.supervisor.wait_link(deadline).await?;
        let declared = declare::declare_on(&self.shared.config, &link, topology);
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

    /// Stops the mover of scheduled messages, ends the subscriptions (each
    /// cancels its consumer, waits for what it handed out and closes its
    /// channel), stops both supervisors and
    /// closes both connections with `connection.close(200)`.
    async fn close(&self) -> Result<(), Error> {
        self.shared.scheduled.stop_and_close().await;
        let shared = self.shared.clone();
        self.shared
            .lifecycle
            .close(|deadline| close::close_connections(shared, deadline))
            .await
    }

    /// The ready messages in the group's queue (a passive declare).
    async fn group_lag(&self, topic: &str, group: &str) -> Result<Option<u64>, Error> {
        lag::group_lag(&self.shared, topic, group).await
    }

    fn health(&self) -> TransportHealth {
        if self.shared.lifecycle.is_closed() {
            return TransportHealth::closed(NAME);
        }
        close::summarise(&self.connection_health())
    }

    /// Deletes the queues declared or subscribed under `<namespace>.` by
    /// this transport, with their dead-letter queues (RabbitMQ cannot list
    /// queues over AMQP, so queues only another process declared stay).
    async fn purge_namespace(&self, namespace: &str) -> Result<usize, Error> {
        self.shared.lifecycle.check()?;
        close::purge_namespace(&self.shared, namespace).await
    }
}

impl fmt::Debug for AmqpTransport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AmqpTransport")
            .field("exchange", &self.shared.config.exchange)
            .field("queue_type", &self.shared.config.queue_type)
            .field("health", &self.connection_health())
            .finish_non_exhaustive()
    }
}

// A poisoned lock only means another thread panicked while inserting into a
// plain set; the data is still usable.
pub(crate) fn lock<T>(lock: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    lock.lock().unwrap_or_else(PoisonError::into_inner)
}
