use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::oneshot;
use tokio::time::Instant;
use tower::{Layer, Service, ServiceExt};

use super::*;
use crate::error::ErrorKind;

/// A dependency whose next answers the test sets, counting the calls that
/// reach it.
#[derive(Clone, Default)]
struct Dependency {
    calls: Arc<AtomicUsize>,
    failing_with: Arc<Mutex<Option<ErrorKind>>>,
}

impl Dependency {
    fn fail_with(&self, kind: Option<ErrorKind>) {
        *self.failing_with.lock().unwrap() = kind;
    }

    fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }
}

impl Service<u32> for Dependency {
    type Response = u32;
    type Error = Error;
    type Future = std::future::Ready<Result<u32, Error>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: u32) -> Self::Future {
        self.calls.fetch_add(1, Ordering::SeqCst);
        std::future::ready(match *self.failing_with.lock().unwrap() {
            None => Ok(request),
            Some(kind) => Err(Error::new(kind, "scripted failure")),
        })
    }
}

fn spec_breaker() -> (CircuitBreaker<Dependency>, Dependency) {
    let dependency = Dependency::default();
    let breaker = CircuitBreaker::new(dependency.clone(), CircuitBreakerConfig::default());
    (breaker, dependency)
}

async fn call(breaker: &mut CircuitBreaker<Dependency>) -> Result<u32, Error> {
    breaker.ready().await?.call(7).await
}

async fn fail_times(breaker: &mut CircuitBreaker<Dependency>, times: usize) {
    for _ in 0..times {
        let error = call(breaker).await.unwrap_err();
        assert_ne!(error.kind(), ErrorKind::BreakerOpen, "opened too early");
    }
}

#[tokio::test(start_paused = true)]
async fn the_fifth_consecutive_failure_opens_it_and_the_sixth_call_never_reaches_the_service() {
    let (mut breaker, dependency) = spec_breaker();
    dependency.fail_with(Some(ErrorKind::Unavailable));
    fail_times(&mut breaker, 4).await;
    assert_eq!(breaker.state(), BreakerState::Closed);
    fail_times(&mut breaker, 1).await;
    assert_eq!(breaker.state(), BreakerState::Open);
    assert_eq!(dependency.calls(), 5);

    let error = call(&mut breaker).await.unwrap_err();
    assert_eq!(error.kind(), ErrorKind::BreakerOpen);
    assert!(!error.is_retryable());
    assert_eq!(error.requeue_after(), Some(Duration::from_secs(30)));
    assert_eq!(dependency.calls(), 5, "the sixth call reached the service");
}

#[tokio::test(start_paused = true)]
async fn a_success_in_between_resets_the_count() {
    let (mut breaker, dependency) = spec_breaker();
    dependency.fail_with(Some(ErrorKind::Timeout));
    fail_times(&mut breaker, 4).await;
    dependency.fail_with(None);
    assert_eq!(call(&mut breaker).await.unwrap(), 7);
    dependency.fail_with(Some(ErrorKind::Connection));
    fail_times(&mut breaker, 4).await;
    assert_eq!(breaker.state(), BreakerState::Closed);
    fail_times(&mut breaker, 1).await;
    assert_eq!(breaker.state(), BreakerState::Open);
}

#[tokio::test(start_paused = true)]
async fn client_errors_neither_count_nor_reset() {
    let (mut breaker, dependency) = spec_breaker();
    dependency.fail_with(Some(ErrorKind::Rejected));
    fail_times(&mut breaker, 20).await;
    assert_eq!(breaker.state(), BreakerState::Closed);

    dependency.fail_with(Some(ErrorKind::Unavailable));
    fail_times(&mut breaker, 4).await;
    dependency.fail_with(Some(ErrorKind::NotFound));
    fail_times(&mut breaker, 3).await;
    assert_eq!(breaker.state(), BreakerState::Closed);
    // The refusals did not reset the four failures: one more opens it.
    dependency.fail_with(Some(ErrorKind::Unavailable));
    fail_times(&mut breaker, 1).await;
    assert_eq!(breaker.state(), BreakerState::Open);
}

#[tokio::test(start_paused = true)]
async fn the_trial_call_goes_through_at_the_reset_timeout_and_not_before() {
    let (mut breaker, dependency) = spec_breaker();
    dependency.fail_with(Some(ErrorKind::Unavailable));
    fail_times(&mut breaker, 5).await;
    let opened = Instant::now();

    tokio::time::advance(Duration::from_millis(29_999)).await;
    let error = call(&mut breaker).await.unwrap_err();
    assert_eq!(error.kind(), ErrorKind::BreakerOpen);
    assert_eq!(error.requeue_after(), Some(Duration::from_millis(1)));
    assert_eq!(dependency.calls(), 5, "tried before the reset timeout");

    tokio::time::advance(Duration::from_millis(1)).await;
    assert_eq!(opened.elapsed(), Duration::from_secs(30));
    dependency.fail_with(None);
    assert_eq!(call(&mut breaker).await.unwrap(), 7);
    assert_eq!(dependency.calls(), 6);
    assert_eq!(breaker.state(), BreakerState::Closed);
}

