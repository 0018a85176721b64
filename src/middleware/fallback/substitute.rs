use std::fmt;
use std::task::{Context, Poll};

use tower::{Layer, Service};

use super::{ResponseFuture, dependency_down};
use crate::error::Error;

/// Answers with a substitute computed from the request and the error when
/// the dependency is down; see the [module docs](super).
///
/// The substitute function may return the error (or another) when it has
/// nothing to offer.
///
/// ```
/// use switchboard::middleware::fallback::FallbackLayer;
/// use switchboard::{Error, ErrorKind};
/// use tower::{service_fn, Layer, ServiceExt};
///
/// # tokio::runtime::Runtime::new().unwrap().block_on(async {
/// let profile = FallbackLayer::new(|user: &u64, _error: Error| Ok(format!("player {user} (basic)")))
///     .layer(service_fn(|_: u64| async { Err::<String, _>(Error::transient("game is down")) }));
/// assert_eq!(profile.oneshot(7).await?, "player 7 (basic)");
/// # Ok::<(), Error>(())
/// # }).unwrap();
/// ```
#[derive(Clone)]
pub struct Fallback<S, F> {
    inner: S,
    substitute: F,
}

impl<S, F> Fallback<S, F> {
    /// `inner`, answered by `substitute` when its dependency is down.
    pub fn new(inner: S, substitute: F) -> Self {
        Self { inner, substitute }
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

impl<S, F, Request> Service<Request> for Fallback<S, F>
where
    S: Service<Request>,
    S::Error: Into<Error>,
    S::Future: Send + 'static,
    S::Response: Send + 'static,
    F: Fn(&Request, Error) -> Result<S::Response, Error> + Clone + Send + 'static,
    Request: Clone + Send + 'static,
{
    type Response = S::Response;
    type Error = Error;
    type Future = ResponseFuture<S::Response>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, request: Request) -> Self::Future {
        let future = self.inner.call(request.clone());
        let substitute = self.substitute.clone();
        ResponseFuture::new(async move {
            match future.await.map_err(Into::into) {
                Err(error) if dependency_down(&error) => {
                    tracing::debug!(%error, "dependency down; answering with a substitute");
                    substitute(&request, error)
                }
                other => other,
            }
        })
    }
}

impl<S: fmt::Debug, F> fmt::Debug for Fallback<S, F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Fallback")
            .field("inner", &self.inner)
            .finish_non_exhaustive()
    }
}

/// Wraps services in a [`Fallback`].
#[derive(Clone)]
pub struct FallbackLayer<F> {
    substitute: F,
}

impl<F> FallbackLayer<F> {
    /// A layer answering with `substitute` when the dependency is down.
    pub fn new(substitute: F) -> Self {
        Self { substitute }
    }
}

impl<S, F: Clone> Layer<S> for FallbackLayer<F> {
    type Service = Fallback<S, F>;

    fn layer(&self, inner: S) -> Self::Service {
        Fallback::new(inner, self.substitute.clone())
    }
}

impl<F> fmt::Debug for FallbackLayer<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FallbackLayer").finish_non_exhaustive()
    }
}
