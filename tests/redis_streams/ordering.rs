//! Per-key order and batch consumers on Redis Streams: the shared 100 × 100
//! case, and a batch consumer that reads with `XREADGROUP … COUNT` and
//! leaves nothing pending.

use std::sync::Arc;
use std::time::Duration;

use redis::AsyncCommands;
use switchboard::transport::redis_streams::RedisStreamsTransport;
use switchboard::{EventBus, Message, SubscribeOptions, Topology, batch_fn};
use tokio::sync::mpsc;

use super::ordering_scenario::{Keyed, hundred_keys_keep_their_order};
use super::redis_specific::raw;

#[tokio::test]
async fn a_hundred_keys_of_a_hundred_messages_keep_their_order() {
    hundred_keys_keep_their_order(super::transport().await).await;
}

/// 1 000 messages to a batch consumer of at most 100: every one handled,
/// batches larger than one, and every entry acknowledged.
#[tokio::test]
async fn a_batch_consumer_handles_everything_and_leaves_nothing_pending() {
    let transport = RedisStreamsTransport::connect_with(
        &super::redis_url(),
        switchboard::transport::redis_streams::RedisStreamsConfig::default()
            .with_key_prefix(format!("sb-test-{}:", uuid::Uuid::new_v4().simple()))
            .with_block(Duration::from_secs(1)),
    )
    .await
    .expect("connect to Redis");
    let bus = EventBus::new(Arc::new(transport.clone()), "batch-test");
    bus.declare(&Topology::new().with_event::<Keyed, _>(["batch"]))
        .await
        .expect("declare");
    let (sizes, mut batches) = mpsc::unbounded_channel();
    let consumer = bus
        .subscribe_batch(
            SubscribeOptions::new("batch").with_prefetch(200),
            100,
            Duration::from_millis(20),
            batch_fn(move |batch: Vec<Message<Keyed>>| {
                sizes.send(batch.len()).ok();
                async move { batch.iter().map(|_| Ok(())).collect() }
            }),
        )
        .await
        .expect("subscribe");
    let messages = (0..1000).map(|seq| Keyed {
        key: format!("k{}", seq % 10),
        seq,
    });
    bus.publish_batch(messages).await.expect("publish");
    let (mut handled, mut largest) = (0, 0);
    tokio::time::timeout(Duration::from_secs(60), async {
        while handled < 1000 {
            let size = batches.recv().await.expect("running");
            largest = largest.max(size);
            handled += size;
        }
    })
    .await
    .expect("all handled in time");
    consumer.shutdown().await.expect("shutdown");
    assert_eq!(handled, 1000);
    assert!(largest > 1, "no batch held more than one message");
    let key = transport.stream_key(&bus.topic_of::<Keyed>());
    let pending: redis::streams::StreamPendingReply =
        raw().await.xpending(&key, "batch").await.expect("XPENDING");
    assert_eq!(pending.count(), 0, "every entry acknowledged");
}
