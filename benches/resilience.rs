//! What the resilience layers cost on the happy path: breaker + retry +
//! timeout over a no-op service beside the bare service, and a dedupe check
//! on the in-process store — all in one run, on a `current_thread` runtime (the
//! layers add no task hops, so the runtime flavour hardly matters here).
//!
//! `cargo bench --bench resilience`

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{Criterion, criterion_group, criterion_main};
use switchboard::Error;
use switchboard::config::ResilienceConfig;
use switchboard::middleware::Resilience;
use switchboard::middleware::dedupe::{DedupeStore, MemoryDedupeStore};
use tower::{Service, ServiceExt, service_fn};

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

fn dedupe_check(c: &mut Criterion) {
    let rt = runtime();
    let store = Arc::new(MemoryDedupeStore::new());
    let ttl = Duration::from_secs(60);
    rt.block_on(async {
        store.try_begin("g:done", "t", ttl).await.unwrap();
        store.complete("g:done", "t", ttl).await.unwrap();
    });
    let mut group = c.benchmark_group("dedupe (in process)");
    group.bench_function("check a duplicate (done mark)", |b| {
        b.to_async(&rt).iter(|| async {
            black_box(store.try_begin("g:done", "t2", ttl).await.unwrap());
        });
    });
    let mut next = 0u64;
    group.bench_function("first delivery: mark in progress, then done", |b| {
        b.to_async(&rt).iter(|| {
            next += 1;
            let key = format!("g:{next}");
            let store = store.clone();
            async move {
                store.try_begin(&key, "t", ttl).await.unwrap();
                black_box(store.complete(&key, "t", ttl).await.unwrap());
            }
        });
    });
    group.finish();
}

criterion_group!(benches, stack_overhead, dedupe_check);
criterion_main!(benches);
