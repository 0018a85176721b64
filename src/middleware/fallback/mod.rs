//! Degraded answers for when a dependency is down (strategy §4.2).
//!
//! A breaker that fails fast protects the caller's threads and the sick
//! service; these pieces decide what the caller's own callers get instead of
//! an error. They are generic — the four behaviours of strategy §4.2 (cached
//! price marked delayed, refuse new logins but keep sessions, read-only
//! trading, basic game data) are wired from them in the services:
//!
//! * [`StaleCache`] remembers the last good answer per key and serves it,
//!   marked [`Freshness::Stale`] with its age, when the call fails or the
//!   breaker is open — for up to [`StaleCache::DEFAULT_MAX_AGE`] (5
//!   minutes) unless `with_max_age` says otherwise;
//! * [`Gate`] switches a mode from a breaker's state: while the breaker is
//!   not closed, calls classed as writes are refused with a clear error and
//!   reads are served;
//! * [`Fallback`] computes a substitute answer from what is known when the
//!   call fails.
//!
//! They go outside the breaker (`fallback ▸ retry ▸ circuit_breaker ▸ …`) so
//! the breaker still sees every real failure: a fallback inside it would turn
//! failures into successes and keep the breaker closed while the dependency
//! is down. They step in only for failures of the dependency — retryable
//! kinds and [`ErrorKind::BreakerOpen`]; a
//! refused request is the caller's problem and passes through.

mod gate;
mod stale_cache;
mod substitute;

pub use self::gate::{Access, Gate, GateLayer, Mode};
pub use self::stale_cache::{Cached, Freshness, StaleCache, StaleCacheLayer};
pub use self::substitute::{Fallback, FallbackLayer};

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use crate::error::{Error, ErrorKind};

/// Whether `error` says the dependency is unavailable (rather than that the
/// request was wrong).
pub(crate) fn dependency_down(error: &Error) -> bool {
    error.is_retryable() || error.kind() == ErrorKind::BreakerOpen
}

/// The response future of the fallback services.
pub struct ResponseFuture<T> {
    inner: Pin<Box<dyn Future<Output = Result<T, Error>> + Send>>,
}

impl<T> ResponseFuture<T> {
    fn new(future: impl Future<Output = Result<T, Error>> + Send + 'static) -> Self {
        Self {
            inner: Box::pin(future),
        }
    }
}

impl<T> Future for ResponseFuture<T> {
    type Output = Result<T, Error>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        self.inner.as_mut().poll(cx)
    }
}

impl<T> fmt::Debug for ResponseFuture<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests;
