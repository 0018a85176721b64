use std::sync::Arc;

use tokio::sync::watch;
use tower::Layer;

use super::state::Shared;
use super::{BreakerState, CircuitBreaker, WhenOpen};
use crate::config::CircuitBreakerConfig;

/// Wraps services in a [`CircuitBreaker`].
///
/// One layer is one breaker: every service it wraps (and every clone of the
/// layer) shares the same state, because a breaker stands for the health of
/// one dependency, however many clients or handlers reach it. Build a second
/// layer for a second dependency.
///
/// ```
/// use switchboard::config::CircuitBreakerConfig;
/// use switchboard::middleware::circuit_breaker::{BreakerState, CircuitBreakerLayer};
///
/// let layer = CircuitBreakerLayer::named("market", CircuitBreakerConfig::default());
/// assert_eq!(layer.state(), BreakerState::Closed);
/// ```
#[derive(Debug, Clone)]
pub struct CircuitBreakerLayer {
    shared: Arc<Shared>,
    when_open: WhenOpen,
}

impl CircuitBreakerLayer {
    /// A new breaker configured by the `circuit_breaker:` block.
    pub fn new(config: CircuitBreakerConfig) -> Self {
        Self::named("circuit-breaker", config)
    }

    /// A new breaker whose name appears in its logs and errors (the
    /// dependency it guards, such as `"market"`).
    pub fn named(name: impl Into<String>, config: CircuitBreakerConfig) -> Self {
        Self {
            shared: Arc::new(Shared::new(name.into(), config)),
            when_open: WhenOpen::default(),
        }
    }

    /// Sets what services built from now on do while the breaker is open.
    /// The breaker's state stays shared.
    pub fn when_open(mut self, when_open: WhenOpen) -> Self {
        self.when_open = when_open;
        self
    }

    /// The breaker's name, as it appears in logs and errors.
    pub fn name(&self) -> &str {
        self.shared.name()
    }

    /// The breaker's state now.
    pub fn state(&self) -> BreakerState {
        self.shared.state()
    }

    /// The state with when it last changed, the consecutive failures and
    /// how often it opened — for status pages.
    ///
    /// ```
    /// use switchboard::config::CircuitBreakerConfig;
    /// use switchboard::middleware::circuit_breaker::{BreakerState, CircuitBreakerLayer};
    ///
    /// let layer = CircuitBreakerLayer::named("market", CircuitBreakerConfig::default());
    /// let snapshot = layer.snapshot();
    /// assert_eq!((snapshot.name.as_str(), snapshot.state), ("market", BreakerState::Closed));
    /// assert_eq!(snapshot.opened_total, 0);
    /// ```
    pub fn snapshot(&self) -> super::BreakerSnapshot {
        self.shared.snapshot()
    }

    /// A receiver that sees every change of the breaker's state.
    pub fn watch(&self) -> watch::Receiver<BreakerState> {
        self.shared.watch()
    }
}

impl<S> Layer<S> for CircuitBreakerLayer {
    type Service = CircuitBreaker<S>;

    fn layer(&self, inner: S) -> Self::Service {
        CircuitBreaker::with_shared(inner, self.shared.clone(), self.when_open)
    }
}
