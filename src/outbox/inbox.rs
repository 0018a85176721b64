//! The inbox: a consumer's record of handled events, written in the same
//! transaction as the handler's effect.

use std::fmt;
use std::marker::PhantomData;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::future::BoxFuture;
use tokio::task::JoinHandle;
use tower::Service;
use uuid::Uuid;

use super::OutboxDatabase;
use super::error::from_sqlx;
use super::schema::Tables;
use crate::bus::Message;
use crate::error::Error;

/// How soon a delivery comes back when the inbox's own database step failed
/// (not the handler): the message is not at fault, so it is requeued
/// rather than dead-lettered.
const REQUEUE_ON_DATABASE_ERROR: Duration = Duration::from_secs(1);

/// Marks of handled events, keyed by `(consumer group, event_id)`, in the
/// table `<prefix>inbox`; see [the module docs](crate::outbox#the-inbox).
pub struct Inbox<DB: OutboxDatabase> {
    pool: sqlx::Pool<DB>,
    tables: Arc<Tables>,
}

impl<DB: OutboxDatabase> Clone for Inbox<DB> {
    fn clone(&self) -> Self {
        Self {
            pool: self.pool.clone(),
            tables: self.tables.clone(),
        }
    }
}

impl<DB: OutboxDatabase> Inbox<DB> {
    /// The inbox in the tables under `prefix` (those of
    /// [`Outbox::new`](super::Outbox::new) with the same prefix; create them
    /// with [`Outbox::migrate`](super::Outbox::migrate)).
    pub fn new(pool: sqlx::Pool<DB>, prefix: &str) -> Result<Self, Error> {
        Ok(Self {
            pool,
            tables: Arc::new(Tables::new(prefix)?),
        })
    }

    /// Records that `group` handles `event_id`, inside `tx`; `true` the first
    /// time, `false` when the mark is there (a duplicate: skip the effect).
    ///
    /// The mark commits or rolls back with `tx`. On PostgreSQL a second
    /// transaction claiming the same mark meanwhile waits until the first
    /// ends, then gets `false` (it committed) or the mark (it rolled back).
    pub async fn claim(
        &self,
        tx: &mut sqlx::Transaction<'_, DB>,
        group: &str,
        event_id: Uuid,
    ) -> Result<bool, Error> {
        DB::inbox_claim(&mut **tx, &self.tables, group, &event_id.to_string()).await
    }

    /// A handler for [`EventBus::subscribe`](crate::EventBus::subscribe):
    /// for each message it begins a transaction, claims the message's
    /// `(group, event_id)`, runs `f` with the transaction when the claim is
    /// new and commits. A duplicate is answered `Ok` (acked) without
    /// running `f`; an error from `f` rolls back effect and mark alike, so a
    /// redelivery runs it again.
    ///
    /// `f` returns a boxed future that borrows the transaction:
    /// `|tx, message| Box::pin(async move { … })`.
    pub fn handler<E, F>(&self, f: F) -> InboxHandler<DB, E>
    where
        E: Send + Sync + 'static,
        F: for<'t> Fn(
                &'t mut sqlx::Transaction<'static, DB>,
                Message<E>,
            ) -> BoxFuture<'t, Result<(), Error>>
            + Send
            + Sync
            + 'static,
    {
        InboxHandler {
            inbox: self.clone(),
            f: Arc::new(f),
            _event: PhantomData,
        }
    }

    /// Deletes marks older than `older_than`; returns how many went. A
    /// duplicate arriving after its mark went runs again, so keep marks
    /// longer than any redelivery can take (the broker's retention, the
    /// dead-letter queue's redrive window).
    pub async fn cleanup(&self, older_than: Duration) -> Result<u64, Error> {
        let mut conn = self
            .pool
            .acquire()
            .await
            .map_err(|e| from_sqlx("inbox cleanup", e))?;
        DB::inbox_cleanup(&mut conn, &self.tables, older_than).await
    }

    /// Runs [`cleanup`](Self::cleanup) every `every` in a task, until the
    /// returned handle is dropped. Failures are logged and tried again at
    /// the next tick.
    pub fn spawn_cleanup(&self, every: Duration, older_than: Duration) -> CleanupTask {
        let inbox = self.clone();
        let task = tokio::spawn(async move {
            let mut ticks = tokio::time::interval(every.max(Duration::from_millis(1)));
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                ticks.tick().await;
                match inbox.cleanup(older_than).await {
                    Ok(removed) => tracing::debug!(removed, "inbox cleanup"),
                    Err(error) => tracing::warn!(%error, "inbox cleanup failed"),
                }
            }
        });
        CleanupTask { task }
    }
}

/// The periodic inbox cleanup of [`Inbox::spawn_cleanup`]; dropping it
/// stops the task.
#[derive(Debug)]
pub struct CleanupTask {
    task: JoinHandle<()>,
}

impl Drop for CleanupTask {
    fn drop(&mut self) {
        self.task.abort();
    }
}

type InboxFn<DB, E> = dyn for<'t> Fn(
        &'t mut sqlx::Transaction<'static, DB>,
        Message<E>,
    ) -> BoxFuture<'t, Result<(), Error>>
    + Send
    + Sync;

/// The handler [`Inbox::handler`] makes: a tower `Service<Message<E>>`.
pub struct InboxHandler<DB: OutboxDatabase, E> {
    inbox: Inbox<DB>,
    f: Arc<InboxFn<DB, E>>,
    _event: PhantomData<fn(Message<E>)>,
}

impl<DB: OutboxDatabase, E> Clone for InboxHandler<DB, E> {
    fn clone(&self) -> Self {
        Self {
            inbox: self.inbox.clone(),
            f: self.f.clone(),
            _event: PhantomData,
        }
    }
}

/// The inbox's own database step failed: requeue, the message is not at
/// fault.
fn database_error(error: Error) -> Error {
    if error.is_retryable() {
        error.with_requeue(REQUEUE_ON_DATABASE_ERROR)
    } else {
        error
    }
}

impl<DB: OutboxDatabase, E: Send + Sync + 'static> Service<Message<E>> for InboxHandler<DB, E> {
    type Response = ();
    type Error = Error;
    type Future = BoxFuture<'static, Result<(), Error>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, message: Message<E>) -> Self::Future {
        let (inbox, f) = (self.inbox.clone(), self.f.clone());
        Box::pin(async move {
            let mut tx = inbox
                .pool
                .begin()
                .await
                .map_err(|e| database_error(from_sqlx("inbox begin", e)))?;
            let fresh = inbox
                .claim(&mut tx, message.group(), message.event_id())
                .await
                .map_err(database_error)?;
            if !fresh {
                crate::observe::metrics::dedupe_hit(
                    message.shared_topic(),
                    message.shared_group(),
                    "done",
                );
                tracing::debug!(event_id = %message.event_id(), "inbox: duplicate; skipped");
                // Nothing was written: ending it either way is the same.
                let _ = tx.rollback().await;
                return Ok(());
            }
            // An error drops `tx`, which rolls back the effect and the mark.
            f(&mut tx, message).await?;
            tx.commit()
                .await
                .map_err(|e| database_error(from_sqlx("inbox commit", e)))
        })
    }
}

impl<DB: OutboxDatabase> fmt::Debug for Inbox<DB> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Inbox")
            .field("table", &self.tables.inbox)
            .finish_non_exhaustive()
    }
}

impl<DB: OutboxDatabase, E> fmt::Debug for InboxHandler<DB, E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("InboxHandler")
            .field("inbox", &self.inbox)
            .finish_non_exhaustive()
    }
}
