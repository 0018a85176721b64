//! An event is sent if and only if its transaction committed.

use std::net::ToSocketAddrs;
use std::sync::Arc;
use std::time::Duration;

use sqlx::{Connection, PgConnection};
use switchboard::outbox::{Outbox, Relay, RelayConfig};
use switchboard::testing::proxy::FaultProxy;
use switchboard::{MemoryTransport, Transport};
use tokio::sync::mpsc;

use super::support::{self, Step, WITHIN, step};

fn fast() -> RelayConfig {
    RelayConfig::default().with_poll_interval(Duration::from_millis(10))
}

async fn consumer(
    transport: Arc<dyn Transport>,
) -> (switchboard::ConsumerHandle, mpsc::UnboundedReceiver<u64>) {
    support::consumer(transport, |step: &Step| step.n).await
}

use support::next;

#[tokio::test]
async fn postgres_rolled_back_or_killed_before_commit_is_never_sent() {
    let pool = support::pg().await;
    let prefix = support::prefix();
    let outbox = Outbox::new(&prefix, "test").unwrap();
    outbox.migrate(&pool).await.unwrap();
    let transport: Arc<dyn Transport> = Arc::new(MemoryTransport::new());
    let (consumer, mut seen) = consumer(transport.clone()).await;

    // 1: rolled back.
    let mut tx = pool.begin().await.unwrap();
    outbox.enqueue_event(&mut tx, step("k", 1)).await.unwrap();
    tx.rollback().await.unwrap();

    // 2: the application dies before COMMIT: its connection goes (cut at a
    // proxy, as a killed process's socket would), the server rolls back.
    let addr = "127.0.0.1:5432".to_socket_addrs().unwrap().next().unwrap();
    let proxy = FaultProxy::start(addr).await.unwrap();
    let url = format!("postgres://postgres@{}/test", proxy.addr());
    let mut conn = PgConnection::connect(&url).await.unwrap();
    let mut tx = conn.begin().await.unwrap();
    outbox.enqueue_event(&mut tx, step("k", 2)).await.unwrap();
    proxy.cut();
    proxy.all_closed().await;
    assert!(
        tx.commit().await.is_err(),
        "the commit cannot reach the server"
    );
    drop(conn);

    // 3: committed. Same key (the topic): were 1 or 2 sendable, they would
    // arrive before it.
    let mut tx = pool.begin().await.unwrap();
    outbox.enqueue_event(&mut tx, step("k", 3)).await.unwrap();
    tx.commit().await.unwrap();

    let relay = Relay::new(&outbox, pool.clone(), transport)
        .with_config(fast())
        .spawn();
    assert_eq!(next(&mut seen).await, 3);
    support::eventually("the outbox drains", WITHIN, || async {
        outbox.pending(&pool).await.unwrap().0 == 0
    })
    .await;
    relay.close(Duration::from_secs(5)).await.unwrap();
    consumer.shutdown().await.unwrap();
    assert!(seen.try_recv().is_err(), "nothing but 3 was sent");
    support::drop_pg_tables(&pool, &prefix).await;
}

#[tokio::test]
async fn sqlite_rolled_back_or_dropped_is_never_sent() {
    let pool = support::sqlite().await;
    let outbox = Outbox::new("shop_", "test").unwrap();
    outbox.migrate(&pool).await.unwrap();
    outbox.migrate(&pool).await.unwrap(); // idempotent
    let transport: Arc<dyn Transport> = Arc::new(MemoryTransport::new());
    let (consumer, mut seen) = consumer(transport.clone()).await;

    let mut tx = pool.begin().await.unwrap();
    outbox.enqueue_event(&mut tx, step("k", 1)).await.unwrap();
    tx.rollback().await.unwrap();
    {
        let mut tx = pool.begin().await.unwrap();
        outbox.enqueue_event(&mut tx, step("k", 2)).await.unwrap();
        // Dropped without commit.
    }
    let mut tx = pool.begin().await.unwrap();
    outbox.enqueue_event(&mut tx, step("k", 3)).await.unwrap();
    tx.commit().await.unwrap();

    let relay = Relay::new(&outbox, pool.clone(), transport)
        .with_config(fast())
        .spawn();
    assert_eq!(next(&mut seen).await, 3);
    support::eventually("the outbox drains", WITHIN, || async {
        outbox.pending(&pool).await.unwrap().0 == 0
    })
    .await;
    relay.close(Duration::from_secs(5)).await.unwrap();
    consumer.shutdown().await.unwrap();
    assert!(seen.try_recv().is_err(), "nothing but 3 was sent");
}

#[tokio::test]
async fn migrate_is_idempotent_and_concurrent_on_postgres() {
    let pool = support::pg().await;
    let prefix = support::prefix();
    let outbox = Outbox::<sqlx::Postgres>::new(&prefix, "test").unwrap();
    let runs = (0..4).map(|_| outbox.migrate(&pool));
    for result in futures_util::future::join_all(runs).await {
        result.unwrap();
    }
    outbox.migrate(&pool).await.unwrap();
    assert_eq!(outbox.pending(&pool).await.unwrap(), (0, None));
    support::drop_pg_tables(&pool, &prefix).await;
}

#[tokio::test]
async fn enqueue_without_migrate_is_a_config_error() {
    let pool = support::pg().await;
    let outbox = Outbox::new(&support::prefix(), "test").unwrap();
    let mut tx = pool.begin().await.unwrap();
    let error = outbox
        .enqueue_event(&mut tx, step("k", 1))
        .await
        .unwrap_err();
    assert_eq!(error.kind(), switchboard::ErrorKind::Config, "{error}");
    assert!(!error.is_retryable());
}
