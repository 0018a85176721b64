use std::fmt;
use std::hash::Hash;
use std::task::{Context, Poll};
use std::time::Duration;

use moka::sync::Cache;
use tokio::time::Instant;
use tower::{Layer, Service};

use super::{ResponseFuture, dependency_down};
use crate::error::Error;

/// How old an answer is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Freshness {
    /// Just answered by the dependency.
    Fresh,
    /// The dependency is down; this is the last good answer, this old.
    Stale {
        /// Time since the dependency gave this answer.
        age: Duration,
    },
}

/// An answer from a [`StaleCache`], with how fresh it is — so a price can be
/// shown "delayed" (strategy §4.2: Market unavailable).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Cached<T> {
    /// The answer.
    pub value: T,
    /// Whether it is fresh or how stale.
    pub freshness: Freshness,
}

impl<T> Cached<T> {
    /// Whether the answer is an old one served because the dependency is
    /// down.
    pub fn is_stale(&self) -> bool {
        matches!(self.freshness, Freshness::Stale { .. })
    }
}

#[derive(Clone)]
struct Entry<T> {
    value: T,
    at: Instant,
}

/// Remembers the last good answer per key and serves it, marked stale, when
/// the dependency is down; see the [module docs](super).
///
/// An answer is served for at most [`DEFAULT_MAX_AGE`](StaleCache::DEFAULT_MAX_AGE)
/// (5 minutes) after the dependency gave it, unless
/// [`with_max_age`](Self::with_max_age) says otherwise: past it the
/// dependency's error goes through, since an answer of any age is rarely
/// better than none (a price from yesterday). `with_max_age(Duration::MAX)`
/// serves answers of any age.
///
/// ```
/// use std::sync::atomic::{AtomicBool, Ordering};
/// use std::sync::Arc;
/// use std::time::Duration;
/// use switchboard::middleware::fallback::{StaleCache, StaleCacheLayer};
/// use switchboard::Error;
/// use tower::{service_fn, Layer, ServiceExt};
///
/// # tokio::runtime::Runtime::new().unwrap().block_on(async {
/// let down = Arc::new(AtomicBool::new(false));
/// let market = {
///     let down = down.clone();
///     service_fn(move |symbol: String| {
///         let down = down.load(Ordering::SeqCst);
///         async move { if down { Err(Error::transient("market down")) } else { Ok(150.0_f64) } }
///     })
/// };
/// let prices = StaleCacheLayer::new(|symbol: &String| symbol.clone()).layer(market);
///
/// assert!(!prices.clone().oneshot("AAPL".into()).await?.is_stale());
/// down.store(true, Ordering::SeqCst);
/// let delayed = prices.oneshot("AAPL".into()).await?;
/// assert!(delayed.is_stale());
/// assert_eq!(delayed.value, 150.0);
/// // For at most 5 minutes after the market gave it, unless set otherwise.
/// assert_eq!(StaleCache::DEFAULT_MAX_AGE, Duration::from_secs(300));
/// # Ok::<(), Error>(())
/// # }).unwrap();
/// ```
pub struct StaleCache<S, F, K, T> {
    inner: S,
    key: F,
    cache: Cache<K, Entry<T>>,
    max_age: Duration,
}

/// How long an answer is served by default ([`StaleCache::DEFAULT_MAX_AGE`]).
const DEFAULT_MAX_AGE: Duration = Duration::from_secs(5 * 60);

impl<S, F, K, T> StaleCache<S, F, K, T>
where
    K: Hash + Eq + Send + Sync + 'static,
    T: Clone + Send + Sync + 'static,
{
    /// `inner`, remembering up to `capacity` answers keyed by `key(request)`.
    pub fn new(inner: S, key: F, capacity: u64) -> Self {
        Self {
            inner,
            key,
            cache: Cache::new(capacity),
            max_age: DEFAULT_MAX_AGE,
        }
    }
}

// On one concrete type, so `StaleCache::DEFAULT_MAX_AGE` needs no type
// arguments: inference picks the one impl that has it.
impl StaleCache<(), (), (), ()> {
    /// The oldest answer served unless
    /// [`with_max_age`](StaleCache::with_max_age) says otherwise: 5 minutes.
    pub const DEFAULT_MAX_AGE: Duration = DEFAULT_MAX_AGE;
}

impl<S, F, K, T> StaleCache<S, F, K, T> {
    /// Serves no answer older than `max_age` (default
    /// [`StaleCache::DEFAULT_MAX_AGE`], 5 minutes): past it the error goes
    /// through. `Duration::MAX` serves answers of any age.
    pub fn with_max_age(mut self, max_age: Duration) -> Self {
        self.max_age = max_age;
        self
    }

