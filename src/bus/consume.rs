//! The consume loop: one task per subscription that decodes, hands each
//! message to the handler and settles it by the result (see the module docs
//! of [`bus`](super)).

use std::future::{Future, poll_fn};
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::Arc;

use futures_util::FutureExt;
use futures_util::stream::{FuturesUnordered, StreamExt};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, oneshot, watch};
use tower::Service;
use tracing::Instrument;

use super::{ConsumerHealth, Message};
use crate::codec::{Codec, DecodeError};
use crate::envelope::{Event, EventEnvelope};
use crate::error::Error;
use crate::observe::metrics;
use crate::outcome::Outcome;
use crate::transport::{Delivery, GiveBackLimit, OrderingKey, Settled, Subscription};

pub(super) type Settling = Pin<Box<dyn Future<Output = ()> + Send>>;

/// How many settles may be on their way beyond the handlers running, unless
/// the subscription says otherwise. A few are enough for acks to go out
/// together; more would only hold more transport work at once (lapin, for
/// one, runs each ack as a task). A Redis Streams subscription allows its
/// whole prefetch: it sends every ack waiting as one `XACK`, so the batch
/// grows to what the handlers finish in one round trip.
const SETTLES_IN_FLIGHT: usize = 8;

/// A delivery decoded for `E`, with the message its handler gets.
pub(super) struct Decoded<E> {
    pub(super) delivery: Delivery,
    pub(super) message: Message<E>,
}

pub(super) struct ConsumeLoop<E, H> {
    pub(super) health: watch::Sender<ConsumerHealth>,
    /// In flight, handled, failed, last error: for status pages.
    pub(super) counters: Arc<super::stats::Counters>,
    pub(super) subscription: Subscription,
    pub(super) transport: &'static str,
    /// The subscription's consume metrics, shared by its settling futures.
    pub(super) metrics: Arc<metrics::ConsumeMetrics>,
    pub(super) handler: H,
    pub(super) codec: Codec,
    pub(super) concurrency: usize,
    pub(super) max_deliveries: Option<u32>,
    pub(super) give_back_limit: GiveBackLimit,
    /// Set: handled one message per key at a time (see `ordered`).
    pub(super) ordering_key: Option<OrderingKey>,
    /// Set for a batch subscription with an ordering key: up to this many
    /// messages of a key out at once, as a run (see `key_run`).
    pub(super) key_run: Option<usize>,
    pub(super) _event: std::marker::PhantomData<fn() -> E>,
}

