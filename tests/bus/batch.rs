//! Batch consumers on the memory transport: batch sizes and the wait, one
//! outcome per message (a partial failure never runs the successes again),
//! the single-message stack per message (dedupe, retry, dead letters),
//! per-key order across batches, and the options refused. Several messages
//! of a key in one batch: `batch_keyed`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use switchboard::middleware::Resilience;
use switchboard::{
    Error, ErrorKind, EventBus, EventEnvelope, MemoryTransport, Message, SubscribeOptions, batch_fn,
};
use tokio::sync::mpsc;

use super::ordering_scenario::{Keyed, by_key, keyed_bus};
use super::{Ping, dead_letters};

/// Every run of the handler, by `n`: how often each message reached a batch.
type Runs = Arc<Mutex<HashMap<u64, u32>>>;

fn memory_bus() -> (EventBus, MemoryTransport) {
    let transport = MemoryTransport::new();
    (
        EventBus::new(Arc::new(transport.clone()), "test-service"),
        transport,
    )
}

#[tokio::test]
async fn batches_hold_at_most_max_messages_and_a_partial_one_goes_after_max_wait() {
    let (bus, _) = memory_bus();
    let (sizes, mut batches) = mpsc::unbounded_channel();
    let consumer = bus
        .subscribe_batch(
            SubscribeOptions::new("g").with_prefetch(256),
            100,
            Duration::from_millis(50),
            batch_fn(move |pings: Vec<Message<Ping>>| {
                sizes.send(pings.len()).ok();
                async move { pings.iter().map(|_| Ok(())).collect() }
            }),
        )
        .await
        .expect("subscribe");
    bus.publish_batch((0..250).map(|n| Ping { n }))
        .await
        .expect("publish");
    let mut handled = 0;
    let mut largest = 0;
    while handled < 250 {
        let size = batches.recv().await.expect("running");
        assert!(size <= 100, "a batch of {size}");
        largest = largest.max(size);
        handled += size;
    }
    assert_eq!(handled, 250);
    assert!(largest > 1, "no batching happened");
    // Three messages never fill a batch: they go together once the wait is over.
    bus.publish_batch((0..3).map(|n| Ping { n }))
        .await
        .expect("publish");
    assert_eq!(batches.recv().await, Some(3));
    consumer.shutdown().await.expect("shutdown");
}

/// Ten messages, two fail: the retry layer runs only those again, in a later
/// batch; one fails for good and is dead-lettered alone; the successes ran
/// once and were acked.
#[tokio::test]
async fn a_partial_failure_retries_only_the_failures_through_the_stack() {
    let (bus, transport) = memory_bus();
    let resilience = Resilience::from_yaml("retry:\n  backoff_ms: 1\n  max_backoff_ms: 2\n")
        .expect("resilience");
    let runs: Runs = Arc::default();
    let (done, mut dones) = mpsc::unbounded_channel();
    let handler = {
        let runs = runs.clone();
        batch_fn(move |pings: Vec<Message<Ping>>| {
            let (runs, done) = (runs.clone(), done.clone());
            async move {
                pings
                    .iter()
                    .map(|ping| {
                        let n = ping.payload().n;
                        *runs.lock().unwrap().entry(n).or_default() += 1;
                        done.send(()).ok();
                        match n {
                            3 if ping.attempt() == 1 => Err(Error::transient("busy")),
                            7 => Err(Error::permanent("refused")),
                            _ => Ok(()),
                        }
                    })
                    .collect()
            }
        })
    };
    let consumer = bus
        .subscribe_batch_with(
            SubscribeOptions::new("g"),
            10,
            Duration::from_millis(20),
            |slot| resilience.consumer("ledger", slot),
            handler,
        )
        .await
        .expect("subscribe");
    bus.publish_batch((0..10).map(|n| Ping { n }))
        .await
        .expect("publish");
    // Ten runs, and message 3 once more.
    for _ in 0..11 {
        dones.recv().await.expect("running");
    }
    let letters = loop {
        let letters = dead_letters(&transport).await;
        if !letters.is_empty() {
            break letters;
        }
        tokio::task::yield_now().await;
    };
    consumer.shutdown().await.expect("shutdown");
    let runs = runs.lock().unwrap();
    for n in 0..10 {
        let expected = if n == 3 { 2 } else { 1 };
        assert_eq!(runs[&n], expected, "message {n}");
    }
    assert_eq!(letters.len(), 1);
    assert!(
        letters[0]
            .last_error
            .as_deref()
            .unwrap_or("")
            .contains("refused")
    );
}

