//! The measured paths, each written twice: through switchboard and with the
//! raw client the way a service would write it by hand. One process runs
//! one path on one side for `n` messages ([`measure`]); what it needs in
//! place before it starts (a stream or queue filled with `n` envelopes, the
//! messages of a live broadcast) comes from a child process ([`feed`]),
//! which callgrind does not follow, so the figures are the consumer's alone.

use std::collections::HashMap;
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures_util::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{BasicProperties, Confirmation, ExchangeKind};
use redis::aio::MultiplexedConnection;
use switchboard::transport::amqp::AmqpConfig;
use switchboard::transport::redis_pubsub::RedisPubSubOptions;
use switchboard::transport::redis_streams::RedisStreamsConfig;
use switchboard::{
    AmqpTransport, Event, EventBus, MemoryTransport, Message, RedisPubSubTransport,
    RedisStreamsTransport, SubscribeOptions, Topology, handler_fn,
};
use tokio::sync::Notify;

use crate::event::{SOURCE, TradeExecuted, raw_decode, raw_encode};

mod on_rabbitmq;
mod on_redis;

use self::on_rabbitmq::*;
use self::on_redis::*;
pub use self::on_redis::{forget, streams_consume_default, streams_group};

/// Read `COUNT` and prefetch on both sides.
pub const BATCH: usize = 128;

/// The group every consumer reads as.
const GROUP: &str = "game";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Path {
    Memory,
    StreamsPublish,
    StreamsConsume,
    PubsubPublish,
    PubsubConsume,
    AmqpPublish,
    AmqpConsume,
}

impl Path {
    pub const ALL: [Path; 7] = [
        Path::StreamsPublish,
        Path::StreamsConsume,
        Path::PubsubPublish,
        Path::PubsubConsume,
        Path::AmqpPublish,
        Path::AmqpConsume,
        Path::Memory,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Path::Memory => "memory",
            Path::StreamsPublish => "redis_streams_publish",
            Path::StreamsConsume => "redis_streams_consume",
            Path::PubsubPublish => "redis_pubsub_publish",
            Path::PubsubConsume => "redis_pubsub_consume",
            Path::AmqpPublish => "rabbitmq_publish",
            Path::AmqpConsume => "rabbitmq_consume",
        }
    }

    /// What one message costs on this path, for the table.
    pub fn label(self) -> &'static str {
        match self {
            Path::Memory => "memory bus: publish → handler (raw: tokio mpsc)",
            Path::StreamsPublish => "Redis Streams: publish, XADD awaited",
            Path::StreamsConsume => "Redis Streams: consume from a filled stream, COUNT 128, ack",
            Path::PubsubPublish => "Redis Pub/Sub: publish, PUBLISH awaited",
            Path::PubsubConsume => "Redis Pub/Sub: receive a broadcast",
            Path::AmqpPublish => "RabbitMQ: persistent publish, confirm awaited",
            Path::AmqpConsume => "RabbitMQ: consume from a filled queue, prefetch 128, ack",
        }
    }

    /// Publish (allocation goal + 4) or consume (+ 8).
    pub fn publishes(self) -> bool {
        matches!(
            self,
            Path::StreamsPublish | Path::PubsubPublish | Path::AmqpPublish
        )
    }

    /// Whether it runs against Redis (reads and round trips are counted).
    fn on_redis(self) -> bool {
        !matches!(self, Path::Memory | Path::AmqpPublish | Path::AmqpConsume)
    }
}

impl FromStr for Path {
    type Err = String;
    fn from_str(name: &str) -> Result<Self, String> {
        Path::ALL
            .into_iter()
            .find(|path| path.name() == name)
            .ok_or_else(|| format!("no path {name:?}"))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Raw,
    Switchboard,
}

impl Side {
    pub fn name(self) -> &'static str {
        match self {
            Side::Raw => "raw",
            Side::Switchboard => "switchboard",
        }
    }
}

