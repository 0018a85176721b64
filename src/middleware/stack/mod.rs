//! Both stacks, assembled in the order that works, from one configuration
//! file.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use tower::ServiceBuilder;

use super::circuit_breaker::{CircuitBreaker, CircuitBreakerLayer, WhenOpen};
use super::dead_letter::{DeadLetterAlert, DeadLettering, DeadLetteringLayer};
use super::dedupe::{Dedupe, DedupeLayer, DedupeStore, DedupeTtls, MemoryDedupeStore};
use super::retry::{CountAttempts, Retry, RetryLayer, SameRequest, Uniform};
use super::timeout::{Timeout, TimeoutLayer};
use crate::config::{CircuitBreakerConfig, ResilienceConfig, RetryConfig};
use crate::error::{Error, ErrorKind};

/// An RPC client stack: `retry ▸ circuit_breaker ▸ timeout ▸ service`.
///
/// `I` says which calls are idempotent: [`Uniform`] (the stack's setting)
/// unless [`Retry::idempotent_if`] decides per call.
///
/// It is `Clone + Send + Sync` whenever the service is: clones share the
/// breaker and the retry budget, so one client can sit in shared state
/// (axum's `State`, an `Arc`) and be cloned for each call.
pub type Client<S, I = Uniform> = Retry<CircuitBreaker<Timeout<S>>, SameRequest, I>;

/// Any client stack behind one nameable type: a [`Client`] (with a
/// fallback around it, or layers of your own) boxed, so it can be a struct
/// field or axum state without writing out its type — which closures make
/// impossible. It stays `Clone + Send + Sync`; the box costs one allocation
/// per call.
///
/// ```
/// use switchboard::middleware::fallback::StaleCacheLayer;
/// use switchboard::middleware::{BoxClient, Resilience};
/// use switchboard::Error;
/// use tower::{Layer, ServiceExt};
///
/// /// Held in the application's state: the type names what is sent and
/// /// answered, not how the stack is built.
/// #[derive(Clone)]
/// struct Clients {
///     prices: BoxClient<String, f64>,
/// }
///
/// # tokio::runtime::Runtime::new().unwrap().block_on(async {
/// let resilience = Resilience::from_yaml("timeouts:\n  market: 50\n")?;
/// let market = tower::service_fn(|_symbol: String| async { Ok::<_, Error>(150.0) });
/// let client = resilience.client("market", market);
/// // A closure-keyed cache around it, answering the value only.
/// let cached = StaleCacheLayer::new(|symbol: &String| symbol.clone())
///     .layer(client)
///     .map_response(|cached| cached.value);
/// let clients = Clients { prices: BoxClient::new(cached) };
///
/// assert_eq!(clients.prices.clone().oneshot("AAPL".into()).await?, 150.0);
/// # Ok::<(), Error>(())
/// # }).unwrap();
/// ```
pub type BoxClient<Req, Resp> = tower::util::BoxCloneSyncService<Req, Resp, Error>;

/// A consumer stack: `dedupe ▸ dead_letter ▸ circuit_breaker ▸ retry ▸
/// timeout ▸ handler`; see [`Resilience::consumer`].
pub type Consumer<H> = Dedupe<DeadLettering<CircuitBreaker<Retry<Timeout<H>, CountAttempts>>>>;

/// The consumer stack the deprecated `Resilience::handler` builds.
#[deprecated(note = "renamed `Consumer`, built by `Resilience::consumer`")]
pub type Handler<H> = Consumer<H>;

