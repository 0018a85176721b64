use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, Ordering};

use async_trait::async_trait;
use tokio::sync::{Notify, oneshot};
use tower::{Layer, ServiceExt, service_fn};

use super::*;
use crate::middleware::test_support::{Ping, message};

/// A handler counting its runs and failing while `failing` is set.
fn counting(
    runs: Arc<AtomicU32>,
    failing: Arc<Mutex<bool>>,
) -> impl Service<Message<Ping>, Response = (), Error = Error, Future: Send> + Clone + Send + 'static
{
    service_fn(move |_: Message<Ping>| {
        runs.fetch_add(1, Ordering::SeqCst);
        let fail = *failing.lock().unwrap();
        async move {
            if fail {
                Err(Error::permanent("handler failed"))
            } else {
                Ok(())
            }
        }
    })
}

#[tokio::test]
async fn a_done_event_is_skipped_and_a_failed_one_runs_again() {
    let runs = Arc::new(AtomicU32::new(0));
    let failing = Arc::new(Mutex::new(true));
    let handler = DedupeLayer::in_memory().layer(counting(runs.clone(), failing.clone()));
    let delivery = message(1, 1);

    let error = handler.clone().oneshot(delivery.clone()).await.unwrap_err();
    assert_eq!(error.kind(), ErrorKind::Rejected);
    assert_eq!(error.requeue_after(), None);
    *failing.lock().unwrap() = false;
    handler
        .clone()
        .oneshot(delivery.clone().with_attempt(2))
        .await
        .unwrap();
    assert_eq!(
        runs.load(Ordering::SeqCst),
        2,
        "the failure did not release the mark"
    );
    handler
        .clone()
        .oneshot(delivery.with_attempt(3))
        .await
        .unwrap();
    assert_eq!(runs.load(Ordering::SeqCst), 2, "a done event ran again");
    // Another event, and the same event in another group, are not duplicates.
    handler.clone().oneshot(message(2, 1)).await.unwrap();
    let elsewhere = Message::new(
        message(1, 1).envelope().clone(),
        "test.ping",
        "other-group",
        1,
    );
    handler.oneshot(elsewhere).await.unwrap();
    assert_eq!(runs.load(Ordering::SeqCst), 4);
}

