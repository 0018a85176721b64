//! Try a failed call again, a bounded number of times, with exponential
//! backoff, when that is safe and the dependency can take it.
//!
//! Most infrastructure failures pass within a moment: a connection is
//! re-established, a leader is elected, a pod restarts. The retry layer
//! tries a call again only when all of these hold:
//!
//! 1. the error's kind [is retryable](crate::Error::is_retryable) — a
//!    refused request, bad input or an open breaker
//!    ([`ErrorKind::BreakerOpen`](crate::ErrorKind::BreakerOpen)) will fail
//!    the same way again;
//! 2. sending the request again cannot apply it twice: the failure
//!    certainly [did not take effect](crate::Effect::NotApplied) (a refused
//!    connection, HTTP 503 or 429), or the request is idempotent. A timeout,
//!    a lost answer, gRPC `UNKNOWN` or `INTERNAL` may come after the work
//!    was done, so a `PlaceOrder` is not sent again after them. Requests are
//!    not idempotent unless marked: for the whole stack
//!    ([`RetryLayer::idempotent`]) or per call ([`RetryLayer::idempotent_if`]);
//! 3. attempts are left: `max_attempts` in all (strategy §4.3: 3);
//! 4. the retry budget has room: tower's
//!    [`TpsBudget`], shared by every clone
//!    of one stack, lets retries be `budget_percent` (20 %) of the calls of
//!    the last `budget_window_ms` (10 s), plus `budget_min_per_second` (10).
//!    When a dependency browns out and every call fails, three attempts per
//!    call would triple its load just when it can least take it; with the
//!    budget the load grows by a fifth.
//!
//! Otherwise it returns the last error with [`Error::attempts`] set, so a
//! dead-letter queue can record it. Each retry is counted in
//! `switchboard_retries_total`, each one refused by the budget or by a
//! possible effect in `switchboard_retries_refused_total`.
//!
//! The waits come from [`backon`]'s `ExponentialBuilder`: `backoff_ms`
//! (100 ms) before the second attempt, then multiplied by
//! `backoff_multiplier` (2) up to `max_backoff_ms` (1 s): 100 ms, 200 ms, …
//! backon multiplies in `f32`, so the waits are rounded to whole
//! milliseconds, the unit of the configuration. Jitter (`jitter: true`, the
//! default) adds a random part of up to the wait again, so that many
//! clients failing at once do not retry in lockstep. A delay the peer asked
//! for ([`Error::retry_after`]: `Retry-After`, gRPC pushback) makes the wait
//! longer, but never longer than `max_backoff_ms`; when the layer gives up
//! on such an error it sets [`Error::requeue_after`] to that capped delay,
//! so a consume loop puts the message back for no longer either.
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
//! // `Error::transient` says the failed call did nothing: safe to resend.
//! assert_eq!(retrying.oneshot(()).await?, 3);
//! # Ok::<(), Error>(())
//! # }).unwrap();
//! ```

mod future;
mod layer;
mod policy;

use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tower::retry::budget::{Budget, TpsBudget};
use tower::{Service, ServiceExt};

pub use self::future::ResponseFuture;
pub use self::layer::RetryLayer;
pub(crate) use self::policy::Policy;
pub use self::policy::{Idempotency, IdempotentIf, Uniform};
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
///
/// Clones share one retry budget.
#[derive(Debug, Clone)]
pub struct Retry<S, N = SameRequest, I = Uniform> {
    inner: S,
    policy: Policy,
    budget: Arc<TpsBudget>,
    next: N,
    idempotency: I,
}

impl<S> Retry<S> {
    /// `inner`, retried as `config` says, with a budget of its own; no
    /// request is idempotent.
    pub fn new(inner: S, config: &RetryConfig) -> Self {
        Self::from_parts(
            inner,
            Policy::new(config),
            policy::budget(config),
            SameRequest,
            Uniform::NONE,
        )
    }
}

impl<S, N> Retry<S, N, Uniform> {
    /// Takes every request as idempotent: a timeout or a lost answer is
    /// retried too.
    pub fn idempotent(mut self) -> Self {
        self.idempotency = Uniform::ALL;
        self
    }
}

impl<S, N, I> Retry<S, N, I> {
    pub(crate) fn from_parts(
        inner: S,
        policy: Policy,
        budget: Arc<TpsBudget>,
        next: N,
        idempotency: I,
    ) -> Self {
        Self {
            inner,
            policy,
            budget,
            next,
            idempotency,
        }
    }

    /// Decides per call which requests are idempotent, with `is_idempotent`
    /// (such as "a read").
    pub fn idempotent_if<F>(self, is_idempotent: F) -> Retry<S, N, IdempotentIf<F>> {
        Retry::from_parts(
            self.inner,
            self.policy,
            self.budget,
            self.next,
            IdempotentIf(is_idempotent),
        )
    }

    /// Which requests it takes as idempotent.
    pub fn idempotency(&self) -> &I {
        &self.idempotency
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

impl<S, N, I, Request> Service<Request> for Retry<S, N, I>
where
    S: Service<Request> + Clone + Send + 'static,
    S::Error: Into<Error>,
    S::Future: Send,
    S::Response: Send + 'static,
    N: NextAttempt<Request>,
    I: Idempotency<Request>,
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
        let (policy, next, budget) = (self.policy, self.next.clone(), self.budget.clone());
        let idempotent = self.idempotency.is_idempotent(&request);
        // Every call earns the budget its share of retries.
        budget.deposit();
        ResponseFuture::new(async move {
            let mut delays = policy.waits();
            let mut request = request;
            let mut attempt = 1;
            loop {
                let result = service.call(request.clone()).await.map_err(Into::into);
                let error = match result {
                    Ok(response) => return Ok(response),
                    // Not a failure: the batch consumer has put the message
                    // back behind an earlier one of its key.
                    Err(error) if error.is_held_back() => return Err(error),
                    Err(error) => error,
                };
                let scheduled = match delays.next() {
                    Some(delay) if error.is_retryable() && attempt < policy.max_attempts => delay,
                    _ => return Err(policy.give_up(error, attempt)),
                };
                if !error.is_safe_to_retry(idempotent) {
                    crate::observe::metrics::retry_refused("may_have_applied");
                    tracing::debug!(
                        attempt,
                        %error,
                        "call failed and may have taken effect; not idempotent, so not sent again",
                    );
                    return Err(policy.give_up(error, attempt));
                }
                if !budget.withdraw() {
                    crate::observe::metrics::retry_refused("budget");
                    tracing::debug!(attempt, %error, "call failed; the retry budget is spent");
                    return Err(policy.give_up(error, attempt));
                }
                let delay = policy.wait(scheduled, &error);
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
