//! Redis Pub/Sub: broadcast to whoever is listening right now, at most once
//! (SPEC §1.2, "broadcast").
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
//! client sees exactly the bytes (a SPEC §5.1 JSON envelope, for the typed
//! bus). A message with headers is framed:
//!
//! ```text
//! \0 S B 1 | header length: u32, big-endian | headers: JSON object of strings | body
//! ```
//!
//! A NUL byte never starts a JSON document, so on receipt a payload that
//! starts with [`FRAME_MAGIC`] is unframed and anything else — for example a
//! SPEC §5.1 envelope published with `redis-cli PUBLISH` — is taken whole as
//! the body, with no headers. [`encode_payload`] and [`decode_payload`] are
//! the two directions.
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

use std::collections::VecDeque;
use std::convert::Infallible;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use backon::{BackoffBuilder, ExponentialBuilder};
use bytes::Bytes;
use redis::aio::{ConnectionManager, ConnectionManagerConfig, MultiplexedConnection};
use redis::{
    AsyncConnectionConfig, IntoConnectionInfo, ProtocolVersion, PushInfo, PushKind, Value,
};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, watch};
use uuid::Uuid;

use super::{
    Acker, Capabilities, DeadLetter, Delivery, DeliveryMode, Publisher, RawMessage,
    SubscribeOptions, Subscriber, Subscription, Transport, validate_name,
};
use crate::envelope::Headers;
use crate::error::{Error, ErrorKind};
use crate::observe::metrics;
use crate::topology::Topology;
use crate::transport::redis_error::redis_error;

const NAME: &str = "redis-pubsub";

/// The first bytes of a framed payload (see the [module docs](self)).
pub const FRAME_MAGIC: &[u8; 4] = b"\0SB1";

/// Which message a subscription drops when its inbox is full (see
/// [Back-pressure](self#back-pressure)).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum DropPolicy {
    /// Drop the oldest message waiting in the inbox to make room for the one
    /// that just arrived: consumers see the latest state (the default).
    #[default]
    DropOldest,
    /// Drop the message that just arrived: consumers see what arrived first.
    DropNewest,
}

/// Settings of a [`RedisPubSubTransport`].
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
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RedisPubSubOptions {
    response_timeout: Duration,
    connection_timeout: Duration,
    reconnect_min_delay: Duration,
    reconnect_max_delay: Duration,
    client_name_prefix: String,
    inbox_capacity: usize,
    drop_policy: DropPolicy,
}

impl Default for RedisPubSubOptions {
    fn default() -> Self {
        Self {
            response_timeout: Duration::from_secs(5),
            connection_timeout: Duration::from_secs(5),
            reconnect_min_delay: Duration::from_millis(50),
            reconnect_max_delay: Duration::from_secs(5),
            client_name_prefix: "switchboard-pubsub".to_owned(),
            inbox_capacity: 1024,
            drop_policy: DropPolicy::DropOldest,
        }
    }
}

impl RedisPubSubOptions {
    /// How long a command (PUBLISH, SUBSCRIBE) may wait for its reply
    /// (default 5 s).
    pub fn with_response_timeout(mut self, timeout: Duration) -> Self {
        self.response_timeout = timeout;
        self
    }

    /// How long opening a connection may take (default 5 s).
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
    /// at least 1, or [`RedisPubSubTransport::connect_with`] fails with
    /// [`ErrorKind::Config`]).
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
/// delivery.ack().await.map_err(|(error, _)| error)?;
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
    options: RedisPubSubOptions,
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
    fn validate(&self) -> Result<(), Error> {
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

    fn name(&self) -> &str {
        match self {
            Self::Topic(name) | Self::Pattern(name) => name,
        }
    }
}

/// Where a subscription's connection stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ConnectionState {
    /// Redis confirmed the subscription on the subscription's
    /// `connection`-th connection (1 for the first; it rises by one with
    /// each reconnection).
    Subscribed {
        /// How many connections this subscription has had.
        connection: u64,
    },
    /// The connection was lost; this is the `attempt`-th try to reconnect
    /// and subscribe again.
    Reconnecting {
        /// Attempts so far, 1 for the first.
        attempt: u32,
    },
    /// The subscription was dropped or shut down; nothing more will arrive.
    Closed,
}