impl FromStr for Side {
    type Err = String;
    fn from_str(name: &str) -> Result<Self, String> {
        match name {
            "raw" => Ok(Side::Raw),
            "switchboard" => Ok(Side::Switchboard),
            other => Err(format!("no side {other:?}")),
        }
    }
}

/// What a measured process reports besides its instructions.
#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct Counted {
    pub allocations: u64,
    pub bytes: u64,
    /// `XREADGROUP` calls (Redis Streams consume).
    pub reads: Option<u64>,
    /// Every command the broker saw from the measured process.
    pub commands: Option<u64>,
    /// The same, by command.
    #[serde(default)]
    pub by_command: std::collections::BTreeMap<String, u64>,
}

pub fn redis_url() -> String {
    std::env::var("SWITCHBOARD_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned())
}

pub fn amqp_url() -> String {
    std::env::var("SWITCHBOARD_AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".to_owned())
}

/// Runs `path` on `side` for `n` messages under the names of `name`.
pub async fn measure(path: Path, side: Side, n: u64, name: &str) -> Counted {
    let mut stats = if path.on_redis() {
        Some(CommandStats::connect().await)
    } else {
        None
    };
    let mut before = HashMap::new();
    if let Some(stats) = &mut stats {
        before = stats.read().await;
    }
    match (path, side) {
        (Path::Memory, Side::Switchboard) => memory_switchboard(n).await,
        (Path::Memory, Side::Raw) => memory_raw(n).await,
        (Path::StreamsPublish, Side::Switchboard) => {
            let bus = streams_bus(name).await;
            for i in 0..n {
                bus.publish(TradeExecuted::numbered(i))
                    .await
                    .expect("publish");
            }
        }
        (Path::StreamsPublish, Side::Raw) => {
            let mut conn = redis_connection().await;
            let key = format!("{name}.raw");
            for i in 0..n {
                let _: String = xadd(&key, i).query_async(&mut conn).await.expect("XADD");
            }
        }
        (Path::StreamsConsume, Side::Switchboard) => {
            let bus = streams_bus(name).await;
            bus.declare(&Topology::new().with_event::<TradeExecuted, _>([GROUP]))
                .await
                .expect("declare");
            run_feeder(path, side, n, name).wait();
            if let Some(stats) = &mut stats {
                before = stats.read().await;
            }
            consume_through(&bus, n).await;
        }
        (Path::StreamsConsume, Side::Raw) => {
            let mut conn = redis_connection().await;
            let key = format!("{name}.raw");
            let _: () = redis::cmd("XGROUP")
                .arg("CREATE")
                .arg(&key)
                .arg(GROUP)
                .arg("$")
                .arg("MKSTREAM")
                .query_async(&mut conn)
                .await
                .expect("XGROUP CREATE");
            run_feeder(path, side, n, name).wait();
            if let Some(stats) = &mut stats {
                before = stats.read().await;
            }
            streams_consume_raw(conn, &key, n).await;
        }
        (Path::PubsubPublish, Side::Switchboard) => {
            let bus = pubsub_bus(name, RedisPubSubOptions::default()).await;
            for i in 0..n {
                bus.publish(TradeExecuted::numbered(i))
                    .await
                    .expect("publish");
            }
        }
        (Path::PubsubPublish, Side::Raw) => {
            let mut conn = redis_connection().await;
            let channel = format!("{name}.raw");
            for i in 0..n {
                let _: i64 = redis::cmd("PUBLISH")
                    .arg(&channel)
                    .arg(raw_encode(i).0)
                    .query_async(&mut conn)
                    .await
                    .expect("PUBLISH");
            }
        }
        (Path::PubsubConsume, Side::Switchboard) => {
            // Room for every message: the subscriber under callgrind is far
            // slower than the feeder, and a full inbox drops.
            let options = RedisPubSubOptions::default().with_inbox_capacity(n as usize + 16);
            let bus = pubsub_bus(name, options).await;
            let (handler, done) = counting_handler(n);
            let consumer = bus
                .subscribe::<TradeExecuted, _>(subscribe_options(), handler)
                .await
                .expect("subscribe");
            let feeder = run_feeder(path, side, n, name);
            done.notified().await;
            consumer.shutdown().await.expect("shutdown");
            feeder.wait();
        }
        (Path::PubsubConsume, Side::Raw) => pubsub_consume_raw(path, side, n, name).await,
        (Path::AmqpPublish, Side::Switchboard) => {
            let bus = amqp_bus(name).await;
            for i in 0..n {
                bus.publish(TradeExecuted::numbered(i))
                    .await
                    .expect("publish");
            }
        }
        (Path::AmqpPublish, Side::Raw) => {
            let (_connection, channel) = raw_amqp(name).await;
            let exchange = format!("{name}.raw");
            for i in 0..n {
                raw_amqp_publish(&channel, &exchange, i).await;
            }
        }
        (Path::AmqpConsume, Side::Switchboard) => {
            let bus = amqp_bus(name).await;
            run_feeder(path, side, n, name).wait();
            consume_through(&bus, n).await;
        }
        (Path::AmqpConsume, Side::Raw) => {
            let (connection, channel) = raw_amqp(name).await;
            run_feeder(path, side, n, name).wait();
            amqp_consume_raw(&connection, &channel, name, n).await;
        }
    }
    let mut counted = Counted::default();
    if let Some(stats) = &mut stats {
        let after = stats.read().await;
        let delta = |command: &str| {
            after.get(command).copied().unwrap_or(0) - before.get(command).copied().unwrap_or(0)
        };
        counted.reads = Some(delta("xreadgroup"));
        // Less the INFO that read `before`, and the feeder's broadcast.
        let feeders = |command: &str| {
            command == "info" || (path == Path::PubsubConsume && command == "publish")
        };
        counted.by_command = after
            .keys()
            .filter(|command| !feeders(command))
            .map(|command| (command.clone(), delta(command)))
            .filter(|(_, calls)| *calls > 0)
            .collect();
        counted.commands = Some(counted.by_command.values().sum());
    }
    (counted.allocations, counted.bytes) = crate::count::totals();
    counted
}

/// Fills what `path` reads on `side` with `n` envelopes (run as a child
/// process of the measured one).
pub async fn feed(path: Path, side: Side, n: u64, name: &str) {
    match (path, side) {
        (Path::StreamsConsume, Side::Switchboard) => {
            let bus = streams_bus(name).await;
            publish_batches(&bus, n).await;
        }
        (Path::StreamsConsume, Side::Raw) => {
            let mut conn = redis_connection().await;
            let key = format!("{name}.raw");
            for start in (0..n).step_by(100) {
                let mut pipe = redis::pipe();
                for i in start..(start + 100).min(n) {
                    pipe.add_command(xadd(&key, i)).ignore();
                }
                let _: () = pipe.query_async(&mut conn).await.expect("XADD");
            }
        }
        (Path::PubsubConsume, Side::Switchboard) => {
            let bus = pubsub_bus(name, RedisPubSubOptions::default()).await;
            for i in 0..n {
                bus.publish(TradeExecuted::numbered(i))
                    .await
                    .expect("publish");
            }
        }
        (Path::PubsubConsume, Side::Raw) => {
            let mut conn = redis_connection().await;
            let channel = format!("{name}.raw");
            for i in 0..n {
                let _: i64 = redis::cmd("PUBLISH")
                    .arg(&channel)
                    .arg(raw_encode(i).0)
                    .query_async(&mut conn)
                    .await
                    .expect("PUBLISH");
            }
        }
        (Path::AmqpConsume, Side::Switchboard) => {
            let bus = amqp_bus(name).await;
            publish_batches(&bus, n).await;
        }
        (Path::AmqpConsume, Side::Raw) => {
            let (_connection, channel) = raw_amqp(name).await;
            let exchange = format!("{name}.raw");
            let mut confirms = Vec::new();
            for i in 0..n {
                let (body, event_id) = raw_encode(i);
                confirms.push(
                    channel
                        .basic_publish(
                            exchange.as_str().into(),
                            TradeExecuted::TYPE.into(),
                            BasicPublishOptions::default(),
                            &body,
                            raw_properties(event_id),
                        )
                        .await
                        .expect("publish"),
                );
            }
            for confirm in confirms {
                confirm.await.expect("confirm");
            }
        }
        (path, _) => panic!("{} needs no feeding", path.name()),
    }
}

/// Starts `cost feed` for this run (the binary named by `COST_EXE`, else
/// this one).
fn run_feeder(path: Path, side: Side, n: u64, name: &str) -> Feeder {
    let exe = std::env::var_os("COST_EXE")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| std::env::current_exe().expect("own path"));
    let child = std::process::Command::new(exe)
        .args(["feed", path.name(), side.name(), &n.to_string(), name])
        .spawn()
        .expect("start the feeder");
    Feeder(child)
}

