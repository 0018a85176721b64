//! The resilience stacks end to end: their order, per-path timeouts, one
//! breaker shared by an RPC client and a consumer, and idempotent consumers
//! with dead letters and redrive over the in-memory transport.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use switchboard::config::{CircuitBreakerConfig, ResilienceConfig, RetryConfig};
use switchboard::middleware::Resilience;
use switchboard::middleware::circuit_breaker::{BreakerState, WhenOpen};
use switchboard::middleware::dead_letter::{DeadLetterAdmin, DeadLetterAlert, DeadLetterFacts};
use switchboard::middleware::dedupe::DedupeTtls;
use switchboard::middleware::fallback::FallbackLayer;
use switchboard::middleware::retry::RetryLayer;
use switchboard::{
    Error, ErrorKind, Event, EventBus, EventEnvelope, MemoryTransport, Message, SubscribeOptions,
    Topology, Transport, handler_fn,
};
use tokio::sync::{Notify, mpsc};
use tokio::time::Instant;
use tower::{Layer, Service, ServiceBuilder, ServiceExt, service_fn};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct TradeExecuted {
    order_id: u64,
}

impl Event for TradeExecuted {
    const TYPE: &'static str = "trade.executed";
    const VERSION: &'static str = "1.0";
}

/// A bus on a fresh in-memory transport, with the group declared.
async fn bus(group: &str) -> (EventBus, MemoryTransport) {
    let transport = MemoryTransport::new();
    let bus = EventBus::new(Arc::new(transport.clone()), "trading-service");
    bus.declare(&Topology::new().with_event::<TradeExecuted, _>([group]))
        .await
        .unwrap();
    (bus, transport)
}

/// A dependency that fails with `Unavailable` while `down` is set and counts
/// the calls that reach it.
#[derive(Clone, Default)]
struct Market {
    down: Arc<Mutex<bool>>,
    calls: Arc<AtomicU32>,
}

impl Market {
    fn set_down(&self, down: bool) {
        *self.down.lock().unwrap() = down;
    }

    fn calls(&self) -> u32 {
        self.calls.load(Ordering::SeqCst)
    }

    fn quote(&self) -> Result<f64, Error> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        if *self.down.lock().unwrap() {
            Err(Error::transient("market: 503"))
        } else {
            Ok(150.0)
        }
    }

    fn service(
        &self,
    ) -> impl Service<String, Response = f64, Error = Error, Future: Send> + Clone + Send + 'static
    {
        let market = self.clone();
        service_fn(move |_symbol: String| std::future::ready(market.quote()))
    }
}

fn spec() -> ResilienceConfig {
    ResilienceConfig::default()
}

// ---------------------------------------------------------------- order

#[tokio::test(start_paused = true)]
async fn in_the_right_order_the_breaker_opens_although_the_fallback_answers_every_caller() {
    let market = Market::default();
    let resilience = Resilience::new(spec());
    let breaker = resilience.breaker("market");
    let client = FallbackLayer::new(|_: &String, _: Error| Ok(-1.0))
        .layer(resilience.client_with_breaker(&breaker, market.service()));

    market.set_down(true);
    for _ in 0..2 {
        let answer = client.clone().oneshot("AAPL".into()).await.unwrap();
        assert_eq!(answer, -1.0, "the caller got the fallback");
    }
    // Three attempts of the first call and two of the second: the fifth
    // failure opened the breaker, and the retry stopped at `BreakerOpen`.
    assert_eq!(market.calls(), 5);
    assert_eq!(breaker.state(), BreakerState::Open);
    assert_eq!(client.clone().oneshot("AAPL".into()).await.unwrap(), -1.0);
    assert_eq!(market.calls(), 5, "an open breaker let a call through");
}

