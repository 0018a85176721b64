//! The Redis Streams transport (feature `redis-streams`): event notification
//! (SPEC §1.2) with consumer groups and at-least-once delivery.
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
//! | `envelope` | the body: the envelope JSON of SPEC §5.1 |
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
//! * `ack` is `XACK`; acks of one subscription that finish together share
//!   one `XACK` (each still returns once Redis has confirmed it). Every other command goes over one shared connection
//!   that reconnects by itself ([`ConnectionManager`] or a cluster
//!   connection).
//! * `nack(delay)` keeps the entry pending: it is re-read with `XCLAIM` once
//!   the delay has passed, which raises its delivery counter — it is never
//!   re-added under a new id. [`Delivery::attempt`] is that counter. A delay
//!   longer than `claim_idle` lets another member take the entry over
//!   sooner; if the process dies during the delay, a member takes it over
//!   after `claim_idle`.
//! * An entry stays pending while its consumer holds it. When a consumer dies,
//!   the live consumers of its group take its entries over with `XAUTOCLAIM`
//!   once they have been idle for [`RedisStreamsConfig::claim_idle`]
//!   (default 30 s). A subscription that stops, and a delivery dropped
//!   unsettled, hand their entries back at once (they mark them as idle for
//!   that long), so the next `XAUTOCLAIM` of any member takes them.
//! * A subscription starts by re-reading the entries still pending for its
//!   own consumer name (a restart with a stable
//!   [`consumer_name`](RedisStreamsConfig::consumer_name) picks up its own
//!   work at once), then claims idle entries, then reads new ones.
//! * `dead_letter` is one `MULTI { XADD <stream>.dlq ...; XACK }`: the entry
//!   is either in the dead-letter stream or still pending, never lost nor in
//!   both.
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
//! [`RedisStreamsConfig::with_max_len`] adds `MAXLEN ~ n` to each `XADD`,
//! which bounds memory but **can drop entries no group has acknowledged
//! yet**: Redis trims by length, not by what is pending.
//!
//! # Persistence
//!
//! [`Capabilities::persistent`] is true only when the server runs with AOF
//! (`CONFIG GET appendonly` is `yes` and `appendfsync` is `always` or
//! `everysec`), read once at connect. With `appendfsync always` an entry whose
//! `XADD` returned survives a crash of the server; `everysec` may lose the
//! last second when the machine (not just Redis) fails.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use chrono::{DateTime, Utc};
use futures_core::future::BoxFuture;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::cluster::{ClusterClient, ClusterConfig};
use redis::cluster_async::ClusterConnection;
use redis::streams::{
    StreamAutoClaimReply, StreamClaimReply, StreamId, StreamPendingCountReply, StreamRangeReply,
    StreamReadReply,
};
use redis::{Cmd, Pipeline, RedisError, RedisFuture, RedisResult, Value};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::{
    Acker, Capabilities, DeadLetter, DeadLetterQueue, DeadLettered, Delivery, DeliveryMode,
    Publisher, RawMessage, Redrive, SubscribeOptions, Subscriber, Subscription, Transport, header,
    validate_name,
};
use crate::envelope::Headers;
use crate::error::{Error, ErrorKind};
use crate::topology::Topology;
use crate::transport::redis_error::redis_error;

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

// Fields of a dead-letter entry besides the message's own.
const DLQ_TOPIC: &str = "topic";
const DLQ_GROUP: &str = "group";
const DLQ_REASON: &str = "reason";
const DLQ_ATTEMPTS: &str = "attempts";
const DLQ_LAST_ERROR: &str = "last_error";
const DLQ_AT: &str = "dead_lettered_at";
const DLQ_SOURCE_ID: &str = "source_id";

/// Dead-letter entries read per round trip when searching or redriving.
const DLQ_PAGE: usize = 100;
/// Own pending entries re-read per round trip when a subscription starts.
const RECOVER_PAGE: usize = 500;

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

/// Settings of a [`RedisStreamsTransport`].
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
    /// list before a live consumer takes it over (default 30 s). Longer than
    /// the slowest handler, or slow handlers get their entries taken away.
    pub claim_idle: Duration,
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
    /// `MAXLEN ~ n` on every `XADD` (default `None`: no trimming). Trimming
    /// can drop entries no group has acknowledged yet.
    pub max_len: Option<usize>,
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
}

impl Default for RedisStreamsConfig {
    fn default() -> Self {
        Self {
            claim_idle: Duration::from_secs(30),
            claim_every: None,
            block: Duration::from_secs(5),
            batch: 128,
            max_len: None,
            group_start: GroupStart::Beginning,
            consumer_name: uuid::Uuid::new_v4().simple().to_string(),
            key_prefix: String::new(),
            hash_tag: None,
            response_timeout: Duration::from_secs(5),
        }
    }
}

impl RedisStreamsConfig {
    /// Sets [`claim_idle`](Self::claim_idle).
    pub fn with_claim_idle(mut self, idle: Duration) -> Self {
        self.claim_idle = idle;
        self
    }

    /// Sets [`claim_every`](Self::claim_every).
    pub fn with_claim_every(mut self, every: Duration) -> Self {
        self.claim_every = Some(every);
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

    fn claim_interval(&self) -> Duration {
        self.claim_every
            .unwrap_or(self.claim_idle / 4)
            .max(Duration::from_millis(10))
    }

    fn validate(&self) -> Result<(), Error> {
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
        if self.consumer_name.is_empty() {
            return invalid("redis-streams: `consumer_name` must not be empty");
        }
        Ok(())
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
/// delivery.ack().await.map_err(|(error, _)| error)?;
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
    connector: Connector,
    config: RedisStreamsConfig,
    hash_tag: bool,
    persistent: bool,
    /// Subscriptions so far per (topic, group), for consumer names.
    consumers: Mutex<HashMap<(String, String), u64>>,
}

/// A shared connection: one server or a cluster.
#[derive(Clone)]
enum Conn {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

impl redis::aio::ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Self::Single(conn) => conn.req_packed_command(cmd),
            Self::Cluster(conn) => conn.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Self::Single(conn) => conn.req_packed_commands(pipeline, offset, count),
            Self::Cluster(conn) => conn.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Self::Single(conn) => conn.get_db(),
            Self::Cluster(conn) => conn.get_db(),
        }
    }
}

