use std::sync::Arc;

use tower::Layer;
use tower::retry::budget::TpsBudget;

use super::policy::{self, IdempotentIf, Policy, Uniform};
use super::{CountAttempts, Retry, SameRequest};
use crate::config::RetryConfig;

/// Wraps services in a [`Retry`].
///
/// One layer is one retry budget: every service it wraps (and every clone
/// of the layer) draws on it, as one budget stands for the load one caller
/// may add to one dependency. Build a second layer for a second dependency.
///
/// ```
/// use std::time::Duration;
/// use switchboard::config::RetryConfig;
/// use switchboard::middleware::retry::RetryLayer;
/// use tower::Layer;
///
/// let retry = RetryLayer::new(RetryConfig::default()).layer(());
/// assert_eq!(retry.delays(), [Duration::from_millis(100), Duration::from_millis(200)]);
/// assert!(!retry.idempotency().idempotent(), "not idempotent unless marked");
/// ```
#[derive(Debug, Clone)]
pub struct RetryLayer<N = SameRequest, I = Uniform> {
    policy: Policy,
    budget: Arc<TpsBudget>,
    next: N,
    idempotency: I,
}

impl RetryLayer {
    /// A layer retrying as the `retry:` block says (jitter and budget
    /// included); no request is idempotent.
    pub fn new(config: RetryConfig) -> Self {
        Self {
            policy: Policy::new(&config),
            budget: policy::budget(&config),
            next: SameRequest,
            idempotency: Uniform::NONE,
        }
    }

    /// A layer for consumer handlers: like [`new`](Self::new), and each
    /// retry raises the [`Message`](crate::Message)'s attempt count.
    pub fn for_messages(config: RetryConfig) -> RetryLayer<CountAttempts> {
        Self::new(config).with_next_attempt(CountAttempts)
    }
}

impl<N> RetryLayer<N, Uniform> {
    /// Takes every request as idempotent: a timeout, a lost answer or a
    /// peer's internal error is retried too, not only a failure that
    /// certainly did not take effect.
    pub fn idempotent(mut self) -> Self {
        self.idempotency = Uniform::ALL;
        self
    }
}

impl<N, I> RetryLayer<N, I> {
    /// Adds a random part of up to the wait again to each wait, whatever
    /// the configuration's `jitter` says.
    pub fn with_jitter(mut self) -> Self {
        self.policy = self.policy.with_jitter();
        self
    }

    /// Changes each request before it is sent again.
    pub fn with_next_attempt<M>(self, next: M) -> RetryLayer<M, I> {
        RetryLayer {
            policy: self.policy,
            budget: self.budget,
            next,
            idempotency: self.idempotency,
        }
    }

    /// Decides per call which requests are idempotent, with `is_idempotent`
    /// (such as "a read"); see [`Idempotency`](super::Idempotency).
    pub fn idempotent_if<F>(self, is_idempotent: F) -> RetryLayer<N, IdempotentIf<F>> {
        RetryLayer {
            policy: self.policy,
            budget: self.budget,
            next: self.next,
            idempotency: IdempotentIf(is_idempotent),
        }
    }
}

impl<S, N: Clone, I: Clone> Layer<S> for RetryLayer<N, I> {
    type Service = Retry<S, N, I>;

    fn layer(&self, inner: S) -> Self::Service {
        Retry::from_parts(
            inner,
            self.policy,
            self.budget.clone(),
            self.next.clone(),
            self.idempotency.clone(),
        )
    }
}