/// Builds the resilience stacks of a service from its configuration.
///
/// # RPC clients
///
/// `fallback ▸ retry ▸ circuit_breaker ▸ timeout ▸ service`
/// ([`client`](Self::client); the fallback, which only the caller can
/// write, goes around it). The timeout is inside the breaker so the breaker
/// counts timeouts; the breaker fails fast while open and is inside retry,
/// so every attempt is counted and an open breaker (not retryable) ends the
/// retries at once: with the strategy's values (3 attempts, threshold 5) a
/// dependency failing every call opens the breaker on the second attempt of
/// the second call, after 5 attempts. The fallback is outside everything so
/// the breaker still sees the failures it answers for.
///
/// # Consumers
///
/// `dedupe ▸ dead_letter ▸ circuit_breaker ▸ retry ▸ timeout ▸ handler`
/// ([`consumer`](Self::consumer)), the breaker in
/// [`WhenOpen::Wait`]:
///
/// * the timeout is innermost: each attempt has its own deadline, and what
///   the breaker sees of a hanging handler is a `Timeout` — a failure;
/// * retry is *inside* the breaker, so the breaker sees one outcome per
///   message, the last of its attempts. A handler failing every attempt
///   opens the breaker after exactly `failure_threshold` messages, whatever
///   `max_attempts`: with the strategy's values, 5 messages, 15 handler calls,
///   5 dead letters. A hanging handler too: 5 messages, each one timeout
///   (a timed-out attempt is retried only if the handler is
///   [idempotent](Self::idempotent): then 3 timeouts per message, still one
///   failure). With retry outside, a message whose attempts tripped the
///   breaker would wait inside the handler, holding its delivery and its
///   dedupe mark, for the whole reset timeout;
/// * while the breaker is open its `poll_ready` is pending, so the consume
///   loop stops pulling: **nothing is dead-lettered while it is open**.
///   Messages already in flight when it opened, and a trial call that
///   fails, come back with [`Error::requeue_after`] = the time until the
///   next trial call, so the loop gives them back. After the reset timeout
///   one message is the trial call; its success closes the breaker and the
///   loop pulls the rest, each handled once;
/// * dead-lettering outside the breaker sees what retry finally gave up
///   with, and lets the breaker's requeues through to the loop;
/// * dedupe is outermost so a duplicate costs no retry and a failure (also
///   a dead-lettered one) releases its mark.
///
/// # Timeouts per path
///
/// Each path has its own timeout: the YAML file may carry, beside the
/// strategy's two blocks, a `timeouts:` block of milliseconds per path name
/// (strategy §3's budgets are far below the breaker's 5 s `timeout_ms`, which is
/// the default). Every constructor looks its path up by the breaker's name:
/// [`client`](Self::client) and [`consumer`](Self::consumer) by the name
/// they are given, [`client_with_breaker`](Self::client_with_breaker) and
/// [`consumer_with_breaker`](Self::consumer_with_breaker) by the breaker's.
/// A path the block does not name gets the current timeout
/// ([`with_timeout`](Self::with_timeout), or `timeout_ms`).
///
/// # Idempotency
///
/// Retries never send a request again after a failure that may have taken
/// effect (a timeout, a lost answer) unless the call is idempotent: mark a
/// whole builder with [`idempotent`](Self::idempotent), or decide per call
/// on a built client with [`Retry::idempotent_if`].
///
/// ```
/// use std::time::Duration;
/// use switchboard::middleware::Resilience;
/// use switchboard::Error;
/// use tower::{service_fn, ServiceExt};
///
/// # tokio::runtime::Runtime::new().unwrap().block_on(async {
/// let resilience = Resilience::from_yaml(
///     "\
/// circuit_breaker:
///   failure_threshold: 5
///   timeout_ms: 5000
///   reset_timeout_ms: 30000
/// retry:
///   max_attempts: 3
/// timeouts:
///   market: 20     # Trading → Market, gRPC (strategy §3)
///   ledger: 250    # the Game consumer's handler
/// ",
/// )?;
/// assert_eq!(resilience.timeout_of("market"), Duration::from_millis(20));
/// assert_eq!(resilience.timeout_of("ledger"), Duration::from_millis(250));
/// assert_eq!(resilience.timeout_of("auth"), Duration::from_secs(5));
///
/// let market = resilience
///     .client("market", service_fn(|symbol: String| async move { Ok::<_, Error>(150.0) }));
/// assert_eq!(market.get_ref().get_ref().timeout(), Duration::from_millis(20));
/// assert_eq!(market.oneshot("AAPL".into()).await?, 150.0);
/// # Ok::<(), Error>(())
/// # }).unwrap();
/// ```
#[derive(Clone)]
pub struct Resilience {
    config: ResilienceConfig,
    timeout: Duration,
    timeouts: Arc<BTreeMap<String, Duration>>,
    idempotent: bool,
    dedupe_store: Arc<dyn DedupeStore>,
    dedupe_ttls: Option<DedupeTtls>,
    dead_letter: DeadLetteringLayer,
}

impl Resilience {
    /// Stacks configured by `config`, with in-process dedupe marks and
    /// dead letters logged only.
    pub fn new(config: ResilienceConfig) -> Self {
        Self {
            timeout: config.circuit_breaker.timeout(),
            timeouts: Arc::default(),
            config,
            idempotent: false,
            dedupe_store: Arc::new(MemoryDedupeStore::new()),
            dedupe_ttls: None,
            dead_letter: DeadLetteringLayer::log_only(),
        }
    }

