//! The gauges the alert rules in `docs/alerts/` stand on, and the rules'
//! metric names: each is one the crate emits.

use std::task::{Context, Poll};

use super::*;

/// A handler that fails for good at its first readiness check: the
/// consumer dies.
#[derive(Clone)]
struct Broken;

impl tower::Service<Message<TradeExecuted>> for Broken {
    type Response = ();
    type Error = Error;
    type Future = std::future::Ready<Result<(), Error>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Error>> {
        Poll::Ready(Err(Error::new(ErrorKind::Rejected, "the ledger is gone")))
    }

    fn call(&mut self, _: Message<TradeExecuted>) -> Self::Future {
        std::future::ready(Ok(()))
    }
}

#[tokio::test]
async fn a_consumer_reports_running_then_stopped_or_failed() {
    let recorder = Recorder::install();
    let bus = memory_bus();
    let labels = |group: &'static str| {
        [
            ("transport", "memory"),
            ("topic", "trade.executed"),
            ("group", group),
        ]
    };

    let consumer = bus
        .subscribe(
            SubscribeOptions::new("ledger"),
            handler_fn(|_: Message<TradeExecuted>| async { Ok::<(), Error>(()) }),
        )
        .await
        .unwrap();
    // The gauge follows the consumer from a task of its own: wait for it.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let mut seen = recorder.take();
    while !seen.0.iter().any(|(name, ..)| name == CONSUMER_STATE) {
        assert!(tokio::time::Instant::now() < deadline, "no consumer state");
        tokio::task::yield_now().await;
        seen = recorder.take();
    }
    assert_eq!(seen.gauge(CONSUMER_STATE, &labels("ledger")), 0.0);
    consumer.shutdown().await.unwrap();
    until_state(&recorder, &labels("ledger"), 2.0).await;

    let dead = bus
        .subscribe(SubscribeOptions::new("broken"), Broken)
        .await
        .unwrap();
    let error = dead.closed().await.expect("the consumer died").to_string();
    assert!(error.to_string().contains("the ledger is gone"), "{error}");
    until_state(&recorder, &labels("broken"), 3.0).await;
}

/// Waits (under a deadline) until the consumer-state gauge of `labels`
/// reads `expected`: a task of its own sets it.
async fn until_state(recorder: &Recorder, labels: &[(&str, &str)], expected: f64) {
    let wanted = super::labels(labels);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let seen = recorder.take();
        let found = seen
            .0
            .iter()
            .find(|(name, found, _)| name == CONSUMER_STATE && *found == wanted)
            .map(|(.., value)| value);
        if let Some(DebugValue::Gauge(value)) = &found
            && value.0 == expected
        {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the consumer state is {found:?}, not {expected}"
        );
        tokio::task::yield_now().await;
    }
}

/// Every `switchboard_…` name in the rules is a metric of the crate, so a
/// renamed metric cannot leave an alert that never fires.
#[test]
fn the_alert_rules_use_only_the_crates_metrics() {
    let known = [
        PUBLISH_TOTAL,
        PUBLISH_DURATION,
        CONSUME_TOTAL,
        CONSUME_DURATION,
        CALL_TOTAL,
        CALL_DURATION,
        RETRIES_TOTAL,
        RETRIES_REFUSED_TOTAL,
        BREAKER_TRANSITIONS_TOTAL,
        BREAKER_STATE,
        BREAKER_OPEN_SINCE,
        BREAKER_RESET_TIMEOUT,
        DEAD_LETTERS_TOTAL,
        DEAD_LETTER_DEPTH,
        DEDUPE_HITS_TOTAL,
        BUDGET_BREACHES_TOTAL,
        LATENCY_P99,
        LATENCY_BUDGET,
        DROPPED_TOTAL,
        PUSH_REFUSED_TOTAL,
        CONSUMER_LAG,
        CONSUMER_STATE,
        DEDUPE_EVICTIONS_TOTAL,
        STREAM_TRIMMED_TOTAL,
        STREAM_STALE_GROUPS,
        STREAM_GROUPS_DESTROYED_TOTAL,
        DEAD_LETTERS_EVICTED_TOTAL,
        OUTBOX_PENDING,
        OUTBOX_LAG,
        OUTBOX_SENT_TOTAL,
        OUTBOX_PARKED_TOTAL,
    ];
    let rules = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/docs/alerts/switchboard.rules.yml"
    ))
    .expect("docs/alerts/switchboard.rules.yml");
    let mut used = 0;
    for (at, _) in rules.match_indices("switchboard_") {
        let name: String = rules[at..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        assert!(
            known.contains(&name.as_str()),
            "the rules use {name}, which the crate does not emit"
        );
        used += 1;
    }
    assert!(
        used >= 9,
        "the rules name the crate's metrics ({used} found)"
    );
}
