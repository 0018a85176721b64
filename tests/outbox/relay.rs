//! The relay: outages lose nothing, refused rows are parked (holding their
//! key by default), NOTIFY wakes it, close has a deadline.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use switchboard::outbox::{OnRefused, Outbox, ParkedAlert, ParkedEvent, Relay, RelayConfig};
use switchboard::{MemoryTransport, Transport};
use tokio::sync::mpsc;

use super::support::{self, Faulty, Step, WITHIN, step};

fn fast() -> RelayConfig {
    RelayConfig::default()
        .with_poll_interval(Duration::from_millis(10))
        .with_backoff(Duration::from_millis(5), Duration::from_millis(50))
}

async fn consumer(
    transport: Arc<dyn Transport>,
) -> (switchboard::ConsumerHandle, mpsc::UnboundedReceiver<Step>) {
    support::consumer(transport, Step::clone).await
}

use support::next;

async fn enqueue(
    outbox: &Outbox<sqlx::Postgres>,
    pool: &sqlx::PgPool,
    key: &str,
    n: u64,
    note: &str,
) {
    let mut tx = pool.begin().await.unwrap();
    let mut payload = step(key, n);
    payload.note = note.to_owned();
    outbox
        .enqueue_event_keyed(&mut tx, key, payload)
        .await
        .unwrap();
    tx.commit().await.unwrap();
}

#[tokio::test]
async fn an_outage_stops_the_relay_without_losing_rows_and_it_resumes() {
    let pool = support::pg().await;
    let prefix = support::prefix();
    let outbox = Outbox::new(&prefix, "test").unwrap();
    outbox.migrate(&pool).await.unwrap();
    let memory: Arc<dyn Transport> = Arc::new(MemoryTransport::new());
    let (consumer, mut seen) = consumer(memory.clone()).await;
    let faulty = Arc::new(Faulty::over(memory));
    faulty.down.store(true, Ordering::SeqCst);
    for n in 1..=5 {
        enqueue(&outbox, &pool, "k", n, "").await;
    }
    let relay = Relay::new(&outbox, pool.clone(), faulty.clone())
        .with_config(fast().with_batch_size(2))
        .spawn();
    support::eventually("the relay meets the outage a few times", WITHIN, || async {
        relay.stats().failures() >= 3
    })
    .await;
    assert_eq!(outbox.pending(&pool).await.unwrap().0, 5, "nothing removed");
    assert!(seen.try_recv().is_err());

    faulty.down.store(false, Ordering::SeqCst);
    for n in 1..=5 {
        assert_eq!(next(&mut seen).await.n, n);
    }
    support::eventually("drained", WITHIN, || async {
        outbox.pending(&pool).await.unwrap().0 == 0
    })
    .await;
    assert_eq!(relay.stats().sent(), 5);
    relay.close(Duration::from_secs(5)).await.unwrap();
    consumer.shutdown().await.unwrap();
    support::drop_pg_tables(&pool, &prefix).await;
}

#[derive(Debug, Default)]
struct Alerts(Mutex<Vec<ParkedEvent>>);

impl ParkedAlert for Alerts {
    fn parked(&self, event: &ParkedEvent) {
        self.0.lock().unwrap().push(event.clone());
    }
}

async fn refused_row(on_refused: OnRefused) {
    let pool = support::pg().await;
    let prefix = support::prefix();
    let outbox = Outbox::new(&prefix, "test").unwrap();
    outbox.migrate(&pool).await.unwrap();
    let memory: Arc<dyn Transport> = Arc::new(MemoryTransport::new());
    let (consumer, mut seen) = consumer(memory.clone()).await;
    let mut faulty = Faulty::over(memory);
    faulty.refuse = Some("poison");
    enqueue(&outbox, &pool, "a", 1, "").await;
    enqueue(&outbox, &pool, "a", 2, "poison").await;
    enqueue(&outbox, &pool, "a", 3, "").await;
    enqueue(&outbox, &pool, "b", 1, "").await;
    let alerts = Arc::new(Alerts::default());
    let relay = Relay::new(&outbox, pool.clone(), Arc::new(faulty))
        .with_config(fast().with_on_refused(on_refused))
        .with_alert(alerts.clone())
        .spawn();

    let mut got = Vec::new();
    let expected = match on_refused {
        OnRefused::HoldKey => 2,
        _ => 3,
    };
    for _ in 0..expected {
        let step = next(&mut seen).await;
        got.push((step.key, step.n));
    }
    support::eventually("the poison row is parked", WITHIN, || async {
        relay.stats().parked() == 1
    })
    .await;
    let parked = outbox.parked(&pool, 10).await.unwrap();
    assert_eq!(parked.len(), 1);
    assert_eq!(parked[0].key, "a");
    assert!(
        parked[0].reason.contains("refused by the broker"),
        "{}",
        parked[0].reason
    );
    let alert = alerts.0.lock().unwrap().clone();
    assert_eq!(alert.len(), 1);
    assert_eq!(alert[0].id, parked[0].id);

    match on_refused {
        OnRefused::HoldKey => {
            assert_eq!(got, [("a".to_owned(), 1), ("b".to_owned(), 1)]);
            assert!(alert[0].holds_key);
            // a/3 waits behind the parked a/2 …
            support::eventually("only a/3 waits", WITHIN, || async {
                outbox.pending(&pool).await.unwrap().0 == 1
            })
            .await;
            assert!(seen.try_recv().is_err());
            // … until an operator discards it.
            assert!(outbox.discard(&pool, parked[0].id).await.unwrap());
            let step = next(&mut seen).await;
            assert_eq!((step.key.as_str(), step.n), ("a", 3));
        }
        _ => {
            got.sort();
            assert_eq!(
                got,
                [
                    ("a".to_owned(), 1),
                    ("a".to_owned(), 3),
                    ("b".to_owned(), 1)
                ]
            );
            assert!(!alert[0].holds_key);
        }
    }
    relay.close(Duration::from_secs(5)).await.unwrap();
    consumer.shutdown().await.unwrap();
    support::drop_pg_tables(&pool, &prefix).await;
}

