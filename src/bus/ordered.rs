//! The consume loop of a subscription with an
//! [`OrderingKey`](crate::OrderingKey): one message per key in a handler,
//! different keys in parallel up to `concurrency`.
//!
//! Deliveries of a key that is busy wait in the subscription's
//! [`KeyedQueue`], each still holding its prefetch permit, so the prefetch
//! bounds them. A message whose outcome is a retry after a delay is **not**
//! nacked to the transport: the loop holds it (and its permit) in a timer
//! queue of its own and hands it to the handler again when the delay is
//! over, its key busy all the while. Why not the transport's nack: a
//! redelivery has to get back to this subscription before any later message
//! of its key may start, and a redelivery that needs a fresh permit can
//! never get one once every permit is held by later messages of the blocked
//! key (prefetch 8, a hot key, its first message retried: the other seven
//! wait for it while it waits for them). Held here it needs nothing new.
//!
//! A message retried for longer than [`RETRY_HOLD_LIMIT`] goes to the
//! transport's nack after all (a RabbitMQ consumer may not hold a message
//! unacked for ever): its key is released and later messages of the key may
//! overtake it; a warning says so.
//!
//! On stop, the handlers in flight finish; what waits behind a key or for a
//! retry goes back to the transport unhandled once the subscription has
//! stopped reading, as deliveries whose consumer went away — RabbitMQ
//! requeues them in their places when the channel closes, memory and Redis
//! Streams deliver them again with their delivery count one higher.

use std::future::{Future, poll_fn};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures_util::FutureExt;
use futures_util::stream::{FuturesUnordered, StreamExt};
use tokio::sync::oneshot;
use tokio::time::Instant;
use tower::Service;
use tracing::Instrument;

use super::consume::{ConsumeLoop, Decoded, settle};
use super::keyed_queue::KeyedQueue;
use super::{ConsumerHealth, Message};
use crate::envelope::Event;
use crate::error::Error;
use crate::observe::metrics;
use crate::outcome::Outcome;
use crate::transport::OrderingKey;
use crate::transport::delay::DelayQueue;

/// How long an ordered subscription keeps retrying a message itself before
/// it nacks it to the transport and lets its key go on (10 minutes: well
/// under RabbitMQ's default `consumer_timeout` of 30).
pub(crate) const RETRY_HOLD_LIMIT: Duration = Duration::from_secs(10 * 60);

/// A message waiting out a retry's delay, its key busy.
struct Retrying<E> {
    key: Arc<str>,
    decoded: Decoded<E>,
    /// When it was first retried.
    since: Instant,
}

/// How a message out of the loop ended.
enum Finished<E> {
    /// Settled for good (or handed to the transport): its key, if any, may
    /// go on.
    Done(Option<Arc<str>>),
    /// To be handled again after the delay, its key still busy.
    Retry(Retrying<E>, Duration),
}

type Running<E> = Pin<Box<dyn Future<Output = Finished<E>> + Send>>;

