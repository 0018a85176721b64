//! Throughput at saturation: a consumer runs while a publisher sends N
//! events as fast as the broker takes them (batches of 256), and the run
//! ends when the consumer has handled the last. Per path, events/s end to
//! end and client CPU per event (every thread of this process: publisher,
//! consumer, the clients' I/O threads; `/proc/self/stat`, 10 ms ticks over
//! runs of a second or more), switchboard beside the raw client
//! doing the same by hand:
//!
//! * Redis Streams: `EventBus::publish_batch` and a subscription (prefetch
//!   256, the default concurrency of 1, `COUNT` 128) beside pipelined
//!   `XADD`s and a raw consumer reading `XREADGROUP COUNT 128` and acking
//!   each read with one `XACK` of all its ids;
//! * RabbitMQ: `publish_batch` (persistent, confirmed) and a subscription
//!   with prefetch 256 beside lapin publishing 256 and awaiting their
//!   confirms, and a lapin consumer with prefetch 256 acking each delivery;
//! * the memory bus alone (the crate's own ceiling; no raw side).
//!
//! Both sides build and parse the same SPEC envelope with serde_json. Raw
//! and switchboard alternate, and the figures are the median of the
//! repeats. Goal: switchboard ≥ 0.9 × raw end to end, CPU per event ≤ 1.2 ×.
//!
//! `cargo bench --bench saturation` (Redis and RabbitMQ on 127.0.0.1);
//! `SATURATION_EVENTS` (default 20 000), `SATURATION_REPEATS` (default
//! 3) and `SATURATION_PATHS` (say `redis,memory`: only those paths). Run by `cargo test` (no `--bench`), it moves 300 events once per
//! side: a smoke test.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::{
    TradeExecuted, amqp_url, declare_raw_queue, raw_decode, raw_encode, raw_queue_consumer,
    raw_stream_consumer, redis_url, unique,
};
use futures_util::StreamExt;
use lapin::options::{BasicAckOptions, BasicPublishOptions, ConfirmSelectOptions};
use lapin::{BasicProperties, Confirmation};
use switchboard::transport::amqp::{AmqpConfig, AmqpTransport};
use switchboard::transport::redis_streams::{RedisStreamsConfig, RedisStreamsTransport};
use switchboard::{
    EventBus, MemoryTransport, Message, SubscribeOptions, Topology, Transport, handler_fn,
};
use tokio::sync::Notify;

/// Events per publish batch.
const BATCH: usize = 256;
/// Prefetch on both sides, and Redis `COUNT`.
const PREFETCH: usize = 256;
const COUNT: usize = 128;
/// How long one run may take before the bench gives up on it.
const PATIENCE: Duration = Duration::from_secs(300);

/// One run's figures.
#[derive(Debug, Clone, Copy)]
struct Sample {
    per_second: f64,
    cpu_per_event: Duration,
}

/// CPU time of this process so far, user and system, every thread counted
/// (those that have ended too: the clients' I/O threads come and go with
/// their connections), from `/proc/self/stat`, in clock ticks of 10 ms.
fn cpu_time() -> Duration {
    const TICK: Duration = Duration::from_millis(10);
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // The command name (field 2) may hold spaces: count from after it.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    // utime and stime are fields 14 and 15, the 12th and 13th after it.
    let ticks = |index: usize| {
        fields
            .get(index)
            .and_then(|n| n.parse::<u32>().ok())
            .unwrap_or(0)
    };
    TICK * (ticks(11) + ticks(12))
}

/// Counts handled events and wakes the run at the last.
#[derive(Clone)]
struct Finish {
    handled: Arc<AtomicUsize>,
    done: Arc<Notify>,
    events: usize,
}

impl Finish {
    fn new(events: usize) -> Self {
        Self {
            handled: Arc::default(),
            done: Arc::default(),
            events,
        }
    }

    fn one(&self) {
        if self.handled.fetch_add(1, Ordering::Relaxed) + 1 == self.events {
            self.done.notify_one();
        }
    }

    /// Times `publish` plus the wait for the last event to be handled.
    async fn time(&self, publish: impl Future<Output = ()>) -> Sample {
        let (started, cpu) = (Instant::now(), cpu_time());
        let done = self.done.notified();
        publish.await;
        tokio::time::timeout(PATIENCE, done)
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "{} of {} events handled within {PATIENCE:?}",
                    self.handled.load(Ordering::Relaxed),
                    self.events
                )
            });
        let elapsed = started.elapsed();
        Sample {
            per_second: self.events as f64 / elapsed.as_secs_f64(),
            cpu_per_event: cpu_time().saturating_sub(cpu) / self.events as u32,
        }
    }
}

