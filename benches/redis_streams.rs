//! Redis Streams beside the raw client, interleaved in one run (raw,
//! switchboard, raw, switchboard) so drift in the shared machine hits both
//! alike:
//!
//! * batch publish: switchboard's `publish_batch` beside a raw pipelined
//!   `XADD` of the same entries (same fields, same bytes) through redis-rs.
//!   Goal: switchboard ≥ 0.9 × raw.
//! * one event's round trip: publish, receive on a subscription whose
//!   blocking read is already waiting, ack — beside raw `XADD`, a waiting
//!   `XREADGROUP ... BLOCK`, `XACK`.
//!
//! `cargo bench --bench redis_streams --features redis-streams`
//! (Redis at 127.0.0.1:6379 or `SWITCHBOARD_REDIS_URL`; current-thread
//! tokio runtime, which was fastest for one client on this machine.)
//!
//! Each sample publishes into a fresh stream key and deletes it afterwards,
//! outside the timed part, so the shared Redis does not fill up.

use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use switchboard::transport::redis_streams::{RedisStreamsConfig, RedisStreamsTransport};
use switchboard::{Publisher, RawMessage, header};

const BATCH: usize = 100;

fn redis_url() -> String {
    std::env::var("SWITCHBOARD_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned())
}

/// A SPEC §5.1 envelope as the bus would send it (about 300 bytes).
fn messages() -> Vec<RawMessage> {
    (0..BATCH)
        .map(|n| {
            let id = uuid::Uuid::new_v4().to_string();
            let body = format!(
                r#"{{"event_id":"{id}","event_type":"trade.executed","timestamp":"2026-02-19T12:00:00.000Z","source":"trading-service","version":"1.0","payload":{{"order_id":"{n}","user_id":"456","symbol":"AAPL","quantity":100,"price":150.0}}}}"#
            );
            RawMessage::new(body)
                .with_header(header::EVENT_ID, id)
                .with_header(header::EVENT_TYPE, "trade.executed")
        })
        .collect()
}

/// The same entries as one raw pipeline of XADDs.
fn raw_pipeline(key: &str, messages: &[RawMessage]) -> redis::Pipeline {
    let mut pipe = redis::pipe();
    for message in messages {
        pipe.cmd("XADD")
            .arg(key)
            .arg("*")
            .arg("envelope")
            .arg(message.body.as_ref())
            .arg("event_type")
            .arg(&message.headers[header::EVENT_TYPE])
            .arg("event_id")
            .arg(&message.headers[header::EVENT_ID])
            .ignore();
    }
    pipe
}

fn batch_publish(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let prefix = format!("sb-bench-{}:", uuid::Uuid::new_v4().simple());
    let (transport, conn) = runtime.block_on(async {
        let config = RedisStreamsConfig::default().with_key_prefix(prefix.clone());
        let transport = RedisStreamsTransport::connect_with(&redis_url(), config)
            .await
            .expect("connect to Redis");
        let conn = redis::Client::open(redis_url())
            .expect("client")
            .get_connection_manager()
            .await
            .expect("raw connection");
        (transport, conn)
    });
    let messages = messages();

    let mut group = c.benchmark_group("redis_streams_batch_publish");
    group.throughput(Throughput::Elements(BATCH as u64));
    for round in 1..=2 {
        group.bench_function(BenchmarkId::new("raw_pipelined_xadd", round), |b| {
            b.to_async(&runtime).iter_custom(|iters| {
                let (mut conn, messages) = (conn.clone(), messages.clone());
                let key = format!("{prefix}raw-{}", uuid::Uuid::new_v4().simple());
                async move {
                    let mut spent = Duration::ZERO;
                    for _ in 0..iters {
                        let pipe = raw_pipeline(&key, &messages);
                        let started = Instant::now();
                        let _: () = pipe.query_async(&mut conn).await.expect("XADD");
                        spent += started.elapsed();
                    }
                    let _: () = redis::cmd("DEL")
                        .arg(&key)
                        .query_async(&mut conn)
                        .await
                        .expect("DEL");
                    spent
                }
            });
        });
        group.bench_function(BenchmarkId::new("switchboard_publish_batch", round), |b| {
            b.to_async(&runtime).iter_custom(|iters| {
                let (transport, mut conn, messages) =
                    (transport.clone(), conn.clone(), messages.clone());
                let topic = format!("sb-{}", uuid::Uuid::new_v4().simple());
                async move {
                    let mut spent = Duration::ZERO;
                    for _ in 0..iters {
                        // The clone is part of the caller's cost either way.
                        let batch = messages.clone();
                        let started = Instant::now();
                        transport
                            .publish_batch(&topic, batch)
                            .await
                            .expect("publish_batch");
                        spent += started.elapsed();
                    }
                    let key = transport.stream_key(&topic);
                    let _: () = redis::cmd("DEL")
                        .arg(&key)
                        .query_async(&mut conn)
                        .await
                        .expect("DEL");
                    spent
                }
            });
        });
    }
    group.finish();
}

fn round_trip(c: &mut Criterion) {
    use switchboard::{SubscribeOptions, Subscriber};

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let prefix = format!("sb-bench-{}:", uuid::Uuid::new_v4().simple());
    let message = messages().remove(0);
    let (transport, subscription, conn, reader, raw_key) = runtime.block_on(async {
        let config = RedisStreamsConfig::default().with_key_prefix(prefix.clone());
        let transport = RedisStreamsTransport::connect_with(&redis_url(), config)
            .await
            .expect("connect to Redis");
        let subscription = transport
            .subscribe("round-trip", SubscribeOptions::new("bench"))
            .await
            .expect("subscribe");
        let client = redis::Client::open(redis_url()).expect("client");
        let mut conn = client
            .get_connection_manager()
            .await
            .expect("raw connection");
        let reader = client
            .get_multiplexed_async_connection_with_config(
                &redis::AsyncConnectionConfig::new().set_response_timeout(None),
            )
            .await
            .expect("raw blocking connection");
        let raw_key = format!("{prefix}raw-round-trip");
        let _: () = redis::cmd("XGROUP")
            .arg("CREATE")
            .arg(&raw_key)
            .arg("bench")
            .arg("$")
            .arg("MKSTREAM")
            .query_async(&mut conn)
            .await
            .expect("XGROUP CREATE");
        (transport, subscription, conn, reader, raw_key)
    });
    // Each iteration's future borrows the subscription; an uncontended lock
    // costs far less than the round trip.
    let subscription = std::sync::Arc::new(tokio::sync::Mutex::new(subscription));

    let mut group = c.benchmark_group("redis_streams_round_trip");
    for round in 1..=2 {
        group.bench_function(BenchmarkId::new("raw_xadd_xreadgroup_xack", round), |b| {
            b.to_async(&runtime).iter(|| {
                let (mut conn, mut reader, message, key) = (
                    conn.clone(),
                    reader.clone(),
                    message.clone(),
                    raw_key.clone(),
                );
                async move {
                    let mut read = redis::cmd("XREADGROUP");
                    read.arg("GROUP")
                        .arg("bench")
                        .arg("c1")
                        .arg("COUNT")
                        .arg(1)
                        .arg("BLOCK")
                        .arg(5000)
                        .arg("STREAMS")
                        .arg(&key)
                        .arg(">");
                    let mut add = redis::cmd("XADD");
                    add.arg(&key)
                        .arg("*")
                        .arg("envelope")
                        .arg(message.body.as_ref())
                        .arg("event_type")
                        .arg(&message.headers[header::EVENT_TYPE])
                        .arg("event_id")
                        .arg(&message.headers[header::EVENT_ID]);
                    let mut add_conn = conn.clone();
                    let (reply, added) = tokio::join!(
                        read.query_async::<redis::streams::StreamReadReply>(&mut reader),
                        add.query_async::<String>(&mut add_conn),
                    );
                    added.expect("XADD");
                    let id = reply.expect("XREADGROUP").keys[0].ids[0].id.clone();
                    let _: () = redis::cmd("XACK")
                        .arg(&key)
                        .arg("bench")
                        .arg(id)
                        .query_async(&mut conn)
                        .await
                        .expect("XACK");
                }
            });
        });
        group.bench_function(
            BenchmarkId::new("switchboard_publish_recv_ack", round),
            |b| {
                b.to_async(&runtime).iter(|| {
                    let (transport, message) = (transport.clone(), message.clone());
                    let subscription = subscription.clone();
                    async move {
                        let mut subscription = subscription.lock().await;
                        transport
                            .publish("round-trip", message)
                            .await
                            .expect("publish");
                        let delivery = subscription.recv().await.expect("a delivery");
                        delivery.ack().await.expect("ack");
                    }
                });
            },
        );
    }
    group.finish();
    runtime.block_on(async {
        let mut conn = conn.clone();
        let keys = [raw_key.clone(), transport.stream_key("round-trip")];
        let _: () = redis::cmd("DEL")
            .arg(&keys)
            .query_async(&mut conn)
            .await
            .expect("DEL");
    });
}

criterion_group!(benches, batch_publish, round_trip);
criterion_main!(benches);
