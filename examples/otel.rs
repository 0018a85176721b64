//! OpenTelemetry set-up: one trace id from an HTTP request through a
//! published event to the consumer's handler, on the in-memory bus and
//! offline (spans go to an in-memory exporter and are printed at the end):
//!
//! ```text
//! cargo run --features otel --example otel
//! ```
//!
//! Versions this is written against (they must agree with each other:
//! `tracing-opentelemetry` 0.34 is built for `opentelemetry` 0.33):
//!
//! ```toml
//! switchboard = { version = "0.1", features = ["otel"] }
//! opentelemetry = "0.33"
//! opentelemetry_sdk = { version = "0.33", features = ["trace"] } # + "testing" for the in-memory exporter
//! tracing-opentelemetry = "0.34"
//! tracing-subscriber = { version = "0.3", features = ["env-filter", "fmt", "registry"] }
//! ```
//!
//! The filter is `warn,otel=info`: the application's spans (target `otel`,
//! this example's crate name) are on and the crate's own `http.client`,
//! `http.server`, `publish` and `consume` spans are off. The trace id still
//! flows (the crate carries the current context); the one-time warning
//! printed says which target to enable to see the crate's hops as well
//! (`warn,otel=info,switchboard=info`). A real service swaps the
//! in-memory exporter for an OTLP one (`opentelemetry-otlp`) in
//! `with_batch_exporter`.

use std::sync::Arc;

use opentelemetry::trace::{TraceContextExt, TracerProvider as _};
use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider};
use serde::{Deserialize, Serialize};
use switchboard::observe::trace::{ExtractTraceContextLayer, InjectTraceContextLayer};
use switchboard::transport::http::{JsonRequest, JsonService};
use switchboard::{Error, Event, EventBus, MemoryTransport, Message, SubscribeOptions, handler_fn};
use tokio::sync::mpsc;
use tower::{ServiceBuilder, ServiceExt};
use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

#[derive(Debug, Clone, Serialize, Deserialize)]
struct OrderPlaced {
    order_id: String,
}

impl Event for OrderPlaced {
    const TYPE: &'static str = "order.placed";
    const VERSION: &'static str = "1.0";
}

fn trace_id(span: &tracing::Span) -> String {
    span.context().span().span_context().trace_id().to_string()
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    // 1. An SDK tracer provider with an exporter (in memory here, so the
    //    example runs without a collector).
    let exporter = InMemorySpanExporter::default();
    let provider = SdkTracerProvider::builder()
        .with_simple_exporter(exporter.clone())
        .build();
    // 2. A tracing-subscriber registry with the tracing-opentelemetry layer
    //    and the application's filter (global: it applies to every layer).
    tracing_subscriber::registry()
        .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("otel-example")))
        .with(tracing_subscriber::fmt::layer())
        .with(EnvFilter::new("warn,otel=info"))
        .init();

    // The consumer: its handler's span continues the publisher's trace.
    let bus = EventBus::new(Arc::new(MemoryTransport::new()), "orders");
    let (handled, mut handled_rx) = mpsc::unbounded_channel();
    let consumer = bus
        .subscribe(
            SubscribeOptions::new("shipping"),
            handler_fn(move |message: Message<OrderPlaced>| {
                let span = tracing::info_span!("ship", order_id = %message.payload().order_id);
                handled.send(trace_id(&span)).ok();
                async { Ok::<_, Error>(()) }.instrument(span)
            }),
        )
        .await?;

    // The server: behind ExtractTraceContextLayer, its handler publishes.
    let publisher = bus.clone();
    let app = axum::Router::new()
        .route(
            "/orders",
            axum::routing::post(move || {
                let bus = publisher.clone();
                async move {
                    let span = tracing::info_span!("place_order");
                    let server_trace = trace_id(&span);
                    bus.publish(OrderPlaced {
                        order_id: "A-17".into(),
                    })
                    .instrument(span)
                    .await
                    .map(|_| axum::Json(server_trace))
                    .map_err(|error| error.to_string())
                }
            }),
        )
        .layer(ExtractTraceContextLayer::new());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let address = listener.local_addr()?;
    let server = tokio::spawn(async move { axum::serve(listener, app).await });

    // The client: a JsonService over reqwest under InjectTraceContextLayer,
    // called inside the application's own span.
    let client = ServiceBuilder::new()
        .layer(InjectTraceContextLayer::new())
        .service(reqwest::Client::new());
    let orders = JsonService::<JsonRequest<serde_json::Value>, String, _>::at(
        client,
        format!("http://{address}"),
    );
    let checkout = tracing::info_span!("checkout");
    let caller_trace = trace_id(&checkout);
    let server_trace = orders
        .oneshot(JsonRequest::post(
            "/orders",
            serde_json::json!({"order_id": "A-17"}),
        ))
        .instrument(checkout)
        .await?;
    let handler_trace = tokio::time::timeout(std::time::Duration::from_secs(5), handled_rx.recv())
        .await?
        .ok_or("the handler did not run")?;
    consumer.shutdown().await?;
    server.abort();

    println!("caller  trace id: {caller_trace}");
    println!("server  trace id: {server_trace}");
    println!("handler trace id: {handler_trace}");
    provider.force_flush()?;
    for span in exporter.get_finished_spans()? {
        println!(
            "exported span {:<12} trace {} parent {}",
            span.name,
            span.span_context.trace_id(),
            span.parent_span_id
        );
    }
    assert!(
        caller_trace == server_trace && server_trace == handler_trace,
        "one trace id from the request to the handler"
    );
    provider.shutdown()?;
    Ok(())
}
