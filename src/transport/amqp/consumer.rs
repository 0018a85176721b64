//! Consuming: one channel per subscription with manual acks and the
//! subscription's prefetch, resumed on the next connection after a loss.
//!
//! The subscription's stream polls lapin's consumer directly (no task in
//! between). Each delivery handed out holds a permit of the subscription's
//! semaphore until it is settled, so shutting down can wait for them before
//! closing the channel — which makes the broker requeue whatever was
//! prefetched but never handed out.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use chrono::{SecondsFormat, Utc};
use futures_util::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicQosOptions, BasicRejectOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel};
use tokio::runtime::Handle;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, oneshot, watch};
use tokio::time::Instant;

use super::connection::{Link, RETRY_PAUSE, amqp_error, declare_queue};
use super::properties::{self, ATTEMPTS};
use super::publisher::publish_direct;
use super::{DLQ_SUFFIX, QueueType, Shared};
use crate::error::{Error, ErrorKind};
use crate::transport::{
    Acker, DeadLetter, Delivery, RawMessage, SubscribeOptions, Subscription, validate_name,
};

pub(crate) async fn subscribe(
    shared: &Arc<Shared>,
    topic: &str,
    options: SubscribeOptions,
) -> Result<Subscription, Error> {
    validate_name("topic", topic)?;
    options.validate()?;
    let queue = shared.config.queue_name(topic, &options.group)?;
    shared.remember(topic, &options.group);
    let prefetch = options.prefetch.min(u16::MAX.into());
    let mut state = ConsumerState {
        shared: shared.clone(),
        topic: topic.into(),
        group: options.group.as_str().into(),
        queue: queue.into(),
        prefetch,
        permits: Arc::new(Semaphore::new(prefetch)),
        live: None,
        after: 0,
        links: shared.supervisor.link_watch(),
        drained: None,
        handle: Handle::current(),
    };
    // Live before returning: the queue exists and the consumer is registered.
    let deadline = Instant::now() + shared.config.publish_timeout;
    let link = shared.supervisor.wait_link(deadline).await?;
    state
        .open(link.clone())
        .await
        .inspect_err(|error| shared.supervisor.failed(&link, error))?;
    let (drained, drained_rx) = oneshot::channel();
    state.drained = Some(drained);
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
}

struct ConsumerState {
    shared: Arc<Shared>,
    topic: Arc<str>,
    group: Arc<str>,
    queue: Arc<str>,
    prefetch: usize,
    permits: Arc<Semaphore>,
    live: Option<Live>,
    /// After a lost connection, only a newer generation is worth trying.
    after: u64,
    links: watch::Receiver<Option<Link>>,
    drained: Option<oneshot::Sender<()>>,
    handle: Handle,
}

impl ConsumerState {
    /// Opens a channel and starts consuming on `link`; fails if the
    /// connection goes meanwhile.
    async fn open(&mut self, link: Link) -> Result<(), Error> {
        let shared = self.shared.clone();
        let generation = link.generation;
        shared.supervisor.guard(generation, self.start(link)).await
    }

    async fn start(&mut self, link: Link) -> Result<(), Error> {
        let channel = link
            .connection
            .create_channel()
            .await
            .map_err(|error| amqp_error("open a channel", error))?;
        channel
            .basic_qos(self.prefetch as u16, BasicQosOptions::default())
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
        });
        Ok(())
    }

    async fn next(&mut self) -> Option<Delivery> {
        let permit = self.permits.clone().acquire_owned().await.ok()?;
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
                    tokio::time::sleep(RETRY_PAUSE).await;
                }
                continue;
            };
            let generation = live.link.generation;
            let next = tokio::select! {
                next = live.consumer.next() => next,
                () = self.shared.supervisor.link_gone(generation) => Some(Err(
                    lapin::Error::from(lapin::ErrorKind::InvalidConnectionState(
                        lapin::ConnectionState::Error,
                    )),
                )),
            };
            match next {
                Some(Ok(delivery)) => return Some(self.hand_out(delivery, permit)),
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
        self.shared.supervisor.failed(link, error);
        self.after = if link.connection.status().connected() {
            link.generation - 1
        } else {
            link.generation
        };
    }

    fn hand_out(
        &self,
        delivery: lapin::message::Delivery,
        permit: OwnedSemaphorePermit,
    ) -> Delivery {
        let attempt = attempt_of(&delivery, self.shared.config.queue_type);
        let message = properties::raw_message(delivery.data, &delivery.properties);
        let acker = AmqpAcker {
            shared: self.shared.clone(),
            acker: delivery.acker,
            queue: self.queue.clone(),
            topic: self.topic.clone(),
            group: self.group.clone(),
            attempt,
            generation: self.live.as_ref().map_or(0, |live| live.link.generation),
            properties: delivery.properties,
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
    }
}

