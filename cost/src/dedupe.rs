//! `dedupe`: what the in-process dedupe store costs per first delivery
//! (mark in progress, then done) and per duplicate (a done mark found),
//! timed over many keys on a `current_thread` runtime.

use std::time::{Duration, Instant};

use switchboard::middleware::dedupe::{DedupeStore, MemoryDedupeStore};

pub async fn run(args: &[String]) {
    let n: u64 = args
        .iter()
        .position(|arg| arg == "--n")
        .and_then(|at| args.get(at + 1)?.parse().ok())
        .unwrap_or(200_000);
    let ttl = Duration::from_secs(60);
    let store = MemoryDedupeStore::new();
    let keys: Vec<String> = (0..n).map(|i| format!("g:{i}")).collect();
    let started = Instant::now();
    for key in &keys {
        store.try_begin(key, "t", ttl).await.expect("begin");
        std::hint::black_box(store.complete(key, "t", ttl).await.expect("complete"));
    }
    let first = started.elapsed() / n as u32;
    let started = Instant::now();
    for key in &keys {
        std::hint::black_box(store.try_begin(key, "t2", ttl).await.expect("begin"));
    }
    let duplicate = started.elapsed() / n as u32;
    println!(
        "in-process dedupe store, {n} keys: first delivery (mark in progress, then done) {first:?}, duplicate (done mark found) {duplicate:?}"
    );
}
