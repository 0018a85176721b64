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

use crate::envelope::Headers;
use crate::error::{Error, ErrorKind};

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
}

impl DeadLetter {
    /// A dead letter with a reason; attempts default to the delivery's.
    pub fn new(reason: impl Into<String>) -> Self {
        Self {
            reason: reason.into(),
            attempts: None,
            last_error: None,
        }
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

    /// Called when the [`Delivery`] is dropped without being settled (a
    /// handler panicked, a subscriber shut down mid-message). The default
    /// does nothing and leaves the message to the broker's own redelivery;
    /// a transport that would otherwise hold it forever gives it back here.
    fn abandoned(&mut self, message: RawMessage) {
        let _ = message;
    }
}

/// One message handed to a subscriber, to be settled exactly once with
/// [`ack`](Delivery::ack), [`nack`](Delivery::nack) or
/// [`dead_letter`](Delivery::dead_letter).
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
}

impl SubscribeOptions {
    /// Options for `group` with concurrency 1 and prefetch 64.
    pub fn new(group: impl Into<String>) -> Self {
        Self {
            group: group.into(),
            concurrency: 1,
            prefetch: 64,
            max_deliveries: None,
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
