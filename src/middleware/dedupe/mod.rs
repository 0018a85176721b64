//! Idempotent consumers: each event id is handled once, however often it is
//! delivered.
//!
//! Every transport here delivers at least once: a publisher that lost a
//! confirm sends again, a broker redelivers what a dead consumer held, an
//! operator redrives the dead-letter queue. strategy §6.2 asks consumers to keep
//! a record of handled events and skip duplicates. [`Dedupe`] keeps that
//! record in a [`DedupeStore`], keyed by the consumer group and the
//! envelope's `event_id` (two groups handling one event are not duplicates
//! of each other):
//!
//! * no mark: the handler runs under an *in-progress* mark holding a fresh
//!   fencing token; success turns it into a *done* mark, failure releases it
//!   (compare-and-delete on the token), so a redelivery or a redrive of a
//!   dead-lettered message runs the handler again;
//! * a done mark: the delivery is a duplicate of a handled event — `Ok`
//!   without running the handler, and the consume loop acks it;
//! * an in-progress mark: another delivery of the same event is being handled
//!   right now — an error with [`requeue_after`](crate::Error::requeue_after),
//!   so the loop nacks it and it comes back once the first one has finished
//!   (and is then acked as a duplicate, or run if the first one failed).
//!
//! The in-progress mark has a TTL, so a consumer that dies mid-handler does
//! not block the event forever. While the handler runs, the layer extends
//! the mark ([`DedupeStore::extend`]) every third of that TTL, so a handler
//! slower than the TTL keeps its mark and a duplicate arriving meanwhile is
//! still requeued rather than run beside it. The renewal is a timer inside
//! the call's future, polled with the handler: no task per message. A
//! renewal that fails (the store is unreachable) is logged and tried again at
//! the next tick; one that finds the mark no longer this delivery's (it
//! expired after renewals failed, or was evicted) is logged and stops, and
//! the handler runs on, as at-least-once allows. The TTL therefore bounds how
//! long a dead consumer's mark holds the event back, and must still outlast
//! a few failed renewals; [`Resilience::consumer`](crate::middleware::Resilience::consumer)
//! derives it from the retry and timeout settings. The fencing token makes
//! sure a holder whose mark expired and was taken over cannot extend,
//! complete or release the new holder's mark.
//!
//! The in-process [`MemoryDedupeStore`] never refuses a new mark: when full it
//! evicts the marks written longest ago, even before their TTL, and counts
//! each such eviction ([`MemoryDedupeStore::evictions`] and the
//! `switchboard_dedupe_evictions_total` metric). A duplicate of an evicted
//! event runs again, so its capacity must cover every event handled within
//! the redelivery window.
//!
//! A handler that succeeded but whose done mark could not be written (the
//! store failed, or the mark had expired) is still acked; the event may then
//! run again on a later redelivery, which is what at-least-once allows.
//!
//! ```
//! use std::sync::atomic::{AtomicU32, Ordering};
//! use std::sync::Arc;
//! use serde::{Deserialize, Serialize};
//! use switchboard::middleware::dedupe::DedupeLayer;
//! use switchboard::{handler_fn, Error, Event, EventEnvelope, Message};
//! use tower::{Layer, ServiceExt};
//!
//! #[derive(Clone, Serialize, Deserialize)]
//! struct Credited { amount: u64 }
//! impl Event for Credited {
//!     const TYPE: &'static str = "account.credited";
//!     const VERSION: &'static str = "1.0";
//! }
//!
//! # tokio::runtime::Runtime::new().unwrap().block_on(async {
//! let applied = Arc::new(AtomicU32::new(0));
//! let counter = applied.clone();
//! let handler = DedupeLayer::in_memory().layer(handler_fn(move |_: Message<Credited>| {
//!     counter.fetch_add(1, Ordering::SeqCst);
//!     async { Ok(()) }
//! }));
//!
//! let envelope = EventEnvelope::new("bank", Credited { amount: 5 });
//! let delivery = Message::new(envelope, "account.credited", "ledger", 1);
//! handler.clone().oneshot(delivery.clone()).await?;
//! handler.oneshot(delivery).await?; // delivered again: skipped
//! assert_eq!(applied.load(Ordering::SeqCst), 1);
//! # Ok::<(), Error>(())
//! # }).unwrap();
//! ```

mod future;
mod layer;
mod memory;
#[cfg(any(feature = "redis-streams", feature = "redis-pubsub"))]
mod redis;
mod store;

use std::fmt;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::time::MissedTickBehavior;
use tower::Service;
use uuid::Uuid;

pub use self::future::ResponseFuture;
pub use self::layer::DedupeLayer;
pub use self::memory::MemoryDedupeStore;

