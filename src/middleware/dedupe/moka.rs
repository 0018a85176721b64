//! The in-process dedupe store, on a moka cache.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use moka::Expiry;
use moka::notification::RemovalCause;
use moka::ops::compute::Op;
use moka::policy::EvictionPolicy;
use moka::sync::Cache;

use super::store::{DedupeStore, Mark};
use crate::error::Error;

/// Dedupe marks in a moka cache: fast, bounded, and local to the process.
///
/// Right for a consumer that runs as one replica, or whose transport never
/// hands the same message to two replicas at once; replicas that must see
/// each other's marks need a shared store (Redis). Each mark expires after
/// its own TTL.
///
/// A new mark is always stored. When the cache is full, room is made by
/// evicting the least recently used marks, even if their TTL has not run
/// out: a duplicate of an evicted event is no longer caught and runs again.
/// Size the store to hold every event handled within the redelivery window
/// (the done TTL, or at least as far back as a broker or an operator may
/// redeliver). Such evictions are counted, by [`evictions`](Self::evictions)
/// and the `switchboard_dedupe_evictions_total` metric (label
/// `store="moka"`); a count that keeps growing means the capacity is too
/// small. The count is updated as moka does its housekeeping, which runs
/// along with the cache's reads and writes.
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
    /// Marks evicted for room before their TTL ran out; shared by clones.
    evictions: Arc<AtomicU64>,
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

    /// A store holding up to `capacity` marks; the least recently used are
    /// evicted to make room for new ones.
    pub fn with_capacity(capacity: u64) -> Self {
        let evictions = Arc::new(AtomicU64::new(0));
        let counter = evictions.clone();
        let marks = Cache::builder()
            .max_capacity(capacity)
            // TinyLFU, moka's default, may refuse a new entry when the cache
            // is full; a refused mark would let its duplicates through.
            .eviction_policy(EvictionPolicy::lru())
            .expire_after(OwnTtl)
            .eviction_listener(move |_, _, cause| {
                // Expired marks are removed with `Expired`; `Size` is a mark
                // pushed out before its TTL ran out.
                if cause == RemovalCause::Size {
                    counter.fetch_add(1, Ordering::Relaxed);
                    crate::observe::metrics::dedupe_evicted("moka");
                }
            })
            .build();
        Self { marks, evictions }
    }

    /// How many marks this store (and its clones) evicted to make room
    /// before their TTL ran out. Each of them is an event whose duplicates
    /// are no longer caught.
    pub fn evictions(&self) -> u64 {
        self.evictions.load(Ordering::Relaxed)
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

    async fn extend(&self, key: &str, token: &str, ttl: Duration) -> Result<bool, Error> {
        Ok(self.compute(key, |current| match current {
            // Written again with the new TTL: moka restarts its expiry.
            Some(entry) if held_by(Some(entry), token) => (
                Op::Put(Entry {
                    token: entry.token.clone(),
                    ttl,
                }),
                true,
            ),
            _ => (Op::Nop, false),
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
            .field("evictions", &self.evictions())
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

    #[test]
    fn at_capacity_the_least_recent_marks_make_room_and_are_counted() {
        use metrics_util::debugging::{DebugValue, DebuggingRecorder};

        const CAPACITY: u64 = 64;
        let recorder = DebuggingRecorder::new();
        let snapshotter = recorder.snapshotter();
        let store = MokaDedupeStore::with_capacity(CAPACITY);
        let keys: Vec<String> = (0..2 * CAPACITY).map(|n| format!("g:{n}")).collect();
        metrics::with_local_recorder(&recorder, || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .build()
                .unwrap();
            runtime.block_on(async {
                for key in &keys {
                    assert_eq!(
                        store.try_begin(key, "a", MINUTE).await.unwrap(),
                        Mark::Acquired
                    );
                    assert!(store.complete(key, "a", MINUTE).await.unwrap());
                }
                store.marks.run_pending_tasks();
            });
        });

        let (older, recent) = keys.split_at(CAPACITY as usize);
        for key in older {
            assert!(!store.marks.contains_key(key), "{key} was kept");
        }
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        runtime.block_on(async {
            for key in recent {
                assert_eq!(
                    store.try_begin(key, "b", MINUTE).await.unwrap(),
                    Mark::Done,
                    "a duplicate of {key} was not caught"
                );
            }
        });
        assert_eq!(store.evictions(), CAPACITY);
        assert_eq!(
            store.clone().evictions(),
            CAPACITY,
            "clones share the count"
        );
        let evicted: Vec<_> = snapshotter
            .snapshot()
            .into_vec()
            .into_iter()
            .filter(|(key, ..)| {
                key.key().name() == crate::observe::metrics::DEDUPE_EVICTIONS_TOTAL
                    && key
                        .key()
                        .labels()
                        .any(|label| label.key() == "store" && label.value() == "moka")
            })
            .map(|(.., value)| value)
            .collect();
        assert_eq!(evicted, vec![DebugValue::Counter(CAPACITY)]);
    }

    #[tokio::test]
    async fn only_the_holder_extends_its_mark() {
        let store = MokaDedupeStore::new();
        assert!(!store.extend("k", "a", MINUTE).await.unwrap(), "no mark");
        store.try_begin("k", "a", MINUTE).await.unwrap();
        assert!(!store.extend("k", "b", MINUTE).await.unwrap());
        assert!(store.extend("k", "a", MINUTE).await.unwrap());
        assert_eq!(
            store.try_begin("k", "b", MINUTE).await.unwrap(),
            Mark::InProgress,
            "extending keeps the mark in progress"
        );
        assert!(store.complete("k", "a", MINUTE).await.unwrap());
        assert!(
            !store.extend("k", "a", MINUTE).await.unwrap(),
            "a done mark is no longer the holder's"
        );
        assert_eq!(store.try_begin("k", "b", MINUTE).await.unwrap(), Mark::Done);
    }

    #[tokio::test]
    async fn an_extended_mark_outlives_its_first_ttl() {
        // moka keeps its own clock, so this waits in real time, briefly.
        let store = MokaDedupeStore::new();
        let short = Duration::from_millis(100);
        store.try_begin("k", "a", short).await.unwrap();
        assert!(store.extend("k", "a", MINUTE).await.unwrap());
        tokio::time::sleep(3 * short).await;
        assert_eq!(
            store.try_begin("k", "b", MINUTE).await.unwrap(),
            Mark::InProgress,
            "the mark expired after its first TTL"
        );
        assert!(store.complete("k", "a", MINUTE).await.unwrap());
    }
}
