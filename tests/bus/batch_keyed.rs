//! Batch consumers with an ordering key on the memory transport: a batch
//! holds several messages of a key, in publish order; after one of them
//! fails, the later ones of its key are handed to the handler again only
//! after it, the successes before it are not; a key's messages are acked in
//! order through retries and rejections; many keys go on side by side.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use switchboard::middleware::Resilience;
use switchboard::{
    Error, EventBus, MemoryTransport, Message, SubscribeOptions, Transport, batch_fn,
};
use tokio::sync::mpsc;

use super::ordering_scenario::{Keyed, by_key, keyed_bus};

/// What a keyed batch handler saw and did.
#[derive(Debug, Default)]
struct Record {
    /// Each batch: (key, seq, attempt) of each message, in the batch's order.
    batches: Vec<Vec<(String, u32, u32)>>,
    /// Each key's messages answered `Ok`, in the order they were.
    succeeded: HashMap<String, Vec<u32>>,
    /// How often each message reached the handler.
    runs: HashMap<(String, u32), u32>,
}

type Shared = Arc<Mutex<Record>>;

/// One result per message of a batch.
type Results = Vec<Result<(), Error>>;

/// A batch handler that answers each message by `decide` (given the message
/// and the batch so far), reports each success on `done`, and — as a handler
/// that keeps a key's order would — does not handle the later messages of a
/// key in a batch once one of them failed.
fn recording<F>(
    record: Shared,
    done: mpsc::UnboundedSender<()>,
    decide: F,
) -> impl tower::Service<
    Vec<Message<Keyed>>,
    Response = Results,
    Error = Error,
    Future = impl Future<Output = Result<Results, Error>> + Send,
> + Send
+ 'static
where
    F: Fn(&Message<Keyed>, &Record) -> Result<(), Error> + Clone + Send + Sync + 'static,
{
    batch_fn(move |batch: Vec<Message<Keyed>>| {
        let (record, done, decide) = (record.clone(), done.clone(), decide.clone());
        async move {
            let mut record = record.lock().unwrap();
            let seen = batch
                .iter()
                .map(|m| (m.payload().key.clone(), m.payload().seq, m.attempt()))
                .collect();
            record.batches.push(seen);
            let mut failed: Vec<String> = Vec::new();
            batch
                .iter()
                .map(|message| {
                    let Keyed { key, seq } = message.payload().clone();
                    *record.runs.entry((key.clone(), seq)).or_default() += 1;
                    if failed.contains(&key) {
                        return Err(Error::transient("behind an earlier failure of its key"));
                    }
                    let result = decide(message, &record);
                    match &result {
                        Ok(()) => {
                            record.succeeded.entry(key).or_default().push(seq);
                            done.send(()).ok();
                        }
                        Err(_) => failed.push(key),
                    }
                    result
                })
                .collect()
        }
    })
}

/// Waits for `count` successes, or fails saying how many came.
async fn successes(dones: &mut mpsc::UnboundedReceiver<()>, count: usize, record: &Shared) {
    let waited = tokio::time::timeout(Duration::from_secs(30), async {
        for _ in 0..count {
            dones.recv().await.expect("the consumer runs");
        }
    })
    .await;
    if waited.is_err() {
        let record = record.lock().unwrap();
        let got: usize = record.succeeded.values().map(Vec::len).sum();
        panic!("only {got} of {count} handled in time: {record:?}");
    }
}

/// In every batch, each key's messages are in publish order.
fn assert_batches_keep_key_order(record: &Record) {
    for batch in &record.batches {
        let mut last: HashMap<&str, u32> = HashMap::new();
        for (key, seq, _) in batch {
            if let Some(before) = last.insert(key, *seq) {
                assert!(before < *seq, "{key}: {seq} after {before} in {batch:?}");
            }
        }
    }
}

fn keyed(key: &str, seqs: std::ops::Range<u32>) -> impl Iterator<Item = Keyed> + '_ {
    seqs.map(move |seq| Keyed {
        key: key.to_owned(),
        seq,
    })
}

fn memory() -> Arc<dyn Transport> {
    Arc::new(MemoryTransport::new())
}