/// Publishes `events` through `bus` while a subscription of its own
/// handles them.
async fn through_bus(bus: EventBus, events: usize) -> Sample {
    bus.declare(&Topology::new().with_event::<TradeExecuted, _>(["game"]))
        .await
        .expect("declare");
    let finish = Finish::new(events);
    let handled = finish.clone();
    let consumer = bus
        .subscribe::<TradeExecuted, _>(
            SubscribeOptions::new("game").with_prefetch(PREFETCH),
            handler_fn(move |_: Message<TradeExecuted>| {
                handled.one();
                async { Ok::<_, switchboard::Error>(()) }
            }),
        )
        .await
        .expect("subscribe");
    let sample = finish
        .time(async {
            for start in (0..events).step_by(BATCH) {
                let batch =
                    (start..(start + BATCH).min(events)).map(|n| TradeExecuted::numbered(n as u64));
                bus.publish_batch(batch).await.expect("publish_batch");
            }
        })
        .await;
    consumer.shutdown().await.expect("shutdown");
    sample
}

async fn switchboard_streams(events: usize) -> Sample {
    let prefix = format!("{}:", unique("saturation"));
    let transport = RedisStreamsTransport::connect_with(
        &redis_url(),
        RedisStreamsConfig::default()
            .with_key_prefix(prefix.clone())
            .with_batch(COUNT),
    )
    .await
    .expect("Redis");
    let key = transport.stream_key("trade.executed");
    let sample = through_bus(
        EventBus::new(Arc::new(transport), "trading-service"),
        events,
    )
    .await;
    delete_keys(&[key]).await;
    sample
}

async fn raw_streams(events: usize) -> Sample {
    let key = format!("{}:raw", unique("saturation"));
    let finish = Finish::new(events);
    let (mut conn, consumer) = {
        let finish = finish.clone();
        raw_stream_consumer(&key, COUNT, move |body| {
            raw_decode(body);
            finish.one();
        })
        .await
    };
    let sample = finish
        .time(async {
            let mut sent = 0;
            while sent < events {
                let mut pipe = redis::pipe();
                for n in sent..(sent + BATCH).min(events) {
                    pipe.cmd("XADD")
                        .arg(&key)
                        .arg("*")
                        .arg("envelope")
                        .arg(raw_encode(n as u64))
                        .arg("event_type")
                        .arg("trade.executed")
                        .arg("event_id")
                        .arg(uuid::Uuid::new_v4().to_string())
                        .ignore();
                }
                let _: () = pipe.query_async(&mut conn).await.expect("XADD");
                sent += BATCH;
            }
        })
        .await;
    consumer.abort();
    delete_keys(&[key]).await;
    sample
}

async fn delete_keys(keys: &[String]) {
    let client = redis::Client::open(redis_url()).expect("url");
    if let Ok(mut conn) = client.get_multiplexed_async_connection().await {
        let _: Result<(), _> = redis::cmd("DEL").arg(keys).query_async(&mut conn).await;
    }
}

async fn switchboard_amqp(events: usize) -> Sample {
    let config = AmqpConfig::new(amqp_url())
        .with_exchange(unique("saturation"))
        .with_exchange_auto_delete(true)
        .with_queue_expires(Duration::from_secs(60));
    let transport = Arc::new(AmqpTransport::connect(config).await.expect("RabbitMQ"));
    let sample = through_bus(EventBus::new(transport.clone(), "trading-service"), events).await;
    transport.close().await.expect("close");
    sample
}

