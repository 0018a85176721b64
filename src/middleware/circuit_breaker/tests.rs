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

/// How the test ends one call in flight.
type Answer = oneshot::Sender<Result<(), Error>>;

/// A dependency whose every call waits for the test to say how it ends.
#[derive(Clone, Default)]
struct Scripted {
    answers: Arc<Mutex<Vec<Answer>>>,
}

impl Scripted {
    fn service(
        &self,
    ) -> impl Service<(), Response = (), Error = Error, Future: Send> + Clone + Send + 'static {
        let answers = self.answers.clone();
        tower::service_fn(move |()| {
            let (answer, answered) = oneshot::channel();
            answers.lock().unwrap().push(answer);
            async move { answered.await.expect("the test answers every call") }
        })
    }

    /// Ends the calls in flight, oldest first, with `result`.
    fn answer(&self, calls: usize, result: impl Fn() -> Result<(), Error>) {
        let answers: Vec<_> = self.answers.lock().unwrap().drain(..calls).collect();
        for answer in answers {
            answer.send(result()).ok();
        }
    }

    fn in_flight(&self) -> usize {
        self.answers.lock().unwrap().len()
    }
}

#[tokio::test(start_paused = true)]
async fn slow_successes_of_calls_let_through_before_the_trip_leave_it_open() {
    let layer = CircuitBreakerLayer::new(CircuitBreakerConfig::default());
    let dependency = Scripted::default();
    let breaker = layer.layer(dependency.service());
    let mut calls = tokio::task::JoinSet::new();
    for _ in 0..200 {
        let mut client = breaker.clone();
        calls.spawn(async move { client.ready().await?.call(()).await });
    }
    while dependency.in_flight() < 200 {
        tokio::task::yield_now().await;
    }

    // The dependency fails: the first five answers open the breaker.
    dependency.answer(5, || Err(Error::transient("down")));
    for _ in 0..5 {
        calls.join_next().await.unwrap().unwrap().unwrap_err();
    }
    assert_eq!(layer.state(), BreakerState::Open);
    let opened = Instant::now();

    // The 195 slow ones succeed afterwards: they were let through before the
    // trip and say nothing about the dependency now.
    dependency.answer(195, || Ok(()));
    while let Some(call) = calls.join_next().await {
        call.unwrap().unwrap();
    }
    assert_eq!(
        layer.state(),
        BreakerState::Open,
        "a stale success closed it"
    );
    let error = breaker.clone().oneshot(()).await.unwrap_err();
    assert_eq!(error.kind(), ErrorKind::BreakerOpen);
    assert_eq!(
        dependency.in_flight(),
        0,
        "an open breaker let a call through"
    );

    // The probe after the reset timeout decides.
    tokio::time::advance(Duration::from_secs(30)).await;
    assert_eq!(opened.elapsed(), Duration::from_secs(30));
    let probe = tokio::spawn(breaker.clone().oneshot(()));
    while dependency.in_flight() < 1 {
        tokio::task::yield_now().await;
    }
    assert_eq!(layer.state(), BreakerState::HalfOpen);
    dependency.answer(1, || Ok(()));
    probe.await.unwrap().unwrap();
    assert_eq!(layer.state(), BreakerState::Closed);
}

#[tokio::test(start_paused = true)]
async fn stale_failures_neither_reopen_a_recovered_breaker_nor_count_towards_the_next_trip() {
    let layer = CircuitBreakerLayer::new(CircuitBreakerConfig {
        failure_threshold: 2,
        ..Default::default()
    });
    let dependency = Scripted::default();
    let breaker = layer.layer(dependency.service());
    let mut stale = tokio::task::JoinSet::new();
    for _ in 0..4 {
        let mut client = breaker.clone();
        stale.spawn(async move { client.ready().await?.call(()).await });
    }
    while dependency.in_flight() < 4 {
        tokio::task::yield_now().await;
    }
    dependency.answer(2, || Err(Error::transient("down")));
    for _ in 0..2 {
        stale.join_next().await.unwrap().unwrap().unwrap_err();
    }
    assert_eq!(layer.state(), BreakerState::Open);
    tokio::time::advance(Duration::from_secs(30)).await;
    let probe = tokio::spawn(breaker.clone().oneshot(()));
    while dependency.in_flight() < 3 {
        tokio::task::yield_now().await;
    }
    // The probe is the newest call in flight: answer it alone.
    let probe_answer = dependency.answers.lock().unwrap().pop().unwrap();
    probe_answer.send(Ok(())).unwrap();
    probe.await.unwrap().unwrap();
    assert_eq!(layer.state(), BreakerState::Closed);

    // The two calls from before the trip fail now: stale, not counted.
    dependency.answer(2, || Err(Error::transient("down")));
    while let Some(call) = stale.join_next().await {
        call.unwrap().unwrap_err();
    }
    assert_eq!(layer.state(), BreakerState::Closed);
    // One fresh failure is one, not three.
    let failing = tokio::spawn(breaker.clone().oneshot(()));
    while dependency.in_flight() < 1 {
        tokio::task::yield_now().await;
    }
    dependency.answer(1, || Err(Error::transient("down")));
    failing.await.unwrap().unwrap_err();
    assert_eq!(layer.state(), BreakerState::Closed);
}

#[tokio::test(start_paused = true)]
async fn in_wait_mode_a_failure_during_a_known_outage_asks_to_be_requeued() {
    let layer = CircuitBreakerLayer::new(CircuitBreakerConfig {
        failure_threshold: 1,
        ..Default::default()
    })
    .when_open(WhenOpen::Wait);
    let dependency = Scripted::default();
    let breaker = layer.layer(dependency.service());
    let mut calls = tokio::task::JoinSet::new();
    for _ in 0..2 {
        let mut client = breaker.clone();
        calls.spawn(async move { client.ready().await?.call(()).await });
    }
    while dependency.in_flight() < 2 {
        tokio::task::yield_now().await;
    }
    // The failure that trips it is the dependency's to report: as it is.
    dependency.answer(1, || Err(Error::transient("down")));
    let tripping = calls.join_next().await.unwrap().unwrap().unwrap_err();
    assert_eq!(tripping.requeue_after(), None);
    assert_eq!(layer.state(), BreakerState::Open);

    // One let through before the trip fails 10 s later: the outage's.
    tokio::time::advance(Duration::from_secs(10)).await;
    dependency.answer(1, || Err(Error::transient("down")));
    let stale = calls.join_next().await.unwrap().unwrap().unwrap_err();
    assert_eq!(stale.kind(), ErrorKind::Unavailable);
    assert_eq!(stale.requeue_after(), Some(Duration::from_secs(20)));

    // A failed probe opens it again and goes back for a whole reset timeout.
    tokio::time::advance(Duration::from_secs(20)).await;
    let probe = tokio::spawn(breaker.clone().oneshot(()));
    while dependency.in_flight() < 1 {
        tokio::task::yield_now().await;
    }
    dependency.answer(1, || Err(Error::transient("still down")));
    let failed_probe = probe.await.unwrap().unwrap_err();
    assert_eq!(failed_probe.requeue_after(), Some(Duration::from_secs(30)));
    assert_eq!(layer.state(), BreakerState::Open);
}
