//! A circuit breaker: stop calling a dependency that keeps failing, and try
//! it again later with one trial call.
//!
//! tower has no circuit breaker. Without one, a caller whose dependency is
//! down spends a full timeout (and every retry) on each request, piles up
//! work, and keeps hammering a service that is trying to come back. The
//! breaker counts *consecutive infrastructure failures* — errors whose kind
//! [is retryable](crate::Error::is_retryable): lost connections, timeouts,
//! 5xx-like answers. After `failure_threshold` of them (strategy §4.1: 5) it
//! opens, and for `reset_timeout_ms` (30 s) every call fails at once with
//! [`ErrorKind::BreakerOpen`](crate::ErrorKind::BreakerOpen), without reaching
//! the inner service. Then it is half-open: exactly one trial call goes
//! through; success closes the breaker, failure opens it for another reset
//! timeout.
//!
//! Once the breaker is open or half-open, only the trial call's outcome
//! changes its state. A call let through while it was still closed may end
//! after it opened — a slow success among hundreds in flight when the
//! dependency fell over — and says nothing about the dependency *now*: the
//! breaker starts a new epoch at every change of state, tags each call it
//! lets through with the epoch, and ignores outcomes from older epochs.
//! Otherwise a flapping dependency, under concurrency, would never stay open.
//!
//! A refused request (bad input, 4xx-like, not found) proves the dependency
//! is up and answering, and says nothing about its health, so it neither
//! counts towards opening nor resets the count. `BreakerOpen` is not
//! retryable, so a retry layer outside the breaker does not hammer it; the
//! error carries [`requeue_after`](crate::Error::requeue_after) = the time
//! left until the trial call, so a consume loop puts the message back instead
//! of dead-lettering it — the message did nothing wrong.
//!
//! # Callers and consumers
//!
//! What a service does while the breaker is open is set by [`WhenOpen`]:
//!
//! * [`WhenOpen::FailFast`] (the default, for RPC clients): `poll_ready` is
//!   the inner service's, and each call is decided when it is made: while
//!   open it fails at once with `BreakerOpen`, so a fallback outside it
//!   answers without waiting;
//! * [`WhenOpen::Wait`] (for consumer handlers): `poll_ready` is `Pending`
//!   until the trial call is due, and wakes then. The consume loop of
//!   [`EventBus::subscribe`](crate::EventBus::subscribe) asks `poll_ready`
//!   before pulling each message, so it stops pulling while the breaker is
//!   open instead of cycling every queued message through a nack. The
//!   messages already in flight when it opened, and a trial call that
//!   fails, fail with `requeue_after` = the time until the next trial call:
//!   the consume loop gives them back rather than dead-letter them for an
//!   outage that is not theirs.
//!
//! # Watching
//!
//! [`CircuitBreaker::watch`] returns a [`tokio::sync::watch::Receiver`] of
//! [`BreakerState`] — for metrics, or to switch a degraded mode (see
//! [`fallback::Gate`](crate::middleware::fallback::Gate)). Every transition
//! is logged with `tracing` (open at `WARN`, the others at `INFO`).
//!
//! The call timeout is not the breaker's job: put a
//! [`Timeout`](crate::middleware::timeout::Timeout) inside it, whose
//! `Timeout` errors the breaker counts. The strategy's `timeout_ms` is that
//! layer's default; [`Resilience`](crate::middleware::Resilience) wires both.
//!
//! ```
//! use switchboard::config::CircuitBreakerConfig;
//! use switchboard::middleware::circuit_breaker::{BreakerState, CircuitBreakerLayer};
//! use switchboard::{Error, ErrorKind};
//! use tower::{service_fn, Service, ServiceBuilder, ServiceExt};
//!
//! # tokio::runtime::Runtime::new().unwrap().block_on(async {
//! let config = CircuitBreakerConfig::default().with_failure_threshold(2);
//! let breaker = CircuitBreakerLayer::named("market", config);
//! let mut client = ServiceBuilder::new()
//!     .layer(breaker.clone())
//!     .service(service_fn(|_: ()| async { Err::<(), _>(Error::transient("market is down")) }));
//!
//! for _ in 0..2 {
//!     client.ready().await?.call(()).await.unwrap_err();
//! }
//! assert_eq!(breaker.state(), BreakerState::Open);
//! let error = client.ready().await?.call(()).await.unwrap_err();
//! assert_eq!(error.kind(), ErrorKind::BreakerOpen);
//! assert!(error.requeue_after().is_some());
//! # Ok::<(), switchboard::Error>(())
//! # }).unwrap();
//! ```

