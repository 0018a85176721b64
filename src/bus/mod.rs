//! The typed layer: [`EventBus`] publishes payloads as envelopes and runs a
//! consume loop that hands typed [`Message`]s to a tower `Service`.
//!
//! # The consume loop
//!
//! The loop owns each [`Delivery`]; the handler never settles it. It
//! settles each one by an [`Outcome`](crate::Outcome) — one table for
//! every transport — with [`Delivery::settle`](crate::Delivery::settle):
//!
//! 1. with [`SubscribeOptions::max_deliveries`] set, a delivery the
//!    transport has handed out more often than that without an outcome (its
//!    consumer crashed, lost its connection or dropped it) is rejected to
//!    the dead-letter queue with reason "delivered N times without an
//!    outcome" before any handler runs — the poison guard;
//! 2. an envelope of a major version this consumer does not know is
//!    **given back** to the group for another member (a newer replica in a
//!    rolling deploy): its permit freed at once, never lease-renewed, so the
//!    consumer goes on at full speed with what it can read; past the
//!    subscription's [`GiveBackLimit`](crate::GiveBackLimit) (by default 10
//!    minutes after its first give-back) it is rejected with reason "no
//!    member of group … knows version … of …";
//! 3. other bytes that do not decode into `EventEnvelope<E>` are rejected
//!    to the dead-letter queue at once — the handler never sees them;
//! 4. the handler's result: `Ok` acks; an error is mapped by
//!    [`Outcome::of`](crate::Outcome::of) — one carrying
//!    [`Error::requeue_after`] (an open breaker, a duplicate still in
//!    progress) or of kind `BreakerOpen` retries after that delay (a nack),
//!    any other — what is left after the handler's own retry layer gave up,
//!    and a panic — is rejected with reason, attempts and the last error.
//!
//! A poison message therefore never blocks the ones behind it. The loop asks
//! the handler's `poll_ready` before pulling each message, so a handler that
//! is not ready (a breaker that is open) stops the pulling instead of letting
//! messages pile up; an open breaker never sends a message to the
//! dead-letter queue. At most `concurrency` handlers run at once, inside the
//! subscription's own task (no task per message); a handler that needs a core
//! of its own can spawn. `concurrency = 1` handles messages in order.
//! A transport without a dead-letter queue reports a rejection to whoever
//! can hear it (a push publisher gets a non-retryable error with the
//! reason), never a silent success; only where nobody can (Redis Pub/Sub)
//! is the message acked and its loss logged.

use std::fmt;
use std::sync::Arc;

use tokio::sync::{oneshot, watch};
use tower::Service;

use crate::codec::Codec;
use crate::envelope::Event;
use crate::error::Error;
use crate::topology::Topology;
use crate::transport::{DeadLetterQueue, SubscribeOptions, Transport};

mod batch;
mod consume;
mod dead_letters;
mod handle;
mod handler;
mod key_run;
mod keyed_queue;
mod latest;
mod message;
mod ordered;
mod publish;
mod publish_retry;
mod publish_scheduled;
mod stats;

pub use batch::{BatchFn, BatchSlot, batch_fn};
use consume::ConsumeLoop;
pub use dead_letters::{DeadLetterOf, DeadLetters};
pub use handle::{ConsumerHandle, ConsumerHealth};
pub use message::Message;
use publish_retry::PublishRetry;
pub use stats::{ConsumerMonitor, ConsumerStats, LastError};

pub use handler::{BoxedHandlerFn, HandlerFn, handler_fn, handler_fn_boxed};

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
///                 Ok(())
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
    retry: PublishRetry,
    /// Publish metric handles per topic, shared by clones.
    publish_metrics: crate::observe::metrics::PublishMetrics,
}

impl EventBus {
    /// The publish deadline when none is set (10 s): long enough for a
    /// broker that restarts or fails over in a few seconds, short enough
    /// that a caller holding a request open hears of a real outage.
    pub const DEFAULT_PUBLISH_DEADLINE: std::time::Duration =
        publish_retry::DEFAULT_PUBLISH_DEADLINE;

    /// A bus over `transport` that stamps `source` (such as
    /// `"trading-service"`) on every envelope it publishes.
    pub fn new(transport: Arc<dyn Transport>, source: impl Into<String>) -> Self {
        Self {
            transport,
            source: source.into().into(),
            codec: Codec::default(),
            namespace: None,
            retry: PublishRetry::default(),
            publish_metrics: Default::default(),
        }
    }

