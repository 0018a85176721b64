//! Envelope encode and decode: switchboard's checked codec beside plain
//! serde_json on the same document, interleaved in one run.
//!
//! `cargo bench --bench envelope`

use std::hint::black_box;

#[path = "../tests/common/mod.rs"]
mod common;

use common::{TradeExecuted, spec_trade};
use criterion::{Criterion, criterion_group, criterion_main};
use serde::{Deserialize, Serialize};
use switchboard::{Codec, EventEnvelope};

/// The same document as a plain serde struct: what a service would write
/// without switchboard.
#[derive(Serialize, Deserialize)]
struct RawEnvelope {
    event_id: uuid::Uuid,
    event_type: String,
    timestamp: chrono::DateTime<chrono::Utc>,
    source: String,
    version: String,
    payload: TradeExecuted,
}

fn envelope(c: &mut Criterion) {
    let codec = Codec::default();
    let envelope = EventEnvelope::new("trading-service", spec_trade());
    let bytes = codec.encode(&envelope).expect("encode");
    let raw: RawEnvelope = serde_json::from_slice(&bytes).expect("raw decode");

    let mut group = c.benchmark_group("envelope_round_trip");
    group.bench_function("raw_serde_json", |b| {
        b.iter(|| {
            let bytes = serde_json::to_vec(black_box(&raw)).expect("encode");
            black_box(serde_json::from_slice::<RawEnvelope>(&bytes).expect("decode"))
        })
    });
    group.bench_function("switchboard", |b| {
        b.iter(|| {
            let bytes = codec.encode(black_box(&envelope)).expect("encode");
            black_box(codec.decode::<TradeExecuted>(&bytes).expect("decode"))
        })
    });
    group.finish();
}

criterion_group!(benches, envelope);
criterion_main!(benches);