#[tokio::test(start_paused = true)]
async fn in_the_wrong_order_a_fallback_inside_the_breaker_hides_the_outage_from_it() {
    let market = Market::default();
    let resilience = Resilience::new(spec());
    let breaker = resilience.breaker("market");
    // breaker ▸ fallback ▸ service: every failure becomes a success.
    let client = ServiceBuilder::new()
        .layer(breaker.clone())
        .layer(FallbackLayer::new(|_: &String, _: Error| Ok(-1.0)))
        .service(market.service());

    market.set_down(true);
    for _ in 0..20 {
        assert_eq!(client.clone().oneshot("AAPL".into()).await.unwrap(), -1.0);
    }
    assert_eq!(breaker.state(), BreakerState::Closed);
    assert_eq!(
        market.calls(),
        20,
        "the dead dependency was called every time"
    );
}

#[tokio::test(start_paused = true)]
async fn each_path_has_its_own_timeout() {
    let slow = service_fn(|_: String| async {
        tokio::time::sleep(Duration::from_millis(30)).await;
        Ok::<_, Error>(150.0)
    });
    let resilience = Resilience::from_yaml("retry:\n  max_attempts: 1\n").unwrap();
    assert_eq!(
        resilience.timeout(),
        Duration::from_secs(5),
        "the SPEC's timeout_ms"
    );

    let grpc = resilience.clone().with_timeout(Duration::from_millis(20));
    let started = Instant::now();
    let error = grpc
        .client("market", slow)
        .oneshot("AAPL".into())
        .await
        .unwrap_err();
    assert_eq!(error.kind(), ErrorKind::Timeout);
    assert_eq!(started.elapsed(), Duration::from_millis(20));

    let http = resilience.with_timeout(Duration::from_millis(50));
    assert_eq!(
        http.client("market", slow)
            .oneshot("AAPL".into())
            .await
            .unwrap(),
        150.0
    );
}

// ---------------------------------------------- one stack for both sides

#[tokio::test(start_paused = true)]
async fn one_breaker_and_retry_guard_an_rpc_client_and_a_consumer_of_the_same_dependency() {
    let market = Market::default();
    let config = ResilienceConfig::default();
    let breaker = Resilience::new(config).breaker("market");
    let retry = RetryLayer::new(config.retry);

    // The RPC side fails fast while open.
    let rpc = ServiceBuilder::new()
        .layer(retry)
        .layer(breaker.clone())
        .service(market.service());
    // The consumer side: the same layers; while the breaker is open the
    // consume loop stops pulling.
    let (handled, mut handled_rx) = mpsc::unbounded_channel();
    let consumer_market = market.clone();
    let handler = ServiceBuilder::new()
        .layer(retry)
        .layer(breaker.clone().when_open(WhenOpen::Wait))
        .service(handler_fn(move |message: Message<TradeExecuted>| {
            let result = consumer_market.quote();
            handled
                .send((message.payload().order_id, Instant::now(), result.is_ok()))
                .ok();
            std::future::ready(result.map(|_| ()))
        }));
    let (bus, transport) = bus("game").await;
    let _consumer = bus
        .subscribe(SubscribeOptions::new("game"), handler)
        .await
        .unwrap();

    market.set_down(true);
    let started = Instant::now();
    rpc.clone().oneshot("AAPL".into()).await.unwrap_err();
    let error = rpc.clone().oneshot("AAPL".into()).await.unwrap_err();
    assert_eq!(error.kind(), ErrorKind::BreakerOpen);
    // Attempts at 0, 100 and 300 ms, then 300 and 400 ms: the fifth failure
    // opened it at 400 ms, and the third attempt at 600 ms met it open.
    assert_eq!(started.elapsed(), Duration::from_millis(600));
    let opened = started + Duration::from_millis(400);
    assert_eq!(breaker.state(), BreakerState::Open);
    market.set_down(false);

    // Published while open: the consumer holds it until the trial call is due.
    bus.publish(TradeExecuted { order_id: 1 }).await.unwrap();
    let (order_id, at, ok) = handled_rx.recv().await.unwrap();
    assert_eq!(order_id, 1);
    assert!(ok);
    assert_eq!(
        at - opened,
        Duration::from_secs(30),
        "pulled before the trial call was due"
    );

    // The consumer's trial call closed the breaker the RPC client shares.
    assert_eq!(breaker.state(), BreakerState::Closed);
    assert_eq!(rpc.oneshot("AAPL".into()).await.unwrap(), 150.0);
    let letters = transport
        .dead_letters()
        .unwrap()
        .list(TradeExecuted::TYPE, 10)
        .await;
    assert!(letters.unwrap().is_empty());
}

