//! What transports carry ([`RawMessage`]), what a subscriber receives
//! ([`Delivery`]) and the live stream of them ([`Subscription`]).

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures_core::Stream;
use futures_core::future::BoxFuture;
use futures_core::stream::BoxStream;

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

/// Why and after how many attempts a message goes to the dead-letter queue.
///
/// ```
/// use switchboard::DeadLetter;
///
/// let letter = DeadLetter::new("handler gave up")
///     .with_attempts(3)
///     .with_last_error("market: unavailable");
/// assert_eq!(letter.reason(), "handler gave up");
/// assert_eq!(letter.attempts(), Some(3));
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetter {
    reason: String,
    attempts: Option<u32>,
    last_error: Option<String>,
    alert: PendingAlert,
}

/// The alert the dead-letter layer asks for, carried with the letter so the
/// consume loop can raise it once the transport has accepted the letter —
/// an alert raised earlier would send an operator to a queue that does not
/// hold the message yet. Not part of a letter's identity: two letters with
/// the same facts are equal whether or not one still has its alert.
#[derive(Clone, Default)]
pub(crate) struct PendingAlert(
    Option<
        Arc<(
            Arc<dyn crate::middleware::dead_letter::DeadLetterAlert>,
            crate::middleware::dead_letter::DeadLetterFacts,
        )>,
    >,
);

impl PendingAlert {
    /// Tells the hook, once.
    pub(crate) fn raise(self) {
        if let Some(pending) = self.0 {
            pending.0.alert(&pending.1);
        }
    }
}

impl PartialEq for PendingAlert {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl Eq for PendingAlert {}

impl fmt::Debug for PendingAlert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.0.is_some() { "pending" } else { "none" })
    }
}

impl DeadLetter {
    /// A dead letter with a reason; attempts default to the delivery's.
    pub fn new(reason: impl Into<String>) -> Self {
        Self {
            reason: reason.into(),
            attempts: None,
            last_error: None,
            alert: PendingAlert::default(),
        }
    }

    /// Asks for `alert` to be told `facts` once the transport has accepted
    /// this letter.
    pub(crate) fn with_alert(
        mut self,
        alert: Arc<dyn crate::middleware::dead_letter::DeadLetterAlert>,
        facts: crate::middleware::dead_letter::DeadLetterFacts,
    ) -> Self {
        self.alert = PendingAlert(Some(Arc::new((alert, facts))));
        self
    }

    /// The alert to raise once the letter is stored, taken from the letter.
    pub(crate) fn take_alert(&mut self) -> PendingAlert {
        std::mem::take(&mut self.alert)
    }

    /// Sets how many times the message was tried in all.
    pub fn with_attempts(mut self, attempts: u32) -> Self {
        self.attempts = Some(attempts);
        self
    }

    /// Records the last error the handler returned.
    pub fn with_last_error(mut self, error: impl Into<String>) -> Self {
        self.last_error = Some(error.into());
        self
    }

    /// Why the message was given up on.
    pub fn reason(&self) -> &str {
        &self.reason
    }

    /// How many times it was tried, when known. [`Delivery::dead_letter`]
    /// always fills it in before the transport sees it.
    pub fn attempts(&self) -> Option<u32> {
        self.attempts
    }

    /// The last error, when there was one.
    pub fn last_error(&self) -> Option<&str> {
        self.last_error.as_deref()
    }
}

impl From<&str> for DeadLetter {
    fn from(reason: &str) -> Self {
        Self::new(reason)
    }
}

impl From<String> for DeadLetter {
    fn from(reason: String) -> Self {
        Self::new(reason)
    }
}

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