/// The same event delivered twice (published twice) reaches a batch once:
/// the dedupe layer in the per-message stack acks the duplicate.
#[tokio::test]
async fn a_duplicate_is_acked_by_the_dedupe_layer_before_any_batch() {
    let (bus, _) = memory_bus();
    let resilience = Resilience::default();
    let runs: Runs = Arc::default();
    let (done, mut dones) = mpsc::unbounded_channel();
    let handler = {
        let runs = runs.clone();
        batch_fn(move |pings: Vec<Message<Ping>>| {
            let (runs, done) = (runs.clone(), done.clone());
            async move {
                for ping in &pings {
                    *runs.lock().unwrap().entry(ping.payload().n).or_default() += 1;
                }
                done.send(pings.len()).ok();
                pings.iter().map(|_| Ok(())).collect()
            }
        })
    };
    let consumer = bus
        .subscribe_batch_with(
            SubscribeOptions::new("g"),
            10,
            Duration::from_millis(5),
            |slot| resilience.consumer("ledger", slot),
            handler,
        )
        .await
        .expect("subscribe");
    let envelope = EventEnvelope::new("test", Ping { n: 1 });
    bus.publish_envelope(&envelope).await.expect("publish");
    assert_eq!(dones.recv().await, Some(1));
    bus.publish_envelope(&envelope)
        .await
        .expect("publish again");
    bus.publish(Ping { n: 2 }).await.expect("publish");
    // Ping 2 comes through; the duplicate never does.
    let mut handled = 1;
    while handled < 2 {
        handled += dones.recv().await.expect("running");
    }
    consumer.shutdown().await.expect("shutdown");
    assert_eq!(runs.lock().unwrap()[&1], 1);
}

/// A handler that fails as a whole fails every message of its batch; with
/// no retry layer each is dead-lettered.
#[tokio::test]
async fn a_batch_that_fails_as_a_whole_fails_each_message() {
    let (bus, transport) = memory_bus();
    let consumer = bus
        .subscribe_batch(
            SubscribeOptions::new("g"),
            5,
            Duration::from_millis(5),
            tower::service_fn(|_: Vec<Message<Ping>>| async {
                Err::<Vec<Result<(), Error>>, _>(Error::permanent("ledger offline"))
            }),
        )
        .await
        .expect("subscribe");
    bus.publish_batch((0..5).map(|n| Ping { n }))
        .await
        .expect("publish");
    let letters = loop {
        let letters = dead_letters(&transport).await;
        if letters.len() == 5 {
            break letters;
        }
        tokio::task::yield_now().await;
    };
    consumer.shutdown().await.expect("shutdown");
    assert!(letters.iter().all(|letter| {
        letter
            .last_error
            .as_deref()
            .is_some_and(|error| error.contains("ledger offline"))
    }));
}

/// Ordered by key, a batch holds a key's messages in publish order; a key's
/// first message failing once with a retry holds the rest of its key back,
/// across batches, until it succeeds.
#[tokio::test]
async fn ordered_batches_keep_each_keys_order_through_a_retry() {
    let bus = keyed_bus(Arc::new(MemoryTransport::new()), "g").await;
    let handled: Arc<Mutex<HashMap<String, Vec<u32>>>> = Arc::default();
    let (done, mut dones) = mpsc::unbounded_channel();
    let handler = {
        let handled = handled.clone();
        batch_fn(move |batch: Vec<Message<Keyed>>| {
            let (handled, done) = (handled.clone(), done.clone());
            async move {
                // Each key's messages in the batch, in publish order.
                let mut last: HashMap<&str, u32> = HashMap::new();
                let in_order = batch.iter().all(|m| {
                    let Keyed { key, seq } = m.payload();
                    last.insert(key, *seq).is_none_or(|before| before < *seq)
                });
                let mut failed = Vec::new();
                batch
                    .iter()
                    .map(|message| {
                        let Keyed { key, seq } = message.payload().clone();
                        if failed.contains(&key) {
                            return Err(Error::transient("behind a failure"));
                        }
                        if key == "k0" && seq == 0 && message.attempt() == 1 {
                            failed.push(key);
                            let later = Error::transient("not yet");
                            return Err(later.with_requeue(Duration::from_millis(20)));
                        }
                        handled.lock().unwrap().entry(key).or_default().push(seq);
                        done.send(in_order).ok();
                        Ok(())
                    })
                    .collect()
            }
        })
    };
    let options = SubscribeOptions::new("g")
        .with_prefetch(64)
        .with_ordering_key(by_key());
    let consumer = bus
        .subscribe_batch(options, 16, Duration::from_millis(5), handler)
        .await
        .expect("subscribe");
    let messages = (0..10).flat_map(|seq| {
        (0..8).map(move |key| Keyed {
            key: format!("k{key}"),
            seq,
        })
    });
    bus.publish_batch(messages).await.expect("publish");
    for _ in 0..80 {
        let in_order = dones.recv().await.expect("running");
        assert!(in_order, "a batch held a key's messages out of order");
    }
    consumer.shutdown().await.expect("shutdown");
    for (key, seqs) in handled.lock().unwrap().iter() {
        assert_eq!(seqs, &(0..10).collect::<Vec<_>>(), "key {key}");
    }
}

#[tokio::test]
async fn batch_options_that_cannot_work_are_refused() {
    let (bus, _) = memory_bus();
    let handler = || {
        batch_fn(|pings: Vec<Message<Ping>>| async move { pings.iter().map(|_| Ok(())).collect() })
    };
    let zero = bus
        .subscribe_batch(SubscribeOptions::new("g"), 0, Duration::ZERO, handler())
        .await
        .expect_err("max_messages 0");
    assert_eq!(zero.kind(), ErrorKind::Rejected);
    let small = bus
        .subscribe_batch(
            SubscribeOptions::new("g").with_prefetch(10),
            100,
            Duration::ZERO,
            handler(),
        )
        .await
        .expect_err("a prefetch smaller than a batch");
    assert_eq!(small.kind(), ErrorKind::Rejected);
    assert!(small.message().contains("prefetch"), "{small}");
}
