//! The conformance cases. Each takes a fresh transport and panics with a
//! message saying what broke. [`conformance_tests!`](crate::conformance_tests)
//! runs them all; they can also be called one by one.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use uuid::Uuid;

pub use super::claimed::{
    dead_letters_can_be_listed_inspected_and_redriven,
    declared_topology_keeps_messages_published_before_subscribe,
    groups_each_get_every_message_once, nack_redelivers, order_is_kept_with_concurrency_one,
    resubscriber_receives_what_was_published_meanwhile,
    shutdown_in_flight_then_new_subscriber_receives_everything,
};
pub use super::dead_letters::typed_dead_letters_are_alerted_once_stored_and_redriven_by_key_or_id;
pub use super::delayed::scheduled_messages_arrive_not_before_their_time;
pub use super::flow::{
    a_poison_message_is_dead_lettered_after_max_deliveries,
    a_publish_nothing_would_receive_is_refused_or_kept, a_requeue_storm_holds_only_the_prefetch,
};
pub use super::lifecycle::close_ends_subscriptions_and_refuses_new_work;
pub use super::outcomes::{
    a_handler_that_gives_up_is_never_a_silent_success,
    a_mixed_group_hands_each_version_to_a_member_that_reads_it,
    what_no_member_can_read_is_dead_lettered_past_the_give_back_limit,
};
use super::{message_count, patience};
use crate::bus::{EventBus, Message, handler_fn};
use crate::envelope::Event;
use crate::error::Error;
use crate::transport::{
    DeliveryMode, RawMessage, SubscribeOptions, Subscription, Transport, header,
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

pub(super) fn seq_of(message: &RawMessage) -> u64 {
    let seq = message
        .headers
        .get(SEQ)
        .unwrap_or_else(|| panic!("a delivery lost its {SEQ:?} header: {:?}", message.headers));
    seq.parse().expect("cf-seq is a number")
}

pub(super) async fn publish_all(
    transport: &dyn Transport,
    topic: &str,
    seqs: impl IntoIterator<Item = u64>,
) {
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
pub(super) fn publish_in_background(
    transport: &Arc<dyn Transport>,
    topic: &str,
    seqs: impl IntoIterator<Item = u64, IntoIter: Send> + Send + 'static,
) -> JoinHandle<()> {
    let (transport, topic) = (transport.clone(), topic.to_owned());
    tokio::spawn(async move { publish_all(&*transport, &topic, seqs).await })
}

pub(super) async fn subscribe(
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
pub(super) fn ack_into(
    mut subscription: Subscription,
    seen: mpsc::UnboundedSender<u64>,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        while let Some(delivery) = subscription.recv().await {
            let seq = seq_of(delivery.message());
            if let Err(error) = delivery.ack().await {
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
pub(super) async fn expect_all(
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

pub(super) async fn recv_one(
    subscription: &mut Subscription,
    what: &str,
) -> crate::transport::Delivery {
    match tokio::time::timeout(patience(), subscription.recv()).await {
        Ok(Some(delivery)) => delivery,
        Ok(None) => panic!("{what}: the subscription ended"),
        Err(_) => panic!("{what}: nothing delivered within {:?}", patience()),
    }
}

pub(super) fn range(count: u64) -> BTreeSet<u64> {
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
        delivery.ack().await.expect("ack");
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
/// message: they are dead-lettered at once where the transport keeps dead
/// letters, and a push publisher gets a non-retryable error saying why.
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
    match transport.publish(&topic, garbage).await {
        Ok(()) => {}
        // A push publisher hears of the rejection: there is no dead-letter
        // queue, and the handler never accepted the bytes.
        Err(error) if !transport.capabilities().dead_letter => {
            assert!(!error.is_retryable(), "a rejection is not retried: {error}");
            assert!(error.message().contains("not JSON"), "says why: {error}");
        }
        Err(error) => panic!("publishing raw bytes: {error}"),
    }
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