impl Drop for ConsumerState {
    fn drop(&mut self) {
        let live = self.live.take();
        let shared = self.shared.clone();
        let permits = self.permits.clone();
        let prefetch = self.prefetch as u32;
        let drained = self.drained.take();
        self.handle.spawn(async move {
            if let Some(Live {
                link,
                channel,
                consumer,
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
                let _ = shared.supervisor.guard(generation, cancel).await;
                drop(consumer);
                let _ = permits.acquire_many(prefetch).await;
                let close = async {
                    channel
                        .close(200, "subscription closed".into())
                        .await
                        .map_err(|error| amqp_error("close", error))
                };
                let _ = shared.supervisor.guard(generation, close).await;
            } else {
                let _ = permits.acquire_many(prefetch).await;
            }
            drop(drained);
        });
    }
}

/// Which delivery this is. Quorum queues count in `x-delivery-count`;
/// classic queues keep no count, so the transport writes the deliveries so
/// far into a header when a nack republishes the message, and a redelivery
/// the broker made by itself counts one more.
fn attempt_of(delivery: &lapin::message::Delivery, queue_type: QueueType) -> u32 {
    let count = |name: &str| {
        properties::header_value(&delivery.properties, name)
            .and_then(properties::number_value)
            .map_or(0, |count| count.clamp(0, u32::MAX as i64 - 2) as u32)
    };
    match queue_type {
        QueueType::Quorum => count("x-delivery-count") + 1,
        QueueType::Classic => count(ATTEMPTS) + 1 + u32::from(delivery.redelivered),
    }
}

/// Settles one delivery on the channel it came from.
struct AmqpAcker {
    shared: Arc<Shared>,
    acker: lapin::Acker,
    queue: Arc<str>,
    topic: Arc<str>,
    group: Arc<str>,
    attempt: u32,
    /// The connection the delivery came on; settling it dies with it.
    generation: u64,
    properties: BasicProperties,
    /// Held until settled: counts the delivery as in flight.
    permit: Option<OwnedSemaphorePermit>,
    handle: Handle,
}

impl AmqpAcker {
    async fn reject_requeue(
        shared: &Shared,
        generation: u64,
        acker: &lapin::Acker,
    ) -> Result<(), Error> {
        let rejected = async {
            acker
                .reject(BasicRejectOptions { requeue: true })
                .await
                .map_err(|error| amqp_error("reject", error))
        };
        let sent = shared.supervisor.guard(generation, rejected).await?;
        sent.then_some(()).ok_or_else(channel_gone)
    }

