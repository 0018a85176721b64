//! The in-process dedupe store: sharded hash maps of marks, each mark with
//! its own expiry, the oldest written evicted first when full.
//!
//! It was a moka cache (`MokaDedupeStore`); a first delivery (two writes)
//! cost 8–16 µs there, most of it in the cache's concurrent-map and
//! housekeeping machinery (epoch-based reclamation, a waiter map per
//! `and_compute_with`, rehashing). A mutex per shard around a plain
//! `HashMap` does the same checks in a fraction of that.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::hash::{BuildHasher, RandomState};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use async_trait::async_trait;

use super::store::{DedupeStore, Mark};
use crate::error::Error;

/// Dedupe marks in process memory: fast, bounded, and local to the process.
///
/// Right for a consumer that runs as one replica, or whose transport never
/// hands the same message to two replicas at once; replicas that must see
/// each other's marks need a shared store (Redis). Each mark expires after
/// its own TTL.
///
/// A new mark is always stored. When the store is full, room is made by
/// evicting the marks written longest ago (a mark is written when it is
/// taken and again when it is done), even if their TTL has not run out: a
/// duplicate of an evicted event is no longer caught and runs again. Size
/// the store to hold every event handled within the redelivery window (the
/// done TTL, or at least as far back as a broker or an operator may
/// redeliver). Such evictions are counted, by
/// [`evictions`](Self::evictions) and the
/// `switchboard_dedupe_evictions_total` metric (label `store="memory"`, the
/// store's name); a count that keeps growing means the capacity is too
/// small. Expired marks are dropped as newer ones are written.
///
/// ```
/// use std::time::Duration;
/// use switchboard::middleware::dedupe::{DedupeStore, Mark, MemoryDedupeStore};
///
/// # tokio::runtime::Runtime::new().unwrap().block_on(async {
/// let store = MemoryDedupeStore::new();
/// let ttl = Duration::from_secs(60);
/// assert_eq!(store.try_begin("g:1", "token-a", ttl).await?, Mark::Acquired);
/// assert_eq!(store.try_begin("g:1", "token-b", ttl).await?, Mark::InProgress);
/// assert!(store.complete("g:1", "token-a", ttl).await?);
/// assert_eq!(store.try_begin("g:1", "token-c", ttl).await?, Mark::Done);
/// # Ok::<(), switchboard::Error>(())
/// # }).unwrap();
/// ```
#[derive(Clone)]
pub struct MemoryDedupeStore {
    shards: Arc<[Mutex<Shard>]>,
    /// The marks one shard holds at most.
    per_shard: usize,
    hasher: RandomState,
    /// Marks evicted for room before their TTL ran out; shared by clones.
    evictions: Arc<AtomicU64>,
}

/// One shard: the marks, and the order they were written in.
#[derive(Default)]
struct Shard {
    marks: HashMap<Arc<str>, Slot>,
    /// Every write, oldest first, with the stamp it gave its mark and when
    /// that write expires; an entry whose mark was written again since
    /// (another stamp) or removed is skipped when it comes up.
    written: VecDeque<Written>,
    next_stamp: u64,
}

struct Written {
    key: Arc<str>,
    stamp: u64,
    expires: Instant,
}

struct Slot {
    /// The same allocation as the map's key, for `written`.
    key: Arc<str>,
    /// The holder's fencing token while in progress; `None` once done.
    token: Option<Arc<str>>,
    expires: Instant,
    stamp: u64,
}

impl Slot {
    fn live(&self, now: Instant) -> bool {
        self.expires > now
    }

    fn held_by(&self, token: &str, now: Instant) -> bool {
        self.live(now) && self.token.as_deref() == Some(token)
    }
}

/// Marks per shard below which a store has a single shard (so a small
/// store evicts in exactly the order marks were written).
const MARKS_PER_SHARD: u64 = 4096;
/// Shards of a large store: enough that consumers on many threads seldom
/// wait for each other.
const MOST_SHARDS: u64 = 16;

