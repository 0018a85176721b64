//! Idempotent consumers: one effect per event, dead letters with their
//! facts, redrive.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use switchboard::config::{CircuitBreakerConfig, ResilienceConfig, RetryConfig};
use switchboard::middleware::Resilience;
use switchboard::middleware::dead_letter::DeadLetterAdmin;
use switchboard::middleware::dedupe::DedupeTtls;
use switchboard::{
    Error, ErrorKind, Event, EventEnvelope, Message, SubscribeOptions, Transport, handler_fn,
};
use tokio::sync::{Notify, mpsc};
use tower::ServiceExt;

use super::{Forward, TradeExecuted, bus, spec};

#[tokio::test]
async fn the_same_envelope_delivered_three_times_at_once_takes_effect_once_and_all_are_acked() {
    let (bus, transport) = bus("ledger").await;
    let resilience = Resilience::new(spec())
        .with_dedupe_ttls(DedupeTtls::default().with_requeue(Duration::from_millis(5)));
    let effects = Arc::new(AtomicU32::new(0));
    let entered = Arc::new(Notify::new());
    let finish = Arc::new(Notify::new());
    let handler = resilience.consumer(
        "ledger",
        handler_fn({
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
        }),
    );
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
    let handler = resilience.consumer(
        "ledger",
        handler_fn(move |message: Message<TradeExecuted>| {
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
        }),
    );
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

#[tokio::test(start_paused = true)]
async fn a_dead_lettered_event_carries_its_facts_and_runs_when_redriven() {
    let (bus, transport) = bus("ledger").await;
    let (alerts, mut alert_rx) = mpsc::unbounded_channel();
    let resilience = Resilience::new(spec()).with_alert(Arc::new(Forward(alerts)));
    let failing = Arc::new(Mutex::new(true));
    let (ran, mut ran_rx) = mpsc::unbounded_channel();
    let handler = resilience.consumer(
        "ledger",
        handler_fn({
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
        }),
    );
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
    let config = ResilienceConfig::default()
        .with_retry(RetryConfig::default().with_max_attempts(1))
        .with_circuit_breaker(CircuitBreakerConfig::default());
    let resilience = Resilience::new(config).with_alert(Arc::new(Forward(alerts)));
    let failing = Arc::new(Mutex::new(true));
    let (ran, mut ran_rx) = mpsc::unbounded_channel();
    let handler = resilience.consumer(
        "ledger",
        handler_fn({
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
        }),
    );
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