/// Makes the dedicated connections blocking reads use.
enum Connector {
    Single(redis::Client),
    // Boxed: a cluster client is twice the size of a plain one.
    Cluster(Box<ClusterClient>),
}

impl RedisStreamsTransport {
    /// Connects to one Redis server (`redis://host:port/db`) with the default
    /// [`RedisStreamsConfig`].
    pub async fn connect(url: &str) -> Result<Self, Error> {
        Self::connect_with(url, RedisStreamsConfig::default()).await
    }

    /// Connects to one Redis server with `config`.
    pub async fn connect_with(url: &str, config: RedisStreamsConfig) -> Result<Self, Error> {
        config.validate()?;
        let client = redis::Client::open(url).map_err(|error| redis_error("open", error))?;
        let manager = ConnectionManagerConfig::new()
            .set_response_timeout(Some(config.response_timeout))
            .set_connection_timeout(Some(config.response_timeout));
        let commands = client
            .get_connection_manager_with_config(manager)
            .await
            .map_err(|error| redis_error("connect", error))?;
        let hash_tag = config.hash_tag.unwrap_or(false);
        Ok(Self::finish(
            Conn::Single(commands),
            Connector::Single(client),
            config,
            hash_tag,
        )
        .await)
    }

    /// Connects to a Redis Cluster through any of its nodes
    /// (`redis://host:port`). Stream keys are hash-tagged unless `config`
    /// says otherwise, so a stream and its dead letters share a slot.
    pub async fn connect_cluster<I, S>(nodes: I, config: RedisStreamsConfig) -> Result<Self, Error>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        config.validate()?;
        let nodes: Vec<String> = nodes.into_iter().map(|n| n.as_ref().to_owned()).collect();
        let client = ClusterClient::builder(nodes)
            .response_timeout(config.response_timeout)
            .build()
            .map_err(|error| redis_error("open cluster", error))?;
        let commands = client
            .get_async_connection()
            .await
            .map_err(|error| redis_error("connect to cluster", error))?;
        let hash_tag = config.hash_tag.unwrap_or(true);
        Ok(Self::finish(
            Conn::Cluster(commands),
            Connector::Cluster(Box::new(client)),
            config,
            hash_tag,
        )
        .await)
    }

    async fn finish(
        commands: Conn,
        connector: Connector,
        config: RedisStreamsConfig,
        hash_tag: bool,
    ) -> Self {
        let persistent = aof_enabled(commands.clone()).await;
        Self {
            inner: Arc::new(Inner {
                commands,
                connector,
                config,
                hash_tag,
                persistent,
                consumers: Mutex::default(),
            }),
        }
    }

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

    async fn blocking_connection(&self) -> Result<Conn, Error> {
        // Longer than BLOCK, so a read that waits its full time is not cut off.
        let timeout = self.inner.config.block + Duration::from_secs(5);
        match &self.inner.connector {
            Connector::Single(client) => {
                let config = ConnectionManagerConfig::new()
                    .set_response_timeout(Some(timeout))
                    .set_connection_timeout(Some(self.inner.config.response_timeout));
                client
                    .get_connection_manager_with_config(config)
                    .await
                    .map(Conn::Single)
                    .map_err(|error| redis_error("connect for reading", error))
            }
            Connector::Cluster(client) => {
                let config = ClusterConfig::new().set_response_timeout(timeout);
                client
                    .get_async_connection_with_config(config)
                    .await
                    .map(Conn::Cluster)
                    .map_err(|error| redis_error("connect to cluster for reading", error))
            }
        }
    }

    fn xadd(&self, stream: &str, message: &RawMessage) -> Cmd {
        let mut cmd = redis::cmd("XADD");
        cmd.arg(stream);
        if let Some(max_len) = self.inner.config.max_len {
            cmd.arg("MAXLEN").arg("~").arg(max_len);
        }
        cmd.arg("*");
        append_message_fields(&mut cmd, message);
        cmd
    }
}

/// Reads `CONFIG GET append*`; any failure (a managed Redis that hides
/// CONFIG) counts as "not persistent", the safe answer.
async fn aof_enabled(mut conn: Conn) -> bool {
    let reply: RedisResult<HashMap<String, String>> = redis::cmd("CONFIG")
        .arg("GET")
        .arg("append*")
        .query_async(&mut conn)
        .await;
    match reply {
        Ok(settings) => {
            let aof = settings.get("appendonly").is_some_and(|v| v == "yes");
            let fsync = settings
                .get("appendfsync")
                .is_some_and(|v| v == "always" || v == "everysec");
            aof && fsync
        }
        Err(error) => {
            tracing::warn!(%error, "redis-streams: cannot read the AOF settings; not persistent");
            false
        }
    }
}

async fn ensure_group(
    mut conn: Conn,
    stream: &str,
    group: &str,
    start: GroupStart,
) -> Result<(), Error> {
    let created: RedisResult<()> = redis::cmd("XGROUP")
        .arg("CREATE")
        .arg(stream)
        .arg(group)
        .arg(start.id())
        .arg("MKSTREAM")
        .query_async(&mut conn)
        .await;
    match created {
        Ok(()) => Ok(()),
        Err(error) if error.code() == Some("BUSYGROUP") => Ok(()),
        Err(error) => Err(redis_error("create consumer group", error)),
    }
}

#[async_trait]
impl Publisher for RedisStreamsTransport {
    async fn publish(&self, topic: &str, message: RawMessage) -> Result<(), Error> {
        validate_name("topic", topic)?;
        let cmd = self.xadd(&self.stream_key(topic), &message);
        let _: Value = cmd
            .query_async(&mut self.conn())
            .await
            .map_err(|error| redis_error("XADD", error))?;
        Ok(())
    }

