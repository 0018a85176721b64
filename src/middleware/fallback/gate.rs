use std::fmt;
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::sync::watch;
use tower::{Layer, Service};

use super::ResponseFuture;
use crate::error::{Error, ErrorKind};
use crate::middleware::circuit_breaker::{BreakerState, CircuitBreakerLayer};

/// Whether a call changes state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Access {
    /// It only reads: served in every mode.
    Read,
    /// It writes (or starts something new): refused in read-only mode.
    Write,
}

/// The mode a [`Gate`] is in, switched by its breaker.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Mode {
    /// The breaker is closed: everything is served.
    Normal,
    /// The breaker is open or half-open: writes are refused.
    ReadOnly,
}

impl Mode {
    fn of(state: BreakerState) -> Self {
        match state {
            BreakerState::Closed => Self::Normal,
            BreakerState::Open | BreakerState::HalfOpen => Self::ReadOnly,
        }
    }
}

/// Refuses calls classed as writes while a breaker is not closed, and serves
/// reads; see the [module docs](super).
///
/// strategy §4.2's "Trading unavailable → read-only mode" and "Auth unavailable →
/// refuse new requests, keep existing sessions" are both a gate: the classifier
/// says which calls are writes (placing an order; a new login) and which are
/// reads (listing orders; checking a session).
///
/// ```
/// use switchboard::config::CircuitBreakerConfig;
/// use switchboard::middleware::circuit_breaker::CircuitBreakerLayer;
/// use switchboard::middleware::fallback::{Access, GateLayer, Mode};
/// use switchboard::Error;
/// use tower::{service_fn, Layer, ServiceExt};
///
/// # tokio::runtime::Runtime::new().unwrap().block_on(async {
/// let trading = CircuitBreakerLayer::named("trading", CircuitBreakerConfig::default());
/// let gate = GateLayer::new(&trading, |request: &&str| {
///     if request.starts_with("GET") { Access::Read } else { Access::Write }
/// });
/// let orders = gate.layer(service_fn(|_: &str| async { Ok::<_, Error>("ok") }));
/// assert_eq!(orders.mode(), Mode::Normal);
/// assert_eq!(orders.oneshot("POST /orders").await?, "ok");
/// # Ok::<(), Error>(())
/// # }).unwrap();
/// ```
pub struct Gate<S, F> {
    inner: S,
    states: watch::Receiver<BreakerState>,
    name: Arc<str>,
    classify: F,
}

impl<S, F> Gate<S, F> {
    /// `inner`, gated by `breaker`'s state, with calls classed by `classify`.
    pub fn new(inner: S, breaker: &CircuitBreakerLayer, classify: F) -> Self {
        Self {
            inner,
            states: breaker.watch(),
            name: breaker.name().into(),
            classify,
        }
    }

    /// The mode now.
    pub fn mode(&self) -> Mode {
        Mode::of(*self.states.borrow())
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

impl<S, F, Request> Service<Request> for Gate<S, F>
where
    S: Service<Request>,
    S::Error: Into<Error>,
    S::Future: Send + 'static,
    S::Response: Send + 'static,
    F: Fn(&Request) -> Access,
{
    type Response = S::Response;
    type Error = Error;
    type Future = ResponseFuture<S::Response>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, request: Request) -> Self::Future {
        if (self.classify)(&request) == Access::Write && self.mode() == Mode::ReadOnly {
            let error = Error::new(
                ErrorKind::BreakerOpen,
                format!(
                    "read-only mode: {} is unavailable, so changes are refused until it recovers",
                    self.name
                ),
            );
            return ResponseFuture::new(std::future::ready(Err(error)));
        }
        let future = self.inner.call(request);
        ResponseFuture::new(async move { future.await.map_err(Into::into) })
    }
}

impl<S: Clone, F: Clone> Clone for Gate<S, F> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            states: self.states.clone(),
            name: self.name.clone(),
            classify: self.classify.clone(),
        }
    }
}

impl<S: fmt::Debug, F> fmt::Debug for Gate<S, F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Gate")
            .field("inner", &self.inner)
            .field("breaker", &self.name)
            .field("mode", &self.mode())
            .finish_non_exhaustive()
    }
}

/// Wraps services in a [`Gate`] on one breaker.
#[derive(Clone)]
pub struct GateLayer<F> {
    breaker: CircuitBreakerLayer,
    classify: F,
}

impl<F> GateLayer<F> {
    /// Gates on `breaker`'s state, classing calls with `classify`.
    pub fn new(breaker: &CircuitBreakerLayer, classify: F) -> Self {
        Self {
            breaker: breaker.clone(),
            classify,
        }
    }
}

impl<S, F: Clone> Layer<S> for GateLayer<F> {
    type Service = Gate<S, F>;

    fn layer(&self, inner: S) -> Self::Service {
        Gate::new(inner, &self.breaker, self.classify.clone())
    }
}

impl<F> fmt::Debug for GateLayer<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GateLayer")
            .field("breaker", &self.breaker)
            .finish_non_exhaustive()
    }
}
