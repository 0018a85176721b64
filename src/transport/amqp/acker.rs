//! Settling a delivery on the channel it came from, and how a nack works.
//!
//! How a nack works is the [module docs'](super#delayed-nacks) choice.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use chrono::{SecondsFormat, Utc};
use lapin::BasicProperties;
use lapin::options::BasicRejectOptions;
use tokio::runtime::Handle;
use tokio::sync::OwnedSemaphorePermit;
use tokio::time::Instant;

use super::ack_batch::AckBatch;
use super::error::amqp_error;
use super::properties::{self, ATTEMPTS, REDELIVERIES};
use super::publisher::publish_direct;
use super::schedule;
use super::{DLQ_SUFFIX, QueueType, Shared};
use crate::error::{Error, ErrorKind};
use crate::transport::delay::DelayQueue;
use crate::transport::{Acker, DeadLetter, RawMessage, header};

/// The longest a nacked message is held in the subscription before it goes
/// back to the broker: well under RabbitMQ's default `consumer_timeout`
/// (30 minutes), past which the broker closes the channel.
pub const HOLD_LIMIT: Duration = Duration::from_secs(10 * 60);

/// Where a quorum queue counts the times a message came back to it.
const QUORUM_DELIVERY_COUNT: &str = "x-delivery-count";

/// Which delivery this is, and how many deliveries before it ended without
/// an outcome. Classic queues keep no count (only the `redelivered` flag),
/// so the transport writes both counts into headers whenever it republishes
/// a message. Quorum queues count returns in `x-delivery-count`, which gives
/// an unguarded subscription its attempts; a guarded one (`max_deliveries`)
/// counts by the flag on both queue types, recounting every redelivery, for
/// the broker's count is not one for the guard: RabbitMQ 3.10 was seen
/// raising it by two across one aborted consumer (a message handed to a
/// channel already closing counts too), and RabbitMQ 4 counts only some
/// kinds of return.
pub(super) fn counts_of(
    delivery: &lapin::message::Delivery,
    queue_type: QueueType,
    guarded: bool,
) -> (u32, u32) {
    let count = |name: &str| {
        properties::header_value(&delivery.properties, name)
            .and_then(properties::number_value)
            .map_or(0, |count| count.clamp(0, i64::from(u32::MAX / 4)) as u32)
    };
    let returned = match queue_type {
        QueueType::Quorum if !guarded => count(QUORUM_DELIVERY_COUNT),
        _ => u32::from(delivery.redelivered),
    };
    let attempt = count(ATTEMPTS) + returned + 1;
    let delivery_count = count(REDELIVERIES) + returned + 1;
    (attempt, delivery_count)
}

/// A delivery as the broker handed it out: enough to settle or republish it.
pub(super) struct Held {
    pub(super) shared: Arc<Shared>,
    pub(super) acker: lapin::Acker,
    pub(super) queue: Arc<str>,
    /// The connection the delivery came on; settling it dies with it.
    pub(super) generation: u64,
    pub(super) properties: BasicProperties,
    pub(super) attempt: u32,
    pub(super) delivery_count: u32,
    /// Handed out again by the subscription after a nack, so the broker's
    /// counts are behind `attempt`.
    pub(super) rehanded: bool,
    /// When the broker handed it out (the hold limit counts from here).
    pub(super) received_at: Instant,
    /// Its delivery tag, and the acks of its channel it is acked with.
    pub(super) tag: u64,
    pub(super) acks: Arc<AckBatch>,
}

impl Held {
    async fn reject_requeue(&self) -> Result<(), Error> {
        let rejected = async {
            self.acker
                .reject(BasicRejectOptions { requeue: true })
                .await
                .map_err(|error| amqp_error("reject", error))
        };
        let sent = self
            .shared
            .consuming
            .guard(self.generation, rejected)
            .await?;
        self.acks.settled(self.tag);
        sent.then_some(()).ok_or_else(channel_gone)
    }

    /// Acks it, together with the other acks of its channel asked for
    /// meanwhile (see [`AckBatch`]).
    pub(super) async fn ack(&self) -> Result<(), Error> {
        let acked = self.acks.ack(self.tag, self.acker.clone());
        let sent = self.shared.consuming.guard(self.generation, acked).await?;
        sent.then_some(()).ok_or_else(channel_gone)
    }

