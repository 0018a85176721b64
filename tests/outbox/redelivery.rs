//! A relay killed between the transport's accept and the row's removal:
//! the next relay sends the row again and the inbox absorbs the duplicate.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use sqlx::AssertSqlSafe;
use switchboard::outbox::{Relay, RelayConfig};
use switchboard::{
    Error, EventBus, MemoryTransport, Message, SubscribeOptions, Topology, Transport, handler_fn,
};
use tower::ServiceExt;

use super::support::{self, Faulty, Step, WITHIN, step};

#[tokio::test]
async fn a_relay_killed_after_the_accept_sends_again_and_the_inbox_applies_once() {
    let (pool, prefix, outbox, effects) = support::pg_outbox_with_effects().await;

    let memory: Arc<dyn Transport> = Arc::new(MemoryTransport::new());
    let bus = EventBus::new(memory.clone(), "test");
    bus.declare(&Topology::new().with_event::<Step, _>(["ledger"]))
        .await
        .unwrap();
    let inbox = outbox.inbox(pool.clone());
    let applied = {
        let effects = effects.clone();
        inbox.handler(move |tx, message: Message<Step>| {
            let effects = effects.clone();
            Box::pin(async move {
                sqlx::query(AssertSqlSafe(format!(
                    "INSERT INTO {effects} (event_id, n) VALUES ($1, $2)"
                )))
                .bind(message.event_id().to_string())
                .bind(message.payload().n as i64)
                .execute(&mut **tx)
                .await
                .map_err(|e| Error::transient(e.to_string()))?;
                Ok(())
            })
        })
    };
    let deliveries = Arc::new(AtomicU32::new(0));
    let counted = deliveries.clone();
    let consumer = bus
        .subscribe(
            SubscribeOptions::new("ledger"),
            handler_fn(move |message: Message<Step>| {
                counted.fetch_add(1, Ordering::SeqCst);
                applied.clone().oneshot(message)
            }),
        )
        .await
        .unwrap();

    let mut tx = pool.begin().await.unwrap();
    let event_id = outbox.enqueue_event(&mut tx, step("k", 1)).await.unwrap();
    tx.commit().await.unwrap();

    // The first relay's transport accepts, then the relay never gets to
    // delete: it is dropped there (aborted past its close deadline).
    let faulty = Arc::new(Faulty::over(memory.clone()));
    faulty.hang_after_accept.store(true, Ordering::SeqCst);
    let config = RelayConfig::default().with_poll_interval(Duration::from_millis(10));
    let first = Relay::new(&outbox, pool.clone(), faulty.clone())
        .with_config(config.clone())
        .spawn();
    faulty.accepted_then_hung.notified().await;
    assert!(first.close(Duration::from_millis(20)).await.is_err());
    assert_eq!(outbox.pending(&pool).await.unwrap().0, 1, "the row stayed");

    let second = Relay::new(&outbox, pool.clone(), memory)
        .with_config(config)
        .spawn();
    support::eventually("delivered twice", WITHIN, || async {
        deliveries.load(Ordering::SeqCst) == 2
    })
    .await;
    support::eventually("the second relay removed the row", WITHIN, || async {
        outbox.pending(&pool).await.unwrap().0 == 0
    })
    .await;
    second.close(Duration::from_secs(5)).await.unwrap();
    consumer.shutdown().await.unwrap();

    let rows: Vec<(String, i64)> =
        sqlx::query_as(AssertSqlSafe(format!("SELECT event_id, n FROM {effects}")))
            .fetch_all(&pool)
            .await
            .unwrap();
    assert_eq!(rows, [(event_id.to_string(), 1)], "the effect applied once");
    support::drop_pg_tables(&pool, &prefix).await;
}
