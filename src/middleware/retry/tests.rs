use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;
use tower::{Layer, ServiceExt, service_fn};

use super::*;
use crate::error::{Effect, ErrorKind};
use crate::middleware::test_support::{Ping, message};

/// The strategy's schedule without jitter, for tests that check exact waits.
fn steady() -> RetryConfig {
    RetryConfig {
        jitter: false,
        ..RetryConfig::default()
    }
}

/// A service failing with `kind` every time, recording when each call came.
fn failing(
    kind: ErrorKind,
) -> (
    impl Service<u32, Response = (), Error = Error, Future: Send> + Clone + Send + 'static,
    Arc<Mutex<Vec<Instant>>>,
) {
    failing_with(move || Error::new(kind, "scripted"))
}

/// A service failing with `error()` every time, recording when each call
/// came.
fn failing_with(
    error: impl Fn() -> Error + Clone + Send + 'static,
) -> (
    impl Service<u32, Response = (), Error = Error, Future: Send> + Clone + Send + 'static,
    Arc<Mutex<Vec<Instant>>>,
) {
    let calls = Arc::new(Mutex::new(Vec::new()));
    let recorded = calls.clone();
    let service = service_fn(move |_: u32| {
        recorded.lock().unwrap().push(Instant::now());
        let error = error();
        async move { Err::<(), _>(error) }
    });
    (service, calls)
}

fn gaps(calls: &[Instant]) -> Vec<Duration> {
    calls.windows(2).map(|pair| pair[1] - pair[0]).collect()
}

#[tokio::test(start_paused = true)]
async fn three_attempts_in_all_waiting_100_then_200_ms() {
    let (service, calls) = failing(ErrorKind::Unavailable);
    let error = RetryLayer::new(steady())
        .layer(service)
        .oneshot(1)
        .await
        .unwrap_err();
    assert_eq!(error.kind(), ErrorKind::Unavailable);
    assert_eq!(error.attempts(), Some(3));
    let calls = calls.lock().unwrap();
    assert_eq!(calls.len(), 3);
    assert_eq!(
        gaps(&calls),
        [Duration::from_millis(100), Duration::from_millis(200)]
    );
}

#[tokio::test(start_paused = true)]
async fn the_waits_double_up_to_the_cap() {
    let (service, calls) = failing(ErrorKind::Unavailable);
    let config = RetryConfig {
        max_attempts: 7,
        ..steady()
    };
    let retry = Retry::new(service, &config);
    let expected: Vec<_> = [100, 200, 400, 800, 1000, 1000]
        .into_iter()
        .map(Duration::from_millis)
        .collect();
    assert_eq!(retry.delays(), expected);
    let error = retry.oneshot(1).await.unwrap_err();
    assert_eq!(error.attempts(), Some(7));
    assert_eq!(gaps(&calls.lock().unwrap()), expected);
}

#[tokio::test(start_paused = true)]
async fn errors_that_are_not_retryable_are_tried_once() {
    for kind in [
        ErrorKind::Rejected,
        ErrorKind::BreakerOpen,
        ErrorKind::Unauthorized,
        ErrorKind::NotFound,
    ] {
        let (service, calls) = failing(kind);
        let started = Instant::now();
        let error = RetryLayer::new(RetryConfig::default())
            .layer(service)
            .oneshot(1)
            .await
            .unwrap_err();
        assert_eq!(error.kind(), kind);
        assert_eq!(error.attempts(), Some(1));
        assert_eq!(calls.lock().unwrap().len(), 1, "{kind:?} was retried");
        assert_eq!(started.elapsed(), Duration::ZERO);
    }
}

#[tokio::test(start_paused = true)]
async fn a_success_ends_the_retries() {
    let calls = Arc::new(Mutex::new(0));
    let counted = calls.clone();
    let service = service_fn(move |n: u32| {
        let attempt = {
            let mut calls = counted.lock().unwrap();
            *calls += 1;
            *calls
        };
        async move {
            if attempt == 1 {
                Err(Error::new(ErrorKind::Connection, "reset"))
            } else {
                Ok(n * 2)
            }
        }
    });
    let answer = Retry::new(service, &RetryConfig::default())
        .oneshot(21)
        .await
        .unwrap();
    assert_eq!(answer, 42);
    assert_eq!(*calls.lock().unwrap(), 2);
}

