//! The conformance cases. Each takes a fresh transport and panics with a
//! message saying what broke. [`conformance_tests!`](crate::conformance_tests)
//! runs them all; they can also be called one by one.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use uuid::Uuid;

pub use super::flow::{
    a_poison_message_is_dead_lettered_after_max_deliveries,
    a_publish_nothing_would_receive_is_refused_or_kept, a_requeue_storm_holds_only_the_prefetch,
};
use super::{message_count, patience};
use crate::bus::{EventBus, Message, handler_fn};
use crate::envelope::Event;
use crate::error::{Error, ErrorKind};
use crate::topology::Topology;
use crate::transport::{
    DeliveryMode, RawMessage, Redrive, SubscribeOptions, Subscription, Transport, header,
};

const SEQ: &str = "cf-seq";
const NOTE: &str = "cf-note";
const NOTE_VALUE: &str = "kept as sent: spaces, punctuation ;:,=/ and \"quotes\"";

/// A fresh name for a topic or group, so cases never share state.
pub fn unique(label: &str) -> String {
    format!("cf-{label}-{}", Uuid::new_v4().simple())
}

/// The `seq`-th test message: a JSON body of a few sizes and two headers.
pub fn test_message(seq: u64) -> RawMessage {
    let padding = "ü✓".repeat((seq % 7) as usize * 40);
    RawMessage::new(format!(r#"{{"seq":{seq},"padding":"{padding}"}}"#))
        .with_header(SEQ, seq.to_string())
        .with_header(NOTE, NOTE_VALUE)
}

fn seq_of(message: &RawMessage) -> u64 {
    let seq = message
        .headers
        .get(SEQ)
        .unwrap_or_else(|| panic!("a delivery lost its {SEQ:?} header: {:?}", message.headers));
    seq.parse().expect("cf-seq is a number")
}

async fn publish_all(transport: &dyn Transport, topic: &str, seqs: impl IntoIterator<Item = u64>) {
    for seq in seqs {
        transport
            .publish(topic, test_message(seq))
            .await
            .unwrap_or_else(|error| panic!("publish {seq} to {topic}: {error}"));
    }
}

/// Publishes from a task of its own. Push transports return from `publish`
/// only once a handler acked, so a case that publishes before it receives
/// must not wait for the publishing first.
fn publish_in_background(
    transport: &Arc<dyn Transport>,
    topic: &str,
    seqs: impl IntoIterator<Item = u64, IntoIter: Send> + Send + 'static,
) -> JoinHandle<()> {
    let (transport, topic) = (transport.clone(), topic.to_owned());
    tokio::spawn(async move { publish_all(&*transport, &topic, seqs).await })
}

async fn subscribe(
    transport: &dyn Transport,
    topic: &str,
    options: SubscribeOptions,
) -> Subscription {
    transport
        .subscribe(topic, options.clone())
        .await
        .unwrap_or_else(|error| panic!("subscribe to {topic} as {options:?}: {error}"))
}

/// Acks everything `subscription` delivers and reports each `cf-seq`.
fn ack_into(mut subscription: Subscription, seen: mpsc::UnboundedSender<u64>) -> JoinHandle<()> {
    tokio::spawn(async move {
        while let Some(delivery) = subscription.recv().await {
            let seq = seq_of(delivery.message());
            if let Err((error, _)) = delivery.ack().await {
                panic!("ack of {seq}: {error}");
            }
            if seen.send(seq).is_err() {
                break;
            }
        }
    })
}

/// Waits until every seq in `expected` has been seen; returns how often each
/// was seen. On timeout, fails naming the missing ids.
async fn expect_all(
    seen: &mut mpsc::UnboundedReceiver<u64>,
    expected: &BTreeSet<u64>,
    what: &str,
) -> BTreeMap<u64, usize> {
    let mut counts = BTreeMap::new();
    let deadline = tokio::time::Instant::now() + patience();
    while !expected.iter().all(|seq| counts.contains_key(seq)) {
        match tokio::time::timeout_at(deadline, seen.recv()).await {
            Ok(Some(seq)) => *counts.entry(seq).or_insert(0) += 1,
            Ok(None) | Err(_) => {
                let missing: Vec<_> = expected
                    .iter()
                    .filter(|seq| !counts.contains_key(seq))
                    .collect();
                panic!(
                    "{what}: {} of {} messages missing after {:?}; first missing ids: {:?}",
                    missing.len(),
                    expected.len(),
                    patience(),
                    &missing[..missing.len().min(20)],
                );
            }
        }
    }
    counts
}

async fn recv_one(subscription: &mut Subscription, what: &str) -> crate::transport::Delivery {
    match tokio::time::timeout(patience(), subscription.recv()).await {
        Ok(Some(delivery)) => delivery,
        Ok(None) => panic!("{what}: the subscription ended"),
        Err(_) => panic!("{what}: nothing delivered within {:?}", patience()),
    }
}

fn range(count: u64) -> BTreeSet<u64> {
    (0..count).collect()
}

// ---------------------------------------------------------------- core cases

/// 100 messages arrive with bodies and headers exactly as sent.
pub async fn round_trip_keeps_payload_and_headers(transport: Arc<dyn Transport>) {
    let topic = unique("round-trip");
    let mut subscription = subscribe(&*transport, &topic, SubscribeOptions::new(unique("g"))).await;
    let publishing = publish_in_background(&transport, &topic, 0..100);
    let mut received = BTreeMap::new();
    while received.len() < 100 {
        let delivery = recv_one(&mut subscription, "round trip").await;
        let seq = seq_of(delivery.message());
        received.insert(seq, delivery.message().clone());
        delivery
            .ack()
            .await
            .map_err(|(error, _)| error)
            .expect("ack");
    }
    for (seq, message) in received {
        let sent = test_message(seq);
        assert_eq!(message.body, sent.body, "body of message {seq} changed");
        for (name, value) in &sent.headers {
            assert_eq!(
                message.headers.get(name),
                Some(value),
                "header {name:?} of message {seq}"
            );
        }
    }
    publishing.await.expect("publisher task");
    subscription.shutdown().await.expect("shutdown");
}

/// Concurrent publishers (single and batched publishes) to concurrent
/// subscribers: every message arrives.
pub async fn concurrent_publishers_and_subscribers_lose_nothing(transport: Arc<dyn Transport>) {
    let topic = unique("concurrent");
    let count = message_count() as u64;
    let (seen, mut inbox) = mpsc::unbounded_channel();
    let group = unique("g");
    let subscribers = match transport.capabilities().delivery {
        DeliveryMode::Competing => 2,
        DeliveryMode::Broadcast => 1,
    };
    let mut consumers = Vec::new();
    for _ in 0..subscribers {
        let options = SubscribeOptions::new(group.clone())
            .with_concurrency(8)
            .with_prefetch(256);
        let subscription = subscribe(&*transport, &topic, options).await;
        consumers.push(ack_into(subscription, seen.clone()));
    }
    let publishers = 4;
    let mut publishing = Vec::new();
    for publisher in 0..publishers {
        let transport = transport.clone();
        let topic = topic.clone();
        publishing.push(tokio::spawn(async move {
            let mine: Vec<u64> = (0..count)
                .filter(|seq| seq % publishers == publisher)
                .collect();
            let (singles, batched) = mine.split_at(mine.len() / 2);
            publish_all(&*transport, &topic, singles.iter().copied()).await;
            for chunk in batched.chunks(50) {
                let messages = chunk.iter().map(|&seq| test_message(seq)).collect();
                transport
                    .publish_batch(&topic, messages)
                    .await
                    .unwrap_or_else(|error| panic!("publish_batch to {topic}: {error}"));
            }
        }));
    }
    for publisher in publishing {
        publisher.await.expect("publisher task");
    }
    expect_all(&mut inbox, &range(count), "concurrent publish and consume").await;
    for consumer in consumers {
        consumer.abort();
    }
}

/// Many topics at once: each subscriber receives its own topic's messages
/// and nothing else.
pub async fn topics_are_isolated(transport: Arc<dyn Transport>) {
    let topics: Vec<String> = (0..8).map(|_| unique("isolated")).collect();
    let group = unique("g");
    let mut inboxes = Vec::new();
    let mut consumers = Vec::new();
    for (index, topic) in topics.iter().enumerate() {
        let (seen, inbox) = mpsc::unbounded_channel();
        let subscription =
            subscribe(&*transport, topic, SubscribeOptions::new(group.clone())).await;
        consumers.push(ack_into(subscription, seen));
        inboxes.push((index as u64, inbox));
    }
    let mut publishing = Vec::new();
    for (index, topic) in topics.iter().enumerate() {
        let (transport, topic) = (transport.clone(), topic.clone());
        // Topic i carries seqs i*1000 .. i*1000+25.
        let seqs = (0..25).map(move |n| index as u64 * 1000 + n);
        publishing.push(tokio::spawn(async move {
            publish_all(&*transport, &topic, seqs).await
        }));
    }
    for publisher in publishing {
        publisher.await.expect("publisher task");
    }
    for (index, mut inbox) in inboxes {
        let expected: BTreeSet<u64> = (0..25).map(|n| index * 1000 + n).collect();
        let counts = expect_all(&mut inbox, &expected, "isolated topic").await;
        let foreign: Vec<_> = counts
            .keys()
            .filter(|seq| !expected.contains(seq))
            .collect();
        assert!(
            foreign.is_empty(),
            "topic {index} received other topics' messages: {foreign:?}"
        );
    }
    for consumer in consumers {
        consumer.abort();
    }
}

/// The conformance suite's own event type, for the cases that go through
/// [`EventBus`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConformanceEvent {
    /// A sequence number.
    pub seq: u64,
}

impl Event for ConformanceEvent {
    const TYPE: &'static str = "conformance.checked";
    const VERSION: &'static str = "1.0";
}

/// Bad names and options are refused with non-retryable errors, and bytes
/// that are not an envelope never reach a handler nor hold up the next
/// message (they are dead-lettered where the transport keeps dead letters).
pub async fn bad_input_is_refused(transport: Arc<dyn Transport>) {
    for topic in ["", "two words", "slash/ed", &"x".repeat(256)] {
        let error = transport
            .publish(topic, test_message(0))
            .await
            .expect_err("publishing to an invalid topic name must fail");
        assert!(!error.is_retryable(), "{topic:?}: {error}");
    }
    let refused = [
        SubscribeOptions::new(""),
        SubscribeOptions::new("g").with_concurrency(0),
        SubscribeOptions::new("g").with_prefetch(0),
    ];
    for options in refused {
        let error = transport
            .subscribe(&unique("bad"), options.clone())
            .await
            .expect_err("subscribing with invalid options must fail");
        assert!(!error.is_retryable(), "{options:?}: {error}");
    }

    let bus = EventBus::new(transport.clone(), "conformance").with_namespace(unique("ns"));
    let topic = bus.topic_of::<ConformanceEvent>().into_owned();
    let (seen, mut handled) = mpsc::unbounded_channel();
    let consumer = bus
        .subscribe::<ConformanceEvent, _>(
            SubscribeOptions::new(unique("g")),
            handler_fn(move |message: Message<ConformanceEvent>| {
                let seen = seen.clone();
                async move {
                    seen.send(message.payload().seq).ok();
                    Ok::<_, Error>(())
                }
            }),
        )
        .await
        .expect("subscribe through the bus");
    let garbage =
        RawMessage::new("{ this is not an envelope").with_header(header::EVENT_ID, "garbage-1");
    transport
        .publish(&topic, garbage)
        .await
        .expect("publishing raw bytes");
    bus.publish(ConformanceEvent { seq: 7 })
        .await
        .expect("publish a valid event");
    let first = tokio::time::timeout(patience(), handled.recv()).await;
    assert_eq!(
        first.ok().flatten(),
        Some(7),
        "the valid event behind the garbage was not handled"
    );
    consumer.shutdown().await.expect("consumer shutdown");
    assert!(
        handled.try_recv().is_err(),
        "the handler saw more than the one valid event"
    );

    if transport.capabilities().dead_letter {
        let dead = transport
            .dead_letters()
            .expect("dead_letter is claimed")
            .inspect(&topic, "garbage-1")
            .await
            .expect("the undecodable message is in the dead-letter queue");
        assert!(
            dead.reason.contains("not JSON"),
            "reason does not say why: {}",
            dead.reason
        );
    }
}

// ----------------------------------------------------- claimed capabilities

/// `nack` redelivers with a raised attempt count and loses nothing; a
/// transport that does not claim `nack` says `Unsupported`.
pub async fn nack_redelivers(transport: Arc<dyn Transport>) {
    let topic = unique("nack");
    let options = SubscribeOptions::new(unique("g")).with_prefetch(64);
    let mut subscription = subscribe(&*transport, &topic, options).await;
    if !transport.capabilities().nack {
        let publishing = publish_in_background(&transport, &topic, [0]);
        let delivery = recv_one(&mut subscription, "nack unsupported").await;
        let (error, delivery) = delivery
            .nack(Duration::ZERO)
            .await
            .expect_err("nack is not claimed, so it must fail");
        assert_eq!(error.kind(), ErrorKind::Unsupported, "{error}");
        let _ = delivery.ack().await;
        publishing.await.expect("publisher task");
        return;
    }
    let count = 50;
    let publishing = publish_in_background(&transport, &topic, 0..count);
    let mut redelivered = BTreeSet::new();
    while redelivered.len() < count as usize {
        let delivery = recv_one(&mut subscription, "nack then redelivery").await;
        let seq = seq_of(delivery.message());
        if redelivered.contains(&seq) {
            delivery
                .ack()
                .await
                .map_err(|(error, _)| error)
                .expect("ack");
        } else if delivery.attempt() == 1 {
            delivery
                .nack(Duration::from_millis(10))
                .await
                .map_err(|(error, _)| error)
                .expect("nack");
        } else {
            redelivered.insert(seq);
            delivery
                .ack()
                .await
                .map_err(|(error, _)| error)
                .expect("ack");
        }
    }
    assert_eq!(
        redelivered,
        range(count),
        "every nacked message came back with attempt > 1"
    );
    publishing.await.expect("publisher task");
    subscription.shutdown().await.expect("shutdown");
}

/// Competing: two groups each get every message, and inside a group each
/// message is handled once. Broadcast: two subscribers each get every one.
pub async fn groups_each_get_every_message_once(transport: Arc<dyn Transport>) {
    let topic = unique("groups");
    let competing = transport.capabilities().delivery == DeliveryMode::Competing;
    let mut inboxes = Vec::new();
    let mut consumers = Vec::new();
    for _ in 0..2 {
        let group = unique("g");
        let (seen, inbox) = mpsc::unbounded_channel();
        let members = if competing { 2 } else { 1 };
        for _ in 0..members {
            let subscription =
                subscribe(&*transport, &topic, SubscribeOptions::new(group.clone())).await;
            consumers.push(ack_into(subscription, seen.clone()));
        }
        inboxes.push(inbox);
    }
    let count = 200;
    publish_all(&*transport, &topic, 0..count).await;
    for mut inbox in inboxes {
        let counts = expect_all(&mut inbox, &range(count), "each group gets every message").await;
        if competing {
            let twice: Vec<_> = counts
                .iter()
                .filter(|(_, n)| **n > 1)
                .map(|(seq, _)| seq)
                .collect();
            assert!(
                twice.is_empty(),
                "messages handled more than once in one group: {twice:?}"
            );
        }
    }
    for consumer in consumers {
        consumer.abort();
    }
}

/// With concurrency 1, messages arrive in publish order (transports that
/// claim `ordered`).
pub async fn order_is_kept_with_concurrency_one(transport: Arc<dyn Transport>) {
    if !transport.capabilities().ordered {
        return;
    }
    let topic = unique("order");
    let mut subscription = subscribe(&*transport, &topic, SubscribeOptions::new(unique("g"))).await;
    let count = 500;
    publish_all(&*transport, &topic, 0..count).await;
    for expected in 0..count {
        let delivery = recv_one(&mut subscription, "ordered delivery").await;
        assert_eq!(seq_of(delivery.message()), expected, "out of order");
        delivery
            .ack()
            .await
            .map_err(|(error, _)| error)
            .expect("ack");
    }
    subscription.shutdown().await.expect("shutdown");
}

/// A group's subscriber that goes away and comes back receives what was
/// published meanwhile (transports that claim `redelivers_unacked`).
pub async fn resubscriber_receives_what_was_published_meanwhile(transport: Arc<dyn Transport>) {
    if !transport.capabilities().redelivers_unacked {
        return;
    }
    let topic = unique("resubscribe");
    let options = SubscribeOptions::new(unique("g"));
    let (seen, mut inbox) = mpsc::unbounded_channel();
    let subscription = subscribe(&*transport, &topic, options.clone()).await;
    let consumer = ack_into(subscription, seen.clone());
    publish_all(&*transport, &topic, 0..10).await;
    expect_all(&mut inbox, &range(10), "before going away").await;
    consumer.abort();
    let _ = consumer.await;

    publish_all(&*transport, &topic, 10..30).await;
    let subscription = subscribe(&*transport, &topic, options).await;
    let consumer = ack_into(subscription, seen);
    let expected: BTreeSet<u64> = (10..30).collect();
    expect_all(&mut inbox, &expected, "published while away").await;
    consumer.abort();
}

/// A subscriber shut down with deliveries in flight (some acked, some
/// dropped unsettled) leaves nothing behind: a new subscriber receives every
/// message not acked (duplicates allowed).
pub async fn shutdown_in_flight_then_new_subscriber_receives_everything(
    transport: Arc<dyn Transport>,
) {
    if !transport.capabilities().redelivers_unacked {
        return;
    }
    let topic = unique("shutdown");
    let options = SubscribeOptions::new(unique("g")).with_prefetch(20);
    let mut subscription = subscribe(&*transport, &topic, options.clone()).await;
    let count = 50;
    publish_all(&*transport, &topic, 0..count).await;
    let mut acked = BTreeSet::new();
    let mut held = Vec::new();
    for _ in 0..10 {
        let delivery = recv_one(&mut subscription, "first deliveries").await;
        if held.len() < 5 {
            held.push(delivery);
        } else {
            acked.insert(seq_of(delivery.message()));
            delivery
                .ack()
                .await
                .map_err(|(error, _)| error)
                .expect("ack");
        }
    }
    let shutdown = tokio::spawn(subscription.shutdown());
    drop(held);
    tokio::time::timeout(patience(), shutdown)
        .await
        .expect("shutdown finishes once the held deliveries are dropped")
        .expect("shutdown task")
        .expect("shutdown");

    let (seen, mut inbox) = mpsc::unbounded_channel();
    let consumer = ack_into(subscribe(&*transport, &topic, options).await, seen);
    let expected: BTreeSet<u64> = range(count).difference(&acked).copied().collect();
    expect_all(
        &mut inbox,
        &expected,
        "after shutdown with messages in flight",
    )
    .await;
    consumer.abort();
}

/// After [`Transport::declare`], messages published before any subscriber
/// starts are delivered to every declared group.
pub async fn declared_topology_keeps_messages_published_before_subscribe(
    transport: Arc<dyn Transport>,
) {
    if !transport.capabilities().redelivers_unacked {
        return;
    }
    let topic = unique("declared");
    let groups = [unique("g"), unique("g")];
    let topology = Topology::new().with_groups(topic.clone(), groups.clone());
    transport.declare(&topology).await.expect("declare");
    transport
        .declare(&topology)
        .await
        .expect("declaring twice is not an error");
    publish_all(&*transport, &topic, 0..20).await;
    for group in groups {
        let (seen, mut inbox) = mpsc::unbounded_channel();
        let consumer = ack_into(
            subscribe(&*transport, &topic, SubscribeOptions::new(group)).await,
            seen,
        );
        expect_all(
            &mut inbox,
            &range(20),
            "published before the first subscribe",
        )
        .await;
        consumer.abort();
    }
}

/// A dead-lettered message is listed with its reason and attempts, can be
/// inspected by id, and is delivered again to its group after a redrive; a
/// transport that does not claim `dead_letter` says `Unsupported`.
pub async fn dead_letters_can_be_listed_inspected_and_redriven(transport: Arc<dyn Transport>) {
    let topic = unique("dlq");
    let mut subscription = subscribe(&*transport, &topic, SubscribeOptions::new(unique("g"))).await;
    let event_id = Uuid::new_v4().to_string();
    let poison = test_message(1).with_header(header::EVENT_ID, event_id.clone());
    let publishing = {
        let (transport, topic, poison) = (transport.clone(), topic.clone(), poison.clone());
        tokio::spawn(async move { transport.publish(&topic, poison).await })
    };
    let delivery = recv_one(&mut subscription, "message to dead-letter").await;
    let attempt = delivery.attempt();
    let letter = crate::DeadLetter::new("conformance: poison").with_last_error("boom");

    if !transport.capabilities().dead_letter {
        let (error, delivery) = delivery
            .dead_letter(letter)
            .await
            .expect_err("dead_letter is not claimed, so it must fail");
        assert_eq!(error.kind(), ErrorKind::Unsupported, "{error}");
        let _ = delivery.ack().await;
        publishing.await.expect("publisher task").expect("publish");
        let error = transport
            .dead_letters()
            .err()
            .expect("no dead-letter queue is claimed");
        assert_eq!(error.kind(), ErrorKind::Unsupported, "{error}");
        return;
    }
    delivery
        .dead_letter(letter)
        .await
        .map_err(|(error, _)| error)
        .expect("dead_letter");
    publishing.await.expect("publisher task").expect("publish");
    let queue = transport.dead_letters().expect("dead_letter is claimed");

    let listed = queue.list(&topic, 10).await.expect("list");
    assert_eq!(listed.len(), 1, "one dead letter listed: {listed:?}");
    let dead = &listed[0];
    assert_eq!(dead.id, event_id, "dead letters are addressed by event id");
    assert_eq!(dead.reason, "conformance: poison");
    assert_eq!(dead.attempts, attempt);
    assert_eq!(dead.last_error.as_deref(), Some("boom"));
    assert_eq!(dead.topic, topic);
    assert_eq!(dead.group, subscription.group());
    assert_eq!(dead.message.body, poison.body, "dead letter body intact");
    assert_eq!(
        queue.inspect(&topic, &event_id).await.expect("inspect"),
        *dead
    );
    let missing = queue
        .inspect(&topic, "no-such-id")
        .await
        .expect_err("unknown id");
    assert_eq!(missing.kind(), ErrorKind::NotFound);

    assert_eq!(
        queue
            .redrive(&topic, Redrive::One(event_id.clone()))
            .await
            .expect("redrive"),
        1
    );
    let again = recv_one(&mut subscription, "redriven message").await;
    assert_eq!(again.message().body, poison.body, "redriven body intact");
    again.ack().await.map_err(|(error, _)| error).expect("ack");
    assert!(
        queue.list(&topic, 10).await.expect("list").is_empty(),
        "redrive empties the queue"
    );
    assert_eq!(
        queue
            .redrive(&topic, Redrive::All)
            .await
            .expect("redrive all"),
        0
    );
    subscription.shutdown().await.expect("shutdown");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_messages_carry_their_sequence_number() {
        assert_eq!(seq_of(&test_message(42)), 42);
        assert_ne!(test_message(1).body, test_message(2).body);
    }

    #[test]
    fn unique_names_are_valid_and_distinct() {
        let (a, b) = (unique("x"), unique("x"));
        assert_ne!(a, b);
        crate::validate_name("topic", &a).expect("valid");
    }
}