/// 200 messages of one key, up to 50 a batch: batches hold many of them,
/// and each is handled once, in publish order.
#[tokio::test]
async fn a_hot_key_batches_its_messages_in_order() {
    let bus = keyed_bus(memory(), "g").await;
    let record: Shared = Arc::default();
    let (done, mut dones) = mpsc::unbounded_channel();
    let handler = recording(record.clone(), done, |_, _| Ok(()));
    let options = SubscribeOptions::new("g")
        .with_prefetch(64)
        .with_ordering_key(by_key());
    let consumer = bus
        .subscribe_batch(options, 50, Duration::from_millis(10), handler)
        .await
        .expect("subscribe");
    bus.publish_batch(keyed("hot", 0..200))
        .await
        .expect("publish");
    successes(&mut dones, 200, &record).await;
    consumer.shutdown().await.expect("shutdown");
    let record = record.lock().unwrap();
    assert_eq!(record.succeeded["hot"], (0..200).collect::<Vec<_>>());
    assert!(
        record.runs.values().all(|&runs| runs == 1),
        "a message ran twice"
    );
    let largest = record.batches.iter().map(Vec::len).max().unwrap_or(0);
    assert!(largest >= 2, "no batch held two messages of the key");
    assert!(largest <= 50, "a batch of {largest}");
    assert_batches_keep_key_order(&record);
}

/// The third message of a key in a batch fails once (retryable): the retry
/// layer runs it again before the handler sees any later message of its key
/// again; the two before it are not run again, and the key's successes come
/// in publish order, each once.
#[tokio::test]
async fn after_a_failure_the_rest_of_its_key_waits_for_its_retry() {
    let bus = keyed_bus(memory(), "g").await;
    let resilience = Resilience::from_yaml("retry:\n  backoff_ms: 1\n  max_backoff_ms: 2\n")
        .expect("resilience");
    let record: Shared = Arc::default();
    let (done, mut dones) = mpsc::unbounded_channel();
    // The first batch with three or more of K fails its third, once.
    let failing: Arc<Mutex<Option<u32>>> = Arc::default();
    let decide = {
        let failing = failing.clone();
        move |message: &Message<Keyed>, record: &Record| {
            let Keyed { key, seq } = message.payload();
            let mut failing = failing.lock().unwrap();
            if key != "K" {
                return Ok(());
            }
            let batch = record.batches.last().expect("this batch");
            let position = batch
                .iter()
                .filter(|(k, _, _)| k == "K")
                .position(|(_, s, _)| s == seq);
            if failing.is_none() && position == Some(2) {
                *failing = Some(*seq);
            }
            if *failing == Some(*seq) && message.attempt() == 1 {
                return Err(Error::transient("ledger busy"));
            }
            Ok(())
        }
    };
    let handler = recording(record.clone(), done, decide);
    let options = SubscribeOptions::new("g")
        .with_prefetch(64)
        .with_ordering_key(by_key());
    let consumer = bus
        .subscribe_batch_with(
            options,
            50,
            Duration::from_millis(10),
            |slot| resilience.consumer("ledger", slot),
            handler,
        )
        .await
        .expect("subscribe");
    let others = (0..5).flat_map(|n| keyed(["a", "b", "c", "d", "e"][n], 0..10));
    bus.publish_batch(keyed("K", 0..40).chain(others))
        .await
        .expect("publish");
    successes(&mut dones, 90, &record).await;
    consumer.shutdown().await.expect("shutdown");
    let record = record.lock().unwrap();
    let failed = failing.lock().unwrap().expect("a batch held three of K");
    for (key, seqs) in &record.succeeded {
        let all = if key == "K" { 40 } else { 10 };
        assert_eq!(seqs, &(0..all).collect::<Vec<_>>(), "key {key}");
    }
    assert_batches_keep_key_order(&record);
    // K's messages as the handler saw them, batch by batch.
    let of_k: Vec<Vec<(u32, u32)>> = record
        .batches
        .iter()
        .map(|batch| {
            batch
                .iter()
                .filter(|(key, _, _)| key == "K")
                .map(|(_, seq, attempt)| (*seq, *attempt))
                .collect::<Vec<_>>()
        })
        .filter(|of_k: &Vec<_>| !of_k.is_empty())
        .collect();
    let at = of_k
        .iter()
        .position(|batch| batch.contains(&(failed, 1)))
        .expect("the failing batch");
    let before: Vec<u32> = of_k[at]
        .iter()
        .map(|(seq, _)| *seq)
        .take_while(|&s| s != failed)
        .collect();
    assert_eq!(before.len(), 2, "{:?}", of_k[at]);
    assert_eq!(
        of_k[at + 1].first(),
        Some(&(failed, 2)),
        "the next batch with K starts with the retry: {of_k:?}"
    );
    for seq in before {
        assert_eq!(record.runs[&("K".to_owned(), seq)], 1, "{seq} ran again");
    }
    assert_eq!(record.runs[&("K".to_owned(), failed)], 2);
}

