//! Dead letters (strategy §6.3): when a handler gives up on a message, say why,
//! alert operations, and let them retry it by hand.
//!
//! The consume loop of [`EventBus::subscribe`](crate::EventBus::subscribe)
//! moves every message whose handler failed to its topic's dead-letter queue,
//! with the reason, the attempts, the last error and the time; the transport
//! adds the original topic and group. Without this layer the letter says
//! only "handler failed" with the broker's delivery count. [`DeadLettering`],
//! placed outside the retry layer (`dedupe ▸ dead_letter ▸ circuit_breaker ▸
//! retry ▸ timeout ▸ handler`), sees the error retry finally gave up with
//! and:
//!
//! * counts the attempts in all — the broker's deliveries before this one
//!   plus the in-process attempts the retry layer made ([`Error::attempts`]);
//! * names the reason: retries exhausted, or a failure not worth retrying;
//! * logs a `tracing` `error!`;
//! * attaches the facts to the error ([`Error::with_dead_letter`]), which the
//!   consume loop puts on the dead letter, and with them the
//!   [`DeadLetterAlert`] hook, which the consume loop calls only once the
//!   transport has accepted the dead letter — so a
//!   [`list`](crate::DeadLetters::list) made from the hook finds it.
//!   When the transport cannot take it (a lost connection), nobody is
//!   alerted: the message is delivered again, and alerted when it is
//!   finally stored. Called outside the consume loop, the layer raises no
//!   alert.
//!
//! An error that asks for a requeue ([`Error::requeue_after`]: an open
//! breaker, a duplicate in progress) is not a dead letter and passes through
//! untouched, for the loop to nack.
//!
//! [`EventBus::dead_letters`](crate::EventBus::dead_letters) is the
//! typed manual retry of one event type, in the bus's namespace: list,
//! inspect, read the payload, redrive by id, by a header value or all.
//! [`DeadLetterAdmin`] is the untyped one, by topic name, on any transport
//! that keeps dead letters. `examples/dlq.rs` is an
//! operator CLI over it. [`WebhookAlert`] (feature `http`) posts every
//! dead letter to a webhook or to Alertmanager; `docs/alerts/` has
//! Prometheus rules over the crate's metrics.

mod admin;
mod alert;
mod future;
mod layer;
#[cfg(feature = "http")]
mod webhook;

use std::fmt;
use std::sync::Arc;
use std::task::{Context, Poll};

use chrono::Utc;
use tower::Service;

pub use self::admin::DeadLetterAdmin;
pub use self::alert::{DeadLetterAlert, DeadLetterFacts, LogOnly};
pub use self::future::ResponseFuture;
pub use self::layer::DeadLetteringLayer;
#[cfg(feature = "http")]
#[cfg_attr(docsrs, doc(cfg(feature = "http")))]
pub use self::webhook::{DEAD_LETTER_ALERT_NAME, MAX_ALERTS_PER_POST, WebhookAlert, WebhookFormat};
use crate::bus::Message;
use crate::error::Error;
use crate::transport::DeadLetter;

/// A handler whose final failures carry dead-letter facts and raise an
/// alert; see the [module docs](self).
#[derive(Clone)]
pub struct DeadLettering<S> {
    inner: S,
    alert: Arc<dyn DeadLetterAlert>,
}

impl<S> DeadLettering<S> {
    /// `inner`, with `alert` told of every message it gives up on.
    pub fn new(inner: S, alert: Arc<dyn DeadLetterAlert>) -> Self {
        Self { inner, alert }
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

impl<S, E> Service<Message<E>> for DeadLettering<S>
where
    S: Service<Message<E>, Response = ()>,
    S::Error: Into<Error>,
{
    type Response = ();
    type Error = Error;
    type Future = ResponseFuture<S::Future, E>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, message: Message<E>) -> Self::Future {
        // A clone of the message is a few reference counts: kept to describe
        // it if the handler gives up.
        let future = self.inner.call(message.clone());
        ResponseFuture::new(future, message, self.alert.clone())
    }
}

/// Turns the error a handler gave up with into one carrying dead-letter
/// facts and the alert to raise once the letter is stored, logging it.
fn give_up<E>(message: &Message<E>, error: Error, alert: Arc<dyn DeadLetterAlert>) -> Error {
    // Neither is to be dead-lettered: a requeue comes back, and a message
    // held back behind an earlier one of its key goes back to its queue.
    if error.requeue_after().is_some() || error.is_held_back() {
        return error;
    }
    let tried = error.attempts().unwrap_or(1).max(1);
    let attempts = message.attempt().max(1) + tried - 1;
    let reason = if error.is_retryable() {
        format!("gave up after {tried} attempt(s): still failing")
    } else {
        "failed in a way that retrying cannot fix".to_owned()
    };
    let facts = DeadLetterFacts {
        topic: message.topic().to_owned(),
        group: message.group().to_owned(),
        event_id: message.event_id(),
        event_type: message.envelope().event_type().to_owned(),
        reason,
        attempts,
        last_error: error.to_string(),
        at: Utc::now(),
    };
    // The alert travels with the letter: the consume loop raises it, and logs
    // the dead-lettering, once the transport has accepted the letter, so
    // whoever it sends to the queue finds the message there.
    let letter = DeadLetter::new(facts.reason.clone())
        .with_attempts(attempts)
        .with_last_error(facts.last_error.clone())
        .with_alert(alert, facts);
    error.with_dead_letter(letter)
}

impl<S: fmt::Debug> fmt::Debug for DeadLettering<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DeadLettering")
            .field("inner", &self.inner)
            .field("alert", &self.alert)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;
    use std::time::Duration;

