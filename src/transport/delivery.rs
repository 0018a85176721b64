//! What transports carry ([`RawMessage`]), what a subscriber receives
//! ([`Delivery`]) and the live stream of them ([`Subscription`]).

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;

use chrono::{DateTime, SecondsFormat, Utc};

use crate::envelope::Headers;
use crate::error::{Error, ErrorKind};
use crate::outcome::Outcome;
use crate::transport::header;

/// The bytes a transport moves: a body (the envelope JSON, for the typed bus)
/// and string headers.
///
/// ```
/// use switchboard::RawMessage;
///
/// let message = RawMessage::new(r#"{"hello":"world"}"#).with_header("correlation-id", "7");
/// assert_eq!(message.headers["correlation-id"], "7");
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RawMessage {
    /// Transport-level headers. The typed bus sets
    /// [`header::EVENT_ID`](crate::header::EVENT_ID) and
    /// [`header::EVENT_TYPE`](crate::header::EVENT_TYPE) so transports can
    /// index messages without parsing the body.
    pub headers: Headers,
    /// The payload bytes.
    pub body: Bytes,
}

impl RawMessage {
    /// A message with `body` and no headers.
    pub fn new(body: impl Into<Bytes>) -> Self {
        Self {
            headers: Headers::new(),
            body: body.into(),
        }
    }

    /// Adds or replaces one header.
    pub fn with_header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.insert(name.into(), value.into());
        self
    }
}

pub use crate::dead_letter::DeadLetter;

/// The transport's side of a [`Delivery`]: how to settle it.
///
/// Implemented by each transport; users call the methods on [`Delivery`].
/// Methods take `&mut self` so that a failed call can be tried again. A
/// transport that cannot do an operation returns
/// [`ErrorKind::Unsupported`](crate::ErrorKind::Unsupported) — never `Ok`
/// without doing it. An acker dropped without being settled must leave the
/// message to be delivered again (at-least-once transports) or lost
/// (at-most-once ones), as the transport's capabilities say.
#[async_trait]
pub trait Acker: Send + Sync {
    /// The message was handled: forget it.
    async fn ack(&mut self, message: &RawMessage) -> Result<(), Error>;

    /// [`ack`](Self::ack) done at once, for a transport whose ack needs no
    /// waiting (no broker round trip): `Some` with its result, which
    /// [`Delivery::ack`] takes instead of calling `ack` (so without the
    /// boxed future `ack` costs). The default, `None`, says to call `ack`.
    fn ack_at_once(&mut self, message: &RawMessage) -> Option<Result<(), Error>> {
        let _ = message;
        None
    }
    /// Deliver the message again after `delay`, with its attempt count raised.
    async fn nack(&mut self, message: &RawMessage, delay: Duration) -> Result<(), Error>;
    /// Move the message to the dead-letter queue with `letter`'s facts, then
    /// forget the original. `letter.attempts()` is always set.
    async fn dead_letter(&mut self, message: &RawMessage, letter: &DeadLetter)
    -> Result<(), Error>;

    /// Give the message back to its group, for another member to take: the
    /// prefetch permit is freed at once and the lease (where there is one)
    /// no longer renewed. `message` carries the raised
    /// [`header::GIVEN_BACK`] and [`header::GIVEN_BACK_AT`], which the
    /// transport keeps with the message so the next member sees them; the
    /// delivery's attempt and delivery counts stay as they were (a
    /// give-back is neither an attempt nor a delivery without an outcome).
    ///
    /// `reason` says why this consumer cannot take it, for the transport to
    /// pass on where someone hears it (a push publisher). The default says
    /// [`ErrorKind::Unsupported`].
    async fn give_back(&mut self, message: &RawMessage, reason: &str) -> Result<(), Error> {
        let _ = (message, reason);
        Err(Error::new(
            ErrorKind::Unsupported,
            "this transport cannot give a message back to its group",
        ))
    }

    /// Where the transport keeps no dead letters ([`dead_letter`](Self::dead_letter)
    /// said `Unsupported`): tell whoever can hear it that the message was
    /// refused for good, then forget it. A push receiver answers its
    /// publisher with a non-retryable error naming `letter`'s reason.
    ///
    /// The default says [`ErrorKind::Unsupported`]: nobody can hear it (the
    /// message is then acked and its loss logged).
    async fn reject(&mut self, message: &RawMessage, letter: &DeadLetter) -> Result<(), Error> {
        let _ = (message, letter);
        Err(Error::new(
            ErrorKind::Unsupported,
            "this transport has nobody to report a rejection to",
        ))
    }