    async fn publish_batch(&self, topic: &str, messages: Vec<RawMessage>) -> Result<(), Error> {
        validate_name("topic", topic)?;
        if messages.is_empty() {
            return Ok(());
        }
        let stream = self.stream_key(topic);
        let mut pipe = redis::pipe();
        for message in &messages {
            pipe.add_command(self.xadd(&stream, message)).ignore();
        }
        let _: Value = pipe
            .query_async(&mut self.conn())
            .await
            .map_err(|error| redis_error("pipelined XADD", error))?;
        Ok(())
    }
}

#[async_trait]
impl Subscriber for RedisStreamsTransport {
    async fn subscribe(
        &self,
        topic: &str,
        options: SubscribeOptions,
    ) -> Result<Subscription, Error> {
        validate_name("topic", topic)?;
        options.validate()?;
        let stream = self.stream_key(topic);
        self.ensure_group(&stream, &options.group).await?;
        let blocking = self.blocking_connection().await?;
        let group_name: Arc<str> = options.group.as_str().into();
        let group = Arc::new(Group {
            transport: self.clone(),
            topic: topic.into(),
            acks: spawn_acks(self.clone(), stream.clone(), group_name.clone()),
            group: group_name,
            consumer: self.consumer_name(topic, &options.group),
            dlq: format!("{stream}{DLQ_SUFFIX}"),
            stream,
        });
        let prefetch = options
            .prefetch
            .min(u32::MAX as usize)
            .min(Semaphore::MAX_PERMITS);
        let permits = Arc::new(Semaphore::new(prefetch));
        let (ready_tx, ready_rx) = mpsc::unbounded_channel();
        let stopping: Arc<Mutex<Option<JoinHandle<()>>>> = Arc::default();
        let mut reader = Reader {
            group: group.clone(),
            blocking,
            client_id: None,
            permits: permits.clone(),
            buffer: VecDeque::new(),
            ready_tx,
            ready_rx,
            read: None,
            started: false,
            next_claim: Instant::now(),
            claim_cursor: "0-0".to_owned(),
            backoff: None,
            stopping: stopping.clone(),
        };
        reader.refresh_client_id().await;
        let deliveries = futures_util::stream::unfold(reader, |mut reader| async move {
            let delivery = reader.next().await?;
            Some((delivery, reader))
        });
        let drain = async move {
            // First the entries read but not handed out go back...
            let task = lock(&stopping).take();
            if let Some(task) = task {
                let _ = task.await;
            }
            // ...then every delivery handed out is settled or dropped.
            let _all = permits
                .acquire_many(prefetch as u32)
                .await
                .map_err(|_| Error::closed("subscription"))?;
            Ok(())
        };
        Ok(Subscription::new(
            group.topic.clone(),
            group.group.clone(),
            deliveries,
            drain,
        ))
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
    }

    async fn declare(&self, topology: &Topology) -> Result<(), Error> {
        topology.validate()?;
        for (topic, group) in topology.subscriptions() {
            self.ensure_group(&self.stream_key(topic), group).await?;
        }
        Ok(())
    }

    fn dead_letters(&self) -> Result<&dyn DeadLetterQueue, Error> {
        Ok(self)
    }
}

// ------------------------------------------------------------ dead letters

/// A dead-letter entry with its id in the dead-letter stream.
struct DlqEntry {
    stream_id: String,
    letter: DeadLettered,
}

impl RedisStreamsTransport {
    /// Dead-letter entries of `topic` after `after` (exclusive), oldest first.
    async fn dlq_page(
        &self,
        topic: &str,
        after: Option<&str>,
        count: usize,
    ) -> Result<Vec<DlqEntry>, Error> {
        let start = after.map_or_else(|| "-".to_owned(), |id| format!("({id}"));
        let reply: StreamRangeReply = redis::cmd("XRANGE")
            .arg(self.dead_letter_key(topic))
            .arg(start)
            .arg("+")
            .arg("COUNT")
            .arg(count)
            .query_async(&mut self.conn())
            .await
            .map_err(|error| redis_error("XRANGE dead letters", error))?;
        Ok(reply
            .ids
            .into_iter()
            .map(|entry| DlqEntry {
                letter: dead_lettered_from(topic, &entry),
                stream_id: entry.id,
            })
            .collect())
    }

    async fn find_dead_letter(&self, topic: &str, id: &str) -> Result<DlqEntry, Error> {
        let mut after: Option<String> = None;
        loop {
            let page = self.dlq_page(topic, after.as_deref(), DLQ_PAGE).await?;
            let full = page.len() == DLQ_PAGE;
            after = page.last().map(|entry| entry.stream_id.clone());
            if let Some(found) = page.into_iter().find(|entry| entry.letter.id == id) {
                return Ok(found);
            }
            if !full {
                return Err(not_found(topic, id));
            }
        }
    }

    /// Re-adds dead letters to their stream, marked for the group that gave
    /// up on them, and deletes them from the dead-letter stream, atomically.
    async fn redrive_entries(&self, topic: &str, entries: &[DlqEntry]) -> Result<(), Error> {
        if entries.is_empty() {
            return Ok(());
        }
        let stream = self.stream_key(topic);
        let mut pipe = redis::pipe();
        pipe.atomic();
        for entry in entries {
            let mut xadd = self.xadd(&stream, &entry.letter.message);
            xadd.arg(FIELD_REDRIVE_GROUP).arg(&entry.letter.group);
            pipe.add_command(xadd).ignore();
            pipe.cmd("XDEL")
                .arg(self.dead_letter_key(topic))
                .arg(&entry.stream_id)
                .ignore();
        }
        let _: Value = pipe
            .query_async(&mut self.conn())
            .await
            .map_err(|error| redis_error("redrive", error))?;
        Ok(())
    }
}