#[tokio::test]
async fn a_delivery_finding_its_event_in_progress_is_requeued_without_running() {
    let runs = Arc::new(AtomicU32::new(0));
    let entered = Arc::new(Notify::new());
    let (finish, finished) = oneshot::channel::<()>();
    let finished = Arc::new(Mutex::new(Some(finished)));
    let handler = DedupeLayer::in_memory()
        .with_requeue_delay(Duration::from_millis(250))
        .layer(service_fn({
            let (runs, entered) = (runs.clone(), entered.clone());
            move |_: Message<Ping>| {
                runs.fetch_add(1, Ordering::SeqCst);
                entered.notify_one();
                let finished = finished.lock().unwrap().take();
                async move {
                    if let Some(finished) = finished {
                        finished.await.ok();
                    }
                    Ok::<_, Error>(())
                }
            }
        }));
    let delivery = message(1, 1);
    let first = tokio::spawn(handler.clone().oneshot(delivery.clone()));
    entered.notified().await;

    let error = handler.clone().oneshot(delivery.clone()).await.unwrap_err();
    assert_eq!(error.requeue_after(), Some(Duration::from_millis(250)));
    assert_eq!(runs.load(Ordering::SeqCst), 1);

    finish.send(()).unwrap();
    first.await.unwrap().unwrap();
    handler.oneshot(delivery).await.unwrap();
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn a_handler_dropped_mid_way_releases_its_mark() {
    let store = Arc::new(MemoryDedupeStore::new());
    let entered = Arc::new(Notify::new());
    let handler = DedupeLayer::new(store.clone()).layer(service_fn({
        let entered = entered.clone();
        move |_: Message<Ping>| {
            entered.notify_one();
            std::future::pending::<Result<(), Error>>()
        }
    }));
    let delivery = message(1, 1);
    let call = tokio::spawn(handler.oneshot(delivery.clone()));
    entered.notified().await;
    call.abort();
    let _ = call.await;
    // The release runs in a task of its own; wait for it, bounded.
    let key = key_of(&delivery);
    tokio::time::timeout(Duration::from_secs(5), async {
        while store
            .try_begin(&key, "next", Duration::from_secs(60))
            .await
            .unwrap()
            != Mark::Acquired
        {
            tokio::task::yield_now().await;
        }
    })
    .await
    .expect("the mark was not released");
}

/// A store that records what it is asked and answers `Acquired`.
#[derive(Default)]
struct Recording {
    begun: Mutex<Vec<(String, String, Duration)>>,
    extended: Mutex<Vec<(String, String, Duration)>>,
    completed: Mutex<Vec<(String, String, Duration)>>,
}

#[async_trait]
impl DedupeStore for Recording {
    async fn try_begin(&self, key: &str, token: &str, ttl: Duration) -> Result<Mark, Error> {
        self.begun
            .lock()
            .unwrap()
            .push((key.into(), token.into(), ttl));
        Ok(Mark::Acquired)
    }
    async fn extend(&self, key: &str, token: &str, ttl: Duration) -> Result<bool, Error> {
        self.extended
            .lock()
            .unwrap()
            .push((key.into(), token.into(), ttl));
        Ok(true)
    }
    async fn complete(&self, key: &str, token: &str, ttl: Duration) -> Result<bool, Error> {
        self.completed
            .lock()
            .unwrap()
            .push((key.into(), token.into(), ttl));
        Ok(true)
    }
    async fn release(&self, _: &str, _: &str) -> Result<bool, Error> {
        Ok(true)
    }
}

#[tokio::test]
async fn each_attempt_holds_its_own_token_and_the_configured_ttls() {
    let store = Arc::new(Recording::default());
    let ttls = DedupeTtls {
        in_progress: Duration::from_secs(17),
        done: Duration::from_secs(3600),
        requeue: Duration::from_secs(1),
    };
    let handler = DedupeLayer::new(store.clone())
        .with_ttls(ttls)
        .layer(service_fn(|_: Message<Ping>| async { Ok::<_, Error>(()) }));
    let delivery = message(1, 1);
    handler.clone().oneshot(delivery.clone()).await.unwrap();
    handler.oneshot(delivery.clone()).await.unwrap();

    let begun = store.begun.lock().unwrap().clone();
    let completed = store.completed.lock().unwrap().clone();
    assert_eq!(begun.len(), 2);
    assert_eq!(begun[0].0, format!("g:{}", delivery.event_id()));
    assert_ne!(
        begun[0].1, begun[1].1,
        "two attempts shared a fencing token"
    );
    assert!(begun.iter().all(|(_, _, ttl)| *ttl == ttls.in_progress));
    assert_eq!(completed[0].1, begun[0].1, "completed with another token");
    assert!(completed.iter().all(|(_, _, ttl)| *ttl == ttls.done));
    assert!(
        store.extended.lock().unwrap().is_empty(),
        "a handler quicker than a third of the TTL had its mark extended"
    );
}

#[tokio::test]
async fn a_failing_store_requeues_instead_of_dead_lettering() {
    struct Down;
    #[async_trait]
    impl DedupeStore for Down {
        async fn try_begin(&self, _: &str, _: &str, _: Duration) -> Result<Mark, Error> {
            Err(Error::new(
                ErrorKind::Connection,
                "redis: connection refused",
            ))
        }
        async fn extend(&self, _: &str, _: &str, _: Duration) -> Result<bool, Error> {
            unreachable!()
        }
        async fn complete(&self, _: &str, _: &str, _: Duration) -> Result<bool, Error> {
            unreachable!()
        }
        async fn release(&self, _: &str, _: &str) -> Result<bool, Error> {
            unreachable!()
        }
    }
    let runs = Arc::new(AtomicU32::new(0));
    let handler =
        DedupeLayer::new(Arc::new(Down)).layer(counting(runs.clone(), Arc::new(Mutex::new(false))));
    let error = handler.oneshot(message(1, 1)).await.unwrap_err();
    assert_eq!(error.kind(), ErrorKind::Connection);
    assert_eq!(error.requeue_after(), Some(Duration::from_secs(1)));
    assert_eq!(runs.load(Ordering::SeqCst), 0);
}

/// Marks that expire by tokio's clock (the in-process store keeps std's), so a paused
/// clock can run a handler past the in-progress TTL without waiting.
#[derive(Default)]
struct Clocked {
    /// The holder's token (`None` once done) and when the mark runs out.
    marks: Mutex<std::collections::HashMap<String, (Option<String>, tokio::time::Instant)>>,
    extends: AtomicU32,
}

impl Clocked {
    fn live(&self, key: &str) -> Option<Option<String>> {
        let mut marks = self.marks.lock().unwrap();
        match marks.get(key) {
            Some((_, until)) if *until <= tokio::time::Instant::now() => {
                marks.remove(key);
                None
            }
            Some((token, _)) => Some(token.clone()),
            None => None,
        }
    }

    fn set(&self, key: &str, token: Option<&str>, ttl: Duration) {
        let until = tokio::time::Instant::now() + ttl;
        self.marks
            .lock()
            .unwrap()
            .insert(key.into(), (token.map(Into::into), until));
    }

    fn held_by(&self, key: &str, token: &str) -> bool {
        self.live(key).flatten().as_deref() == Some(token)
    }
}

#[async_trait]
impl DedupeStore for Clocked {
    async fn try_begin(&self, key: &str, token: &str, ttl: Duration) -> Result<Mark, Error> {
        Ok(match self.live(key) {
            None => {
                self.set(key, Some(token), ttl);
                Mark::Acquired
            }
            Some(Some(_)) => Mark::InProgress,
            Some(None) => Mark::Done,
        })
    }
    async fn extend(&self, key: &str, token: &str, ttl: Duration) -> Result<bool, Error> {
        self.extends.fetch_add(1, Ordering::SeqCst);
        let held = self.held_by(key, token);
        if held {
            self.set(key, Some(token), ttl);
        }
        Ok(held)
    }
    async fn complete(&self, key: &str, token: &str, ttl: Duration) -> Result<bool, Error> {
        let held = self.held_by(key, token);
        if held {
            self.set(key, None, ttl);
        }
        Ok(held)
    }
    async fn release(&self, key: &str, token: &str) -> Result<bool, Error> {
        let held = self.held_by(key, token);
        if held {
            self.marks.lock().unwrap().remove(key);
        }
        Ok(held)
    }
}

/// A handler counting its runs, each taking `takes` on tokio's clock.
fn slow(
    runs: Arc<AtomicU32>,
    takes: Duration,
) -> impl Service<Message<Ping>, Response = (), Error = Error, Future: Send> + Clone + Send + 'static
{
    service_fn(move |_: Message<Ping>| {
        runs.fetch_add(1, Ordering::SeqCst);
        async move {
            tokio::time::sleep(takes).await;
            Ok::<_, Error>(())
        }
    })
}

#[tokio::test]
async fn a_handler_slower_than_the_in_progress_ttl_keeps_its_mark() {
    tokio::time::pause();
    let ttls = DedupeTtls {
        in_progress: Duration::from_secs(30),
        done: Duration::from_secs(3600),
        requeue: Duration::from_secs(1),
    };
    let store = Arc::new(Clocked::default());
    let runs = Arc::new(AtomicU32::new(0));
    let handler = DedupeLayer::new(store.clone())
        .with_ttls(ttls)
        .layer(slow(runs.clone(), 3 * ttls.in_progress));
    let delivery = message(1, 1);
    let key = key_of(&delivery);
    let started = tokio::time::Instant::now();
    let first = tokio::spawn(handler.clone().oneshot(delivery.clone()));

    // Duplicates within the first TTL and well past it (the handler runs
    // for three): each finds the event in progress.
    for at in [15, 45, 75, 85] {
        tokio::time::sleep_until(started + Duration::from_secs(at)).await;
        let error = handler
            .clone()
            .oneshot(delivery.clone().with_attempt(2))
            .await
            .expect_err("a duplicate ran beside the slow handler");
        assert_eq!(error.kind(), ErrorKind::Unavailable);
        assert_eq!(error.requeue_after(), Some(ttls.requeue), "at {at} s");
    }
    assert_eq!(runs.load(Ordering::SeqCst), 1);

    first.await.unwrap().unwrap();
    // (tokio's timer rounds each deadline up to the next millisecond)
    assert_eq!(started.elapsed().as_secs(), 3 * ttls.in_progress.as_secs());
    // One renewal every 10 s while the handler ran.
    assert!(store.extends.load(Ordering::SeqCst) >= 8);
    handler
        .oneshot(delivery.with_attempt(3))
        .await
        .expect("a duplicate of a handled event is acked");
    assert_eq!(runs.load(Ordering::SeqCst), 1, "a done event ran again");
    assert_eq!(store.live(&key), Some(None), "the mark is done");
}

#[tokio::test]
async fn failed_renewals_are_tried_again_and_a_lost_mark_lets_the_handler_finish() {
    /// Acquires every mark and answers each `extend` from `answers`.
    struct Scripted {
        answers: Mutex<Vec<Result<bool, Error>>>,
        extends: Mutex<Vec<tokio::time::Instant>>,
    }
    #[async_trait]
    impl DedupeStore for Scripted {
        async fn try_begin(&self, _: &str, _: &str, _: Duration) -> Result<Mark, Error> {
            Ok(Mark::Acquired)
        }
        async fn extend(&self, _: &str, _: &str, _: Duration) -> Result<bool, Error> {
            self.extends
                .lock()
                .unwrap()
                .push(tokio::time::Instant::now());
            self.answers.lock().unwrap().remove(0)
        }
        async fn complete(&self, _: &str, _: &str, _: Duration) -> Result<bool, Error> {
            Ok(false)
        }
        async fn release(&self, _: &str, _: &str) -> Result<bool, Error> {
            Ok(true)
        }
    }
    tokio::time::pause();
    let store = Arc::new(Scripted {
        answers: Mutex::new(vec![
            Err(Error::new(
                ErrorKind::Connection,
                "redis: connection refused",
            )),
            Err(Error::new(ErrorKind::Timeout, "redis: timed out")),
            Ok(false),
        ]),
        extends: Mutex::new(Vec::new()),
    });
    let runs = Arc::new(AtomicU32::new(0));
    let ttl = Duration::from_secs(30);
    let handler = DedupeLayer::new(store.clone())
        .with_in_progress_ttl(ttl)
        .layer(slow(runs.clone(), 3 * ttl));
    let started = tokio::time::Instant::now();
    handler
        .oneshot(message(1, 1))
        .await
        .expect("the handler ran to its end");
    assert_eq!(runs.load(Ordering::SeqCst), 1);
    // Tried at every tick until the mark was found lost, then no more.
    let at: Vec<_> = store
        .extends
        .lock()
        .unwrap()
        .iter()
        .map(|instant| instant.duration_since(started).as_secs())
        .collect();
    assert_eq!(at, [10, 20, 30], "renewals at {at:?} s");
}
