//! The Redis Streams transport (feature `redis-streams`): event notification
//! (strategy §1.2) with consumer groups and at-least-once delivery.
//!
//! Why Redis Streams: a stream keeps every entry until it is trimmed, each
//! consumer group keeps its own read position, and the group's *pending
//! entries list* (PEL) remembers what was handed to which consumer and how
//! often — exactly what ack, nack, redelivery after a crash and dead-lettering
//! need, with no extra bookkeeping of ours on the server.
//!
//! # On the wire
//!
//! One topic is one stream (key `<key_prefix><topic>`, or `{<key_prefix><topic>}`
//! with a hash tag for Redis Cluster). Each message is one `XADD` with the
//! fields
//!
//! | field | value |
//! |---|---|
//! | `envelope` | the body: the envelope JSON of strategy §5.1 |
//! | `event_type` | the `event-type` header (or the body's `event_type`) |
//! | `event_id` | the `event-id` header (or the body's `event_id`) |
//! | `h:<name>` | every other header |
//!
//! so `redis-cli XRANGE trade.executed - +` shows an operator what is in a
//! stream, and any program that `XADD`s an `envelope` field can publish to a
//! switchboard subscriber.
//!
//! # Delivery
//!
//! * A subscription reads with `XREADGROUP ... COUNT n BLOCK ms ... >` on a
//!   connection of its own: a blocking read would hold up every other command
//!   on a shared connection, and redis 1.x gives up on any reply after 500 ms
//!   by default, so this connection waits longer than the `BLOCK` time.
//!   Every other command goes over one shared connection that reconnects by
//!   itself ([`ConnectionManager`](redis::aio::ConnectionManager) or a
//!   cluster connection).
//! * `ack` is `XACK`: the acks of one subscription asked for while its
//!   previous ack batch was on its way go out together, as one script call
//!   holding one `XACK` of every id (each ack still returns once Redis has
//!   confirmed it; one with nothing on its way goes out at once). The
//!   consume loop lets as many settles wait as the prefetch allows, so with
//!   a fast handler a batch grows to what it finished in one round trip:
//!   three commands (`EVALSHA`, and the `XPENDING` and `XACK` it runs) per
//!   batch rather than per message.
//! * `nack(delay)` keeps the entry pending and waits out the delay in the
//!   subscription's own timer queue (one per subscription, not a task per
//!   nack); then the entry is read again under the same id — it is never
//!   re-added. [`Delivery::attempt`](crate::Delivery::attempt) rises with
//!   each nack; the entry's delivery counter in Redis does not, so it keeps
//!   counting only deliveries that ended without an outcome (what
//!   [`SubscribeOptions::max_deliveries`](crate::SubscribeOptions::max_deliveries)
//!   looks at).
//! * A subscription that stops, and a delivery dropped unsettled, hand their
//!   entries back at once (they mark them as idle for `claim_idle`), so the
//!   next `XAUTOCLAIM` of any member takes them. When a consumer dies, the
//!   live members of its group take its entries over with `XAUTOCLAIM` once
//!   they have been idle for [`RedisStreamsConfig::claim_idle`] (default
//!   30 s); that raises the delivery counter.
//! * A subscription starts by re-reading the entries still pending for its
//!   own consumer name (a restart with a stable
//!   [`consumer_name`](RedisStreamsConfig::consumer_name) picks up its own
//!   work at once), then claims idle entries, then reads new ones.
//! * `dead_letter` is one script: `XADD <stream>.dlq ...` and `XACK`
//!   together, so the entry is either in the dead-letter stream or still
//!   pending, never lost nor in both.
//! * `give_back` (an envelope of a major version this consumer does not
//!   know) is one script too: the entry stays pending, marked idle for
//!   `claim_idle` (`XCLAIM … IDLE`, its delivery counter kept), so the next
//!   `XAUTOCLAIM` of any member takes it — at most every
//!   [`claim_every`](RedisStreamsConfig::claim_every), never in a tight
//!   loop — while its permit is freed and its lease no longer renewed; how
//!   often and since when it was given back is kept in the hash
//!   `<stream>#given-back` (field `<group> <id>`, removed once a member
//!   settles it, the key's TTL renewed by each give-back), which a claim
//!   reads back into the delivery's headers.
//!
//! # Flow control: the prefetch bounds everything
//!
//! [`SubscribeOptions::prefetch`](crate::SubscribeOptions::prefetch) is the
//! most entries a subscription holds at once, wherever they are: read but not
//! yet handed out, claimed, recovered, in a handler, or nacked and waiting
//! out the delay. A read, a claim and a recovery ask Redis for no more
//! entries than the permits they took first, and a nacked entry keeps its
//! permit until it is handed out again — so while a dependency is down and
//! every message is nacked, the subscription holds `prefetch` entries and
//! does not walk the backlog. `XPENDING` for the group shows at most
//! `prefetch` entries per subscription.
//!
//! # Leases
//!
//! An entry stays pending for the consumer that holds it, and every
//! [`lease_every`](RedisStreamsConfig::lease_every) (a third of `claim_idle`
//! by default) the subscription renews the idle time of everything it
//! holds, so no other member takes over an entry whose handler is still
//! running, however slow. `XCLAIM` has no "only if it is mine" condition, so
//! a renewal is a script that looks each id up with
//! `XPENDING <stream> <group> <id> <id> 1 <me>` and claims (`JUSTID`) only
//! those still pending for this consumer, in one step. Acks and dead-letters
//! check ownership the same way: a consumer that stalled past `claim_idle`
//! and lost an entry to another member cannot acknowledge or dead-letter it
//! from under the new owner (its late settle fails with
//! [`ErrorKind::Rejected`](crate::ErrorKind::Rejected), and the new owner's
//! outcome is the one that counts).
//!
//! # Lag
//!
//! Each subscription samples its group's `lag` from `XINFO GROUPS` (Redis 7)
//! every [`lag_every`](RedisStreamsConfig::lag_every) into the
//! `switchboard_consumer_lag` gauge.
//!
//! # Dead letters
//!
//! A dead-letter entry in `<stream>.dlq` carries the message's fields plus
//! `topic`, `group`, `reason`, `attempts`, `last_error`, `dead_lettered_at`
//! and `source_id` (the original entry id), readable with `XRANGE` too. An
//! entry without an `envelope` field never reaches a handler: the subscription
//! dead-letters it itself, naming the fields it had. A redrive re-adds the
//! message to the stream under a new id, marked for the group that gave up;
//! the topic's other groups acknowledge it unseen. Redis cannot make an
//! acknowledged entry pending again, so that is the only way back; the cost
//! is one read and `XACK` per redriven message in every other group, and the
//! redriven message lands behind what the stream already holds.
//!
//! # Where a new group starts
//!
//! [`Transport::declare`] and `subscribe` create a missing group with
//! `XGROUP CREATE ... MKSTREAM`; a group that exists is left as it is
//! (`BUSYGROUP` is not an error). A new group starts at the **beginning** of
//! the stream (`0`) by default: nothing a publisher wrote before the group's
//! first subscriber started is lost, even when no one declared the topology.
//! The price is that a new group on a long-lived stream first reads the
//! history the stream still holds. [`GroupStart::End`] (`$`) gives the
//! opposite trade — only entries added after the group exists — and is then
//! only safe together with [`Transport::declare`] before the first publish.
//!
//! # Trimming
//!
//! Streams are not trimmed by default: every entry stays until deleted.
//! [`RedisStreamsConfig::with_max_len`] (or [`TrimPolicy::MaxLen`]) adds
//! `MAXLEN ~ n` to each `XADD`, which bounds memory but **can drop entries
//! no group has acknowledged yet**: Redis trims by length, not by what is
//! pending; [`TrimPolicy::MaxAge`] likewise trims by age. Both suit streams
//! read without a group. For streams read by groups,
//! [`TrimPolicy::KeepNeeded`] trims on a schedule below the oldest entry any
//! group still needs — its oldest pending entry (which covers nacked and
//! given-back entries) or the first it has not read (which covers redriven
//! ones) — and can lose only what a group stale past
//! [`KeepNeeded::stale_group_after`] had not acknowledged.
//! [`RedisStreamsConfig::with_dlq_max_len`] bounds the dead-letter stream,
//! evicting its oldest letter with a warning.
//!
//! # Scheduled messages
//!
//! [`Publisher::publish_at`](crate::Publisher::publish_at) keeps the whole
//! message (its stream fields, headers and body, behind a fresh id) as a
//! member of the sorted set `<stream key>#scheduled`, scored by its due time
//! in Unix milliseconds (rounded up), and names the topic in the set
//! `<key prefix>switchboard:scheduled`. Every transport runs a **mover**:
//! each [`schedule_tick`](RedisStreamsConfig::schedule_tick) (100 ms) it
//! runs, per topic in that set, one Lua script that takes up to
//! [`schedule_batch`](RedisStreamsConfig::schedule_batch) members due by the
//! *server's* clock (`ZRANGEBYSCORE … LIMIT`) and `XADD`s and `ZREM`s each;
//! a full batch is followed by the next, up to 10 per tick. Scripts run
//! atomically, so with several movers each member is moved exactly once,
//! and nothing waits in a process: a transport dropped after scheduling
//! loses nothing, the next one's mover delivers. A scheduled message is
//! never early and late by at most one tick plus the script's round trip
//! (checked by `cargo test --all-features --test redis_streams scheduled`).
//! It survives a restart of Redis as the streams do (see below).
//!
//! # Persistence
//!
//! [`Capabilities::persistent`] is true only when the server runs with AOF
//! (`CONFIG GET appendonly` is `yes` and `appendfsync` is `always` or
//! `everysec`), read once at connect. With `appendfsync always` an entry whose
//! `XADD` returned survives a crash of the server; `everysec` may lose the
//! last second when the machine (not just Redis) fails.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex, PoisonError};

