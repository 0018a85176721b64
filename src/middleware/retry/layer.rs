use tower::Layer;

use super::{CountAttempts, Policy, Retry, SameRequest};
use crate::config::RetryConfig;

/// Wraps services in a [`Retry`].
///
/// ```
/// use std::time::Duration;
/// use switchboard::config::RetryConfig;
/// use switchboard::middleware::retry::RetryLayer;
/// use tower::Layer;
///
/// let retry = RetryLayer::new(RetryConfig::default()).layer(());
/// assert_eq!(retry.delays(), [Duration::from_millis(100), Duration::from_millis(200)]);
/// ```
#[derive(Debug, Clone, Copy)]
pub struct RetryLayer<N = SameRequest> {
    policy: Policy,
    next: N,
}

impl RetryLayer {
    /// A layer retrying as the `retry:` block says.
    pub fn new(config: RetryConfig) -> Self {
        Self {
            policy: Policy::new(&config, false),
            next: SameRequest,
        }
    }

    /// A layer for consumer handlers: like [`new`](Self::new), and each
    /// retry raises the [`Message`](crate::Message)'s attempt count.
    pub fn for_messages(config: RetryConfig) -> RetryLayer<CountAttempts> {
        Self::new(config).with_next_attempt(CountAttempts)
    }
}

impl<N> RetryLayer<N> {
    /// Adds a random part of up to the wait again to each wait.
    pub fn with_jitter(mut self) -> Self {
        self.policy.backoff = self.policy.backoff.with_jitter();
        self
    }

    /// Changes each request before it is sent again.
    pub fn with_next_attempt<M>(self, next: M) -> RetryLayer<M> {
        RetryLayer {
            policy: self.policy,
            next,
        }
    }
}

impl<S, N: Clone> Layer<S> for RetryLayer<N> {
    type Service = Retry<S, N>;

    fn layer(&self, inner: S) -> Self::Service {
        Retry::from_parts(inner, self.policy, self.next.clone())
    }
}
