//! Order per key across relays: four writers on the same ten keys, two
//! relays with small batches; none out of order, none lost, none twice.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sqlx::AssertSqlSafe;
use switchboard::outbox::{Outbox, Relay, RelayConfig};
use switchboard::{
    EventBus, MemoryTransport, Message, SubscribeOptions, Topology, Transport, handler_fn,
};

use super::support::{self, Faulty, Step, WITHIN, rand_below, step};

const WRITERS: u64 = 4;
const KEYS: u64 = 10;
const PER_WRITER: u64 = 30;

/// Where a writer's per-key sequence number comes from.
#[derive(Clone, Copy, PartialEq)]
enum Numbering {
    /// Drawn after the enqueue, under the lock the enqueue took.
    AfterEnqueue,
    /// Drawn under `Outbox::lock_key` before the enqueue, and carried in
    /// the payload.
    InPayload,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_writers_two_relays_keep_each_keys_commit_order() {
    writers_and_relays(Numbering::AfterEnqueue).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sequence_numbers_in_the_payload_arrive_in_order_per_key() {
    writers_and_relays(Numbering::InPayload).await;
}

async fn writers_and_relays(numbering: Numbering) {
    let pool = support::pg().await;
    let prefix = support::prefix();
    let outbox = Outbox::new(&prefix, "test").unwrap();
    outbox.migrate(&pool).await.unwrap();
    // The per-key sequence number of each event, drawn inside its
    // transaction *after* the enqueue: the enqueue's key lock is what keeps
    // two writers of a key from drawing the same number (UNIQUE would
    // fail them) and what makes the number follow commit order.
    let seqs = format!("{prefix}effects");
    sqlx::query(AssertSqlSafe(format!(
        "CREATE TABLE {seqs} (event_id TEXT PRIMARY KEY, key TEXT NOT NULL, \
         seq BIGINT NOT NULL, UNIQUE (key, seq))"
    )))
    .execute(&pool)
    .await
    .unwrap();

    let memory: Arc<dyn Transport> = Arc::new(MemoryTransport::new());
    let bus = EventBus::new(memory.clone(), "test");
    bus.declare(&Topology::new().with_event::<Step, _>(["check"]))
        .await
        .unwrap();
    let received = Arc::new(Mutex::new(Vec::<String>::new()));
    let in_payload = Arc::new(Mutex::new(Vec::<(String, u64)>::new()));
    let (log, payloads) = (received.clone(), in_payload.clone());
    let consumer = bus
        .subscribe(
            SubscribeOptions::new("check").with_concurrency(1),
            handler_fn(move |message: Message<Step>| {
                log.lock().unwrap().push(message.event_id().to_string());
                let payload = message.payload();
                payloads
                    .lock()
                    .unwrap()
                    .push((payload.key.clone(), payload.n));
                async { Ok(()) }
            }),
        )
        .await
        .unwrap();

    // Two relays sharing four partitions, rebalancing often; one behind a
    // transport that delays each publish by up to 2 ms.
    let config = |batch: usize| {
        RelayConfig::default()
            .with_batch_size(batch)
            .with_partitions(4)
            .with_rebalance_interval(Duration::from_millis(20))
            .with_poll_interval(Duration::from_millis(5))
    };
    let mut slow = Faulty::over(memory.clone());
    slow.delay = Some(Duration::from_millis(2));
    let first = Relay::new(&outbox, pool.clone(), memory.clone())
        .with_config(config(1 + rand_below(8) as usize))
        .spawn();
    let second = Relay::new(&outbox, pool.clone(), Arc::new(slow))
        .with_config(config(1 + rand_below(8) as usize))
        .spawn();

    let committed = Arc::new(AtomicUsize::new(0));
    let writers = (0..WRITERS).map(|writer| {
        let (pool, outbox, seqs, committed) = (
            pool.clone(),
            outbox.clone(),
            seqs.clone(),
            committed.clone(),
        );
        tokio::spawn(async move {
            for i in 0..PER_WRITER {
                let key = format!("key-{}", rand_below(KEYS));
                let mut tx = pool.begin().await.unwrap();
                match numbering {
                    Numbering::AfterEnqueue => {
                        let event_id = outbox
                            .enqueue_event_keyed(&mut tx, &key, step(&key, writer * 1000 + i))
                            .await
                            .unwrap();
                        sqlx::query(AssertSqlSafe(format!(
                            "INSERT INTO {seqs} (event_id, key, seq) \
                             SELECT $1, $2, coalesce(max(seq), 0) + 1 FROM {seqs} WHERE key = $2"
                        )))
                        .bind(event_id.to_string())
                        .bind(&key)
                        .execute(&mut *tx)
                        .await
                        .unwrap();
                    }
                    Numbering::InPayload => {
                        outbox.lock_key(&mut tx, &key).await.unwrap();
                        let seq: i64 = sqlx::query_scalar(AssertSqlSafe(format!(
                            "SELECT coalesce(max(seq), 0) + 1 FROM {seqs} WHERE key = $1"
                        )))
                        .bind(&key)
                        .fetch_one(&mut *tx)
                        .await
                        .unwrap();
                        let event_id = outbox
                            .enqueue_event_keyed(&mut tx, &key, step(&key, seq as u64))
                            .await
                            .unwrap();
                        sqlx::query(AssertSqlSafe(format!(
                            "INSERT INTO {seqs} (event_id, key, seq) VALUES ($1, $2, $3)"
                        )))
                        .bind(event_id.to_string())
                        .bind(&key)
                        .bind(seq)
                        .execute(&mut *tx)
                        .await
                        .unwrap();
                    }
                };
                tokio::time::sleep(Duration::from_millis(rand_below(21))).await;
                if rand_below(10) == 0 {
                    tx.rollback().await.unwrap();
                } else {
                    tx.commit().await.unwrap();
                    committed.fetch_add(1, Ordering::SeqCst);
                }
            }
        })
    });
    for writer in futures_util::future::join_all(writers).await {
        writer.unwrap();
    }
    let committed = committed.load(Ordering::SeqCst);
    support::eventually("every committed event arrives", WITHIN, || async {
        received.lock().unwrap().len() >= committed
    })
    .await;
    support::eventually("the outbox drains", WITHIN, || async {
        outbox.pending(&pool).await.unwrap().0 == 0
    })
    .await;
    let (sent_first, sent_second) = (first.stats().sent(), second.stats().sent());
    first.close(Duration::from_secs(5)).await.unwrap();
    second.close(Duration::from_secs(5)).await.unwrap();
    consumer.shutdown().await.unwrap();

    let numbers: HashMap<String, (String, i64)> = sqlx::query_as::<_, (String, String, i64)>(
        AssertSqlSafe(format!("SELECT event_id, key, seq FROM {seqs}")),
    )
    .fetch_all(&pool)
    .await
    .unwrap()
    .into_iter()
    .map(|(event_id, key, seq)| (event_id, (key, seq)))
    .collect();
    assert_eq!(numbers.len(), committed, "one number per committed event");
    let received = received.lock().unwrap().clone();
    assert_eq!(received.len(), committed, "none twice, none lost");
    let mut last: HashMap<&str, i64> = HashMap::new();
    for event_id in &received {
        let (key, seq) = numbers
            .get(event_id)
            .unwrap_or_else(|| panic!("{event_id} was rolled back yet sent"));
        let previous = last.insert(key, *seq).unwrap_or(0);
        assert_eq!(*seq, previous + 1, "{key}: {seq} after {previous}");
    }
    if numbering == Numbering::InPayload {
        // The consumer's own check, on what it received alone.
        let mut last: HashMap<String, u64> = HashMap::new();
        for (key, n) in in_payload.lock().unwrap().iter() {
            let previous = last.insert(key.clone(), *n).unwrap_or(0);
            assert_eq!(*n, previous + 1, "{key}: {n} after {previous}");
        }
    }
    assert!(
        sent_first > 0 && sent_second > 0,
        "both relays worked: {sent_first} + {sent_second}"
    );
    assert_eq!(sent_first + sent_second, committed as u64);
    support::drop_pg_tables(&pool, &prefix).await;
}

/// SQLite: one writer at a time and one relay; writers interleave all the
/// same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_writers_and_one_relay_keep_each_keys_commit_order() {
    let pool = support::sqlite().await;
    let outbox = Outbox::new("", "test").unwrap();
    outbox.migrate(&pool).await.unwrap();
    sqlx::query(
        "CREATE TABLE seqs (event_id TEXT PRIMARY KEY, key TEXT NOT NULL, \
         seq INTEGER NOT NULL, UNIQUE (key, seq))",
    )
    .execute(&pool)
    .await
    .unwrap();
    let memory: Arc<dyn Transport> = Arc::new(MemoryTransport::new());
    let bus = EventBus::new(memory.clone(), "test");
    bus.declare(&Topology::new().with_event::<Step, _>(["check"]))
        .await
        .unwrap();
    let received = Arc::new(Mutex::new(Vec::<String>::new()));
    let log = received.clone();
    let consumer = bus
        .subscribe(
            SubscribeOptions::new("check").with_concurrency(1),
            handler_fn(move |message: Message<Step>| {
                log.lock().unwrap().push(message.event_id().to_string());
                async { Ok(()) }
            }),
        )
        .await
        .unwrap();
    let relay = Relay::new(&outbox, pool.clone(), memory)
        .with_config(
            RelayConfig::default()
                .with_batch_size(1 + rand_below(8) as usize)
                .with_poll_interval(Duration::from_millis(5)),
        )
        .spawn();
    let writers = (0..3u64).map(|writer| {
        let (pool, outbox) = (pool.clone(), outbox.clone());
        tokio::spawn(async move {
            for i in 0..20 {
                let key = format!("key-{}", rand_below(5));
                let mut tx = pool.begin().await.unwrap();
                let event_id = outbox
                    .enqueue_event_keyed(&mut tx, &key, step(&key, writer * 1000 + i))
                    .await
                    .unwrap();
                sqlx::query(
                    "INSERT INTO seqs (event_id, key, seq) \
                     SELECT ?1, ?2, coalesce(max(seq), 0) + 1 FROM seqs WHERE key = ?2",
                )
                .bind(event_id.to_string())
                .bind(&key)
                .execute(&mut *tx)
                .await
                .unwrap();
                tokio::time::sleep(Duration::from_millis(rand_below(6))).await;
                tx.commit().await.unwrap();
            }
        })
    });
    for writer in futures_util::future::join_all(writers).await {
        writer.unwrap();
    }
    support::eventually("every event arrives", WITHIN, || async {
        received.lock().unwrap().len() >= 60
    })
    .await;
    relay.close(Duration::from_secs(5)).await.unwrap();
    consumer.shutdown().await.unwrap();
    let numbers: HashMap<String, (String, i64)> =
        sqlx::query_as::<_, (String, String, i64)>("SELECT event_id, key, seq FROM seqs")
            .fetch_all(&pool)
            .await
            .unwrap()
            .into_iter()
            .map(|(event_id, key, seq)| (event_id, (key, seq)))
            .collect();
    let received = received.lock().unwrap().clone();
    assert_eq!(received.len(), 60, "none twice, none lost");
    let mut last: HashMap<&str, i64> = HashMap::new();
    for event_id in &received {
        let (key, seq) = &numbers[event_id];
        let previous = last.insert(key, *seq).unwrap_or(0);
        assert_eq!(*seq, previous + 1, "{key}: {seq} after {previous}");
    }
}