    /// Called when the [`Delivery`] is dropped without being settled (a
    /// handler panicked, a subscriber shut down mid-message). The default
    /// does nothing and leaves the message to the broker's own redelivery;
    /// a transport that would otherwise hold it forever gives it back here.
    fn abandoned(&mut self, message: RawMessage) {
        let _ = message;
    }
}

/// One message handed to a subscriber, to be settled exactly once with
/// [`ack`](Delivery::ack), [`nack`](Delivery::nack),
/// [`give_back`](Delivery::give_back) or
/// [`dead_letter`](Delivery::dead_letter) — or by an [`Outcome`] with
/// [`settle`](Delivery::settle), which falls back the same way everywhere
/// when the transport cannot do what the outcome asks.
///
/// Each of those consumes the delivery and, on failure, hands it back with the
/// error so the caller can try again or choose another way to settle it.
pub struct Delivery {
    message: RawMessage,
    topic: Arc<str>,
    group: Arc<str>,
    attempt: u32,
    delivery_count: u32,
    acker: Box<dyn Acker>,
    settled: bool,
}

pub use super::settle_error::SettleError;

impl Delivery {
    /// Used by transports to hand out a message. `attempt` starts at 1.
    pub fn new(
        message: RawMessage,
        topic: Arc<str>,
        group: Arc<str>,
        attempt: u32,
        acker: Box<dyn Acker>,
    ) -> Self {
        Self {
            message,
            topic,
            group,
            attempt,
            delivery_count: 1,
            acker,
            settled: false,
        }
    }

    /// Used by transports that count deliveries which ended without an
    /// outcome: `count` is 1 the first time and one more after each crash,
    /// lost connection or delivery dropped unsettled — but not after a
    /// nack, which is an outcome.
    pub fn with_delivery_count(mut self, count: u32) -> Self {
        self.delivery_count = count.max(1);
        self
    }

    /// The message.
    pub fn message(&self) -> &RawMessage {
        &self.message
    }

    /// The message body.
    pub fn body(&self) -> &Bytes {
        &self.message.body
    }

    /// The message headers.
    pub fn headers(&self) -> &Headers {
        &self.message.headers
    }

    /// The topic it was published to.
    pub fn topic(&self) -> &str {
        &self.topic
    }

    /// The consumer group it was delivered to.
    pub fn group(&self) -> &str {
        &self.group
    }

    pub(crate) fn shared_names(&self) -> (Arc<str>, Arc<str>) {
        (self.topic.clone(), self.group.clone())
    }

    /// Which delivery of this message this is: 1 the first time, more after a
    /// nack or a redelivery.
    pub fn attempt(&self) -> u32 {
        self.attempt
    }

    /// How many times the broker has handed this message out without an
    /// outcome (ack, nack or dead-letter) coming back, this time included:
    /// 1 unless an earlier delivery was lost to a crash, a lost connection
    /// or a delivery dropped unsettled. Transports that cannot count say 1.
    /// [`SubscribeOptions::max_deliveries`] is checked against it.
    pub fn delivery_count(&self) -> u32 {
        self.delivery_count
    }

    /// Acknowledges the message: it will not be delivered to this group again.
    pub async fn ack(mut self) -> Result<(), SettleError> {
        let acked = match self.acker.ack_at_once(&self.message) {
            Some(acked) => acked,
            None => self.acker.ack(&self.message).await,
        };
        match acked {
            Ok(()) => {
                self.settled = true;
                Ok(())
            }
            Err(error) => Err(SettleError::new(error, self)),
        }
    }

    /// Gives the message back, to be delivered again after `delay`.
    pub async fn nack(mut self, delay: Duration) -> Result<(), SettleError> {
        match self.acker.nack(&self.message, delay).await {
            Ok(()) => {
                self.settled = true;
                Ok(())
            }
            Err(error) => Err(SettleError::new(error, self)),
        }
    }

    /// Moves the message to its topic's dead-letter queue with the reason and
    /// attempts (the delivery's own `attempt` unless the letter says more).
    pub async fn dead_letter(mut self, letter: impl Into<DeadLetter>) -> Result<(), SettleError> {
        let mut letter = letter.into();
        letter.attempts.get_or_insert(self.attempt);
        match self.acker.dead_letter(&self.message, &letter).await {
            Ok(()) => {
                self.settled = true;
                Ok(())
            }
            Err(error) => Err(SettleError::new(error, self)),
        }
    }