#[tokio::test(start_paused = true)]
async fn each_retry_raises_the_message_attempt() {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let recorded = seen.clone();
    let handler = service_fn(move |message: Message<Ping>| {
        recorded.lock().unwrap().push(message.attempt());
        async { Err::<(), _>(Error::transient("down")) }
    });
    // Delivered for the second time by the broker.
    let message = message(1, 2);
    let error = RetryLayer::for_messages(steady())
        .layer(handler)
        .oneshot(message)
        .await
        .unwrap_err();
    assert_eq!(*seen.lock().unwrap(), [2, 3, 4]);
    assert_eq!(error.attempts(), Some(3));
}

#[tokio::test(start_paused = true)]
async fn jitter_is_on_by_default_and_adds_at_most_the_wait_again() {
    let (service, calls) = failing(ErrorKind::Unavailable);
    let config = RetryConfig {
        max_attempts: 5,
        ..RetryConfig::default()
    };
    assert!(config.jitter);
    let retry = RetryLayer::new(config).layer(service);
    // The schedule it reports is the one configured, without the random part.
    assert_eq!(
        retry.delays(),
        [100, 200, 400, 800].map(Duration::from_millis)
    );
    retry.oneshot(1).await.unwrap_err();
    let gaps = gaps(&calls.lock().unwrap());
    assert_eq!(gaps.len(), 4);
    for (gap, base) in gaps.iter().zip([100u64, 200, 400, 800]) {
        let base = Duration::from_millis(base);
        assert!(*gap >= base && *gap <= base * 2, "{gap:?} for {base:?}");
    }
    let scheduled = [100, 200, 400, 800].map(Duration::from_millis);
    assert_ne!(gaps, scheduled, "no wait had a random part");
}

#[tokio::test(start_paused = true)]
async fn a_failure_that_may_have_taken_effect_is_retried_only_when_idempotent() {
    let may_have_applied: [fn() -> Error; 3] = [
        || Error::new(ErrorKind::Timeout, "no answer in time"),
        || Error::new(ErrorKind::Connection, "reset after sending").with_effect(Effect::Unknown),
        || Error::transient("gRPC INTERNAL").with_effect(Effect::Unknown),
    ];
    for error in may_have_applied {
        let (service, calls) = failing_with(error);
        let once = RetryLayer::new(steady()).layer(service).oneshot(1).await;
        assert_eq!(once.unwrap_err().attempts(), Some(1), "{}", error());
        assert_eq!(calls.lock().unwrap().len(), 1, "{} was sent again", error());

        let (service, calls) = failing_with(error);
        let retried = RetryLayer::new(steady())
            .idempotent()
            .layer(service)
            .oneshot(1)
            .await;
        assert_eq!(retried.unwrap_err().attempts(), Some(3), "{}", error());
        assert_eq!(calls.lock().unwrap().len(), 3);
    }
}

#[tokio::test(start_paused = true)]
async fn a_failure_that_certainly_did_not_take_effect_is_retried_for_any_call() {
    for error in [
        || Error::new(ErrorKind::Connection, "connection refused"),
        || Error::transient("HTTP 503"),
    ] {
        let (service, calls) = failing_with(error);
        let result = RetryLayer::new(steady()).layer(service).oneshot(1).await;
        assert_eq!(result.unwrap_err().attempts(), Some(3));
        assert_eq!(calls.lock().unwrap().len(), 3);
    }
}

#[tokio::test(start_paused = true)]
async fn idempotency_can_be_decided_per_call() {
    // Even requests are reads, odd ones writes.
    let (service, calls) = failing(ErrorKind::Timeout);
    let retry = RetryLayer::new(steady())
        .idempotent_if(|n: &u32| n.is_multiple_of(2))
        .layer(service);
    let read = retry.clone().oneshot(2).await.unwrap_err();
    assert_eq!(read.attempts(), Some(3));
    let write = retry.oneshot(3).await.unwrap_err();
    assert_eq!(write.attempts(), Some(1));
    assert_eq!(calls.lock().unwrap().len(), 4);
}