/// 100 keys × 20 messages, 4 batches of up to 32 at once, some messages
/// failing once: every key's messages are handled in order, all of them.
#[tokio::test]
async fn many_keys_keep_their_order_side_by_side() {
    const KEYS: u32 = 100;
    const PER_KEY: u32 = 20;
    let bus = keyed_bus(memory(), "g").await;
    let resilience = Resilience::from_yaml("retry:\n  backoff_ms: 1\n  max_backoff_ms: 2\n")
        .expect("resilience");
    let record: Shared = Arc::default();
    let (done, mut dones) = mpsc::unbounded_channel();
    let handler = recording(record.clone(), done, |message, _| {
        let Keyed { seq, .. } = message.payload();
        if seq % 9 == 4 && message.attempt() == 1 {
            return Err(Error::transient("not yet"));
        }
        Ok(())
    });
    let options = SubscribeOptions::new("g")
        .with_concurrency(4)
        .with_prefetch(128)
        .with_ordering_key(by_key());
    let consumer = bus
        .subscribe_batch_with(
            options,
            32,
            Duration::from_millis(5),
            |slot| resilience.consumer("ledger", slot),
            handler,
        )
        .await
        .expect("subscribe");
    for seq in 0..PER_KEY {
        let round = (0..KEYS).map(|key| Keyed {
            key: format!("key-{key}"),
            seq,
        });
        bus.publish_batch(round).await.expect("publish");
    }
    successes(&mut dones, (KEYS * PER_KEY) as usize, &record).await;
    consumer.shutdown().await.expect("shutdown");
    let record = record.lock().unwrap();
    assert_eq!(record.succeeded.len(), KEYS as usize);
    for (key, seqs) in &record.succeeded {
        assert_eq!(seqs, &(0..PER_KEY).collect::<Vec<_>>(), "key {key}");
    }
    assert_batches_keep_key_order(&record);
    let several = record.batches.iter().any(|batch| {
        let mut keys: Vec<&str> = batch.iter().map(|(key, _, _)| key.as_str()).collect();
        keys.sort_unstable();
        keys.windows(2).any(|pair| pair[0] == pair[1])
    });
    assert!(several, "no batch held two messages of one key");
}

/// A message of K refused for good is dead-lettered; K's later messages go
/// on after it, in order.
#[tokio::test]
async fn after_a_rejection_the_rest_of_its_key_goes_on_in_order() {
    let transport = MemoryTransport::new();
    let bus: EventBus = keyed_bus(Arc::new(transport.clone()), "g").await;
    let record: Shared = Arc::default();
    let (done, mut dones) = mpsc::unbounded_channel();
    let handler = recording(record.clone(), done, |message, _| {
        match message.payload().seq {
            5 => Err(Error::permanent("refused")),
            _ => Ok(()),
        }
    });
    let options = SubscribeOptions::new("g")
        .with_prefetch(64)
        .with_ordering_key(by_key());
    let consumer = bus
        .subscribe_batch(options, 50, Duration::from_millis(10), handler)
        .await
        .expect("subscribe");
    bus.publish_batch(keyed("K", 0..20)).await.expect("publish");
    successes(&mut dones, 19, &record).await;
    consumer.shutdown().await.expect("shutdown");
    {
        let record = record.lock().unwrap();
        let expected: Vec<u32> = (0..20).filter(|&seq| seq != 5).collect();
        assert_eq!(record.succeeded["K"], expected);
        assert_eq!(
            record.runs[&("K".to_owned(), 5)],
            1,
            "a refusal is not retried"
        );
        assert_batches_keep_key_order(&record);
    }
    let letters = transport
        .dead_letters()
        .expect("memory keeps dead letters")
        .list(&bus.topic_of::<Keyed>(), 10)
        .await
        .expect("list");
    assert_eq!(letters.len(), 1, "{letters:?}");
}

