//! The in-process dedupe store, on a moka cache.

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use moka::Expiry;
use moka::ops::compute::Op;
use moka::sync::Cache;

use super::store::{DedupeStore, Mark};
use crate::error::Error;

/// Dedupe marks in a moka cache: fast, bounded, and local to the process.
///
/// Right for a consumer that runs as one replica, or whose transport never
/// hands the same message to two replicas at once; replicas that must see
/// each other's marks need a shared store (Redis). Each mark expires after
/// its own TTL; when the cache is full, moka evicts the marks least likely to
/// be used again, so size it for the number of events handled within the
/// done TTL.
///
/// ```
/// use std::time::Duration;
/// use switchboard::middleware::dedupe::{DedupeStore, Mark, MokaDedupeStore};
///
/// # tokio::runtime::Runtime::new().unwrap().block_on(async {
/// let store = MokaDedupeStore::new();
/// let ttl = Duration::from_secs(60);
/// assert_eq!(store.try_begin("g:1", "token-a", ttl).await?, Mark::Acquired);
/// assert_eq!(store.try_begin("g:1", "token-b", ttl).await?, Mark::InProgress);
/// assert!(store.complete("g:1", "token-a", ttl).await?);
/// assert_eq!(store.try_begin("g:1", "token-c", ttl).await?, Mark::Done);
/// # Ok::<(), switchboard::Error>(())
/// # }).unwrap();
/// ```
#[derive(Clone)]
pub struct MokaDedupeStore {
    marks: Cache<String, Entry>,
}

#[derive(Clone)]
struct Entry {
    /// The holder's fencing token while in progress; `None` once done.
    token: Option<Arc<str>>,
    ttl: Duration,
}

/// Each mark lives for the TTL it was written with.
struct OwnTtl;

impl Expiry<String, Entry> for OwnTtl {
    fn expire_after_create(&self, _: &String, entry: &Entry, _: Instant) -> Option<Duration> {
        Some(entry.ttl)
    }

    fn expire_after_update(
        &self,
        _: &String,
        entry: &Entry,
        _: Instant,
        _: Option<Duration>,
    ) -> Option<Duration> {
        Some(entry.ttl)
    }
}

impl MokaDedupeStore {
    /// The marks a store holds by default.
    pub const DEFAULT_CAPACITY: u64 = 1_000_000;

    /// A store holding up to [`DEFAULT_CAPACITY`](Self::DEFAULT_CAPACITY)
    /// marks.
    pub fn new() -> Self {
        Self::with_capacity(Self::DEFAULT_CAPACITY)
    }

    /// A store holding up to `capacity` marks.
    pub fn with_capacity(capacity: u64) -> Self {
        Self {
            marks: Cache::builder()
                .max_capacity(capacity)
                .expire_after(OwnTtl)
                .build(),
        }
    }

    /// Runs `decide` on the current mark of `key` atomically.
    fn compute<T>(&self, key: &str, decide: impl FnOnce(Option<&Entry>) -> (Op<Entry>, T)) -> T {
        let mut answer = None;
        self.marks.entry_by_ref(key).and_compute_with(|current| {
            let (op, value) = decide(current.as_ref().map(|entry| entry.value()));
            answer = Some(value);
            op
        });
        answer.expect("moka runs the compute closure exactly once")
    }
}

impl Default for MokaDedupeStore {
    fn default() -> Self {
        Self::new()
    }
}

fn held_by(entry: Option<&Entry>, token: &str) -> bool {
    entry.and_then(|entry| entry.token.as_deref()) == Some(token)
}

#[async_trait]
impl DedupeStore for MokaDedupeStore {
    async fn try_begin(&self, key: &str, token: &str, ttl: Duration) -> Result<Mark, Error> {
        // A mark that exists is only read: duplicates are the common case
        // worth making cheap, and reading needs no entry lock.
        if let Some(entry) = self.marks.get(key) {
            return Ok(if entry.token.is_some() {
                Mark::InProgress
            } else {
                Mark::Done
            });
        }
        Ok(self.compute(key, |current| match current {
            None => {
                let entry = Entry {
                    token: Some(token.into()),
                    ttl,
                };
                (Op::Put(entry), Mark::Acquired)
            }
            Some(entry) if entry.token.is_some() => (Op::Nop, Mark::InProgress),
            Some(_) => (Op::Nop, Mark::Done),
        }))
    }

    async fn complete(&self, key: &str, token: &str, ttl: Duration) -> Result<bool, Error> {
        Ok(self.compute(key, |current| {
            if held_by(current, token) {
                (Op::Put(Entry { token: None, ttl }), true)
            } else {
                (Op::Nop, false)
            }
        }))
    }

    async fn release(&self, key: &str, token: &str) -> Result<bool, Error> {
        Ok(self.compute(key, |current| {
            if held_by(current, token) {
                (Op::Remove, true)
            } else {
                (Op::Nop, false)
            }
        }))
    }
}

impl fmt::Debug for MokaDedupeStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MokaDedupeStore")
            .field("marks", &self.marks.entry_count())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINUTE: Duration = Duration::from_secs(60);

    #[tokio::test]
    async fn only_the_token_holding_the_mark_can_complete_or_release_it() {
        let store = MokaDedupeStore::new();
        assert_eq!(
            store.try_begin("k", "a", MINUTE).await.unwrap(),
            Mark::Acquired
        );
        assert!(!store.complete("k", "b", MINUTE).await.unwrap());
        assert!(!store.release("k", "b").await.unwrap());
        assert_eq!(
            store.try_begin("k", "b", MINUTE).await.unwrap(),
            Mark::InProgress
        );
        assert!(store.release("k", "a").await.unwrap());
        // Released: the next holder takes it, and the old token is powerless.
        assert_eq!(
            store.try_begin("k", "b", MINUTE).await.unwrap(),
            Mark::Acquired
        );
        assert!(!store.complete("k", "a", MINUTE).await.unwrap());
        assert!(store.complete("k", "b", MINUTE).await.unwrap());
        assert_eq!(store.try_begin("k", "c", MINUTE).await.unwrap(), Mark::Done);
        // A done mark is no longer anyone's to release.
        assert!(!store.release("k", "b").await.unwrap());
        assert_eq!(store.try_begin("k", "c", MINUTE).await.unwrap(), Mark::Done);
    }

    #[tokio::test]
    async fn keys_are_independent() {
        let store = MokaDedupeStore::new();
        assert_eq!(
            store.try_begin("g1:e", "a", MINUTE).await.unwrap(),
            Mark::Acquired
        );
        assert_eq!(
            store.try_begin("g2:e", "a", MINUTE).await.unwrap(),
            Mark::Acquired
        );
    }

    #[tokio::test]
    async fn an_in_progress_mark_expires_after_its_ttl() {
        // moka keeps its own clock, so this waits in real time, bounded.
        let store = MokaDedupeStore::new();
        let ttl = Duration::from_millis(50);
        assert_eq!(
            store.try_begin("k", "dead", ttl).await.unwrap(),
            Mark::Acquired
        );
        assert_eq!(
            store.try_begin("k", "b", MINUTE).await.unwrap(),
            Mark::InProgress
        );
        let taken_over = tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                if store.try_begin("k", "b", MINUTE).await.unwrap() == Mark::Acquired {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await;
        assert!(taken_over.is_ok(), "the expired mark was never freed");
        // The holder whose mark expired cannot complete the new one's.
        assert!(!store.complete("k", "dead", MINUTE).await.unwrap());
    }
}
