//! The relay publishes the stored envelope as it is: its id and headers,
//! and so the trace context of the request that enqueued it, reach the
//! consumer (with feature `otel` the consumer's span continues that trace).

use std::sync::Arc;
use std::time::Duration;

use switchboard::outbox::{Outbox, Relay, RelayConfig};
use switchboard::{
    EventBus, EventEnvelope, Headers, MemoryTransport, Message, SubscribeOptions, Topology,
    Transport, handler_fn,
};
use tokio::sync::mpsc;

use super::support::{self, Step, WITHIN, step};

const PARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

#[tokio::test]
async fn the_stored_envelope_reaches_the_consumer_unchanged() {
    let pool = support::sqlite().await;
    let outbox = Outbox::new("", "orders").unwrap();
    outbox.migrate(&pool).await.unwrap();
    let memory: Arc<dyn Transport> = Arc::new(MemoryTransport::new());
    let bus = EventBus::new(memory.clone(), "test");
    bus.declare(&Topology::new().with_event::<Step, _>(["seen"]))
        .await
        .unwrap();
    let (seen, mut rx) = mpsc::unbounded_channel();
    let consumer = bus
        .subscribe(
            SubscribeOptions::new("seen"),
            handler_fn(move |message: Message<Step>| {
                seen.send(message.envelope().clone()).ok();
                async { Ok(()) }
            }),
        )
        .await
        .unwrap();
    let envelope = EventEnvelope::new("orders", step("k", 1))
        .with_header("traceparent", PARENT)
        .with_header("correlation-id", "req-7");
    let mut tx = pool.begin().await.unwrap();
    outbox
        .enqueue(&mut tx, "outbox.step", &envelope)
        .await
        .unwrap();
    tx.commit().await.unwrap();
    let relay = Relay::new(&outbox, pool.clone(), memory)
        .with_config(RelayConfig::default().with_poll_interval(Duration::from_millis(10)))
        .spawn();
    let got: EventEnvelope<Step> = tokio::time::timeout(WITHIN, rx.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(got, envelope, "id, time, source, headers and payload kept");
    let headers: &Headers = got.headers();
    assert_eq!(headers["traceparent"], PARENT);
    relay.close(Duration::from_secs(5)).await.unwrap();
    consumer.shutdown().await.unwrap();
}

#[cfg(feature = "otel")]
mod otel {
    use std::sync::{Arc, OnceLock};
    use std::time::Duration;

    use opentelemetry::trace::{TraceContextExt, TraceId, TracerProvider as _};
    use opentelemetry_sdk::trace::SdkTracerProvider;
    use switchboard::observe::trace::TRACEPARENT;
    use switchboard::outbox::{Outbox, Relay, RelayConfig};
    use switchboard::{
        EventBus, MemoryTransport, Message, SubscribeOptions, Topology, Transport, handler_fn,
    };
    use tokio::sync::mpsc;
    use tracing::Instrument;
    use tracing_opentelemetry::OpenTelemetrySpanExt;
    use tracing_subscriber::layer::SubscriberExt;

    use super::super::support::{self, Step, WITHIN, step};

    /// The binary's global subscriber with an OpenTelemetry layer (a scoped
    /// one could lose a callsite's interest to another test's thread).
    fn install() {
        static PROVIDER: OnceLock<SdkTracerProvider> = OnceLock::new();
        PROVIDER.get_or_init(|| {
            let provider = SdkTracerProvider::builder().build();
            let subscriber = tracing_subscriber::registry()
                .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("outbox-test")));
            tracing::subscriber::set_global_default(subscriber)
                .expect("the only global subscriber");
            provider
        });
    }

    fn trace_of(span: &tracing::Span) -> TraceId {
        span.context().span().span_context().trace_id()
    }

    #[tokio::test]
    async fn the_consumer_continues_the_trace_of_the_request_that_enqueued() {
        install();
        let pool = support::pg().await;
        let prefix = support::prefix();
        let outbox = Outbox::new(&prefix, "orders").unwrap();
        outbox.migrate(&pool).await.unwrap();
        let memory: Arc<dyn Transport> = Arc::new(MemoryTransport::new());
        let bus = EventBus::new(memory.clone(), "test");
        bus.declare(&Topology::new().with_event::<Step, _>(["seen"]))
            .await
            .unwrap();
        let (seen, mut rx) = mpsc::unbounded_channel();
        let consumer = bus
            .subscribe(
                SubscribeOptions::new("seen"),
                handler_fn(move |message: Message<Step>| {
                    let trace = trace_of(&tracing::Span::current());
                    let parent = message.envelope().headers().get(TRACEPARENT).cloned();
                    seen.send((parent, trace)).ok();
                    async { Ok(()) }
                }),
            )
            .await
            .unwrap();

        let request = tracing::info_span!("place_order");
        let request_trace = trace_of(&request);
        assert_ne!(request_trace, TraceId::INVALID);
        async {
            let mut tx = pool.begin().await.unwrap();
            outbox.enqueue_event(&mut tx, step("k", 1)).await.unwrap();
            tx.commit().await.unwrap();
        }
        .instrument(request)
        .await;

        // The relay runs outside the request, in its own task.
        let relay = Relay::new(&outbox, pool.clone(), memory)
            .with_config(RelayConfig::default().with_poll_interval(Duration::from_millis(10)))
            .spawn();
        let (parent, handler_trace) = tokio::time::timeout(WITHIN, rx.recv())
            .await
            .unwrap()
            .unwrap();
        let parent = parent.expect("a traceparent was stored with the row");
        assert!(parent.contains(&request_trace.to_string()), "{parent}");
        assert_eq!(handler_trace, request_trace, "one trace end to end");
        relay.close(Duration::from_secs(5)).await.unwrap();
        consumer.shutdown().await.unwrap();
        support::drop_pg_tables(&pool, &prefix).await;
    }
}
