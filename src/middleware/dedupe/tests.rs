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
    let store = Arc::new(MokaDedupeStore::new());
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
