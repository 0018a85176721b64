//! Scheduled delivery cases ([`Publisher::publish_at`](crate::Publisher::publish_at) /
//! [`Publisher::publish_after`](crate::Publisher::publish_after)).
//!
//! [`conformance_tests!`](crate::conformance_tests) runs
//! [`scheduled_messages_arrive_not_before_their_time`] on every transport: a
//! transport that claims [`Capabilities::scheduled`](crate::Capabilities::scheduled)
//! must deliver each message to every group not before its time and within
//! [`schedule_tolerance`] after it; one that does not must refuse with
//! [`ErrorKind::Unsupported`] and publish nothing.
//! [`scheduled_messages_survive_a_restart`] needs a second transport on the
//! same broker and names, so a transport's own tests call it with a
//! function that connects again (the suite's factories pick random names).

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio::sync::mpsc;

use super::conformance::{
    ConformanceEvent, publish_in_background, recv_one, seq_of, subscribe, test_message, unique,
};
use super::patience;
use crate::bus::EventBus;
use crate::error::{Error, ErrorKind};
use crate::topology::Topology;
use crate::transport::{DeliveryMode, SubscribeOptions, Subscription, Transport};

/// How late after its time a scheduled message may arrive in the suite:
/// 3 s by default (`SWITCHBOARD_CONFORMANCE_SCHEDULE_TOLERANCE_MS`). Each
/// transport states a far tighter figure in its docs (memory: a timer;
/// Redis Streams: the mover's tick; RabbitMQ: the buckets' hops); this one
/// leaves room for a loaded two-core CI machine running the whole suite at
/// once. Early is never tolerated.
pub fn schedule_tolerance() -> Duration {
    Duration::from_millis(
        super::env_number("SWITCHBOARD_CONFORMANCE_SCHEDULE_TOLERANCE_MS").unwrap_or(3_000),
    )
}

/// With [`Capabilities::scheduled`](crate::Capabilities::scheduled):
/// messages scheduled out of order (by `publish_at`, `publish_after`, and
/// one time already past) reach every group, each not before its time and
/// within [`schedule_tolerance`] after it. Without: `publish_at`,
/// `publish_after` and [`EventBus::publish_after`] fail with a
/// non-retryable [`ErrorKind::Unsupported`], and nothing is delivered.
pub async fn scheduled_messages_arrive_not_before_their_time(transport: Arc<dyn Transport>) {
    if !transport.capabilities().scheduled {
        return scheduling_is_refused(transport).await;
    }
    let topic = unique("scheduled");
    let groups: Vec<String> = match transport.capabilities().delivery {
        DeliveryMode::Competing => vec![unique("g"), unique("g")],
        DeliveryMode::Broadcast => vec![unique("g")],
    };
    transport
        .declare(&Topology::new().with_groups(topic.clone(), groups.clone()))
        .await
        .expect("declare the scheduled topic's groups");
    let (seen, mut arrivals) = mpsc::unbounded_channel();
    let mut receivers = Vec::new();
    for group in &groups {
        let subscription = subscribe(&*transport, &topic, SubscribeOptions::new(group)).await;
        receivers.push(stamp_arrivals(subscription, group.clone(), seen.clone()));
    }

    let now = Utc::now();
    let mut due: BTreeMap<u64, DateTime<Utc>> = BTreeMap::new();
    // Out of order on purpose: the latest first, one already past last.
    for (seq, after_ms) in [(0_u64, 1_500_i64), (1, 500), (2, 1_000), (3, -1_000)] {
        let at = now + chrono::Duration::milliseconds(after_ms);
        transport
            .publish_at(&topic, test_message(seq), at)
            .await
            .unwrap_or_else(|error| panic!("publish_at of {seq}: {error}"));
        // A time already past is due when published: lateness counts from
        // `now` (later than `at`, so not-before is checked all the same).
        due.insert(seq, at.max(now));
    }
    // `publish_after` counts from inside the call: not before `called + delay`.
    let called = Utc::now();
    transport
        .publish_after(&topic, test_message(4), Duration::from_millis(800))
        .await
        .unwrap_or_else(|error| panic!("publish_after: {error}"));
    due.insert(4, called + chrono::Duration::milliseconds(800));

    let expected = due.len() * groups.len();
    let mut arrived: BTreeMap<(String, u64), DateTime<Utc>> = BTreeMap::new();
    let deadline = tokio::time::Instant::now() + patience();
    while arrived.len() < expected {
        match tokio::time::timeout_at(deadline, arrivals.recv()).await {
            Ok(Some((group, seq, at))) => {
                arrived.entry((group, seq)).or_insert(at);
            }
            Ok(None) | Err(_) => panic!(
                "scheduled messages: {} of {expected} (group, seq) arrivals after {:?}: {:?}",
                arrived.len(),
                patience(),
                arrived.keys().collect::<Vec<_>>()
            ),
        }
    }
    let tolerance = chrono::Duration::from_std(schedule_tolerance()).expect("a small duration");
    let latest = arrived
        .iter()
        .map(|((_, seq), at)| *at - due[seq])
        .max()
        .unwrap_or_default();
    // The figure behind each transport's stated tolerance (`--nocapture`).
    println!(
        "{}: scheduled messages arrived at most {} ms after their time",
        transport.name(),
        latest.num_milliseconds()
    );
    for ((group, seq), at) in &arrived {
        let due = due[seq];
        assert!(
            *at >= due,
            "message {seq} reached group {group} {} ms before its time",
            (due - *at).num_milliseconds()
        );
        assert!(
            *at - due <= tolerance,
            "message {seq} reached group {group} {} ms after its time (tolerance {} ms)",
            (*at - due).num_milliseconds(),
            tolerance.num_milliseconds()
        );
    }
    for receiver in receivers {
        receiver.abort();
    }
}

