//! The typed layer: [`EventBus`] publishes payloads as envelopes and runs a
//! consume loop that hands typed [`Message`]s to a tower `Service`.
//!
//! # The consume loop
//!
//! The loop owns each [`Delivery`]; the handler never settles it. For each
//! delivery, in order:
//!
//! 1. with [`SubscribeOptions::max_deliveries`] set, a delivery the
//!    transport has handed out more often than that without an outcome (its
//!    consumer crashed, lost its connection or dropped it) goes to the
//!    dead-letter queue with reason "delivered N times without an outcome"
//!    before any handler runs — the poison guard;
//! 2. bytes that do not decode into `EventEnvelope<E>` (including another
//!    major version) go to the dead-letter queue at once — the handler never
//!    sees them;
//! 3. the handler's `Ok` acks;
//! 4. an error carrying [`Error::requeue_after`] (an open breaker, a
//!    duplicate still in progress) nacks with that delay;
//! 5. any other error — what is left after the handler's own retry layer gave
//!    up — dead-letters with reason, attempts and the last error, and a
//!    panic counts as such an error.
//!
//! A poison message therefore never blocks the ones behind it. The loop asks
//! the handler's `poll_ready` before pulling each message, so a handler that
//! is not ready (a breaker that is open) stops the pulling instead of letting
//! messages pile up. At most `concurrency` handlers run at once, inside the
//! subscription's own task (no task per message); a handler that needs a core
//! of its own can spawn. `concurrency = 1` handles messages in order.
//! A transport that cannot nack or dead-letter gets the message acked and the
//! failure logged, so it cannot loop forever.

use std::fmt;
use std::future::{Future, poll_fn};
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::Arc;

use futures_util::FutureExt;
use futures_util::stream::{FuturesUnordered, StreamExt};
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;
use tower::Service;
use tracing::Instrument;
use uuid::Uuid;

use crate::codec::Codec;
use crate::envelope::{Event, EventEnvelope};
use crate::error::{Error, ErrorKind};
use crate::observe::metrics;
use crate::topology::Topology;
use crate::transport::{
    DeadLetter, DeadLetterQueue, Delivery, RawMessage, SubscribeOptions, Subscription, Transport,
    header,
};

/// Adapts an async function into a handler: re-export of
/// [`tower::service_fn`].
pub use tower::service_fn as handler_fn;

/// What a handler receives: the typed envelope (shared, not copied), where it
/// came from, and which attempt this is.
pub struct Message<E> {
    envelope: Arc<EventEnvelope<E>>,
    topic: Arc<str>,
    group: Arc<str>,
    attempt: u32,
}

impl<E> Message<E> {
    /// A message for a handler, as the consume loop builds it. Useful to call
    /// a handler directly in its own tests.
    pub fn new(
        envelope: EventEnvelope<E>,
        topic: impl Into<Arc<str>>,
        group: impl Into<Arc<str>>,
        attempt: u32,
    ) -> Self {
        Self {
            envelope: Arc::new(envelope),
            topic: topic.into(),
            group: group.into(),
            attempt,
        }
    }

    /// The whole envelope.
    pub fn envelope(&self) -> &EventEnvelope<E> {
        &self.envelope
    }

    /// The envelope as a shared pointer, to keep beyond the handler.
    pub fn shared_envelope(&self) -> Arc<EventEnvelope<E>> {
        self.envelope.clone()
    }

    /// The payload.
    pub fn payload(&self) -> &E {
        self.envelope.payload()
    }

    /// The event's unique id.
    pub fn event_id(&self) -> Uuid {
        self.envelope.event_id()
    }

    /// The topic it arrived on.
    pub fn topic(&self) -> &str {
        &self.topic
    }

    /// The consumer group handling it.
    pub fn group(&self) -> &str {
        &self.group
    }

    /// The topic as a shared string (for metric labels).
    pub(crate) fn shared_topic(&self) -> Arc<str> {
        self.topic.clone()
    }

    /// The group as a shared string (for metric labels).
    pub(crate) fn shared_group(&self) -> Arc<str> {
        self.group.clone()
    }

    /// Which attempt this is: the transport's delivery count, raised by each
    /// in-process retry.
    pub fn attempt(&self) -> u32 {
        self.attempt
    }

    /// The same message, marked as attempt `attempt` (used by retry layers).
    pub fn with_attempt(mut self, attempt: u32) -> Self {
        self.attempt = attempt;
        self
    }
}

impl<E> Clone for Message<E> {
    fn clone(&self) -> Self {
        Self {
            envelope: self.envelope.clone(),
            topic: self.topic.clone(),
            group: self.group.clone(),
            attempt: self.attempt,
        }
    }
}