    /// Republishes the message to the back of its queue as delivery
    /// `attempt + 1` with `delivery_count - 1 + returned` deliveries
    /// without an outcome before it, then acks the original. If the
    /// republish fails, the original is rejected with requeue instead.
    pub(super) async fn republish(&self, body: &Bytes, attempt: u32, without_outcome: u32) {
        let headers = [
            (ATTEMPTS, attempt.to_string()),
            (REDELIVERIES, without_outcome.to_string()),
        ];
        // A quorum queue's own count is folded into ours; left on the copy,
        // the broker would not reset it and the next delivery would count
        // those returns twice.
        let properties =
            properties::with_headers(&self.properties, &headers, &[QUORUM_DELIVERY_COUNT]);
        let done = match publish_direct(&self.shared, &self.queue, body, properties).await {
            Ok(()) => self.ack().await,
            Err(error) => {
                tracing::warn!(%error, queue = &*self.queue, "amqp: cannot republish a message; requeueing it");
                self.reject_requeue().await
            }
        };
        if let Err(error) = done {
            // Still unacked on its channel: the broker delivers it again
            // when the channel closes.
            tracing::warn!(%error, queue = &*self.queue, "amqp: cannot settle a republished message");
        }
    }

    /// The give-back: to the back of the queue for any member, with its
    /// give-back headers; the attempt and the count of deliveries without
    /// an outcome unchanged (a give-back is neither). The original is acked
    /// once the copy is confirmed; a failed publish leaves it held.
    pub(super) async fn give_back(&self, message: &RawMessage) -> Result<(), Error> {
        let mut headers = vec![
            (ATTEMPTS, self.attempt.saturating_sub(1).to_string()),
            (
                REDELIVERIES,
                self.delivery_count.saturating_sub(1).to_string(),
            ),
        ];
        for name in [header::GIVEN_BACK, header::GIVEN_BACK_AT] {
            if let Some(value) = message.headers.get(name) {
                headers.push((name, value.clone()));
            }
        }
        let properties =
            properties::with_headers(&self.properties, &headers, &[QUORUM_DELIVERY_COUNT]);
        publish_direct(&self.shared, &self.queue, &message.body, properties).await?;
        if let Err(error) = self.ack().await {
            // Still unacked on its channel: the broker delivers it again when
            // the channel closes, beside the copy (consumers deduplicate).
            tracing::warn!(%error, queue = &*self.queue, "amqp: cannot ack a message given back");
        }
        Ok(())
    }

    /// The nack proper: to the back of the queue, one attempt more, the
    /// count of deliveries without an outcome unchanged.
    pub(super) async fn requeue(&self, body: &Bytes) {
        self.republish(body, self.attempt, self.delivery_count - 1)
            .await;
    }

    /// The nack when the subscription stops with `left` of its delay still
    /// to wait: through the delay buckets back to this group's queue only
    /// (see [scheduled messages](super#scheduled-messages)), one attempt
    /// more, then the original acked. Without a delay left, or if the
    /// buckets cannot take it, the plain [`requeue`](Self::requeue).
    pub(super) async fn requeue_after(&self, body: &Bytes, left: Duration) {
        let Some(level) = schedule::bucket_for(left) else {
            return self.requeue(body).await;
        };
        let due_at = chrono::Utc::now().timestamp_millis()
            + i64::try_from(left.as_millis()).unwrap_or(i64::MAX / 2);
        let headers = [
            (ATTEMPTS, self.attempt.to_string()),
            (REDELIVERIES, (self.delivery_count - 1).to_string()),
            (schedule::DUE_AT, due_at.to_string()),
            (schedule::SCHEDULED_QUEUE, self.queue.to_string()),
        ];
        let properties =
            properties::with_headers(&self.properties, &headers, &[QUORUM_DELIVERY_COUNT]);
        match schedule::into_bucket(&self.shared, level, body, properties).await {
            Ok(()) => {
                if let Err(error) = self.ack().await {
                    tracing::warn!(%error, queue = &*self.queue, "amqp: cannot ack a nacked message sent to the delay buckets");
                }
            }
            Err(error) => {
                tracing::warn!(%error, queue = &*self.queue, "amqp: the delay buckets cannot take a nacked message; requeueing it at once");
                self.requeue(body).await;
            }
        }
    }
}

/// A nacked delivery waiting out its delay, with its permit.
pub(super) struct Waiting {
    pub(super) held: Held,
    pub(super) message: RawMessage,
    pub(super) permit: OwnedSemaphorePermit,
}

impl Waiting {
    /// Back to the broker (see the module docs); frees the permit after.
    pub(super) async fn requeue(self) {
        self.held.requeue(&self.message.body).await;
    }