/// The in-process store's former name, from when it was a moka cache.
#[deprecated(
    since = "0.1.0",
    note = "renamed `MemoryDedupeStore`: it is no longer a moka cache"
)]
pub type MokaDedupeStore = MemoryDedupeStore;
#[cfg(any(feature = "redis-streams", feature = "redis-pubsub"))]
pub use self::redis::RedisDedupeStore;
pub use store::{DedupeStore, Mark};

use crate::bus::Message;
use crate::error::{Error, ErrorKind};

/// How long marks live and how soon an in-progress duplicate comes back.
///
/// ```
/// use std::time::Duration;
/// use switchboard::middleware::dedupe::DedupeTtls;
///
/// let ttls = DedupeTtls::default().with_done(Duration::from_secs(3600));
/// assert_eq!(ttls.done, Duration::from_secs(3600));
/// assert_eq!(ttls.requeue, Duration::from_secs(1));
/// ```
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DedupeTtls {
    /// How long an in-progress mark lives if its holder never finishes.
    /// Must exceed the longest the handler stack inside can take.
    pub in_progress: Duration,
    /// How long a done mark is kept: the window in which duplicates are
    /// recognised.
    pub done: Duration,
    /// The requeue delay for a delivery that finds its event in progress.
    pub requeue: Duration,
}

impl Default for DedupeTtls {
    /// Five minutes in progress, a day done, one second before a duplicate
    /// in progress comes back.
    fn default() -> Self {
        Self {
            in_progress: Duration::from_secs(5 * 60),
            done: Duration::from_secs(24 * 60 * 60),
            requeue: Duration::from_secs(1),
        }
    }
}

impl DedupeTtls {
    /// Sets [`in_progress`](Self::in_progress).
    pub fn with_in_progress(mut self, ttl: Duration) -> Self {
        self.in_progress = ttl;
        self
    }

    /// Sets [`done`](Self::done).
    pub fn with_done(mut self, ttl: Duration) -> Self {
        self.done = ttl;
        self
    }

    /// Sets [`requeue`](Self::requeue).
    pub fn with_requeue(mut self, delay: Duration) -> Self {
        self.requeue = delay;
        self
    }
}

/// A handler that runs each event id once; see the [module docs](self).
pub struct Dedupe<S> {
    inner: S,
    store: Arc<dyn DedupeStore>,
    ttls: DedupeTtls,
}

impl<S> Dedupe<S> {
    /// `inner`, deduplicated through `store`.
    pub fn new(inner: S, store: Arc<dyn DedupeStore>, ttls: DedupeTtls) -> Self {
        Self { inner, store, ttls }
    }

    /// The TTLs in use.
    pub fn ttls(&self) -> DedupeTtls {
        self.ttls
    }

    /// The store of marks.
    pub fn store(&self) -> &Arc<dyn DedupeStore> {
        &self.store
    }

    /// The wrapped service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The wrapped service, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// The wrapped service, unwrapped.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

/// The key of a message's mark: its group and event id (`group:` and the
/// hyphenated id), written without the formatting machinery.
pub(crate) fn key_of<E>(message: &Message<E>) -> String {
    let group = message.group();
    let mut id = Uuid::encode_buffer();
    let id = message.event_id().hyphenated().encode_lower(&mut id);
    let mut key = String::with_capacity(group.len() + 1 + id.len());
    key.push_str(group);
    key.push(':');
    key.push_str(id);
    key
}

/// A delivery's fencing token: 32 hex characters no other delivery gets.
///
/// A random base drawn once per process plus a count: the count keeps the
/// tokens of one process apart, the base those of replicas sharing a store.
/// A fresh random UUID per delivery did the same at the price of a system
/// call (the random source), an allocation and formatting on every first
/// delivery.
#[derive(Clone, Copy)]
struct Token([u8; 32]);

impl Token {
    fn next() -> Self {
        static BASE: OnceLock<u128> = OnceLock::new();
        static ISSUED: AtomicU64 = AtomicU64::new(0);
        let base = *BASE.get_or_init(|| Uuid::new_v4().as_u128());
        let issued = ISSUED.fetch_add(1, Ordering::Relaxed);
        let mut text = [0; 32];
        Uuid::from_u128(base.wrapping_add(u128::from(issued)))
            .simple()
            .encode_lower(&mut text);
        Self(text)
    }

