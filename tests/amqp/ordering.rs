//! Per-key order on RabbitMQ: the shared 100 × 100 case, a hot key whose
//! first message is retried while its later ones fill the prefetch, and
//! single active consumer — order across the members of a group, and the
//! refusal to change the setting of an existing queue — and batch
//! consumers that leave nothing unacknowledged, one batching a hot key.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use switchboard::transport::amqp::AmqpTransport;
use switchboard::{
    Error, ErrorKind, Message, SubscribeOptions, Subscriber, Topology, Transport, handler_fn,
};
use tokio::sync::mpsc;

use super::ordering_scenario::{Keyed, by_key, hundred_keys_keep_their_order, keyed_bus};
use super::{QueueType, config, connect, unique};

fn keyed(key: &str, seq: u32) -> Keyed {
    Keyed {
        key: key.to_owned(),
        seq,
    }
}

#[tokio::test]
async fn a_hundred_keys_of_a_hundred_messages_keep_their_order() {
    hundred_keys_keep_their_order(Arc::new(connect(config(QueueType::Classic)).await)).await;
}

/// Prefetch 8, concurrency 4: 50 messages of key K among 50 of 20 other
/// keys, K's first nacked once for 1 s. K's later messages fill the
/// prefetch behind it; its retry is held by the subscription with its own
/// permit, so it comes back without a new one: K stays in order and
/// everything is handled within 10 s (a deadline on the wait, not a
/// measure of speed).
#[tokio::test]
async fn a_hot_key_retried_for_a_second_keeps_its_order_and_the_prefetch_moving() {
    let transport: Arc<dyn Transport> = Arc::new(connect(config(QueueType::Classic)).await);
    let bus = keyed_bus(transport.clone(), "hot").await;
    let (seen, mut handled) = mpsc::unbounded_channel();
    let handler = handler_fn(move |message: Message<Keyed>| {
        let seen = seen.clone();
        async move {
            let Keyed { key, seq } = message.payload().clone();
            if key == "K" && seq == 0 && message.attempt() == 1 {
                return Err(Error::transient("not yet").with_requeue(Duration::from_secs(1)));
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
    .unwrap_or_else(|_| panic!("not everything handled within 10 s: {by_key:?}"));
    consumer.shutdown().await.expect("shutdown");
    let k: Vec<u32> = by_key["K"].iter().map(|(seq, _)| *seq).collect();
    assert_eq!(k, (0..50).collect::<Vec<_>>());
    assert_eq!(by_key["K"][0], (0, 2), "K's first ran again, as attempt 2");
    assert_eq!(by_key.len(), 21);
    for (key, seqs) in &by_key {
        assert!(
            seqs.windows(2).all(|pair| pair[0].0 < pair[1].0),
            "{key}: {seqs:?}"
        );
    }
}

/// Two members of a group on a single-active-consumer queue: the broker
/// feeds only one; once it stops, the other takes over where it left off,
/// and each key's messages were handled in order across both.
#[tokio::test]
async fn with_single_active_consumer_one_member_at_a_time_keeps_the_groups_order() {
    let transport: Arc<dyn Transport> =
        Arc::new(connect(config(QueueType::Classic).with_single_active_consumer(true)).await);
    let bus = keyed_bus(transport.clone(), "sac").await;
    let (seen, mut handled) = mpsc::unbounded_channel();
    let member = |name: &'static str| {
        let seen = seen.clone();
        handler_fn(move |message: Message<Keyed>| {
            let seen = seen.clone();
            async move {
                let Keyed { key, seq } = message.payload().clone();
                seen.send((name, key, seq)).ok();
                Ok(())
            }
        })
    };
    let options = || {
        SubscribeOptions::new("sac")
            .with_concurrency(4)
            .with_ordering_key(by_key())
    };
    let first = bus
        .subscribe(options(), member("first"))
        .await
        .expect("first");
    let second = bus
        .subscribe(options(), member("second"))
        .await
        .expect("second");
    let round = |seqs: std::ops::Range<u32>| {
        seqs.flat_map(|seq| (0..10).map(move |key| keyed(&format!("k{key}"), seq)))
    };
    bus.publish_batch(round(0..20)).await.expect("publish");
    let mut got = Vec::new();
    receive(&mut handled, &mut got, 200).await;
    let active = got[0].0;
    assert!(
        got.iter().all(|(name, _, _)| *name == active),
        "both members were fed"
    );
    // The active member goes; the other takes over.
    if active == "first" {
        first.shutdown().await.expect("shutdown");
    } else {
        second.shutdown().await.expect("shutdown");
    }
    bus.publish_batch(round(20..30)).await.expect("publish");
    receive(&mut handled, &mut got, 100).await;
    assert!(got[200..].iter().all(|(name, _, _)| *name != active));
    let mut by_key: HashMap<String, Vec<u32>> = HashMap::new();
    for (_, key, seq) in &got {
        by_key.entry(key.clone()).or_default().push(*seq);
    }
    for (key, seqs) in &by_key {
        assert_eq!(seqs, &(0..30).collect::<Vec<_>>(), "{key}");
    }
    transport.close().await.expect("close");
}

type Handled = (&'static str, String, u32);

async fn receive(
    handled: &mut mpsc::UnboundedReceiver<Handled>,
    got: &mut Vec<Handled>,
    count: usize,
) {
    tokio::time::timeout(Duration::from_secs(30), async {
        for _ in 0..count {
            got.push(handled.recv().await.expect("running"));
        }
    })
    .await
    .expect("handled in time");
}

/// RabbitMQ cannot change a queue's arguments: subscribing with single
/// active consumer to a queue declared without it fails with the broker's
/// reason, and the queue is left as it was.
#[tokio::test]
async fn turning_single_active_consumer_on_for_an_existing_queue_is_refused() {
    let plain = config(QueueType::Classic);
    let (topic, group) = (unique("sac"), unique("g"));
    let without: AmqpTransport = connect(plain.clone()).await;
    without
        .declare(&Topology::new().with_groups(topic.clone(), [group.clone()]))
        .await
        .expect("declare without");
    let with: AmqpTransport = connect(plain.with_single_active_consumer(true)).await;
    let error = with
        .subscribe(&topic, SubscribeOptions::new(group.clone()))
        .await
        .expect_err("the argument differs");
    assert!(
        error.to_string().contains("x-single-active-consumer"),
        "{error}"
    );
    assert_eq!(error.kind(), ErrorKind::Rejected, "{error}");
    assert!(!error.is_retryable(), "{error}");
    // The queue stayed as it was: the plain transport still consumes it.
    let subscription = without
        .subscribe(&topic, SubscribeOptions::new(group))
        .await
        .expect("the queue is unchanged");
    subscription.shutdown().await.expect("shutdown");
}

/// 500 messages to a batch consumer of at most 100 with prefetch 200: every
/// one handled, batches larger than one, and the queue empty once the
/// consumer's channel is closed (an unacknowledged message would be back).
#[tokio::test]
async fn a_batch_consumer_handles_everything_and_leaves_the_queue_empty() {
    use lapin::options::QueueDeclareOptions;
    use lapin::types::FieldTable;
    use switchboard::batch_fn;

    let amqp = connect(config(QueueType::Classic)).await;
    let transport: Arc<dyn Transport> = Arc::new(amqp.clone());
    let bus = keyed_bus(transport, "batch").await;
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
    bus.publish_batch((0..500).map(|seq| keyed(&format!("k{}", seq % 10), seq)))
        .await
        .expect("publish");
    let (mut handled, mut largest) = (0, 0);
    tokio::time::timeout(Duration::from_secs(30), async {
        while handled < 500 {
            let size = batches.recv().await.expect("running");
            largest = largest.max(size);
            handled += size;
        }
    })
    .await
    .expect("all handled in time");
    consumer.shutdown().await.expect("shutdown");
    assert_eq!(handled, 500);
    assert!(largest > 1, "no batch held more than one message");
    let queue = super::config_name(&amqp, &bus.topic_of::<Keyed>(), "batch");
    let (_connection, channel) = super::raw_channel().await;
    let passive = QueueDeclareOptions {
        passive: true,
        ..QueueDeclareOptions::default()
    };
    let declared = channel
        .queue_declare(queue.as_str().into(), passive, FieldTable::default())
        .await
        .expect("the queue exists");
    assert_eq!(declared.message_count(), 0, "every message acknowledged");
}

/// A hot key in batches: 200 messages of K among 100 of five other keys,
/// up to 50 a batch, prefetch 64; K's 4th fails once and the retry layer
/// runs it again. Batches hold many messages of K, every key's messages
/// are handled in publish order, each once, and nothing is left in the
/// queue.
#[tokio::test]
async fn a_batch_consumer_batches_a_hot_key_in_order_through_a_retry() {
    use std::sync::Mutex;

    use lapin::options::QueueDeclareOptions;
    use lapin::types::FieldTable;
    use switchboard::batch_fn;
    use switchboard::middleware::Resilience;

    let amqp = connect(config(QueueType::Classic)).await;
    let transport: Arc<dyn Transport> = Arc::new(amqp.clone());
    let bus = keyed_bus(transport, "hot-batch").await;
    let resilience = Resilience::from_yaml("retry:\n  backoff_ms: 1\n  max_backoff_ms: 2\n")
        .expect("resilience");
    let handled: Arc<Mutex<HashMap<String, Vec<u32>>>> = Arc::default();
    let (done, mut dones) = mpsc::unbounded_channel();
    let handler = {
        let handled = handled.clone();
        batch_fn(move |batch: Vec<Message<Keyed>>| {
            let (handled, done) = (handled.clone(), done.clone());
            let of_k = batch.iter().filter(|m| m.payload().key == "K").count();
            async move {
                let mut failed: Vec<String> = Vec::new();
                let mut handled = handled.lock().unwrap();
                batch
                    .iter()
                    .map(|message| {
                        let Keyed { key, seq } = message.payload().clone();
                        if failed.contains(&key) {
                            return Err(Error::transient("behind an earlier failure"));
                        }
                        if key == "K" && seq == 3 && message.attempt() == 1 {
                            failed.push(key);
                            return Err(Error::transient("ledger busy"));
                        }
                        handled.entry(key).or_default().push(seq);
                        done.send(of_k).ok();
                        Ok(())
                    })
                    .collect()
            }
        })
    };
    let options = SubscribeOptions::new("hot-batch")
        .with_prefetch(64)
        .with_ordering_key(by_key());
    let consumer = bus
        .subscribe_batch_with(
            options,
            50,
            Duration::from_millis(20),
            |slot| resilience.consumer("ledger", slot),
            handler,
        )
        .await
        .expect("subscribe");
    let others = (0..100).map(|n| keyed(&format!("k{}", n % 5), n / 5));
    bus.publish_batch((0..200).map(|seq| keyed("K", seq)).chain(others))
        .await
        .expect("publish");
    let mut most_of_k = 0;
    tokio::time::timeout(Duration::from_secs(30), async {
        for _ in 0..300 {
            most_of_k = most_of_k.max(dones.recv().await.expect("running"));
        }
    })
    .await
    .expect("all handled in time");
    consumer.shutdown().await.expect("shutdown");
    assert!(most_of_k >= 2, "no batch held two messages of K");
    for (key, seqs) in handled.lock().unwrap().iter() {
        let all = if key == "K" { 200 } else { 20 };
        assert_eq!(seqs, &(0..all).collect::<Vec<_>>(), "key {key}");
    }
    let queue = super::config_name(&amqp, &bus.topic_of::<Keyed>(), "hot-batch");
    let (_connection, channel) = super::raw_channel().await;
    let passive = QueueDeclareOptions {
        passive: true,
        ..QueueDeclareOptions::default()
    };
    let declared = channel
        .queue_declare(queue.as_str().into(), passive, FieldTable::default())
        .await
        .expect("the queue exists");
    assert_eq!(declared.message_count(), 0, "every message acknowledged");
}