/// A per-message stack that lets messages reach the batcher out of order
/// (each yields a number of times that depends on its seq) and fails one
/// message of each key before the batcher (as an open breaker would, with
/// a requeue): each batch still holds a key's messages in order, and each
/// key's messages are handled in order, each once.
#[tokio::test]
async fn out_of_order_arrivals_and_failures_before_the_batch_keep_key_order() {
    const KEYS: u32 = 4;
    const PER_KEY: u32 = 30;
    let bus = keyed_bus(memory(), "g").await;
    let record: Shared = Arc::default();
    let (done, mut dones) = mpsc::unbounded_channel();
    let handler = recording(record.clone(), done, |_, _| Ok(()));
    let stack = |slot: switchboard::BatchSlot<Keyed>| {
        tower::service_fn(move |message: Message<Keyed>| {
            let slot = slot.clone();
            async move {
                let seq = message.payload().seq;
                if seq == 7 && message.attempt() == 1 {
                    return Err(Error::transient("not now").with_requeue(Duration::from_millis(5)));
                }
                for _ in 0..(PER_KEY - seq) % 5 * 3 {
                    tokio::task::yield_now().await;
                }
                tower::ServiceExt::oneshot(slot, message).await
            }
        })
    };
    let options = SubscribeOptions::new("g")
        .with_concurrency(3)
        .with_prefetch(64)
        .with_ordering_key(by_key());
    let consumer = bus
        .subscribe_batch_with(options, 8, Duration::from_millis(2), stack, handler)
        .await
        .expect("subscribe");
    for seq in 0..PER_KEY {
        let round = (0..KEYS).map(|key| Keyed {
            key: format!("key-{key}"),
            seq,
        });
        bus.publish_batch(round).await.expect("publish");
    }
    successes(&mut dones, (KEYS * PER_KEY) as usize, &record).await;
    consumer.shutdown().await.expect("shutdown");
    let record = record.lock().unwrap();
    assert_batches_keep_key_order(&record);
    for (key, seqs) in &record.succeeded {
        assert_eq!(seqs, &(0..PER_KEY).collect::<Vec<_>>(), "key {key}");
    }
    assert!(
        record.runs.values().all(|&runs| runs == 1),
        "a message ran twice"
    );
}

/// A batch consumer with an ordering key stopped while a batch of a hot
/// key's run is in the handler: the batch finishes and is acked, what
/// waits behind it goes back unhandled, and a consumer of the same group afterwards handles the
/// rest, so each message is handled once, in order.
#[tokio::test]
async fn stopping_mid_run_gives_the_rest_back_in_order() {
    let transport = MemoryTransport::new();
    let bus = keyed_bus(Arc::new(transport.clone()), "g").await;
    let record: Shared = Arc::default();
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let (started, mut starts) = mpsc::unbounded_channel();
    let handler = {
        let (record, gate) = (record.clone(), gate.clone());
        batch_fn(move |batch: Vec<Message<Keyed>>| {
            let (record, gate, started) = (record.clone(), gate.clone(), started.clone());
            async move {
                // The key's first message comes alone; the run behind it
                // is held here until the consumer is stopping.
                if batch.len() > 1 {
                    started.send(()).ok();
                    gate.acquire().await.expect("gate").forget();
                }
                let mut record = record.lock().unwrap();
                for message in &batch {
                    let Keyed { key, seq } = message.payload().clone();
                    record.succeeded.entry(key).or_default().push(seq);
                }
                batch.iter().map(|_| Ok(())).collect::<Results>()
            }
        })
    };
    let options = || {
        SubscribeOptions::new("g")
            .with_prefetch(64)
            .with_ordering_key(by_key())
    };
    let consumer = bus
        .subscribe_batch(options(), 50, Duration::from_millis(5), handler)
        .await
        .expect("subscribe");
    // All within the prefetch, so what goes back is all that is left.
    bus.publish_batch(keyed("K", 0..60)).await.expect("publish");
    starts.recv().await.expect("a batch started");
    let stopping = tokio::spawn(consumer.shutdown());
    gate.add_permits(1);
    tokio::time::timeout(Duration::from_secs(10), stopping)
        .await
        .expect("stopped in time")
        .expect("joined")
        .expect("shutdown");
    let first = record.lock().unwrap().succeeded["K"].clone();
    assert!(first.len() > 2 && first.len() < 60, "{first:?}");
    let (done, mut dones) = mpsc::unbounded_channel();
    let rest = recording(record.clone(), done, |_, _| Ok(()));
    let consumer = bus
        .subscribe_batch(options(), 50, Duration::from_millis(5), rest)
        .await
        .expect("subscribe again");
    successes(&mut dones, 60 - first.len(), &record).await;
    consumer.shutdown().await.expect("shutdown");
    let record = record.lock().unwrap();
    assert_eq!(record.succeeded["K"], (0..60).collect::<Vec<_>>());
}
