//! The batcher: one task per batch subscription that gathers the messages
//! [`BatchSlot`]s hand it into batches, calls the batch handler, and answers
//! each slot with its message's result.

use std::fmt;
use std::future::{Future, poll_fn};
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::FutureExt;
use futures_util::stream::{FuturesUnordered, StreamExt};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tower::Service;

use crate::bus::Message;
use crate::error::Error;

/// One message waiting for its batch, and where its result goes.
pub(super) struct Slot<E> {
    message: Message<E>,
    reply: oneshot::Sender<Result<(), Error>>,
}

/// The innermost service of a batch subscription's per-message stack: it
/// hands the message to the subscription's batcher and resolves to that
/// message's result once its batch has run.
///
/// Everything a single-message handler can be wrapped in wraps a
/// `BatchSlot` the same way (see
/// [`EventBus::subscribe_batch_with`](crate::EventBus::subscribe_batch_with)):
/// a duplicate the dedupe layer recognises never reaches a batch, and the
/// retry layer retries only the message that failed, in a later batch.
pub struct BatchSlot<E> {
    batcher: mpsc::Sender<Slot<E>>,
}

impl<E> Clone for BatchSlot<E> {
    fn clone(&self) -> Self {
        Self {
            batcher: self.batcher.clone(),
        }
    }
}

impl<E> fmt::Debug for BatchSlot<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BatchSlot")
            .field("event", &std::any::type_name::<E>())
            .finish_non_exhaustive()
    }
}

impl<E: Send + Sync + 'static> Service<Message<E>> for BatchSlot<E> {
    type Response = ();
    type Error = Error;
    type Future = Pin<Box<dyn Future<Output = Result<(), Error>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Error>> {
        // The channel has room for every message the consume loop can have
        // out at once; the loop's concurrency is the bound.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, message: Message<E>) -> Self::Future {
        let batcher = self.batcher.clone();
        Box::pin(async move {
            let gone = || Error::closed("batch consumer");
            let (reply, result) = oneshot::channel();
            batcher
                .send(Slot { message, reply })
                .await
                .map_err(|_| gone())?;
            result.await.map_err(|_| gone())?
        })
    }
}

/// How batches are made.
#[derive(Debug, Clone, Copy)]
pub(super) struct Batching {
    pub(super) max_messages: usize,
    pub(super) max_wait: Duration,
    /// Batches in the handler at once.
    pub(super) parallel: usize,
}

/// A slot for the consume loop's stack, and the batcher task behind it,
/// which ends once every slot is gone.
pub(super) fn spawn_batcher<E, H>(batching: Batching, handler: H) -> BatchSlot<E>
where
    E: Send + Sync + 'static,
    H: Service<Vec<Message<E>>, Response = Vec<Result<(), Error>>> + Send + 'static,
    H::Error: Into<Error>,
    H::Future: Send + 'static,
{
    let capacity = batching.max_messages.saturating_mul(batching.parallel);
    let (batcher, slots) = mpsc::channel(capacity.max(1));
    tokio::spawn(run(slots, handler, batching));
    BatchSlot { batcher }
}

type Running = Pin<Box<dyn Future<Output = ()> + Send>>;