#[tokio::test(start_paused = true)]
async fn a_failed_trial_call_opens_it_for_another_reset_timeout() {
    let (mut breaker, dependency) = spec_breaker();
    dependency.fail_with(Some(ErrorKind::Unavailable));
    fail_times(&mut breaker, 5).await;
    tokio::time::advance(Duration::from_secs(30)).await;
    assert_eq!(
        call(&mut breaker).await.unwrap_err().kind(),
        ErrorKind::Unavailable
    );
    assert_eq!(breaker.state(), BreakerState::Open);
    assert_eq!(dependency.calls(), 6);
    let error = call(&mut breaker).await.unwrap_err();
    assert_eq!(error.requeue_after(), Some(Duration::from_secs(30)));
    assert_eq!(dependency.calls(), 6);
}

#[tokio::test(start_paused = true)]
async fn half_open_lets_exactly_one_trial_call_through() {
    let layer = CircuitBreakerLayer::new(CircuitBreakerConfig {
        failure_threshold: 1,
        ..Default::default()
    });
    let calls = Arc::new(AtomicUsize::new(0));
    let (release, released) = oneshot::channel::<()>();
    let released = Arc::new(Mutex::new(Some(released)));
    let service = tower::service_fn({
        let calls = calls.clone();
        move |fail: bool| {
            let n = calls.fetch_add(1, Ordering::SeqCst);
            // The trial call (the second) hangs until the test lets it go.
            let released = if n == 1 {
                released.lock().unwrap().take()
            } else {
                None
            };
            async move {
                if fail {
                    return Err(Error::transient("down"));
                }
                if let Some(released) = released {
                    released.await.ok();
                }
                Ok::<_, Error>(())
            }
        }
    });
    let mut first = layer.layer(service);
    first.ready().await.unwrap().call(true).await.unwrap_err();
    assert_eq!(layer.state(), BreakerState::Open);
    tokio::time::advance(Duration::from_secs(30)).await;

    let mut probe_client = first.clone();
    let probe = tokio::spawn(async move { probe_client.ready().await?.call(false).await });
    while calls.load(Ordering::SeqCst) < 2 {
        tokio::task::yield_now().await;
    }
    assert_eq!(layer.state(), BreakerState::HalfOpen);
    let error = first.ready().await.unwrap().call(false).await.unwrap_err();
    assert_eq!(error.kind(), ErrorKind::BreakerOpen);
    assert_eq!(
        calls.load(Ordering::SeqCst),
        2,
        "a second call went through"
    );

    release.send(()).unwrap();
    probe.await.unwrap().unwrap();
    assert_eq!(layer.state(), BreakerState::Closed);
}

#[tokio::test(start_paused = true)]
async fn in_wait_mode_poll_ready_is_pending_until_the_trial_call_is_due() {
    let dependency = Dependency::default();
    let layer = CircuitBreakerLayer::new(CircuitBreakerConfig::default()).when_open(WhenOpen::Wait);
    let mut breaker = layer.layer(dependency.clone());
    dependency.fail_with(Some(ErrorKind::Unavailable));
    fail_times(&mut breaker, 5).await;
    let opened = Instant::now();

    dependency.fail_with(None);
    let answer = call(&mut breaker).await.unwrap();
    assert_eq!(answer, 7);
    assert_eq!(opened.elapsed(), Duration::from_secs(30));
    assert_eq!(dependency.calls(), 6);
    assert_eq!(breaker.state(), BreakerState::Closed);
}

#[tokio::test(start_paused = true)]
async fn every_transition_is_seen_by_a_watcher() {
    let (mut breaker, dependency) = spec_breaker();
    let mut states = breaker.watch();
    assert_eq!(*states.borrow_and_update(), BreakerState::Closed);
    dependency.fail_with(Some(ErrorKind::Unavailable));
    fail_times(&mut breaker, 5).await;
    assert!(states.has_changed().unwrap());
    assert_eq!(*states.borrow_and_update(), BreakerState::Open);
    tokio::time::advance(Duration::from_secs(30)).await;
    dependency.fail_with(None);
    // Half-open and closed happen within this one call; the watcher sees
    // the last.
    call(&mut breaker).await.unwrap();
    assert_eq!(*states.borrow_and_update(), BreakerState::Closed);
}

#[tokio::test(start_paused = true)]
async fn an_abandoned_trial_call_frees_the_slot() {
    let layer = CircuitBreakerLayer::new(CircuitBreakerConfig {
        failure_threshold: 1,
        ..Default::default()
    });
    let mut service = layer.layer(tower::service_fn(|hang: bool| async move {
        if hang {
            std::future::pending::<()>().await;
        }
        Err::<(), _>(Error::transient("down"))
    }));
    service
        .ready()
        .await
        .unwrap()
        .call(false)
        .await
        .unwrap_err();
    tokio::time::advance(Duration::from_secs(30)).await;
    let probe = service.ready().await.unwrap().call(true);
    assert_eq!(layer.state(), BreakerState::HalfOpen);
    drop(probe);
    // The slot is free again: the next call is the trial call.
    let error = service
        .ready()
        .await
        .unwrap()
        .call(false)
        .await
        .unwrap_err();
    assert_eq!(error.kind(), ErrorKind::Unavailable);
    assert_eq!(layer.state(), BreakerState::Open);
}