impl Shard {
    fn stamp(&mut self) -> u64 {
        self.next_stamp += 1;
        self.next_stamp
    }

    /// Stores a new mark of `key` (which has none, or an expired one).
    fn insert(&mut self, key: &str, token: Arc<str>, expires: Instant) {
        let key: Arc<str> = Arc::from(key);
        let stamp = self.stamp();
        self.written.push_back(Written {
            key: key.clone(),
            stamp,
            expires,
        });
        let slot = Slot {
            key: key.clone(),
            token: Some(token),
            expires,
            stamp,
        };
        self.marks.insert(key, slot);
    }

    /// Writes `key`'s existing mark again: the given token, a new expiry.
    fn rewrite(&mut self, key: &str, token: Option<Arc<str>>, expires: Instant) {
        let stamp = self.stamp();
        let Some(slot) = self.marks.get_mut(key) else {
            return;
        };
        (slot.token, slot.expires, slot.stamp) = (token, expires, stamp);
        let key = slot.key.clone();
        self.written.push_back(Written {
            key,
            stamp,
            expires,
        });
    }

    /// Makes room: writes expired by now go first (their marks with them,
    /// unless written again since), then, past `capacity`, the marks
    /// written longest ago (counted as evictions).
    fn trim(&mut self, now: Instant, capacity: usize, evictions: &AtomicU64) {
        while let Some(oldest) = self.written.front() {
            let expired = oldest.expires <= now;
            if !expired && self.marks.len() <= capacity {
                break;
            }
            let current = self
                .marks
                .get(&oldest.key)
                .is_some_and(|slot| slot.stamp == oldest.stamp);
            if current {
                self.marks.remove(&oldest.key);
                if !expired {
                    evictions.fetch_add(1, Ordering::Relaxed);
                    crate::observe::metrics::dedupe_evicted("memory");
                }
            }
            self.written.pop_front();
        }
    }
}

impl MemoryDedupeStore {
    /// The marks a store holds by default.
    pub const DEFAULT_CAPACITY: u64 = 1_000_000;

    /// A store holding up to [`DEFAULT_CAPACITY`](Self::DEFAULT_CAPACITY)
    /// marks.
    pub fn new() -> Self {
        Self::with_capacity(Self::DEFAULT_CAPACITY)
    }

    /// A store holding up to `capacity` marks; those written longest ago
    /// are evicted to make room for new ones.
    pub fn with_capacity(capacity: u64) -> Self {
        let capacity = capacity.max(1);
        let shards = (capacity / MARKS_PER_SHARD).clamp(1, MOST_SHARDS);
        Self {
            shards: (0..shards).map(|_| Mutex::default()).collect(),
            per_shard: capacity.div_ceil(shards) as usize,
            hasher: RandomState::new(),
            evictions: Arc::new(AtomicU64::new(0)),
        }
    }

    /// How many marks this store (and its clones) evicted to make room
    /// before their TTL ran out. Each of them is an event whose duplicates
    /// are no longer caught.
    pub fn evictions(&self) -> u64 {
        self.evictions.load(Ordering::Relaxed)
    }

    /// The marks held now (expired ones not yet dropped included).
    fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|shard| lock(shard).marks.len())
            .sum()
    }

    /// Whether a live mark of `key` is held.
    #[cfg(test)]
    fn holds(&self, key: &str) -> bool {
        let now = Instant::now();
        self.shard(key)
            .marks
            .get(key)
            .is_some_and(|slot| slot.live(now))
    }

    fn shard(&self, key: &str) -> MutexGuard<'_, Shard> {
        let index = self.hasher.hash_one(key) as usize % self.shards.len();
        lock(&self.shards[index])
    }

    /// When a mark written now with `ttl` expires.
    fn expiry(now: Instant, ttl: Duration) -> Instant {
        // A TTL past what `Instant` can hold: a year is as good as never.
        now.checked_add(ttl)
            .unwrap_or_else(|| now + Duration::from_secs(86_400 * 365))
    }
}