/// A live view of one subscription: its connection, for health checks and
/// for waiting until a lost connection is back, and how many messages its
/// full inbox dropped.
#[derive(Debug, Clone)]
pub struct ConnectionStatus {
    client_name: Arc<str>,
    state: watch::Receiver<ConnectionState>,
    dropped: Arc<AtomicU64>,
}

impl ConnectionStatus {
    /// The name the connection gives itself with `CLIENT SETNAME` (the same
    /// on every reconnection), as `CLIENT LIST` shows it.
    pub fn client_name(&self) -> &str {
        &self.client_name
    }

    /// The state right now.
    pub fn current(&self) -> ConnectionState {
        *self.state.borrow()
    }

    /// How many messages the subscription dropped so far because its inbox
    /// was full (see [Back-pressure](self#back-pressure)); it only grows.
    ///
    /// Needs a Redis at 127.0.0.1:6379:
    ///
    /// ```
    /// use switchboard::transport::redis_pubsub::{Channels, RedisPubSubOptions};
    /// use switchboard::{Publisher, RawMessage, RedisPubSubTransport, SubscribeOptions};
    ///
    /// # tokio::runtime::Runtime::new().unwrap().block_on(async {
    /// # let topic = format!("doc.tick.{}", uuid::Uuid::new_v4().simple());
    /// # let topic = topic.as_str(); // "tick" in a real service
    /// // An inbox of one message, dropping the oldest (the default policy).
    /// let options = RedisPubSubOptions::default().with_inbox_capacity(1);
    /// let transport = RedisPubSubTransport::connect_with("redis://127.0.0.1:6379", options).await?;
    /// let (mut ticks, status) = transport
    ///     .subscribe_to(Channels::Topic(topic.into()), SubscribeOptions::new("ui"))
    ///     .await?;
    /// for n in 1..=3 {
    ///     transport.publish(topic, RawMessage::new(n.to_string())).await?;
    /// }
    /// // Nobody took a message yet: once all three are read, two were dropped.
    /// # let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    /// while status.dropped() < 2 {
    /// #   assert!(std::time::Instant::now() < deadline, "the messages never arrived");
    ///     tokio::task::yield_now().await;
    /// }
    /// let latest = ticks.recv().await.expect("a message");
    /// assert_eq!(latest.body().as_ref(), b"3");
    /// assert_eq!(status.dropped(), 2);
    /// # Ok::<(), switchboard::Error>(())
    /// # }).unwrap();
    /// ```
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// The state as a [`watch`] channel.
    pub fn watch(&self) -> watch::Receiver<ConnectionState> {
        self.state.clone()
    }

    /// Waits until the state satisfies `predicate` and returns it; fails
    /// with [`ErrorKind::Closed`] when the subscription ends first.
    pub async fn wait_for(
        &mut self,
        mut predicate: impl FnMut(&ConnectionState) -> bool,
    ) -> Result<ConnectionState, Error> {
        self.state
            .wait_for(|state| predicate(state))
            .await
            .map(|state| *state)
            .map_err(|_| Error::closed("the redis pub/sub subscription"))
    }
}

impl RedisPubSubTransport {
    /// Connects to the Redis at `url` (`redis://host:port/db`) with default
    /// options.
    pub async fn connect(url: &str) -> Result<Self, Error> {
        Self::connect_with(url, RedisPubSubOptions::default()).await
    }

