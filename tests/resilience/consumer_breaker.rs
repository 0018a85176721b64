//! The consumer stack's breaker through a real `EventBus` on the memory
//! transport: it opens after `failure_threshold` failed *messages* (retry is
//! inside it), sees a hanging handler's timeouts as failures, dead-letters
//! nothing while open, and after recovery every message published during the
//! outage is handled once.
//!
//! The settings: threshold 2, 3 attempts without jitter (100 ms, then
//! 200 ms), a 100 ms timeout for the path `ledger`, 30 s reset.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use switchboard::middleware::Resilience;
use switchboard::middleware::circuit_breaker::{BreakerState, CircuitBreakerLayer};
use switchboard::{
    ConsumerHealth, Error, Event, EventBus, Message, SubscribeOptions, Transport, handler_fn,
};
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::{Forward, TradeExecuted, bus};

const YAML: &str = "\
circuit_breaker:
  failure_threshold: 2
  reset_timeout_ms: 30000
retry:
  max_attempts: 3
  jitter: false
timeouts:
  ledger: 100
";

const RESET: Duration = Duration::from_secs(30);

/// How the ledger the handler writes to behaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ledger {
    Healthy,
    /// Every call fails with a transient error.
    Failing,
    /// Every call hangs, past the path's timeout.
    Hanging,
}

/// One call of the handler: which order, which attempt, when.
#[derive(Debug, Clone, Copy)]
struct Call {
    order_id: u64,
    attempt: u32,
    at: Instant,
}

struct Outage {
    bus: EventBus,
    breaker: CircuitBreakerLayer,
    ledger: Arc<Mutex<Ledger>>,
    /// Every handler call, as it starts.
    calls: mpsc::UnboundedReceiver<Call>,
    /// Every call that succeeded, as it ends.
    handled: mpsc::UnboundedReceiver<Call>,
    alerts: mpsc::UnboundedReceiver<switchboard::middleware::dead_letter::DeadLetterFacts>,
    transport: switchboard::MemoryTransport,
    consumer: switchboard::ConsumerHandle,
}

impl Outage {
    async fn start(ledger: Ledger, idempotent: bool, concurrency: usize) -> Self {
        let (bus, transport) = bus("ledger").await;
        let (alerts, alert_rx) = mpsc::unbounded_channel();
        let mut resilience = Resilience::from_yaml(YAML)
            .unwrap()
            .with_alert(Arc::new(Forward(alerts)));
        if idempotent {
            resilience = resilience.idempotent();
        }
        let breaker = resilience.breaker("ledger");
        let state = Arc::new(Mutex::new(ledger));
        let (calls, call_rx) = mpsc::unbounded_channel();
        let (handled, handled_rx) = mpsc::unbounded_channel();
        let handler = handler_fn({
            let state = state.clone();
            move |message: Message<TradeExecuted>| {
                let call = Call {
                    order_id: message.payload().order_id,
                    attempt: message.attempt(),
                    at: Instant::now(),
                };
                calls.send(call).ok();
                // Decided when the call starts, as a real dependency would be
                // in one state or the other for the whole call.
                let ledger = *state.lock().unwrap();
                let handled = handled.clone();
                async move {
                    match ledger {
                        Ledger::Healthy => {
                            handled
                                .send(Call {
                                    at: Instant::now(),
                                    ..call
                                })
                                .ok();
                            Ok(())
                        }
                        Ledger::Failing => Err(Error::transient("ledger database unavailable")),
                        Ledger::Hanging => std::future::pending().await,
                    }
                }
            }
        });
        let consumer = bus
            .subscribe(
                SubscribeOptions::new("ledger").with_concurrency(concurrency),
                resilience.consumer_with_breaker(&breaker, handler),
            )
            .await
            .unwrap();
        Self {
            bus,
            breaker,
            ledger: state,
            calls: call_rx,
            handled: handled_rx,
            alerts: alert_rx,
            transport,
            consumer,
        }
    }

    async fn publish(&self, order_ids: std::ops::RangeInclusive<u64>) {
        for order_id in order_ids {
            self.bus.publish(TradeExecuted { order_id }).await.unwrap();
        }
    }

    async fn until(&self, state: BreakerState) {
        let mut states = self.breaker.watch();
        states.wait_for(|now| *now == state).await.unwrap();
    }

    fn set(&self, ledger: Ledger) {
        *self.ledger.lock().unwrap() = ledger;
    }

    /// The calls made so far, without waiting.
    fn drain_calls(&mut self) -> Vec<Call> {
        std::iter::from_fn(|| self.calls.try_recv().ok()).collect()
    }

    /// The dead letters the loop has written, once it has written `count`.
    async fn dead_letters(&self, count: usize) -> Vec<String> {
        let queue = self.transport.dead_letters().unwrap();
        loop {
            let letters = queue.list(TradeExecuted::TYPE, 100).await.unwrap();
            if letters.len() >= count {
                return letters.into_iter().map(|letter| letter.id).collect();
            }
            tokio::task::yield_now().await;
        }
    }
}

