//! Outcome cases: a handler that gives up is never a silent success, and a
//! group in the middle of a rolling deploy (an old and a new member, the
//! producer already on the new major version) hands every message to a
//! member that can read it. [`conformance_tests!`](crate::conformance_tests)
//! runs them with the rest; [`push_retries_have_one_owner`] is for the push
//! transports' own tests.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tower::ServiceBuilder;

use super::conformance::{ConformanceEvent, unique};
use super::patience;
use crate::bus::{ConsumerHandle, EventBus, Message, handler_fn};
use crate::config::RetryConfig;
use crate::envelope::Event;
use crate::error::{Error, ErrorKind};
use crate::middleware::retry::RetryLayer;
use crate::topology::Topology;
use crate::transport::{
    DeadLettered, DeliveryMode, GiveBackLimit, SubscribeOptions, Transport, header,
};

/// The event before the deploy: what old members read.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct RollingV1 {
    seq: u64,
}

impl Event for RollingV1 {
    const TYPE: &'static str = "conformance.rolling";
    const VERSION: &'static str = "1.4";
}

/// The same event after the deploy: a new major version, which old members
/// cannot read.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct RollingV2 {
    seq: u64,
    venue: String,
}

impl Event for RollingV2 {
    const TYPE: &'static str = "conformance.rolling";
    const VERSION: &'static str = "2.1";
}

fn v2(seq: u64) -> RollingV2 {
    RollingV2 {
        seq,
        venue: "XLON".to_owned(),
    }
}

/// Subscribes a member of `options.group` that reads `E` and reports each
/// seq it handles.
async fn member<E, F>(
    bus: &EventBus,
    options: SubscribeOptions,
    seq: F,
    seen: mpsc::UnboundedSender<u64>,
) -> ConsumerHandle
where
    E: Event,
    F: Fn(&E) -> u64 + Clone + Send + Sync + 'static,
{
    bus.subscribe::<E, _>(
        options,
        handler_fn(move |message: Message<E>| {
            let (seen, seq) = (seen.clone(), seq.clone());
            async move {
                seen.send(seq(message.payload())).ok();
                Ok::<_, Error>(())
            }
        }),
    )
    .await
    .expect("subscribe a member")
}

/// A bus under a fresh namespace, its topic for `E` and a fresh group
/// declared for it.
async fn declared<E: Event>(
    transport: &Arc<dyn Transport>,
    label: &str,
) -> (EventBus, String, String) {
    let bus = EventBus::new(transport.clone(), "conformance").with_namespace(unique(label));
    let topic = bus.topic_of::<E>().into_owned();
    let group = unique("g");
    bus.declare(&Topology::new().with_groups(E::TYPE, [group.clone()]))
        .await
        .expect("declare");
    (bus, topic, group)
}

/// Waits until every seq of `expected` was seen on `seen` (what it takes
/// off the channel meanwhile is gone).
async fn expect_seen(
    seen: &mut mpsc::UnboundedReceiver<u64>,
    expected: &BTreeSet<u64>,
    what: &str,
) {
    let mut got = BTreeSet::new();
    let deadline = tokio::time::Instant::now() + patience();
    while !expected.is_subset(&got) {
        match tokio::time::timeout_at(deadline, seen.recv()).await {
            Ok(Some(seq)) => {
                got.insert(seq);
            }
            Ok(None) | Err(_) => {
                let missing: Vec<_> = expected.difference(&got).collect();
                panic!(
                    "{what}: {} of {} missing after {:?}: {:?}",
                    missing.len(),
                    expected.len(),
                    patience(),
                    &missing[..missing.len().min(20)]
                );
            }
        }
    }
}