struct Feeder(std::process::Child);

impl Feeder {
    fn wait(mut self) {
        let status = self.0.wait().expect("feeder");
        assert!(status.success(), "the feeder failed: {status}");
    }
}

async fn publish_batches(bus: &EventBus, n: u64) {
    for start in (0..n).step_by(100) {
        bus.publish_batch((start..(start + 100).min(n)).map(TradeExecuted::numbered))
            .await
            .expect("publish_batch");
    }
}

/// Subscribe options of both sides' consumers: the default concurrency
/// (1), prefetch [`BATCH`].
fn subscribe_options() -> SubscribeOptions {
    SubscribeOptions::new(GROUP).with_prefetch(BATCH)
}

/// A handler that looks at each payload and says when it has seen `n`.
fn counting_handler(
    n: u64,
) -> (
    impl tower::Service<
        Message<TradeExecuted>,
        Response = (),
        Error = switchboard::Error,
        Future = impl Send + 'static,
    > + Send
    + 'static,
    Arc<Notify>,
) {
    let seen = Arc::new(AtomicU64::new(0));
    let done = Arc::new(Notify::new());
    let notify = done.clone();
    let handler = handler_fn(move |message: Message<TradeExecuted>| {
        std::hint::black_box(message.payload().quantity);
        if seen.fetch_add(1, Ordering::Relaxed) + 1 == n {
            notify.notify_one();
        }
        async { Ok::<(), switchboard::Error>(()) }
    });
    (handler, done)
}