/// Redrive re-adds the message to the topic's stream under a new id, with a
/// [`FIELD_REDRIVE_GROUP`] field naming the group that gave up on it. That
/// group handles it again (attempts start over at 1, and it lands behind
/// what is already in the stream); the topic's other groups, which handled
/// it the first time, acknowledge it without handing it out. The trade-off:
/// Redis cannot make an acknowledged entry pending again, so re-adding is
/// the only way back, and other groups pay one read and `XACK` per redriven
/// message.
#[async_trait]
impl DeadLetterQueue for RedisStreamsTransport {
    async fn list(&self, topic: &str, limit: usize) -> Result<Vec<DeadLettered>, Error> {
        validate_name("topic", topic)?;
        if limit == 0 {
            return Ok(Vec::new());
        }
        let page = self.dlq_page(topic, None, limit).await?;
        Ok(page.into_iter().map(|entry| entry.letter).collect())
    }

    async fn inspect(&self, topic: &str, id: &str) -> Result<DeadLettered, Error> {
        validate_name("topic", topic)?;
        Ok(self.find_dead_letter(topic, id).await?.letter)
    }

    async fn redrive(&self, topic: &str, which: Redrive) -> Result<usize, Error> {
        validate_name("topic", topic)?;
        match which {
            Redrive::One(id) => {
                let entry = self.find_dead_letter(topic, &id).await?;
                self.redrive_entries(topic, std::slice::from_ref(&entry))
                    .await?;
                Ok(1)
            }
            Redrive::All => {
                // Redriven entries are deleted, so each page starts at the front.
                let mut count = 0;
                loop {
                    let page = self.dlq_page(topic, None, DLQ_PAGE).await?;
                    if page.is_empty() {
                        return Ok(count);
                    }
                    self.redrive_entries(topic, &page).await?;
                    count += page.len();
                }
            }
        }
    }
}

fn not_found(topic: &str, id: &str) -> Error {
    Error::new(
        ErrorKind::NotFound,
        format!("no dead letter {id:?} on topic {topic:?}"),
    )
}

fn dead_lettered_from(topic: &str, entry: &StreamId) -> DeadLettered {
    let text = |field: &str| entry.map.get(field).and_then(value_text);
    let (message, _) = message_from_fields(entry.map.clone());
    let id = message
        .headers
        .get(header::EVENT_ID)
        .cloned()
        .unwrap_or_else(|| entry.id.clone());
    DeadLettered {
        id,
        topic: text(DLQ_TOPIC).unwrap_or_else(|| topic.to_owned()),
        group: text(DLQ_GROUP).unwrap_or_default(),
        message,
        reason: text(DLQ_REASON).unwrap_or_default(),
        attempts: text(DLQ_ATTEMPTS).and_then(|n| n.parse().ok()).unwrap_or(0),
        last_error: text(DLQ_LAST_ERROR),
        dead_lettered_at: text(DLQ_AT)
            .and_then(|at| DateTime::parse_from_rfc3339(&at).ok())
            .map_or_else(Utc::now, |at| at.with_timezone(&Utc)),
    }
}

// ------------------------------------------------------- stream entry fields

/// Appends the fields of `message` to an `XADD`.
fn append_message_fields(cmd: &mut Cmd, message: &RawMessage) {
    cmd.arg(FIELD_ENVELOPE).arg(message.body.as_ref());
    let event_id = message.headers.get(header::EVENT_ID);
    let event_type = message.headers.get(header::EVENT_TYPE);
    if let (Some(event_id), Some(event_type)) = (event_id, event_type) {
        cmd.arg(FIELD_EVENT_TYPE).arg(event_type);
        cmd.arg(FIELD_EVENT_ID).arg(event_id);
    } else {
        // A raw publish without the bus's headers: take them from the body
        // when it is an envelope, so XRANGE still shows them.
        let found = envelope_ids(&message.body);
        if let Some(event_type) = event_type.cloned().or(found.event_type) {
            cmd.arg(FIELD_EVENT_TYPE).arg(event_type);
        }
        if let Some(event_id) = event_id.cloned().or(found.event_id) {
            cmd.arg(FIELD_EVENT_ID).arg(event_id);
        }
    }
    for (name, value) in &message.headers {
        if name != header::EVENT_ID && name != header::EVENT_TYPE {
            cmd.arg(format!("{HEADER_FIELD_PREFIX}{name}")).arg(value);
        }
    }
}

#[derive(Default, serde::Deserialize)]
struct EnvelopeIds {
    event_id: Option<String>,
    event_type: Option<String>,
}

fn envelope_ids(body: &[u8]) -> EnvelopeIds {
    serde_json::from_slice(body).unwrap_or_default()
}

/// The message an entry carries, and why it cannot be handed out when it
/// cannot (no `envelope` field).
fn message_from_fields(map: HashMap<String, Value>) -> (RawMessage, Option<String>) {
    let mut problem = None;
    if !map.contains_key(FIELD_ENVELOPE) {
        let mut fields: Vec<&str> = map.keys().map(String::as_str).collect();
        fields.sort_unstable();
        problem = Some(format!(
            "stream entry has no `{FIELD_ENVELOPE}` field (fields: {})",
            fields.join(", ")
        ));
    }
    let mut headers = Headers::new();
    let mut body = Bytes::new();
    for (field, value) in map {
        match field.as_str() {
            // Moved, not copied: the hot path of every delivery.
            FIELD_ENVELOPE => body = value_into_bytes(value).unwrap_or_default(),
            FIELD_EVENT_ID => {
                if let Some(text) = value_text(&value) {
                    headers.insert(header::EVENT_ID.to_owned(), text);
                }
            }
            FIELD_EVENT_TYPE => {
                if let Some(text) = value_text(&value) {
                    headers.insert(header::EVENT_TYPE.to_owned(), text);
                }
            }
            other => {
                if let (Some(name), Some(text)) =
                    (other.strip_prefix(HEADER_FIELD_PREFIX), value_text(&value))
                {
                    headers.insert(name.to_owned(), text);
                }
            }
        }
    }
    (RawMessage { headers, body }, problem)
}

