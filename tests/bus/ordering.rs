//! Per-key order on the memory transport: the shared 100 × 100 case, a hot
//! key whose first message is retried while the prefetch is full of its
//! later ones, keys from a header, a key function of the wrong event, and
//! what a stopping consumer does with the messages it held for their key.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use switchboard::{
    ErrorKind, EventBus, EventEnvelope, MemoryTransport, Message, OrderingKey, SubscribeOptions,
    handler_fn,
};
use tokio::sync::{Notify, mpsc};

use super::Ping;
use super::ordering_scenario::{Keyed, by_key, hundred_keys_keep_their_order, keyed_bus};

/// A handler that sends each ping's `n` to `seen`.
fn handler_sending(
    seen: mpsc::UnboundedSender<u64>,
) -> impl tower::Service<Message<Ping>, Response = (), Error = switchboard::Error, Future: Send> + Send
{
    handler_fn(move |message: Message<Ping>| {
        let seen = seen.clone();
        async move {
            seen.send(message.payload().n).ok();
            Ok(())
        }
    })
}

fn keyed(key: &str, seq: u32) -> Keyed {
    Keyed {
        key: key.to_owned(),
        seq,
    }
}

#[tokio::test]
async fn a_hundred_keys_of_a_hundred_messages_keep_their_order() {
    hundred_keys_keep_their_order(Arc::new(MemoryTransport::new())).await;
}

/// Prefetch 8, concurrency 4: the first of 50 messages of key K is retried
/// after 100 ms, so K's later messages fill the prefetch behind it. The
/// retry is held by the subscription with its own permit, so nothing waits
/// for a permit that never comes: all is handled, K in order.
#[tokio::test]
async fn a_retried_hot_key_cannot_starve_its_own_retry_of_the_prefetch() {
    let bus = keyed_bus(Arc::new(MemoryTransport::new()), "hot").await;
    let (seen, mut handled) = mpsc::unbounded_channel();
    let handler = handler_fn(move |message: Message<Keyed>| {
        let seen = seen.clone();
        async move {
            let Keyed { key, seq } = message.payload().clone();
            if key == "K" && seq == 0 && message.attempt() == 1 {
                let later = switchboard::Error::transient("not yet");
                return Err(later.with_requeue(Duration::from_millis(100)));
            }
            seen.send((key, seq, message.attempt())).ok();
            Ok(())
        }
    });
    let options = SubscribeOptions::new("hot")
        .with_prefetch(8)
        .with_concurrency(4)
        .with_ordering_key(by_key());
    let consumer = bus.subscribe(options, handler).await.expect("subscribe");
    let messages =
        (0..50).flat_map(|seq| [keyed("K", seq), keyed(&format!("other-{}", seq % 20), seq)]);
    bus.publish_batch(messages).await.expect("publish");
    let mut by_key: HashMap<String, Vec<(u32, u32)>> = HashMap::new();
    tokio::time::timeout(Duration::from_secs(10), async {
        for _ in 0..100 {
            let (key, seq, attempt) = handled.recv().await.expect("running");
            by_key.entry(key).or_default().push((seq, attempt));
        }
    })
    .await
    .expect("everything handled within 10 s");
    consumer.shutdown().await.expect("shutdown");
    let k: Vec<u32> = by_key["K"].iter().map(|(seq, _)| *seq).collect();
    assert_eq!(k, (0..50).collect::<Vec<_>>());
    assert_eq!(by_key["K"][0], (0, 2), "K's first ran again, as attempt 2");
    for (key, seqs) in &by_key {
        assert!(
            seqs.windows(2).all(|pair| pair[0].0 < pair[1].0),
            "{key}: {seqs:?}"
        );
    }
}

