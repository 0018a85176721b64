//! The consume loop of a subscription with an
//! [`OrderingKey`](crate::OrderingKey): one message per key in a handler,
//! different keys in parallel up to `concurrency`.
//!
//! A batch subscription lets a *run* of up to `max_messages` waiting
//! messages of a key out at once instead of one, so a hot key can batch
//! (see `key_run` for how the batcher keeps their order). The loop settles
//! a run's messages in their order: after one that was not acked, the later
//! ones are not settled but put back at the front of their key's queue, in
//! order, keeping their prefetch permits, and the key's next run starts only
//! once the one that failed is settled for good (acked after its retries,
//! or dead-lettered). A key with a run out is busy as a key with its one
//! message out is.
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

use std::collections::{HashMap, VecDeque};
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

mod keys;

use self::keys::{Keys, Retry, Starting};
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

/// A keyed message whose handling ended (or that was answered held back),
/// to be settled in its run's order.
struct Handled<E> {
    key: Arc<str>,
    index: usize,
    decoded: Decoded<E>,
    result: Result<(), Error>,
    since: Option<Instant>,
    started: std::time::Instant,
    /// Its `consume` span, which its settling goes on in.
    span: tracing::Span,
}

/// How a future of the loop ended.
enum Finished<E> {
    /// Settled (or handed to the transport); a keyed message names its key.
    Settled(Option<Arc<str>>),
    Handled(Box<Handled<E>>),
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
        let mut keys = Keys {
            queue: KeyedQueue::default(),
            out: HashMap::new(),
            starting: VecDeque::new(),
            places: self.key_run.is_some(),
        };
        let retries = DelayQueue::<Retrying<E>>::default();
        let mut ready = false;
        let mut outcome = Ok(());
        loop {
            let room = running.len() < self.concurrency;
            if room && ready {
                if let Some(member) = keys.starting.pop_front() {
                    let Starting {
                        key,
                        index,
                        decoded,
                        since,
                    } = member;
                    running.push(self.run_keyed(key, index, decoded, since));
                    ready = false;
                    continue;
                }
                // A run never takes the loop past its concurrency.
                let most = self
                    .key_run
                    .unwrap_or(1)
                    .min(self.concurrency - running.len());
                if let Some((key, members)) = keys.queue.next_run(most) {
                    keys.start_run(key, members, None);
                    continue;
                }
            }
            tokio::select! {
                biased;
                _ = &mut stopped => break,
                Some(finished) = running.next(), if !running.is_empty() => {
                    self.finish(finished, &mut keys, &retries, &mut running);
                }
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
                    let retrying = Retrying { key: key.clone(), decoded, since };
                    if let Some(out) = keys.out.get_mut(&key) {
                        out.retry = Retry::Due(Box::new(retrying));
                    }
                    keys.settle_key(&key);
                }
                delivery = self.subscription.recv(), if room && ready => {
                    let Some(delivery) = delivery else { break };
                    let decoded = match self.decode(delivery) {
                        Ok(decoded) => decoded,
                        Err(settling) => {
                            running.push(Box::pin(settling.map(|()| Finished::Settled(None))));
                            continue;
                        }
                    };
                    match key.key_of(decoded.message.envelope()).ok().flatten() {
                        None => {
                            running.push(self.run_unkeyed(decoded));
                            ready = false;
                        }
                        Some(key) => {
                            let key: Arc<str> = key.into();
                            if let Some(decoded) = keys.queue.arrive(key.clone(), decoded) {
                                keys.start_run(key, vec![decoded], None);
                            }
                        }
                    }
                }
            }
        }
        self.health.send_replace(ConsumerHealth::Stopped);
        // Let out but never handed to the handler: they go back, and with
        // them whatever of their runs comes after.
        while let Some(Starting {
            key,
            index,
            decoded,
            since,
        }) = keys.starting.pop_front()
        {
            let handled = Handled {
                key,
                index,
                decoded,
                result: Err(Error::held_back()),
                since,
                started: std::time::Instant::now(),
                span: tracing::Span::none(),
            };
            self.finish(
                Finished::Handled(Box::new(handled)),
                &mut keys,
                &retries,
                &mut running,
            );
        }
        while let Some(finished) = running.next().await {
            self.finish(finished, &mut keys, &retries, &mut running);
        }
        let mut unhandled: Vec<_> = retries
            .close()
            .into_iter()
            .map(|(r, _)| r.decoded.delivery)
            .collect();
        for out in keys.out.values_mut() {
            if let Retry::Due(retrying) = std::mem::replace(&mut out.retry, Retry::None) {
                unhandled.push(retrying.decoded.delivery);
            }
        }
        unhandled.extend(
            keys.starting
                .drain(..)
                .map(|member| member.decoded.delivery),
        );
        unhandled.extend(keys.queue.drain().into_iter().map(|d| d.delivery));
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

    /// What the loop does with a future that ended: a keyed message's
    /// handling is settled in its run's order.
    fn finish(
        &self,
        finished: Finished<E>,
        keys: &mut Keys<E>,
        retries: &DelayQueue<Retrying<E>>,
        running: &mut FuturesUnordered<Running<E>>,
    ) {
        let handled = match finished {
            Finished::Settled(None) => return,
            Finished::Settled(Some(key)) => {
                if let Some(out) = keys.out.get_mut(&key) {
                    out.settling -= 1;
                }
                keys.settle_key(&key);
                return;
            }
            Finished::Handled(handled) => *handled,
        };
        let key = handled.key.clone();
        let Some(out) = keys.out.get_mut(&key) else {
            return;
        };
        let index = handled.index;
        if let Some(slot) = out.results.get_mut(index) {
            *slot = Some(handled);
        }
        while let Some(Some(_)) = out.results.get(out.next) {
            let handled = out.results[out.next].take().expect("checked");
            let index = out.next;
            out.next += 1;
            let held_back = out.blocked
                || handled.result.as_ref().is_err_and(Error::is_held_back)
                || out.run.as_ref().is_some_and(|run| run.was_held_back(index));
            if held_back {
                // Behind an earlier message of its key that was not acked:
                // not settled, back in its place at the front of the queue.
                out.blocked = true;
                if let Some(run) = &out.run {
                    run.broken_at(index);
                }
                let Decoded {
                    delivery,
                    mut message,
                } = handled.decoded;
                message.place = None;
                keys.queue
                    .put_back(&key, out.put_back, Decoded { delivery, message });
                out.put_back += 1;
                continue;
            }
            let outcome = Outcome::of(&handled.result);
            if let Some(run) = &out.run {
                match outcome {
                    Outcome::Ack => run.done(index),
                    _ => run.broken_at(index),
                }
            }
            if outcome != Outcome::Ack {
                out.blocked = true;
            }
            match self.hold_for_retry(handled, outcome, &key) {
                Ok((retrying, after)) => match retries.push(after, retrying) {
                    Ok(()) => out.retry = Retry::Waiting,
                    // Closed only once nothing runs any more.
                    Err(retrying) => out.retry = Retry::Due(Box::new(retrying)),
                },
                Err(settling) => {
                    out.settling += 1;
                    running.push(settling);
                }
            }
        }
        keys.settle_key(&key);
    }

    /// A retry within [`RETRY_HOLD_LIMIT`] is held by the loop; anything
    /// else is settled by the future returned.
    fn hold_for_retry(
        &self,
        handled: Handled<E>,
        mut outcome: Outcome,
        key: &Arc<str>,
    ) -> Result<(Retrying<E>, Duration), Running<E>> {
        let Handled {
            decoded,
            since,
            started,
            span,
            ..
        } = handled;
        let (topic, group) = (
            decoded.message.shared_topic(),
            decoded.message.shared_group(),
        );
        let transport = self.transport;
        if let Outcome::Retry { after } = &outcome {
            let since = since.unwrap_or_else(Instant::now);
            if since.elapsed() < RETRY_HOLD_LIMIT {
                metrics::consumed(transport, topic, group, "nack", started.elapsed());
                let retrying = Retrying {
                    key: key.clone(),
                    decoded,
                    since,
                };
                return Ok((retrying, *after));
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
        let limit = self.give_back_limit;
        let key = key.clone();
        Err(Box::pin(
            async move {
                let label = settle(delivery, outcome, &limit).await;
                metrics::consumed(transport, topic, group, label, started.elapsed());
                Finished::Settled(Some(key))
            }
            .instrument(span),
        ))
    }

    /// Hands the `index`-th member of `key`'s run to the handler; the future
    /// resolves to its handling, for the loop to settle in order.
    fn run_keyed(
        &mut self,
        key: Arc<str>,
        index: usize,
        decoded: Decoded<E>,
        since: Option<Instant>,
    ) -> Running<E> {
        let (handled, span) = self.call(&decoded.message);
        let started = std::time::Instant::now();
        let settling_span = span.clone();
        Box::pin(
            async move {
                let result = handled.await;
                Finished::Handled(Box::new(Handled {
                    key,
                    index,
                    decoded,
                    result,
                    since,
                    started,
                    span: settling_span,
                }))
            }
            .instrument(span),
        )
    }

    /// Hands a message without a key to the handler and settles it.
    fn run_unkeyed(&mut self, decoded: Decoded<E>) -> Running<E> {
        let (handled, span) = self.call(&decoded.message);
        let (transport, started) = (self.transport, std::time::Instant::now());
        let limit = self.give_back_limit;
        Box::pin(
            async move {
                let result = handled.await;
                let (topic, group) = (
                    decoded.message.shared_topic(),
                    decoded.message.shared_group(),
                );
                let mut outcome = Outcome::of(&result);
                if let Outcome::Reject(letter) = &mut outcome {
                    letter.attempts.get_or_insert(decoded.message.attempt());
                }
                let label = settle(decoded.delivery, outcome, &limit).await;
                metrics::consumed(transport, topic, group, label, started.elapsed());
                Finished::Settled(None)
            }
            .instrument(span),
        )
    }
}
