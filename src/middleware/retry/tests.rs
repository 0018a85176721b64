use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;
use tower::{Layer, ServiceExt, service_fn};

use super::*;
use crate::error::ErrorKind;
use crate::middleware::test_support::{Ping, message};

/// A service failing with `kind` every time, recording when each call came.
fn failing(
    kind: ErrorKind,
) -> (
    impl Service<u32, Response = (), Error = Error, Future: Send> + Clone + Send + 'static,
    Arc<Mutex<Vec<Instant>>>,
) {
    let calls = Arc::new(Mutex::new(Vec::new()));
    let recorded = calls.clone();
    let service = service_fn(move |_: u32| {
        recorded.lock().unwrap().push(Instant::now());
        async move { Err::<(), _>(Error::new(kind, "scripted")) }
    });
    (service, calls)
}

fn gaps(calls: &[Instant]) -> Vec<Duration> {
    calls.windows(2).map(|pair| pair[1] - pair[0]).collect()
}

#[tokio::test(start_paused = true)]
async fn three_attempts_in_all_waiting_100_then_200_ms() {
    let (service, calls) = failing(ErrorKind::Unavailable);
    let error = RetryLayer::new(RetryConfig::default())
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
    let (service, calls) = failing(ErrorKind::Timeout);
    let config = RetryConfig {
        max_attempts: 7,
        ..RetryConfig::default()
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
    let error = RetryLayer::for_messages(RetryConfig::default())
        .layer(handler)
        .oneshot(message)
        .await
        .unwrap_err();
    assert_eq!(*seen.lock().unwrap(), [2, 3, 4]);
    assert_eq!(error.attempts(), Some(3));
}

#[tokio::test(start_paused = true)]
async fn jitter_adds_at_most_the_wait_again() {
    let (service, calls) = failing(ErrorKind::Unavailable);
    let config = RetryConfig {
        max_attempts: 5,
        ..RetryConfig::default()
    };
    RetryLayer::new(config)
        .with_jitter()
        .layer(service)
        .oneshot(1)
        .await
        .unwrap_err();
    let gaps = gaps(&calls.lock().unwrap());
    assert_eq!(gaps.len(), 4);
    for (gap, base) in gaps.iter().zip([100u64, 200, 400, 800]) {
        let base = Duration::from_millis(base);
        assert!(*gap >= base && *gap <= base * 2, "{gap:?} for {base:?}");
    }
}