#[tokio::test(start_paused = true)]
async fn a_message_failed_fast_by_an_open_breaker_is_requeued_not_dead_lettered() {
    let market = Market::default();
    let breaker = Resilience::new(spec()).breaker("market");
    market.set_down(true);
    let mut rpc = breaker.clone().layer(market.service());
    for _ in 0..5 {
        rpc.ready()
            .await
            .unwrap()
            .call("AAPL".into())
            .await
            .unwrap_err();
    }
    let opened = Instant::now();
    market.set_down(false);

    let (handled, mut handled_rx) = mpsc::unbounded_channel();
    let consumer_market = market.clone();
    // Fail-fast mode in a consumer: the message meets `BreakerOpen`.
    let handler = breaker.layer(handler_fn(move |message: Message<TradeExecuted>| {
        handled.send((message.attempt(), Instant::now())).ok();
        std::future::ready(consumer_market.quote().map(|_| ()))
    }));
    let (bus, transport) = bus("game").await;
    let _consumer = bus
        .subscribe(SubscribeOptions::new("game"), handler)
        .await
        .unwrap();
    bus.publish(TradeExecuted { order_id: 1 }).await.unwrap();

    let (attempt, at) = handled_rx.recv().await.unwrap();
    assert_eq!(attempt, 2, "nacked once, then delivered again");
    assert_eq!(at - opened, Duration::from_secs(30));
    let letters = transport
        .dead_letters()
        .unwrap()
        .list(TradeExecuted::TYPE, 10)
        .await;
    assert!(letters.unwrap().is_empty());
}

// ------------------------------------------------ idempotent consumers

#[tokio::test]
async fn the_same_envelope_delivered_three_times_at_once_takes_effect_once_and_all_are_acked() {
    let (bus, transport) = bus("ledger").await;
    let resilience = Resilience::new(spec()).with_dedupe_ttls(DedupeTtls {
        requeue: Duration::from_millis(5),
        ..DedupeTtls::default()
    });
    let effects = Arc::new(AtomicU32::new(0));
    let entered = Arc::new(Notify::new());
    let finish = Arc::new(Notify::new());
    let handler = resilience.handler(handler_fn({
        let (effects, entered, finish) = (effects.clone(), entered.clone(), finish.clone());
        move |_: Message<TradeExecuted>| {
            let (effects, entered, finish) = (effects.clone(), entered.clone(), finish.clone());
            async move {
                effects.fetch_add(1, Ordering::SeqCst);
                entered.notify_one();
                finish.notified().await;
                Ok::<_, Error>(())
            }
        }
    }));
    // What the consume loop sees from the stack: Ok is acked, a requeue
    // error nacked.
    let (outcomes, mut outcome_rx) = mpsc::unbounded_channel();
    let observed = handler.map_result(move |result| {
        outcomes
            .send(
                result
                    .as_ref()
                    .map_err(|error| error.requeue_after())
                    .copied(),
            )
            .ok();
        result
    });
    let _consumer = bus
        .subscribe(
            SubscribeOptions::new("ledger").with_concurrency(3),
            observed,
        )
        .await
        .unwrap();

    let envelope = EventEnvelope::new("trading-service", TradeExecuted { order_id: 9 });
    for _ in 0..3 {
        bus.publish_envelope(&envelope).await.unwrap();
    }
    entered.notified().await;
    // Both duplicates find it in progress and are requeued.
    let mut requeued = 0;
    while requeued < 2 {
        let outcome = outcome_rx.recv().await.unwrap();
        assert_eq!(outcome, Err(Some(Duration::from_millis(5))));
        requeued += 1;
    }
    finish.notify_one();

    let mut acked = 0;
    while acked < 3 {
        match outcome_rx.recv().await.unwrap() {
            Ok(()) => acked += 1,
            Err(requeue) => assert!(requeue.is_some(), "a duplicate would be dead-lettered"),
        }
    }
    assert_eq!(effects.load(Ordering::SeqCst), 1);
    let letters = transport
        .dead_letters()
        .unwrap()
        .list(TradeExecuted::TYPE, 10)
        .await;
    assert!(letters.unwrap().is_empty());
}

