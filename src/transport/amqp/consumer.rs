//! Consuming: one channel per subscription with manual acks and the
//! subscription's prefetch, resumed on the next connection after a loss.
//!
//! The subscription's stream polls lapin's consumer directly (no task in
//! between). Each delivery handed out holds a permit of the subscription's
//! semaphore until it is settled or back with the broker — a nacked one
//! through its delay too (see [`acker`](super::acker)) — so shutting down can
//! wait for them before closing the channel, which makes the broker requeue
//! whatever was prefetched but never handed out.
//!
//! With [`SubscribeOptions::max_deliveries`] set, the count of deliveries
//! without an outcome is kept exact: what was prefetched but never handed
//! out goes back republished with its counts unchanged when the
//! subscription stops, and on a classic queue, which
//! keeps no delivery count, a redelivered message is first republished with
//! its count of deliveries without an outcome raised (and the original
//! acked) instead of being handed out: that is how the count can pass the
//! limit at all. Quorum queues are counted the same way under a guard (see
//! `acker::counts_of` for why not by `x-delivery-count`).

use std::sync::Arc;

use bytes::Bytes;
use futures_util::StreamExt;
use lapin::Channel;
use lapin::options::{BasicCancelOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::FieldTable;
use tokio::runtime::Handle;
use tokio::sync::{OwnedSemaphorePermit, oneshot, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::ack_batch::AckBatch;
use super::acker::{AmqpAcker, Held, Waiting, counts_of};
use super::connection::{Link, RETRY_PAUSE};
use super::declare::declare_queue;
use super::error::amqp_error;
use super::{NAME, Shared, properties};
use crate::error::{Error, ErrorKind};
use crate::observe::metrics;
use crate::transport::delay::DelayQueue;
use crate::transport::delivery::Prefetch;
use crate::transport::{Delivery, RawMessage, SubscribeOptions, Subscription, validate_name};

pub(crate) async fn subscribe(
    shared: &Arc<Shared>,
    topic: &str,
    options: SubscribeOptions,
) -> Result<Subscription, Error> {
    validate_name("topic", topic)?;
    options.validate()?;
    let queue = shared.config.queue_name(topic, &options.group)?;
    let prefetch = options.prefetch.min(u16::MAX.into());
    let mut state = ConsumerState {
        shared: shared.clone(),
        topic: topic.into(),
        group: options.group.as_str().into(),
        queue: queue.into(),
        prefetch: Prefetch::new(prefetch),
        live: None,
        after: 0,
        links: shared.consuming.link_watch(),
        drained: None,
        handle: Handle::current(),
        delays: DelayQueue::default(),
        guarded: options.max_deliveries.is_some(),
        lag: None,
    };
    // Live before returning: the queue exists and the consumer is registered.
    let deadline = Instant::now() + shared.config.publish_timeout;
    let link = shared.consuming.wait_link(deadline).await?;
    tokio::time::timeout_at(deadline, state.open(link.clone()))
        .await
        .unwrap_or_else(|_| {
            Err(Error::new(
                ErrorKind::Timeout,
                "amqp: the broker did not answer the subscription's declarations in time",
            ))
        })
        .inspect_err(|error| shared.consuming.failed(&link, error))?;
    // Remembered only once the broker accepted the queue: a refused
    // declaration must not fail every later reconnection.
    shared.remember(topic, &options.group);
    let (drained, drained_rx) = oneshot::channel();
    state.drained = Some(drained);
    state.lag = Some(spawn_lag_sampler(
        shared.clone(),
        state.topic.clone(),
        state.group.clone(),
        state.queue.clone(),
    ));
    let (topic, group) = (state.topic.clone(), state.group.clone());
    let deliveries = futures_util::stream::unfold(state, |mut state| async move {
        let delivery = state.next().await?;
        Some((delivery, state))
    });
    let drain = async move {
        // The sender goes when the cleanup is done (or could not run).
        let _ = drained_rx.await;
        Ok(())
    };
    Ok(Subscription::new(topic, group, deliveries, drain))
}

struct Live {
    link: Link,
    channel: Channel,
    consumer: lapin::Consumer,
    /// The channel's acks, sent together.
    acks: Arc<AckBatch>,
}

struct ConsumerState {
    shared: Arc<Shared>,
    topic: Arc<str>,
    group: Arc<str>,
    queue: Arc<str>,
    prefetch: Prefetch,
    live: Option<Live>,
    /// After a lost connection, only a newer generation is worth trying.
    after: u64,
    links: watch::Receiver<Option<Link>>,
    drained: Option<oneshot::Sender<()>>,
    handle: Handle,
    /// Nacked deliveries waiting out their delay.
    delays: DelayQueue<Waiting>,
    /// A poison guard is on: keep the count of deliveries without an
    /// outcome exact (see the module docs).
    guarded: bool,
    lag: Option<JoinHandle<()>>,
}

impl ConsumerState {
    /// Opens a channel and starts consuming on `link`; fails if the
    /// connection goes meanwhile.
    async fn open(&mut self, link: Link) -> Result<(), Error> {
        let shared = self.shared.clone();
        let generation = link.generation;
        shared.consuming.guard(generation, self.start(link)).await
    }

    async fn start(&mut self, link: Link) -> Result<(), Error> {
        let channel = link
            .connection
            .create_channel()
            .await
            .map_err(|error| amqp_error("open a channel", error))?;
        channel
            .basic_qos(self.prefetch.size() as u16, BasicQosOptions::default())
            .await
            .map_err(|error| amqp_error("set the prefetch", error))?;
        // Declared again on every (re)start: a queue with `x-expires` may be
        // gone, and this is cheap when it exists.
        declare_queue(&self.shared.config, &channel, &self.topic, &self.group).await?;
        let consumer = channel
            .basic_consume(
                self.queue.as_ref().into(),
                "".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(|error| amqp_error("consume", error))?;
        self.live = Some(Live {
            link,
            channel,
            consumer,
            acks: Arc::default(),
        });
        Ok(())
    }

    async fn next(&mut self) -> Option<Delivery> {
        loop {
            // A nacked delivery coming due goes back to the broker (and
            // frees its permit) whatever this subscription waits for.
            let permit = tokio::select! {
                permit = self.prefetch.permits().clone().acquire_owned() => permit.ok()?,
                waiting = self.delays.next_due() => {
                    if let Some(delivery) = self.redeliver(waiting).await {
                        return Some(delivery);
                    }
                    continue;
                }
            };
            if let Some(delivery) = self.receive(permit).await {
                return Some(delivery);
            }
        }
    }

    /// A nacked delivery whose delay is over: handed out again with its own
    /// permit — unless its connection is gone (the broker delivers it again
    /// by itself) or it was held for [`HOLD_LIMIT`](super::acker::HOLD_LIMIT)
    /// (back to the broker).
    async fn redeliver(&self, waiting: Waiting) -> Option<Delivery> {
        let current = self.live.as_ref().map(|live| live.link.generation);
        if current != Some(waiting.held.generation) {
            return None;
        }
        if waiting.held.received_at.elapsed() >= super::acker::HOLD_LIMIT {
            waiting.requeue().await;
            return None;
        }
        let Waiting {
            mut held,
            message,
            permit,
        } = waiting;
        held.attempt = held.attempt.saturating_add(1);
        held.rehanded = true;
        Some(self.delivery(held, message, permit))
    }

    /// The next delivery to hand out, with `permit`; `None` when a nacked
    /// delivery came due meanwhile and was not handed out again (the caller
    /// starts over).
    async fn receive(&mut self, permit: OwnedSemaphorePermit) -> Option<Delivery> {
        let delays = self.delays.clone();
        loop {
            let Some(live) = self.live.as_mut() else {
                let after = self.after;
                let link = self
                    .links
                    .wait_for(|link| link.as_ref().is_some_and(|link| link.generation > after))
                    .await
                    .ok()?
                    .clone()?;
                if let Err(error) = self.open(link.clone()).await {
                    tracing::warn!(%error, queue = &*self.queue, "amqp: cannot resume consuming");
                    self.lost(&link, &error);
                    // A refusal (the queue redeclared elsewhere with other
                    // arguments) lasts until an operator acts: try again
                    // at the reconnect pace, not in a tight loop.
                    let pause = if error.is_retryable() {
                        RETRY_PAUSE
                    } else {
                        self.shared.config.reconnect_delay.1
                    };
                    tokio::time::sleep(pause).await;
                }
                continue;
            };
            let generation = live.link.generation;
            let next = tokio::select! {
                next = live.consumer.next() => next,
                () = self.shared.consuming.link_gone(generation) => Some(Err(
                    lapin::Error::from(lapin::ErrorKind::InvalidConnectionState(
                        lapin::ConnectionState::Error,
                    )),
                )),
                waiting = delays.next_due() => {
                    // The fresh permit goes back; the waiting one has its own.
                    drop(permit);
                    return self.redeliver(waiting).await;
                }
            };
            match next {
                Some(Ok(delivery)) => {
                    if self.guarded && delivery.redelivered {
                        self.recount(delivery).await;
                        continue;
                    }
                    return Some(self.hand_out(delivery, permit));
                }
                Some(Err(error)) => {
                    let error = amqp_error("consume", error);
                    tracing::warn!(%error, queue = &*self.queue, "amqp: consumer failed; resuming");
                    let link = live.link.clone();
                    self.live = None;
                    self.lost(&link, &error);
                }
                None => {
                    // Cancelled by the broker (say, the queue was deleted).
                    let link = live.link.clone();
                    self.live = None;
                    self.after = link.generation - 1;
                }
            }
        }
    }

    fn lost(&mut self, link: &Link, error: &Error) {
        self.shared.consuming.failed(link, error);
        self.after = if link.connection.status().connected() {
            link.generation - 1
        } else {
            link.generation
        };
    }

    fn held(&self, delivery: &lapin::message::Delivery, acker: lapin::Acker) -> Held {
        let (generation, acks) = self.live.as_ref().map_or_else(
            || (0, Arc::default()),
            |live| (live.link.generation, live.acks.clone()),
        );
        held_of(
            &self.shared,
            &self.queue,
            (generation, acks),
            self.guarded,
            delivery,
            acker,
        )
    }

    /// Republishes a redelivered message in its own place with the count
    /// of deliveries without an outcome raised (see the module docs).
    async fn recount(&self, delivery: lapin::message::Delivery) {
        let held = self.held(&delivery, delivery.acker.clone());
        let body = Bytes::from(delivery.data);
        held.republish(&body, held.attempt - 1, held.delivery_count - 1)
            .await;
    }

    fn hand_out(
        &self,
        delivery: lapin::message::Delivery,
        permit: OwnedSemaphorePermit,
    ) -> Delivery {
        let held = self.held(&delivery, delivery.acker.clone());
        let message = properties::raw_message(delivery.data, &delivery.properties);
        self.delivery(held, message, permit)
    }

    fn delivery(&self, held: Held, message: RawMessage, permit: OwnedSemaphorePermit) -> Delivery {
        let (attempt, delivery_count) = (held.attempt, held.delivery_count);
        let acker = AmqpAcker {
            held: Some(held),
            topic: self.topic.clone(),
            group: self.group.clone(),
            delays: self.delays.clone(),
            permit: Some(permit),
            handle: self.handle.clone(),
        };
        Delivery::new(
            message,
            self.topic.clone(),
            self.group.clone(),
            attempt,
            Box::new(acker),
        )
        .with_delivery_count(delivery_count)
    }
}

/// The delivery as held until settled, registered with its channel's acks
/// (`channel`: the connection's generation and the acks).
fn held_of(
    shared: &Arc<Shared>,
    queue: &Arc<str>,
    channel: (u64, Arc<AckBatch>),
    guarded: bool,
    delivery: &lapin::message::Delivery,
    acker: lapin::Acker,
) -> Held {
    let (generation, acks) = channel;
    let (attempt, delivery_count) = counts_of(delivery, shared.config.queue_type, guarded);
    acks.delivered(delivery.delivery_tag);
    Held {
        tag: delivery.delivery_tag,
        acks,
        shared: shared.clone(),
        acker,
        queue: queue.clone(),
        generation,
        properties: delivery.properties.clone(),
        attempt,
        delivery_count,
        rehanded: false,
        received_at: Instant::now(),
    }
}

/// With a poison guard, what the broker sent before the cancel but was
/// never handed out goes back republished with its counts as they were: a
/// channel closing on it would count it as a delivery without an outcome.
async fn hand_back_unhandled(
    shared: &Arc<Shared>,
    queue: &Arc<str>,
    channel: (u64, Arc<AckBatch>),
    mut consumer: lapin::Consumer,
) {
    // After the cancel, the deliveries already sent are in the consumer's
    // buffer and its stream ends behind them; the time limit only guards
    // against a broker that never confirms the cancel.
    let quiet = std::time::Duration::from_secs(1);
    while let Ok(Some(Ok(delivery))) = tokio::time::timeout(quiet, consumer.next()).await {
        let held = held_of(
            shared,
            queue,
            channel.clone(),
            true,
            &delivery,
            delivery.acker.clone(),
        );
        let body = Bytes::from(delivery.data);
        held.republish(&body, held.attempt - 1, held.delivery_count - 1)
            .await;
    }
}

/// Samples the queue's depth (a passive declare on a channel of its own,
/// since a failed passive declare closes its channel) into the lag gauge
/// every `lag_every`, until the subscription ends.
fn spawn_lag_sampler(
    shared: Arc<Shared>,
    topic: Arc<str>,
    group: Arc<str>,
    queue: Arc<str>,
) -> JoinHandle<()> {
    let every = shared.config.lag_every;
    let links = shared.consuming.link_watch();
    tokio::spawn(async move {
        let mut ticks = tokio::time::interval(every);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticks.tick().await;
            let Some(link) = links.borrow().clone() else {
                continue;
            };
            let sample = super::lag::queue_depth(&link, &queue);
            // A sample that cannot finish within the interval is skipped.
            if let Ok(Ok(depth)) = tokio::time::timeout(every, sample).await {
                metrics::consumer_lag(NAME, topic.clone(), group.clone(), u64::from(depth));
            }
        }
    })
}

impl Drop for ConsumerState {
    fn drop(&mut self) {
        if let Some(lag) = self.lag.take() {
            lag.abort();
        }
        // Nacked deliveries go back to the broker now, before the channel
        // closes (which would count them as deliveries without an outcome).
        let waiting = self.delays.close();
        let live = self.live.take();
        let shared = self.shared.clone();
        let prefetch = self.prefetch.clone();
        let drained = self.drained.take();
        let (guarded, queue) = (self.guarded, self.queue.clone());
        self.handle.spawn(async move {
            for (waiting, left) in waiting {
                waiting.requeue_after(left).await;
            }
            if let Some(Live {
                link,
                channel,
                consumer,
                acks,
            }) = live
            {
                let generation = link.generation;
                drop(link);
                // Stop new deliveries, wait for the handed-out ones to be
                // settled, then close: the broker requeues what was
                // prefetched but never handed out.
                // Each wait on the broker gives up when the connection goes
                // (the broker then requeues everything by itself).
                let cancel = async {
                    channel
                        .basic_cancel(consumer.tag(), BasicCancelOptions::default())
                        .await
                        .map_err(|error| amqp_error("cancel", error))
                };
                let _ = shared.consuming.guard(generation, cancel).await;
                if guarded {
                    hand_back_unhandled(&shared, &queue, (generation, acks), consumer).await;
                } else {
                    drop(consumer);
                }
                let _ = prefetch.drained().await;
                let close = async {
                    channel
                        .close(200, "subscription closed".into())
                        .await
                        .map_err(|error| amqp_error("close", error))
                };
                let _ = shared.consuming.guard(generation, close).await;
            } else {
                let _ = prefetch.drained().await;
            }
            drop(drained);
        });
    }
}
