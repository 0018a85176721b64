//! The in-process dedupe store: sharded hash maps of marks, each mark with
//! its own expiry, the oldest written evicted first when full.
//!
//! It was a moka cache (`MokaDedupeStore`); a first delivery (two writes)
//! cost 8–16 µs there, most of it in the cache's concurrent-map and
//! housekeeping machinery (epoch-based reclamation, a waiter map per
//! `and_compute_with`, rehashing). A mutex per shard around a plain
//! `HashMap` does the same checks in a fraction of that.

use std::collections::VecDeque;
use std::fmt;
use std::hash::{BuildHasher, RandomState};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use hashbrown::HashTable;

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
    hasher: RandomState,
    /// What expiry times count from (they are nanoseconds since).
    epoch: Instant,
    /// Marks evicted for room before their TTL ran out; shared by clones.
    evictions: Arc<Evictions>,
}

/// Marks evicted for room before their TTL ran out.
#[derive(Default)]
struct Evictions {
    total: AtomicU64,
    /// The metric, looked up in the recorder at the first eviction and kept:
    /// a full store evicts on every new mark.
    metric: OnceLock<metrics::Counter>,
}

impl Evictions {
    fn count(&self) {
        self.total.fetch_add(1, Ordering::Relaxed);
        self.metric
            .get_or_init(|| crate::observe::metrics::dedupe_evictions("memory"))
            .increment(1);
    }
}

/// One shard: the marks, and the order they were written in.
struct Shard {
    /// Each mark under its key's hash, which was computed once per call and
    /// also chose the shard.
    marks: HashTable<Slot>,
    /// Every write, oldest first, with the stamp it gave its mark and when
    /// that write expires; an entry whose mark was written again since
    /// (another stamp) or removed is skipped when it comes up.
    written: VecDeque<Written>,
    next_stamp: u64,
    /// The marks it holds at most.
    capacity: usize,
    /// The store's count of evictions.
    evictions: Arc<Evictions>,
}

/// A write, as `written` remembers it: the hash and the stamp find its mark
/// again without the key (stamps are unique in a shard).
struct Written {
    hash: u64,
    stamp: u64,
    expires: u64,
}

/// A mark: 128 bytes, key and token included, so a lookup reads one place.
struct Slot {
    hash: u64,
    /// The write that made the mark what it is; see `Written`.
    stamp: u64,
    /// Nanoseconds after the store's epoch.
    expires: u64,
    /// The key is `text[..key_len]`; the holder's fencing token the rest,
    /// while in progress.
    key_len: usize,
    /// In progress (held under the token); `false` once done.
    held: bool,
    text: Text,
}

/// A mark's key and its holder's token end to end: inline when they are as
/// short as the layer's (a group and an event id, 32 hex characters), so a
/// new mark allocates nothing and a lookup finds the key beside its mark.
enum Text {
    Inline { len: u8, bytes: [u8; INLINE] },
    Heap(Box<[u8]>),
}

/// The inline room, which makes a `Slot` 128 bytes, two cache lines.
const INLINE: usize = 86;

impl Text {
    fn new(key: &str, token: &str) -> Self {
        let len = key.len() + token.len();
        if len > INLINE {
            return Self::Heap([key.as_bytes(), token.as_bytes()].concat().into());
        }
        let mut bytes = [0; INLINE];
        bytes[..key.len()].copy_from_slice(key.as_bytes());
        bytes[key.len()..len].copy_from_slice(token.as_bytes());
        Self::Inline {
            len: len as u8,
            bytes,
        }
    }

    fn bytes(&self) -> &[u8] {
        match self {
            Self::Inline { len, bytes } => &bytes[..usize::from(*len)],
            Self::Heap(bytes) => bytes,
        }
    }
}

impl Slot {
    fn key(&self) -> &[u8] {
        &self.text.bytes()[..self.key_len]
    }

    fn live(&self, now: u64) -> bool {
        self.expires > now
    }

    /// Whether `token` holds this mark in progress: compared exactly.
    fn held_by(&self, token: &str, now: u64) -> bool {
        self.held && self.live(now) && &self.text.bytes()[self.key_len..] == token.as_bytes()
    }

    fn mark(&self) -> Mark {
        if self.held {
            Mark::InProgress
        } else {
            Mark::Done
        }
    }
}

/// Marks per shard below which a store has a single shard (so a small
/// store evicts in exactly the order marks were written).
const MARKS_PER_SHARD: u64 = 4096;
/// Shards of a large store: enough that consumers on many threads seldom
/// wait for each other.
const MOST_SHARDS: u64 = 16;

/// A key and its hash, computed once per call: it chooses the shard and the
/// bucket.
#[derive(Clone, Copy)]
struct Key<'a> {
    text: &'a str,
    hash: u64,
}

impl Shard {
    fn new(capacity: usize, evictions: Arc<Evictions>) -> Self {
        Self {
            marks: HashTable::new(),
            written: VecDeque::new(),
            next_stamp: 0,
            capacity,
            evictions,
        }
    }

    fn find_mut(&mut self, key: Key<'_>) -> Option<&mut Slot> {
        self.marks
            .find_mut(key.hash, |slot| slot.key() == key.text.as_bytes())
    }

    /// Marks `key` in progress under `token` unless a live mark exists,
    /// whose state is returned. A new mark makes room for itself first, so
    /// the table never holds more than the capacity.
    fn begin(&mut self, key: Key<'_>, token: &str, expires: u64, now: u64) -> Mark {
        let stamp = self.next_stamp + 1;
        let slot = || Slot {
            hash: key.hash,
            stamp,
            expires,
            key_len: key.text.len(),
            held: true,
            text: Text::new(key.text, token),
        };
        match self.find_mut(key) {
            Some(found) if found.live(now) => return found.mark(),
            // An expired mark of the key, taken over: its `written` entries
            // have another stamp now, and are skipped.
            Some(expired) => *expired = slot(),
            None => {
                self.trim(now, self.capacity - 1);
                self.marks.insert_unique(key.hash, slot(), |slot| slot.hash);
            }
        }
        self.next_stamp = stamp;
        self.written.push_back(Written {
            hash: key.hash,
            stamp,
            expires,
        });
        self.trim(now, self.capacity);
        Mark::Acquired
    }