    /// Parses and validates a resilience YAML file: the `circuit_breaker:`
    /// and `retry:` blocks of [`ResilienceConfig`] and an optional
    /// `timeouts:` block mapping path names to milliseconds.
    ///
    /// # Errors
    ///
    /// An [`ErrorKind::Config`] error naming the bad key: anything
    /// [`ResilienceConfig::from_yaml`] refuses, and a zero timeout.
    pub fn from_yaml(text: &str) -> Result<Self, Error> {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Document {
            #[serde(default)]
            circuit_breaker: CircuitBreakerConfig,
            #[serde(default)]
            retry: RetryConfig,
            #[serde(default)]
            timeouts: BTreeMap<String, u64>,
        }

        let document: Document = serde_norway::from_str(text).map_err(|error| {
            let mut message = error.to_string();
            if let Some(at) = error.location() {
                let at = format!("at line {} column {}", at.line(), at.column());
                if !message.contains(&at) {
                    message = format!("{message} {at}");
                }
            }
            Error::new(ErrorKind::Config, message).with_source(error)
        })?;
        let config = ResilienceConfig {
            circuit_breaker: document.circuit_breaker,
            retry: document.retry,
        };
        config.validate()?;
        let mut timeouts = BTreeMap::new();
        for (path, ms) in document.timeouts {
            if ms == 0 {
                return Err(Error::new(
                    ErrorKind::Config,
                    format!("timeouts.{path} must be at least 1, got 0"),
                ));
            }
            timeouts.insert(path, Duration::from_millis(ms));
        }
        let mut resilience = Self::new(config);
        resilience.timeouts = Arc::new(timeouts);
        Ok(resilience)
    }

    /// The stacks for the path `name`: its timeout from the `timeouts:`
    /// block, or the current one if the block does not name it.
    pub fn path(&self, name: &str) -> Self {
        self.clone().with_timeout(self.timeout_of(name))
    }

    /// The timeout of the path `name`: from the `timeouts:` block, or the
    /// current one if the block does not name it.
    pub fn timeout_of(&self, name: &str) -> Duration {
        self.timeouts.get(name).copied().unwrap_or(self.timeout)
    }

    /// The configuration.
    pub fn config(&self) -> &ResilienceConfig {
        &self.config
    }

    /// The same stacks with another call timeout, for the paths the
    /// `timeouts:` block does not name.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// The call timeout of the paths the `timeouts:` block does not name.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Adds jitter to the retry waits (the default already does, unless the
    /// `retry:` block says `jitter: false`).
    pub fn with_jitter(mut self) -> Self {
        self.config.retry.jitter = true;
        self
    }

    /// Marks the calls and handlers built from here on as idempotent: safe
    /// to run twice. Their retries then also cover failures that may have
    /// taken effect — a timeout, a lost answer, a peer's internal error —
    /// not only those that certainly did not. Without it a timed-out
    /// handler attempt is not retried: a retried timeout may re-run an
    /// effect that completed.
    pub fn idempotent(mut self) -> Self {
        self.idempotent = true;
        self
    }

    /// Whether the stacks built from here on are idempotent.
    pub fn is_idempotent(&self) -> bool {
        self.idempotent
    }

    /// Keeps dedupe marks in `store` (a shared one, such as Redis, when
    /// several replicas consume one group).
    pub fn with_dedupe_store(mut self, store: Arc<dyn DedupeStore>) -> Self {
        self.dedupe_store = store;
        self
    }

    /// Overrides the dedupe durations; by default the in-progress TTL is
    /// [`in_progress_ttl`](Self::in_progress_ttl).
    pub fn with_dedupe_ttls(mut self, ttls: DedupeTtls) -> Self {
        self.dedupe_ttls = Some(ttls);
        self
    }

    /// Tells `alert` of every message a handler gives up on.
    pub fn with_alert(mut self, alert: Arc<dyn DeadLetterAlert>) -> Self {
        self.dead_letter = DeadLetteringLayer::new(alert);
        self
    }

    /// The longest a handler stack can take: every attempt running into the
    /// timeout, with the longest waits (doubled, for jitter) in between.
    pub fn worst_case(&self) -> Duration {
        worst_case(&self.config.retry, self.timeout)
    }

