//! Acks on Redis Streams go out together: what handlers settle while an ack
//! is on its way is acknowledged with one `XACK` of many ids, and a lone ack
//! goes out at once, without waiting for company. Counted from `MONITOR`
//! (which lists the commands a script runs too), filtered to the keys of
//! this case's transport.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use switchboard::transport::redis_streams::{RedisStreamsConfig, RedisStreamsTransport};
use switchboard::{
    Event, EventBus, Message, Publisher, RawMessage, SubscribeOptions, Subscriber, Topology,
    Transport, handler_fn,
};
use tokio::sync::{Notify, mpsc};

use super::redis_specific::{raw, recv};
use super::redis_url;

/// A deadline for what should take milliseconds, not a wait.
const PATIENCE: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Tick {
    n: u64,
}

impl Event for Tick {
    const TYPE: &'static str = "acks.tick";
    const VERSION: &'static str = "1.0";
}

/// A transport with every setting at its default but a key prefix of its
/// own, and that prefix.
async fn transport() -> (Arc<RedisStreamsTransport>, String) {
    let prefix = format!("sb-test-{}:", uuid::Uuid::new_v4().simple());
    let config = RedisStreamsConfig::default().with_key_prefix(&prefix);
    let transport = RedisStreamsTransport::connect_with(&redis_url(), config)
        .await
        .expect("connect to Redis");
    (Arc::new(transport), prefix)
}

/// The lines `MONITOR` shows from now on that mention `prefix`.
async fn monitor(prefix: &str) -> mpsc::UnboundedReceiver<String> {
    let monitor = redis::Client::open(redis_url())
        .expect("client")
        .get_async_monitor()
        .await
        .expect("MONITOR");
    let (lines, seen) = mpsc::unbounded_channel();
    let needle = format!("\"{prefix}");
    tokio::spawn(async move {
        let mut all = std::pin::pin!(monitor.into_on_message::<String>());
        while let Some(line) = all.next().await {
            if line.contains(&needle) && lines.send(line).is_err() {
                return;
            }
        }
    });
    seen
}

/// The quoted words of a `MONITOR` line: the command and its arguments.
fn words(line: &str) -> Vec<&str> {
    line.split('"').skip(1).step_by(2).collect()
}

/// The ids of an `XACK` line (after command, stream and group), if it is one.
fn acked_ids(line: &str) -> Option<Vec<String>> {
    let words = words(line);
    (words.first() == Some(&"XACK")).then(|| words[3..].iter().map(|id| (*id).to_owned()).collect())
}

/// A handler that counts and says when it has seen `n`.
fn counting(
    n: u64,
) -> (
    impl tower::Service<
        Message<Tick>,
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
    let handler = handler_fn(move |_message: Message<Tick>| {
        if seen.fetch_add(1, Ordering::Relaxed) + 1 == n {
            notify.notify_one();
        }
        async { Ok::<(), switchboard::Error>(()) }
    });
    (handler, done)
}

#[tokio::test]
async fn acks_settled_meanwhile_go_out_as_one_xack_of_many_ids() {
    const N: u64 = 256;
    let (transport, prefix) = transport().await;
    let bus = EventBus::new(transport.clone(), "acks-test");
    bus.declare(&Topology::new().with_event::<Tick, _>(["game"]))
        .await
        .expect("declare");
    for start in (0..N).step_by(64) {
        bus.publish_batch((start..start + 64).map(|n| Tick { n }))
            .await
            .expect("publish");
    }
    let mut lines = monitor(&prefix).await;
    // Every setting at its default: concurrency 1, prefetch 64.
    let (handler, done) = counting(N);
    let consumer = bus
        .subscribe::<Tick, _>(SubscribeOptions::new("game"), handler)
        .await
        .expect("subscribe");
    tokio::time::timeout(PATIENCE, done.notified())
        .await
        .expect("every message handled");
    // Waits until every delivery is settled.
    consumer.shutdown().await.expect("shutdown");
    // MONITOR lists in order: once this shows, every XACK before it has.
    let _: String = redis::cmd("ECHO")
        .arg(format!("{prefix}done"))
        .query_async(&mut raw().await)
        .await
        .expect("ECHO");
    let (mut xacks, mut ids) = (0_u64, Vec::new());
    loop {
        let line = tokio::time::timeout(PATIENCE, lines.recv())
            .await
            .expect("MONITOR in time")
            .expect("MONITOR open");
        if words(&line).first() == Some(&"ECHO") {
            break;
        }
        if let Some(acked) = acked_ids(&line) {
            xacks += 1;
            ids.extend(acked);
        }
    }
    eprintln!("{xacks} XACK commands for {N} messages");
    let distinct: BTreeSet<&String> = ids.iter().collect();
    assert_eq!(ids.len() as u64, N, "each message acked once");
    assert_eq!(distinct.len() as u64, N, "each message acked once");
    // One XACK per message would be N of them.
    assert!(
        xacks * 8 <= N,
        "{xacks} XACK commands for {N} messages: acks are not sent together"
    );
}

