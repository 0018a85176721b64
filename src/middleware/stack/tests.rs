use std::time::Duration;

use tokio::time::Instant;
use tower::{ServiceExt, service_fn};

use super::*;
use crate::middleware::test_support::Ping;

#[test]
fn the_yaml_file_sets_the_spec_blocks_and_a_timeout_per_path() {
    let resilience = Resilience::from_yaml(
        "circuit_breaker:\n  failure_threshold: 2\nretry:\n  max_attempts: 4\ntimeouts:\n  market: 20\n",
    )
    .unwrap();
    assert_eq!(resilience.config().circuit_breaker.failure_threshold, 2);
    assert_eq!(resilience.config().retry.max_attempts, 4);
    assert_eq!(resilience.timeout(), Duration::from_secs(5));
    assert_eq!(
        resilience.path("market").timeout(),
        Duration::from_millis(20)
    );
    assert_eq!(resilience.timeout_of("market"), Duration::from_millis(20));
    assert_eq!(resilience.path("game").timeout(), Duration::from_secs(5));
    let client = resilience.client(
        "market",
        tower::service_fn(|_: ()| async { Ok::<_, Error>(()) }),
    );
    assert_eq!(
        client.get_ref().get_ref().timeout(),
        Duration::from_millis(20)
    );
    assert_eq!(client.get_ref().name(), "market");
}

#[test]
fn a_bad_file_is_refused_naming_the_key() {
    for (text, needle) in [
        ("timeouts:\n  market: 0\n", "timeouts.market"),
        ("retry:\n  max_attempts: 0\n", "retry.max_attempts"),
        ("circuit_breaker:\n  treshold: 2\n", "treshold"),
        ("timeout:\n  market: 20\n", "timeout"),
        ("timeouts:\n  market: fast\n", "line 2"),
    ] {
        let error = Resilience::from_yaml(text).unwrap_err();
        assert_eq!(error.kind(), ErrorKind::Config);
        assert!(error.message().contains(needle), "{text:?}: {error}");
    }
}

#[test]
fn the_in_progress_ttl_outlasts_everything_inside_the_dedupe_layer() {
    let resilience = Resilience::default().with_timeout(Duration::from_millis(250));
    // 3 × 250 ms attempts, 2 waits of at most 2 × 1 s (jitter), then one
    // more timeout and the breaker's 30 s reset.
    assert_eq!(resilience.worst_case(), Duration::from_millis(4_750));
    assert_eq!(resilience.in_progress_ttl(), Duration::from_millis(35_000));
    let handler = resilience.consumer(
        "ledger",
        tower::service_fn(|_: crate::Message<Ping>| async { Ok::<_, Error>(()) }),
    );
    assert_eq!(handler.ttls().in_progress, resilience.in_progress_ttl());
    assert!(handler.ttls().in_progress > resilience.timeout() * 3);
}

#[test]
fn a_consumer_takes_its_path_timeout_and_a_waiting_breaker_of_its_name() {
    let resilience = Resilience::from_yaml("timeouts:\n  ledger: 250\n").unwrap();
    let handler = resilience.consumer(
        "ledger",
        tower::service_fn(|_: crate::Message<Ping>| async { Ok::<_, Error>(()) }),
    );
    let breaker = handler.get_ref().get_ref();
    assert_eq!(breaker.name(), "ledger");
    let timeout = breaker.get_ref().get_ref();
    assert_eq!(timeout.timeout(), Duration::from_millis(250));
    // The dedupe TTL follows the path's timeout, not the default's 5 s.
    assert_eq!(
        handler.ttls().in_progress,
        resilience.path("ledger").in_progress_ttl()
    );
}

/// A call that answers after two seconds, as a slow dependency would.
async fn slow(_: String) -> Result<f64, Error> {
    tokio::time::sleep(Duration::from_secs(2)).await;
    Ok(150.0)
}

#[tokio::test(start_paused = true)]
async fn every_client_constructor_keeps_the_path_timeout_of_the_yaml_file() {
    let resilience =
        Resilience::from_yaml("retry:\n  max_attempts: 1\ntimeouts:\n  slow: 200\n").unwrap();
    let breaker = resilience.breaker("slow");
    let clients = [
        ("client", resilience.client("slow", service_fn(slow))),
        (
            "client_with_breaker",
            resilience.client_with_breaker(&breaker, service_fn(slow)),
        ),
        (
            "path + client_with_breaker",
            resilience
                .path("slow")
                .client_with_breaker(&breaker, service_fn(slow)),
        ),
        (
            "idempotent client",
            resilience
                .clone()
                .idempotent()
                .client("slow", service_fn(slow)),
        ),
    ];
    for (constructor, client) in clients {
        let started = Instant::now();
        let error = client.oneshot("AAPL".into()).await.unwrap_err();
        assert_eq!(error.kind(), ErrorKind::Timeout, "{constructor}: {error}");
        assert_eq!(
            started.elapsed(),
            Duration::from_millis(200),
            "{constructor} let the 2 s call run"
        );
    }
    let per_call = resilience
        .client("slow", service_fn(slow))
        .idempotent_if(|_: &String| true);
    let started = Instant::now();
    let error = per_call.oneshot("AAPL".into()).await.unwrap_err();
    assert_eq!(error.kind(), ErrorKind::Timeout);
    assert_eq!(
        started.elapsed(),
        Duration::from_millis(200),
        "idempotent_if"
    );
}

#[tokio::test(start_paused = true)]
async fn every_consumer_constructor_keeps_the_path_timeout_of_the_yaml_file() {
    let resilience =
        Resilience::from_yaml("retry:\n  max_attempts: 1\ntimeouts:\n  slow: 200\n").unwrap();
    let handler = || {
        service_fn(|_: crate::Message<Ping>| async {
            tokio::time::sleep(Duration::from_secs(2)).await;
            Ok::<_, Error>(())
        })
    };
    let consumers = [
        ("consumer", resilience.consumer("slow", handler())),
        (
            "consumer_with_breaker",
            resilience.consumer_with_breaker(&resilience.breaker("slow"), handler()),
        ),
    ];
    for (constructor, consumer) in consumers {
        let started = Instant::now();
        let error = consumer
            .oneshot(crate::middleware::test_support::message(1, 1))
            .await
            .unwrap_err();
        assert_eq!(error.kind(), ErrorKind::Timeout, "{constructor}: {error}");
        assert_eq!(
            started.elapsed(),
            Duration::from_millis(200),
            "{constructor}"
        );
    }
}
