//! Scheduled messages on RabbitMQ: delay buckets, not a queue per delay;
//! closing the transport and connecting again loses nothing.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use lapin::options::QueueDeclareOptions;
use lapin::types::FieldTable;
use lapin::{Connection, ConnectionProperties};
use switchboard::testing::delayed::{schedule_tolerance, scheduled_messages_survive_a_restart};
use switchboard::transport::amqp::{BUCKET_UNIT, QueueType};
use switchboard::{Publisher, RawMessage, SubscribeOptions, Subscriber, Topology, Transport};

/// Close the transport (its mover and both connections) after scheduling,
/// connect again with the same names: everything arrives, on time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scheduled_messages_survive_closing_and_reconnecting() {
    let config = super::config(QueueType::Classic);
    let first: Arc<dyn Transport> = Arc::new(super::connect(config.clone()).await);
    scheduled_messages_survive_a_restart(first, || async move {
        Arc::new(super::connect(config).await) as Arc<dyn Transport>
    })
    .await;
}

/// Forty distinct delays under 2.56 s: each arrives not before its time,
/// and the broker holds at most the eight buckets of 10 ms × 2^0..=7 (and
/// the due queue), not a queue per delay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn distinct_delays_share_a_few_buckets() {
    let config = super::config(QueueType::Quorum);
    let transport = super::connect(config.clone()).await;
    let topic = super::unique("many-delays");
    let group = super::unique("g");
    transport
        .declare(&Topology::new().with_groups(topic.clone(), [group.clone()]))
        .await
        .unwrap();
    let mut subscription = transport
        .subscribe(&topic, SubscribeOptions::new(&group).with_prefetch(64))
        .await
        .unwrap();
    let now = chrono::Utc::now();
    let mut due = BTreeMap::new();
    for n in 0..40_i64 {
        let at = now + chrono::Duration::milliseconds(50 + n * 61);
        transport
            .publish_at(&topic, RawMessage::new(n.to_string()), at)
            .await
            .unwrap();
        due.insert(n.to_string(), at);
    }
    let tolerance = chrono::Duration::from_std(schedule_tolerance()).unwrap();
    let mut seen = 0;
    while seen < due.len() {
        let delivery = tokio::time::timeout(super::PATIENCE, subscription.recv())
            .await
            .expect("every scheduled message arrives")
            .expect("the subscription goes on");
        let arrived = chrono::Utc::now();
        let body = String::from_utf8(delivery.body().to_vec()).unwrap();
        let at = due[&body];
        assert!(arrived >= at, "message {body} arrived early");
        assert!(arrived - at <= tolerance, "message {body} arrived late");
        delivery.ack().await.unwrap();
        seen += 1;
    }
    subscription.shutdown().await.unwrap();

    let connection = Connection::connect(super::BROKER, ConnectionProperties::default())
        .await
        .unwrap();
    let mut buckets = Vec::new();
    for level in 0..28 {
        let ttl = BUCKET_UNIT.as_millis() << level;
        let name = format!("{}.delay.{ttl}ms", config.exchange);
        // A passive declare of a missing queue closes its channel: one each.
        let channel = connection.create_channel().await.unwrap();
        let passive = QueueDeclareOptions {
            passive: true,
            ..QueueDeclareOptions::default()
        };
        if channel
            .queue_declare(name.as_str().into(), passive, FieldTable::default())
            .await
            .is_ok()
        {
            buckets.push(ttl);
        }
    }
    assert!(!buckets.is_empty(), "the buckets exist");
    assert!(
        buckets.iter().all(|ttl| *ttl <= 1280),
        "only buckets up to the longest delay: {buckets:?}"
    );
    transport.close().await.unwrap();
}

/// A nack whose delay outlives its subscription goes through the delay
/// buckets back to its one group's queue — not early, one attempt more —
/// while the topic's other group does not get it again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nack_delay_outliving_its_subscription_returns_to_its_group_only() {
    let transport = super::connect(super::config(QueueType::Quorum)).await;
    let topic = super::unique("nack-later");
    let (nacking, other) = (super::unique("g"), super::unique("g"));
    transport
        .declare(&Topology::new().with_groups(topic.clone(), [nacking.clone(), other.clone()]))
        .await
        .unwrap();
    transport
        .publish(&topic, RawMessage::new("first"))
        .await
        .unwrap();
    let mut others = transport
        .subscribe(&topic, SubscribeOptions::new(&other))
        .await
        .unwrap();
    let original = super::recv(&mut others, "the other group's copy").await;
    original.ack().await.unwrap();

    let mut subscription = transport
        .subscribe(&topic, SubscribeOptions::new(&nacking))
        .await
        .unwrap();
    let delivery = super::recv(&mut subscription, "the first delivery").await;
    assert_eq!(delivery.attempt(), 1);
    let delay = Duration::from_millis(1_500);
    let nacked_at = chrono::Utc::now();
    delivery.nack(delay).await.unwrap();
    subscription.shutdown().await.unwrap();

    let mut again = transport
        .subscribe(&topic, SubscribeOptions::new(&nacking))
        .await
        .unwrap();
    let back = super::recv(&mut again, "the nacked message, after its delay").await;
    let arrived = chrono::Utc::now();
    assert_eq!(back.body().as_ref(), b"first");
    assert!(
        arrived >= nacked_at + chrono::Duration::from_std(delay).unwrap(),
        "back {} ms early",
        (nacked_at + chrono::Duration::from_std(delay).unwrap() - arrived).num_milliseconds()
    );
    assert_eq!(back.attempt(), 2, "one attempt more");
    back.ack().await.unwrap();

    // The other group's next message is a new one, not a copy of the nack.
    transport
        .publish(&topic, RawMessage::new("marker"))
        .await
        .unwrap();
    let next = super::recv(&mut others, "the marker").await;
    assert_eq!(next.body().as_ref(), b"marker");
    next.ack().await.unwrap();
    again.shutdown().await.unwrap();
    others.shutdown().await.unwrap();
    transport.close().await.unwrap();
}