#[tokio::test]
async fn a_handler_that_fails_the_first_time_runs_on_the_redelivery() {
    let (bus, _transport) = bus("ledger").await;
    let resilience = Resilience::new(spec());
    let (seen, mut seen_rx) = mpsc::unbounded_channel();
    let handler = resilience.handler(handler_fn(move |message: Message<TradeExecuted>| {
        seen.send(message.attempt()).ok();
        let first = message.attempt() == 1;
        async move {
            if first {
                // Not now: put it back (as an open breaker further in would).
                Err(Error::permanent("not yet").with_requeue(Duration::ZERO))
            } else {
                Ok(())
            }
        }
    }));
    let _consumer = bus
        .subscribe(SubscribeOptions::new("ledger"), handler)
        .await
        .unwrap();
    bus.publish(TradeExecuted { order_id: 1 }).await.unwrap();
    assert_eq!(seen_rx.recv().await, Some(1));
    assert_eq!(
        seen_rx.recv().await,
        Some(2),
        "the failure kept the event marked"
    );
}

/// An alert hook that forwards the facts to the test.
#[derive(Debug)]
struct Forward(mpsc::UnboundedSender<DeadLetterFacts>);

impl DeadLetterAlert for Forward {
    fn alert(&self, facts: &DeadLetterFacts) {
        self.0.send(facts.clone()).ok();
    }
}

#[tokio::test(start_paused = true)]
async fn a_dead_lettered_event_carries_its_facts_and_runs_when_redriven() {
    let (bus, transport) = bus("ledger").await;
    let (alerts, mut alert_rx) = mpsc::unbounded_channel();
    let resilience = Resilience::new(spec()).with_alert(Arc::new(Forward(alerts)));
    let failing = Arc::new(Mutex::new(true));
    let (ran, mut ran_rx) = mpsc::unbounded_channel();
    let handler = resilience.handler(handler_fn({
        let failing = failing.clone();
        move |message: Message<TradeExecuted>| {
            let fail = *failing.lock().unwrap();
            ran.send((message.payload().order_id, message.attempt(), fail))
                .ok();
            async move {
                if fail {
                    Err(Error::transient("ledger database unavailable"))
                } else {
                    Ok(())
                }
            }
        }
    }));
    let _consumer = bus
        .subscribe(SubscribeOptions::new("ledger"), handler)
        .await
        .unwrap();
    let event_id = bus.publish(TradeExecuted { order_id: 5 }).await.unwrap();

    let alert = alert_rx.recv().await.unwrap();
    assert_eq!(alert.event_id, event_id);
    assert_eq!(alert.attempts, 3);
    for attempt in 1..=3 {
        assert_eq!(ran_rx.recv().await, Some((5, attempt, true)));
    }
    let admin = DeadLetterAdmin::new(bus.transport().clone());
    // The loop dead-letters right after the alert; wait for it, bounded.
    let letter = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            if let Ok(letter) = admin
                .inspect(TradeExecuted::TYPE, &event_id.to_string())
                .await
            {
                break letter;
            }
            tokio::task::yield_now().await;
        }
    })
    .await
    .unwrap();
    assert_eq!(letter.topic, TradeExecuted::TYPE);
    assert_eq!(letter.group, "ledger");
    assert_eq!(letter.attempts, 3);
    assert!(
        letter.reason.contains("gave up after 3"),
        "{}",
        letter.reason
    );
    let last_error = letter.last_error.as_deref().unwrap();
    assert!(
        last_error.contains("ledger database unavailable"),
        "{last_error}"
    );
    assert!(letter.dead_lettered_at <= chrono::Utc::now());

    *failing.lock().unwrap() = false;
    admin
        .redrive(TradeExecuted::TYPE, &event_id.to_string())
        .await
        .unwrap();
    assert_eq!(
        ran_rx.recv().await,
        Some((5, 1, false)),
        "the redrive did not run"
    );
    assert!(
        admin
            .list(TradeExecuted::TYPE, 10)
            .await
            .unwrap()
            .is_empty()
    );
    let _ = transport;
}

