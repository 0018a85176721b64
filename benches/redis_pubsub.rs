//! Redis Pub/Sub publish → receive, one message at a time: switchboard's
//! transport (headers framed, a `Delivery` acked) beside raw redis-rs (one
//! connection doing PUBLISH, another subscribed and reading the push), interleaved in one
//! run against the Redis at 127.0.0.1:6379, on a current-thread runtime.
//!
//! Beside it, `redis_pubsub_frame`: encoding and decoding one message with
//! its two headers in each frame version (no Redis), which shows what the
//! version 2 frame spares.
//!
//! `cargo bench --features redis-pubsub --bench redis_pubsub`

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use switchboard::{Publisher, RawMessage, RedisPubSubTransport, SubscribeOptions, Subscriber};

const URL: &str = "redis://127.0.0.1:6379";

/// A SPEC §5.1 envelope of the usual size.
const BODY: &str = r#"{"event_id":"1b4e28ba-2fa1-41d2-883f-0016d3cca427","event_type":"price.updated","timestamp":"2026-02-19T12:00:00.000000Z","source":"market-service","version":"1.0","payload":{"symbol":"AAPL","price":150.0}}"#;

fn round_trip(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let topic = format!("bench.pubsub.{}", uuid::Uuid::new_v4().simple());

    let (transport, mut subscription) = runtime.block_on(async {
        let transport = RedisPubSubTransport::connect(URL)
            .await
            .expect("Redis on 127.0.0.1:6379");
        let subscription = transport
            .subscribe(&topic, SubscribeOptions::new("bench"))
            .await
            .expect("subscribe");
        (transport, subscription)
    });
    let message = RawMessage::new(BODY)
        .with_header("event-id", "1b4e28ba-2fa1-41d2-883f-0016d3cca427")
        .with_header("event-type", "price.updated");

    let raw_topic = format!("{topic}.raw");
    // Like the transport: one connection publishes, another is subscribed.
    let (mut raw, _raw_subscriber, mut pushes) = runtime.block_on(async {
        let client = redis::Client::open(format!("{URL}?protocol=resp3")).expect("url");
        let raw = client
            .get_multiplexed_async_connection()
            .await
            .expect("raw publishing connection");
        let (sender, pushes) = tokio::sync::mpsc::unbounded_channel();
        let config = redis::AsyncConnectionConfig::new().set_push_sender(sender);
        let mut subscriber = client
            .get_multiplexed_async_connection_with_config(&config)
            .await
            .expect("raw subscribing connection");
        subscriber
            .subscribe(&raw_topic)
            .await
            .expect("raw SUBSCRIBE");
        (raw, subscriber, pushes)
    });

    let mut group = c.benchmark_group("redis_pubsub_round_trip");
    group.bench_function("raw_redis_rs", |b| {
        b.iter(|| {
            runtime.block_on(async {
                let _: i64 = redis::cmd("PUBLISH")
                    .arg(&raw_topic)
                    .arg(BODY)
                    .query_async(&mut raw)
                    .await
                    .expect("PUBLISH");
                loop {
                    let push = pushes.recv().await.expect("a push");
                    if push.kind == redis::PushKind::Message {
                        break black_box(push);
                    }
                }
            })
        })
    });
    group.bench_function("switchboard", |b| {
        b.iter(|| {
            runtime.block_on(async {
                transport
                    .publish(&topic, message.clone())
                    .await
                    .expect("publish");
                let delivery = subscription.recv().await.expect("a delivery");
                black_box(delivery.body().len());
                delivery.ack().await.expect("ack");
            })
        })
    });
    group.finish();
}

fn frames(c: &mut Criterion) {
    use switchboard::transport::redis_pubsub::{FrameVersion, decode_payload, encode_payload_with};
    let message = RawMessage::new(BODY)
        .with_header("event-id", "1b4e28ba-2fa1-41d2-883f-0016d3cca427")
        .with_header("event-type", "price.updated");
    let mut group = c.benchmark_group("redis_pubsub_frame");
    for (name, version) in [("v1_json", FrameVersion::V1), ("v2", FrameVersion::V2)] {
        group.bench_function(format!("{name}_encode_decode"), |b| {
            b.iter(|| {
                let payload = encode_payload_with(black_box(&message), version).expect("encode");
                black_box(decode_payload(payload))
            })
        });
    }
    group.finish();
}

criterion_group!(benches, frames, round_trip);
criterion_main!(benches);
