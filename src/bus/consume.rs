//! The consume loop: one task per subscription that decodes, hands each
//! message to the handler and settles it by the result (see the module docs
//! of [`bus`](super)).

use std::future::{Future, poll_fn};
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::Arc;

use futures_util::FutureExt;
use futures_util::stream::{FuturesUnordered, StreamExt};
use tokio::sync::{oneshot, watch};
use tower::Service;
use tracing::Instrument;

use super::{ConsumerHealth, Message};
use crate::codec::Codec;
use crate::envelope::Event;
use crate::error::{Error, ErrorKind};
use crate::observe::metrics;
use crate::transport::{DeadLetter, Delivery, Subscription};

type Settling = Pin<Box<dyn Future<Output = ()> + Send>>;

pub(super) struct ConsumeLoop<E, H> {
    pub(super) health: watch::Sender<ConsumerHealth>,
    pub(super) subscription: Subscription,
    pub(super) transport: &'static str,
    pub(super) handler: H,
    pub(super) codec: Codec,
    pub(super) concurrency: usize,
    pub(super) max_deliveries: Option<u32>,
    pub(super) _event: std::marker::PhantomData<fn() -> E>,
}

impl<E, H> ConsumeLoop<E, H>
where
    E: Event,
    H: Service<Message<E>, Response = ()> + Send + 'static,
    H::Error: Into<Error>,
    H::Future: Send + 'static,
{
    pub(super) async fn run(mut self, mut stopped: oneshot::Receiver<()>) -> Result<(), Error> {
        let mut in_flight = FuturesUnordered::<Settling>::new();
        let mut ready = false;
        let mut outcome = Ok(());
        loop {
            let room = in_flight.len() < self.concurrency;
            tokio::select! {
                biased;
                _ = &mut stopped => break,
                Some(()) = in_flight.next(), if !in_flight.is_empty() => {}
                readiness = poll_fn(|cx| {
                    let polled = self.handler.poll_ready(cx);
                    let now = if polled.is_pending() {
                        ConsumerHealth::Paused
                    } else {
                        ConsumerHealth::Running
                    };
                    self.health.send_if_modified(|health| {
                        std::mem::replace(health, now) != now
                    });
                    polled
                }), if room && !ready => {
                    match readiness {
                        Ok(()) => ready = true,
                        Err(error) => {
                            let error = error.into();
                            tracing::error!(
                                topic = self.subscription.topic(),
                                group = self.subscription.group(),
                                %error,
                                "handler failed for good; consumer stopping",
                            );
                            outcome = Err(error);
                            break;
                        }
                    }
                }
                delivery = self.subscription.recv(), if room && ready => match delivery {
                    Some(delivery) => {
                        let (settling, used_readiness) = self.start(delivery);
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
    fn start(&mut self, delivery: Delivery) -> (Settling, bool) {
        let (topic, group) = delivery.shared_names();
        // What reaches no handler, and why: past the poison guard, or not
        // an envelope of `E`.
        let count = delivery.delivery_count();
        let refused = if self.max_deliveries.is_some_and(|max| count > max) {
            Err(format!("delivered {} times without an outcome", count - 1))
        } else {
            self.codec
                .decode::<E>(delivery.body())
                .map_err(|error| format!("cannot decode as {}: {error}", E::TYPE))
        };
        let envelope = match refused {
            Ok(envelope) => envelope,
            Err(reason) => {
                let span = tracing::info_span!(
                    "consume",
                    event_type = E::TYPE,
                    topic = &*topic,
                    group = &*group,
                    attempt = delivery.attempt(),
                );
                let letter = DeadLetter::new(reason);
                let (transport, started) = (self.transport, std::time::Instant::now());
                let settling = async move {
                    let outcome = dead_letter(delivery, letter).await;
                    metrics::consumed(transport, topic, group, outcome, started.elapsed());
                };
                return (Box::pin(settling.instrument(span)), false);
            }
        };
        let span = tracing::info_span!(
            "consume",
            event_id = %envelope.event_id(),
            event_type = E::TYPE,
            topic = &*topic,
            group = &*group,
            attempt = delivery.attempt(),
        );
        #[cfg(feature = "otel")]
        crate::observe::trace::continue_from_headers(&span, envelope.headers());
        let (transport, started) = (self.transport, std::time::Instant::now());
        let labels = (topic.clone(), group.clone());
        let message = Message {
            envelope: Arc::new(envelope),
            topic,
            group,
            attempt: delivery.attempt(),
        };
        let call = span
            .in_scope(|| std::panic::catch_unwind(AssertUnwindSafe(|| self.handler.call(message))));
        let settling = async move {
            let result = match call {
                Ok(call) => match AssertUnwindSafe(call).catch_unwind().await {
                    Ok(result) => result.map_err(Into::into),
                    Err(_) => Err(Error::permanent("handler panicked")),
                },
                Err(_) => Err(Error::permanent("handler panicked")),
            };
            let outcome = settle(delivery, result).await;
            metrics::consumed(transport, labels.0, labels.1, outcome, started.elapsed());
        };
        (Box::pin(settling.instrument(span)), true)
    }
}

/// Settles a delivery by the handler's result (see the module docs).
/// Returns the `outcome` metric label.
async fn settle(delivery: Delivery, result: Result<(), Error>) -> &'static str {
    let error = match result {
        Ok(()) => {
            if let Err((error, _delivery)) = delivery.ack().await {
                // The delivery is dropped unsettled: the broker redelivers it.
                tracing::warn!(%error, "ack failed; the message will be delivered again");
                return "unsettled";
            }
            return "ack";
        }
        Err(error) => error,
    };
    if let Some(delay) = error.requeue_after() {
        match delivery.nack(delay).await {
            Ok(()) => return "nack",
            Err((nack_error, delivery)) => {
                tracing::warn!(%error, %nack_error, "cannot requeue; dead-lettering instead");
                return dead_letter(delivery, failure_letter(&error)).await;
            }
        }
    }
    dead_letter(delivery, failure_letter(&error)).await
}

/// The facts a failed message is dead-lettered with: those the handler's
/// dead-letter layer attached to the error, or a generic letter.
fn failure_letter(error: &Error) -> DeadLetter {
    match error.dead_letter() {
        Some(letter) => letter.clone(),
        None => DeadLetter::new("handler failed").with_last_error(error.to_string()),
    }
}

/// Dead-letters a delivery; where the transport has no dead-letter queue,
/// logs the loss and acks so the message cannot come back forever. Returns
/// the `outcome` metric label.
async fn dead_letter(delivery: Delivery, letter: DeadLetter) -> &'static str {
    let attempt = delivery.attempt();
    tracing::warn!(
        reason = letter.reason(),
        last_error = letter.last_error(),
        attempt,
        "dead-lettering message",
    );
    match delivery.dead_letter(letter.clone()).await {
        Ok(()) => "dead_letter",
        Err((error, delivery)) if error.kind() == ErrorKind::Unsupported => {
            tracing::error!(
                reason = letter.reason(),
                "transport keeps no dead letters; message dropped",
            );
            if let Err((error, _)) = delivery.ack().await {
                tracing::warn!(%error, "ack after failed handling also failed");
                return "unsettled";
            }
            "dropped"
        }
        Err((error, _delivery)) => {
            tracing::warn!(%error, "dead-letter failed; the message will be delivered again");
            "unsettled"
        }
    }
}