    /// Connects to the Redis at `url` with `options`. Fails when Redis does
    /// not answer; later losses of the connection are recovered from.
    pub async fn connect_with(url: &str, options: RedisPubSubOptions) -> Result<Self, Error> {
        if options.inbox_capacity == 0 {
            return Err(Error::new(
                ErrorKind::Config,
                "redis pub/sub option `inbox_capacity` must be at least 1",
            ));
        }
        let info = url.into_connection_info().map_err(|error| {
            Error::new(ErrorKind::Config, format!("redis url {url:?}: {error}")).with_source(error)
        })?;
        // RESP3: subscribed connections receive pushes and still answer
        // commands such as CLIENT SETNAME.
        let settings = info
            .redis_settings()
            .clone()
            .set_protocol(ProtocolVersion::RESP3);
        let client = redis::Client::open(info.set_redis_settings(settings))
            .map_err(|error| redis_error("open client", error))?;
        // Few connection retries per command: a publish while Redis is away
        // fails fast with a retryable error instead of hanging for seconds,
        // and the caller's retry policy decides what happens next.
        let config = ConnectionManagerConfig::new()
            .set_response_timeout(Some(options.response_timeout))
            .set_connection_timeout(Some(options.connection_timeout))
            .set_min_delay(options.reconnect_min_delay)
            .set_max_delay(options.reconnect_max_delay)
            .set_number_of_retries(2);
        let publisher = client
            .get_connection_manager_with_config(config)
            .await
            .map_err(|error| redis_error("connect", error))?;
        Ok(Self {
            inner: Arc::new(Inner {
                client,
                publisher,
                options,
            }),
        })
    }

    /// Subscribes to a topic or a pattern and returns the subscription with
    /// a view of its connection. Returns once Redis confirmed the
    /// (P)SUBSCRIBE.
    pub async fn subscribe_to(
        &self,
        channels: Channels,
        options: SubscribeOptions,
    ) -> Result<(Subscription, ConnectionStatus), Error> {
        channels.validate()?;
        options.validate()?;
        let client_name: Arc<str> = format!(
            "{}-{}",
            self.inner.options.client_name_prefix,
            Uuid::new_v4().simple()
        )
        .into();
        let fixed_topic = match &channels {
            Channels::Topic(topic) => Some(Arc::from(topic.as_str())),
            Channels::Pattern(_) => None,
        };
        let subscription_name: Arc<str> = channels.name().into();
        let dropped = Arc::new(AtomicU64::new(0));
        let inbox = Arc::new(Inbox::new(
            self.inner.options.inbox_capacity,
            self.inner.options.drop_policy,
            subscription_name.clone(),
            dropped.clone(),
        ));
        let (consumer_alive, alive) = watch::channel(());
        let listener = Listener {
            client: self.inner.client.clone(),
            options: self.inner.options.clone(),
            channels,
            client_name: client_name.clone(),
            fixed_topic,
            inbox: inbox.clone(),
            consumer: consumer_alive,
            state: watch::Sender::new(ConnectionState::Subscribed { connection: 1 }),
        };
        // The first connection is made here so its failure reaches the caller.
        let live = listener
            .connect()
            .await
            .map_err(|error| redis_error("subscribe", error))?;
        let status = ConnectionStatus {
            client_name,
            state: listener.state.subscribe(),
            dropped,
        };
        let listening = tokio::spawn(listener.run(live));

        let prefetch = options.prefetch.min(Semaphore::MAX_PERMITS);
        let permits = Arc::new(Semaphore::new(prefetch));
        let consumer = Consumer {
            inbox,
            _alive: alive,
            permits: permits.clone(),
            group: options.group.as_str().into(),
        };
        let group = consumer.group.clone();
        let deliveries = futures_util::stream::unfold(consumer, |mut consumer| async move {
            let delivery = consumer.next().await?;
            Some((delivery, consumer))
        });
        // Draining: every delivery handed out is settled (each holds a
        // permit), and the listener has closed its connection.
        let drain = async move {
            let _all = permits
                .acquire_many(prefetch as u32)
                .await
                .map_err(|_| Error::closed("subscription"))?;
            listening.await.map_err(|error| {
                Error::new(ErrorKind::Closed, "the redis pub/sub listener failed")
                    .with_source(error)
            })
        };
        let subscription = Subscription::new(subscription_name, group, deliveries, drain);
        Ok((subscription, status))
    }