async fn raw_amqp(events: usize) -> Sample {
    let connection = lapin::Connection::connect(&amqp_url(), Default::default())
        .await
        .expect("raw connection");
    let publisher = connection.create_channel().await.expect("channel");
    publisher
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirm_select");
    let queue = unique("saturation-raw");
    declare_raw_queue(&publisher, &queue).await;
    let (_consuming, mut deliveries) =
        raw_queue_consumer(&connection, &queue, PREFETCH as u16).await;
    let finish = Finish::new(events);
    let consumer = {
        let finish = finish.clone();
        tokio::spawn(async move {
            while let Some(delivery) = deliveries.next().await {
                let delivery = delivery.expect("a delivery");
                raw_decode(&delivery.data);
                finish.one();
                delivery.ack(BasicAckOptions::default()).await.expect("ack");
            }
        })
    };
    let sample = finish
        .time(async {
            let mut sent = 0;
            while sent < events {
                let mut confirms = Vec::with_capacity(BATCH);
                for n in sent..(sent + BATCH).min(events) {
                    let properties = BasicProperties::default()
                        .with_delivery_mode(2)
                        .with_content_type("application/json".into())
                        .with_message_id(uuid::Uuid::new_v4().to_string().into())
                        .with_type("trade.executed".into());
                    let confirm = publisher
                        .basic_publish(
                            "".into(),
                            queue.as_str().into(),
                            BasicPublishOptions {
                                mandatory: true,
                                immediate: false,
                            },
                            &raw_encode(n as u64),
                            properties,
                        )
                        .await
                        .expect("publish");
                    confirms.push(confirm);
                }
                for confirm in confirms {
                    match confirm.await.expect("confirm") {
                        Confirmation::Ack(None) => {}
                        other => panic!("not confirmed: {other:?}"),
                    }
                }
                sent += BATCH;
            }
        })
        .await;
    consumer.abort();
    let _ = connection.close(200, "done".into()).await;
    sample
}

async fn memory(events: usize) -> Sample {
    let transport = Arc::new(MemoryTransport::new());
    through_bus(EventBus::new(transport, "trading-service"), events).await
}

fn median(mut samples: Vec<Sample>) -> Sample {
    samples.sort_by(|a, b| a.per_second.total_cmp(&b.per_second));
    let mut cpu: Vec<Duration> = samples.iter().map(|s| s.cpu_per_event).collect();
    cpu.sort();
    Sample {
        per_second: samples[samples.len() / 2].per_second,
        cpu_per_event: cpu[cpu.len() / 2],
    }
}

fn main() {
    let benching = std::env::args().any(|arg| arg == "--bench");
    let setting = |name: &str, default: usize| {
        std::env::var(name)
            .ok()
            .and_then(|value| value.parse().ok())
            .unwrap_or(default)
    };
    let (events, repeats) = if benching {
        (
            setting("SATURATION_EVENTS", 20_000),
            setting("SATURATION_REPEATS", 3),
        )
    } else {
        (300, 1)
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    println!(
        "saturation: {events} events per run, median of {repeats}, batches of {BATCH}, prefetch {PREFETCH}"
    );
    println!(
        "| path | switchboard events/s | raw events/s | ratio | switchboard CPU µs/event | raw CPU µs/event | ratio |"
    );
    println!("|---|---|---|---|---|---|---|");
    runtime.block_on(async {
        type Side = fn(usize) -> std::pin::Pin<Box<dyn Future<Output = Sample>>>;
        let paths: [(&str, Side, Option<Side>); 3] = [
            (
                "Redis Streams",
                |n| Box::pin(switchboard_streams(n)),
                Some(|n| Box::pin(raw_streams(n))),
            ),
            (
                "RabbitMQ",
                |n| Box::pin(switchboard_amqp(n)),
                Some(|n| Box::pin(raw_amqp(n))),
            ),
            ("memory bus", |n| Box::pin(memory(n)), None),
        ];
        // `SATURATION_PATHS=redis` (say): only the paths whose name holds
        // one of the comma-separated words, case aside.
        let only = std::env::var("SATURATION_PATHS")
            .unwrap_or_default()
            .to_lowercase();
        let wanted = |name: &str| {
            only.is_empty()
                || only
                    .split(',')
                    .any(|word| name.to_lowercase().contains(word.trim()))
        };
        for (name, switchboard, raw) in paths.into_iter().filter(|(name, ..)| wanted(name)) {
            let (mut ours, mut theirs) = (Vec::new(), Vec::new());
            for _ in 0..repeats {
                if let Some(raw) = raw {
                    theirs.push(raw(events).await);
                }
                ours.push(switchboard(events).await);
            }
            let ours = median(ours);
            let micros = |sample: Sample| sample.cpu_per_event.as_secs_f64() * 1e6;
            match theirs.is_empty() {
                true => println!(
                    "| {name} | {:.0} | – | – | {:.1} | – | – |",
                    ours.per_second,
                    micros(ours)
                ),
                false => {
                    let theirs = median(theirs);
                    println!(
                        "| {name} | {:.0} | {:.0} | {:.2} × | {:.1} | {:.1} | {:.2} × |",
                        ours.per_second,
                        theirs.per_second,
                        ours.per_second / theirs.per_second,
                        micros(ours),
                        micros(theirs),
                        micros(ours) / micros(theirs)
                    );
                }
            }
        }
    });
}
