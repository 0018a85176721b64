//! What the resilience layers cost on the happy path: breaker + retry +
//! timeout over a no-op service beside the bare service, and a dedupe check
//! on the in-process store — all in one run, on a `current_thread` runtime (the
//! layers add no task hops, so the runtime flavour hardly matters here).
//!
//! `cargo bench --all-features --bench resilience`

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{Criterion, criterion_group, criterion_main};
use switchboard::Error;
use switchboard::config::ResilienceConfig;
use switchboard::middleware::Resilience;
use switchboard::middleware::dedupe::{DedupeStore, MemoryDedupeStore};
use tower::{Service, ServiceExt, service_fn};
use uuid::Uuid;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

fn noop() -> impl Service<u64, Response = u64, Error = Error, Future: Send> + Clone + Send + 'static
{
    service_fn(|n: u64| std::future::ready(Ok::<_, Error>(n)))
}

/// Times `iters` calls through `service`, one after another.
async fn calls<S>(mut service: S, iters: u64) -> Duration
where
    S: Service<u64, Response = u64>,
    S::Error: std::fmt::Debug,
{
    let started = Instant::now();
    for n in 0..iters {
        let answer = service.ready().await.unwrap().call(n).await.unwrap();
        black_box(answer);
    }
    started.elapsed()
}

fn stack_overhead(c: &mut Criterion) {
    let rt = runtime();
    let resilience = Resilience::new(ResilienceConfig::default());
    let mut group = c.benchmark_group("call");
    group.bench_function("bare no-op service", |b| {
        b.to_async(&rt).iter_custom(|iters| calls(noop(), iters));
    });
    group.bench_function("retry + circuit breaker + timeout + no-op", |b| {
        b.to_async(&rt)
            .iter_custom(|iters| calls(resilience.client("noop", noop()), iters));
    });
    group.finish();
}

/// A fencing token shaped as `DedupeLayer` makes them: 32 hex characters.
const TOKEN: &str = "5f0c3a9e21d84b7f9a6e0c1d2b3a4f58";

/// The `n`th key, shaped as `DedupeLayer` makes them (`group:event-id`),
/// written into `buf` without the formatting machinery, so the key costs
/// little beside the store.
fn key(buf: &mut [u8; 43], n: u64) -> &str {
    buf[..7].copy_from_slice(b"ledger:");
    let id = Uuid::from_u128(
        (u128::from(n) + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15_f39c_c060_5ced_c835),
    );
    id.hyphenated().encode_lower(&mut buf[7..]);
    std::str::from_utf8(buf).expect("ASCII")
}

fn dedupe_check(c: &mut Criterion) {
    let rt = runtime();
    let ttl = Duration::from_secs(60);
    let mut group = c.benchmark_group("dedupe (in process)");
    let store = Arc::new(MemoryDedupeStore::new());
    rt.block_on(async {
        store.try_begin("g:done", "t", ttl).await.unwrap();
        store.complete("g:done", "t", ttl).await.unwrap();
    });
    group.bench_function("check a duplicate (done mark)", |b| {
        b.to_async(&rt).iter(|| async {
            black_box(store.try_begin("g:done", "t2", ttl).await.unwrap());
        });
    });
    // A store filled to its capacity first, so every first delivery evicts
    // the mark written longest ago: a busy consumer's steady state, with as
    // many marks held as the store takes.
    for held in [20_000, MemoryDedupeStore::DEFAULT_CAPACITY] {
        let store = Arc::new(MemoryDedupeStore::with_capacity(held));
        let mut buf = [0; 43];
        rt.block_on(async {
            for n in 0..held {
                store.try_begin(key(&mut buf, n), TOKEN, ttl).await.unwrap();
                store.complete(key(&mut buf, n), TOKEN, ttl).await.unwrap();
            }
        });
        let mut next = held;
        group.bench_function(
            format!("first delivery: mark in progress, then done; {held} marks held"),
            |b| {
                b.to_async(&rt).iter_custom(|iters| {
                    let (store, from) = (store.clone(), next);
                    next += iters;
                    async move {
                        let mut buf = [0; 43];
                        let started = Instant::now();
                        for n in from..from + iters {
                            let key = key(&mut buf, n);
                            store.try_begin(key, TOKEN, ttl).await.unwrap();
                            black_box(store.complete(key, TOKEN, ttl).await.unwrap());
                        }
                        started.elapsed()
                    }
                });
            },
        );
        // The most recent half of the marks: all still held, and each check
        // a different one, as duplicates come.
        let recent = held / 2;
        group.bench_function(
            format!("check a duplicate (done mark); {held} marks held"),
            |b| {
                b.to_async(&rt).iter_custom(|iters| {
                    let (store, last) = (store.clone(), next - 1);
                    async move {
                        let mut buf = [0; 43];
                        let started = Instant::now();
                        for i in 0..iters {
                            let key = key(&mut buf, last - i % recent);
                            black_box(store.try_begin(key, "t2", ttl).await.unwrap());
                        }
                        started.elapsed()
                    }
                });
            },
        );
    }
    group.finish();
}

criterion_group!(benches, stack_overhead, dedupe_check);
criterion_main!(benches);