#[tokio::test]
async fn a_lone_ack_goes_out_without_waiting_for_more() {
    let (transport, prefix) = transport().await;
    let bus = EventBus::new(transport.clone(), "acks-test");
    bus.declare(&Topology::new().with_event::<Tick, _>(["game"]))
        .await
        .expect("declare");
    let mut lines = monitor(&prefix).await;
    let (handler, done) = counting(1);
    let consumer = bus
        .subscribe::<Tick, _>(SubscribeOptions::new("game"), handler)
        .await
        .expect("subscribe");
    bus.publish(Tick { n: 1 }).await.expect("publish");
    tokio::time::timeout(PATIENCE, done.notified())
        .await
        .expect("the message handled");
    // Nothing else is published and the consumer runs on: the XACK must
    // come by itself, long before any lease or lag timer would send it.
    let acked = tokio::time::timeout(PATIENCE, async {
        loop {
            let line = lines.recv().await.expect("MONITOR open");
            if let Some(ids) = acked_ids(&line) {
                return ids;
            }
        }
    })
    .await
    .expect("the lone ack sent while the consumer runs, without a further message");
    assert_eq!(acked.len(), 1, "{acked:?}");
    consumer.shutdown().await.expect("shutdown");
}

/// A batch's ownership check reads the consumer's pending entries over the
/// batch's id range a page at a time: two acks whose range spans 200 held
/// entries (several pages) are both found and acknowledged, nothing else.
#[tokio::test]
async fn a_batch_spanning_many_held_entries_acks_exactly_its_own() {
    const HELD: usize = 200;
    let (transport, _prefix) = transport().await;
    let topic = format!("acks-{}", uuid::Uuid::new_v4().simple());
    transport
        .declare(&Topology::new().with_groups(topic.as_str(), ["game"]))
        .await
        .expect("declare");
    let messages: Vec<RawMessage> = (0..HELD).map(|n| RawMessage::new(format!("{n}"))).collect();
    transport
        .publish_batch(&topic, messages)
        .await
        .expect("publish");
    let mut subscription = transport
        .subscribe(&topic, SubscribeOptions::new("game").with_prefetch(HELD))
        .await
        .expect("subscribe");
    let mut deliveries = Vec::new();
    for _ in 0..HELD {
        deliveries.push(recv(&mut subscription).await);
    }
    let last = deliveries.pop().expect("the last");
    let first = deliveries.remove(0);
    let (first_body, last_body) = (first.body().to_vec(), last.body().to_vec());
    // Both asked for before the keeper runs (one thread): one batch.
    let (first_acked, last_acked) = tokio::join!(first.ack(), last.ack());
    first_acked.expect("the first acked");
    last_acked.expect("the last acked");
    assert_eq!((first_body, last_body), (b"0".to_vec(), b"199".to_vec()));
    let pending: redis::streams::StreamPendingReply = redis::cmd("XPENDING")
        .arg(transport.stream_key(&topic))
        .arg("game")
        .query_async(&mut raw().await)
        .await
        .expect("XPENDING");
    assert_eq!(pending.count(), HELD - 2, "only the two acked left the PEL");
    for delivery in deliveries {
        delivery.ack().await.expect("ack");
    }
    subscription.shutdown().await.expect("shutdown");
}
