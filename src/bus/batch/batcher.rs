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
use std::sync::Arc;

use tokio::sync::{Notify, mpsc, oneshot};
use tokio::time::Instant;
use tower::Service;

use crate::bus::Message;
use crate::bus::key_run::Admission;
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

/// The batch being gathered: its slots, when it must go, and its number
/// (runs of a key tell batches apart by it).
struct Gathering<E> {
    slots: Vec<Slot<E>>,
    due: Option<Instant>,
    number: u64,
}

impl<E> Gathering<E> {
    fn push(&mut self, slot: Slot<E>, max_wait: Duration) {
        if self.slots.is_empty() {
            self.due = Some(Instant::now() + max_wait);
        }
        self.slots.push(slot);
    }
}

async fn run<E, H>(mut slots: mpsc::Receiver<Slot<E>>, mut handler: H, batching: Batching)
where
    E: Send + Sync + 'static,
    H: Service<Vec<Message<E>>, Response = Vec<Result<(), Error>>> + Send + 'static,
    H::Error: Into<Error>,
    H::Future: Send + 'static,
{
    let mut running = FuturesUnordered::<Running>::new();
    let mut batch = Gathering {
        slots: Vec::with_capacity(batching.max_messages),
        due: None,
        number: 0,
    };
    // Messages of a key's run that may not join a batch yet (see
    // `key_run`), in arrival order, and the wake-up the loop sends when it
    // settles a member of a run itself.
    let mut held: Vec<Slot<E>> = Vec::new();
    let changed = Arc::new(Notify::new());
    let mut open = true;
    let mut ready = false;
    loop {
        let full = batch.slots.len() >= batching.max_messages;
        let late = batch.due.is_some_and(|due| Instant::now() >= due);
        let go = !batch.slots.is_empty() && (full || late || !open);
        let room = running.len() < batching.parallel;
        if go && room && ready {
            let taken =
                std::mem::replace(&mut batch.slots, Vec::with_capacity(batching.max_messages));
            running.push(call(&mut handler, taken));
            ready = false;
            batch.due = None;
            batch.number += 1;
            admit(&mut held, &mut batch, &changed, batching);
            continue;
        }
        if !open && batch.slots.is_empty() && running.is_empty() {
            // What is still held waits for members that can no longer come:
            // the consume loop has gone, and with it every caller.
            break;
        }
        tokio::select! {
            biased;
            Some(()) = running.next(), if !running.is_empty() => {
                admit(&mut held, &mut batch, &changed, batching);
            }
            readiness = poll_fn(|cx| handler.poll_ready(cx).map_err(Into::into)), if go && room && !ready => {
                match readiness {
                    Ok(()) => ready = true,
                    Err(error) => {
                        // The handler is gone for good: every message waiting
                        // fails with its error, and so does every later one.
                        let error: Error = error;
                        tracing::error!(%error, "batch handler failed for good");
                        let waiting = batch.slots.drain(..).chain(held.drain(..));
                        for slot in waiting.chain(drain(&mut slots).await) {
                            let _ = slot.reply.send(Err(copy(&error)));
                        }
                        while running.next().await.is_some() {}
                        return;
                    }
                }
            }
            () = changed.notified(), if !held.is_empty() => {
                admit(&mut held, &mut batch, &changed, batching);
            }
            slot = slots.recv(), if open && !full => match slot {
                Some(slot) if slot.message.place.is_some() => {
                    // Only a member that joins can let another one in: the
                    // held ones are looked at again only then.
                    if offer(slot, &mut held, &mut batch, &changed, batching) && !held.is_empty() {
                        admit(&mut held, &mut batch, &changed, batching);
                    }
                }
                Some(slot) => batch.push(slot, batching.max_wait),
                None => open = false,
            },
            () = sleep_until(batch.due), if !batch.slots.is_empty() && !late => {}
        }
    }
}

/// A member of a run that has just arrived: into the batch being gathered,
/// answered held back, or held. Whether it joined the batch.
fn offer<E>(
    slot: Slot<E>,
    held: &mut Vec<Slot<E>>,
    batch: &mut Gathering<E>,
    changed: &Arc<Notify>,
    batching: Batching,
) -> bool {
    let place = slot.message.place.as_ref().expect("a member of a run");
    let room = batch.slots.len() < batching.max_messages;
    match place.run.admit(place.index, batch.number, room, changed) {
        Admission::Join => {
            batch.push(slot, batching.max_wait);
            true
        }
        Admission::HoldBack => {
            let _ = slot.reply.send(Err(Error::held_back()));
            false
        }
        Admission::Wait => {
            held.push(slot);
            false
        }
    }
}

/// Moves the held members of runs that may go into the batch being
/// gathered, in their order, and answers those held back.
fn admit<E>(
    held: &mut Vec<Slot<E>>,
    batch: &mut Gathering<E>,
    changed: &Arc<Notify>,
    batching: Batching,
) {
    // A member admitted may let a later one of its run in that arrived
    // before it: go round until nothing moves.
    let mut moved = true;
    while moved && !held.is_empty() {
        moved = false;
        let mut index = 0;
        while index < held.len() {
            let slot = &held[index];
            if slot.reply.is_closed() {
                // Its stack gave up on it (a timeout): it is settled
                // already, and must not run after its key moved on.
                held.remove(index);
                continue;
            }
            let place = slot
                .message
                .place
                .as_ref()
                .expect("held slots have a place");
            let room = batch.slots.len() < batching.max_messages;
            match place.run.admit(place.index, batch.number, room, changed) {
                Admission::Wait => index += 1,
                Admission::Join => {
                    let slot = held.remove(index);
                    batch.push(slot, batching.max_wait);
                    moved = true;
                }
                Admission::HoldBack => {
                    let slot = held.remove(index);
                    let _ = slot.reply.send(Err(Error::held_back()));
                }
            }
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
        .map(|slot| {
            let place = slot.message.place.clone();
            (slot.message, (slot.reply, place))
        })
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
        // In the batch's order, which is each run's: a member's answer
        // depends on the earlier members of its run.
        for (reply, place) in replies {
            let result = results.next().unwrap_or_else(|| {
                Err(Error::permanent(
                    "the batch handler panicked or returned no result for this message",
                ))
            });
            match place {
                // The slot's caller may be gone (the consumer was aborted).
                None => drop(reply.send(result)),
                Some(place) => place.run.answer(place.index, |held| {
                    if held {
                        let _ = reply.send(Err(Error::held_back()));
                        return false;
                    }
                    let ok = result.is_ok();
                    // Not delivered: its stack gave up on it, so for its key
                    // it failed.
                    reply.send(result).is_ok() && ok
                }),
            }
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