#[tokio::test]
async fn a_refused_row_is_parked_and_holds_its_key() {
    refused_row(OnRefused::HoldKey).await;
}

#[tokio::test]
async fn a_refused_row_is_parked_and_the_key_goes_on_when_configured() {
    refused_row(OnRefused::ParkAndContinue).await;
}

#[tokio::test]
async fn an_unparked_row_is_sent_in_its_place() {
    let pool = support::pg().await;
    let prefix = support::prefix();
    let outbox = Outbox::new(&prefix, "test").unwrap();
    outbox.migrate(&pool).await.unwrap();
    let memory: Arc<dyn Transport> = Arc::new(MemoryTransport::new());
    let (consumer, mut seen) = consumer(memory.clone()).await;
    let mut faulty = Faulty::over(memory.clone());
    faulty.refuse = Some("poison");
    enqueue(&outbox, &pool, "a", 1, "poison").await;
    enqueue(&outbox, &pool, "a", 2, "").await;
    let relay = Relay::new(&outbox, pool.clone(), Arc::new(faulty))
        .with_config(fast())
        .spawn();
    support::eventually("parked", WITHIN, || async { relay.stats().parked() == 1 }).await;
    relay.close(Duration::from_secs(5)).await.unwrap();
    // The broker now takes it (say, its limit was raised).
    let id = outbox.parked(&pool, 10).await.unwrap()[0].id;
    assert!(outbox.unpark(&pool, id).await.unwrap());
    assert!(
        !outbox.unpark(&pool, id).await.unwrap(),
        "not parked any more"
    );
    let relay = Relay::new(&outbox, pool.clone(), memory)
        .with_config(fast())
        .spawn();
    assert_eq!(next(&mut seen).await.n, 1);
    assert_eq!(next(&mut seen).await.n, 2);
    relay.close(Duration::from_secs(5)).await.unwrap();
    consumer.shutdown().await.unwrap();
    support::drop_pg_tables(&pool, &prefix).await;
}

#[tokio::test]
async fn notify_wakes_a_relay_that_would_poll_in_an_hour() {
    let pool = support::pg().await;
    let prefix = support::prefix();
    let outbox = Outbox::new(&prefix, "test").unwrap().with_notify(true);
    outbox.migrate(&pool).await.unwrap();
    let memory: Arc<dyn Transport> = Arc::new(MemoryTransport::new());
    let (consumer, mut seen) = consumer(memory.clone()).await;
    let relay = Relay::new(&outbox, pool.clone(), memory)
        .with_config(
            fast()
                .with_poll_interval(Duration::from_secs(3600))
                .with_listen(true),
        )
        .spawn();
    // The relay's first (empty) round, then it waits.
    support::eventually("the relay took its partitions", WITHIN, || async {
        relay.stats().partitions() > 0
    })
    .await;
    for n in 1..=3 {
        enqueue(&outbox, &pool, "k", n, "").await;
        assert_eq!(next(&mut seen).await.n, n);
    }
    relay.close(Duration::from_secs(5)).await.unwrap();
    consumer.shutdown().await.unwrap();
    support::drop_pg_tables(&pool, &prefix).await;
}

#[tokio::test]
async fn close_past_its_deadline_aborts_and_says_so() {
    let pool = support::pg().await;
    let prefix = support::prefix();
    let outbox = Outbox::new(&prefix, "test").unwrap();
    outbox.migrate(&pool).await.unwrap();
    let faulty = Arc::new(Faulty::over(Arc::new(MemoryTransport::new())));
    faulty.hang_after_accept.store(true, Ordering::SeqCst);
    enqueue(&outbox, &pool, "k", 1, "").await;
    let relay = Relay::new(&outbox, pool.clone(), faulty.clone())
        .with_config(fast())
        .spawn();
    faulty.accepted_then_hung.notified().await;
    let error = relay.close(Duration::from_millis(50)).await.unwrap_err();
    assert_eq!(error.kind(), switchboard::ErrorKind::Timeout);
    assert_eq!(
        outbox.pending(&pool).await.unwrap().0,
        1,
        "kept for the next relay"
    );
    support::drop_pg_tables(&pool, &prefix).await;
}