impl<E: fmt::Debug> fmt::Debug for Message<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Message")
            .field("envelope", &self.envelope)
            .field("topic", &self.topic)
            .field("group", &self.group)
            .field("attempt", &self.attempt)
            .finish()
    }
}

/// Typed publishing and consuming over any [`Transport`].
///
/// ```
/// use std::sync::Arc;
/// use serde::{Deserialize, Serialize};
/// use switchboard::{handler_fn, Event, EventBus, Message, MemoryTransport, SubscribeOptions};
/// use tokio::sync::mpsc;
///
/// #[derive(Debug, Clone, Serialize, Deserialize)]
/// struct UserRegistered { user_id: String }
/// impl Event for UserRegistered {
///     const TYPE: &'static str = "user.registered";
///     const VERSION: &'static str = "1.0";
/// }
///
/// # tokio::runtime::Runtime::new().unwrap().block_on(async {
/// let bus = EventBus::new(Arc::new(MemoryTransport::new()), "auth-service");
/// let (seen, mut rx) = mpsc::unbounded_channel();
/// let consumer = bus
///     .subscribe::<UserRegistered, _>(
///         SubscribeOptions::new("game"),
///         handler_fn(move |message: Message<UserRegistered>| {
///             let seen = seen.clone();
///             async move {
///                 seen.send(message.payload().user_id.clone()).ok();
///                 Ok::<_, switchboard::Error>(())
///             }
///         }),
///     )
///     .await?;
///
/// bus.publish(UserRegistered { user_id: "42".into() }).await?;
/// assert_eq!(rx.recv().await.as_deref(), Some("42"));
/// consumer.shutdown().await?;
/// # Ok::<(), switchboard::Error>(())
/// # }).unwrap();
/// ```
#[derive(Clone)]
pub struct EventBus {
    transport: Arc<dyn Transport>,
    source: Arc<str>,
    codec: Codec,
    namespace: Option<Arc<str>>,
}

impl EventBus {
    /// A bus over `transport` that stamps `source` (such as
    /// `"trading-service"`) on every envelope it publishes.
    pub fn new(transport: Arc<dyn Transport>, source: impl Into<String>) -> Self {
        Self {
            transport,
            source: source.into().into(),
            codec: Codec::default(),
            namespace: None,
        }
    }

    /// Puts every topic of this bus under `namespace`: events of type
    /// `trade.executed` travel on `<namespace>.trade.executed`. Lets several
    /// environments (or test runs) share one broker without seeing each
    /// other's events. Publishers and consumers must use the same namespace.
    pub fn with_namespace(mut self, namespace: impl Into<String>) -> Self {
        self.namespace = Some(namespace.into().into());
        self
    }