    fn as_str(&self) -> &str {
        std::str::from_utf8(&self.0).expect("hex digits are ASCII")
    }
}

impl<S, E> Service<Message<E>> for Dedupe<S>
where
    S: Service<Message<E>, Response = ()> + Clone + Send + 'static,
    S::Error: Into<Error>,
    S::Future: Send,
    E: Send + Sync + 'static,
{
    type Response = ();
    type Error = Error;
    type Future = ResponseFuture;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, message: Message<E>) -> Self::Future {
        // The ready service handles this message, after the store answers.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let (store, ttls) = (self.store.clone(), self.ttls);
        ResponseFuture::new(async move {
            let event_id = message.event_id();
            let key = key_of(&message);
            let (topic, group) = (message.shared_topic(), message.shared_group());
            let token = Token::next();
            let mark = store
                .try_begin(&key, token.as_str(), ttls.in_progress)
                .await
                .map_err(|error| {
                    // Not the message's fault: try it again later.
                    Error::new(error.kind(), format!("dedupe store: {}", error.message()))
                        .with_source(error)
                        .with_requeue(ttls.requeue)
                })?;
            match mark {
                Mark::Acquired => {}
                Mark::Done => {
                    crate::observe::metrics::dedupe_hit(topic, group, "done");
                    tracing::debug!(%event_id, "duplicate of a handled event; skipped");
                    return Ok(());
                }
                Mark::InProgress => {
                    crate::observe::metrics::dedupe_hit(topic, group, "in_progress");
                    tracing::debug!(%event_id, "the same event is being handled; requeued");
                    return Err(Error::new(
                        ErrorKind::Unavailable,
                        format!("event {event_id} is being handled by another delivery"),
                    )
                    .with_requeue(ttls.requeue));
                }
            }
            let mut held = HeldMark {
                store,
                key,
                token,
                held: true,
            };
            let result = held
                .renewed_while(inner.call(message), ttls.in_progress)
                .await
                .map_err(Into::into);
            match &result {
                Ok(()) => held.complete(ttls.done).await,
                Err(_) => held.release().await,
            }
            result
        })
    }
}

/// How often a held mark is extended: three times per in-progress TTL, so
/// two renewals in a row can fail or be late before the mark runs out.
fn renewal_period(in_progress: Duration) -> Duration {
    (in_progress / 3).max(Duration::from_millis(1))
}

/// An in-progress mark this delivery holds. Dropped while still held (the
/// handler panicked, or the consumer dropped the call), it is released in
/// the background so a redelivery does not wait for the TTL.
struct HeldMark {
    store: Arc<dyn DedupeStore>,
    key: String,
    token: Token,
    held: bool,
}

impl HeldMark {
    /// Runs `handler` to its end, extending the mark to `ttl` from now every
    /// third of `ttl` meanwhile. The renewal runs inside this future, beside
    /// the handler: one timer, no task of its own.
    async fn renewed_while<F: Future>(&self, handler: F, ttl: Duration) -> F::Output {
        let mut handler = std::pin::pin!(handler);
        let period = renewal_period(ttl);
        let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
        ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut renewal = None;
        // Whether the mark is still this delivery's: once it is not, there is
        // nothing left to extend.
        let mut owned = true;
        loop {
            tokio::select! {
                biased;
                output = &mut handler => return output,
                extended = async { renewal.as_mut().expect("guarded by is_some").await },
                    if renewal.is_some() =>
                {
                    renewal = None;
                    owned = self.renewed(extended);
                }
                _ = ticks.tick(), if owned && renewal.is_none() => {
                    renewal = Some(self.store.extend(&self.key, self.token.as_str(), ttl));
                }
            }
        }
    }

    /// Logs what a renewal found; `false` when the mark is no longer held.
    fn renewed(&self, extended: Result<bool, Error>) -> bool {
        match extended {
            Ok(true) => true,
            Ok(false) => {
                tracing::warn!(
                    key = %self.key,
                    "the in-progress mark was lost while the handler runs (it expired \
                     or was evicted); a duplicate may be handled at the same time",
                );
                false
            }
            Err(error) => {
                tracing::warn!(
                    key = %self.key,
                    %error,
                    "cannot extend the in-progress mark; trying again at the next renewal",
                );
                true
            }
        }
    }

    async fn complete(&mut self, ttl: Duration) {
        self.held = false;
        match self
            .store
            .complete(&self.key, self.token.as_str(), ttl)
            .await
        {
            Ok(true) => {}
            Ok(false) => tracing::warn!(
                key = %self.key,
                "the in-progress mark was lost before the handler finished; \
                 the event may be handled again",
            ),
            Err(error) => tracing::warn!(
                key = %self.key,
                %error,
                "cannot mark the event done; a redelivery would handle it again",
            ),
        }
    }

    async fn release(&mut self) {
        self.held = false;
        if let Err(error) = self.store.release(&self.key, self.token.as_str()).await {
            tracing::warn!(
                key = %self.key,
                %error,
                "cannot release the in-progress mark; a redelivery waits for its TTL",
            );
        }
    }
}

impl Drop for HeldMark {
    fn drop(&mut self) {
        if !self.held {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let store = self.store.clone();
        let (key, token) = (std::mem::take(&mut self.key), self.token);
        runtime.spawn(async move {
            let _ = store.release(&key, token.as_str()).await;
        });
    }
}

impl<S: Clone> Clone for Dedupe<S> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            store: self.store.clone(),
            ttls: self.ttls,
        }
    }
}

impl<S: fmt::Debug> fmt::Debug for Dedupe<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Dedupe")
            .field("inner", &self.inner)
            .field("ttls", &self.ttls)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests;