    /// Subscribes to every channel matching `pattern` (`PSUBSCRIBE`); each
    /// delivery's [`topic`](Delivery::topic) is the channel it came from.
    pub async fn psubscribe(
        &self,
        pattern: &str,
        options: SubscribeOptions,
    ) -> Result<Subscription, Error> {
        let (subscription, _status) = self
            .subscribe_to(Channels::Pattern(pattern.to_owned()), options)
            .await?;
        Ok(subscription)
    }
}

#[async_trait]
impl Publisher for RedisPubSubTransport {
    /// Returns once Redis accepted the PUBLISH — whether or not anyone was
    /// subscribed.
    async fn publish(&self, topic: &str, message: RawMessage) -> Result<(), Error> {
        validate_name("topic", topic)?;
        let payload = encode_payload(&message)?;
        let mut connection = self.inner.publisher.clone();
        let receivers: i64 = redis::cmd("PUBLISH")
            .arg(topic)
            .arg(payload.as_ref())
            .query_async(&mut connection)
            .await
            .map_err(|error| redis_error("PUBLISH", error))?;
        tracing::trace!(topic, receivers, "published");
        Ok(())
    }

    async fn publish_batch(&self, topic: &str, messages: Vec<RawMessage>) -> Result<(), Error> {
        validate_name("topic", topic)?;
        if messages.is_empty() {
            return Ok(());
        }
        let mut pipeline = redis::pipe();
        for message in &messages {
            let payload = encode_payload(message)?;
            pipeline
                .cmd("PUBLISH")
                .arg(topic)
                .arg(payload.as_ref())
                .ignore();
        }
        let mut connection = self.inner.publisher.clone();
        pipeline
            .query_async::<()>(&mut connection)
            .await
            .map_err(|error| redis_error("PUBLISH (pipelined)", error))
    }
}

#[async_trait]
impl Subscriber for RedisPubSubTransport {
    async fn subscribe(
        &self,
        topic: &str,
        options: SubscribeOptions,
    ) -> Result<Subscription, Error> {
        let (subscription, _status) = self
            .subscribe_to(Channels::Topic(topic.to_owned()), options)
            .await?;
        Ok(subscription)
    }
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
        topology.validate()
    }
}

/// Turns a message into the bytes to PUBLISH: the body alone when there are
/// no headers, otherwise the frame described in the [module docs](self).
///
/// ```
/// use switchboard::RawMessage;
/// use switchboard::transport::redis_pubsub::{decode_payload, encode_payload, FRAME_MAGIC};
///
/// let plain = encode_payload(&RawMessage::new(r#"{"event_id":"1"}"#))?;
/// assert_eq!(plain.as_ref(), br#"{"event_id":"1"}"#);
///
/// let message = RawMessage::new("body").with_header("correlation-id", "7");
/// let framed = encode_payload(&message)?;
/// assert!(framed.starts_with(FRAME_MAGIC));
/// assert_eq!(decode_payload(framed), message);
/// # Ok::<(), switchboard::Error>(())
/// ```
pub fn encode_payload(message: &RawMessage) -> Result<Bytes, Error> {
    if message.headers.is_empty() && !message.body.starts_with(FRAME_MAGIC) {
        return Ok(message.body.clone());
    }
    let headers = serde_json::to_vec(&message.headers).map_err(|error| {
        Error::new(ErrorKind::Encode, "headers of a pub/sub message").with_source(error)
    })?;
    let length = u32::try_from(headers.len()).map_err(|_| {
        Error::new(
            ErrorKind::Encode,
            format!("headers of {} bytes do not fit a frame", headers.len()),
        )
    })?;
    let mut frame = Vec::with_capacity(FRAME_MAGIC.len() + 4 + headers.len() + message.body.len());
    frame.extend_from_slice(FRAME_MAGIC);
    frame.extend_from_slice(&length.to_be_bytes());
    frame.extend_from_slice(&headers);
    frame.extend_from_slice(&message.body);
    Ok(frame.into())
}

