//! Flow-control cases: what a subscription holds under a failing
//! dependency, the poison guard, and publishes nothing would receive.
//! [`conformance_tests!`](crate::conformance_tests) runs them with the rest;
//! [`requeue_storm`] is public so a transport's own tests (and
//! `scripts/chaos`) can run it with a probe of their own and bigger figures.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{Notify, mpsc};

use super::conformance::{ConformanceEvent, unique};
use super::patience;
use crate::bus::{EventBus, Message, handler_fn};
use crate::envelope::Event;
use crate::error::{Error, ErrorKind};
use crate::topology::Topology;
use crate::transport::{DeliveryMode, SubscribeOptions, Transport};

/// The shape of a [`requeue_storm`] run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Storm {
    /// Messages published before the consumer starts.
    pub backlog: u64,
    /// How long the handler refuses (asks for a requeue) before it succeeds.
    pub refuse_for: Duration,
    /// The requeue delay the handler asks for.
    pub requeue_after: Duration,
    /// The subscription's prefetch.
    pub prefetch: usize,
    /// The subscription's concurrency.
    pub concurrency: usize,
}

impl Storm {
    /// The conformance figures: a backlog of 10 000 (or
    /// `SWITCHBOARD_CONFORMANCE_BACKLOG`), refusing for 5 s (or
    /// `SWITCHBOARD_CONFORMANCE_REFUSE_SECS`) with a 1 s requeue, prefetch
    /// 64, concurrency 4.
    pub fn conformance() -> Self {
        Self {
            backlog: super::env_number("SWITCHBOARD_CONFORMANCE_BACKLOG").unwrap_or(10_000),
            refuse_for: Duration::from_secs(
                super::env_number("SWITCHBOARD_CONFORMANCE_REFUSE_SECS").unwrap_or(5),
            ),
            requeue_after: Duration::from_secs(1),
            prefetch: 64,
            concurrency: 4,
        }
    }
}

/// What a [`requeue_storm`] run counted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StormReport {
    /// Distinct messages the handler saw while it refused: what the
    /// subscription took from the backlog.
    pub touched_while_refusing: usize,
    /// Handler calls while it refused (each a requeue).
    pub calls_while_refusing: usize,
    /// The most tasks alive on the runtime at once during the run, minus
    /// those alive before the consumer started.
    pub extra_tasks: usize,
    /// The largest figure the caller's probe reported (0 without one), such
    /// as `XPENDING` for the group.
    pub probe_max: usize,
    /// Messages handled more than once after the handler recovered.
    pub handled_twice: usize,
    /// Time from the recovery until every message was handled.
    pub drained_in: Duration,
}