fn value_into_bytes(value: Value) -> Option<Bytes> {
    match value {
        Value::BulkString(bytes) => Some(Bytes::from(bytes)),
        other => value_bytes(&other),
    }
}

fn value_bytes(value: &Value) -> Option<Bytes> {
    match value {
        Value::BulkString(bytes) => Some(Bytes::copy_from_slice(bytes)),
        Value::SimpleString(text) => Some(Bytes::copy_from_slice(text.as_bytes())),
        Value::Int(n) => Some(Bytes::from(n.to_string())),
        _ => None,
    }
}

fn value_text(value: &Value) -> Option<String> {
    value_bytes(value).map(|bytes| String::from_utf8_lossy(&bytes).into_owned())
}

// ------------------------------------------------------------- consuming

/// An id to acknowledge, and where to say how it went.
type AckRequest = (String, oneshot::Sender<Result<(), Error>>);

/// The most ids one `XACK` carries.
const ACK_BATCH: usize = 512;

/// Starts a subscription's ack task: handlers that finish together share
/// one `XACK` carrying all their ids, instead of a command and a round trip
/// each (on a small machine running Redis beside its clients, the commands
/// are what costs). Nothing waits to fill a batch: the task takes whatever
/// is queued when it runs, so a lone ack goes out at once. Each ack still
/// returns only after Redis has acknowledged its id. The task ends when the
/// subscription and its deliveries are gone (every sender dropped).
fn spawn_acks(
    transport: RedisStreamsTransport,
    stream: String,
    group: Arc<str>,
) -> mpsc::UnboundedSender<AckRequest> {
    let (sender, mut requests) = mpsc::unbounded_channel::<AckRequest>();
    tokio::spawn(async move {
        let mut batch = Vec::new();
        while requests.recv_many(&mut batch, ACK_BATCH).await > 0 {
            let result: Result<Value, _> = redis::cmd("XACK")
                .arg(&stream)
                .arg(&*group)
                .arg(batch.iter().map(|(id, _)| id.as_str()).collect::<Vec<_>>())
                .query_async(&mut transport.conn())
                .await;
            match result {
                Ok(_) => {
                    for (_, reply) in batch.drain(..) {
                        let _ = reply.send(Ok(()));
                    }
                }
                Err(error) => {
                    let error = redis_error("XACK", error);
                    for (_, reply) in batch.drain(..) {
                        let copy = Error::new(error.kind(), error.message().to_owned());
                        let _ = reply.send(Err(copy));
                    }
                }
            }
        }
    });
    sender
}

/// What one subscription shares with its ackers.
struct Group {
    transport: RedisStreamsTransport,
    topic: Arc<str>,
    group: Arc<str>,
    /// The subscription's ack task (see [`spawn_acks`]).
    acks: mpsc::UnboundedSender<AckRequest>,
    consumer: String,
    stream: String,
    dlq: String,
}

/// An entry read for this subscription, not yet handed out.
struct Entry {
    id: String,
    attempt: u32,
    message: RawMessage,
    /// Why it cannot be handed out (it is dead-lettered instead).
    problem: Option<String>,
    /// Redriven for another group: acknowledged unseen.
    foreign: bool,
}

impl Group {
    fn entry(&self, stream_id: StreamId, attempt: u32) -> Entry {
        let foreign = stream_id
            .map
            .get(FIELD_REDRIVE_GROUP)
            .and_then(value_text)
            .is_some_and(|group| *group != *self.group);
        let (message, problem) = message_from_fields(stream_id.map);
        Entry {
            id: stream_id.id,
            attempt,
            message,
            problem,
            foreign,
        }
    }

    fn conn(&self) -> Conn {
        self.transport.conn()
    }

    fn claim_idle_ms(&self) -> u64 {
        self.transport.inner.config.claim_idle.as_millis() as u64
    }

    /// Acks `id` together with whatever other acks of this subscription
    /// are waiting; returns once Redis acknowledged it.
    async fn ack_batched(&self, id: String) -> Result<(), Error> {
        let (reply, replied) = oneshot::channel();
        self.acks
            .send((id, reply))
            .map_err(|_| Error::closed("redis-streams subscription"))?;
        replied
            .await
            .map_err(|_| Error::closed("redis-streams subscription"))?
    }

    async fn ack(&self, id: &str) -> Result<(), Error> {
        let _: Value = redis::cmd("XACK")
            .arg(&self.stream)
            .arg(&*self.group)
            .arg(id)
            .query_async(&mut self.conn())
            .await
            .map_err(|error| redis_error("XACK", error))?;
        Ok(())
    }

