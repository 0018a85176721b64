//! Batch consumers: a handler that takes many messages at once
//! ([`EventBus::subscribe_batch`]) and answers one result per message.
//! How batches are made and settled is on `subscribe_batch`.

use std::time::Duration;

use tower::Service;

use super::{ConsumerHandle, EventBus, Message};
use crate::envelope::Event;
use crate::error::{Error, ErrorKind};
use crate::transport::SubscribeOptions;

mod batcher;
mod handler;

pub use batcher::BatchSlot;
pub use handler::{BatchFn, batch_fn};

use batcher::{Batching, spawn_batcher};

impl EventBus {
    /// Subscribes `handler` to events of type `E` in batches: it gets up to
    /// `max_messages` messages at once — fewer once `max_wait` has passed
    /// since the first of them — and returns one result per message, in the
    /// same order. Each message is settled by its own result, as a single
    /// handler's would be.
    ///
    /// [`SubscribeOptions::concurrency`] is the number of batches in the
    /// handler at once; the prefetch must hold a whole batch. Refused with
    /// [`ErrorKind::Rejected`] when `max_messages` is 0 or more than the
    /// prefetch.
    ///
    /// # How a batch is made, and settled
    ///
    /// A batch subscription is the ordinary consume loop with a
    /// [`BatchSlot`] as its innermost service: each message goes through its
    /// own per-message stack (the same layers as a single-message handler:
    /// dedupe, dead letters, breaker, retry, timeout) down to the slot, which
    /// hands it to the subscription's batcher — one task per subscription. The
    /// batcher calls the batch handler with up to `max_messages` messages, or
    /// with what it has once `max_wait` has passed since the first of them, and
    /// answers each slot with its message's own result. So every message is
    /// settled by its own outcome ([`Outcome::of`](crate::Outcome::of)):
    ///
    /// * a partial failure never runs the successes again — they are acked;
    ///   a retry layer in the stack retries only the messages that failed, in
    ///   a later batch, and a rejection dead-letters only its message;
    /// * a duplicate a dedupe layer recognises is acked before it reaches a
    ///   batch;
    /// * the handler failing as a whole (its `Err`, or a panic) is each
    ///   message's failure.
    ///
    /// With an [`OrderingKey`](crate::OrderingKey) a batch may hold several
    /// messages of a key, in their publish order within the `Vec`: the
    /// subscription lets a run of up to `max_messages` waiting messages of a
    /// key out at once, and the batcher puts a key's messages into a batch
    /// only in order, and never into two batches running at once. Different
    /// keys still go side by side. No message of a key overtakes an earlier
    /// one of its key that was not acked:
    ///
    /// * when the result of K's message is not `Ok`, K's later messages in
    ///   that batch, and those of its run still on their way, are **held
    ///   back**: not acked, whatever the handler answered for them, and not
    ///   retried, dead-lettered or counted as failures either. They go back,
    ///   in order, to the front of K's queue in the subscription, keeping
    ///   their prefetch permits (no nack to the transport), and are handed
    ///   to the handler again once the failed message is settled for good —
    ///   acked after its retries, or dead-lettered;
    /// * the messages of K before it in the batch are acked and never run
    ///   again.
    ///
    /// A handler that keeps a key's order should therefore not act on a
    /// key's messages after one that failed in the same batch: they come
    /// again. A per-message timeout must allow for two batches (`max_wait`
    /// and the run of each), as a message may wait for the batch of the one
    /// before it of its key.
    ///
    /// Underneath, the transports read and settle in bulk: Redis Streams reads
    /// with `XREADGROUP … COUNT` (up to `RedisStreamsConfig::batch` entries a
    /// round trip) and acknowledges with one `XACK` of every id
    /// settled meanwhile; RabbitMQ pushes up to the prefetch ahead, and the
    /// acks asked for while one is on its way go out together, the run at the
    /// head of the channel as one `basic.ack` with `multiple`; memory is in
    /// process. The prefetch must hold a whole batch (`prefetch >= max_messages`);
    /// a per-message timeout in the stack must allow for `max_wait` and the
    /// batch's run.
    ///
    /// ```
    /// use std::sync::Arc;
    /// use std::time::Duration;
    /// use serde::{Deserialize, Serialize};
    /// use switchboard::{batch_fn, Event, EventBus, MemoryTransport, Message, SubscribeOptions};
    /// use tokio::sync::mpsc;
    ///
    /// #[derive(Debug, Clone, Serialize, Deserialize)]
    /// struct TradeExecuted { user_id: String, quantity: i64 }
    /// impl Event for TradeExecuted {
    ///     const TYPE: &'static str = "trade.executed";
    ///     const VERSION: &'static str = "1.0";
    /// }
    ///
    /// # tokio::runtime::Runtime::new().unwrap().block_on(async {
    /// let bus = EventBus::new(Arc::new(MemoryTransport::new()), "trading-service");
    /// let (sizes, mut batches) = mpsc::unbounded_channel();
    /// let consumer = bus
    ///     .subscribe_batch(
    ///         SubscribeOptions::new("game"),
    ///         50,
    ///         Duration::from_millis(20),
    ///         batch_fn(move |trades: Vec<Message<TradeExecuted>>| {
    ///             sizes.send(trades.len()).ok();
    ///             // Apply them all in one transaction, say; one result each.
    ///             async move { trades.iter().map(|_| Ok(())).collect() }
    ///         }),
    ///     )
    ///     .await?;
    /// let trades = (0..120).map(|n| TradeExecuted { user_id: n.to_string(), quantity: 1 });
    /// bus.publish_batch(trades).await?;
    /// let mut handled = 0;
    /// while handled < 120 {
    ///     let size = batches.recv().await.unwrap();
    ///     assert!(size <= 50);
    ///     handled += size;
    /// }
    /// consumer.shutdown().await?;
    /// # Ok::<(), switchboard::Error>(())
    /// # }).unwrap();
    /// ```
    pub async fn subscribe_batch<E, H>(
        &self,
        options: SubscribeOptions,
        max_messages: usize,
        max_wait: Duration,
        handler: H,
    ) -> Result<ConsumerHandle, Error>
    where
        E: Event,
        H: Service<Vec<Message<E>>, Response = Vec<Result<(), Error>>> + Send + 'static,
        H::Error: Into<Error>,
        H::Future: Send + 'static,
    {
        self.subscribe_batch_with(options, max_messages, max_wait, |slot| slot, handler)
            .await
    }