    /// How many times members of the group have given this message back
    /// ([`give_back`](Self::give_back)) before this delivery: 0 unless its
    /// [`header::GIVEN_BACK`] says more.
    pub fn given_back(&self) -> u32 {
        self.message
            .headers
            .get(header::GIVEN_BACK)
            .and_then(|times| times.parse().ok())
            .unwrap_or(0)
    }

    /// When the message was first given back, if it was
    /// ([`header::GIVEN_BACK_AT`]).
    pub fn given_back_since(&self) -> Option<DateTime<Utc>> {
        let at = self.message.headers.get(header::GIVEN_BACK_AT)?;
        DateTime::parse_from_rfc3339(at)
            .ok()
            .map(|at| at.with_timezone(&Utc))
    }

    /// Gives the message back to its group for another member to take
    /// (this consumer cannot read it: an envelope of a major version it does
    /// not know; `reason` says so). The prefetch permit is freed at once and the message is
    /// no longer lease-renewed; the count in [`header::GIVEN_BACK`] goes up
    /// by one and [`header::GIVEN_BACK_AT`] keeps the time of the first
    /// give-back, which [`GiveBackLimit`] checks.
    ///
    /// Where the message goes: memory — back in the group's queue, visible
    /// to its members after a short pause that doubles with each give-back
    /// (10 ms up to 1 s), so a member that cannot read it never spins on
    /// it; Redis Streams — left pending with its idle time at `claim_idle`,
    /// so the next `XAUTOCLAIM` of any member takes it (at most every
    /// `claim_every`); RabbitMQ — republished to the back of the group's
    /// queue, the original acked; push — answered as retryable to the
    /// publisher, which sends it again (a load balancer may pick a newer
    /// replica). A transport that cannot says [`ErrorKind::Unsupported`].
    pub async fn give_back(mut self, reason: &str) -> Result<(), SettleError> {
        let times = self.given_back().saturating_add(1);
        let before = (
            self.message.headers.get(header::GIVEN_BACK).cloned(),
            self.message.headers.get(header::GIVEN_BACK_AT).cloned(),
        );
        if self.given_back_since().is_none() {
            let now = Utc::now().to_rfc3339_opts(SecondsFormat::Millis, true);
            self.message
                .headers
                .insert(header::GIVEN_BACK_AT.to_owned(), now);
        }
        self.message
            .headers
            .insert(header::GIVEN_BACK.to_owned(), times.to_string());
        match self.acker.give_back(&self.message, reason).await {
            Ok(()) => {
                self.settled = true;
                Ok(())
            }
            Err(error) => {
                for (name, value) in [
                    (header::GIVEN_BACK, before.0),
                    (header::GIVEN_BACK_AT, before.1),
                ] {
                    match value {
                        Some(value) => self.message.headers.insert(name.to_owned(), value),
                        None => self.message.headers.remove(name),
                    };
                }
                Err(SettleError::new(error, self))
            }
        }
    }