    /// The dedupe in-progress TTL: the [worst case](Self::worst_case) plus
    /// one more timeout and the breaker's reset timeout (a breaker in wait
    /// mode inside the handler can hold a retry that long), so a live holder
    /// never loses its mark.
    pub fn in_progress_ttl(&self) -> Duration {
        self.in_progress_ttl_for(self.timeout)
    }

    fn in_progress_ttl_for(&self, timeout: Duration) -> Duration {
        worst_case(&self.config.retry, timeout)
            + timeout
            + self.config.circuit_breaker.reset_timeout()
    }

    /// A new circuit breaker named after the dependency it guards, for
    /// [`client_with_breaker`](Self::client_with_breaker),
    /// [`consumer_with_breaker`](Self::consumer_with_breaker) or a
    /// [`Gate`](crate::middleware::fallback::Gate).
    pub fn breaker(&self, name: &str) -> CircuitBreakerLayer {
        CircuitBreakerLayer::named(name, self.config.circuit_breaker)
    }

    /// A retry layer as the `retry:` block says, with a budget of its own,
    /// idempotent if [`idempotent`](Self::idempotent) was set.
    pub fn retry(&self) -> RetryLayer {
        let retry = RetryLayer::new(self.config.retry);
        if self.idempotent {
            retry.idempotent()
        } else {
            retry
        }
    }

    /// `retry ▸ circuit_breaker ▸ timeout ▸ service`, with a new breaker
    /// named `dependency` that fails fast while open, and the timeout of the
    /// path `dependency` (see [`timeout_of`](Self::timeout_of)).
    pub fn client<S>(&self, dependency: &str, service: S) -> Client<S> {
        self.client_with_breaker(&self.breaker(dependency), service)
    }

    /// `retry ▸ circuit_breaker ▸ timeout ▸ service` around `breaker` (to
    /// watch it, or share it among clients of one dependency), with the
    /// timeout of the path named like the breaker. The client fails fast
    /// while the breaker is open.
    pub fn client_with_breaker<S>(&self, breaker: &CircuitBreakerLayer, service: S) -> Client<S> {
        ServiceBuilder::new()
            .layer(self.retry())
            .layer(breaker.clone().when_open(WhenOpen::FailFast))
            .layer(TimeoutLayer::new(self.timeout_of(breaker.name())))
            .service(service)
    }

    /// The whole consumer stack for
    /// [`EventBus::subscribe`](crate::EventBus::subscribe): `dedupe ▸
    /// dead_letter ▸ circuit_breaker ▸ retry ▸ timeout ▸ handler`, with a
    /// new breaker named `name` in [`WhenOpen::Wait`] and the timeout of the
    /// path `name`. See [Consumers](Self#consumers) for why this order and
    /// the counts it implies.
    ///
    /// ```
    /// use std::sync::Arc;
    /// use serde::{Deserialize, Serialize};
    /// use switchboard::middleware::Resilience;
    /// use switchboard::{handler_fn, Error, Event, EventBus, MemoryTransport, Message, SubscribeOptions};
    ///
    /// #[derive(Clone, Serialize, Deserialize)]
    /// struct TradeExecuted { order_id: u64 }
    /// impl Event for TradeExecuted {
    ///     const TYPE: &'static str = "trade.executed";
    ///     const VERSION: &'static str = "1.0";
    /// }
    ///
    /// # tokio::runtime::Runtime::new().unwrap().block_on(async {
    /// let resilience = Resilience::from_yaml("timeouts:\n  ledger: 250\n")?;
    /// let handler = resilience.consumer("ledger", handler_fn(|trade: Message<TradeExecuted>| async move {
    ///     let _ = trade.payload().order_id; // apply it to the ledger
    ///     Ok(())
    /// }));
    /// assert_eq!(handler.get_ref().get_ref().name(), "ledger");
    ///
    /// let bus = EventBus::new(Arc::new(MemoryTransport::new()), "trading-service");
    /// let consumer = bus.subscribe(SubscribeOptions::new("game"), handler).await?;
    /// consumer.shutdown().await?;
    /// # Ok::<(), Error>(())
    /// # }).unwrap();
    /// ```
    pub fn consumer<H>(&self, name: &str, handler: H) -> Consumer<H> {
        self.consumer_with_breaker(&self.breaker(name), handler)
    }

