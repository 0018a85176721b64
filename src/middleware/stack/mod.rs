//! Both stacks, assembled in the one order that works, from one
//! configuration file.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use tower::ServiceBuilder;

use super::circuit_breaker::{CircuitBreaker, CircuitBreakerLayer, WhenOpen};
use super::dead_letter::{DeadLetterAlert, DeadLettering, DeadLetteringLayer};
use super::dedupe::{Dedupe, DedupeLayer, DedupeStore, DedupeTtls, MokaDedupeStore};
use super::retry::{CountAttempts, Retry, RetryLayer};
use super::timeout::{Timeout, TimeoutLayer};
use crate::config::{CircuitBreakerConfig, ResilienceConfig, RetryConfig};
use serde::Deserialize;

use crate::error::{Error, ErrorKind};

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
/// Each path has its own timeout: the YAML file may carry, beside the
/// SPEC's two blocks, a `timeouts:` block of milliseconds per path name
/// (SPEC §3's budgets are far below the breaker's 5 s `timeout_ms`, which is
/// the default). [`client`](Self::client) looks its dependency's name up
/// there; [`path`](Self::path) does so for anything else, and
/// [`with_timeout`](Self::with_timeout) sets one in code.
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
///   market: 20     # Trading → Market, gRPC (SPEC §3)
///   ledger: 250    # the Game consumer's handler
/// ",
/// )?;
/// assert_eq!(resilience.path("market").timeout(), Duration::from_millis(20));
/// assert_eq!(resilience.path("ledger").timeout(), Duration::from_millis(250));
/// assert_eq!(resilience.path("auth").timeout(), Duration::from_secs(5));
///
/// let market = resilience
///     .client("market", service_fn(|symbol: String| async move { Ok::<_, Error>(150.0) }));
/// assert_eq!(market.oneshot("AAPL".into()).await?, 150.0);
/// # Ok::<(), Error>(())
/// # }).unwrap();
/// ```
#[derive(Clone)]
pub struct Resilience {
    config: ResilienceConfig,
    timeout: Duration,
    timeouts: Arc<BTreeMap<String, Duration>>,
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
            timeouts: Arc::default(),
            config,
            jitter: false,
            dedupe_store: Arc::new(MokaDedupeStore::new()),
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
        let mut path = self.clone();
        if let Some(timeout) = self.timeouts.get(name) {
            path.timeout = *timeout;
        }
        path
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
    /// one more timeout and the breaker's reset timeout (a breaker in wait
    /// mode inside the handler can hold a retry that long), so a live holder
    /// never loses its mark.
    pub fn in_progress_ttl(&self) -> Duration {
        self.worst_case() + self.timeout + self.config.circuit_breaker.reset_timeout()
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
    /// named `dependency` that fails fast while open, and the timeout of the
    /// path `dependency` (see [`path`](Self::path)).
    pub fn client<S>(&self, dependency: &str, service: S) -> Client<S> {
        self.path(dependency)
            .client_with_breaker(&self.breaker(dependency), service)
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
            .field("timeouts", &self.timeouts)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_yaml_file_sets_the_spec_blocks_and_a_timeout_per_path() {
        let resilience = Resilience::from_yaml(
            "circuit_breaker:\n  failure_threshold: 2\nretry:\n  max_attempts: 4\ntimeouts:\n  market: 20\n",
        )
        .unwrap();
        assert_eq!(resilience.config().circuit_breaker.failure_threshold, 2);
        assert_eq!(resilience.config().retry.max_attempts, 4);
        assert_eq!(resilience.timeout(), Duration::from_secs(5));
        assert_eq!(
            resilience.path("market").timeout(),
            Duration::from_millis(20)
        );
        assert_eq!(resilience.path("game").timeout(), Duration::from_secs(5));
        let client = resilience.client(
            "market",
            tower::service_fn(|_: ()| async { Ok::<_, Error>(()) }),
        );
        assert_eq!(
            client.get_ref().get_ref().timeout(),
            Duration::from_millis(20)
        );
        assert_eq!(client.get_ref().name(), "market");
    }

    #[test]
    fn a_bad_file_is_refused_naming_the_key() {
        for (text, needle) in [
            ("timeouts:\n  market: 0\n", "timeouts.market"),
            ("retry:\n  max_attempts: 0\n", "retry.max_attempts"),
            ("circuit_breaker:\n  treshold: 2\n", "treshold"),
            ("timeout:\n  market: 20\n", "timeout"),
            ("timeouts:\n  market: fast\n", "line 2"),
        ] {
            let error = Resilience::from_yaml(text).unwrap_err();
            assert_eq!(error.kind(), ErrorKind::Config);
            assert!(error.message().contains(needle), "{text:?}: {error}");
        }
    }

    #[test]
    fn the_in_progress_ttl_outlasts_everything_inside_the_dedupe_layer() {
        let resilience = Resilience::default().with_timeout(Duration::from_millis(250));
        // 3 × 250 ms attempts, 2 waits of at most 2 × 1 s (jitter), then one
        // more timeout and the breaker's 30 s reset.
        assert_eq!(resilience.worst_case(), Duration::from_millis(4_750));
        assert_eq!(resilience.in_progress_ttl(), Duration::from_millis(35_000));
        let handler = resilience.handler(tower::service_fn(
            |_: crate::Message<crate::middleware::test_support::Ping>| async { Ok::<_, Error>(()) },
        ));
        assert_eq!(handler.ttls().in_progress, resilience.in_progress_ttl());
        assert!(handler.ttls().in_progress > resilience.timeout() * 3);
    }
}
