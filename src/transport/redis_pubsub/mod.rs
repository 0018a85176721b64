//! Redis Pub/Sub: broadcast to whoever is listening right now, at most once
//! (strategy §1.2, "broadcast").
//!
//! Pub/Sub is the cheapest way to tell every live instance something — a
//! price tick, a cache invalidation — and it keeps nothing: a message
//! published while a subscriber is disconnected is gone for that subscriber.
//! So this transport claims [`DeliveryMode::Broadcast`], not persistent, no
//! redelivery, and neither `nack` nor dead letters: those fail with
//! [`ErrorKind::Unsupported`] instead of pretending. Use Redis Streams or
//! RabbitMQ for anything that must not be lost.
//!
//! # Connections
//!
//! * Publishing goes through one [`ConnectionManager`], which reconnects by
//!   itself; `publish_batch` pipelines its PUBLISHes in one round trip.
//! * Each subscription owns one RESP3 connection whose server pushes arrive
//!   through a push sender, named with `CLIENT SETNAME` so an operator finds
//!   it in `CLIENT LIST`. [`Subscriber::subscribe`] returns only after Redis
//!   confirmed the SUBSCRIBE, so a message published after it returns is
//!   received.
//! * When that connection is lost, the subscription reconnects by itself
//!   (exponential backoff with jitter, through `backon`), subscribes again
//!   and reports each step in a [`ConnectionStatus`]. Messages published
//!   while it was away are lost — that is Pub/Sub.
//! * Silence is checked: a subscription that heard nothing for
//!   [`RedisPubSubOptions::with_ping`]'s interval (5 s) sends `PING`, and
//!   one whose answer does not come within the ping timeout (2 s) is taken
//!   for half-open — a hung peer or a dropped route never closes the
//!   socket — and replaced as a lost one is.
//! * A subscription that is shut down or dropped sends (P)UNSUBSCRIBE before
//!   closing its connection, so once [`Subscription::shutdown`] returns Redis
//!   no longer counts it as a receiver.
//! * Subscriptions speak RESP3 (`HELLO 3`), so the server must be Redis 6 or
//!   newer.
//! * The response timeout of both connections is configurable and 5 s by
//!   default (redis 1.x would give up after 500 ms).
//!
//! # Patterns
//!
//! [`RedisPubSubTransport::subscribe_to`] with [`Channels::Pattern`] (or the
//! shortcut [`RedisPubSubTransport::psubscribe`]) uses `PSUBSCRIBE`: one
//! subscription receives every channel matching a glob such as `price.*`, and
//! each [`Delivery::topic`] is the channel the message was published to.
//!
//! # Wire format
//!
//! A message without headers is published as its body alone, so any Redis
//! client sees exactly the bytes (a strategy §5.1 JSON envelope, for the typed
//! bus). A message with headers is framed, in one of two versions:
//!
//! ```text
//! \0 S B 1 | header length: u32 | headers: JSON object of strings | body
//! \0 S B 2 | count: u16 | (name length: u16 | name | value length: u32 | value) × count | body
//! ```
//!
//! (lengths big-endian, names and values UTF-8). Version 2 spares the JSON
//! encoding and decoding of the headers of every message. Readers take both;
//! writers write [`FrameVersion::V1`] unless
//! [`RedisPubSubOptions::with_frame_version`] says `V2`. In a rolling
//! deploy, switch writers to `V2` only once every subscriber runs a release
//! that reads it (this one or later): an older reader would take a
//! version 2 frame whole as the body. The next release writes `V2` by
//! default.
//!
//! A NUL byte never starts a JSON document, so on receipt a payload that
//! starts with a frame's magic is unframed and anything else — for example a
//! strategy §5.1 envelope published with `redis-cli PUBLISH` — is taken whole as
//! the body, with no headers (a headerless body that starts with `\0SB` is
//! framed, so it is never mistaken for a frame). [`encode_payload_with`] and
//! [`decode_payload`] are the two directions.
//!
//! # Back-pressure
//!
//! Pub/Sub has no flow control: Redis writes every message to every
//! subscriber as it is published, and a subscriber that reads too slowly
//! lets the server's output buffer grow until `client-output-buffer-limit
//! pubsub` disconnects it — losing everything buffered, uncounted, and
//! everything published until it is back. So the connection's read loop
//! never waits for the consumer: each push goes straight from the socket
//! into the subscription's **bounded inbox**, and when the inbox is full the
//! subscription's [`DropPolicy`] decides there and then which message goes
//! ([`DropPolicy::DropOldest`] by default, keeping the freshest news;
//! [`DropPolicy::DropNewest`] keeps what arrived first).
//!
//! * The inbox holds [`RedisPubSubOptions::with_inbox_capacity`] messages
//!   (1024 by default) on top of the `prefetch` deliveries handed out and not
//!   yet settled, so a subscription's memory is bounded whatever the
//!   publishers do.
//! * Every dropped message is counted in [`ConnectionStatus::dropped`] and in
//!   the metric [`switchboard_dropped_total`](crate::observe::metrics::DROPPED_TOTAL)
//!   (labels `transport="redis-pubsub"`, `topic` = the subscribed topic or
//!   pattern, `reason="inbox_full"`).
//! * The inbox bounds memory, not the socket: a process too starved of CPU
//!   to even read and parse messages as fast as Redis writes them is still
//!   cut off by the server, and reconnects.
//!
//! [`Delivery::topic`]: crate::Delivery::topic
//! [`ErrorKind::Unsupported`]: crate::ErrorKind::Unsupported
//! [`Subscriber::subscribe`]: crate::Subscriber::subscribe
//! [`Subscription::shutdown`]: crate::Subscription::shutdown