    /// [`consumer`](Self::consumer) around `breaker` (to watch it, or share
    /// it with the clients of the handler's dependency), with the timeout of
    /// the path named like the breaker. The breaker waits while open in this
    /// stack, whatever mode it was built with.
    pub fn consumer_with_breaker<H>(
        &self,
        breaker: &CircuitBreakerLayer,
        handler: H,
    ) -> Consumer<H> {
        self.consumer_stack(breaker, self.timeout_of(breaker.name()), handler)
    }

    /// The consumer stack with a breaker named `"handler"` and the current
    /// timeout.
    #[deprecated(
        note = "use `consumer(name, handler)`: it names the breaker and looks the path's timeout up"
    )]
    pub fn handler<H>(&self, handler: H) -> Consumer<H> {
        self.consumer_stack(&self.breaker("handler"), self.timeout, handler)
    }

    fn consumer_stack<H>(
        &self,
        breaker: &CircuitBreakerLayer,
        timeout: Duration,
        handler: H,
    ) -> Consumer<H> {
        let ttls = self.dedupe_ttls.unwrap_or(DedupeTtls {
            in_progress: self.in_progress_ttl_for(timeout),
            ..DedupeTtls::default()
        });
        ServiceBuilder::new()
            .layer(DedupeLayer::new(self.dedupe_store.clone()).with_ttls(ttls))
            .layer(self.dead_letter.clone())
            .layer(breaker.clone().when_open(WhenOpen::Wait))
            .layer(self.retry().with_next_attempt(CountAttempts))
            .layer(TimeoutLayer::new(timeout))
            .service(handler)
    }
}

fn worst_case(retry: &RetryConfig, timeout: Duration) -> Duration {
    let attempts = retry.max_attempts.max(1);
    timeout * attempts + retry.max_backoff() * 2 * (attempts - 1)
}

impl fmt::Debug for Resilience {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Resilience")
            .field("config", &self.config)
            .field("timeout", &self.timeout)
            .field("timeouts", &self.timeouts)
            .field("idempotent", &self.idempotent)
            .field("dedupe_ttls", &self.dedupe_ttls)
            .field("dead_letter", &self.dead_letter)
            .finish_non_exhaustive()
    }
}

impl Default for Resilience {
    /// The strategy's values.
    fn default() -> Self {
        Self::new(ResilienceConfig::default())
    }
}

// Every client stack can be shared: `Clone + Send + Sync` whenever its
// service is, which the crate's own services are. Checked when the crate
// compiles, so a field that is not `Sync` (a boxed future, a `Cell`) fails
// the build here rather than in a user's axum state.
const _: fn() = || {
    fn shareable<T: Clone + Send + Sync + 'static>() {}
    type Plain = tower::util::ServiceFn<fn(String) -> std::future::Ready<Result<f64, Error>>>;
    shareable::<Client<Plain>>();
    shareable::<Client<Plain, super::retry::IdempotentIf<fn(&String) -> bool>>>();
    shareable::<super::fallback::Fallback<Client<Plain>, fn(&String, Error) -> Result<f64, Error>>>(
    );
    shareable::<super::fallback::Gate<Client<Plain>, fn(&String) -> super::fallback::Access>>();
    shareable::<super::fallback::StaleCache<Client<Plain>, fn(&String) -> String, String, f64>>();
    shareable::<BoxClient<String, f64>>();
    #[cfg(feature = "http")]
    shareable::<Client<crate::transport::http::JsonService<String, String>>>();
    #[cfg(feature = "http")]
    {
        use crate::transport::http::{JsonRequest, JsonService};
        shareable::<Client<JsonService<JsonRequest, String>>>();
    }
    #[cfg(feature = "grpc")]
    {
        use crate::transport::grpc::{GrpcService, proto};
        type Push = proto::push_client::PushClient<tonic::transport::Channel>;
        type Deliver = fn(
            Push,
            proto::DeliverRequest,
        ) -> futures_core::future::BoxFuture<
            'static,
            Result<tonic::Response<proto::DeliverReply>, tonic::Status>,
        >;
        shareable::<Client<GrpcService<Push, Deliver>>>();
    }
    fn sendable<T: Send + 'static>() {}
    type Handle =
        tower::util::ServiceFn<fn(crate::Message<String>) -> std::future::Ready<Result<(), Error>>>;
    sendable::<Consumer<Handle>>();
};

#[cfg(test)]
mod tests;