    /// The topic events of type `E` travel on.
    pub fn topic_of<E: Event>(&self) -> std::borrow::Cow<'static, str> {
        match &self.namespace {
            None => std::borrow::Cow::Borrowed(E::TYPE),
            Some(namespace) => std::borrow::Cow::Owned(format!("{namespace}.{}", E::TYPE)),
        }
    }

    /// Replaces the codec (to change the size limit).
    pub fn with_codec(mut self, codec: Codec) -> Self {
        self.codec = codec;
        self
    }

    /// The transport underneath.
    pub fn transport(&self) -> &Arc<dyn Transport> {
        &self.transport
    }

    /// The codec in use.
    pub fn codec(&self) -> &Codec {
        &self.codec
    }

    /// Creates every group and queue `topology` names (under the bus's
    /// namespace, if any); call at start-up.
    pub async fn declare(&self, topology: &Topology) -> Result<(), Error> {
        match &self.namespace {
            None => self.transport.declare(topology).await,
            Some(namespace) => {
                let namespaced = topology.namespaced(namespace);
                self.transport.declare(&namespaced).await
            }
        }
    }

    /// The transport's dead-letter queue.
    pub fn dead_letters(&self) -> Result<&dyn DeadLetterQueue, Error> {
        self.transport.dead_letters()
    }

    /// Publishes `payload` to the topic of [`E::TYPE`](Event::TYPE) in a fresh
    /// envelope; returns its `event_id` once the transport accepted it.
    pub async fn publish<E: Event>(&self, payload: E) -> Result<Uuid, Error> {
        let envelope = EventEnvelope::new(&*self.source, payload);
        self.publish_envelope(&envelope).await?;
        Ok(envelope.event_id())
    }

    /// Publishes an envelope built by the caller (to carry headers or keep
    /// an id).
    pub async fn publish_envelope<E: Event>(
        &self,
        envelope: &EventEnvelope<E>,
    ) -> Result<(), Error> {
        let topic = self.topic_of::<E>();
        let span = tracing::info_span!(
            "publish",
            event_id = %envelope.event_id(),
            event_type = E::TYPE,
            topic = &*topic,
            transport = self.transport.name(),
        );
        let started = std::time::Instant::now();
        let result = async {
            let message = self.traced_message(envelope)?;
            self.transport.publish(&topic, message).await
        }
        .instrument(span)
        .await;
        metrics::published(
            self.transport.name(),
            topic,
            result.is_ok(),
            started.elapsed(),
        );
        result
    }

    /// Publishes several payloads in as few round trips as the transport
    /// allows; returns their ids in order.
    pub async fn publish_batch<E: Event>(
        &self,
        payloads: impl IntoIterator<Item = E>,
    ) -> Result<Vec<Uuid>, Error> {
        let topic = self.topic_of::<E>();
        let span = tracing::info_span!(
            "publish_batch",
            event_type = E::TYPE,
            topic = &*topic,
            count = tracing::field::Empty,
            transport = self.transport.name(),
        );
        let mut ids = Vec::new();
        let mut messages = Vec::new();
        span.in_scope(|| {
            for payload in payloads {
                let envelope = EventEnvelope::new(&*self.source, payload);
                ids.push(envelope.event_id());
                messages.push(self.traced_message(&envelope)?);
            }
            Ok::<_, Error>(())
        })?;
        span.record("count", ids.len());
        let started = std::time::Instant::now();
        let result = self
            .transport
            .publish_batch(&topic, messages)
            .instrument(span)
            .await;
        metrics::published(
            self.transport.name(),
            topic,
            result.is_ok(),
            started.elapsed(),
        );
        result.map(|()| ids)
    }

    fn raw_message<T: serde::Serialize>(
        &self,
        envelope: &EventEnvelope<T>,
        event_type: &'static str,
    ) -> Result<RawMessage, Error> {
        Ok(RawMessage::new(self.codec.encode(envelope)?)
            .with_header(header::EVENT_ID, envelope.event_id().to_string())
            .with_header(header::EVENT_TYPE, event_type))
    }

    /// Encodes `envelope`, with the current span's trace context added to
    /// its headers when feature `otel` is on (see [`crate::observe::trace`]).
    fn traced_message<E: Event>(&self, envelope: &EventEnvelope<E>) -> Result<RawMessage, Error> {
        #[cfg(feature = "otel")]
        if let Some(headers) = crate::observe::trace::with_current(envelope.headers()) {
            // A view that borrows the payload: the caller keeps its envelope.
            let traced = EventEnvelope::from_parts(
                envelope.event_id(),
                std::borrow::Cow::Borrowed(E::TYPE),
                envelope.timestamp(),
                envelope.source().to_owned(),
                std::borrow::Cow::Owned(envelope.version().to_owned()),
                envelope.payload(),
                headers,
            );
            return self.raw_message(&traced, E::TYPE);
        }
        self.raw_message(envelope, E::TYPE)
    }

    /// Subscribes `handler` to events of type `E` (topic
    /// [`E::TYPE`](Event::TYPE)) and runs the consume loop in a task.
    ///
    /// Returns once the subscription is live. Dropping the returned handle
    /// stops the consumer; [`ConsumerHandle::shutdown`] also waits for the
    /// handlers in flight.
    pub async fn subscribe<E, H>(
        &self,
        options: SubscribeOptions,
        handler: H,
    ) -> Result<ConsumerHandle, Error>
    where
        E: Event,
        H: Service<Message<E>, Response = ()> + Send + 'static,
        H::Error: Into<Error>,
        H::Future: Send + 'static,
    {
        let (concurrency, max_deliveries) = (options.concurrency, options.max_deliveries);
        let subscription = self
            .transport
            .subscribe(&self.topic_of::<E>(), options)
            .await?;
        let (topic, group) = (
            subscription.topic().to_owned(),
            subscription.group().to_owned(),
        );
        let (stop, stopped) = oneshot::channel();
        let (health, watched) = watch::channel(ConsumerHealth::Running);
        let consume = ConsumeLoop {
            health,
            subscription,
            transport: self.transport.name(),
            handler,
            codec: self.codec,
            concurrency,
            max_deliveries,
            _event: std::marker::PhantomData::<fn() -> E>,
        };
        let task = tokio::spawn(consume.run(stopped));
        Ok(ConsumerHandle {
            topic,
            group,
            stop: Some(stop),
            task: Some(task),
            health: watched,
        })
    }
}

impl fmt::Debug for EventBus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EventBus")
            .field("transport", &self.transport.name())
            .field("source", &self.source)
            .field("codec", &self.codec)
            .finish()
    }
}

/// A running consumer. Dropping it stops the consumer in the background.
#[must_use = "dropping the handle stops the consumer"]
pub struct ConsumerHandle {
    topic: String,
    group: String,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<(), Error>>>,
    health: watch::Receiver<ConsumerHealth>,
}