    /// [`subscribe_batch`](Self::subscribe_batch) with a per-message stack:
    /// `stack` wraps the [`BatchSlot`] each message goes through on its way
    /// into a batch — the same layers as a single-message handler, such as
    /// [`Resilience::consumer`](crate::middleware::Resilience::consumer)
    /// (dedupe, dead letters, breaker, retry, timeout).
    ///
    /// ```
    /// use std::sync::Arc;
    /// use std::sync::atomic::{AtomicUsize, Ordering};
    /// use std::time::Duration;
    /// use serde::{Deserialize, Serialize};
    /// use switchboard::middleware::Resilience;
    /// use switchboard::{batch_fn, Error, Event, EventBus, MemoryTransport, Message, SubscribeOptions};
    ///
    /// #[derive(Debug, Clone, Serialize, Deserialize)]
    /// struct TradeExecuted { order_id: u64 }
    /// impl Event for TradeExecuted {
    ///     const TYPE: &'static str = "trade.executed";
    ///     const VERSION: &'static str = "1.0";
    /// }
    ///
    /// # tokio::runtime::Runtime::new().unwrap().block_on(async {
    /// let resilience = Resilience::from_yaml("retry:\n  backoff_ms: 1\ntimeouts:\n  ledger: 1000\n")?;
    /// let bus = EventBus::new(Arc::new(MemoryTransport::new()), "trading-service");
    /// let runs = Arc::new(AtomicUsize::new(0));
    /// let counted = runs.clone();
    /// let consumer = bus
    ///     .subscribe_batch_with(
    ///         SubscribeOptions::new("game"),
    ///         10,
    ///         Duration::from_millis(5),
    ///         |slot| resilience.consumer("ledger", slot),
    ///         batch_fn(move |trades: Vec<Message<TradeExecuted>>| {
    ///             let counted = counted.clone();
    ///             async move {
    ///                 trades
    ///                     .iter()
    ///                     .map(|trade| {
    ///                         counted.fetch_add(1, Ordering::SeqCst);
    ///                         // Order 7 fails once; the retry layer runs it alone again.
    ///                         if trade.payload().order_id == 7 && trade.attempt() == 1 {
    ///                             return Err(Error::transient("ledger busy"));
    ///                         }
    ///                         Ok(())
    ///                     })
    ///                     .collect()
    ///             }
    ///         }),
    ///     )
    ///     .await?;
    /// bus.publish_batch((0..10).map(|order_id| TradeExecuted { order_id })).await?;
    /// while runs.load(Ordering::SeqCst) < 11 {
    ///     tokio::task::yield_now().await;
    /// }
    /// consumer.shutdown().await?;
    /// // Ten messages, one retried: the nine successes ran once.
    /// assert_eq!(runs.load(Ordering::SeqCst), 11);
    /// # Ok::<(), Error>(())
    /// # }).unwrap();
    /// ```
    pub async fn subscribe_batch_with<E, S, H>(
        &self,
        options: SubscribeOptions,
        max_messages: usize,
        max_wait: Duration,
        stack: impl FnOnce(BatchSlot<E>) -> S,
        handler: H,
    ) -> Result<ConsumerHandle, Error>
    where
        E: Event,
        S: Service<Message<E>, Response = ()> + Send + 'static,
        S::Error: Into<Error>,
        S::Future: Send + 'static,
        H: Service<Vec<Message<E>>, Response = Vec<Result<(), Error>>> + Send + 'static,
        H::Error: Into<Error>,
        H::Future: Send + 'static,
    {
        options.validate()?;
        if max_messages == 0 {
            return Err(Error::new(
                ErrorKind::Rejected,
                "subscribe_batch: `max_messages` must be at least 1",
            ));
        }
        if options.prefetch < max_messages {
            return Err(Error::new(
                ErrorKind::Rejected,
                format!(
                    "subscribe_batch: the prefetch ({}) must hold a whole batch of `max_messages` ({max_messages})",
                    options.prefetch
                ),
            ));
        }
        let batching = Batching {
            max_messages,
            max_wait,
            parallel: options.concurrency,
        };
        // Enough handlers out at once to fill every batch in flight.
        let per_message = options.concurrency.saturating_mul(max_messages);
        let options = options.with_concurrency(per_message);
        if let Some(key) = &options.ordering_key {
            key.check::<E>()?;
        }
        let slot = spawn_batcher(batching, handler);
        let key_run = options.ordering_key.is_some().then_some(max_messages);
        self.subscribe_on(self.topic_of::<E>(), options, stack(slot), key_run)
            .await
    }
}
