//! Trace context when the application's filter turns the crate's own spans
//! off (`warn,app=info`): the caller's trace still flows from an HTTP
//! request through a published event to the consumer's handler.

use std::sync::Arc;

use opentelemetry::trace::{TraceContextExt, TraceId, TracerProvider as _};
use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider};
use switchboard::observe::trace::{ExtractTraceContextLayer, InjectTraceContextLayer, TRACEPARENT};
use switchboard::transport::http::{JsonRequest, JsonService};
use switchboard::{EventBus, MemoryTransport, Message, SubscribeOptions, handler_fn};
use tokio::sync::mpsc;
use tower::{ServiceBuilder, ServiceExt};
use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::SubscriberExt;

use super::common::{TradeExecuted, spec_trade};
use super::recv_within;

fn trace_id_of(span: &tracing::Span) -> TraceId {
    span.context().span().span_context().trace_id()
}

/// What the consumer's handler saw: the envelope's traceparent, the trace
/// id of its own `app` span and of the attached OpenTelemetry context.
type Seen = (Option<String>, TraceId, TraceId);

#[tokio::test]
async fn one_trace_id_flows_when_the_filter_turns_the_crates_spans_off() {
    let exporter = InMemorySpanExporter::default();
    let provider = SdkTracerProvider::builder()
        .with_simple_exporter(exporter.clone())
        .build();
    let subscriber = tracing_subscriber::registry()
        .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("test")))
        .with(EnvFilter::new("warn,app=info"));
    let _guard = tracing::subscriber::set_default(subscriber);

    let bus = EventBus::new(Arc::new(MemoryTransport::new()), "orders")
        .with_namespace(format!("t{}", uuid::Uuid::new_v4().simple()));
    let (seen, mut handled) = mpsc::unbounded_channel::<Seen>();
    let consumer = bus
        .subscribe(
            SubscribeOptions::new("shipping"),
            handler_fn(move |message: Message<TradeExecuted>| {
                let seen = seen.clone();
                let span = tracing::info_span!(target: "app", "ship");
                let own = trace_id_of(&span);
                let attached = opentelemetry::Context::current()
                    .span()
                    .span_context()
                    .trace_id();
                let parent = message.envelope().headers().get(TRACEPARENT).cloned();
                async move {
                    seen.send((parent, own, attached)).ok();
                    Ok::<_, switchboard::Error>(())
                }
                .instrument(span)
            }),
        )
        .await
        .unwrap();

    // The server publishes from its handler, behind the extracting layer;
    // it answers with the traceparent it received.
    let publisher = bus.clone();
    let app = axum::Router::new()
        .route(
            "/orders",
            axum::routing::post(move |headers: axum::http::HeaderMap| {
                let bus = publisher.clone();
                async move {
                    bus.publish(spec_trade()).await.unwrap();
                    let received = headers
                        .get(TRACEPARENT)
                        .map(|value| value.to_str().unwrap().to_owned());
                    axum::Json(received)
                }
            }),
        )
        .layer(ExtractTraceContextLayer::new());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let server = tokio::spawn(async move { axum::serve(listener, app).await });

    let client = ServiceBuilder::new()
        .layer(InjectTraceContextLayer::new())
        .service(reqwest::Client::new());
    let orders = JsonService::<JsonRequest<serde_json::Value>, Option<String>, _>::at(
        client,
        format!("http://{address}"),
    );
    let checkout = tracing::info_span!(target: "app", "checkout");
    let caller_trace = trace_id_of(&checkout);
    let received = orders
        .oneshot(JsonRequest::post(
            "/orders",
            serde_json::json!({"symbol": "AAPL"}),
        ))
        .instrument(checkout)
        .await
        .unwrap();

    let (envelope_parent, handler_trace, attached_trace) = recv_within(&mut handled).await;
    consumer.shutdown().await.unwrap();
    server.abort();

    assert_ne!(
        caller_trace,
        TraceId::INVALID,
        "the caller's span is enabled"
    );
    let in_header = |traceparent: Option<String>, hop: &str| {
        let traceparent = traceparent.unwrap_or_else(|| panic!("no traceparent on {hop}"));
        traceparent.split('-').nth(1).unwrap().to_owned()
    };
    let caller_hex = caller_trace.to_string();
    assert_eq!(in_header(received, "the request"), caller_hex);
    assert_eq!(in_header(envelope_parent, "the envelope"), caller_hex);
    assert_eq!(handler_trace, caller_trace, "the handler's own span");
    assert_eq!(
        attached_trace, caller_trace,
        "the handler's attached context"
    );

    // The filter did turn the crate's spans off: only the `app` ones exist.
    provider.force_flush().unwrap();
    let mut exported: Vec<_> = exporter
        .get_finished_spans()
        .unwrap()
        .into_iter()
        .map(|span| (span.name.into_owned(), span.span_context.trace_id()))
        .collect();
    exported.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(
        exported,
        [
            ("checkout".to_owned(), caller_trace),
            ("ship".to_owned(), caller_trace)
        ]
    );
}
