//! The inbox: the mark commits with the effect; duplicates are acked
//! without running; a failed handler leaves neither effect nor mark.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::Duration;

use sqlx::AssertSqlSafe;
use switchboard::outbox::{Inbox, Outbox};
use switchboard::{Error, EventEnvelope, Message};
use tower::ServiceExt;

use super::support::{self, Step, step};

async fn count(pool: &sqlx::PgPool, table: &str) -> i64 {
    sqlx::query_scalar(AssertSqlSafe(format!("SELECT count(*) FROM {table}")))
        .fetch_one(pool)
        .await
        .unwrap()
}

#[tokio::test]
async fn postgres_inbox_applies_each_event_once_and_a_failure_leaves_nothing() {
    let (pool, prefix, outbox, effects) = support::pg_outbox_with_effects().await;

    let fail = Arc::new(AtomicBool::new(true));
    let runs = Arc::new(AtomicU32::new(0));
    let inbox = outbox.inbox(pool.clone());
    let handler = {
        let (fail, runs, effects) = (fail.clone(), runs.clone(), effects.clone());
        inbox.handler(move |tx, message: Message<Step>| {
            let (fail, runs, effects) = (fail.clone(), runs.clone(), effects.clone());
            Box::pin(async move {
                runs.fetch_add(1, Ordering::SeqCst);
                sqlx::query(AssertSqlSafe(format!(
                    "INSERT INTO {effects} (event_id, n) VALUES ($1, $2)"
                )))
                .bind(message.event_id().to_string())
                .bind(message.payload().n as i64)
                .execute(&mut **tx)
                .await
                .map_err(|e| Error::transient(e.to_string()))?;
                if fail.load(Ordering::SeqCst) {
                    return Err(Error::transient("the handler failed after its write"));
                }
                Ok(())
            })
        })
    };
    let message = Message::new(EventEnvelope::new("test", step("k", 7)), "t", "ledger", 1);

    // Fails after writing its effect: effect and mark roll back together.
    let error = handler.clone().oneshot(message.clone()).await.unwrap_err();
    assert!(error.message().contains("failed after its write"));
    assert_eq!(count(&pool, &effects).await, 0);
    assert_eq!(count(&pool, &format!("{prefix}inbox")).await, 0);

    // The redelivery runs it; the next one is a duplicate, acked unrun.
    fail.store(false, Ordering::SeqCst);
    handler.clone().oneshot(message.clone()).await.unwrap();
    handler.clone().oneshot(message.clone()).await.unwrap();
    assert_eq!(runs.load(Ordering::SeqCst), 2);
    assert_eq!(count(&pool, &effects).await, 1);

    // Another group handles the same event on its own.
    let other = Message::new((*message.shared_envelope()).clone(), "t", "audit", 1);
    handler.clone().oneshot(other).await.unwrap();
    assert_eq!(count(&pool, &effects).await, 2);

    // Two deliveries at once: one runs, the other waits on the mark and is
    // then a duplicate.
    let twin = Message::new(EventEnvelope::new("test", step("k", 8)), "t", "ledger", 1);
    let (a, b) = tokio::join!(
        handler.clone().oneshot(twin.clone()),
        handler.clone().oneshot(twin)
    );
    a.unwrap();
    b.unwrap();
    assert_eq!(count(&pool, &effects).await, 3);

    // Retention: young marks stay, old ones go.
    assert_eq!(inbox.cleanup(Duration::from_secs(3600)).await.unwrap(), 0);
    assert_eq!(inbox.cleanup(Duration::ZERO).await.unwrap(), 3);
    assert_eq!(count(&pool, &format!("{prefix}inbox")).await, 0);
    support::drop_pg_tables(&pool, &prefix).await;
}

#[tokio::test]
async fn sqlite_inbox_applies_each_event_once() {
    let pool = support::sqlite().await;
    let outbox = Outbox::new("", "test").unwrap();
    outbox.migrate(&pool).await.unwrap();
    sqlx::query("CREATE TABLE effects (event_id TEXT NOT NULL)")
        .execute(&pool)
        .await
        .unwrap();
    let inbox = Inbox::new(pool.clone(), "").unwrap();
    let handler = inbox.handler(|tx, message: Message<Step>| {
        Box::pin(async move {
            sqlx::query("INSERT INTO effects (event_id) VALUES (?)")
                .bind(message.event_id().to_string())
                .execute(&mut **tx)
                .await
                .map_err(|e| Error::transient(e.to_string()))?;
            Ok(())
        })
    });
    let message = Message::new(EventEnvelope::new("test", step("k", 1)), "t", "g", 1);
    for _ in 0..3 {
        handler.clone().oneshot(message.clone()).await.unwrap();
    }
    let effects: i64 = sqlx::query_scalar("SELECT count(*) FROM effects")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(effects, 1);

    // The mark is claimed in the caller's own transaction too.
    let mut tx = pool.begin().await.unwrap();
    assert!(!inbox.claim(&mut tx, "g", message.event_id()).await.unwrap());
    assert!(
        inbox
            .claim(&mut tx, "other", message.event_id())
            .await
            .unwrap()
    );
    tx.rollback().await.unwrap();
    assert_eq!(inbox.cleanup(Duration::ZERO).await.unwrap(), 1);

    // The periodic cleanup removes marks past the retention by itself.
    let mut tx = pool.begin().await.unwrap();
    assert!(inbox.claim(&mut tx, "g", message.event_id()).await.unwrap());
    tx.commit().await.unwrap();
    let _cleanup = inbox.spawn_cleanup(Duration::from_millis(10), Duration::ZERO);
    support::eventually("the periodic cleanup ran", support::WITHIN, || async {
        let marks: i64 = sqlx::query_scalar("SELECT count(*) FROM inbox")
            .fetch_one(&pool)
            .await
            .unwrap();
        marks == 0
    })
    .await;
}