#[tokio::test(start_paused = true)]
async fn the_budget_keeps_a_brownout_from_multiplying_the_load() {
    // 20 % of the calls, nothing per second: 100 calls that all fail may be
    // retried 20 times in all, not 200.
    let config = RetryConfig {
        budget_min_per_second: 0,
        backoff_ms: 1,
        max_backoff_ms: 1,
        ..steady()
    };
    let (service, calls) = failing(ErrorKind::Unavailable);
    let retry = RetryLayer::new(config).layer(service);
    for n in 0..100 {
        retry.clone().oneshot(n).await.unwrap_err();
    }
    let attempts = calls.lock().unwrap().len();
    assert_eq!(attempts, 120, "100 calls and one retry per five");

    // The clones shared one budget; a new layer has its own.
    let (service, calls) = failing(ErrorKind::Unavailable);
    let fresh = RetryLayer::new(config).layer(service);
    fresh.oneshot(1).await.unwrap_err();
    assert_eq!(
        calls.lock().unwrap().len(),
        1,
        "a fifth of one call is no retry"
    );
}

#[tokio::test(start_paused = true)]
async fn the_budget_allows_the_minimum_per_second_whatever_the_traffic() {
    let config = RetryConfig {
        budget_percent: 0.0,
        budget_min_per_second: 1,
        budget_window_ms: 2_000,
        backoff_ms: 1,
        max_backoff_ms: 1,
        ..steady()
    };
    let (service, calls) = failing(ErrorKind::Unavailable);
    let retry = RetryLayer::new(config).layer(service);
    for n in 0..10 {
        retry.clone().oneshot(n).await.unwrap_err();
    }
    // One a second over a 2 s window: two retries.
    assert_eq!(calls.lock().unwrap().len(), 12);
}

#[tokio::test(start_paused = true)]
async fn a_peers_delay_is_waited_for_at_most_max_backoff() {
    // The server asks for a day; the cap is 1 s.
    let (service, calls) =
        failing_with(|| Error::transient("HTTP 503").with_retry_after(Duration::from_secs(86_400)));
    let started = Instant::now();
    let error = RetryLayer::new(steady())
        .layer(service)
        .oneshot(1)
        .await
        .unwrap_err();
    assert_eq!(
        gaps(&calls.lock().unwrap()),
        [Duration::from_secs(1), Duration::from_secs(1)]
    );
    assert_eq!(started.elapsed(), Duration::from_secs(2));
    // What a consume loop sees: put the message back for at most 1 s.
    assert_eq!(error.requeue_after(), Some(Duration::from_secs(1)));
    assert_eq!(error.retry_after(), Some(Duration::from_secs(1)));

    // A shorter delay than the schedule's does not shorten the wait.
    let (service, calls) =
        failing_with(|| Error::transient("HTTP 429").with_retry_after(Duration::from_millis(10)));
    RetryLayer::new(steady())
        .layer(service)
        .oneshot(1)
        .await
        .unwrap_err();
    assert_eq!(
        gaps(&calls.lock().unwrap()),
        [100, 200].map(Duration::from_millis)
    );
}

#[tokio::test(start_paused = true)]
async fn a_requeue_set_further_in_is_left_as_it_is() {
    // An open breaker's requeue is this process's own decision, not a peer's.
    let (service, _) = failing_with(|| {
        Error::new(ErrorKind::BreakerOpen, "open").with_requeue(Duration::from_secs(30))
    });
    let error = RetryLayer::new(steady())
        .layer(service)
        .oneshot(1)
        .await
        .unwrap_err();
    assert_eq!(error.requeue_after(), Some(Duration::from_secs(30)));
}

/// A batch consumer's "held back behind an earlier message of its key" is
/// no failure: the retry layer does not send it again, and the dead-letter
/// layer attaches no letter.
#[tokio::test(start_paused = true)]
async fn a_held_back_answer_passes_retry_and_dead_letters_untouched() {
    use crate::middleware::dead_letter::{DeadLetteringLayer, LogOnly};

    let calls = Arc::new(Mutex::new(0));
    let counted = calls.clone();
    let handler = DeadLetteringLayer::new(Arc::new(LogOnly)).layer(
        RetryLayer::for_messages(steady()).layer(service_fn(move |_: Message<Ping>| {
            *counted.lock().unwrap() += 1;
            async { Err::<(), _>(Error::held_back()) }
        })),
    );
    let error = handler.oneshot(message(1, 1)).await.unwrap_err();
    assert!(error.is_held_back());
    assert_eq!(*calls.lock().unwrap(), 1, "not retried");
    assert_eq!(error.attempts(), None);
    assert!(error.dead_letter().is_none());
}