/// A settle operation that failed: the error, and the delivery to try again.
pub type SettleError = (Error, Delivery);

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
        match self.acker.ack(&self.message).await {
            Ok(()) => {
                self.settled = true;
                Ok(())
            }
            Err(error) => Err((error, self)),
        }
    }

    /// Gives the message back, to be delivered again after `delay`.
    pub async fn nack(mut self, delay: Duration) -> Result<(), SettleError> {
        match self.acker.nack(&self.message, delay).await {
            Ok(()) => {
                self.settled = true;
                Ok(())
            }
            Err(error) => Err((error, self)),
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
            Err(error) => Err((error, self)),
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
                Err((error, self))
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
    /// let settled = delivery.settle(Outcome::reject("not an envelope")).await.map_err(|(error, _)| error)?;
    /// assert_eq!(settled, Settled::DeadLettered);
    /// # Ok::<(), switchboard::Error>(())
    /// # }).unwrap();
    /// ```
    pub async fn settle(self, outcome: Outcome) -> Result<Settled, SettleError> {
        let letter = match outcome {
            Outcome::Ack => return self.ack().await.map(|()| Settled::Acked),
            Outcome::Retry { after } => match self.nack(after).await {
                Ok(()) => return Ok(Settled::Retrying),
                Err((error, delivery)) if error.kind() == ErrorKind::Unsupported => {
                    let letter =
                        DeadLetter::new("could not be retried").with_last_error(error.to_string());
                    return delivery.reject_for_good(letter).await;
                }
                Err(failed) => return Err(failed),
            },
            Outcome::GiveBack { reason } => match self.give_back(&reason).await {
                Ok(()) => return Ok(Settled::GivenBack),
                Err((error, delivery)) if error.kind() == ErrorKind::Unsupported => {
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
    async fn reject_for_good(mut self, mut letter: DeadLetter) -> Result<Settled, SettleError> {
        letter.attempts.get_or_insert(self.attempt);
        let error = match self.acker.dead_letter(&self.message, &letter).await {
            Ok(()) => {
                self.settled = true;
                return Ok(Settled::DeadLettered);
            }
            Err(error) if error.kind() == ErrorKind::Unsupported => error,
            Err(error) => return Err((error, self)),
        };
        match self.acker.reject(&self.message, &letter).await {
            Ok(()) => {
                self.settled = true;
                return Ok(Settled::Refused);
            }
            Err(error) if error.kind() == ErrorKind::Unsupported => {}
            Err(error) => return Err((error, self)),
        }
        tracing::error!(
            topic = &*self.topic,
            group = &*self.group,
            reason = letter.reason(),
            last_error = letter.last_error(),
            %error,
            "the transport keeps no dead letters and nobody hears of it; message dropped",
        );
        self.ack().await.map(|()| Settled::Dropped)
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

/// How a subscriber takes part: its group, how many messages it handles at
/// once, and how many it may hold unsettled.
///
/// ```
/// use switchboard::SubscribeOptions;
///
/// let options = SubscribeOptions::new("game").with_concurrency(8);
/// assert_eq!(options.prefetch, 64);
/// assert!(options.validate().is_ok());
/// let guarded = SubscribeOptions::new("game").with_max_deliveries(5);
/// assert_eq!(guarded.max_deliveries, Some(5));
/// assert_eq!(guarded.give_back_limit.max_age, std::time::Duration::from_secs(600));
/// assert!(SubscribeOptions::new("game").with_concurrency(0).validate().is_err());
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubscribeOptions {
    /// The consumer group. With [`DeliveryMode::Competing`](crate::DeliveryMode)
    /// each group gets every message and one member of the group handles it.
    pub group: String,
    /// Handlers in flight at once (default 1, which keeps order).
    pub concurrency: usize,
    /// The most messages the subscription holds at once (default 64; at
    /// least `concurrency` to reach full concurrency): read ahead, in a
    /// handler, and nacked while waiting out their delay all count.
    pub prefetch: usize,
    /// The poison guard (default off): a delivery whose
    /// [`delivery_count`](Delivery::delivery_count) is above this goes to
    /// the dead-letter queue, with reason "delivered N times without an
    /// outcome", **before** a handler of the [`EventBus`](crate::EventBus)
    /// runs — a message that crashes its consumer cannot come back forever.
    /// Nacks are outcomes and do not count.
    pub max_deliveries: Option<u32>,
    /// How long, and how often, a message this consumer cannot read (an
    /// envelope of a major version it does not know) is given back to the
    /// group for another member before the [`EventBus`](crate::EventBus)
    /// dead-letters it (default: for 10 minutes after its first give-back,
    /// however often). See [`GiveBackLimit`].
    pub give_back_limit: GiveBackLimit,
}

/// When a message that members of a group keep giving back (none of them
/// knows its major version) is dead-lettered instead, with reason "no member
/// of group … knows version … of …".
///
/// During a rolling deploy a producer on the new major version may reach
/// the group before its new members do; the old members give those
/// messages back ([`Delivery::give_back`]) for a new member to take, and go
/// on handling what they can read at full speed. The limit is for when no
/// such member comes: a message is dead-lettered once it was first given
/// back `max_age` ago, or has been given back `max_times` times. The age
/// counts from the first give-back ([`header::GIVEN_BACK_AT`]), not from
/// publication, so an old backlog is not dead-lettered for being old.
///
/// ```
/// use std::time::Duration;
/// use switchboard::{GiveBackLimit, SubscribeOptions};
///
/// let limit = GiveBackLimit::default();
/// assert_eq!(limit.max_age, Duration::from_secs(600));
/// assert_eq!(limit.max_times, None);
/// // Dead-letter what this consumer cannot read at once, as before giving back existed:
/// let strict = SubscribeOptions::new("game").with_give_back_limit(GiveBackLimit::default().with_max_times(0));
/// assert_eq!(strict.give_back_limit.max_times, Some(0));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GiveBackLimit {
    /// How long after its first give-back a message may still be given back
    /// (default [`GiveBackLimit::DEFAULT_MAX_AGE`], 10 minutes).
    pub max_age: Duration,
    /// How many times it may be given back (default `None`: only the age
    /// counts). How fast a message comes back to a member that cannot read
    /// it is the transport's: after a pause doubling up to 1 s in memory,
    /// at most every `claim_every` on Redis Streams, at the broker's pace on
    /// RabbitMQ (where it goes to the back of the queue); so a count means
    /// different times on different transports. `Some(0)` never gives back.
    pub max_times: Option<u32>,
}

impl GiveBackLimit {
    /// The default [`max_age`](Self::max_age): 10 minutes, longer than a
    /// rolling deploy takes.
    pub const DEFAULT_MAX_AGE: Duration = Duration::from_secs(600);

    /// A limit of `max_age` and no count.
    pub const fn new(max_age: Duration) -> Self {
        Self {
            max_age,
            max_times: None,
        }
    }

    /// Also dead-letters a message given back `times` times.
    pub const fn with_max_times(mut self, times: u32) -> Self {
        self.max_times = Some(times);
        self
    }

    /// Why `delivery` must not be given back again, when it must not: it has
    /// been given back `max_times` times, or first `max_age` ago.
    pub fn exceeded(&self, delivery: &Delivery) -> Option<String> {
        let times = delivery.given_back();
        let since = delivery.given_back_since();
        let age = since.map(|since| (Utc::now() - since).to_std().unwrap_or_default());
        let by_count = self.max_times.is_some_and(|max| times >= max);
        let by_age = age.is_some_and(|age| age >= self.max_age);
        if !by_count && !by_age {
            return None;
        }
        Some(match age {
            Some(age) if age < Duration::from_secs(10) => {
                format!("given back {times} times over {} ms", age.as_millis())
            }
            Some(age) => format!("given back {times} times over {} s", age.as_secs()),
            None => format!("given back {times} times"),
        })
    }
}

impl Default for GiveBackLimit {
    fn default() -> Self {
        Self::new(Self::DEFAULT_MAX_AGE)
    }
}

impl SubscribeOptions {
    /// Options for `group` with concurrency 1 and prefetch 64.
    pub fn new(group: impl Into<String>) -> Self {
        Self {
            group: group.into(),
            concurrency: 1,
            prefetch: 64,
            max_deliveries: None,
            give_back_limit: GiveBackLimit::default(),
        }
    }

    /// Sets how many handlers run at once.
    pub fn with_concurrency(mut self, concurrency: usize) -> Self {
        self.concurrency = concurrency;
        self
    }

    /// Sets how many deliveries may be unsettled at once.
    pub fn with_prefetch(mut self, prefetch: usize) -> Self {
        self.prefetch = prefetch;
        self
    }

    /// Sets the poison guard: deliveries counted above `max` go to the
    /// dead-letter queue before a handler runs (see
    /// [`max_deliveries`](Self::max_deliveries)).
    pub fn with_max_deliveries(mut self, max: u32) -> Self {
        self.max_deliveries = Some(max);
        self
    }

    /// Sets when a message this consumer cannot read stops being given back
    /// to the group and is dead-lettered (see [`GiveBackLimit`]).
    pub fn with_give_back_limit(mut self, limit: GiveBackLimit) -> Self {
        self.give_back_limit = limit;
        self
    }

    /// Refuses an invalid group name, zero concurrency, zero prefetch or a
    /// zero poison guard.
    pub fn validate(&self) -> Result<(), Error> {
        validate_name("group", &self.group)?;
        if self.concurrency == 0 {
            return Err(Error::new(
                ErrorKind::Rejected,
                "subscribe option `concurrency` must be at least 1",
            ));
        }
        if self.prefetch == 0 {
            return Err(Error::new(
                ErrorKind::Rejected,
                "subscribe option `prefetch` must be at least 1",
            ));
        }
        if self.max_deliveries == Some(0) {
            return Err(Error::new(
                ErrorKind::Rejected,
                "subscribe option `max_deliveries` must be at least 1 (or unset)",
            ));
        }
        Ok(())
    }
}

/// Checks a topic or group name: 1 to 255 bytes of ASCII letters, digits and
/// `. _ - :`. Every transport can use such a name as a stream key, routing
/// key, queue name or URL path segment without escaping.
///
/// ```
/// use switchboard::validate_name;
///
/// assert!(validate_name("topic", "trade.executed").is_ok());
/// assert!(validate_name("topic", "").is_err());
/// assert!(validate_name("topic", "trade executed").is_err());
/// ```
pub fn validate_name(what: &str, name: &str) -> Result<(), Error> {
    let allowed = |b: u8| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b':');
    if name.is_empty() || name.len() > 255 || !name.bytes().all(allowed) {
        return Err(Error::new(
            ErrorKind::Rejected,
            format!("invalid {what} name {name:?}: use 1 to 255 ASCII letters, digits or . _ - :"),
        ));
    }
    Ok(())
}

/// A live subscription: a [`Stream`] of [`Delivery`] for one topic and group.
///
/// It is returned only once the transport is receiving. Dropping it stops
/// receiving; [`shutdown`](Subscription::shutdown) also waits until every
/// delivery it handed out has been settled or dropped.
pub struct Subscription {
    topic: Arc<str>,
    group: Arc<str>,
    deliveries: BoxStream<'static, Delivery>,
    drain: BoxFuture<'static, Result<(), Error>>,
}

impl Subscription {
    /// Used by transports: `deliveries` yields messages until it is dropped;
    /// `drain` runs after that and resolves once every delivery handed out has
    /// been settled or dropped (and anything received but not handed out has
    /// been given back to the broker).
    pub fn new(
        topic: Arc<str>,
        group: Arc<str>,
        deliveries: impl Stream<Item = Delivery> + Send + 'static,
        drain: impl Future<Output = Result<(), Error>> + Send + 'static,
    ) -> Self {
        Self {
            topic,
            group,
            deliveries: Box::pin(deliveries),
            drain: Box::pin(drain),
        }
    }

    /// The topic.
    pub fn topic(&self) -> &str {
        &self.topic
    }

    /// The consumer group.
    pub fn group(&self) -> &str {
        &self.group
    }

    /// The next delivery, or `None` when the transport has closed the
    /// subscription.
    pub async fn recv(&mut self) -> Option<Delivery> {
        std::future::poll_fn(|cx| self.deliveries.as_mut().poll_next(cx)).await
    }

    /// Stops receiving and waits until every delivery handed out has been
    /// settled or dropped. Wrap it in a timeout if a holder may never let go.
    pub async fn shutdown(self) -> Result<(), Error> {
        drop(self.deliveries);
        self.drain.await
    }
}

impl Stream for Subscription {
    type Item = Delivery;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Delivery>> {
        self.deliveries.as_mut().poll_next(cx)
    }
}

impl fmt::Debug for Subscription {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Subscription")
            .field("topic", &self.topic)
            .field("group", &self.group)
            .finish_non_exhaustive()
    }
}

/// A subscription's prefetch as permits: each message the subscription
/// holds (read ahead, in a handler, waiting out a nack) holds one, so
/// draining is waiting until all are back. Clones share the permits.
#[derive(Clone)]
pub(crate) struct Prefetch {
    permits: Arc<tokio::sync::Semaphore>,
    size: u32,
}

impl Prefetch {
    /// `prefetch` permits, capped at what a semaphore can count.
    pub(crate) fn new(prefetch: usize) -> Self {
        let size = prefetch
            .min(u32::MAX as usize)
            .min(tokio::sync::Semaphore::MAX_PERMITS);
        Self {
            permits: Arc::new(tokio::sync::Semaphore::new(size)),
            size: size as u32,
        }
    }

    /// The permits, to take one per message held.
    pub(crate) fn permits(&self) -> &Arc<tokio::sync::Semaphore> {
        &self.permits
    }

    /// How many messages the subscription may hold.
    #[cfg_attr(
        not(any(feature = "redis-streams", feature = "amqp")),
        allow(dead_code)
    )]
    pub(crate) fn size(&self) -> usize {
        self.size as usize
    }

    /// Resolves once every permit is back: nothing the subscription handed
    /// out is still unsettled.
    pub(crate) async fn drained(&self) -> Result<(), Error> {
        let _all = self
            .permits
            .acquire_many(self.size)
            .await
            .map_err(|_| Error::closed("subscription"))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Settles nothing, records the give-back it was asked for.
    struct Recording(Arc<std::sync::Mutex<Vec<RawMessage>>>);

    #[async_trait]
    impl Acker for Recording {
        async fn ack(&mut self, _: &RawMessage) -> Result<(), Error> {
            Ok(())
        }
        async fn nack(&mut self, _: &RawMessage, _: Duration) -> Result<(), Error> {
            Ok(())
        }
        async fn dead_letter(&mut self, _: &RawMessage, _: &DeadLetter) -> Result<(), Error> {
            Ok(())
        }
        async fn give_back(&mut self, message: &RawMessage, _: &str) -> Result<(), Error> {
            self.0.lock().unwrap().push(message.clone());
            Ok(())
        }
    }

    fn delivery(message: RawMessage, acker: impl Acker + 'static) -> Delivery {
        Delivery::new(message, "t".into(), "g".into(), 1, Box::new(acker))
    }

    #[tokio::test]
    async fn a_give_back_counts_and_keeps_the_first_time() {
        let given = Arc::new(std::sync::Mutex::new(Vec::new()));
        let first = delivery(RawMessage::new("x"), Recording(given.clone()));
        assert_eq!(first.given_back(), 0);
        assert_eq!(first.given_back_since(), None);
        first
            .give_back("unknown version")
            .await
            .map_err(|(e, _)| e)
            .unwrap();
        let once = given.lock().unwrap()[0].clone();
        assert_eq!(once.headers[header::GIVEN_BACK], "1");
        let since = once.headers[header::GIVEN_BACK_AT].clone();

        let second = delivery(once, Recording(given.clone()));
        assert_eq!(second.given_back(), 1);
        assert!(second.given_back_since().is_some());
        second
            .give_back("unknown version")
            .await
            .map_err(|(e, _)| e)
            .unwrap();
        let twice = &given.lock().unwrap()[1];
        assert_eq!(twice.headers[header::GIVEN_BACK], "2");
        assert_eq!(
            twice.headers[header::GIVEN_BACK_AT],
            since,
            "the first time stays"
        );
    }

    #[tokio::test]
    async fn a_transport_that_cannot_give_back_keeps_the_headers_and_settle_rejects() {
        struct Plain;
        #[async_trait]
        impl Acker for Plain {
            async fn ack(&mut self, _: &RawMessage) -> Result<(), Error> {
                Ok(())
            }
            async fn nack(&mut self, _: &RawMessage, _: Duration) -> Result<(), Error> {
                Err(Error::unsupported("plain", "nack"))
            }
            async fn dead_letter(&mut self, _: &RawMessage, _: &DeadLetter) -> Result<(), Error> {
                Err(Error::unsupported("plain", "keep dead letters"))
            }
        }
        let (error, back) = delivery(RawMessage::new("x"), Plain)
            .give_back("unknown version")
            .await
            .unwrap_err();
        assert_eq!(error.kind(), ErrorKind::Unsupported);
        assert!(
            back.headers().get(header::GIVEN_BACK).is_none(),
            "unchanged"
        );
        // Nobody to give it back to, no dead letters, nobody to tell: dropped.
        let reason = "unknown version".to_owned();
        let settled = back
            .settle(Outcome::GiveBack { reason })
            .await
            .map_err(|(e, _)| e)
            .unwrap();
        assert_eq!(settled, Settled::Dropped);
        let settled = delivery(RawMessage::new("x"), Plain)
            .settle(Outcome::Retry {
                after: Duration::from_secs(1),
            })
            .await
            .map_err(|(e, _)| e)
            .unwrap();
        assert_eq!(
            settled,
            Settled::Dropped,
            "a retry it cannot do is a rejection"
        );
    }

    #[test]
    fn the_give_back_limit_counts_times_and_age_from_the_first_give_back() {
        let given = |times: u32, ago: Duration| {
            let at = (Utc::now() - chrono::Duration::from_std(ago).unwrap())
                .to_rfc3339_opts(SecondsFormat::Millis, true);
            let message = RawMessage::new("x")
                .with_header(header::GIVEN_BACK, times.to_string())
                .with_header(header::GIVEN_BACK_AT, at);
            delivery(message, Recording(Arc::default()))
        };
        let fresh = delivery(RawMessage::new("x"), Recording(Arc::default()));
        let limit = GiveBackLimit::default();
        assert_eq!(limit.exceeded(&fresh), None);
        assert_eq!(
            limit.exceeded(&given(1000, Duration::from_secs(60))),
            None,
            "no count by default"
        );
        let old = limit
            .exceeded(&given(3, Duration::from_secs(601)))
            .expect("too old");
        assert_eq!(old, "given back 3 times over 601 s");
        let counted = GiveBackLimit::default().with_max_times(3);
        assert_eq!(counted.exceeded(&given(2, Duration::ZERO)), None);
        let why = counted
            .exceeded(&given(3, Duration::ZERO))
            .expect("three times");
        assert!(why.starts_with("given back 3 times over "), "{why}");
        assert!(
            GiveBackLimit::default()
                .with_max_times(0)
                .exceeded(&fresh)
                .is_some()
        );
    }
}
