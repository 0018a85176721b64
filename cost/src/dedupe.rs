//! `dedupe`: what the in-process dedupe store costs per first delivery
//! (mark in progress, then done) and per duplicate (a done mark found),
//! timed over many keys on a `current_thread` runtime; then the same two
//! through `DedupeLayer` around a handler that does nothing, which adds what
//! the layer does per delivery (the key, the fencing token, its future).
//!
//! ```text
//! switchboard-cost dedupe [--n N] [--held H] [--capacity C]
//! ```
//!
//! `N` keys are timed (default 200 000), after `H` marks of other keys were
//! written (default 0) into a store of capacity `C` (default the store's
//! own, 1 000 000). With `H` at least `C` the store is full before the
//! timing starts and every first delivery evicts the mark written longest
//! ago: the steady state of a busy consumer. Keys and tokens are shaped as
//! the layer makes them: `group:event-id` (a hyphenated UUID) and 32 hex
//! characters.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::FutureExt;

use switchboard::middleware::dedupe::{DedupeLayer, DedupeStore, MemoryDedupeStore};
use switchboard::{Error, Event, EventEnvelope, Message, handler_fn};
use tower::{Layer, Service, ServiceExt};
use uuid::Uuid;

const GROUP: &str = "ledger";
const TOKEN: &str = "5f0c3a9e21d84b7f9a6e0c1d2b3a4f58";

#[derive(Clone, serde::Serialize, serde::Deserialize)]
struct Tick;

impl Event for Tick {
    const TYPE: &'static str = "cost.tick";
    const VERSION: &'static str = "1.0";
}

pub async fn run(args: &[String]) {
    let n = flag(args, "--n").unwrap_or(200_000);
    let held = flag(args, "--held").unwrap_or(0);
    let capacity = flag(args, "--capacity").unwrap_or(MemoryDedupeStore::DEFAULT_CAPACITY);
    let ttl = Duration::from_secs(60);
    let store = MemoryDedupeStore::with_capacity(capacity);
    for i in 0..held {
        let key = key(event_id(u64::MAX - i));
        store.try_begin(&key, TOKEN, ttl).await.expect("begin");
        store.complete(&key, TOKEN, ttl).await.expect("complete");
    }

    let keys: Vec<String> = (0..n).map(|i| key(event_id(i))).collect();
    let first = timed(n, || store_first(&store, &keys, ttl));
    let duplicate = timed(n, || store_duplicate(&store, &keys, ttl));
    drop(keys);

    let messages: Vec<Message<Tick>> = (0..n)
        .map(|i| {
            let envelope = EventEnvelope::new("cost", Tick).with_event_id(event_id(n + i));
            Message::new(envelope, Tick::TYPE, GROUP, 1)
        })
        .collect();
    let mut layered = DedupeLayer::new(Arc::new(store.clone()))
        .layer(handler_fn(|_: Message<Tick>| async { Ok::<(), Error>(()) }));
    let layered_first = timed(n, || layer_first(&mut layered, &messages));
    let layered_duplicate = timed(n, || layer_duplicate(&mut layered, &messages));

    println!(
        "in-process dedupe store (capacity {capacity}, {held} marks held before), {n} keys: \
         first delivery (mark in progress, then done) {first:?}, duplicate (done mark found) \
         {duplicate:?}; through DedupeLayer: first delivery {layered_first:?}, duplicate \
         {layered_duplicate:?}; {} evictions",
        store.evictions()
    );
}

// Each timed phase is a function of its own, never inlined, so that
// callgrind can count one alone:
// `valgrind --tool=callgrind --toggle-collect='*dedupe::store_first' …`.
// Every future here is ready when first polled (the store never waits, the
// handler does nothing), so a phase polls each once, inside the runtime.

fn timed(n: u64, phase: impl FnOnce()) -> Duration {
    let started = Instant::now();
    phase();
    started.elapsed() / n as u32
}

fn now<F: Future>(future: F) -> F::Output {
    future.now_or_never().expect("ready at once")
}

#[inline(never)]
fn store_first(store: &MemoryDedupeStore, keys: &[String], ttl: Duration) {
    for key in keys {
        now(store.try_begin(key, TOKEN, ttl)).expect("begin");
        std::hint::black_box(now(store.complete(key, TOKEN, ttl)).expect("complete"));
    }
}

#[inline(never)]
fn store_duplicate(store: &MemoryDedupeStore, keys: &[String], ttl: Duration) {
    for key in keys {
        std::hint::black_box(now(store.try_begin(key, "t2", ttl)).expect("begin"));
    }
}

#[inline(never)]
fn layer_first<S>(layered: &mut S, messages: &[Message<Tick>])
where
    S: Service<Message<Tick>, Response = (), Error = Error>,
{
    for message in messages {
        let ready = now(layered.ready()).expect("ready");
        now(ready.call(message.clone())).expect("first");
    }
}

#[inline(never)]
fn layer_duplicate<S>(layered: &mut S, messages: &[Message<Tick>])
where
    S: Service<Message<Tick>, Response = (), Error = Error>,
{
    for message in messages {
        let ready = now(layered.ready()).expect("ready");
        now(ready.call(message.clone())).expect("duplicate");
    }
}

fn flag(args: &[String], name: &str) -> Option<u64> {
    let at = args.iter().position(|arg| arg == name)?;
    args.get(at + 1)?.parse().ok()
}

/// Distinct, scattered ids without a random source, so runs compare.
fn event_id(i: u64) -> Uuid {
    let mixed = (i as u128 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15_f39c_c060_5ced_c835);
    Uuid::from_u128(mixed)
}

fn key(event_id: Uuid) -> String {
    format!("{GROUP}:{event_id}")
}