use async_trait::async_trait;

use super::{
    Capabilities, DeadLetterQueue, DeliveryMode, Lifecycle, RawMessage, Transport, TransportHealth,
    validate_name,
};
use crate::error::Error;
use crate::topology::Topology;

mod acker;
mod config;
mod connection;
mod consumer;
mod dlq;
mod fields;
mod ids;
mod latest;
mod lease;
mod lifecycle;
mod publisher;
mod reply;
mod schedule;
mod scripts;
mod trim;
mod xinfo;

pub use config::RedisStreamsConfig;
use connection::{Conn, Connector, ensure_group};
pub use schedule::{SCHEDULED_INDEX, SCHEDULED_SUFFIX};
pub use trim::{KeepNeeded, TrimPolicy, TrimReport};

const NAME: &str = "redis-streams";

/// Stream entry field holding the body (the envelope JSON).
pub const FIELD_ENVELOPE: &str = "envelope";
/// Stream entry field holding the `event-id` header.
pub const FIELD_EVENT_ID: &str = "event_id";
/// Stream entry field holding the `event-type` header.
pub const FIELD_EVENT_TYPE: &str = "event_type";
/// Prefix of the stream entry fields holding the other headers.
pub const HEADER_FIELD_PREFIX: &str = "h:";
/// Set on an entry re-added by a redrive: only this group handles it; every
/// other group acknowledges it unseen.
pub const FIELD_REDRIVE_GROUP: &str = "redrive_group";
/// Suffix of a stream's dead-letter stream key.
pub const DLQ_SUFFIX: &str = ".dlq";

