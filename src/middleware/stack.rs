//! Both stacks, assembled in the one order that works, from one
//! configuration file.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use tower::ServiceBuilder;

use super::circuit_breaker::{CircuitBreaker, CircuitBreakerLayer, WhenOpen};
use super::dead_letter::{DeadLetterAlert, DeadLettering, DeadLetteringLayer};
use super::dedupe::{Dedupe, DedupeLayer, DedupeStore, DedupeTtls, MokaDedupeStore};
use super::retry::{CountAttempts, Retry, RetryLayer};
use super::timeout::{Timeout, TimeoutLayer};
use crate::config::ResilienceConfig;
use crate::error::Error;

/// An RPC client stack: `retry ▸ circuit_breaker ▸ timeout ▸ service`.
pub type Client<S> = Retry<CircuitBreaker<Timeout<S>>>;

/// A consumer handler stack: `dedupe ▸ dead_letter ▸ retry ▸ timeout ▸
/// handler`.
pub type Handler<H> = Dedupe<DeadLettering<Retry<Timeout<H>, CountAttempts>>>;

/// Builds the resilience stacks of a service from its configuration.
///
/// Outer to inner, the order DESIGN.md fixes:
///
/// * RPC clients: `fallback ▸ retry ▸ circuit_breaker ▸ timeout ▸ service`
///   ([`client`](Self::client); the fallback, which only the caller can
///   write, goes around it). The timeout is inside the breaker so the
///   breaker counts timeouts; the breaker is inside retry so every attempt
///   is counted and an open breaker (not retryable) ends the retries at
///   once; the fallback is outside everything so the breaker still sees the
///   failures it answers for.
/// * Consumer handlers: `dedupe ▸ dead_letter ▸ retry ▸ timeout ▸ handler`
///   ([`handler`](Self::handler)). Dedupe is outermost so a duplicate costs
///   no retry and a failure (also a dead-lettered one) releases its mark;
///   dead-lettering sees what retry finally gave up with.
///
/// Each path has its own timeout ([`with_timeout`](Self::with_timeout));
/// the default is the configuration's `circuit_breaker.timeout_ms`.
///
/// ```
/// use std::time::Duration;
/// use switchboard::middleware::Resilience;
/// use switchboard::Error;
/// use tower::{service_fn, ServiceExt};
///
/// # tokio::runtime::Runtime::new().unwrap().block_on(async {
/// let resilience = Resilience::from_yaml(
///     "circuit_breaker:\n  failure_threshold: 5\nretry:\n  max_attempts: 3\n",
/// )?;
/// // Trading → Market has a 20 ms budget (SPEC §3).
/// let market = resilience
///     .with_timeout(Duration::from_millis(20))
///     .client("market", service_fn(|symbol: String| async move { Ok::<_, Error>(150.0) }));
/// assert_eq!(market.oneshot("AAPL".into()).await?, 150.0);
/// # Ok::<(), Error>(())
/// # }).unwrap();
/// ```
#[derive(Clone)]
pub struct Resilience {
    config: ResilienceConfig,
    timeout: Duration,
    jitter: bool,
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
            config,
            jitter: false,
            dedupe_store: Arc::new(MokaDedupeStore::new()),
            dedupe_ttls: None,
            dead_letter: DeadLetteringLayer::log_only(),
        }
    }

    /// Parses and validates a resilience YAML file (see
    /// [`ResilienceConfig::from_yaml`]).
    ///
    /// # Errors
    ///
    /// An [`ErrorKind::Config`](crate::ErrorKind::Config) error naming the
    /// bad key.
    pub fn from_yaml(text: &str) -> Result<Self, Error> {
        Ok(Self::new(ResilienceConfig::from_yaml(text)?))
    }

    /// The configuration.
    pub fn config(&self) -> &ResilienceConfig {
        &self.config
    }

    /// The same stacks with another call timeout, for one path.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// The call timeout of this path.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Adds jitter to the retry waits.
    pub fn with_jitter(mut self) -> Self {
        self.jitter = true;
        self
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
        let retry = &self.config.retry;
        let attempts = retry.max_attempts.max(1);
        self.timeout * attempts + retry.max_backoff() * 2 * (attempts - 1)
    }

    /// The dedupe in-progress TTL: the [worst case](Self::worst_case) plus
    /// one more timeout, so a live holder never loses its mark.
    pub fn in_progress_ttl(&self) -> Duration {
        self.worst_case() + self.timeout
    }

    /// A new circuit breaker named after the dependency it guards, for
    /// [`client_with_breaker`](Self::client_with_breaker) or a
    /// [`Gate`](crate::middleware::fallback::Gate).
    pub fn breaker(&self, name: &str) -> CircuitBreakerLayer {
        CircuitBreakerLayer::named(name, self.config.circuit_breaker)
    }

    fn retry(&self) -> RetryLayer {
        let retry = RetryLayer::new(self.config.retry);
        if self.jitter {
            retry.with_jitter()
        } else {
            retry
        }
    }

    /// `retry ▸ circuit_breaker ▸ timeout ▸ service`, with a new breaker
    /// named `dependency` that fails fast while open.
    pub fn client<S>(&self, dependency: &str, service: S) -> Client<S> {
        self.client_with_breaker(&self.breaker(dependency), service)
    }

    /// `retry ▸ circuit_breaker ▸ timeout ▸ service` around `breaker` (to
    /// watch it, or share it among clients of one dependency). The client
    /// fails fast while the breaker is open.
    pub fn client_with_breaker<S>(&self, breaker: &CircuitBreakerLayer, service: S) -> Client<S> {
        ServiceBuilder::new()
            .layer(self.retry())
            .layer(breaker.clone().when_open(WhenOpen::FailFast))
            .layer(TimeoutLayer::new(self.timeout))
            .service(service)
    }

    /// `dedupe ▸ dead_letter ▸ retry ▸ timeout ▸ handler`, for
    /// [`EventBus::subscribe`](crate::EventBus::subscribe).
    ///
    /// To guard the handler's dependency with a breaker too, wrap the
    /// handler in one built by [`breaker`](Self::breaker) with
    /// [`WhenOpen::Wait`], so the consumer stops pulling while it is open.
    pub fn handler<H>(&self, handler: H) -> Handler<H> {
        let ttls = self.dedupe_ttls.unwrap_or(DedupeTtls {
            in_progress: self.in_progress_ttl(),
            ..DedupeTtls::default()
        });
        let stack = ServiceBuilder::new()
            .layer(DedupeLayer::new(self.dedupe_store.clone()).with_ttls(ttls))
            .layer(self.dead_letter.clone())
            .layer(self.retry().with_next_attempt(CountAttempts))
            .layer(TimeoutLayer::new(self.timeout));
        stack.service(handler)
    }
}

impl fmt::Debug for Resilience {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Resilience")
            .field("config", &self.config)
            .field("timeout", &self.timeout)
            .field("jitter", &self.jitter)
            .field("dedupe_ttls", &self.dedupe_ttls)
            .field("dead_letter", &self.dead_letter)
            .finish_non_exhaustive()
    }
}

impl Default for Resilience {
    /// The SPEC's values.
    fn default() -> Self {
        Self::new(ResilienceConfig::default())
    }
}