    use tower::{Layer, ServiceExt, service_fn};

    use super::*;
    use crate::config::RetryConfig;
    use crate::error::ErrorKind;
    use crate::middleware::retry::RetryLayer;
    use crate::middleware::test_support::{Ping, message};

    #[derive(Debug, Default)]
    struct Recorded(Mutex<Vec<DeadLetterFacts>>);

    impl DeadLetterAlert for Recorded {
        fn alert(&self, facts: &DeadLetterFacts) {
            self.0.lock().unwrap().push(facts.clone());
        }
    }

    #[tokio::test(start_paused = true)]
    async fn giving_up_after_retries_alerts_and_counts_every_attempt() {
        let alerts = Arc::new(Recorded::default());
        let handler = DeadLetteringLayer::new(alerts.clone()).layer(
            RetryLayer::for_messages(RetryConfig::default()).layer(service_fn(
                |_: Message<Ping>| async { Err::<(), _>(Error::transient("market down")) },
            )),
        );
        // The broker's second delivery: 1 earlier + 3 in-process attempts.
        let delivery = message(1, 2);
        let error = handler.oneshot(delivery.clone()).await.unwrap_err();
        let letter = error.dead_letter().expect("facts attached");
        assert_eq!(letter.attempts(), Some(4));
        assert!(letter.reason().contains("3 attempt"), "{}", letter.reason());
        assert!(letter.last_error().unwrap().contains("market down"));

        assert!(
            alerts.0.lock().unwrap().is_empty(),
            "no alert before the letter is stored"
        );
        letter.clone().take_alert().raise();
        let alerts = alerts.0.lock().unwrap();
        assert_eq!(alerts.len(), 1);
        assert_eq!(alerts[0].event_id, delivery.event_id());
        assert_eq!(alerts[0].topic, "test.ping");
        assert_eq!(alerts[0].group, "g");
        assert_eq!(alerts[0].event_type, "test.ping");
        assert_eq!(alerts[0].attempts, 4);
    }

    #[tokio::test]
    async fn a_permanent_failure_is_dead_lettered_after_one_attempt() {
        let alerts = Arc::new(Recorded::default());
        let handler =
            DeadLetteringLayer::new(alerts.clone()).layer(service_fn(|_: Message<Ping>| async {
                Err::<(), _>(Error::permanent("bad order"))
            }));
        let error = handler.oneshot(message(1, 1)).await.unwrap_err();
        assert_eq!(error.kind(), ErrorKind::Rejected);
        let letter = error.dead_letter().unwrap();
        assert_eq!(letter.attempts(), Some(1));
        assert!(letter.reason().contains("retrying cannot fix"));
        assert!(alerts.0.lock().unwrap().is_empty());
        letter.clone().take_alert().raise();
        assert_eq!(alerts.0.lock().unwrap().len(), 1);
    }

    #[tokio::test]
    async fn a_requeue_and_a_success_are_not_dead_letters() {
        let alerts = Arc::new(Recorded::default());
        let layer = DeadLetteringLayer::new(alerts.clone());
        let requeued = layer.layer(service_fn(|_: Message<Ping>| async {
            Err::<(), _>(Error::transient("in progress").with_requeue(Duration::from_secs(1)))
        }));
        let error = requeued.oneshot(message(1, 1)).await.unwrap_err();
        assert!(error.dead_letter().is_none());
        let fine = layer.layer(service_fn(|_: Message<Ping>| async { Ok::<_, Error>(()) }));
        fine.oneshot(message(2, 1)).await.unwrap();
        assert!(alerts.0.lock().unwrap().is_empty());
    }
}
