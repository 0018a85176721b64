//! The in-process store's own tests: fencing, expiry, eviction order and
//! its count, and the layout (inline and heap text, shared hashes).

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

/// Drives a store whose futures are ready at once, outside any runtime.
fn now<F: std::future::Future>(future: F) -> F::Output {
    futures_util::FutureExt::now_or_never(future).expect("the store never waits")
}

fn begin(store: &MemoryDedupeStore, key: &str, token: &str) -> Mark {
    now(store.try_begin(key, token, MINUTE)).unwrap()
}

fn complete(store: &MemoryDedupeStore, key: &str, token: &str) -> bool {
    now(store.complete(key, token, MINUTE)).unwrap()
}

#[test]
fn a_mark_written_again_moves_behind_the_others_in_the_eviction_order() {
    // Small enough for one shard: the order is exact.
    let store = MemoryDedupeStore::with_capacity(3);
    for key in ["a", "b", "c"] {
        assert_eq!(begin(&store, key, "t"), Mark::Acquired);
    }
    // `a` is written again (done) after `b` and `c` were taken…
    assert!(complete(&store, "a", "t"));
    // …so `b` is now the mark written longest ago.
    assert_eq!(begin(&store, "d", "t"), Mark::Acquired);
    assert!(!store.holds("b"), "b was kept");
    assert!(store.holds("a") && store.holds("c") && store.holds("d"));
    // Extending rewrites too: `c` moves behind `a` and `d`.
    assert!(now(store.extend("c", "t", MINUTE)).unwrap());
    assert_eq!(begin(&store, "e", "t"), Mark::Acquired);
    assert!(!store.holds("a"), "a was kept");
    assert_eq!(begin(&store, "f", "t"), Mark::Acquired);
    assert!(!store.holds("d"), "d was kept");
    assert!(store.holds("c") && store.holds("e") && store.holds("f"));
    assert_eq!(store.evictions(), 3);
    assert_eq!(store.len(), 3);
}

#[test]
fn a_mark_done_right_after_it_was_taken_keeps_its_place() {
    // Taken then done with no write between: one entry in the write order,
    // rewritten; the order is the same as with two.
    let store = MemoryDedupeStore::with_capacity(2);
    for key in ["a", "b"] {
        assert_eq!(begin(&store, key, "t"), Mark::Acquired);
        assert!(complete(&store, key, "t"));
    }
    assert_eq!(begin(&store, "c", "t"), Mark::Acquired);
    assert!(!store.holds("a") && store.holds("b") && store.holds("c"));
    assert_eq!(
        begin(&store, "b", "u"),
        Mark::Done,
        "b's done mark was lost"
    );
    assert_eq!(store.evictions(), 1);
    assert_eq!(store.lock_written_len(), 2, "a's entry left behind");
}

#[test]
fn expired_marks_are_taken_over_dropped_as_others_are_written_and_not_counted() {
    let store = MemoryDedupeStore::with_capacity(4);
    // A zero TTL has run out when it is written: no waiting needed.
    for key in ["a", "b", "c"] {
        assert_eq!(
            now(store.try_begin(key, "old", Duration::ZERO)).unwrap(),
            Mark::Acquired
        );
    }
    assert_eq!(begin(&store, "a", "new"), Mark::Acquired, "not taken over");
    assert!(
        !complete(&store, "a", "old"),
        "the expired holder completed"
    );
    // Writing `d` dropped the expired `b` and `c`, which are not evictions.
    assert_eq!(begin(&store, "d", "t"), Mark::Acquired);
    assert_eq!(store.len(), 2);
    assert_eq!(store.evictions(), 0);
    assert!(complete(&store, "a", "new"));
    assert_eq!(begin(&store, "a", "x"), Mark::Done);
}

#[test]
fn a_ttl_past_the_clock_never_expires() {
    let store = MemoryDedupeStore::new();
    assert_eq!(
        now(store.try_begin("k", "t", Duration::MAX)).unwrap(),
        Mark::Acquired
    );
    assert!(now(store.complete("k", "t", Duration::MAX)).unwrap());
    assert_eq!(begin(&store, "k", "u"), Mark::Done);
}

#[test]
fn clones_share_the_marks() {
    let store = MemoryDedupeStore::new();
    let clone = store.clone();
    assert_eq!(begin(&store, "k", "t"), Mark::Acquired);
    assert_eq!(begin(&clone, "k", "u"), Mark::InProgress);
    assert!(complete(&clone, "k", "t"));
    assert_eq!(begin(&store, "k", "u"), Mark::Done);
}

#[test]
fn tokens_are_compared_exactly_inline_and_on_the_heap() {
    let store = MemoryDedupeStore::new();
    let long_key = format!("group:{}", "k".repeat(200));
    let long_token = "t".repeat(100);
    for (key, token) in [
        ("g:1", "5f0c3a9e21d84b7f9a6e0c1d2b3a4f58"),
        (&*long_key, &*long_token),
    ] {
        assert_eq!(begin(&store, key, token), Mark::Acquired);
        let mut other = token.to_owned();
        other.pop();
        assert!(!complete(&store, key, &other), "a prefix of the token");
        assert!(
            !complete(&store, key, &format!("{token}x")),
            "a longer token"
        );
        assert!(!complete(&store, key, &other.clone().to_uppercase()));
        assert!(complete(&store, key, token));
        assert_eq!(begin(&store, key, token), Mark::Done);
    }
    // Key and token lie end to end: where one ends still tells them apart.
    assert_eq!(begin(&store, "ka", "b"), Mark::Acquired);
    assert_eq!(begin(&store, "k", "ab"), Mark::Acquired);
    assert!(!now(store.release("k", "b")).unwrap());
    assert!(now(store.release("ka", "b")).unwrap());
    assert_eq!(begin(&store, "k", "x"), Mark::InProgress);
}

#[test]
fn keys_sharing_a_hash_are_told_apart_by_their_text() {
    // Shard level, where the hash is given: every key here collides.
    let evictions = Arc::new(Evictions::default());
    let mut shard = Shard::new(2, evictions.clone());
    let key = |text| Key { text, hash: 42 };
    let later = 1_000;
    assert_eq!(shard.begin(key("a"), "t", later, 0), Mark::Acquired);
    assert_eq!(shard.begin(key("b"), "t", later, 0), Mark::Acquired);
    assert_eq!(shard.begin(key("a"), "u", later, 0), Mark::InProgress);
    assert!(shard.rewrite(key("b"), "t", false, later, 0));
    assert_eq!(shard.begin(key("b"), "u", later, 0), Mark::Done);
    assert_eq!(shard.begin(key("a"), "u", later, 0), Mark::InProgress);
    // `c` evicts `a`, the one written longest ago, found by its stamp.
    assert_eq!(shard.begin(key("c"), "t", later, 0), Mark::Acquired);
    assert_eq!(evictions.total.load(Ordering::Relaxed), 1);
    assert!(shard.find_mut(key("a")).is_none());
    assert_eq!(shard.begin(key("b"), "u", later, 0), Mark::Done);
    assert!(shard.release(key("c"), "t", 0));
    assert!(!shard.release(key("b"), "t", 0), "a done mark released");
    assert_eq!(shard.marks.len(), 1);
}

#[test]
fn a_mark_is_two_cache_lines() {
    assert_eq!(std::mem::size_of::<Slot>(), 128);
}