    /// `MULTI { XADD <stream>.dlq ...; XACK <stream> <group> <id> }`.
    async fn dead_letter(
        &self,
        id: &str,
        message: &RawMessage,
        letter: &DeadLetter,
        attempt: u32,
    ) -> Result<(), Error> {
        let mut xadd = redis::cmd("XADD");
        xadd.arg(&self.dlq).arg("*");
        append_message_fields(&mut xadd, message);
        xadd.arg(DLQ_TOPIC)
            .arg(&*self.topic)
            .arg(DLQ_GROUP)
            .arg(&*self.group)
            .arg(DLQ_REASON)
            .arg(letter.reason())
            .arg(DLQ_ATTEMPTS)
            .arg(letter.attempts().unwrap_or(attempt))
            .arg(DLQ_AT)
            .arg(Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
            .arg(DLQ_SOURCE_ID)
            .arg(id);
        if let Some(last_error) = letter.last_error() {
            xadd.arg(DLQ_LAST_ERROR).arg(last_error);
        }
        let mut pipe = redis::pipe();
        pipe.atomic()
            .add_command(xadd)
            .ignore()
            .cmd("XACK")
            .arg(&self.stream)
            .arg(&*self.group)
            .arg(id)
            .ignore();
        let _: Value = pipe
            .query_async(&mut self.conn())
            .await
            .map_err(|error| redis_error("dead-letter (MULTI XADD XACK)", error))?;
        Ok(())
    }

    /// Keeps `ids` pending for this consumer but marks them idle for
    /// `idle_ms`, so any member's next `XAUTOCLAIM` with `claim_idle` takes
    /// them once `claim_idle - idle_ms` has passed. `JUSTID` leaves the
    /// delivery counter as it is.
    async fn give_back(&self, ids: &[String], idle_ms: u64) {
        if ids.is_empty() {
            return;
        }
        let given: RedisResult<Value> = redis::cmd("XCLAIM")
            .arg(&self.stream)
            .arg(&*self.group)
            .arg(&self.consumer)
            .arg(0)
            .arg(ids)
            .arg("IDLE")
            .arg(idle_ms)
            .arg("JUSTID")
            .query_async(&mut self.conn())
            .await;
        if let Err(error) = given {
            tracing::warn!(
                stream = %self.stream,
                group = %self.group,
                %error,
                "cannot hand entries back; they are reclaimed after claim_idle",
            );
        }
    }

    /// Re-reads entries this consumer holds, raising their delivery counters.
    async fn claim(&self, ids: &[String], min_idle_ms: u64) -> RedisResult<Vec<StreamId>> {
        let reply: StreamClaimReply = redis::cmd("XCLAIM")
            .arg(&self.stream)
            .arg(&*self.group)
            .arg(&self.consumer)
            .arg(min_idle_ms)
            .arg(ids)
            .query_async(&mut self.conn())
            .await?;
        Ok(reply.ids)
    }

    /// Delivery counters of this consumer's pending entries between `first`
    /// and `last`.
    async fn delivery_counts(
        &self,
        first: &str,
        last: &str,
        count: usize,
    ) -> RedisResult<HashMap<String, u32>> {
        let reply: StreamPendingCountReply = redis::cmd("XPENDING")
            .arg(&self.stream)
            .arg(&*self.group)
            .arg(first)
            .arg(last)
            .arg(count)
            .arg(&self.consumer)
            .query_async(&mut self.conn())
            .await?;
        Ok(reply
            .ids
            .into_iter()
            .map(|pending| (pending.id, pending.times_delivered as u32))
            .collect())
    }
}

type ReadFuture = BoxFuture<'static, RedisResult<Option<StreamReadReply>>>;

/// One subscription's reading side: what the [`Subscription`] stream polls.
struct Reader {
    group: Arc<Group>,
    blocking: Conn,
    /// `CLIENT ID` of the blocking connection, to interrupt a read on stop.
    client_id: Option<i64>,
    permits: Arc<Semaphore>,
    buffer: VecDeque<Entry>,
    /// Nacked entries whose delay has passed, re-read by their ackers.
    ready_tx: mpsc::UnboundedSender<Entry>,
    ready_rx: mpsc::UnboundedReceiver<Entry>,
    /// A blocking read in flight; kept across polls because dropping it could
    /// lose the entries its reply carries.
    read: Option<ReadFuture>,
    started: bool,
    next_claim: Instant,
    claim_cursor: String,
    /// Delays between failed reads in a row; `None` after a success.
    backoff: Option<backon::ExponentialBackoff>,
    /// Set on drop: the task handing back what was read but not handed out.
    stopping: Arc<Mutex<Option<JoinHandle<()>>>>,
}

impl Reader {
    async fn next(&mut self) -> Option<Delivery> {
        loop {
            if !self.buffer.is_empty() {
                // Take the permit first: if this future is dropped while
                // waiting, the entry is still in the buffer to be handed back.
                let permit = self.permits.clone().acquire_owned().await.ok()?;
                let entry = self.buffer.pop_front()?;
                if let Some(delivery) = self.hand_out(entry, permit).await {
                    return Some(delivery);
                }
                continue;
            }
            while let Ok(entry) = self.ready_rx.try_recv() {
                self.buffer.push_back(entry);
            }
            if !self.buffer.is_empty() {
                continue;
            }
            if !self.started {
                match self.recover_own().await {
                    Ok(()) => self.started = true,
                    Err(error) => self.failed("re-read own pending entries", error).await,
                }
                continue;
            }
            if Instant::now() >= self.next_claim {
                if let Err(error) = self.claim_idle().await {
                    self.failed("XAUTOCLAIM", error).await;
                }
                continue;
            }
            self.wait_for_entries().await;
        }
    }

    /// Turns an entry into a delivery, or settles it here when it must not
    /// reach the handler.
    async fn hand_out(&mut self, entry: Entry, permit: OwnedSemaphorePermit) -> Option<Delivery> {
        if entry.foreign {
            if let Err(error) = self.group.ack(&entry.id).await {
                tracing::warn!(%error, id = entry.id, "cannot skip another group's redrive");
            }
            return None;
        }
        if let Some(problem) = &entry.problem {
            let letter = DeadLetter::new(problem.clone()).with_attempts(entry.attempt);
            tracing::warn!(
                stream = %self.group.stream,
                id = entry.id,
                reason = problem,
                "dead-lettering an entry that carries no message",
            );
            if let Err(error) = self
                .group
                .dead_letter(&entry.id, &entry.message, &letter, entry.attempt)
                .await
            {
                tracing::warn!(%error, id = entry.id, "dead-letter failed; entry stays pending");
            }
            return None;
        }
        let acker = RedisAcker {
            group: self.group.clone(),
            id: entry.id,
            attempt: entry.attempt,
            ready: self.ready_tx.clone(),
            permit: Some(permit),
        };
        Some(Delivery::new(
            entry.message,
            self.group.topic.clone(),
            self.group.group.clone(),
            entry.attempt,
            Box::new(acker),
        ))
    }