/// Where a consumer group created by this transport starts reading.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum GroupStart {
    /// At the first entry the stream holds (`0`): nothing published before
    /// the group existed is missed. The default.
    #[default]
    Beginning,
    /// After the last entry (`$`): only entries added once the group exists.
    End,
}

impl GroupStart {
    fn id(self) -> &'static str {
        match self {
            Self::Beginning => "0",
            Self::End => "$",
        }
    }
}

/// The Redis Streams transport. Clones share the connection.
///
/// ```
/// # async fn run() -> Result<(), switchboard::Error> {
/// use switchboard::transport::redis_streams::RedisStreamsTransport;
/// use switchboard::{Publisher, RawMessage, SubscribeOptions, Subscriber, Topology, Transport};
///
/// let transport = RedisStreamsTransport::connect("redis://127.0.0.1:6379").await?;
/// transport.declare(&Topology::new().with_groups("price.updated", ["game"])).await?;
/// transport.publish("price.updated", RawMessage::new(r#"{"symbol":"AAPL"}"#)).await?;
///
/// let mut subscription = transport.subscribe("price.updated", SubscribeOptions::new("game")).await?;
/// let delivery = subscription.recv().await.expect("a message");
/// delivery.ack().await?;
/// subscription.shutdown().await?;
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct RedisStreamsTransport {
    inner: Arc<Inner>,
}

struct Inner {
    commands: Conn,
    /// What the last command said of Redis, for `health()`.
    seen: Arc<crate::transport::redis_support::LastOutcome>,
    connector: Connector,
    config: RedisStreamsConfig,
    hash_tag: bool,
    persistent: bool,
    /// Subscriptions so far per (topic, group), for consumer names.
    consumers: Mutex<HashMap<(String, String), u64>>,
    /// Scheduled trims per topic; dropping the transport stops them.
    trimmers: trim::Trimmers,
    /// Moves due scheduled messages into their streams; stopped on close
    /// and when the transport is dropped.
    mover: schedule::Mover,
    /// Closing: refuses new work, ends the subscriptions.
    lifecycle: Lifecycle,
}

impl RedisStreamsTransport {
    /// The settings in use.
    pub fn config(&self) -> &RedisStreamsConfig {
        &self.inner.config
    }