    /// Back to the broker with `left` of the delay still to wait, through
    /// the delay buckets to this group's queue; frees the permit after.
    pub(super) async fn requeue_after(self, left: Duration) {
        self.held.requeue_after(&self.message.body, left).await;
    }
}

fn channel_gone() -> Error {
    Error::new(
        ErrorKind::Connection,
        "amqp: the channel that delivered the message is closed; the broker delivers it again",
    )
}

/// Settles one delivery on the channel it came from.
pub(super) struct AmqpAcker {
    pub(super) held: Option<Held>,
    pub(super) topic: Arc<str>,
    pub(super) group: Arc<str>,
    pub(super) delays: DelayQueue<Waiting>,
    /// Held until settled for good or back with the broker: counts the
    /// delivery against the prefetch (through a nack's delay too).
    pub(super) permit: Option<OwnedSemaphorePermit>,
    pub(super) handle: Handle,
}

impl AmqpAcker {
    fn held(&self) -> Result<&Held, Error> {
        self.held
            .as_ref()
            .ok_or_else(|| Error::closed("amqp delivery"))
    }
}

#[async_trait]
impl Acker for AmqpAcker {
    async fn ack(&mut self, _message: &RawMessage) -> Result<(), Error> {
        self.held()?.ack().await?;
        self.permit = None;
        Ok(())
    }

    /// The message waits in the subscription's timer queue and is handed
    /// out again after `delay` (see the module docs); this returns at once.
    async fn nack(&mut self, message: &RawMessage, delay: Duration) -> Result<(), Error> {
        self.held()?;
        let (Some(held), Some(permit)) = (self.held.take(), self.permit.take()) else {
            return Err(Error::closed("amqp delivery"));
        };
        let waiting = Waiting {
            held,
            message: message.clone(),
            permit,
        };
        if let Err(waiting) = self.delays.push(delay, waiting) {
            // The subscription is stopping: back to the broker now.
            waiting.requeue_after(delay).await;
        }
        Ok(())
    }

    async fn dead_letter(
        &mut self,
        message: &RawMessage,
        letter: &DeadLetter,
    ) -> Result<(), Error> {
        let held = self.held()?;
        let mut facts = vec![
            (properties::DLQ_REASON, letter.reason().to_owned()),
            (
                properties::DLQ_ATTEMPTS,
                letter.attempts().unwrap_or(held.attempt).to_string(),
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
        let properties =
            properties::with_headers(&held.properties, &facts, &[ATTEMPTS, REDELIVERIES]);
        let dlq = format!("{}{DLQ_SUFFIX}", held.queue);
        publish_direct(&held.shared, &dlq, &message.body, properties).await?;
        held.ack().await?;
        self.permit = None;
        Ok(())
    }

    /// Republished (confirmed) to the back of the group's queue with its
    /// give-back headers, for whichever consumer the broker hands it to
    /// next, and the original acked; its permit is then freed. The broker
    /// hands it out again at once: while no member that can read it has
    /// room, it goes round at the broker's pace until the subscription's
    /// [`GiveBackLimit`](crate::GiveBackLimit).
    async fn give_back(&mut self, message: &RawMessage, _reason: &str) -> Result<(), Error> {
        self.held()?.give_back(message).await?;
        self.held = None;
        self.permit = None;
        Ok(())
    }

    fn abandoned(&mut self, message: RawMessage) {
        // Left unsettled, the message would sit on this channel until it
        // closes; give it back now, one delivery without an outcome more,
        // with its attempts so far.
        let (Some(held), Some(permit)) = (self.held.take(), self.permit.take()) else {
            return;
        };
        let delays = self.delays.clone();
        self.handle.spawn(async move {
            if delays.is_closed() && !held.rehanded {
                // The subscription is going (a consumer aborted): its channel
                // closes once this permit is free and the broker takes the
                // message back, counted once. A reject or a copy now could
                // be delivered to this dying consumer first and be counted
                // twice.
            } else if held.shared.config.queue_type == QueueType::Quorum && !held.rehanded {
                // A quorum queue counts the return itself, exactly.
                if let Err(error) = held.reject_requeue().await {
                    tracing::debug!(%error, queue = &*held.queue, "amqp: an abandoned delivery returns with its channel");
                }
            } else {
                // A reject would lose the attempts counted here (a classic
                // queue only flags a return): a copy carries them.
                held.republish(&message.body, held.attempt, held.delivery_count)
                    .await;
            }
            drop(permit);
        });
    }
}