#[tokio::test(start_paused = true)]
async fn dead_letters_are_listed_inspected_and_redriven_one_or_all() {
    let (bus, _transport) = bus("ledger").await;
    let (alerts, mut alert_rx) = mpsc::unbounded_channel();
    let config = ResilienceConfig {
        retry: RetryConfig {
            max_attempts: 1,
            ..RetryConfig::default()
        },
        circuit_breaker: CircuitBreakerConfig::default(),
    };
    let resilience = Resilience::new(config).with_alert(Arc::new(Forward(alerts)));
    let failing = Arc::new(Mutex::new(true));
    let (ran, mut ran_rx) = mpsc::unbounded_channel();
    let handler = resilience.handler(handler_fn({
        let failing = failing.clone();
        move |message: Message<TradeExecuted>| {
            let fail = *failing.lock().unwrap();
            if !fail {
                ran.send(message.payload().order_id).ok();
            }
            std::future::ready(if fail {
                Err(Error::permanent("refused"))
            } else {
                Ok(())
            })
        }
    }));
    let _consumer = bus
        .subscribe(SubscribeOptions::new("ledger"), handler)
        .await
        .unwrap();
    let mut ids = Vec::new();
    for order_id in 1..=3 {
        ids.push(
            bus.publish(TradeExecuted { order_id })
                .await
                .unwrap()
                .to_string(),
        );
    }
    for _ in 0..3 {
        alert_rx.recv().await.unwrap();
    }
    let admin = DeadLetterAdmin::new(bus.transport().clone());
    let listed = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            let listed = admin.list(TradeExecuted::TYPE, 10).await.unwrap();
            if listed.len() == 3 {
                break listed;
            }
            tokio::task::yield_now().await;
        }
    })
    .await
    .unwrap();
    assert_eq!(listed.iter().map(|l| l.id.clone()).collect::<Vec<_>>(), ids);
    let second = admin.inspect(TradeExecuted::TYPE, &ids[1]).await.unwrap();
    assert_eq!(second.attempts, 1);
    assert!(second.reason.contains("retrying cannot fix"));

    *failing.lock().unwrap() = false;
    admin.redrive(TradeExecuted::TYPE, &ids[1]).await.unwrap();
    assert_eq!(ran_rx.recv().await, Some(2));
    assert_eq!(admin.list(TradeExecuted::TYPE, 10).await.unwrap().len(), 2);
    let missing = admin
        .redrive(TradeExecuted::TYPE, &ids[1])
        .await
        .unwrap_err();
    assert_eq!(missing.kind(), ErrorKind::NotFound);

    assert_eq!(admin.redrive_all(TradeExecuted::TYPE).await.unwrap(), 2);
    let mut rest = vec![ran_rx.recv().await.unwrap(), ran_rx.recv().await.unwrap()];
    rest.sort();
    assert_eq!(rest, [1, 3]);
    assert!(
        admin
            .list(TradeExecuted::TYPE, 10)
            .await
            .unwrap()
            .is_empty()
    );
}