/// Acks every delivery and reports `(group, cf-seq, when it arrived)`.
fn stamp_arrivals(
    mut subscription: Subscription,
    group: String,
    seen: mpsc::UnboundedSender<(String, u64, DateTime<Utc>)>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        while let Some(delivery) = subscription.recv().await {
            let at = Utc::now();
            let seq = seq_of(delivery.message());
            delivery.ack().await.expect("ack a scheduled message");
            if seen.send((group.clone(), seq, at)).is_err() {
                break;
            }
        }
    })
}

async fn scheduling_is_refused(transport: Arc<dyn Transport>) {
    let bus = EventBus::new(transport.clone(), "conformance").with_namespace(unique("ns"));
    // The bus's topic, so an event the bus published by mistake arrives too.
    let topic = bus.topic_of::<ConformanceEvent>().into_owned();
    let mut subscription = subscribe(&*transport, &topic, SubscribeOptions::new(unique("g"))).await;
    let refusals = [
        transport
            .publish_at(&topic, test_message(0), Utc::now())
            .await
            .err(),
        transport
            .publish_after(&topic, test_message(0), Duration::from_millis(1))
            .await
            .err(),
        bus.publish_after(Duration::from_millis(1), ConformanceEvent { seq: 0 })
            .await
            .err(),
        bus.publish_at(Utc::now(), ConformanceEvent { seq: 0 })
            .await
            .err(),
    ];
    for (which, refusal) in refusals.into_iter().enumerate() {
        let error: Error = refusal.unwrap_or_else(|| {
            panic!("scheduled publish #{which} succeeded without the `scheduled` capability")
        });
        assert_eq!(error.kind(), ErrorKind::Unsupported, "#{which}: {error}");
        assert!(!error.is_retryable(), "#{which}: {error}");
    }
    // Nothing was published at once instead: the next message is the first.
    let publishing = publish_in_background(&transport, &topic, 1..2);
    let first = recv_one(&mut subscription, "after refused schedules").await;
    assert_eq!(
        first.message().headers.get("cf-seq").map(String::as_str),
        Some("1"),
        "a refused scheduled publish was delivered anyway: {:?}",
        first.message()
    );
    first.ack().await.expect("ack");
    publishing.await.expect("the publisher task");
    subscription.shutdown().await.expect("shutdown");
}

/// Messages scheduled on `first` and still waiting when it is closed and
/// dropped (its mover, timers and connections with it) are delivered by a
/// transport `reconnect` builds on the same broker and names — each not
/// before its time, within [`schedule_tolerance`] after it, none lost.
/// For transports with [`Capabilities::scheduled`](crate::Capabilities::scheduled)
/// that keep what they schedule outside the process.
pub async fn scheduled_messages_survive_a_restart<F, Fut>(first: Arc<dyn Transport>, reconnect: F)
where
    F: FnOnce() -> Fut,
    Fut: Future<Output = Arc<dyn Transport>>,
{
    assert!(
        first.capabilities().scheduled,
        "{} does not claim `scheduled`",
        first.name()
    );
    let topic = unique("restart-scheduled");
    let group = unique("g");
    let topology = Topology::new().with_groups(topic.clone(), [group.clone()]);
    first.declare(&topology).await.expect("declare");
    let now = Utc::now();
    let mut due = BTreeMap::new();
    for (seq, after_ms) in [(0_u64, 2_500_i64), (1, 3_000), (2, 2_000)] {
        let at = now + chrono::Duration::milliseconds(after_ms);
        first
            .publish_at(&topic, test_message(seq), at)
            .await
            .unwrap_or_else(|error| panic!("publish_at of {seq}: {error}"));
        due.insert(seq, at);
    }
    first.close().await.expect("close the first transport");
    drop(first);
    assert!(
        Utc::now() < now + chrono::Duration::milliseconds(2_000),
        "the first transport took too long to close for this case to mean anything"
    );

    let second = reconnect().await;
    let (seen, mut arrivals) = mpsc::unbounded_channel();
    let subscription = subscribe(&*second, &topic, SubscribeOptions::new(&group)).await;
    let receiver = stamp_arrivals(subscription, group.clone(), seen);
    let tolerance = chrono::Duration::from_std(schedule_tolerance()).expect("a small duration");
    let mut arrived = BTreeMap::new();
    let deadline = tokio::time::Instant::now() + patience();
    while arrived.len() < due.len() {
        match tokio::time::timeout_at(deadline, arrivals.recv()).await {
            Ok(Some((_, seq, at))) => {
                arrived.entry(seq).or_insert(at);
            }
            Ok(None) | Err(_) => panic!(
                "after a restart only {:?} of the scheduled messages arrived within {:?}",
                arrived.keys().collect::<Vec<_>>(),
                patience()
            ),
        }
    }
    for (seq, at) in arrived {
        let due = due[&seq];
        assert!(at >= due, "message {seq} arrived before its time");
        assert!(
            at - due <= tolerance,
            "message {seq} arrived {} ms after its time",
            (at - due).num_milliseconds()
        );
    }
    receiver.abort();
    second.close().await.expect("close the second transport");
}