#[tokio::test]
async fn a_header_can_be_the_key_and_a_message_without_it_is_ordered_with_nothing() {
    let transport = MemoryTransport::new();
    let bus = EventBus::new(Arc::new(transport), "test");
    let (seen, mut handled) = mpsc::unbounded_channel();
    let options = SubscribeOptions::new("g")
        .with_concurrency(4)
        .with_ordering_key(OrderingKey::header("account"));
    let consumer = bus
        .subscribe::<Ping, _>(options, handler_sending(seen))
        .await
        .expect("subscribe");
    for n in 0..30 {
        let envelope = EventEnvelope::new("test", Ping { n });
        let envelope = match n % 3 {
            0 => envelope,
            account => envelope.with_header("account", account.to_string()),
        };
        bus.publish_envelope(&envelope).await.expect("publish");
    }
    let mut got = Vec::new();
    for _ in 0..30 {
        got.push(handled.recv().await.expect("running"));
    }
    consumer.shutdown().await.expect("shutdown");
    for account in [1, 2] {
        let of_account: Vec<u64> = got.iter().copied().filter(|n| n % 3 == account).collect();
        let mut sorted = of_account.clone();
        sorted.sort_unstable();
        assert_eq!(of_account, sorted);
    }
    assert_eq!(got.iter().filter(|n| *n % 3 == 0).count(), 10);
}

#[tokio::test]
async fn a_key_function_of_another_event_is_refused_at_subscribe() {
    let bus = EventBus::new(Arc::new(MemoryTransport::new()), "test");
    let (seen, _handled) = mpsc::unbounded_channel();
    let options = SubscribeOptions::new("g").with_ordering_key(by_key());
    let error = bus
        .subscribe::<Ping, _>(options, handler_sending(seen))
        .await
        .expect_err("a key of Keyed for Ping");
    assert_eq!(error.kind(), ErrorKind::Config);
    assert!(error.message().contains("ordering key"), "{error}");
}

/// A consumer stopping while messages wait behind a busy key lets the one
/// in its handler finish and gives the waiting ones back unhandled: the
/// next consumer of the group handles them, in order.
#[tokio::test]
async fn messages_held_for_their_key_go_back_unhandled_on_stop() {
    let transport: Arc<MemoryTransport> = Arc::new(MemoryTransport::new());
    let bus = keyed_bus(transport.clone(), "g").await;
    let (started, release) = (Arc::new(Notify::new()), Arc::new(Notify::new()));
    let handled: Arc<Mutex<Vec<u32>>> = Arc::default();
    let first = {
        let (started, release, handled) = (started.clone(), release.clone(), handled.clone());
        handler_fn(move |message: Message<Keyed>| {
            let (started, release, handled) = (started.clone(), release.clone(), handled.clone());
            async move {
                started.notify_one();
                release.notified().await;
                handled.lock().unwrap().push(message.payload().seq);
                Ok(())
            }
        })
    };
    let options = || {
        SubscribeOptions::new("g")
            .with_concurrency(4)
            .with_ordering_key(by_key())
    };
    let consumer = bus.subscribe(options(), first).await.expect("subscribe");
    bus.publish_batch((0..5).map(|seq| keyed("K", seq)))
        .await
        .expect("publish");
    started.notified().await;
    // The loop has pulled the others meanwhile (its concurrency has room).
    let stopping = tokio::spawn(consumer.shutdown());
    release.notify_one();
    stopping.await.unwrap().expect("shutdown");
    assert_eq!(*handled.lock().unwrap(), [0]);

    let (seen, mut rest) = mpsc::unbounded_channel();
    let second = handler_fn(move |message: Message<Keyed>| {
        let seen = seen.clone();
        async move {
            seen.send(message.payload().seq).ok();
            Ok(())
        }
    });
    let consumer = bus.subscribe(options(), second).await.expect("subscribe");
    let mut later = Vec::new();
    for _ in 0..4 {
        later.push(rest.recv().await.expect("running"));
    }
    consumer.shutdown().await.expect("shutdown");
    assert_eq!(later, [1, 2, 3, 4]);
}