#[tokio::test]
async fn the_relay_records_sent_parked_pending_and_lag() {
    use metrics_util::debugging::{DebugValue, DebuggingRecorder};
    use switchboard::observe::metrics as names;

    // Local to this thread: the current-thread runtime runs the relay's
    // task here too.
    let recorder: &'static DebuggingRecorder = Box::leak(Box::new(DebuggingRecorder::new()));
    let snapshotter = recorder.snapshotter();
    let _guard = metrics::set_default_local_recorder(recorder);

    let pool = support::pg().await;
    let prefix = support::prefix();
    let outbox = Outbox::new(&prefix, "test").unwrap();
    outbox.migrate(&pool).await.unwrap();
    let memory: Arc<dyn Transport> = Arc::new(MemoryTransport::new());
    let mut faulty = Faulty::over(memory.clone());
    faulty.refuse = Some("poison");
    enqueue(&outbox, &pool, "a", 1, "").await;
    enqueue(&outbox, &pool, "b", 1, "poison").await;
    enqueue(&outbox, &pool, "c", 1, "").await;
    let relay = Relay::new(&outbox, pool.clone(), Arc::new(faulty))
        .with_config(fast().with_stats_interval(Duration::from_millis(1)))
        .spawn();
    support::eventually("sent and parked", WITHIN, || async {
        relay.stats().sent() == 2 && relay.stats().parked() == 1
    })
    .await;
    relay.close(Duration::from_secs(5)).await.unwrap();

    let table = outbox.outbox_table().to_owned();
    let snapshot = snapshotter.snapshot().into_vec();
    let find = |name: &str, topic: Option<&str>| {
        snapshot
            .iter()
            .find(|(key, ..)| {
                let key = key.key();
                let label = |wanted: &str| {
                    key.labels()
                        .find(|label| label.key() == wanted)
                        .map(|label| label.value().to_owned())
                };
                key.name() == name
                    && label("outbox").as_deref() == Some(table.as_str())
                    && (topic.is_none() || label("topic").as_deref() == topic)
            })
            .map(|(.., value)| value)
            .unwrap_or_else(|| panic!("no {name} for {table}"))
    };
    assert_eq!(
        find(names::OUTBOX_SENT_TOTAL, Some("outbox.step")),
        &DebugValue::Counter(2)
    );
    assert_eq!(
        find(names::OUTBOX_PARKED_TOTAL, Some("outbox.step")),
        &DebugValue::Counter(1)
    );
    match find(names::OUTBOX_PENDING, None) {
        DebugValue::Gauge(pending) => assert!((0.0..=3.0).contains(&pending.0)),
        other => panic!("pending is {other:?}"),
    }
    match find(names::OUTBOX_LAG, None) {
        DebugValue::Gauge(lag) => assert!(lag.0 >= 0.0 && lag.0 < 60.0, "{}", lag.0),
        other => panic!("lag is {other:?}"),
    }
    support::drop_pg_tables(&pool, &prefix).await;
}

#[tokio::test]
async fn on_sqlite_one_relay_sends_and_another_takes_over_when_it_stops() {
    let pool = support::sqlite().await;
    let outbox = Outbox::new("", "test").unwrap();
    outbox.migrate(&pool).await.unwrap();
    let memory: Arc<dyn Transport> = Arc::new(MemoryTransport::new());
    let (consumer, mut seen) = consumer(memory.clone()).await;
    let config = fast().with_rebalance_interval(Duration::from_millis(20));
    let first = Relay::new(&outbox, pool.clone(), memory.clone())
        .with_config(config.clone())
        .spawn();
    let second = Relay::new(&outbox, pool.clone(), memory)
        .with_config(config)
        .spawn();
    let enqueue = |n: u64| {
        let (pool, outbox) = (pool.clone(), outbox.clone());
        async move {
            let mut tx = pool.begin().await.unwrap();
            outbox.enqueue_event(&mut tx, step("k", n)).await.unwrap();
            tx.commit().await.unwrap();
        }
    };
    for n in 1..=20 {
        enqueue(n).await;
    }
    for n in 1..=20 {
        assert_eq!(next(&mut seen).await.n, n);
    }
    support::eventually("drained", WITHIN, || async {
        outbox.pending(&pool).await.unwrap().0 == 0
    })
    .await;
    let (a, b) = (first.stats().sent(), second.stats().sent());
    assert!(a == 0 || b == 0, "one relay at a time: {a} and {b}");
    // The holder stops and gives its lease back; the other goes on.
    let (holder, standby) = if a > 0 {
        (first, second)
    } else {
        (second, first)
    };
    holder.close(Duration::from_secs(5)).await.unwrap();
    for n in 21..=25 {
        enqueue(n).await;
    }
    for n in 21..=25 {
        assert_eq!(next(&mut seen).await.n, n);
    }
    support::eventually("the other relay sent them", WITHIN, || async {
        standby.stats().sent() == 5
    })
    .await;
    standby.close(Duration::from_secs(5)).await.unwrap();
    consumer.shutdown().await.unwrap();
}