    /// Settles the message by `outcome` (see [the table](Outcome)),
    /// and when the transport cannot do what it asks, the same way on
    /// every transport:
    ///
    /// * [`Retry`](Outcome::Retry) that cannot nack → a rejection;
    /// * [`GiveBack`](Outcome::GiveBack) that cannot give back → a
    ///   rejection saying so;
    /// * [`Reject`](Outcome::Reject) without a dead-letter queue → reported
    ///   to whoever can hear it ([`Settled::Refused`]: a push publisher
    ///   gets a non-retryable error with the reason), and only where nobody
    ///   can, acked and logged as lost ([`Settled::Dropped`]).
    ///
    /// Any other failure hands the delivery back with the error; dropped,
    /// it is delivered again.
    ///
    /// ```
    /// use switchboard::{MemoryTransport, Outcome, Publisher, RawMessage, Settled, SubscribeOptions, Subscriber};
    ///
    /// # tokio::runtime::Runtime::new().unwrap().block_on(async {
    /// let transport = MemoryTransport::new();
    /// let mut subscription = transport.subscribe("price.updated", SubscribeOptions::new("game")).await?;
    /// transport.publish("price.updated", RawMessage::new("not an envelope")).await?;
    /// let delivery = subscription.recv().await.expect("a message");
    /// let settled = delivery.settle(Outcome::reject("not an envelope")).await?;
    /// assert_eq!(settled, Settled::DeadLettered);
    /// # Ok::<(), switchboard::Error>(())
    /// # }).unwrap();
    /// ```
    pub async fn settle(self, outcome: Outcome) -> Result<Settled, SettleError> {
        let letter = match outcome {
            Outcome::Ack => return self.ack().await.map(|()| Settled::Acked),
            Outcome::Retry { after } => match self.nack(after).await {
                Ok(()) => return Ok(Settled::Retrying),
                Err(failed) if failed.kind() == ErrorKind::Unsupported => {
                    let (error, delivery) = failed.into_parts();
                    let letter =
                        DeadLetter::new("could not be retried").with_last_error(error.to_string());
                    return delivery.reject_for_good(letter).await;
                }
                Err(failed) => return Err(failed),
            },
            Outcome::GiveBack { reason } => match self.give_back(&reason).await {
                Ok(()) => return Ok(Settled::GivenBack),
                Err(failed) if failed.kind() == ErrorKind::Unsupported => {
                    let (error, delivery) = failed.into_parts();
                    tracing::warn!(%reason, %error, "cannot give the message back; rejecting it");
                    let letter = DeadLetter::new(reason).with_last_error(error.to_string());
                    return delivery.reject_for_good(letter).await;
                }
                Err(failed) => return Err(failed),
            },
            Outcome::Reject(letter) => letter,
        };
        self.reject_for_good(letter).await
    }

    /// The rejection of [`settle`](Self::settle): dead-letter, else tell
    /// the sender, else ack and log the loss.
    async fn reject_for_good(self, mut letter: DeadLetter) -> Result<Settled, SettleError> {
        letter.attempts.get_or_insert(self.attempt);
        let (error, mut this) = match self.dead_letter(letter.clone()).await {
            Ok(()) => return Ok(Settled::DeadLettered),
            Err(failed) if failed.kind() == ErrorKind::Unsupported => failed.into_parts(),
            Err(failed) => return Err(failed),
        };
        match this.acker.reject(&this.message, &letter).await {
            Ok(()) => {
                this.settled = true;
                return Ok(Settled::Refused);
            }
            Err(error) if error.kind() == ErrorKind::Unsupported => {}
            Err(error) => return Err(SettleError::new(error, this)),
        }
        tracing::error!(
            topic = &*this.topic,
            group = &*this.group,
            reason = letter.reason(),
            last_error = letter.last_error(),
            %error,
            "the transport keeps no dead letters and nobody hears of it; message dropped",
        );
        this.ack().await.map(|()| Settled::Dropped)
    }
}

/// What [`Delivery::settle`] did in the end.
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Settled {
    /// Acknowledged.
    Acked,
    /// Nacked: delivered again after the delay.
    Retrying,
    /// Given back to the group.
    GivenBack,
    /// In the dead-letter queue.
    DeadLettered,
    /// Refused to the sender (a push publisher got a non-retryable error
    /// with the reason); nothing is kept.
    Refused,
    /// The transport keeps no dead letters and has nobody to tell: acked,
    /// and the loss logged.
    Dropped,
}

impl Settled {
    /// The `outcome` label of `switchboard_consume_total`: `ack`, `nack`,
    /// `give_back`, `dead_letter`, `rejected` or `dropped`.
    pub fn label(self) -> &'static str {
        match self {
            Self::Acked => "ack",
            Self::Retrying => "nack",
            Self::GivenBack => "give_back",
            Self::DeadLettered => "dead_letter",
            Self::Refused => "rejected",
            Self::Dropped => "dropped",
        }
    }
}

impl Drop for Delivery {
    fn drop(&mut self) {
        if !self.settled {
            self.acker.abandoned(std::mem::take(&mut self.message));
        }
    }
}

impl fmt::Debug for Delivery {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Delivery")
            .field("topic", &self.topic)
            .field("group", &self.group)
            .field("attempt", &self.attempt)
            .field("delivery_count", &self.delivery_count)
            .field("headers", &self.message.headers)
            .field("body_len", &self.message.body.len())
            .finish_non_exhaustive()
    }
}

pub use super::subscribe_options::{GiveBackLimit, SubscribeOptions};
pub(crate) use super::subscription::Prefetch;
pub use super::subscription::Subscription;
pub use crate::topology::validate_name;

#[cfg(test)]
#[path = "delivery_tests.rs"]
mod tests;