/// Turns received bytes back into a message. A payload without
/// [`FRAME_MAGIC`] — such as SPEC §5.1 JSON sent by `redis-cli PUBLISH` — is
/// the body, with no headers; so is a frame whose header block is damaged
/// (logged as a warning), so the consumer still sees it.
///
/// ```
/// use switchboard::transport::redis_pubsub::decode_payload;
///
/// let message = decode_payload(r#"{"event_type":"price.updated"}"#.into());
/// assert!(message.headers.is_empty());
/// assert_eq!(message.body.as_ref(), br#"{"event_type":"price.updated"}"#);
/// ```
pub fn decode_payload(payload: Bytes) -> RawMessage {
    let Some(rest) = payload.strip_prefix(FRAME_MAGIC.as_slice()) else {
        return RawMessage::new(payload);
    };
    let unframed = rest.split_first_chunk::<4>().and_then(|(length, rest)| {
        let length = u32::from_be_bytes(*length) as usize;
        let headers = serde_json::from_slice::<Headers>(rest.get(..length)?).ok()?;
        Some((headers, FRAME_MAGIC.len() + 4 + length))
    });
    match unframed {
        Some((headers, body_start)) => RawMessage {
            headers,
            body: payload.slice(body_start..),
        },
        None => {
            tracing::warn!(
                bytes = payload.len(),
                "pub/sub frame with a damaged header block; delivered whole as the body"
            );
            RawMessage::new(payload)
        }
    }
}

/// A received message, on its way from the connection to the subscription.
struct Incoming {
    topic: Arc<str>,
    message: RawMessage,
}

/// A subscription's bounded queue from its connection to its consumer. The
/// connection's read loop fills it without ever waiting (see
/// [Back-pressure](self#back-pressure)); the consumer empties it.
struct Inbox {
    queue: Mutex<Queue>,
    capacity: usize,
    policy: DropPolicy,
    /// Wakes the consumer when the queue stops being empty or closes.
    ready: Notify,
    /// The `topic` label of the dropped-messages metric: the subscribed
    /// topic or pattern.
    subscription: Arc<str>,
    dropped: Arc<AtomicU64>,
}

struct Queue {
    messages: VecDeque<Incoming>,
    closed: bool,
}

