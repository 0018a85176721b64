//! Try a failed call again, a bounded number of times, with exponential
//! backoff.
//!
//! Most infrastructure failures pass within a moment: a connection is
//! re-established, a leader is elected, a pod restarts. The retry layer
//! tries again only errors whose kind [is retryable](crate::Error::is_retryable)
//! — a refused request, bad input or an open breaker
//! ([`ErrorKind::BreakerOpen`](crate::ErrorKind::BreakerOpen)) will fail the
//! same way again, and retrying them would only add load — and gives up after
//! `max_attempts` attempts in all (SPEC §4.3: 3), returning the last error
//! with [`Error::attempts`] set so a dead-letter queue can record it.
//!
//! The waits come from [`backon`]'s `ExponentialBuilder`: `backoff_ms`
//! (100 ms) before the second attempt, then multiplied by
//! `backoff_multiplier` (2) up to `max_backoff_ms` (1 s): 100 ms, 200 ms, …
//! backon multiplies in `f32`, so the waits are rounded to whole
//! milliseconds, the unit of the configuration. [`with_jitter`] adds a random
//! part of up to the wait again, so that many clients failing at once do not
//! retry in lockstep.
//!
//! (The `backoff` crate named in the original plan is unmaintained,
//! RUSTSEC-2025-0012; backon is its maintained replacement.)
//!
//! Requests must be `Clone` to be sent again. A [`NextAttempt`] hook changes
//! the request between attempts: [`CountAttempts`] raises a
//! [`Message`]'s [`attempt`](crate::Message::attempt), so the
//! handler — and the dead-letter facts — see one attempt count that includes
//! the broker's deliveries and the in-process retries.
//!
//! [`with_jitter`]: RetryLayer::with_jitter
//!
//! ```
//! use std::sync::atomic::{AtomicU32, Ordering};
//! use std::sync::Arc;
//! use switchboard::config::RetryConfig;
//! use switchboard::middleware::retry::RetryLayer;
//! use switchboard::Error;
//! use tower::{service_fn, ServiceBuilder, ServiceExt};
//!
//! # tokio::runtime::Runtime::new().unwrap().block_on(async {
//! let tries = Arc::new(AtomicU32::new(0));
//! let counted = tries.clone();
//! let flaky = service_fn(move |_: ()| {
//!     let attempt = counted.fetch_add(1, Ordering::SeqCst) + 1;
//!     async move {
//!         if attempt < 3 { Err(Error::transient("blip")) } else { Ok(attempt) }
//!     }
//! });
//! let retrying = ServiceBuilder::new()
//!     .layer(RetryLayer::new(RetryConfig::default()))
//!     .service(flaky);
//! assert_eq!(retrying.oneshot(()).await?, 3);
//! # Ok::<(), Error>(())
//! # }).unwrap();
//! ```

mod future;
mod layer;

use std::task::{Context, Poll};
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};
use tower::{Service, ServiceExt};

pub use self::future::ResponseFuture;
pub use self::layer::RetryLayer;
use crate::bus::Message;
use crate::config::RetryConfig;
use crate::error::Error;

/// Changes a request before it is sent again.
pub trait NextAttempt<Request>: Clone + Send + Sync + 'static {
    /// The request for the next attempt, made from the previous one.
    fn next_attempt(&self, request: Request) -> Request;
}

/// Sends the same request again, unchanged.
#[derive(Debug, Clone, Copy, Default)]
pub struct SameRequest;

impl<Request> NextAttempt<Request> for SameRequest {
    fn next_attempt(&self, request: Request) -> Request {
        request
    }
}

/// Raises a [`Message`]'s attempt count by one for each retry.
#[derive(Debug, Clone, Copy, Default)]
pub struct CountAttempts;

impl<E> NextAttempt<Message<E>> for CountAttempts {
    fn next_attempt(&self, message: Message<E>) -> Message<E> {
        let attempt = message.attempt().saturating_add(1);
        message.with_attempt(attempt)
    }
}

/// A service whose failed calls are tried again; see the
/// [module docs](self).
#[derive(Debug, Clone)]
pub struct Retry<S, N = SameRequest> {
    inner: S,
    policy: Policy,
    next: N,
}

/// The schedule: how many attempts, and the waits between them.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Policy {
    max_attempts: u32,
    backoff: ExponentialBuilder,
}

impl Policy {
    pub(crate) fn new(config: &RetryConfig, jitter: bool) -> Self {
        let mut backoff = ExponentialBuilder::new()
            .with_min_delay(config.backoff())
            .with_max_delay(config.max_backoff())
            .with_factor(config.backoff_multiplier as f32)
            .with_max_times(config.max_attempts.saturating_sub(1) as usize);
        if jitter {
            backoff = backoff.with_jitter();
        }
        Self {
            max_attempts: config.max_attempts.max(1),
            backoff,
        }
    }

    /// The waits before the second, third, … attempt.
    pub(crate) fn delays(&self) -> impl Iterator<Item = Duration> + Send + use<> {
        // backon multiplies in f32 (100 ms × 2 comes out as 200.000003 ms);
        // the configuration is in whole milliseconds, and so are the waits.
        self.backoff
            .build()
            .map(|delay| Duration::from_millis((delay.as_secs_f64() * 1000.0).round() as u64))
    }
}

impl<S> Retry<S> {
    /// `inner`, retried as `config` says.
    pub fn new(inner: S, config: &RetryConfig) -> Self {
        Self {
            inner,
            policy: Policy::new(config, false),
            next: SameRequest,
        }
    }
}

impl<S, N> Retry<S, N> {
    pub(crate) fn from_parts(inner: S, policy: Policy, next: N) -> Self {
        Self {
            inner,
            policy,
            next,
        }
    }

    /// The waits before each retry, in order, as configured (without
    /// jitter's random part if jitter is on).
    pub fn delays(&self) -> Vec<Duration> {
        self.policy.delays().collect()
    }

    /// The wrapped service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The wrapped service, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// The wrapped service, unwrapped.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S, N, Request> Service<Request> for Retry<S, N>
where
    S: Service<Request> + Clone + Send + 'static,
    S::Error: Into<Error>,
    S::Future: Send,
    S::Response: Send + 'static,
    N: NextAttempt<Request>,
    Request: Clone + Send + 'static,
{
    type Response = S::Response;
    type Error = Error;
    type Future = ResponseFuture<S::Response>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, request: Request) -> Self::Future {
        // The service made ready by `poll_ready` makes the first attempt; a
        // clone waits for readiness before each later one.
        let clone = self.inner.clone();
        let mut service = std::mem::replace(&mut self.inner, clone);
        let (policy, next) = (self.policy, self.next.clone());
        ResponseFuture::new(async move {
            let mut delays = policy.delays();
            let mut request = request;
            let mut attempt = 1;
            loop {
                let result = service.call(request.clone()).await.map_err(Into::into);
                let error = match result {
                    Ok(response) => return Ok(response),
                    Err(error) => error,
                };
                let delay = match delays.next() {
                    Some(delay) if error.is_retryable() && attempt < policy.max_attempts => delay,
                    _ => return Err(error.with_attempts(attempt)),
                };
                crate::observe::metrics::retried(error.kind());
                tracing::debug!(
                    attempt,
                    delay_ms = delay.as_millis() as u64,
                    %error,
                    "call failed; trying again",
                );
                tokio::time::sleep(delay).await;
                request = next.next_attempt(request);
                attempt += 1;
                if let Err(error) = service.ready().await {
                    return Err(error.into().with_attempts(attempt - 1));
                }
            }
        })
    }
}

#[cfg(test)]
mod tests;