impl<E, H> ConsumeLoop<E, H>
where
    E: Event,
    H: Service<Message<E>, Response = ()> + Send + 'static,
    H::Error: Into<Error>,
    H::Future: Send + 'static,
{
    pub(super) async fn run(mut self, stopped: oneshot::Receiver<()>) -> Result<(), Error> {
        if let Some(key) = self.ordering_key.take() {
            return self.run_ordered(key, stopped).await;
        }
        self.run_unordered(stopped).await
    }

    /// Handlers run at most `concurrency` at a time, each holding a permit
    /// of `handlers` from before its delivery is taken until the handler's
    /// future resolves. The settle that follows (an XACK, a basic.ack) runs
    /// on without the permit, so with `concurrency` 1 the next message is
    /// handed out while the previous ack is on its way: handlers still run
    /// one at a time and in order, and a delivery whose ack has not landed
    /// is still unsettled — dropped by a crash, the broker delivers it
    /// again. Settles in flight are bounded by the prefetch (a delivery
    /// holds its prefetch permit until settled) and by
    /// [`SETTLES_IN_FLIGHT`] (or the subscription's own bound).
    async fn run_unordered(mut self, mut stopped: oneshot::Receiver<()>) -> Result<(), Error> {
        let mut in_flight = FuturesUnordered::<Settling>::new();
        let handlers = Arc::new(Semaphore::new(self.concurrency.min(Semaphore::MAX_PERMITS)));
        let mut permit: Option<OwnedSemaphorePermit> = None;
        let settles = self
            .subscription
            .settles_in_flight()
            .unwrap_or(SETTLES_IN_FLIGHT);
        let most_in_flight = self.concurrency.saturating_add(settles);
        let mut ready = false;
        let mut outcome = Ok(());
        loop {
            let room = in_flight.len() < most_in_flight;
            let may_take = room && permit.is_some();
            tokio::select! {
                biased;
                _ = &mut stopped => break,
                Some(()) = in_flight.next(), if !in_flight.is_empty() => {}
                acquired = handlers.clone().acquire_owned(), if permit.is_none() => {
                    permit = acquired.ok();
                }
                readiness = poll_fn(|cx| Self::poll_handler(&mut self.handler, &self.health, cx)), if may_take && !ready => {
                    match readiness {
                        Ok(()) => ready = true,
                        Err(error) => {
                            outcome = Err(self.failed_for_good(error));
                            break;
                        }
                    }
                }
                delivery = self.subscription.recv(), if may_take && ready => match delivery {
                    Some(delivery) => {
                        let handler_permit = permit.take();
                        let (settling, used_readiness) = self.start(delivery, handler_permit);
                        ready &= !used_readiness;
                        in_flight.push(settling);
                    }
                    None => break,
                },
            }
        }
        self.health.send_replace(ConsumerHealth::Stopped);
        while in_flight.next().await.is_some() {}
        let drained = self.subscription.shutdown().await;
        outcome.and(drained)
    }

    /// Decodes a delivery and starts handling it; returns the future that
    /// handles and settles it, and whether it used the handler's readiness.
    /// `handler_permit` is given up as soon as the handler's future has
    /// resolved (or at once for a delivery that reaches no handler).
    fn start(
        &mut self,
        delivery: Delivery,
        handler_permit: Option<OwnedSemaphorePermit>,
    ) -> (Settling, bool) {
        let decoded = match self.decode(delivery) {
            Ok(decoded) => decoded,
            Err(settling) => return (settling, false),
        };
        let (handled, span) = self.call(&decoded.message);
        let (recorder, started) = (self.metrics.clone(), std::time::Instant::now());
        let limit = self.give_back_limit;
        let settling = async move {
            let result = handled.await;
            drop(handler_permit);
            let Decoded { delivery, message } = decoded;
            let label = settle(delivery, Outcome::of(&result), &limit).await;
            recorder.record(&message.topic, label, started.elapsed());
        };
        (Box::pin(settling.instrument(span)), true)
    }

    /// The delivery with its message for the handler, or — when it must not
    /// reach the handler (see [`refusal`](Self::refusal)) — the future that
    /// settles it.
    pub(super) fn decode(&self, delivery: Delivery) -> Result<Decoded<E>, Settling> {
        let (topic, group) = delivery.shared_names();
        match self.refusal(&delivery) {
            Ok(envelope) => {
                let message = Message {
                    envelope: Arc::new(envelope),
                    topic,
                    group,
                    attempt: delivery.attempt(),
                    place: None,
                };
                Ok(Decoded { delivery, message })
            }
            Err(outcome) => {
                let span = tracing::info_span!(
                    "consume",
                    event_type = E::TYPE,
                    topic = &*topic,
                    group = &*group,
                    attempt = delivery.attempt(),
                );
                let (transport, started) = (self.transport, std::time::Instant::now());
                let limit = self.give_back_limit;
                let settling = async move {
                    let label = settle(delivery, outcome, &limit).await;
                    metrics::consumed(transport, topic, group, label, started.elapsed());
                };
                Err(Box::pin(settling.instrument(span)))
            }
        }
    }

    /// Calls the handler with `message` (using its readiness); returns what
    /// the handler's future resolves to — a panic is a permanent error —
    /// and the message's `consume` span.
    pub(super) fn call(
        &mut self,
        message: &Message<E>,
    ) -> (
        impl Future<Output = Result<(), Error>> + Send + 'static,
        tracing::Span,
    ) {
        let span = tracing::info_span!(
            "consume",
            event_id = %message.event_id(),
            event_type = E::TYPE,
            topic = message.topic(),
            group = message.group(),
            attempt = message.attempt(),
        );
        // With its `consume` span filtered out, the handler still runs in
        // the publisher's context (attached as an OpenTelemetry context).
        #[cfg(feature = "otel")]
        let context =
            crate::observe::trace::continue_from_headers(&span, message.envelope().headers());
        let call = span.in_scope(|| {
            #[cfg(feature = "otel")]
            let _attached = context.clone().attach();
            std::panic::catch_unwind(AssertUnwindSafe(|| self.handler.call(message.clone())))
        });
        let counters = self.counters.clone();
        counters.started();
        let handled = async move {
            let result = match call {
                Ok(call) => match AssertUnwindSafe(call).catch_unwind().await {
                    Ok(result) => result.map_err(Into::into),
                    Err(_) => Err(Error::permanent("handler panicked")),
                },
                Err(_) => Err(Error::permanent("handler panicked")),
            };
            counters.finished(&result);
            result
        };
        #[cfg(feature = "otel")]
        let handled = opentelemetry::context::FutureExt::with_context(handled, context);
        (handled, span)
    }

    /// Polls the handler's readiness and reports it as the consumer's
    /// health (paused while the handler is not ready). Takes the two fields
    /// rather than `self`, so the subscription can be polled beside it.
    pub(super) fn poll_handler(
        handler: &mut H,
        health: &watch::Sender<ConsumerHealth>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), H::Error>> {
        let polled = handler.poll_ready(cx);
        let now = if polled.is_pending() {
            ConsumerHealth::Paused
        } else {
            ConsumerHealth::Running
        };
        health.send_if_modified(|health| std::mem::replace(health, now) != now);
        polled
    }

    /// The error a handler that failed for good stops the consumer with.
    pub(super) fn failed_for_good(&self, error: H::Error) -> Error {
        let error = error.into();
        tracing::error!(
            topic = self.subscription.topic(),
            group = self.subscription.group(),
            %error,
            "handler failed for good; consumer stopping",
        );
        error
    }

    /// The envelope of `E` in `delivery`, or the outcome of a delivery that
    /// reaches no handler: past the poison guard or malformed (rejected at
    /// once), or of a major version this consumer does not know (given back
    /// to the group, within its limit).
    fn refusal(&self, delivery: &Delivery) -> Result<EventEnvelope<E>, Outcome> {
        let count = delivery.delivery_count();
        if self.max_deliveries.is_some_and(|max| count > max) {
            let reason = format!("delivered {} times without an outcome", count - 1);
            return Err(Outcome::reject(reason));
        }
        match self.codec.decode::<E>(delivery.body()) {
            Ok(envelope) => Ok(envelope),
            Err(DecodeError::UnsupportedVersion { found, supported }) => {
                if let Some(why) = self.give_back_limit.exceeded(delivery) {
                    return Err(Outcome::reject(format!(
                        "no member of group {:?} knows version {found} of {}: {why}",
                        delivery.group(),
                        E::TYPE,
                    )));
                }
                Err(Outcome::GiveBack {
                    reason: format!(
                        "this consumer reads version {supported} of {}, not {found}",
                        E::TYPE
                    ),
                })
            }
            Err(error) => Err(Outcome::reject(format!(
                "cannot decode as {}: {error}",
                E::TYPE
            ))),
        }
    }
}

