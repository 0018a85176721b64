//! What the `wire::` modules of every test binary share: the message every
//! fixture of `tests/fixtures/wire/v1` carries, the names the fixtures use,
//! and taking one delivery of a topic as a consumer of the fixtures' group.

#![allow(dead_code)]

use std::time::Duration;

use serde_json::Value as Json;
use switchboard::{Delivery, RawMessage, SubscribeOptions, Subscriber, Subscription};

const MESSAGE: &str = include_str!("../fixtures/wire/v1/message.json");

/// The topic the fixtures were written for.
pub const TOPIC: &str = "trade.executed";
/// The consumer group the fixtures were written for.
pub const GROUP: &str = "settlement";

/// How long a fixture may take to arrive (a guard, not a speed target).
const PATIENCE: Duration = Duration::from_secs(20);

/// The message (headers and body) every transport fixture carries.
pub fn fixture_message() -> RawMessage {
    let message: Json = serde_json::from_str(MESSAGE).expect("message.json is JSON");
    let mut raw = RawMessage::new(message["body"].as_str().expect("a body").to_owned());
    for (name, value) in message["headers"].as_object().expect("headers") {
        raw = raw.with_header(name, value.as_str().expect("string headers"));
    }
    raw
}

/// Subscribes to [`TOPIC`] as [`GROUP`] and takes the first delivery; the
/// subscription comes back too, to settle and shut down.
pub async fn first_delivery(transport: &dyn Subscriber) -> (Delivery, Subscription) {
    let mut subscription = transport
        .subscribe(TOPIC, SubscribeOptions::new(GROUP))
        .await
        .expect("subscribe");
    let delivery = tokio::time::timeout(PATIENCE, subscription.recv())
        .await
        .expect("delivered in time")
        .expect("a delivery");
    (delivery, subscription)
}

/// [`first_delivery`] is the fixture message; it is acked.
pub async fn reads_the_fixture_message(transport: &dyn Subscriber) {
    let (delivery, subscription) = first_delivery(transport).await;
    assert_eq!(delivery.message(), &fixture_message());
    delivery.ack().await.expect("ack");
    subscription.shutdown().await.expect("shutdown");
}