mod future;
mod layer;
mod state;

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use tokio::sync::watch;
use tower::Service;

pub use self::future::ResponseFuture;
pub use self::layer::CircuitBreakerLayer;
pub use self::state::{BreakerSnapshot, BreakerState};
use self::state::{Readiness, Shared};
use crate::config::CircuitBreakerConfig;
use crate::error::Error;

/// What a [`CircuitBreaker`] does with callers while it is open; see the
/// [module docs](self).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum WhenOpen {
    /// `poll_ready` is the inner service's; calls fail at once with
    /// `BreakerOpen`.
    #[default]
    FailFast,
    /// `poll_ready` is `Pending` until the trial call is due (or, while the
    /// trial call runs, until its outcome is known). A call that fails
    /// during an outage the breaker already knows of — one let through
    /// before it opened, or the trial call that opens it again — fails with
    /// [`requeue_after`](crate::Error::requeue_after) set to the time until
    /// the next trial call, so a consume loop gives the message back instead
    /// of dead-lettering it.
    Wait,
}

// `Sync` too, so that a stack holding a breaker can sit in shared state
// (axum's, say) without a lock around it.
type WaitFuture = Pin<Box<dyn Future<Output = ()> + Send + Sync>>;

/// A service behind a circuit breaker; see the [module docs](self).
pub struct CircuitBreaker<S> {
    inner: S,
    shared: Arc<Shared>,
    when_open: WhenOpen,
    /// What `poll_ready` waits for in wait mode.
    wait: Option<WaitFuture>,
}

impl<S> CircuitBreaker<S> {
    /// `inner` behind a new breaker of its own.
    pub fn new(inner: S, config: CircuitBreakerConfig) -> Self {
        let shared = Arc::new(Shared::new("circuit-breaker".to_owned(), config));
        Self::with_shared(inner, shared, WhenOpen::default())
    }

    fn with_shared(inner: S, shared: Arc<Shared>, when_open: WhenOpen) -> Self {
        Self {
            inner,
            shared,
            when_open,
            wait: None,
        }
    }

    /// The breaker's state now.
    pub fn state(&self) -> BreakerState {
        self.shared.state()
    }

    /// A receiver that sees every change of the breaker's state.
    pub fn watch(&self) -> watch::Receiver<BreakerState> {
        self.shared.watch()
    }

    /// The breaker's name, as it appears in logs and errors.
    pub fn name(&self) -> &str {
        self.shared.name()
    }

    /// The configuration it runs with.
    pub fn config(&self) -> &CircuitBreakerConfig {
        self.shared.config()
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

    /// In wait mode, waits while the breaker lets nothing through.
    fn poll_breaker(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        if self.when_open == WhenOpen::FailFast {
            // Decided at call time, so a call long after `poll_ready` (a
            // consume loop waiting for the next message) sees the state of
            // that moment.
            return Poll::Ready(());
        }
        loop {
            if let Some(wait) = &mut self.wait {
                ready!(wait.as_mut().poll(cx));
                self.wait = None;
            }
            match self.shared.readiness() {
                Readiness::Ready => return Poll::Ready(()),
                Readiness::OpenUntil(due) => {
                    self.wait = Some(Box::pin(tokio::time::sleep_until(due)));
                }
                Readiness::ProbeInFlight => {
                    // Subscribed before looking again, so an outcome that
                    // lands in between still wakes the wait.
                    let mut changes = self.shared.watch();
                    if self.shared.readiness() == Readiness::ProbeInFlight {
                        self.wait = Some(Box::pin(async move {
                            let _ = changes.changed().await;
                        }));
                    }
                }
            }
        }
    }
}

impl<S, Request> Service<Request> for CircuitBreaker<S>
where
    S: Service<Request>,
    S::Error: Into<Error>,
{
    type Response = S::Response;
    type Error = Error;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        ready!(self.poll_breaker(cx));
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, request: Request) -> Self::Future {
        match self.shared.acquire() {
            Ok(permit) => ResponseFuture::called(
                self.inner.call(request),
                self.shared.clone(),
                permit,
                self.when_open == WhenOpen::Wait,
            ),
            Err(error) => ResponseFuture::rejected(error),
        }
    }
}

impl<S: Clone> Clone for CircuitBreaker<S> {
    fn clone(&self) -> Self {
        Self::with_shared(self.inner.clone(), self.shared.clone(), self.when_open)
    }
}

impl<S: fmt::Debug> fmt::Debug for CircuitBreaker<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CircuitBreaker")
            .field("inner", &self.inner)
            .field("breaker", &self.shared)
            .field("when_open", &self.when_open)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests;