use std::fmt;
use std::sync::Arc;

use async_trait::async_trait;
use redis::aio::ConnectionManager;

use super::{Capabilities, DeliveryMode, Lifecycle, Transport, TransportHealth};
use crate::error::Error;
use crate::topology::Topology;

mod config;
mod connection;
mod consumer;
mod frame;
mod inbox;
mod publisher;

pub use config::{Channels, DropPolicy, RedisPubSubOptions};
pub use connection::{ConnectionState, ConnectionStatus};
pub use frame::{
    FRAME_MAGIC, FRAME_MAGIC_V2, FrameVersion, decode_payload, encode_payload, encode_payload_with,
};

const NAME: &str = "redis-pubsub";

/// Broadcast over Redis Pub/Sub. Clones share the publishing connection.
///
/// Needs a Redis at 127.0.0.1:6379:
///
/// ```
/// use switchboard::{Publisher, RawMessage, RedisPubSubTransport, SubscribeOptions, Subscriber};
///
/// # tokio::runtime::Runtime::new().unwrap().block_on(async {
/// # let topic = format!("doc.price.{}", uuid::Uuid::new_v4().simple());
/// # let topic = topic.as_str(); // "price.updated" in a real service
/// let transport = RedisPubSubTransport::connect("redis://127.0.0.1:6379").await?;
/// let mut prices = transport.subscribe(topic, SubscribeOptions::new("game")).await?;
/// transport.publish(topic, RawMessage::new("AAPL 150.00")).await?;
///
/// let delivery = prices.recv().await.expect("a message");
/// assert_eq!(delivery.body().as_ref(), b"AAPL 150.00");
/// delivery.ack().await?;
/// # Ok::<(), switchboard::Error>(())
/// # }).unwrap();
/// ```
#[derive(Clone)]
pub struct RedisPubSubTransport {
    inner: Arc<Inner>,
}

struct Inner {
    client: redis::Client,
    publisher: ConnectionManager,
    /// What the last publish said of Redis, for `health()`.
    seen: crate::transport::redis_support::LastOutcome,
    options: RedisPubSubOptions,
    /// Closing: refuses new work, ends the subscriptions.
    lifecycle: Lifecycle,
}

#[async_trait]
impl Transport for RedisPubSubTransport {
    fn name(&self) -> &'static str {
        NAME
    }

    fn capabilities(&self) -> Capabilities {
        // One publisher's messages reach a subscriber in publish order; what
        // a subscriber misses while disconnected is never delivered.
        Capabilities::new(DeliveryMode::Broadcast).with_ordered(true)
    }

    /// Checks the topology; Pub/Sub has nothing to create and keeps no
    /// message for a subscriber that has not started yet.
    async fn declare(&self, topology: &Topology) -> Result<(), Error> {
        self.inner.lifecycle.check()?;
        topology.validate()
    }

    /// Ends the subscriptions (each stops its listener and its connection)
    /// and waits for them; the publishing connection goes with the last
    /// clone of the transport.
    async fn close(&self) -> Result<(), Error> {
        self.inner.lifecycle.close(|_| async {}).await
    }

    /// Up, or down while the last publish failed to reach Redis (with its
    /// error as the reason), closed once closed; each subscription's own
    /// connection is in its [`ConnectionStatus`]
    /// ([`RedisPubSubTransport::subscribe_to`]).
    fn health(&self) -> TransportHealth {
        self.inner.seen.health(&self.inner.lifecycle)
    }
}

impl fmt::Debug for RedisPubSubTransport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisPubSubTransport")
            .field("addr", self.inner.client.get_connection_info().addr())
            .field("options", &self.inner.options)
            .finish_non_exhaustive()
    }
}