    /// Blocks on `XREADGROUP ... >` until entries arrive, a nacked entry is
    /// due, or it is time to look for idle entries.
    async fn wait_for_entries(&mut self) {
        let read = match &mut self.read {
            Some(read) => read,
            None => self.read.insert(self.start_read()),
        };
        tokio::select! {
            reply = read => {
                self.read = None;
                match reply {
                    Ok(reply) => {
                        self.backoff = None;
                        for key in reply.map(|reply| reply.keys).unwrap_or_default() {
                            for id in key.ids {
                                let entry = self.group.entry(id, 1);
                                self.buffer.push_back(entry);
                            }
                        }
                    }
                    Err(error) => {
                        self.failed("XREADGROUP", error).await;
                        self.refresh_client_id().await;
                    }
                }
            }
            Some(entry) = self.ready_rx.recv() => self.buffer.push_back(entry),
            () = tokio::time::sleep_until(self.next_claim) => {}
        }
    }

    fn start_read(&self) -> ReadFuture {
        let config = &self.group.transport.inner.config;
        let count = self.permits.available_permits().clamp(1, config.batch);
        let mut cmd = redis::cmd("XREADGROUP");
        cmd.arg("GROUP")
            .arg(&*self.group.group)
            .arg(&self.group.consumer)
            .arg("COUNT")
            .arg(count)
            .arg("BLOCK")
            .arg(config.block.as_millis() as u64)
            .arg("STREAMS")
            .arg(&self.group.stream)
            .arg(">");
        let mut conn = self.blocking.clone();
        Box::pin(async move { cmd.query_async(&mut conn).await })
    }

    /// Re-reads what is still pending for this consumer name: left by an
    /// earlier run under the same name (the `0` read of the Redis docs, done
    /// with XPENDING + XCLAIM so the delivery counters are known).
    async fn recover_own(&mut self) -> RedisResult<()> {
        let mut after = "-".to_owned();
        loop {
            let counts = self
                .group
                .delivery_counts(&after, "+", RECOVER_PAGE)
                .await?;
            if counts.is_empty() {
                return Ok(());
            }
            let mut ids: Vec<String> = counts.keys().cloned().collect();
            ids.sort_by_key(|id| stream_id_order(id));
            let claimed = self.group.claim(&ids, 0).await?;
            for id in claimed {
                let attempt = counts.get(&id.id).map_or(1, |n| n + 1);
                let entry = self.group.entry(id, attempt);
                self.buffer.push_back(entry);
            }
            if ids.len() < RECOVER_PAGE {
                return Ok(());
            }
            after = format!("({}", ids[ids.len() - 1]);
        }
    }

    /// Takes over entries idle for `claim_idle` in any consumer's pending
    /// list (a dead consumer's, or ones handed back).
    async fn claim_idle(&mut self) -> RedisResult<()> {
        let config = &self.group.transport.inner.config;
        let count = config.batch;
        let reply: StreamAutoClaimReply = redis::cmd("XAUTOCLAIM")
            .arg(&self.group.stream)
            .arg(&*self.group.group)
            .arg(&self.group.consumer)
            .arg(self.group.claim_idle_ms())
            .arg(&self.claim_cursor)
            .arg("COUNT")
            .arg(count)
            .query_async(&mut self.group.conn())
            .await?;
        let more = reply.next_stream_id != "0-0";
        self.claim_cursor = reply.next_stream_id;
        // A full scan is done: wait; more to scan: continue at once.
        self.next_claim = if more {
            Instant::now()
        } else {
            Instant::now() + config.claim_interval()
        };
        let (Some(first), Some(last)) = (reply.claimed.first(), reply.claimed.last()) else {
            return Ok(());
        };
        let counts = self
            .group
            .delivery_counts(&first.id, &last.id, reply.claimed.len() + 1000)
            .await?;
        tracing::info!(
            stream = %self.group.stream,
            group = %self.group.group,
            claimed = reply.claimed.len(),
            "took over idle pending entries",
        );
        for id in reply.claimed {
            let attempt = counts.get(&id.id).copied().unwrap_or(1);
            let entry = self.group.entry(id, attempt);
            self.buffer.push_back(entry);
        }
        Ok(())
    }

    async fn refresh_client_id(&mut self) {
        if matches!(self.blocking, Conn::Cluster(_)) {
            return;
        }
        self.client_id = redis::cmd("CLIENT")
            .arg("ID")
            .query_async(&mut self.blocking)
            .await
            .ok();
    }

    /// Logs a failed command and waits a little longer each time in a row
    /// (up to 2 s); a missing group (the stream was deleted, or a server
    /// without persistence restarted) is created again.
    async fn failed(&mut self, what: &str, error: RedisError) {
        if error.code() == Some("NOGROUP") {
            let group = &self.group;
            let start = group.transport.inner.config.group_start;
            if let Err(error) = ensure_group(group.conn(), &group.stream, &group.group, start).await
            {
                tracing::warn!(%error, "cannot create the consumer group again");
            }
        }
        let delay = self
            .backoff
            .get_or_insert_with(read_backoff)
            .next()
            .unwrap_or(Duration::from_secs(2));
        tracing::warn!(
            stream = %self.group.stream,
            group = %self.group.group,
            %error,
            retry_in = ?delay,
            "redis-streams: {what} failed",
        );
        tokio::time::sleep(delay).await;
    }
}

/// 50 ms doubling to 2 s with jitter, for as long as the server is away.
fn read_backoff() -> backon::ExponentialBackoff {
    use backon::BackoffBuilder;
    backon::ExponentialBuilder::new()
        .with_min_delay(Duration::from_millis(50))
        .with_max_delay(Duration::from_secs(2))
        .with_jitter()
        .without_max_times()
        .build()
}

/// Orders stream ids (`<ms>-<seq>`) numerically.
fn stream_id_order(id: &str) -> (u64, u64) {
    let (ms, seq) = id.split_once('-').unwrap_or((id, "0"));
    (ms.parse().unwrap_or(0), seq.parse().unwrap_or(0))
}

impl Drop for Reader {
    fn drop(&mut self) {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let mut ids: Vec<String> = self.buffer.drain(..).map(|entry| entry.id).collect();
        while let Ok(entry) = self.ready_rx.try_recv() {
            ids.push(entry.id);
        }
        let read = self.read.take();
        let group = self.group.clone();
        let client_id = self.client_id;
        let task = runtime.spawn(async move {
            if let Some(read) = read {
                if let Some(client_id) = client_id {
                    // Ends the BLOCK now; a reply already on its way still
                    // arrives and is handed back below.
                    let _: RedisResult<Value> = redis::cmd("CLIENT")
                        .arg("UNBLOCK")
                        .arg(client_id)
                        .query_async(&mut group.conn())
                        .await;
                }
                if let Ok(Some(reply)) = read.await {
                    ids.extend(
                        reply
                            .keys
                            .into_iter()
                            .flat_map(|key| key.ids)
                            .map(|id| id.id),
                    );
                }
            }
            group.give_back(&ids, group.claim_idle_ms()).await;
        });
        *lock(&self.stopping) = Some(task);
    }
}

struct RedisAcker {
    group: Arc<Group>,
    id: String,
    attempt: u32,
    ready: mpsc::UnboundedSender<Entry>,
    /// Held until the delivery is settled or dropped; counts it as in flight.
    permit: Option<OwnedSemaphorePermit>,
}

#[async_trait]
impl Acker for RedisAcker {
    async fn ack(&mut self, _message: &RawMessage) -> Result<(), Error> {
        self.group.ack_batched(self.id.clone()).await?;
        self.permit = None;
        Ok(())
    }

