//! A deadline for each call, failing with a retryable
//! [`ErrorKind::Timeout`](crate::ErrorKind::Timeout).
//!
//! tower has a timeout layer, but its error is an opaque boxed `Elapsed`: the
//! retry layer and the circuit breaker here decide by
//! [`ErrorKind`](crate::ErrorKind), so this one fails with the crate's
//! [`Error`] of kind `Timeout`, which both count as an infrastructure
//! failure. Each path gets its own deadline — strategy §3's budgets (20 ms for
//! Trading → Market, 50 ms through the gateway) are far below the breaker's
//! default 5 s `timeout_ms`.
//!
//! ```
//! use std::time::Duration;
//! use switchboard::ErrorKind;
//! use switchboard::middleware::timeout::TimeoutLayer;
//! use tower::{service_fn, ServiceBuilder, ServiceExt};
//!
//! # tokio::runtime::Runtime::new().unwrap().block_on(async {
//! let slow = service_fn(|_: ()| async {
//!     tokio::time::sleep(Duration::from_secs(1)).await;
//!     Ok::<_, switchboard::Error>(())
//! });
//! let error = ServiceBuilder::new()
//!     .layer(TimeoutLayer::new(Duration::from_millis(20)))
//!     .service(slow)
//!     .oneshot(())
//!     .await
//!     .unwrap_err();
//! assert_eq!(error.kind(), ErrorKind::Timeout);
//! assert!(error.is_retryable());
//! # });
//! ```

mod future;
mod layer;

use std::task::{Context, Poll};
use std::time::Duration;

use tower::Service;

pub use self::future::ResponseFuture;
pub use self::layer::TimeoutLayer;
use crate::error::Error;

/// A service whose calls fail with [`ErrorKind::Timeout`](crate::ErrorKind::Timeout) when they take
/// longer than a deadline.
#[derive(Debug, Clone)]
pub struct Timeout<S> {
    inner: S,
    timeout: Duration,
}

impl<S> Timeout<S> {
    /// `inner` with every call limited to `timeout`.
    pub fn new(inner: S, timeout: Duration) -> Self {
        Self { inner, timeout }
    }

    /// The deadline of each call.
    pub fn timeout(&self) -> Duration {
        self.timeout
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

impl<S, Request> Service<Request> for Timeout<S>
where
    S: Service<Request>,
    S::Error: Into<Error>,
{
    type Response = S::Response;
    type Error = Error;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        // Waiting to be ready is not limited: that is backpressure, and a
        // breaker in wait mode may be not ready for its whole reset timeout.
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, request: Request) -> Self::Future {
        ResponseFuture::new(self.inner.call(request), self.timeout)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::time::Instant;
    use tower::{ServiceExt, service_fn};

    use super::*;
    use crate::error::ErrorKind;

    #[tokio::test(start_paused = true)]
    async fn a_call_over_its_deadline_fails_with_a_retryable_timeout_at_the_deadline() {
        let started = Instant::now();
        let error = Timeout::new(
            service_fn(|_: ()| std::future::pending::<Result<(), Error>>()),
            Duration::from_millis(20),
        )
        .oneshot(())
        .await
        .unwrap_err();
        assert_eq!(error.kind(), ErrorKind::Timeout);
        assert!(error.is_retryable());
        assert!(error.message().contains("20 ms"), "{error}");
        assert_eq!(started.elapsed(), Duration::from_millis(20));
    }

    #[tokio::test(start_paused = true)]
    async fn a_call_within_its_deadline_keeps_its_answer_and_its_error() {
        let ok = Timeout::new(
            service_fn(|n: u32| async move {
                tokio::time::sleep(Duration::from_millis(19)).await;
                Ok::<_, Error>(n)
            }),
            Duration::from_millis(20),
        );
        assert_eq!(ok.oneshot(3).await.unwrap(), 3);
        let refused = Timeout::new(
            service_fn(|_: u32| async { Err::<u32, _>(Error::permanent("bad")) }),
            Duration::from_millis(20),
        );
        assert_eq!(
            refused.oneshot(3).await.unwrap_err().kind(),
            ErrorKind::Rejected
        );
    }
}