    /// How long a publish may keep trying (default
    /// [`EventBus::DEFAULT_PUBLISH_DEADLINE`], 10 s).
    ///
    /// A publish that fails with a [retryable](Error::is_retryable) error (a
    /// lost connection, a broker restarting, a confirm that timed out) is
    /// tried again with the same envelope, waiting as
    /// [`with_publish_backoff`](Self::with_publish_backoff) says, until it
    /// succeeds or the next attempt would start past the deadline; an
    /// attempt still running at the deadline is cut short with
    /// [`ErrorKind::Timeout`](crate::ErrorKind::Timeout). The error then
    /// says how many attempts were made ([`Error::attempts`], and in its
    /// message). [`Duration::ZERO`](std::time::Duration::ZERO) makes one
    /// attempt, bounded only by the transport's own timeouts. An error that
    /// already carries [`Error::attempts`] comes from a transport that
    /// retries by itself (the push publishers) and is returned as it is:
    /// each path has one retry owner.
    ///
    /// A retried publish may reach the broker twice (the first attempt may
    /// have been applied before its answer was lost); both copies carry the
    /// same `event_id`, which a dedupe layer on the consumer recognises.
    ///
    /// ```
    /// use std::sync::Arc;
    /// use std::time::Duration;
    /// use switchboard::{EventBus, MemoryTransport};
    ///
    /// let bus = EventBus::new(Arc::new(MemoryTransport::new()), "orders")
    ///     .with_publish_deadline(Duration::from_secs(3));
    /// assert_eq!(bus.publish_deadline(), Duration::from_secs(3));
    /// ```
    pub fn with_publish_deadline(mut self, deadline: std::time::Duration) -> Self {
        self.retry = self.retry.with_deadline(deadline);
        self
    }

    /// The waits between publish attempts, from a `retry:` block (default
    /// [`RetryConfig::default`](crate::config::RetryConfig): 100 ms, doubling,
    /// at most 1 s, with jitter). `backoff_ms`, `backoff_multiplier`,
    /// `max_backoff_ms` and `jitter` apply; `max_attempts` and the budget do
    /// not, as the [publish deadline](Self::with_publish_deadline) bounds the
    /// attempts.
    ///
    /// ```
    /// use std::sync::Arc;
    /// use switchboard::config::RetryConfig;
    /// use switchboard::{EventBus, MemoryTransport};
    ///
    /// let retry = RetryConfig::default().with_backoff_ms(50).with_max_backoff_ms(500);
    /// let bus = EventBus::new(Arc::new(MemoryTransport::new()), "orders")
    ///     .with_publish_backoff(&retry);
    /// assert_eq!(bus.publish_deadline(), EventBus::DEFAULT_PUBLISH_DEADLINE);
    /// ```
    pub fn with_publish_backoff(mut self, config: &crate::config::RetryConfig) -> Self {
        self.retry = PublishRetry::new(self.retry.deadline, config);
        self
    }

    /// How long a publish may keep trying.
    pub fn publish_deadline(&self) -> std::time::Duration {
        self.retry.deadline
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
        self.topic_named(E::TYPE)
    }