    async fn nack(&mut self, _message: &RawMessage, delay: Duration) -> Result<(), Error> {
        let group = self.group.clone();
        // Reset the entry's idle time, so no other member takes it over
        // while the delay runs (unless the delay is longer than claim_idle).
        let ids = [self.id.clone()];
        let _: Value = redis::cmd("XCLAIM")
            .arg(&group.stream)
            .arg(&*group.group)
            .arg(&group.consumer)
            .arg(0)
            .arg(&ids)
            .arg("JUSTID")
            .query_async(&mut group.conn())
            .await
            .map_err(|error| redis_error("nack (XCLAIM)", error))?;
        let ready = self.ready.clone();
        let attempt = self.attempt;
        tokio::spawn(async move {
            let started = Instant::now();
            tokio::select! {
                () = tokio::time::sleep(delay) => {}
                () = ready.closed() => {
                    // The subscription stopped: make the entry claimable by
                    // any member once the rest of the delay has passed.
                    let left = delay.saturating_sub(started.elapsed()).as_millis() as u64;
                    group.give_back(&ids, group.claim_idle_ms().saturating_sub(left)).await;
                    return;
                }
            }
            // Idle at least (about) the delay: nobody took it over meanwhile.
            let delay_ms = delay.as_millis() as u64;
            let min_idle = delay_ms.saturating_sub(delay_ms / 10 + 2);
            match group.claim(&ids, min_idle).await {
                Ok(claimed) => {
                    for id in claimed {
                        let entry = group.entry(id, attempt.saturating_add(1));
                        if let Err(unsent) = ready.send(entry) {
                            group.give_back(&[unsent.0.id], group.claim_idle_ms()).await;
                        }
                    }
                }
                Err(error) => tracing::warn!(
                    %error,
                    "cannot re-read a nacked entry; it is reclaimed after claim_idle",
                ),
            }
        });
        self.permit = None;
        Ok(())
    }

    async fn dead_letter(
        &mut self,
        message: &RawMessage,
        letter: &DeadLetter,
    ) -> Result<(), Error> {
        self.group
            .dead_letter(&self.id, message, letter, self.attempt)
            .await?;
        self.permit = None;
        Ok(())
    }

    fn abandoned(&mut self, _message: RawMessage) {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let group = self.group.clone();
        let ids = [std::mem::take(&mut self.id)];
        // The permit is released only once the entry is handed back, so a
        // drained subscription has handed back everything.
        let permit = self.permit.take();
        runtime.spawn(async move {
            group.give_back(&ids, group.claim_idle_ms()).await;
            drop(permit);
        });
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_ids_order_numerically() {
        assert!(stream_id_order("9-1") < stream_id_order("10-0"));
        assert!(stream_id_order("10-2") < stream_id_order("10-10"));
    }

    #[test]
    fn an_entry_without_envelope_is_a_problem_naming_its_fields() {
        let mut map = HashMap::new();
        map.insert("payload".to_owned(), Value::BulkString(b"x".to_vec()));
        map.insert("h:trace".to_owned(), Value::BulkString(b"7".to_vec()));
        let (message, problem) = message_from_fields(map);
        assert_eq!(message.headers["trace"], "7");
        let problem = problem.expect("a problem");
        assert!(problem.contains("no `envelope` field"), "{problem}");
        assert!(problem.contains("payload"), "{problem}");
    }

    #[test]
    fn fields_round_trip_headers() {
        let message = RawMessage::new(r#"{"event_id":"e-1","event_type":"t.x"}"#)
            .with_header("note", "a b;c");
        let mut cmd = redis::cmd("XADD");
        append_message_fields(&mut cmd, &message);
        let args: Vec<String> = cmd
            .args_iter()
            .map(|arg| match arg {
                redis::Arg::Simple(bytes) => String::from_utf8_lossy(bytes).into_owned(),
                _ => String::new(),
            })
            .collect();
        let mut map = HashMap::new();
        for pair in args[1..].chunks(2) {
            map.insert(
                pair[0].clone(),
                Value::BulkString(pair[1].clone().into_bytes()),
            );
        }
        let (back, problem) = message_from_fields(map);
        assert!(problem.is_none());
        assert_eq!(back.body, message.body);
        assert_eq!(back.headers["note"], "a b;c");
        assert_eq!(back.headers[header::EVENT_ID], "e-1");
        assert_eq!(back.headers[header::EVENT_TYPE], "t.x");
    }

    #[test]
    fn config_refuses_impossible_values() {
        assert!(RedisStreamsConfig::default().validate().is_ok());
        assert!(
            RedisStreamsConfig::default()
                .with_batch(0)
                .validate()
                .is_err()
        );
        assert!(
            RedisStreamsConfig::default()
                .with_block(Duration::ZERO)
                .validate()
                .is_err()
        );
    }
}