/// Publishes a backlog, then consumes it through the [`EventBus`] with a
/// handler that asks for a requeue for `storm.refuse_for` (a dependency
/// that is down) and then succeeds; counts what the subscription held
/// meanwhile and checks every message is handled, none twice. `probe` is
/// sampled every 20 ms alongside the runtime's task count.
pub async fn requeue_storm<P, F>(
    transport: Arc<dyn Transport>,
    storm: Storm,
    probe: P,
) -> StormReport
where
    P: Fn(String, String) -> F + Send + Sync + 'static,
    F: Future<Output = usize> + Send,
{
    let bus = EventBus::new(transport, "conformance").with_namespace(unique("storm"));
    let group = unique("g");
    // The bus puts the topology under its namespace.
    bus.declare(&Topology::new().with_groups(ConformanceEvent::TYPE, [group.clone()]))
        .await
        .expect("declare the storm's topic");
    let seqs: Vec<u64> = (0..storm.backlog).collect();
    for chunk in seqs.chunks(500) {
        let events = chunk.iter().map(|&seq| ConformanceEvent { seq });
        bus.publish_batch(events)
            .await
            .unwrap_or_else(|error| panic!("publish the backlog: {error}"));
    }

    let refusing = Arc::new(AtomicBool::new(true));
    let touched = Arc::new(Mutex::new(BTreeSet::new()));
    let calls = Arc::new(AtomicUsize::new(0));
    let (handled_tx, mut handled) = mpsc::unbounded_channel();
    let handler = {
        let (refusing, touched, calls) = (refusing.clone(), touched.clone(), calls.clone());
        let requeue_after = storm.requeue_after;
        handler_fn(move |message: Message<ConformanceEvent>| {
            let seq = message.payload().seq;
            let outcome = if refusing.load(Ordering::SeqCst) {
                calls.fetch_add(1, Ordering::Relaxed);
                touched.lock().expect("touched set").insert(seq);
                Err(Error::new(ErrorKind::BreakerOpen, "dependency down")
                    .with_requeue(requeue_after))
            } else {
                handled_tx.send(seq).ok();
                Ok(())
            };
            async move { outcome }
        })
    };

    let metrics = tokio::runtime::Handle::current().metrics();
    let tasks_before = metrics.num_alive_tasks();
    let sampling = Arc::new(AtomicBool::new(true));
    let sampler = {
        let sampling = sampling.clone();
        let (topic, group) = (
            bus.topic_of::<ConformanceEvent>().into_owned(),
            group.clone(),
        );
        tokio::spawn(async move {
            let (mut tasks, mut probed) = (0, 0);
            while sampling.load(Ordering::SeqCst) {
                tasks = tasks.max(metrics.num_alive_tasks());
                probed = probed.max(probe(topic.clone(), group.clone()).await);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            (tasks, probed)
        })
    };
    let options = SubscribeOptions::new(group)
        .with_prefetch(storm.prefetch)
        .with_concurrency(storm.concurrency);
    let consumer = bus
        .subscribe::<ConformanceEvent, _>(options, handler)
        .await
        .expect("subscribe the storm's consumer");
    // The dependency's outage: the scenario's own duration, not a wait for
    // the code under test.
    tokio::time::sleep(storm.refuse_for).await;
    refusing.store(false, Ordering::SeqCst);
    let touched_while_refusing = touched.lock().expect("touched set").len();
    let calls_while_refusing = calls.load(Ordering::Relaxed);
    let recovered = tokio::time::Instant::now();

    let mut counts: BTreeMap<u64, usize> = BTreeMap::new();
    let deadline = recovered + patience() + storm.requeue_after;
    while counts.len() < storm.backlog as usize {
        match tokio::time::timeout_at(deadline, handled.recv()).await {
            Ok(Some(seq)) => *counts.entry(seq).or_insert(0) += 1,
            _ => panic!(
                "requeue storm: {} of {} messages handled {:?} after the dependency recovered",
                counts.len(),
                storm.backlog,
                patience() + storm.requeue_after,
            ),
        }
    }
    let drained_in = recovered.elapsed();
    // Anything handled twice would show up among the last handlings too.
    while let Ok(Some(seq)) = tokio::time::timeout(
        storm.requeue_after + Duration::from_millis(200),
        handled.recv(),
    )
    .await
    {
        *counts.entry(seq).or_insert(0) += 1;
    }
    sampling.store(false, Ordering::SeqCst);
    let (tasks_max, probe_max) = sampler.await.expect("sampler task");
    consumer.shutdown().await.expect("consumer shutdown");
    StormReport {
        touched_while_refusing,
        calls_while_refusing,
        extra_tasks: tasks_max.saturating_sub(tasks_before),
        probe_max,
        handled_twice: counts.values().filter(|&&count| count > 1).count(),
        drained_in,
    }
}

/// The most a subscription may hold beyond its prefetch in
/// [`a_requeue_storm_holds_only_the_prefetch`], and the most tasks the
/// consumer may add to the runtime: small constants, not figures that grow
/// with the backlog.
pub const STORM_SLACK: usize = 16;

/// A backlog of 10 000 and a handler whose dependency is down for 5 s
/// (it asks for a requeue after 1 s each time): while it refuses, the
/// subscription takes at most `prefetch` messages from the backlog and adds
/// no task per nack; afterwards every message is handled, none twice.
/// Skipped for transports without a broker-side backlog (push, broadcast).
pub async fn a_requeue_storm_holds_only_the_prefetch(transport: Arc<dyn Transport>) {
    let caps = transport.capabilities();
    if !caps.nack || !caps.redelivers_unacked || caps.delivery != DeliveryMode::Competing {
        return;
    }
    let storm = Storm::conformance();
    let prefetch = storm.prefetch;
    let name = transport.name();
    let report = requeue_storm(transport, storm, |_, _| async { 0 }).await;
    // One line for scripts/chaos to collect.
    eprintln!("requeue storm on {name}: {report:?}");
    assert!(
        report.touched_while_refusing <= prefetch + STORM_SLACK,
        "while the handler refused, the subscription took {} messages from the backlog \
         (prefetch {prefetch}): {report:?}",
        report.touched_while_refusing,
    );
    assert!(
        report.extra_tasks <= STORM_SLACK,
        "the consumer added {} tasks while nacking: {report:?}",
        report.extra_tasks,
    );
    assert_eq!(report.handled_twice, 0, "handled twice: {report:?}");
}

/// With `max_deliveries = 3`, a message whose consumer crashes every time
/// (the consume loop is aborted while the handler holds it) is delivered
/// three times, then dead-lettered with reason "delivered 3 times without an
/// outcome" before a handler sees it again; the messages behind it flow.
/// Needs redelivery of unsettled messages and a dead-letter queue.
pub async fn a_poison_message_is_dead_lettered_after_max_deliveries(transport: Arc<dyn Transport>) {
    let caps = transport.capabilities();
    if !caps.redelivers_unacked || !caps.dead_letter || caps.delivery != DeliveryMode::Competing {
        return;
    }
    const POISON: u64 = 0;
    const OTHERS: u64 = 20;
    let bus = EventBus::new(transport.clone(), "conformance").with_namespace(unique("poison"));
    let topic = bus.topic_of::<ConformanceEvent>().into_owned();
    let group = unique("g");
    bus.declare(&Topology::new().with_groups(ConformanceEvent::TYPE, [group.clone()]))
        .await
        .expect("declare");
    bus.publish_batch((0..=OTHERS).map(|seq| ConformanceEvent { seq }))
        .await
        .expect("publish");

    let crashing = Arc::new(Notify::new());
    let (handled_tx, mut handled) = mpsc::unbounded_channel();
    let mut crashes = 0;
    let mut others = BTreeSet::new();
    let deadline = tokio::time::Instant::now() + patience();
    let dead_letters = bus.dead_letter_queue().expect("a dead-letter queue");
    let poison_letter = loop {
        let handler = {
            let (crashing, handled_tx) = (crashing.clone(), handled_tx.clone());
            handler_fn(move |message: Message<ConformanceEvent>| {
                let (crashing, handled_tx) = (crashing.clone(), handled_tx.clone());
                async move {
                    let seq = message.payload().seq;
                    if seq == POISON {
                        crashing.notify_one();
                        // Holds the message until the consumer is aborted.
                        std::future::pending::<()>().await;
                    }
                    handled_tx.send(seq).ok();
                    Ok::<_, Error>(())
                }
            })
        };
        let options = SubscribeOptions::new(group.clone())
            .with_concurrency(4)
            .with_max_deliveries(3);
        let consumer = bus
            .subscribe::<ConformanceEvent, _>(options, handler)
            .await
            .expect("subscribe");
        // Every other message handled and the poison one dead-lettered.
        let settled = tokio::time::timeout_at(deadline, async {
            while others.len() < OTHERS as usize {
                match handled.recv().await {
                    Some(seq) => {
                        others.insert(seq);
                    }
                    None => std::future::pending::<()>().await,
                }
            }
            // The consume loop dead-letters it without a handler to tell:
            // look until it is there.
            loop {
                let letters = dead_letters
                    .list(&topic, 10)
                    .await
                    .expect("list dead letters");
                if let Some(letter) = letters
                    .into_iter()
                    .find(|letter| letter.reason.contains("without an outcome"))
                {
                    return letter;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        });
        tokio::select! {
            () = crashing.notified() => {
                crashes += 1;
                assert!(crashes <= 3, "the poison message reached a handler a 4th time");
                consumer.abort();
            }
            settled = settled => {
                let letter = settled.unwrap_or_else(|_| panic!(
                    "poison: after {crashes} crashes, the others were not all handled \
                     or the poison message not dead-lettered within {:?}",
                    patience(),
                ));
                consumer.shutdown().await.expect("shutdown");
                break letter;
            }
        }
    };
    assert_eq!(
        crashes, 3,
        "the poison message crashed its consumer 3 times"
    );
    assert_eq!(poison_letter.reason, "delivered 3 times without an outcome");
}

/// A publish to a topic no group is declared for and nobody subscribes to
/// either fails (a broker refusing an unroutable message, a push receiver
/// with nobody to hand it to) or is kept for a group that comes later —
/// never `Ok` and then lost. Broadcast transports (at most once by design)
/// are exempt.
pub async fn a_publish_nothing_would_receive_is_refused_or_kept(transport: Arc<dyn Transport>) {
    if transport.capabilities().delivery == DeliveryMode::Broadcast {
        return;
    }
    let topic = unique("unheard");
    let sent = super::conformance::test_message(1);
    match transport.publish(&topic, sent.clone()).await {
        // Refused: the publisher knows. Retryable or not is the transport's
        // call (a push receiver may be starting up).
        Err(_) => {}
        Ok(()) => {
            let mut subscription = transport
                .subscribe(&topic, SubscribeOptions::new(unique("late")))
                .await
                .expect("subscribe a late group");
            let delivery = tokio::time::timeout(patience(), subscription.recv())
                .await
                .ok()
                .flatten()
                .expect("accepted with no group, so a later group must receive it");
            assert_eq!(delivery.body(), &sent.body);
            delivery.ack().await.expect("ack");
            subscription.shutdown().await.expect("shutdown");
        }
    }
}