async fn run<E, H>(mut slots: mpsc::Receiver<Slot<E>>, mut handler: H, batching: Batching)
where
    E: Send + Sync + 'static,
    H: Service<Vec<Message<E>>, Response = Vec<Result<(), Error>>> + Send + 'static,
    H::Error: Into<Error>,
    H::Future: Send + 'static,
{
    let mut running = FuturesUnordered::<Running>::new();
    let mut batch: Vec<Slot<E>> = Vec::with_capacity(batching.max_messages);
    // When the batch being gathered must go, full or not.
    let mut due: Option<Instant> = None;
    let mut open = true;
    let mut ready = false;
    loop {
        let full = batch.len() >= batching.max_messages;
        let late = due.is_some_and(|due| Instant::now() >= due);
        let go = !batch.is_empty() && (full || late || !open);
        let room = running.len() < batching.parallel;
        if go && room && ready {
            let taken = std::mem::replace(&mut batch, Vec::with_capacity(batching.max_messages));
            running.push(call(&mut handler, taken));
            ready = false;
            due = None;
            continue;
        }
        if !open && batch.is_empty() && running.is_empty() {
            break;
        }
        tokio::select! {
            biased;
            Some(()) = running.next(), if !running.is_empty() => {}
            readiness = poll_fn(|cx| handler.poll_ready(cx).map_err(Into::into)), if go && room && !ready => {
                match readiness {
                    Ok(()) => ready = true,
                    Err(error) => {
                        // The handler is gone for good: every message waiting
                        // fails with its error, and so does every later one.
                        let error: Error = error;
                        tracing::error!(%error, "batch handler failed for good");
                        for slot in batch.drain(..).chain(drain(&mut slots).await) {
                            let _ = slot.reply.send(Err(copy(&error)));
                        }
                        while running.next().await.is_some() {}
                        return;
                    }
                }
            }
            slot = slots.recv(), if open && !full => match slot {
                Some(slot) => {
                    if batch.is_empty() {
                        due = Some(Instant::now() + batching.max_wait);
                    }
                    batch.push(slot);
                }
                None => open = false,
            },
            () = sleep_until(due), if !batch.is_empty() && !late => {}
        }
    }
}

async fn sleep_until(due: Option<Instant>) {
    match due {
        Some(due) => tokio::time::sleep_until(due).await,
        None => std::future::pending().await,
    }
}

/// What is still in the channel, once it is closed.
async fn drain<E>(slots: &mut mpsc::Receiver<Slot<E>>) -> Vec<Slot<E>> {
    slots.close();
    let mut left = Vec::new();
    while let Some(slot) = slots.recv().await {
        left.push(slot);
    }
    left
}

/// Calls the handler with one batch; the future answers every slot.
fn call<E, H>(handler: &mut H, batch: Vec<Slot<E>>) -> Running
where
    E: Send + Sync + 'static,
    H: Service<Vec<Message<E>>, Response = Vec<Result<(), Error>>>,
    H::Error: Into<Error>,
    H::Future: Send + 'static,
{
    let (messages, replies): (Vec<_>, Vec<_>) = batch
        .into_iter()
        .map(|slot| (slot.message, slot.reply))
        .unzip();
    let size = messages.len();
    let called = std::panic::catch_unwind(AssertUnwindSafe(|| handler.call(messages)));
    Box::pin(async move {
        let results = match called {
            Ok(call) => match AssertUnwindSafe(call).catch_unwind().await {
                Ok(Ok(results)) => results,
                Ok(Err(error)) => {
                    let error = error.into();
                    (0..size).map(|_| Err(copy(&error))).collect()
                }
                Err(_) => Vec::new(),
            },
            Err(_) => Vec::new(),
        };
        if results.len() != size {
            tracing::warn!(
                messages = size,
                results = results.len(),
                "the batch handler did not return one result per message; the missing ones failed",
            );
        }
        let mut results = results.into_iter();
        for reply in replies {
            let result = results.next().unwrap_or_else(|| {
                Err(Error::permanent(
                    "the batch handler panicked or returned no result for this message",
                ))
            });
            // The slot's caller may be gone (the consumer was aborted).
            let _ = reply.send(result);
        }
    })
}

/// The same error for each message of a batch that failed as a whole:
/// kind, message, effect and the outcome's fields (the source chain stays
/// with the original).
fn copy(error: &Error) -> Error {
    let mut copy = Error::new(error.kind(), error.message().to_owned()).with_effect(error.effect());
    if let Some(after) = error.requeue_after() {
        copy = copy.with_requeue(after);
    }
    if let Some(after) = error.retry_after() {
        copy = copy.with_retry_after(after);
    }
    if let Some(attempts) = error.attempts() {
        copy = copy.with_attempts(attempts);
    }
    if let Some(letter) = error.dead_letter() {
        copy = copy.with_dead_letter(letter.clone());
    }
    copy
}