    /// The oldest answer served.
    pub fn max_age(&self) -> Duration {
        self.max_age
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

impl<S, F, K, T, Request> Service<Request> for StaleCache<S, F, K, T>
where
    S: Service<Request, Response = T>,
    S::Error: Into<Error>,
    S::Future: Send + 'static,
    F: Fn(&Request) -> K,
    K: Hash + Eq + Send + Sync + 'static,
    T: Clone + Send + Sync + 'static,
{
    type Response = Cached<T>;
    type Error = Error;
    type Future = ResponseFuture<Cached<T>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, request: Request) -> Self::Future {
        let key = (self.key)(&request);
        let future = self.inner.call(request);
        let (cache, max_age) = (self.cache.clone(), self.max_age);
        ResponseFuture::new(async move {
            let error = match future.await.map_err(Into::into) {
                Ok(value) => {
                    let entry = Entry {
                        value: value.clone(),
                        at: Instant::now(),
                    };
                    cache.insert(key, entry);
                    return Ok(Cached {
                        value,
                        freshness: Freshness::Fresh,
                    });
                }
                Err(error) if dependency_down(&error) => error,
                Err(error) => return Err(error),
            };
            match cache.get(&key) {
                Some(entry) if entry.at.elapsed() <= max_age => {
                    let age = entry.at.elapsed();
                    tracing::debug!(%error, age_ms = age.as_millis() as u64, "serving a stale answer");
                    Ok(Cached {
                        value: entry.value,
                        freshness: Freshness::Stale { age },
                    })
                }
                _ => Err(error),
            }
        })
    }
}

impl<S: Clone, F: Clone, K, T> Clone for StaleCache<S, F, K, T> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            key: self.key.clone(),
            cache: self.cache.clone(),
            max_age: self.max_age,
        }
    }
}

impl<S: fmt::Debug, F, K, T> fmt::Debug for StaleCache<S, F, K, T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StaleCache")
            .field("inner", &self.inner)
            .field("max_age", &self.max_age)
            .finish_non_exhaustive()
    }
}

/// Wraps services in a [`StaleCache`]; the services one layer builds share
/// one cache.
pub struct StaleCacheLayer<F, K, T> {
    key: F,
    cache: Cache<K, Entry<T>>,
    max_age: Duration,
}

impl<F, K, T> StaleCacheLayer<F, K, T>
where
    K: Hash + Eq + Send + Sync + 'static,
    T: Clone + Send + Sync + 'static,
{
    /// The answers a cache holds by default.
    pub const DEFAULT_CAPACITY: u64 = 10_000;

    /// A layer keying answers by `key(request)`, holding up to
    /// [`DEFAULT_CAPACITY`](Self::DEFAULT_CAPACITY) of them.
    pub fn new(key: F) -> Self {
        Self::with_capacity(key, Self::DEFAULT_CAPACITY)
    }

    /// A layer holding up to `capacity` answers.
    pub fn with_capacity(key: F, capacity: u64) -> Self {
        Self {
            key,
            cache: Cache::new(capacity),
            max_age: DEFAULT_MAX_AGE,
        }
    }
}

impl<F, K, T> StaleCacheLayer<F, K, T> {
    /// Serves no answer older than `max_age` (default
    /// [`StaleCache::DEFAULT_MAX_AGE`], 5 minutes); `Duration::MAX` serves
    /// answers of any age.
    pub fn with_max_age(mut self, max_age: Duration) -> Self {
        self.max_age = max_age;
        self
    }
}

impl<S, F: Clone, K, T> Layer<S> for StaleCacheLayer<F, K, T> {
    type Service = StaleCache<S, F, K, T>;

    fn layer(&self, inner: S) -> Self::Service {
        StaleCache {
            inner,
            key: self.key.clone(),
            cache: self.cache.clone(),
            max_age: self.max_age,
        }
    }
}

impl<F: Clone, K, T> Clone for StaleCacheLayer<F, K, T> {
    fn clone(&self) -> Self {
        Self {
            key: self.key.clone(),
            cache: self.cache.clone(),
            max_age: self.max_age,
        }
    }
}

impl<F, K, T> fmt::Debug for StaleCacheLayer<F, K, T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StaleCacheLayer")
            .field("max_age", &self.max_age)
            .finish_non_exhaustive()
    }
}
