//! SPEC §3's paths end to end on loopback, each beside the raw client in the
//! same run: Gateway → Service and Game → Market (HTTP, `JsonService` behind
//! the resilience client stack vs reqwest → axum), Trading → Market (gRPC,
//! `grpc::unary` behind the stack vs tonic), Trading → Game (Redis Streams,
//! `EventBus` publish → handler vs XADD → XREADGROUP → XACK), the RabbitMQ
//! task path (persistent, confirmed, acked; `EventBus` vs lapin) and the
//! Redis Pub/Sub broadcast (`EventBus` vs redis-rs). Raw and switchboard
//! alternate (raw, switchboard, raw, switchboard) so drift in the shared
//! machine hits both. The paths are set up in `benches/common/mod.rs`, the
//! same closures `p99_paths` measures. Envelope encode/decode is
//! `benches/envelope.rs`; batch publish is `redis_streams.rs` and `amqp.rs`.
//!
//! `cargo bench --bench paths` (Redis and RabbitMQ on 127.0.0.1; a
//! current-thread runtime, as the other benches)

mod common;

use std::sync::atomic::{AtomicU64, Ordering};

use common::Side;
use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};

fn paths(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let paths = runtime.block_on(common::all());
    let sequence = AtomicU64::new(0);
    for path in &paths {
        let mut group = c.benchmark_group(path.name);
        for round in 1..=2 {
            for (side, name) in [(Side::Raw, "raw"), (Side::Switchboard, "switchboard")] {
                let call = path.call(side);
                group.bench_function(BenchmarkId::new(name, round), |b| {
                    b.to_async(&runtime)
                        .iter(|| call(sequence.fetch_add(1, Ordering::Relaxed)))
                });
            }
        }
        group.finish();
    }
    runtime.block_on(async move { drop(paths) });
}

criterion_group!(benches, paths);
criterion_main!(benches);
