//! [`CallMetrics`]: counts and times the calls of one path (strategy §3), and
//! feeds its latency budget.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Instant;

use tower::{Layer, Service};

use super::budget::LatencyRecorder;
use super::metrics::{self as names, Label};
use crate::error::Error;

/// Records `switchboard_call_total` and `switchboard_call_duration_seconds`
/// (labels `path`, `transport`, `outcome`) for every call, and, with
/// [`with_budget`](CallMetricsLayer::with_budget), the call's latency into
/// the path's [latency budget](super::LatencyBudgets).
///
/// Put it outermost on a client stack to measure what the caller waits for
/// (retries included), or innermost to measure each attempt.
///
/// ```
/// use switchboard::observe::CallMetricsLayer;
/// use tower::{service_fn, ServiceBuilder, ServiceExt};
///
/// # tokio::runtime::Runtime::new().unwrap().block_on(async {
/// let market = ServiceBuilder::new()
///     .layer(CallMetricsLayer::new("trading_market", "grpc"))
///     .service(service_fn(|symbol: &'static str| async move { Ok::<_, switchboard::Error>(150.0) }));
/// assert_eq!(market.oneshot("AAPL").await?, 150.0);
/// # Ok::<(), switchboard::Error>(())
/// # }).unwrap();
/// ```
#[derive(Clone)]
pub struct CallMetrics<S> {
    inner: S,
    layer: CallMetricsLayer,
}

impl<S> CallMetrics<S> {
    /// Measures `inner` as the path `layer` names.
    pub fn new(inner: S, layer: CallMetricsLayer) -> Self {
        Self { inner, layer }
    }

    /// The inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The inner service, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// Gives back the inner service.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S> fmt::Debug for CallMetrics<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CallMetrics")
            .field("layer", &self.layer)
            .finish_non_exhaustive()
    }
}

impl<S, Request> Service<Request> for CallMetrics<S>
where
    S: Service<Request>,
    S::Error: Into<Error>,
{
    type Response = S::Response;
    type Error = Error;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, request: Request) -> Self::Future {
        ResponseFuture {
            inner: Box::pin(self.inner.call(request)),
            layer: self.layer.clone(),
            started: Instant::now(),
        }
    }
}

/// Names the path a [`CallMetrics`] measures.
#[derive(Clone)]
pub struct CallMetricsLayer {
    path: Label,
    transport: Label,
    budget: Option<LatencyRecorder>,
}

impl CallMetricsLayer {
    /// Measures calls of `path` (such as `"trading_market"`) over
    /// `transport` (such as `"grpc"`).
    pub fn new(path: impl Into<Label>, transport: impl Into<Label>) -> Self {
        Self {
            path: path.into(),
            transport: transport.into(),
            budget: None,
        }
    }

    /// Also records every call's latency into `budget`, the path's
    /// histogram in [`LatencyBudgets`](super::LatencyBudgets).
    pub fn with_budget(mut self, budget: LatencyRecorder) -> Self {
        self.budget = Some(budget);
        self
    }
}

impl fmt::Debug for CallMetricsLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CallMetricsLayer")
            .field("path", &self.path)
            .field("transport", &self.transport)
            .field("budget", &self.budget.is_some())
            .finish()
    }
}

impl<S> Layer<S> for CallMetricsLayer {
    type Service = CallMetrics<S>;

    fn layer(&self, inner: S) -> CallMetrics<S> {
        CallMetrics::new(inner, self.clone())
    }
}

/// The future of a [`CallMetrics`] call.
pub struct ResponseFuture<F> {
    inner: Pin<Box<F>>,
    layer: CallMetricsLayer,
    started: Instant,
}

impl<F> fmt::Debug for ResponseFuture<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}

impl<F, T, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<T, E>>,
    E: Into<Error>,
{
    type Output = Result<T, Error>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let result = match self.inner.as_mut().poll(cx) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(result) => result.map_err(Into::into),
        };
        let elapsed = self.started.elapsed();
        let outcome = match &result {
            Ok(_) => "ok",
            Err(error) => names::kind_label(error.kind()),
        };
        names::called(&self.layer.path, &self.layer.transport, outcome, elapsed);
        if let Some(budget) = &self.layer.budget {
            budget.record(elapsed);
        }
        Poll::Ready(result)
    }
}
