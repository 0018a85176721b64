//! The Pub/Sub fixtures of `tests/fixtures/wire/v1`: a payload with headers
//! (the `\0SB1` frame) and one without, `PUBLISH`ed raw and read by a
//! subscription; and today's publisher must still send the same bytes.

use switchboard::{Publisher, RawMessage, SubscribeOptions, Subscriber};

use super::{RawSubscriber, URL, raw_connection, recv, transport, unique};

#[path = "../common/wire.rs"]
mod fixture;
use fixture::fixture_message;

const FRAMED: &[u8] = include_bytes!("../fixtures/wire/v1/redis_pubsub_frame_headers.bin");
const PLAIN: &[u8] = include_bytes!("../fixtures/wire/v1/redis_pubsub_frame_plain.bin");

#[tokio::test]
async fn the_v1_payloads_published_raw_are_read_by_a_subscription() {
    let transport = transport().await;
    let topic = unique("wire-in");
    let mut subscription = transport
        .subscribe(&topic, SubscribeOptions::new("game"))
        .await
        .expect("subscribe");
    let mut raw = raw_connection().await;
    for payload in [FRAMED, PLAIN] {
        let receivers: i64 = redis::cmd("PUBLISH")
            .arg(&topic)
            .arg(payload)
            .query_async(&mut raw)
            .await
            .expect("raw PUBLISH");
        assert_eq!(receivers, 1);
    }
    let message = fixture_message();
    let framed = recv(&mut subscription, "the framed fixture").await;
    assert_eq!(framed.message(), &message);
    framed.ack().await.expect("ack");
    let plain = recv(&mut subscription, "the plain fixture").await;
    assert_eq!(plain.message(), &RawMessage::new(message.body.clone()));
    plain.ack().await.expect("ack");
    subscription.shutdown().await.expect("shutdown");
}

#[tokio::test]
async fn todays_publisher_still_sends_the_v1_payloads() {
    let transport = transport().await;
    let topic = unique("wire-out");
    let mut raw = RawSubscriber::subscribe(&topic).await;

    let message = fixture_message();
    let plain = RawMessage::new(message.body.clone());
    transport
        .publish_batch(&topic, vec![message, plain])
        .await
        .expect("publish_batch");
    let payloads = raw.payloads(2).await;
    assert_eq!(payloads[0], FRAMED, "today's writer changed the v1 frame");
    assert_eq!(
        payloads[1], PLAIN,
        "today's writer changed the plain v1 payload"
    );
}

/// A writer switched to version 2 frames reaches a subscriber with the
/// default settings (which writes version 1) with every header, and sends
/// the fixture's bytes; the default writer still sends version 1.
#[tokio::test]
async fn a_version_2_writer_reaches_a_default_reader() {
    use switchboard::RedisPubSubTransport;
    use switchboard::transport::redis_pubsub::{FRAME_MAGIC, FrameVersion, RedisPubSubOptions};
    const FRAMED_V2: &[u8] =
        include_bytes!("../fixtures/wire/v1/redis_pubsub_frame_v2_headers.bin");

    let reader = transport().await;
    let writer = RedisPubSubTransport::connect_with(
        URL,
        RedisPubSubOptions::default().with_frame_version(FrameVersion::V2),
    )
    .await
    .expect("Redis");
    let topic = unique("wire-v2");
    let mut subscription = reader
        .subscribe(&topic, SubscribeOptions::new("game"))
        .await
        .expect("subscribe");
    let mut raw = RawSubscriber::subscribe(&topic).await;

    let message = fixture_message();
    writer
        .publish(&topic, message.clone())
        .await
        .expect("publish version 2");
    reader
        .publish(&topic, message.clone())
        .await
        .expect("publish version 1");
    for what in ["the version 2 frame", "the version 1 frame"] {
        let delivery = recv(&mut subscription, what).await;
        assert_eq!(delivery.message(), &message, "{what}");
        delivery.ack().await.expect("ack");
    }
    let payloads = raw.payloads(2).await;
    assert_eq!(payloads[0], FRAMED_V2);
    assert!(
        payloads[1].starts_with(FRAME_MAGIC),
        "the default writes version 1"
    );
    subscription.shutdown().await.expect("shutdown");
}