    /// `topic` under the bus's namespace, as [`publish_to`](Self::publish_to)
    /// and [`subscribe_to`](Self::subscribe_to) use it.
    pub fn topic_named<'t>(&self, topic: &'t str) -> std::borrow::Cow<'t, str> {
        match &self.namespace {
            None => std::borrow::Cow::Borrowed(topic),
            Some(namespace) => std::borrow::Cow::Owned(format!("{namespace}.{topic}")),
        }
    }

    /// Replaces the codec (to change the size limit).
    pub fn with_codec(mut self, codec: Codec) -> Self {
        self.codec = codec;
        self
    }

    /// Consumers of this bus read older major versions of their events
    /// through `upcasters` (see [`Upcasters`](crate::Upcasters)); what no
    /// chain of them reaches is given back to the group, as without them.
    pub fn with_upcasters(mut self, upcasters: crate::Upcasters) -> Self {
        self.codec = self.codec.with_upcasters(upcasters);
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

    /// Closes the transport underneath (see [`Transport::close`]): later
    /// publishes and subscribes fail with the non-retryable
    /// [`ErrorKind::Closed`](crate::ErrorKind::Closed), every consumer of
    /// this bus (and of any bus over the same transport) finishes what it
    /// holds and stops, then the connections close — within
    /// [`CLOSE_TIMEOUT`](crate::transport::CLOSE_TIMEOUT). Idempotent; call
    /// it on shutdown.
    ///
    /// ```
    /// use std::sync::Arc;
    /// use switchboard::{ErrorKind, EventBus, HealthState, MemoryTransport, Topology};
    ///
    /// # tokio::runtime::Runtime::new().unwrap().block_on(async {
    /// let bus = EventBus::new(Arc::new(MemoryTransport::new()), "orders");
    /// assert!(bus.health().is_up());
    /// bus.close().await?;
    /// assert_eq!(bus.health().state, HealthState::Closed);
    /// let topology = Topology::new().with_groups("order.placed", ["billing"]);
    /// let refused = bus.declare(&topology).await.unwrap_err();
    /// assert_eq!(refused.kind(), ErrorKind::Closed);
    /// # Ok::<(), switchboard::Error>(())
    /// # }).unwrap();
    /// ```
    pub async fn close(&self) -> Result<(), Error> {
        self.transport.close().await
    }

    /// How the transport underneath is ([`Transport::health`]).
    pub fn health(&self) -> crate::transport::TransportHealth {
        self.transport.health()
    }

    /// Deletes everything the transport keeps under this bus's namespace:
    /// its streams or queues and their dead letters
    /// ([`Transport::purge_namespace`]); returns how many went. **For
    /// tests and development** — it drops unread messages. A bus without a
    /// namespace is refused with [`ErrorKind::Config`](crate::ErrorKind::Config)
    /// rather than deleting everything.
    ///
    /// ```
    /// use std::sync::Arc;
    /// use switchboard::{EventBus, MemoryTransport, Topology};
    ///
    /// # tokio::runtime::Runtime::new().unwrap().block_on(async {
    /// let bus = EventBus::new(Arc::new(MemoryTransport::new()), "tests").with_namespace("run-42");
    /// bus.declare(&Topology::new().with_groups("order.placed", ["billing"])).await?;
    /// assert_eq!(bus.purge_namespace().await?, 1);
    /// # Ok::<(), switchboard::Error>(())
    /// # }).unwrap();
    /// ```
    pub async fn purge_namespace(&self) -> Result<usize, Error> {
        let Some(namespace) = &self.namespace else {
            return Err(Error::new(
                crate::ErrorKind::Config,
                "purge_namespace: the bus has no namespace (see EventBus::with_namespace)",
            ));
        };
        self.transport.purge_namespace(namespace).await
    }

    /// The transport's dead-letter queue, untyped and by full topic name:
    /// the bus's namespace is not applied (pass
    /// [`topic_of::<E>()`](Self::topic_of)). Prefer
    /// [`dead_letters`](Self::dead_letters), typed and in the namespace.
    pub fn dead_letter_queue(&self) -> Result<&dyn DeadLetterQueue, Error> {
        self.transport.dead_letters()
    }

    /// The dead letters of `E`'s topic in this bus's namespace: list,
    /// inspect, read the payload and redrive by event id, by a header value
    /// or all. [`ErrorKind::Unsupported`](crate::ErrorKind::Unsupported) on
    /// a transport that keeps none.
    ///
    /// ```
    /// use std::sync::Arc;
    /// use serde::{Deserialize, Serialize};
    /// use switchboard::{
    ///     handler_fn, Error, Event, EventBus, EventEnvelope, MemoryTransport, Message, Redrive,
    ///     SubscribeOptions, Topology,
    /// };
    ///
    /// #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    /// struct OrderPlaced { quantity: i64 }
    /// impl Event for OrderPlaced {
    ///     const TYPE: &'static str = "order.placed";
    ///     const VERSION: &'static str = "1.0";
    /// }
    ///
    /// # tokio::runtime::Runtime::new().unwrap().block_on(async {
    /// let bus = EventBus::new(Arc::new(MemoryTransport::new()), "orders").with_namespace("staging");
    /// bus.declare(&Topology::new().with_event::<OrderPlaced, _>(["billing"])).await?;
    /// let consumer = bus
    ///     .subscribe::<OrderPlaced, _>(
    ///         SubscribeOptions::new("billing"),
    ///         handler_fn(|_: Message<OrderPlaced>| async {
    ///             Err::<(), _>(Error::permanent("quantity must be positive"))
    ///         }),
    ///     )
    ///     .await?;
    /// let envelope = EventEnvelope::new("orders", OrderPlaced { quantity: -1 })
    ///     .with_header("order-id", "A-17");
    /// bus.publish_envelope(&envelope).await?;
    ///
    /// let letters = bus.dead_letters::<OrderPlaced>()?;
    /// assert_eq!(letters.topic(), "staging.order.placed");
    /// let letter = loop {
    ///     // The consume loop stores the letter on its own task.
    ///     if let Some(letter) = letters.list(10).await?.pop() { break letter; }
    ///     tokio::task::yield_now().await;
    /// };
    /// assert_eq!(letter.payload()?, OrderPlaced { quantity: -1 });
    /// assert_eq!(letter.group(), "billing");
    /// assert!(letter.last_error().unwrap().contains("quantity must be positive"));
    /// consumer.shutdown().await?;
    ///
    /// assert_eq!(letters.redrive_where("order-id", "A-17").await?, 1);
    /// assert!(letters.list(10).await?.is_empty());
    /// # let _ = Redrive::All;
    /// # Ok::<(), switchboard::Error>(())
    /// # }).unwrap();
    /// ```
    pub fn dead_letters<E: Event>(&self) -> Result<DeadLetters<'_, E>, Error> {
        DeadLetters::new(self)
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
        self.subscribe_on(self.topic_of::<E>(), options, handler, None)
            .await
    }

    /// [`subscribe`](Self::subscribe) to events of type `E` published to
    /// `topic` (under the bus's namespace) with
    /// [`publish_to`](Self::publish_to).
    pub async fn subscribe_to<E, H>(
        &self,
        topic: &str,
        options: SubscribeOptions,
        handler: H,
    ) -> Result<ConsumerHandle, Error>
    where
        E: Event,
        H: Service<Message<E>, Response = ()> + Send + 'static,
        H::Error: Into<Error>,
        H::Future: Send + 'static,
    {
        self.subscribe_on(self.topic_named(topic), options, handler, None)
            .await
    }

    /// `key_run`: set by a batch subscription, see `ConsumeLoop::key_run`.
    async fn subscribe_on<E, H>(
        &self,
        topic: std::borrow::Cow<'_, str>,
        options: SubscribeOptions,
        handler: H,
        key_run: Option<usize>,
    ) -> Result<ConsumerHandle, Error>
    where
        E: Event,
        H: Service<Message<E>, Response = ()> + Send + 'static,
        H::Error: Into<Error>,
        H::Future: Send + 'static,
    {
        let (concurrency, max_deliveries, give_back_limit) = (
            options.concurrency,
            options.max_deliveries,
            options.give_back_limit,
        );
        let ordering_key = options.ordering_key.clone();
        if let Some(key) = &ordering_key {
            key.check::<E>()?;
        }
        let subscription = self.transport.subscribe(&topic, options).await?;
        let (topic, group) = (
            subscription.topic().to_owned(),
            subscription.group().to_owned(),
        );
        let (stop, stopped) = oneshot::channel();
        let (health, watched) = watch::channel(ConsumerHealth::Running);
        let metrics = Arc::new(crate::observe::metrics::ConsumeMetrics::new(
            self.transport.name(),
            subscription.topic().into(),
            subscription.group().into(),
        ));
        let counters = Arc::new(stats::Counters::default());
        let consume = ConsumeLoop {
            health,
            counters: counters.clone(),
            subscription,
            transport: self.transport.name(),
            metrics,
            handler,
            codec: self.codec.clone(),
            concurrency,
            max_deliveries,
            give_back_limit,
            ordering_key,
            key_run,
            _event: std::marker::PhantomData::<fn() -> E>,
        };
        let (ended, watch_ended) = watch::channel(false);
        let failure = Arc::new(std::sync::OnceLock::new());
        let failed = failure.clone();
        let gauge = ConsumerGauge {
            transport: self.transport.name(),
            topic: topic.clone(),
            group: group.clone(),
        };
        let reported = watched.clone();
        // The gauge follows the health from a task of its own, so the
        // consume loop's task does no work for it; once the loop has ended
        // and announced it (its failure kept first), the gauge says how.
        tokio::spawn({
            let (mut ended, failure) = (watch_ended.clone(), failure.clone());
            async move {
                gauge.follow(reported).await;
                if ended.wait_for(|ended| *ended).await.is_ok() {
                    gauge.ended(failure.get().is_none());
                }
            }
        });
        let task = tokio::spawn(async move {
            let result = consume.run(stopped).await;
            // The failure is kept before the end is announced, so whoever
            // wakes on `closed()` finds it.
            if let Err(error) = result {
                let _ = failed.set(error);
            }
            ended.send_replace(true);
        });
        Ok(ConsumerHandle {
            topic,
            group,
            stop: Some(stop),
            task: Some(task),
            health: watched,
            ended: watch_ended,
            failure,
            counters,
            transport: self.transport.clone(),
        })
    }
}

/// Reports a consumer's health as the `switchboard_consumer_state` gauge,
/// from a watch of it beside the consume loop, so the loop itself does no
/// work for it.
struct ConsumerGauge {
    transport: &'static str,
    topic: String,
    group: String,
}

impl ConsumerGauge {
    /// Sets the gauge at every change of health until the loop ends.
    async fn follow(&self, mut health: watch::Receiver<ConsumerHealth>) {
        loop {
            let now = *health.borrow_and_update();
            crate::observe::metrics::consumer_state(
                self.transport,
                &self.topic,
                &self.group,
                Some(now),
            );
            if health.changed().await.is_err() {
                return;
            }
        }
    }

    /// The loop has ended: stopped, or failed (on an error).
    fn ended(&self, ok: bool) {
        let state = ok.then_some(ConsumerHealth::Stopped);
        crate::observe::metrics::consumer_state(self.transport, &self.topic, &self.group, state);
    }
}

impl fmt::Debug for EventBus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EventBus")
            .field("transport", &self.transport.name())
            .field("source", &self.source)
            .field("codec", &self.codec)
            .field("publish_deadline", &self.retry.deadline)
            .finish()
    }
}
