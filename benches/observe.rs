//! What observability costs on the hot path: one event published and
//! consumed on the in-memory bus (current-thread runtime), with no metrics
//! recorder, with a Prometheus recorder, and — with feature `otel` — with an
//! OpenTelemetry layer whose spans are sampled and trace context is written
//! into every envelope.
//!
//! ```text
//! cargo bench --bench observe                      # no recorder / Prometheus
//! cargo bench --bench observe --features otel      # also the OpenTelemetry cases
//! ```

use std::hint::black_box;
use std::sync::Arc;

#[path = "../tests/common/mod.rs"]
mod common;

use common::{TradeExecuted, spec_trade};
use criterion::{Criterion, criterion_group, criterion_main};
use metrics_exporter_prometheus::PrometheusBuilder;
use switchboard::{EventBus, MemoryTransport, Message, SubscribeOptions, handler_fn};
use tokio::runtime::Runtime;
use tokio::sync::mpsc;

/// A bus with a consumer that reports each event on a channel.
fn bus(
    runtime: &Runtime,
) -> (
    EventBus,
    mpsc::UnboundedReceiver<()>,
    switchboard::ConsumerHandle,
) {
    runtime.block_on(async {
        let bus = EventBus::new(Arc::new(MemoryTransport::new()), "trading-service");
        let (done, handled) = mpsc::unbounded_channel();
        let consumer = bus
            .subscribe(
                SubscribeOptions::new("game"),
                handler_fn(move |_: Message<TradeExecuted>| {
                    let done = done.clone();
                    async move {
                        done.send(()).ok();
                        Ok::<_, switchboard::Error>(())
                    }
                }),
            )
            .await
            .expect("subscribe");
        (bus, handled, consumer)
    })
}

fn round_trip(c: &mut Criterion, runtime: &Runtime, name: &str) {
    let (bus, handled, consumer) = bus(runtime);
    let handled = tokio::sync::Mutex::new(handled); // one iteration at a time
    c.benchmark_group("observe_publish_consume_memory")
        .bench_function(name, |b| {
            b.to_async(runtime).iter_custom(|iterations| {
                let (bus, handled) = (&bus, &handled);
                async move {
                    let mut handled = handled.lock().await;
                    let started = std::time::Instant::now();
                    for _ in 0..iterations {
                        black_box(bus.publish(spec_trade()).await.expect("publish"));
                        handled.recv().await.expect("handled");
                    }
                    started.elapsed()
                }
            })
        });
    runtime.block_on(consumer.shutdown()).expect("shutdown");
}

fn observe(c: &mut Criterion) {
    // Criterion runs async iterations on this thread: the thread-local
    // recorder and subscriber below apply to the bus and its consumer.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");

    round_trip(c, &runtime, "no_recorder");

    let prometheus = PrometheusBuilder::new().build_recorder();
    {
        let _recorder = metrics::set_default_local_recorder(&prometheus);
        round_trip(c, &runtime, "prometheus_recorder");
    }

    #[cfg(feature = "otel")]
    {
        use opentelemetry::trace::TracerProvider as _;
        use tracing_subscriber::layer::SubscriberExt;

        // Every span sampled and exported to nowhere: the cost of building
        // OpenTelemetry spans and carrying trace context, not of shipping them.
        let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder().build();
        let subscriber = tracing_subscriber::registry()
            .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("bench")));
        let _tracing = tracing::subscriber::set_default(subscriber);
        round_trip(c, &runtime, "otel_layer");
        let _recorder = metrics::set_default_local_recorder(&prometheus);
        round_trip(c, &runtime, "otel_layer_and_prometheus");
    }
}

criterion_group!(benches, observe);
criterion_main!(benches);