/// Consumes `n` messages through `bus` and stops the consumer.
async fn consume_through(bus: &EventBus, n: u64) {
    let (handler, done) = counting_handler(n);
    let consumer = bus
        .subscribe::<TradeExecuted, _>(subscribe_options(), handler)
        .await
        .expect("subscribe");
    done.notified().await;
    consumer.shutdown().await.expect("shutdown");
}

// ---- memory -------------------------------------------------------------

async fn memory_switchboard(n: u64) {
    let bus = EventBus::new(Arc::new(MemoryTransport::new()), SOURCE);
    let (handler, done) = counting_handler(n);
    let consumer = bus
        .subscribe::<TradeExecuted, _>(subscribe_options(), handler)
        .await
        .expect("subscribe");
    for i in 0..n {
        bus.publish(TradeExecuted::numbered(i))
            .await
            .expect("publish");
    }
    done.notified().await;
    consumer.shutdown().await.expect("shutdown");
}

async fn memory_raw(n: u64) {
    let (sender, mut receiver) = tokio::sync::mpsc::channel::<Vec<u8>>(BATCH);
    let consumer = tokio::spawn(async move {
        for _ in 0..n {
            let body = receiver.recv().await.expect("a message");
            std::hint::black_box(raw_decode(&body).payload.quantity);
        }
    });
    for i in 0..n {
        sender.send(raw_encode(i).0).await.expect("send");
    }
    consumer.await.expect("consumer");
}