impl<E, H> ConsumeLoop<E, H>
where
    E: Event,
    H: Service<Message<E>, Response = ()> + Send + 'static,
    H::Error: Into<Error>,
    H::Future: Send + 'static,
{
    pub(super) async fn run_ordered(
        mut self,
        key: OrderingKey,
        mut stopped: oneshot::Receiver<()>,
    ) -> Result<(), Error> {
        let mut running = FuturesUnordered::<Running<E>>::new();
        let mut queue = KeyedQueue::<Decoded<E>>::default();
        let retries = DelayQueue::<Retrying<E>>::default();
        let mut ready = false;
        let mut outcome = Ok(());
        loop {
            let room = running.len() < self.concurrency;
            if room
                && ready
                && let Some((key, decoded)) = queue.next_ready()
            {
                running.push(self.run_keyed(Some(key), decoded, None));
                ready = false;
                continue;
            }
            tokio::select! {
                biased;
                _ = &mut stopped => break,
                Some(finished) = running.next(), if !running.is_empty() => match finished {
                    Finished::Done(Some(key)) => queue.release(&key),
                    Finished::Done(None) => {}
                    Finished::Retry(retrying, after) => {
                        if let Err(retrying) = retries.push(after, retrying) {
                            // Only closed below, after the loop.
                            queue.release(&retrying.key);
                        }
                    }
                },
                readiness = poll_fn(|cx| Self::poll_handler(&mut self.handler, &self.health, cx)), if room && !ready => {
                    match readiness {
                        Ok(()) => ready = true,
                        Err(error) => {
                            outcome = Err(self.failed_for_good(error));
                            break;
                        }
                    }
                }
                retrying = retries.next_due(), if room && ready => {
                    let Retrying { key, decoded: Decoded { delivery, message }, since } = retrying;
                    let attempt = message.attempt().saturating_add(1);
                    let decoded = Decoded { delivery, message: message.with_attempt(attempt) };
                    running.push(self.run_keyed(Some(key), decoded, Some(since)));
                    ready = false;
                }
                delivery = self.subscription.recv(), if room && ready => {
                    let Some(delivery) = delivery else { break };
                    let decoded = match self.decode(delivery) {
                        Ok(decoded) => decoded,
                        Err(settling) => {
                            running.push(Box::pin(settling.map(|()| Finished::Done(None))));
                            continue;
                        }
                    };
                    let key_of = key.key_of(decoded.message.envelope()).ok().flatten();
                    match key_of {
                        None => {
                            running.push(self.run_keyed(None, decoded, None));
                            ready = false;
                        }
                        Some(key) => {
                            let key: Arc<str> = key.into();
                            if let Some(decoded) = queue.arrive(key.clone(), decoded) {
                                running.push(self.run_keyed(Some(key), decoded, None));
                                ready = false;
                            }
                        }
                    }
                }
            }
        }
        self.health.send_replace(ConsumerHealth::Stopped);
        let mut unhandled = Vec::new();
        while let Some(finished) = running.next().await {
            if let Finished::Retry(retrying, _) = finished {
                unhandled.push(retrying.decoded.delivery);
            }
        }
        unhandled.extend(retries.close().into_iter().map(|(r, _)| r.decoded.delivery));
        unhandled.extend(queue.drain().into_iter().map(|d| d.delivery));
        if !unhandled.is_empty() {
            tracing::debug!(
                topic = self.subscription.topic(),
                group = self.subscription.group(),
                count = unhandled.len(),
                "stopping: messages held for their key go back unhandled",
            );
        }
        // Stop reading first, so the transport treats what is dropped next
        // as deliveries of a consumer that went away.
        let (_, _, deliveries, drain) = self.subscription.into_parts();
        drop(deliveries);
        drop(unhandled);
        outcome.and(drain.await)
    }

    /// Hands `decoded` to the handler; the future settles it — unless the
    /// outcome is a retry of a keyed message within [`RETRY_HOLD_LIMIT`],
    /// which comes back to the loop to be held.
    fn run_keyed(
        &mut self,
        key: Option<Arc<str>>,
        decoded: Decoded<E>,
        since: Option<Instant>,
    ) -> Running<E> {
        let (handled, span) = self.call(&decoded.message);
        let (transport, started) = (self.transport, std::time::Instant::now());
        let limit = self.give_back_limit;
        let finishing = async move {
            let result = handled.await;
            let mut outcome = Outcome::of(&result);
            let (topic, group) = (
                decoded.message.shared_topic(),
                decoded.message.shared_group(),
            );
            if let (Outcome::Retry { after }, Some(key)) = (&outcome, &key) {
                let since = since.unwrap_or_else(Instant::now);
                if since.elapsed() < RETRY_HOLD_LIMIT {
                    metrics::consumed(transport, topic, group, "nack", started.elapsed());
                    let retrying = Retrying {
                        key: key.clone(),
                        decoded,
                        since,
                    };
                    return Finished::Retry(retrying, *after);
                }
                tracing::warn!(
                    key = &**key,
                    held_for = ?since.elapsed(),
                    "retried in order for too long; nacked to the transport, later messages of its key may overtake it",
                );
            }
            let Decoded { delivery, message } = decoded;
            if let Outcome::Reject(letter) = &mut outcome {
                // Retries held here are attempts the transport never saw.
                letter.attempts.get_or_insert(message.attempt());
            }
            let label = settle(delivery, outcome, &limit).await;
            metrics::consumed(transport, topic, group, label, started.elapsed());
            Finished::Done(key)
        };
        Box::pin(finishing.instrument(span))
    }
}