    /// Writes `token`'s mark of `key` again with a new expiry, in progress
    /// while `held`, else done; `false`, changing nothing, unless `token`
    /// holds it.
    fn rewrite(&mut self, key: Key<'_>, token: &str, held: bool, expires: u64, now: u64) -> bool {
        let Some(slot) = self
            .marks
            .find_mut(key.hash, |slot| slot.key() == key.text.as_bytes())
        else {
            return false;
        };
        if !slot.held_by(token, now) {
            return false;
        }
        slot.held = held;
        slot.expires = expires;
        // The last write in this shard was this mark's (as when it is done
        // right after it was taken): that entry is rewritten rather than a
        // second one queued, the mark's place in the order being the same.
        if let Some(last) = self
            .written
            .back_mut()
            .filter(|last| last.stamp == slot.stamp)
        {
            last.expires = expires;
        } else {
            self.next_stamp += 1;
            slot.stamp = self.next_stamp;
            self.written.push_back(Written {
                hash: key.hash,
                stamp: slot.stamp,
                expires,
            });
        }
        self.trim(now, self.capacity);
        true
    }

    /// Drops writes expired by now (their marks with them, unless written
    /// again since), then, while more than `capacity` marks are held, the
    /// marks written longest ago (counted as evictions).
    fn trim(&mut self, now: u64, capacity: usize) {
        while let Some(oldest) = self.written.front() {
            let expired = oldest.expires <= now;
            if !expired && self.marks.len() <= capacity {
                break;
            }
            let (hash, stamp) = (oldest.hash, oldest.stamp);
            // The stamp alone tells the mark: no key to compare.
            if let Ok(current) = self.marks.find_entry(hash, |slot| slot.stamp == stamp) {
                current.remove();
                if !expired {
                    self.evictions.count();
                }
            }
            self.written.pop_front();
        }
    }

    /// Removes `token`'s in-progress mark of `key`; `false` unless `token`
    /// holds it. Its entries in `written` are skipped when they come up.
    fn release(&mut self, key: Key<'_>, token: &str, now: u64) -> bool {
        let found = self
            .marks
            .find_entry(key.hash, |slot| slot.key() == key.text.as_bytes());
        match found {
            Ok(found) if found.get().held_by(token, now) => {
                found.remove();
                true
            }
            _ => false,
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
        let per_shard = capacity.div_ceil(shards) as usize;
        let evictions = Arc::new(Evictions::default());
        Self {
            shards: (0..shards)
                .map(|_| Mutex::new(Shard::new(per_shard, evictions.clone())))
                .collect(),
            hasher: RandomState::new(),
            epoch: Instant::now(),
            evictions,
        }
    }

    /// How many marks this store (and its clones) evicted to make room
    /// before their TTL ran out. Each of them is an event whose duplicates
    /// are no longer caught.
    pub fn evictions(&self) -> u64 {
        self.evictions.total.load(Ordering::Relaxed)
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
        let (key, mut shard) = self.shard(key);
        let now = self.now();
        shard.find_mut(key).is_some_and(|slot| slot.live(now))
    }

    /// The entries of the write order, over every shard.
    #[cfg(test)]
    fn lock_written_len(&self) -> usize {
        self.shards
            .iter()
            .map(|shard| lock(shard).written.len())
            .sum()
    }

    /// `key` with its hash, and its shard, locked. The shard takes bits of
    /// the hash that the shard's table leaves alone (it takes the lowest for
    /// the bucket and the highest seven as a tag), so each shard's keys
    /// still spread over all of its buckets.
    fn shard<'k>(&self, key: &'k str) -> (Key<'k>, MutexGuard<'_, Shard>) {
        let hash = self.hasher.hash_one(key);
        let index = (hash >> 32) as usize % self.shards.len();
        (Key { text: key, hash }, lock(&self.shards[index]))
    }

    /// Now, in nanoseconds after the epoch.
    fn now(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    /// When a mark written at `now` with `ttl` expires: a TTL past what
    /// the clock holds (584 years) is never.
    fn expiry(now: u64, ttl: Duration) -> u64 {
        now.saturating_add(u64::try_from(ttl.as_nanos()).unwrap_or(u64::MAX))
    }
}

/// A poisoned shard still holds consistent marks: every change to it is
/// one table or `VecDeque` call, or a store of plain fields.
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
        let (key, mut shard) = self.shard(key);
        let now = self.now();
        Ok(shard.begin(key, token, Self::expiry(now, ttl), now))
    }

    async fn extend(&self, key: &str, token: &str, ttl: Duration) -> Result<bool, Error> {
        let (key, mut shard) = self.shard(key);
        let now = self.now();
        Ok(shard.rewrite(key, token, true, Self::expiry(now, ttl), now))
    }

    async fn complete(&self, key: &str, token: &str, ttl: Duration) -> Result<bool, Error> {
        let (key, mut shard) = self.shard(key);
        let now = self.now();
        Ok(shard.rewrite(key, token, false, Self::expiry(now, ttl), now))
    }

    async fn release(&self, key: &str, token: &str) -> Result<bool, Error> {
        let (key, mut shard) = self.shard(key);
        let now = self.now();
        Ok(shard.release(key, token, now))
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
mod tests;