/// Settles a delivery by `outcome` (see [`Outcome`]); a give-back past the
/// subscription's limit is a rejection. A rejection's alert is raised once
/// the transport has settled it. Returns the `outcome` metric label.
pub(super) async fn settle(
    delivery: Delivery,
    outcome: Outcome,
    limit: &GiveBackLimit,
) -> &'static str {
    let attempt = delivery.attempt();
    let mut outcome = match outcome {
        Outcome::GiveBack { reason } => match limit.exceeded(&delivery) {
            Some(why) => Outcome::reject(format!(
                "no member of group {:?} could take it ({reason}): {why}",
                delivery.group()
            )),
            None => {
                tracing::debug!(%reason, given_back = delivery.given_back(), "giving the message back to the group");
                Outcome::GiveBack { reason }
            }
        },
        outcome => outcome,
    };
    let mut rejected = None;
    if let Outcome::Reject(letter) = &mut outcome {
        // Copied only for a rejection: the message's facts are gone once
        // `settle` has taken the delivery.
        rejected = Some((
            letter.take_alert(),
            letter.reason().to_owned(),
            letter.last_error().map(str::to_owned),
            delivery.topic().to_owned(),
            delivery.group().to_owned(),
        ));
    }
    let asked = outcome.name();
    match delivery.settle(outcome).await {
        Ok(settled) => {
            // Only now: the transport holds the dead letter (or has told the
            // sender), so whoever the alert sends to the queue finds it. One
            // line per rejected message, saying where it went; a drop is
            // logged where it happens.
            if let Some((alert, reason, last_error, topic, group)) = rejected {
                match settled {
                    Settled::DeadLettered => tracing::error!(
                        %topic, %group, %reason, last_error = last_error.as_deref(), attempt, "message dead-lettered"
                    ),
                    Settled::Refused => tracing::warn!(
                        %topic, %group, %reason, last_error = last_error.as_deref(), attempt, "message refused to its sender"
                    ),
                    _ => {}
                }
                alert.raise();
            }
            settled.label()
        }
        Err(failed) => {
            let error = failed.error();
            // Dropped unsettled: the transport delivers it again.
            tracing::warn!(%error, outcome = asked, "cannot settle the message; it will be delivered again");
            "unsettled"
        }
    }
}