/// Waits for a dead letter of `topic` that `matches`.
async fn dead_letter_where(
    bus: &EventBus,
    topic: &str,
    matches: impl Fn(&DeadLettered) -> bool,
    what: &str,
) -> DeadLettered {
    let queue = bus
        .dead_letter_queue()
        .expect("a dead-letter queue is claimed");
    let deadline = tokio::time::Instant::now() + patience();
    loop {
        let letters = queue.list(topic, 50).await.expect("list dead letters");
        if let Some(letter) = letters.into_iter().find(|letter| matches(letter)) {
            return letter;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: no such dead letter within {:?}",
            patience()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A rolling deploy: an old member (major 1) and a new one (major 2) in one
/// group, the producer already on major 2 and still sending some major 1.
///
/// First the old member runs alone while more major-2 messages than its
/// prefetch sit ahead of major-1 ones: it gives those back and handles
/// every major-1 message — never stalled by a prefetch full of messages it
/// cannot read. Then the new member joins and more of both are published:
/// every major-2 message is handled by the new member, every major-1 one by
/// the old, and nothing is dead-lettered — not even by the poison guard,
/// for a give-back is an outcome. Needs a broker that keeps
/// messages for a competing group (`redelivers_unacked`).
pub async fn a_mixed_group_hands_each_version_to_a_member_that_reads_it(
    transport: Arc<dyn Transport>,
) {
    let caps = transport.capabilities();
    if caps.delivery != DeliveryMode::Competing || !caps.redelivers_unacked {
        return;
    }
    const PREFETCH: usize = 8;
    let (bus, topic, group) = declared::<RollingV1>(&transport, "rolling").await;
    // With the poison guard on: a give-back is an outcome, not a delivery
    // that ended without one, however often a message comes back.
    let options = SubscribeOptions::new(group.clone())
        .with_prefetch(PREFETCH)
        .with_concurrency(2)
        .with_max_deliveries(2);

    let (old_seen, mut old_handled) = mpsc::unbounded_channel();
    let old = member::<RollingV1, _>(&bus, options.clone(), |e| e.seq, old_seen).await;
    // Three prefetches of messages the old member cannot read, ahead of
    // twenty it can.
    let newer_first: Vec<u64> = (1000..1000 + 3 * PREFETCH as u64).collect();
    bus.publish_batch(newer_first.iter().map(|&seq| v2(seq)))
        .await
        .expect("publish major 2");
    bus.publish_batch((0..20).map(|seq| RollingV1 { seq }))
        .await
        .expect("publish major 1");
    let started = tokio::time::Instant::now();
    expect_seen(
        &mut old_handled,
        &(0..20).collect(),
        "the old member alone, behind messages it cannot read",
    )
    .await;
    let alone = started.elapsed();

    let (new_seen, mut new_handled) = mpsc::unbounded_channel();
    let new = member::<RollingV2, _>(&bus, options, |e| e.seq, new_seen).await;
    let newer_later: Vec<u64> = (2000..2000 + 3 * PREFETCH as u64).collect();
    for (index, &seq) in newer_later.iter().enumerate() {
        bus.publish(v2(seq)).await.expect("publish major 2");
        bus.publish(RollingV1 {
            seq: 20 + index as u64,
        })
        .await
        .expect("publish major 1");
    }
    let all_newer: BTreeSet<u64> = newer_first.iter().chain(&newer_later).copied().collect();
    expect_seen(&mut new_handled, &all_newer, "major 2 by the new member").await;
    let older_later: BTreeSet<u64> = (20..20 + newer_later.len() as u64).collect();
    expect_seen(&mut old_handled, &older_later, "major 1 by the old member").await;
    let older: BTreeSet<u64> = (0..20 + newer_later.len() as u64).collect();
    old.shutdown().await.expect("old member shutdown");
    new.shutdown().await.expect("new member shutdown");
    // A member only ever handles what it reads: the channels carry seqs
    // from their own version's range alone.
    while let Ok(seq) = old_handled.try_recv() {
        assert!(older.contains(&seq), "the old member handled {seq}");
    }
    while let Ok(seq) = new_handled.try_recv() {
        assert!(all_newer.contains(&seq), "the new member handled {seq}");
    }
    if caps.dead_letter {
        let letters = bus
            .dead_letter_queue()
            .expect("dead letters")
            .list(&topic, 10)
            .await
            .expect("list dead letters");
        assert!(letters.is_empty(), "nothing is dead-lettered: {letters:?}");
    }
    tracing::info!(?alone, "old member handled its 20 behind 24 it gave back");
}

/// A message of a major version no member knows is given back until the
/// subscription's [`GiveBackLimit`] (here three times) and then
/// dead-lettered, with reason "no member of group … knows version 2.1 of
/// …"; the messages the member reads flow meanwhile. Needs a broker that
/// keeps messages for a competing group and a dead-letter queue.
pub async fn what_no_member_can_read_is_dead_lettered_past_the_give_back_limit(
    transport: Arc<dyn Transport>,
) {
    let caps = transport.capabilities();
    if caps.delivery != DeliveryMode::Competing || !caps.redelivers_unacked || !caps.dead_letter {
        return;
    }
    let (bus, topic, group) = declared::<RollingV1>(&transport, "unknown").await;
    let options = SubscribeOptions::new(group.clone())
        .with_give_back_limit(GiveBackLimit::default().with_max_times(3));
    let (seen, mut handled) = mpsc::unbounded_channel();
    let old = member::<RollingV1, _>(&bus, options, |e| e.seq, seen).await;
    let unknown = bus.publish(v2(7)).await.expect("publish major 2");
    bus.publish_batch((0..5).map(|seq| RollingV1 { seq }))
        .await
        .expect("publish major 1");
    expect_seen(&mut handled, &(0..5).collect(), "what the member reads").await;
    let letter = dead_letter_where(
        &bus,
        &topic,
        |letter| letter.message.headers.get(header::EVENT_ID) == Some(&unknown.to_string()),
        "the unknown version",
    )
    .await;
    old.shutdown().await.expect("shutdown");
    let expected = format!(
        "no member of group {group:?} knows version 2.1 of {}",
        RollingV1::TYPE
    );
    assert!(
        letter.reason.starts_with(&expected),
        "the reason says why: {}",
        letter.reason
    );
    assert!(
        letter.reason.contains("given back 3 times"),
        "{}",
        letter.reason
    );
    assert_eq!(
        letter
            .message
            .headers
            .get(header::GIVEN_BACK)
            .map(String::as_str),
        Some("3"),
        "the count travelled with the message"
    );
}

/// A handler whose retry layer gives up (three attempts, each failing
/// transiently) is called exactly three times — neither the transport's
/// redelivery nor a push publisher's retry multiplies them — and its
/// failure is never a silent success: it is in the dead-letter queue with
/// the last error, or (a push transport, which keeps no dead letters) the
/// publisher's `publish` fails, not retryable, naming it. Broadcast
/// transports without dead letters are exempt.
pub async fn a_handler_that_gives_up_is_never_a_silent_success(transport: Arc<dyn Transport>) {
    let caps = transport.capabilities();
    if caps.delivery == DeliveryMode::Broadcast && !caps.dead_letter {
        return;
    }
    let (bus, topic, group) = declared::<ConformanceEvent>(&transport, "gave-up").await;
    let calls = Arc::new(AtomicU32::new(0));
    let counted = calls.clone();
    let retry = RetryConfig {
        max_attempts: 3,
        backoff_ms: 1,
        backoff_multiplier: 1.0,
        max_backoff_ms: 5,
        jitter: false,
        ..RetryConfig::default()
    };
    let handler = ServiceBuilder::new()
        .layer(RetryLayer::for_messages(retry))
        .service(handler_fn(move |_: Message<ConformanceEvent>| {
            counted.fetch_add(1, Ordering::SeqCst);
            async { Err::<(), _>(Error::transient("the ledger is down")) }
        }));
    let consumer = bus
        .subscribe::<ConformanceEvent, _>(SubscribeOptions::new(group), handler)
        .await
        .expect("subscribe");
    let published = {
        let bus = bus.clone();
        tokio::spawn(async move { bus.publish(ConformanceEvent { seq: 1 }).await })
    };
    let published = tokio::time::timeout(patience(), published)
        .await
        .expect("publish returns")
        .expect("publisher task");
    if caps.dead_letter {
        let id = published.expect("the broker accepted the message");
        let letter = dead_letter_where(
            &bus,
            &topic,
            |letter| letter.message.headers.get(header::EVENT_ID) == Some(&id.to_string()),
            "the message its handler gave up on",
        )
        .await;
        let last = letter.last_error.as_deref().unwrap_or_default();
        assert!(last.contains("the ledger is down"), "last error: {last:?}");
    } else {
        let error = published.expect_err("a handler that gave up is not an OK");
        assert!(!error.is_retryable(), "a rejection is not retried: {error}");
        assert_eq!(error.kind(), ErrorKind::Rejected, "{error}");
        assert!(
            error.message().contains("the ledger is down"),
            "the publisher hears why: {error}"
        );
    }
    // Stopped and drained: every call that was going to run has run.
    consumer.shutdown().await.expect("shutdown");
    assert_eq!(
        calls.load(Ordering::SeqCst),
        3,
        "the handler's retry layer is the one retry owner"
    );
}

/// For a push transport whose publisher makes `max_attempts` attempts: a
/// handler that keeps asking for a retry (an open breaker) is called once
/// per publisher attempt, exactly — the publisher's loop is the one retry
/// owner — and `publish` then fails, retryable, with the attempts it made
/// ([`Error::attempts`]), so a retry on top knows not to multiply them.
pub async fn push_retries_have_one_owner(transport: Arc<dyn Transport>, max_attempts: u32) {
    let bus = EventBus::new(transport.clone(), "conformance").with_namespace(unique("owner"));
    let calls = Arc::new(AtomicU32::new(0));
    let counted = calls.clone();
    let consumer = bus
        .subscribe::<ConformanceEvent, _>(
            SubscribeOptions::new(unique("g")),
            handler_fn(move |_: Message<ConformanceEvent>| {
                counted.fetch_add(1, Ordering::SeqCst);
                async {
                    Err::<(), _>(
                        Error::new(ErrorKind::BreakerOpen, "market breaker open")
                            .with_requeue(Duration::from_millis(1)),
                    )
                }
            }),
        )
        .await
        .expect("subscribe");
    let error = tokio::time::timeout(patience(), bus.publish(ConformanceEvent { seq: 1 }))
        .await
        .expect("publish returns")
        .expect_err("never acked");
    assert!(error.is_retryable(), "{error}");
    assert_eq!(error.attempts(), Some(max_attempts), "{error:?}");
    // The publisher has given up; stopped and drained, the receiver has run
    // every call it was going to.
    consumer.shutdown().await.expect("shutdown");
    assert_eq!(calls.load(Ordering::SeqCst), max_attempts);
}

/// For a push transport whose publisher makes `max_attempts` attempts: a
/// message of a major version the receiving member does not know is given
/// back — answered retryable, so the publisher sends it again (behind a
/// load balancer, maybe to a newer replica) — and when no attempt finds a
/// member that reads it, `publish` fails, retryable, saying why.
pub async fn a_push_nobody_can_read_fails_saying_why(
    transport: Arc<dyn Transport>,
    max_attempts: u32,
) {
    let bus = EventBus::new(transport.clone(), "conformance").with_namespace(unique("newer"));
    let (seen, _handled) = mpsc::unbounded_channel();
    let old =
        member::<RollingV1, _>(&bus, SubscribeOptions::new(unique("g")), |e| e.seq, seen).await;
    let error = tokio::time::timeout(patience(), bus.publish(v2(1)))
        .await
        .expect("publish returns")
        .expect_err("no member reads 2.1");
    assert!(error.is_retryable(), "{error}");
    assert_eq!(error.attempts(), Some(max_attempts), "{error:?}");
    assert!(
        error
            .message()
            .contains("reads version 1.4 of conformance.rolling, not 2.1"),
        "the publisher hears why: {error}"
    );
    old.shutdown().await.expect("shutdown");
}