/// The whole outage, for a handler that fails as `ledger` says and makes
/// `attempts` calls per message:
///
/// 1. three messages are published; the first two fail, each after
///    `attempts` calls, and are dead-lettered; the second opens the breaker,
///    and the third is not pulled;
/// 2. fifty more are published while it is open; none is pulled;
/// 3. after the reset timeout the third message is the trial call; it fails
///    too, and is given back instead of dead-lettered;
/// 4. the ledger recovers; after another reset timeout the next trial call
///    succeeds, and all 51 messages are handled, each once, none of them
///    delivered twice.
async fn outage(ledger: Ledger, idempotent: bool, attempts: usize) {
    let mut outage = Outage::start(ledger, idempotent, 1).await;
    outage.publish(1..=3).await;
    outage.until(BreakerState::Open).await;
    let opened = Instant::now();

    for _ in 0..2 {
        outage.alerts.recv().await.unwrap();
    }
    let mut dead = outage.dead_letters(2).await;
    assert_eq!(dead.len(), 2, "dead letters when the breaker opened");
    let calls = outage.drain_calls();
    let tried: Vec<u64> = calls.iter().map(|call| call.order_id).collect();
    let expected: Vec<u64> = [1, 2]
        .iter()
        .flat_map(|&id| std::iter::repeat_n(id, attempts))
        .collect();
    assert_eq!(tried, expected, "calls before the breaker opened");

    outage.publish(4..=53).await;
    // Not pulling, and saying so.
    outage
        .consumer
        .watch_health()
        .wait_for(|health| *health == ConsumerHealth::Paused)
        .await
        .expect("the consumer is running");

    // The first trial call, at the reset timeout: message 3, failing again.
    let mut probe = Vec::new();
    for _ in 0..attempts {
        probe.push(outage.calls.recv().await.unwrap());
    }
    assert!(probe.iter().all(|call| call.order_id == 3), "{probe:?}");
    assert_eq!(probe[0].at - opened, RESET, "pulled before the trial call");
    // Its last attempt has started failing; the ledger recovers meanwhile.
    outage.set(Ledger::Healthy);

    let mut handled = HashMap::<u64, Vec<Call>>::new();
    while handled.len() < 51 {
        let call = outage.handled.recv().await.unwrap();
        handled.entry(call.order_id).or_default().push(call);
    }
    assert_eq!(outage.breaker.state(), BreakerState::Closed);
    assert_eq!(outage.consumer.health(), ConsumerHealth::Running);
    let mut ids: Vec<u64> = handled.keys().copied().collect();
    ids.sort_unstable();
    assert_eq!(ids, (3..=53).collect::<Vec<_>>());
    for (order_id, calls) in &handled {
        assert_eq!(calls.len(), 1, "order {order_id} handled twice");
        let call = calls[0];
        // Nothing was pulled before the second trial call was due.
        assert!(
            call.at - probe[0].at >= RESET,
            "order {order_id} at {call:?}"
        );
        if *order_id != 3 {
            assert_eq!(call.attempt, 1, "order {order_id} was delivered twice");
        }
    }
    // Message 3 came back once: given back, not dead-lettered.
    assert_eq!(outage.dead_letters(2).await.len(), 2);
    assert!(outage.alerts.try_recv().is_err(), "an alert while open");
    dead.sort();
    let mut again = outage.dead_letters(2).await;
    again.sort();
    assert_eq!(dead, again);
}

/// Runs a scenario, failing it if it has not ended within ten minutes of
/// virtual time: a message that is never handled would otherwise leave the
/// test waiting while the paused clock jumps from one reset to the next.
async fn bounded(scenario: impl std::future::Future<Output = ()>) {
    tokio::time::timeout(Duration::from_secs(600), scenario)
        .await
        .expect("a message was never handled");
}

#[tokio::test(start_paused = true)]
async fn a_hanging_handler_opens_the_breaker_after_two_messages_and_nothing_is_dead_lettered_while_open()
 {
    // A timed-out attempt is not retried: the handler is not idempotent.
    bounded(outage(Ledger::Hanging, false, 1)).await;
}

#[tokio::test(start_paused = true)]
async fn a_hanging_idempotent_handler_is_retried_and_still_opens_the_breaker_after_two_messages() {
    bounded(outage(Ledger::Hanging, true, 3)).await;
}

#[tokio::test(start_paused = true)]
async fn a_failing_handler_opens_the_breaker_after_two_messages_of_three_attempts_each() {
    bounded(outage(Ledger::Failing, false, 3)).await;
}

#[tokio::test(start_paused = true)]
async fn messages_in_flight_when_the_breaker_opens_are_given_back_not_dead_lettered() {
    bounded(in_flight_when_it_opens()).await;
}

async fn in_flight_when_it_opens() {
    let mut outage = Outage::start(Ledger::Hanging, false, 4).await;
    outage.publish(1..=4).await;
    // All four hang and time out together: two open the breaker, and the
    // other two fail during the outage.
    outage.until(BreakerState::Open).await;
    for _ in 0..2 {
        outage.alerts.recv().await.unwrap();
    }
    outage.set(Ledger::Healthy);

    let mut handled = Vec::new();
    while handled.len() < 2 {
        handled.push(outage.handled.recv().await.unwrap());
    }
    assert_eq!(outage.breaker.state(), BreakerState::Closed);
    for call in &handled {
        assert_eq!(call.attempt, 2, "given back once: {call:?}");
    }
    let dead = outage.dead_letters(2).await;
    assert_eq!(dead.len(), 2);
    assert!(outage.alerts.try_recv().is_err());
    let calls = outage.drain_calls();
    // 4 first calls, 2 redeliveries: no call was dead-lettered after the trip.
    assert_eq!(calls.len(), 6, "{calls:?}");
}