/// A poisoned shard still holds consistent marks: every change to it is
/// one `HashMap` or `VecDeque` call.
fn lock(shard: &Mutex<Shard>) -> MutexGuard<'_, Shard> {
    shard.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Default for MemoryDedupeStore {
    fn default() -> Self {
        Self::new()
    }
}

#[async_trait]
impl DedupeStore for MemoryDedupeStore {
    async fn try_begin(&self, key: &str, token: &str, ttl: Duration) -> Result<Mark, Error> {
        let now = Instant::now();
        let mut shard = self.shard(key);
        if let Some(slot) = shard.marks.get(key).filter(|slot| slot.live(now)) {
            return Ok(if slot.token.is_some() {
                Mark::InProgress
            } else {
                Mark::Done
            });
        }
        shard.insert(key, token.into(), Self::expiry(now, ttl));
        shard.trim(now, self.per_shard, &self.evictions);
        Ok(Mark::Acquired)
    }

    async fn extend(&self, key: &str, token: &str, ttl: Duration) -> Result<bool, Error> {
        let now = Instant::now();
        let mut shard = self.shard(key);
        let Some(slot) = shard.marks.get(key).filter(|slot| slot.held_by(token, now)) else {
            return Ok(false);
        };
        let token = slot.token.clone();
        shard.rewrite(key, token, Self::expiry(now, ttl));
        shard.trim(now, self.per_shard, &self.evictions);
        Ok(true)
    }

    async fn complete(&self, key: &str, token: &str, ttl: Duration) -> Result<bool, Error> {
        let now = Instant::now();
        let mut shard = self.shard(key);
        if !shard
            .marks
            .get(key)
            .is_some_and(|slot| slot.held_by(token, now))
        {
            return Ok(false);
        }
        shard.rewrite(key, None, Self::expiry(now, ttl));
        shard.trim(now, self.per_shard, &self.evictions);
        Ok(true)
    }

    async fn release(&self, key: &str, token: &str) -> Result<bool, Error> {
        let now = Instant::now();
        let mut shard = self.shard(key);
        if !shard
            .marks
            .get(key)
            .is_some_and(|slot| slot.held_by(token, now))
        {
            return Ok(false);
        }
        // Its entries in `written` are skipped when they come up.
        shard.marks.remove(key);
        Ok(true)
    }
}

impl fmt::Debug for MemoryDedupeStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryDedupeStore")
            .field("marks", &self.len())
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
        let store = MemoryDedupeStore::new();
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
        let store = MemoryDedupeStore::new();
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
        // The store keeps std's clock, so this waits in real time, bounded.
        let store = MemoryDedupeStore::new();
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
    fn at_capacity_the_marks_written_longest_ago_make_room_and_are_counted() {
        use metrics_util::debugging::{DebugValue, DebuggingRecorder};

        const CAPACITY: u64 = 64;
        let recorder = DebuggingRecorder::new();
        let snapshotter = recorder.snapshotter();
        let store = MemoryDedupeStore::with_capacity(CAPACITY);
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
            });
        });

        let (older, recent) = keys.split_at(CAPACITY as usize);
        assert_eq!(store.len(), CAPACITY as usize);
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        runtime.block_on(async {
            for key in older {
                assert!(!store.holds(key), "{key} was kept");
            }
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
                        .any(|label| label.key() == "store" && label.value() == "memory")
            })
            .map(|(.., value)| value)
            .collect();
        assert_eq!(evicted, vec![DebugValue::Counter(CAPACITY)]);
    }

    #[tokio::test]
    async fn only_the_holder_extends_its_mark() {
        let store = MemoryDedupeStore::new();
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
        // The store keeps std's clock, so this waits in real time, briefly.
        let store = MemoryDedupeStore::new();
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