/// Where a consumer stands, as [`ConsumerHandle::health`] reports it.
///
/// ```
/// use switchboard::ConsumerHealth;
///
/// assert_eq!(ConsumerHealth::Paused.to_string(), "paused");
/// ```
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ConsumerHealth {
    /// Pulling and handling messages.
    Running,
    /// Not pulling: the handler is not ready (a circuit breaker in the
    /// handler's stack is open and waits). Nothing is dead-lettered
    /// meanwhile; messages stay with the broker.
    Paused,
    /// The consume loop has ended: shut down, aborted, the subscription
    /// closed, or the handler failed for good.
    Stopped,
}

impl fmt::Display for ConsumerHealth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Running => "running",
            Self::Paused => "paused",
            Self::Stopped => "stopped",
        })
    }
}

impl ConsumerHandle {
    /// The topic consumed.
    pub fn topic(&self) -> &str {
        &self.topic
    }

    /// The consumer group.
    pub fn group(&self) -> &str {
        &self.group
    }

    /// Where the consumer stands right now: running, paused (its handler is
    /// not ready, such as an open breaker), or stopped.
    pub fn health(&self) -> ConsumerHealth {
        // The loop drops its sender when it ends, however it ends.
        if self.health.has_changed().is_err() {
            return ConsumerHealth::Stopped;
        }
        *self.health.borrow()
    }

    /// The consumer's health as a watch, to follow its changes
    /// (`changed()` fails once the consume loop has ended).
    pub fn watch_health(&self) -> watch::Receiver<ConsumerHealth> {
        self.health.clone()
    }

    /// Whether the consume loop has ended (shut down, or the transport
    /// closed the subscription).
    pub fn is_finished(&self) -> bool {
        self.task.as_ref().is_none_or(JoinHandle::is_finished)
    }

    /// Stops the consumer at once, the way a crash would: the handlers in
    /// flight are dropped and their deliveries left unsettled, so the
    /// transport delivers them again (to this group's other members, or to
    /// the next subscriber) with their
    /// [`delivery_count`](crate::Delivery::delivery_count) raised. For tests
    /// of crash recovery and for emergencies; [`shutdown`](Self::shutdown)
    /// is the orderly way.
    pub fn abort(mut self) {
        // Aborted before the stop signal goes, so the loop never gets to
        // stop in order.
        if let Some(task) = self.task.take() {
            task.abort();
        }
        self.stop.take();
    }

    /// Stops pulling messages, waits for the handlers in flight to finish and
    /// their deliveries to be settled, then shuts the subscription down.
    pub async fn shutdown(mut self) -> Result<(), Error> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        match self.task.take() {
            Some(task) => task.await.map_err(|error| {
                Error::new(ErrorKind::Closed, "consumer task failed").with_source(error)
            })?,
            None => Ok(()),
        }
    }
}

impl Drop for ConsumerHandle {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

impl fmt::Debug for ConsumerHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConsumerHandle")
            .field("topic", &self.topic)
            .field("group", &self.group)
            .field("finished", &self.is_finished())
            .finish()
    }
}

type Settling = Pin<Box<dyn Future<Output = ()> + Send>>;

struct ConsumeLoop<E, H> {
    health: watch::Sender<ConsumerHealth>,
    subscription: Subscription,
    transport: &'static str,
    handler: H,
    codec: Codec,
    concurrency: usize,
    max_deliveries: Option<u32>,
    _event: std::marker::PhantomData<fn() -> E>,
}

impl<E, H> ConsumeLoop<E, H>
where
    E: Event,
    H: Service<Message<E>, Response = ()> + Send + 'static,
    H::Error: Into<Error>,
    H::Future: Send + 'static,
{
    async fn run(mut self, mut stopped: oneshot::Receiver<()>) -> Result<(), Error> {
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
        let count = delivery.delivery_count();
        let poisoned = self.max_deliveries.is_some_and(|max| count > max);
        let decoded = if poisoned {
            Err(None)
        } else {
            self.codec.decode::<E>(delivery.body()).map_err(Some)
        };
        let envelope = match decoded {
            Ok(envelope) => envelope,
            Err(error) => {
                let span = tracing::info_span!(
                    "consume",
                    event_type = E::TYPE,
                    topic = &*topic,
                    group = &*group,
                    attempt = delivery.attempt(),
                );
                let letter = match error {
                    Some(error) => {
                        DeadLetter::new(format!("cannot decode as {}: {error}", E::TYPE))
                    }
                    None => {
                        DeadLetter::new(format!("delivered {} times without an outcome", count - 1))
                    }
                };
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