    /// The nack proper, after the delay.
    #[allow(clippy::too_many_arguments)]
    async fn requeue(
        shared: &Shared,
        generation: u64,
        acker: &lapin::Acker,
        queue: &str,
        queue_type: QueueType,
        body: &Bytes,
        properties: &BasicProperties,
        attempt: u32,
    ) -> Result<(), Error> {
        if queue_type == QueueType::Quorum {
            return Self::reject_requeue(shared, generation, acker).await;
        }
        let republished =
            properties::with_headers(properties, &[(ATTEMPTS, attempt.to_string())], &[]);
        match publish_direct(shared, queue, body, republished).await {
            Ok(()) => ack(shared, generation, acker).await,
            Err(error) => {
                tracing::warn!(%error, queue, "amqp: cannot republish a nacked message; requeueing it");
                Self::reject_requeue(shared, generation, acker).await
            }
        }
    }
}

async fn ack(shared: &Shared, generation: u64, acker: &lapin::Acker) -> Result<(), Error> {
    let acked = async {
        acker
            .ack(BasicAckOptions::default())
            .await
            .map_err(|error| amqp_error("ack", error))
    };
    let sent = shared.supervisor.guard(generation, acked).await?;
    sent.then_some(()).ok_or_else(channel_gone)
}

fn channel_gone() -> Error {
    Error::new(
        ErrorKind::Connection,
        "amqp: the channel that delivered the message is closed; the broker delivers it again",
    )
}

#[async_trait]
impl Acker for AmqpAcker {
    async fn ack(&mut self, _message: &RawMessage) -> Result<(), Error> {
        ack(&self.shared, self.generation, &self.acker).await?;
        self.permit = None;
        Ok(())
    }

    /// With no delay the message is requeued before this returns. With a
    /// delay, the message is held (unacked, counting against the prefetch)
    /// by a task that requeues it when the delay is over, and this returns
    /// at once; if that fails, the message is still unacked on its channel
    /// and the broker delivers it again when the channel closes.
    async fn nack(&mut self, message: &RawMessage, delay: Duration) -> Result<(), Error> {
        let queue_type = self.shared.config.queue_type;
        if delay.is_zero() {
            Self::requeue(
                &self.shared,
                self.generation,
                &self.acker,
                &self.queue,
                queue_type,
                &message.body,
                &self.properties,
                self.attempt,
            )
            .await?;
            self.permit = None;
            return Ok(());
        }
        let (shared, acker, queue) = (self.shared.clone(), self.acker.clone(), self.queue.clone());
        let (body, properties, attempt) =
            (message.body.clone(), self.properties.clone(), self.attempt);
        let generation = self.generation;
        let permit = self.permit.take();
        self.handle.spawn(async move {
            tokio::time::sleep(delay).await;
            let requeued = Self::requeue(
                &shared,
                generation,
                &acker,
                &queue,
                queue_type,
                &body,
                &properties,
                attempt,
            )
            .await;
            if let Err(error) = requeued {
                tracing::warn!(%error, queue = &*queue, "amqp: delayed nack failed");
            }
            drop(permit);
        });
        Ok(())
    }

    async fn dead_letter(
        &mut self,
        message: &RawMessage,
        letter: &DeadLetter,
    ) -> Result<(), Error> {
        let mut facts = vec![
            (properties::DLQ_REASON, letter.reason().to_owned()),
            (
                properties::DLQ_ATTEMPTS,
                letter.attempts().unwrap_or(self.attempt).to_string(),
            ),
            (properties::DLQ_TOPIC, self.topic.to_string()),
            (properties::DLQ_GROUP, self.group.to_string()),
            (
                properties::DLQ_TIME,
                Utc::now().to_rfc3339_opts(SecondsFormat::Micros, true),
            ),
        ];
        if let Some(error) = letter.last_error() {
            facts.push((properties::DLQ_ERROR, error.to_owned()));
        }
        let properties = properties::with_headers(&self.properties, &facts, &[ATTEMPTS]);
        let dlq = format!("{}{DLQ_SUFFIX}", self.queue);
        publish_direct(&self.shared, &dlq, &message.body, properties).await?;
        ack(&self.shared, self.generation, &self.acker).await?;
        self.permit = None;
        Ok(())
    }

    fn abandoned(&mut self, _message: RawMessage) {
        // Left unsettled, the message would sit on this channel until it
        // closes; give it back now.
        let Some(permit) = self.permit.take() else {
            return;
        };
        let (shared, acker, generation) =
            (self.shared.clone(), self.acker.clone(), self.generation);
        self.handle.spawn(async move {
            if let Err(error) = Self::reject_requeue(&shared, generation, &acker).await {
                tracing::debug!(%error, "amqp: requeue of an abandoned delivery failed");
            }
            drop(permit);
        });
    }
}