    /// The stream key of `topic`: what to give `redis-cli XRANGE`.
    ///
    /// ```
    /// # async fn run() -> Result<(), switchboard::Error> {
    /// use switchboard::transport::redis_streams::RedisStreamsTransport;
    /// let transport = RedisStreamsTransport::connect("redis://127.0.0.1:6379").await?;
    /// assert_eq!(transport.stream_key("trade.executed"), "trade.executed");
    /// assert_eq!(transport.dead_letter_key("trade.executed"), "trade.executed.dlq");
    /// # Ok(())
    /// # }
    /// ```
    pub fn stream_key(&self, topic: &str) -> String {
        let prefix = &self.inner.config.key_prefix;
        if self.inner.hash_tag {
            format!("{{{prefix}{topic}}}")
        } else {
            format!("{prefix}{topic}")
        }
    }

    /// The dead-letter stream key of `topic`: `<stream key>.dlq`.
    pub fn dead_letter_key(&self, topic: &str) -> String {
        format!("{}{DLQ_SUFFIX}", self.stream_key(topic))
    }

    fn conn(&self) -> Conn {
        self.inner.commands.clone()
    }

    async fn ensure_group(&self, stream: &str, group: &str) -> Result<(), Error> {
        ensure_group(self.conn(), stream, group, self.inner.config.group_start).await
    }

    fn consumer_name(&self, topic: &str, group: &str) -> String {
        let mut consumers = lock(&self.inner.consumers);
        let n = consumers
            .entry((topic.to_owned(), group.to_owned()))
            .or_insert(0);
        *n += 1;
        format!("{}-{n}", self.inner.config.consumer_name)
    }
}

#[async_trait]
impl Transport for RedisStreamsTransport {
    fn name(&self) -> &'static str {
        NAME
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities::new(DeliveryMode::Competing)
            .with_persistent(self.inner.persistent)
            .with_ordered(true)
            .with_redelivers_unacked(true)
            .with_nack(true)
            .with_dead_letter(true)
            .with_scheduled(true)
    }

    async fn declare(&self, topology: &Topology) -> Result<(), Error> {
        self.inner.lifecycle.check()?;
        topology.validate()?;
        for (topic, group) in topology.subscriptions() {
            self.ensure_group(&self.stream_key(topic), group).await?;
            self.ensure_trimmer(topic);
        }
        Ok(())
    }

    fn dead_letters(&self) -> Result<&dyn DeadLetterQueue, Error> {
        Ok(self)
    }

    /// Ends the subscriptions (each unblocks its read and gives back what
    /// it read ahead), waits for them, and stops the scheduled trims.
    async fn close(&self) -> Result<(), Error> {
        self.close_all().await
    }

    /// Up, or down while the last command (a publish, a read, an ack, a
    /// lease renewal) failed to reach Redis, with its error as the reason;
    /// closed once closed. The connections reconnect by themselves, and
    /// the next command that gets through makes it up again.
    fn health(&self) -> TransportHealth {
        self.inner.seen.health(&self.inner.lifecycle)
    }

    /// The group's `lag` from `XINFO GROUPS` (Redis 7; `None` from older
    /// servers, or when Redis cannot tell after a deletion).
    async fn group_lag(&self, topic: &str, group: &str) -> Result<Option<u64>, Error> {
        self.inner.lifecycle.check()?;
        validate_name("topic", topic)?;
        lease::group_lag(self.conn(), &self.stream_key(topic), group).await
    }

    /// The stream's newest entry that is not a redriven copy (`XREVRANGE`
    /// of the last few entries); no group reads or acknowledges it.
    async fn read_latest(&self, topic: &str) -> Result<Option<RawMessage>, Error> {
        self.inner.lifecycle.check()?;
        validate_name("topic", topic)?;
        latest::read_latest(self.conn(), &self.stream_key(topic)).await
    }

    /// [`RedisStreamsTransport::delete_namespace`].
    async fn purge_namespace(&self, namespace: &str) -> Result<usize, Error> {
        self.delete_namespace(namespace).await
    }
}

impl fmt::Debug for RedisStreamsTransport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mode = match self.inner.connector {
            Connector::Single(_) => "single",
            Connector::Cluster(_) => "cluster",
        };
        f.debug_struct("RedisStreamsTransport")
            .field("mode", &mode)
            .field("persistent", &self.inner.persistent)
            .field("config", &self.inner.config)
            .finish_non_exhaustive()
    }
}

// A poisoned lock only means another thread panicked mid-update of a plain
// map or slot; the data is still usable.
fn lock<T>(lock: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    lock.lock().unwrap_or_else(PoisonError::into_inner)
}
