//! Confirmed persistent publish throughput to RabbitMQ (127.0.0.1:5672,
//! guest/guest): switchboard's `publish_batch` and concurrent `publish`
//! beside raw lapin with the same window of 256 outstanding confirms, on one
//! classic queue, in one run. Each sample publishes 1 000 messages of a
//! 309-byte envelope; the queue is purged between samples, outside the
//! timing. Runtime: tokio `current_thread` for both sides.
//!
//! `cargo bench --features amqp --bench amqp`

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use futures_util::StreamExt;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions, QueuePurgeOptions};
use lapin::{BasicProperties, Channel, Confirmation, Connection, ConnectionProperties};
use switchboard::transport::amqp::{AmqpConfig, AmqpTransport};
use switchboard::{Publisher, RawMessage, Topology, Transport, header};

const BROKER: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
const WINDOW: usize = 256;
const MESSAGES: usize = 1000;
const BODY: &str = r#"{"event_id":"6f1c2b9e-3f4a-4c1e-9a7b-2d8e5f6a7b8c","event_type":"trade.executed","timestamp":"2026-02-19T12:00:00.000000Z","source":"trading-service","version":"1.0","payload":{"order_id":"123","user_id":"456","symbol":"AAPL","quantity":100,"price":150.0},"headers":{"correlation-id":"3b9d1e2f-4a5b-6c7d-8e9f-0a1b2c3d4e5f"}}"#;

struct Setup {
    transport: AmqpTransport,
    raw: Channel,
    _connection: Connection,
    exchange: String,
    topic: String,
    queue: String,
}

async fn setup() -> Setup {
    let exchange = format!("sb-bench-{}", uuid::Uuid::new_v4().simple());
    let config = AmqpConfig::new(BROKER)
        .with_exchange(exchange.clone())
        .with_exchange_auto_delete(true)
        .with_queue_expires(Duration::from_secs(60))
        .with_publish_window(WINDOW);
    let transport = AmqpTransport::connect(config.clone())
        .await
        .expect("RabbitMQ on 127.0.0.1:5672");
    let topic = "trade.executed".to_owned();
    transport
        .declare(&Topology::new().with_groups(topic.clone(), ["bench"]))
        .await
        .expect("declare");
    let connection = Connection::connect(BROKER, ConnectionProperties::default())
        .await
        .expect("raw connection");
    let raw = connection.create_channel().await.expect("raw channel");
    raw.confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirm_select");
    let queue = config.queue_name(&topic, "bench").expect("queue name");
    Setup {
        transport,
        raw,
        _connection: connection,
        exchange,
        topic,
        queue,
    }
}

fn messages() -> Vec<RawMessage> {
    (0..MESSAGES)
        .map(|_| {
            RawMessage::new(BODY)
                .with_header(header::EVENT_ID, uuid::Uuid::new_v4().to_string())
                .with_header(header::EVENT_TYPE, "trade.executed")
        })
        .collect()
}

/// What a careful raw lapin publisher does: mandatory, persistent, the same
/// properties, `WINDOW` confirms outstanding, every confirm checked.
async fn raw_publish(setup: &Setup) {
    let mut pending = VecDeque::with_capacity(WINDOW);
    for _ in 0..MESSAGES {
        if pending.len() == WINDOW {
            check(pending.pop_front().unwrap()).await;
        }
        let properties = BasicProperties::default()
            .with_delivery_mode(2)
            .with_content_type("application/json".into())
            .with_message_id(uuid::Uuid::new_v4().to_string().into())
            .with_type("trade.executed".into())
            .with_timestamp(chrono::Utc::now().timestamp() as u64);
        let confirm = setup
            .raw
            .basic_publish(
                setup.exchange.as_str().into(),
                setup.topic.as_str().into(),
                BasicPublishOptions {
                    mandatory: true,
                    immediate: false,
                },
                BODY.as_bytes(),
                properties,
            )
            .await
            .expect("publish");
        pending.push_back(confirm);
    }
    for confirm in pending {
        check(confirm).await;
    }
}

async fn check(confirm: lapin::PublisherConfirm) {
    match confirm.await.expect("confirm") {
        Confirmation::Ack(None) => {}
        other => panic!("not confirmed: {other:?}"),
    }
}

async fn purge(setup: &Setup) {
    setup
        .raw
        .queue_purge(setup.queue.as_str().into(), QueuePurgeOptions::default())
        .await
        .expect("purge");
}

fn publish_throughput(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let setup = runtime.block_on(setup());

    let mut group = c.benchmark_group("amqp_confirmed_publish_1000");
    group.throughput(Throughput::Elements(MESSAGES as u64));
    group.sample_size(20);
    group.bench_function("raw_lapin_window_256", |b| {
        b.to_async(&runtime).iter_custom(|iterations| {
            let setup = &setup;
            async move {
                let mut total = Duration::ZERO;
                for _ in 0..iterations {
                    purge(setup).await;
                    let start = Instant::now();
                    raw_publish(setup).await;
                    total += start.elapsed();
                }
                total
            }
        })
    });
    group.bench_function("switchboard_publish_batch_window_256", |b| {
        b.to_async(&runtime).iter_custom(|iterations| {
            let setup = &setup;
            async move {
                let mut total = Duration::ZERO;
                for _ in 0..iterations {
                    purge(setup).await;
                    let batch = messages();
                    let start = Instant::now();
                    setup
                        .transport
                        .publish_batch(&setup.topic, batch)
                        .await
                        .expect("publish_batch");
                    total += start.elapsed();
                }
                total
            }
        })
    });
    group.bench_function("switchboard_256_concurrent_publish", |b| {
        b.to_async(&runtime).iter_custom(|iterations| {
            let setup = &setup;
            async move {
                let mut total = Duration::ZERO;
                for _ in 0..iterations {
                    purge(setup).await;
                    let batch = messages();
                    let start = Instant::now();
                    futures_util::stream::iter(batch)
                        .map(|message| setup.transport.publish(&setup.topic, message))
                        .buffer_unordered(WINDOW)
                        .for_each(|result| async move { result.expect("publish") })
                        .await;
                    total += start.elapsed();
                }
                total
            }
        })
    });
    group.finish();
    runtime.block_on(purge(&setup));
}

criterion_group!(benches, publish_throughput);
criterion_main!(benches);