impl Inbox {
    fn new(
        capacity: usize,
        policy: DropPolicy,
        subscription: Arc<str>,
        dropped: Arc<AtomicU64>,
    ) -> Self {
        Self {
            queue: Mutex::new(Queue {
                // Room for the default capacity up front, so filling the
                // queue never reallocates; a larger inbox grows on demand.
                messages: VecDeque::with_capacity(capacity.min(1024)),
                closed: false,
            }),
            capacity,
            policy,
            ready: Notify::new(),
            subscription,
            dropped,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Queue> {
        // Nothing panics while holding the lock; a poisoned queue is intact.
        self.queue.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Called on the connection's read loop: takes the lock for a few
    /// pointer moves and never waits for the consumer.
    fn push(&self, incoming: Incoming) {
        let mut queue = self.lock();
        if queue.closed {
            return;
        }
        if queue.messages.len() < self.capacity {
            let was_empty = queue.messages.is_empty();
            queue.messages.push_back(incoming);
            drop(queue);
            if was_empty {
                // Stores a wake-up if the consumer is not waiting yet.
                self.ready.notify_one();
            }
            return;
        }
        // Full, so not empty: the consumer has something to take already.
        let evicted = match self.policy {
            DropPolicy::DropOldest => {
                let oldest = queue.messages.pop_front();
                queue.messages.push_back(incoming);
                oldest
            }
            DropPolicy::DropNewest => Some(incoming),
        };
        // Counted before the lock is released, so whoever takes the next
        // message also sees this drop.
        self.dropped.fetch_add(1, Ordering::Relaxed);
        drop(queue);
        drop(evicted);
        metrics::dropped(NAME, self.subscription.clone(), "inbox_full");
    }

    /// The next message; `None` once the inbox is closed and empty.
    async fn pop(&self) -> Option<Incoming> {
        loop {
            {
                let mut queue = self.lock();
                if let Some(incoming) = queue.messages.pop_front() {
                    return Some(incoming);
                }
                if queue.closed {
                    return None;
                }
            }
            // A push between the unlock and here left a stored wake-up.
            self.ready.notified().await;
        }
    }

    /// Refuses further messages; the consumer still takes what is queued
    /// unless `discard`.
    fn close(&self, discard: bool) {
        let discarded = {
            let mut queue = self.lock();
            queue.closed = true;
            if discard {
                std::mem::take(&mut queue.messages)
            } else {
                VecDeque::new()
            }
        };
        drop(discarded);
        self.ready.notify_one();
    }
}

/// One subscription's connection keeper: connects, subscribes, and does it
/// again whenever the connection is lost, until the subscription is gone.
struct Listener {
    client: redis::Client,
    options: RedisPubSubOptions,
    channels: Channels,
    client_name: Arc<str>,
    /// The topic of an exact subscription, shared by all its deliveries.
    fixed_topic: Option<Arc<str>>,
    inbox: Arc<Inbox>,
    /// Closed when the consumer is dropped: the subscription is over.
    consumer: watch::Sender<()>,
    state: watch::Sender<ConnectionState>,
}

/// A subscribed connection, and the signal that it was lost.
struct Live {
    connection: MultiplexedConnection,
    lost: Arc<Notify>,
}

impl Listener {
    async fn connect(&self) -> Result<Live, redis::RedisError> {
        let lost = Arc::new(Notify::new());
        let forward = {
            let (inbox, lost, fixed_topic) =
                (self.inbox.clone(), lost.clone(), self.fixed_topic.clone());
            // Runs on the connection's own task, inside its read loop, so
            // the message reaches the subscription without another task hop
            // and without ever holding up the socket.
            move |push: PushInfo| -> Result<(), Infallible> {
                if push.kind == PushKind::Disconnection {
                    // `notify_one` keeps the signal if nobody waits yet.
                    lost.notify_one();
                    return Ok(());
                }
                if let Some(incoming) = incoming(push, fixed_topic.as_ref()) {
                    inbox.push(incoming);
                }
                Ok(())
            }
        };
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(self.options.connection_timeout))
            .set_response_timeout(Some(self.options.response_timeout))
            .set_push_sender(forward);
        let mut connection = self
            .client
            .get_multiplexed_async_connection_with_config(&config)
            .await?;
        redis::cmd("CLIENT")
            .arg("SETNAME")
            .arg(&*self.client_name)
            .query_async::<()>(&mut connection)
            .await?;
        match &self.channels {
            Channels::Topic(topic) => connection.subscribe(topic).await?,
            Channels::Pattern(pattern) => connection.psubscribe(pattern).await?,
        }
        Ok(Live { connection, lost })
    }

    async fn run(self, mut live: Live) {
        let mut connection = 1;
        loop {
            tokio::select! {
                () = self.consumer.closed() => {
                    self.unsubscribe(&mut live).await;
                    break;
                }
                () = live.lost.notified() => {}
            }
            drop(live);
            tracing::warn!(
                client = %self.client_name,
                channels = self.channels.name(),
                "redis pub/sub connection lost; reconnecting"
            );
            live = match self.reconnect().await {
                Some(live) => live,
                None => break,
            };
            connection += 1;
            tracing::info!(
                client = %self.client_name,
                channels = self.channels.name(),
                connection,
                "redis pub/sub subscription restored"
            );
            self.state
                .send_replace(ConnectionState::Subscribed { connection });
        }
        self.inbox.close(false);
        self.state.send_replace(ConnectionState::Closed);
    }

    /// Ends the subscription on the server before the connection is
    /// dropped: Redis notices a closed socket only some time later, and until
    /// then counts the subscriber and keeps sending to it.
    async fn unsubscribe(&self, live: &mut Live) {
        let result = match &self.channels {
            Channels::Topic(topic) => live.connection.unsubscribe(topic).await,
            Channels::Pattern(pattern) => live.connection.punsubscribe(pattern).await,
        };
        if let Err(error) = result {
            tracing::debug!(
                client = %self.client_name,
                %error,
                "redis pub/sub unsubscribe failed; closing the connection anyway"
            );
        }
    }

    /// Tries until subscribed again; `None` when the subscription is dropped
    /// meanwhile.
    async fn reconnect(&self) -> Option<Live> {
        let mut delays = ExponentialBuilder::default()
            .with_min_delay(self.options.reconnect_min_delay)
            .with_max_delay(self.options.reconnect_max_delay)
            .with_jitter()
            .without_max_times()
            .build();
        let mut attempt = 0;
        loop {
            attempt += 1;
            self.state
                .send_replace(ConnectionState::Reconnecting { attempt });
            let error = tokio::select! {
                () = self.consumer.closed() => return None,
                result = self.connect() => match result {
                    Ok(live) => return Some(live),
                    Err(error) => error,
                },
            };
            let delay = delays.next().unwrap_or(self.options.reconnect_max_delay);
            tracing::warn!(
                client = %self.client_name,
                attempt,
                ?delay,
                %error,
                "redis pub/sub reconnection failed"
            );
            tokio::select! {
                () = self.consumer.closed() => return None,
                () = tokio::time::sleep(delay) => {}
            }
        }
    }
}

/// The message in a `message` or `pmessage` push; `None` for anything else
/// (subscribe confirmations).
fn incoming(push: PushInfo, fixed_topic: Option<&Arc<str>>) -> Option<Incoming> {
    let mut data = push.data.into_iter();
    let channel = match push.kind {
        PushKind::Message => data.next()?,
        PushKind::PMessage => data.nth(1)?,
        _ => return None,
    };
    let payload = match data.next()? {
        Value::BulkString(bytes) => Bytes::from(bytes),
        Value::SimpleString(text) => Bytes::from(text),
        _ => return None,
    };
    let topic = match (fixed_topic, channel) {
        (Some(topic), _) => topic.clone(),
        (None, Value::BulkString(name)) => String::from_utf8_lossy(&name).into(),
        (None, Value::SimpleString(name)) => name.into(),
        (None, _) => return None,
    };
    Some(Incoming {
        topic,
        message: decode_payload(payload),
    })
}

/// The subscription's side: hands out what the listener received, at most
/// `prefetch` unsettled at a time.
struct Consumer {
    inbox: Arc<Inbox>,
    /// Dropped with the consumer, which tells the listener to stop.
    _alive: watch::Receiver<()>,
    permits: Arc<Semaphore>,
    group: Arc<str>,
}

impl Consumer {
    async fn next(&mut self) -> Option<Delivery> {
        let permit = self.permits.clone().acquire_owned().await.ok()?;
        let Incoming { topic, message } = self.inbox.pop().await?;
        let acker = PubSubAcker { _permit: permit };
        // Pub/Sub never delivers a message twice: every delivery is the first.
        Some(Delivery::new(
            message,
            topic,
            self.group.clone(),
            1,
            Box::new(acker),
        ))
    }
}

impl Drop for Consumer {
    fn drop(&mut self) {
        // Frees the queued messages now rather than when the connection is
        // gone, and refuses what still arrives meanwhile.
        self.inbox.close(true);
    }
}

/// Settles nothing on the server: Pub/Sub forgets a message once sent.
struct PubSubAcker {
    /// Held until the delivery is settled or dropped; counts it as in flight.
    _permit: OwnedSemaphorePermit,
}

#[async_trait]
impl Acker for PubSubAcker {
    async fn ack(&mut self, _message: &RawMessage) -> Result<(), Error> {
        Ok(())
    }

    async fn nack(&mut self, _message: &RawMessage, _delay: Duration) -> Result<(), Error> {
        Err(Error::unsupported(
            NAME,
            "nack: Pub/Sub keeps no message to deliver again",
        ))
    }

    async fn dead_letter(
        &mut self,
        _message: &RawMessage,
        _letter: &DeadLetter,
    ) -> Result<(), Error> {
        Err(Error::unsupported(
            NAME,
            "dead-letter: Pub/Sub has no dead-letter queue",
        ))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_and_plain_payloads_are_bodies() {
        let message = RawMessage::new("ü body").with_header("a", "1 \"q\"");
        assert_eq!(decode_payload(encode_payload(&message).unwrap()), message);

        let plain = RawMessage::new(r#"{"event_id":"x"}"#);
        let encoded = encode_payload(&plain).unwrap();
        assert_eq!(encoded, plain.body, "no headers: the body alone");
        assert_eq!(decode_payload(encoded), plain);
    }

    #[test]
    fn a_headerless_body_that_looks_framed_is_framed_to_survive() {
        let tricky = RawMessage::new(Bytes::from_static(b"\0SB1 not a frame"));
        let encoded = encode_payload(&tricky).unwrap();
        assert_ne!(encoded, tricky.body);
        assert_eq!(decode_payload(encoded), tricky);
    }

    #[test]
    fn damaged_frames_are_delivered_whole() {
        for damaged in [&b"\0SB1"[..], b"\0SB1\0\0\0\x09{}", b"\0SB1\0\0\0\x02[]x"] {
            let message = decode_payload(Bytes::copy_from_slice(damaged));
            assert!(message.headers.is_empty());
            assert_eq!(message.body.as_ref(), damaged);
        }
    }

    fn inbox(capacity: usize, policy: DropPolicy) -> Inbox {
        Inbox::new(capacity, policy, "t".into(), Arc::default())
    }

    fn push(inbox: &Inbox, body: &'static str) {
        inbox.push(Incoming {
            topic: "t".into(),
            message: RawMessage::new(body),
        });
    }

    async fn bodies(inbox: &Inbox) -> Vec<Bytes> {
        inbox.close(false);
        let mut bodies = Vec::new();
        while let Some(incoming) = inbox.pop().await {
            bodies.push(incoming.message.body);
        }
        bodies
    }

    #[tokio::test]
    async fn a_full_inbox_drops_the_oldest_by_default_and_counts_it() {
        let inbox = inbox(2, DropPolicy::default());
        for body in ["1", "2", "3", "4"] {
            push(&inbox, body);
        }
        assert_eq!(inbox.dropped.load(Ordering::Relaxed), 2);
        assert_eq!(bodies(&inbox).await, ["3", "4"]);
    }

    #[tokio::test]
    async fn drop_newest_keeps_what_came_first() {
        let inbox = inbox(2, DropPolicy::DropNewest);
        for body in ["1", "2", "3", "4"] {
            push(&inbox, body);
        }
        assert_eq!(inbox.dropped.load(Ordering::Relaxed), 2);
        assert_eq!(bodies(&inbox).await, ["1", "2"]);
    }

    #[tokio::test]
    async fn a_waiting_consumer_is_woken_and_a_closed_inbox_refuses_pushes() {
        let inbox = Arc::new(inbox(1, DropPolicy::DropOldest));
        let waiting = tokio::spawn({
            let inbox = inbox.clone();
            async move { inbox.pop().await.map(|incoming| incoming.message.body) }
        });
        push(&inbox, "1");
        assert_eq!(waiting.await.unwrap().as_deref(), Some(&b"1"[..]));
        inbox.close(true);
        push(&inbox, "2");
        assert!(inbox.pop().await.is_none());
        assert_eq!(
            inbox.dropped.load(Ordering::Relaxed),
            0,
            "refused, not dropped"
        );
    }

    #[test]
    fn patterns_allow_globs_and_refuse_the_rest() {
        assert!(Channels::Pattern("price.*".into()).validate().is_ok());
        assert!(Channels::Pattern("h?llo.[ab]".into()).validate().is_ok());
        assert!(Channels::Pattern("two words*".into()).validate().is_err());
        assert!(Channels::Pattern(String::new()).validate().is_err());
        assert!(Channels::Topic("price.*".into()).validate().is_err());
    }
}
