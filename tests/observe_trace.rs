//! Trace context: one trace from an HTTP request through a broker to the
//! consumer's handler, and across the in-memory bus, Redis Pub/Sub and
//! RabbitMQ.

mod common;
#[path = "observe_trace/filtered.rs"]
mod filtered;

use std::sync::Arc;
use std::time::Duration;

use common::{TradeExecuted, spec_trade};
use opentelemetry::trace::{SpanId, TraceContextExt, TraceId, TracerProvider as _};
use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider, SpanData};
use switchboard::observe::trace::{ExtractTraceContextLayer, InjectTraceContextLayer, TRACEPARENT};
use switchboard::transport::amqp::{AmqpConfig, AmqpTransport};
use switchboard::{
    EventBus, MemoryTransport, Message, RedisPubSubTransport, RedisStreamsTransport,
    SubscribeOptions, Transport, handler_fn,
};
use tokio::sync::mpsc;
use tower::{ServiceBuilder, ServiceExt};
use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::layer::SubscriberExt;

/// A subscriber exporting every finished span into memory, set as this
/// thread's default (each test runs on its own current-thread runtime).
struct Tracing {
    provider: SdkTracerProvider,
    exporter: InMemorySpanExporter,
    _guard: tracing::subscriber::DefaultGuard,
}

impl Tracing {
    fn install() -> Self {
        let exporter = InMemorySpanExporter::default();
        let provider = SdkTracerProvider::builder()
            .with_simple_exporter(exporter.clone())
            .build();
        let subscriber = tracing_subscriber::registry()
            .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("test")));
        let guard = tracing::subscriber::set_default(subscriber);
        Self {
            provider,
            exporter,
            _guard: guard,
        }
    }

    fn spans(&self) -> Vec<SpanData> {
        self.provider.force_flush().unwrap();
        self.exporter.get_finished_spans().unwrap()
    }

    fn span(&self, name: &str) -> SpanData {
        let spans = self.spans();
        let found: Vec<_> = spans.iter().filter(|span| span.name == name).collect();
        assert_eq!(found.len(), 1, "one {name} span among {:?}", names(&spans));
        found[0].clone()
    }
}

fn names(spans: &[SpanData]) -> Vec<&str> {
    spans.iter().map(|span| &*span.name).collect()
}

/// What the handler saw: the envelope's traceparent and its own trace id.
type Seen = (Option<String>, TraceId);

fn recording_handler(
    seen: mpsc::UnboundedSender<Seen>,
) -> impl tower::Service<
    Message<TradeExecuted>,
    Response = (),
    Error = switchboard::Error,
    Future = impl Send + 'static,
> + Send
+ 'static {
    handler_fn(move |message: Message<TradeExecuted>| {
        let seen = seen.clone();
        async move {
            let trace_id = tracing::Span::current()
                .context()
                .span()
                .span_context()
                .trace_id();
            let parent = message.envelope().headers().get(TRACEPARENT).cloned();
            seen.send((parent, trace_id)).ok();
            Ok::<_, switchboard::Error>(())
        }
    })
}

fn redis_url() -> String {
    std::env::var("SWITCHBOARD_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned())
}

async fn recv(rx: &mut mpsc::UnboundedReceiver<Seen>) -> Seen {
    recv_within(rx).await
}

/// The next thing a handler sent, within a deadline.
async fn recv_within<T>(rx: &mut mpsc::UnboundedReceiver<T>) -> T {
    tokio::time::timeout(Duration::from_secs(10), rx.recv())
        .await
        .expect("the handler ran in time")
        .expect("the handler ran")
}

#[tokio::test]
async fn one_trade_from_an_http_order_through_redis_streams_to_the_handler_is_one_trace() {
    let tracing = Tracing::install();
    let transport = RedisStreamsTransport::connect(&redis_url()).await.unwrap();
    let bus = EventBus::new(Arc::new(transport), "trading-service")
        .with_namespace(format!("t{}", uuid::Uuid::new_v4().simple()));
    let (seen, mut handled) = mpsc::unbounded_channel();
    let consumer = bus
        .subscribe(SubscribeOptions::new("game"), recording_handler(seen))
        .await
        .unwrap();

    // Trading's HTTP API: an order executes a trade and publishes it.
    let publisher = bus.clone();
    let app = axum::Router::new()
        .route(
            "/orders",
            axum::routing::post(move || {
                let bus = publisher.clone();
                async move {
                    bus.publish(spec_trade()).await.unwrap();
                    "executed"
                }
            }),
        )
        .layer(ExtractTraceContextLayer::new());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let server = tokio::spawn(async move { axum::serve(listener, app).await });

    // The gateway's client, with the client-side layer.
    let client = ServiceBuilder::new()
        .layer(InjectTraceContextLayer::new())
        .service(reqwest::Client::new());
    let request = reqwest::Request::new(
        reqwest::Method::POST,
        format!("http://{address}/orders").parse().unwrap(),
    );
    let response = client.oneshot(request).await.unwrap();
    assert!(response.status().is_success());

    let (traceparent, handler_trace) = recv(&mut handled).await;
    consumer.shutdown().await.unwrap();
    server.abort();

    let client_span = tracing.span("http.client");
    let server_span = tracing.span("http.server");
    let publish = tracing.span("publish");
    let consume = tracing.span("consume");
    let trace_id = client_span.span_context.trace_id();
    assert_ne!(trace_id, TraceId::INVALID);
    for span in [&server_span, &publish, &consume] {
        assert_eq!(span.span_context.trace_id(), trace_id, "{}", span.name);
    }
    assert_eq!(handler_trace, trace_id);
    // Each hop is the child of the one before it.
    assert_eq!(
        server_span.parent_span_id,
        client_span.span_context.span_id()
    );
    assert_eq!(publish.parent_span_id, server_span.span_context.span_id());
    assert_eq!(consume.parent_span_id, publish.span_context.span_id());
    assert_eq!(client_span.parent_span_id, SpanId::INVALID);
    // The envelope carried the publish span's context.
    assert_eq!(
        traceparent.unwrap(),
        format!("00-{}-{}-01", trace_id, publish.span_context.span_id())
    );
}

/// Publishes one trade inside a root span and checks the consumer's span
/// continues its trace as the publish span's child.
async fn the_consume_span_continues_the_publish_trace(transport: Arc<dyn Transport>) {
    let tracing = Tracing::install();
    let bus = EventBus::new(transport, "trading-service")
        .with_namespace(format!("t{}", uuid::Uuid::new_v4().simple()));
    let (seen, mut handled) = mpsc::unbounded_channel();
    let consumer = bus
        .subscribe(SubscribeOptions::new("game"), recording_handler(seen))
        .await
        .unwrap();
    let root = tracing::info_span!("order");
    let root_trace = root.context().span().span_context().trace_id();
    bus.publish(spec_trade()).instrument(root).await.unwrap();
    let (traceparent, handler_trace) = recv(&mut handled).await;
    consumer.shutdown().await.unwrap();

    assert!(traceparent.is_some());
    assert_eq!(handler_trace, root_trace);
    let publish = tracing.span("publish");
    let consume = tracing.span("consume");
    assert_eq!(publish.span_context.trace_id(), root_trace);
    assert_eq!(consume.span_context.trace_id(), root_trace);
    assert_eq!(consume.parent_span_id, publish.span_context.span_id());
}

#[tokio::test]
async fn trace_context_crosses_the_memory_bus() {
    the_consume_span_continues_the_publish_trace(Arc::new(MemoryTransport::new())).await;
}

#[tokio::test]
async fn trace_context_crosses_redis_pubsub() {
    let transport = RedisPubSubTransport::connect(&redis_url()).await.unwrap();
    the_consume_span_continues_the_publish_trace(Arc::new(transport)).await;
}

/// A push transport whose publisher delivers every topic to its own
/// receiver on a free local port.
async fn push_wired_to_itself(grpc: bool) -> Arc<dyn Transport> {
    use switchboard::transport::grpc::GrpcTransport;
    use switchboard::transport::http::HttpTransport;
    use switchboard::transport::push::{PushConfig, PushEndpoint, PushRoutes};

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let config = PushConfig::new(PushRoutes::new().default_route(PushEndpoint::new(url)));
    if grpc {
        let transport = GrpcTransport::new(config).unwrap();
        tokio::spawn(transport.serve(listener));
        Arc::new(transport)
    } else {
        let transport = HttpTransport::new(config).unwrap();
        tokio::spawn(transport.serve(listener));
        Arc::new(transport)
    }
}

#[tokio::test]
async fn trace_context_crosses_grpc_push() {
    the_consume_span_continues_the_publish_trace(push_wired_to_itself(true).await).await;
}

#[tokio::test]
async fn trace_context_crosses_http_push() {
    the_consume_span_continues_the_publish_trace(push_wired_to_itself(false).await).await;
}

#[tokio::test]
async fn trace_context_crosses_rabbitmq() {
    let transport =
        AmqpTransport::connect(AmqpConfig::new("amqp://guest:guest@127.0.0.1:5672/%2f"))
            .await
            .unwrap();
    the_consume_span_continues_the_publish_trace(Arc::new(transport)).await;
}

#[tokio::test]
async fn a_traceparent_already_on_the_envelope_is_kept() {
    let _tracing = Tracing::install();
    let bus = EventBus::new(Arc::new(MemoryTransport::new()), "trading-service");
    let (seen, mut handled) = mpsc::unbounded_channel();
    let consumer = bus
        .subscribe(SubscribeOptions::new("game"), recording_handler(seen))
        .await
        .unwrap();
    let stored = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let envelope = switchboard::EventEnvelope::new("trading-service", spec_trade())
        .with_header(TRACEPARENT, stored);
    bus.publish_envelope(&envelope)
        .instrument(tracing::info_span!("redrive"))
        .await
        .unwrap();
    let (traceparent, handler_trace) = recv(&mut handled).await;
    consumer.shutdown().await.unwrap();
    assert_eq!(traceparent.as_deref(), Some(stored));
    assert_eq!(
        handler_trace.to_string(),
        "4bf92f3577b34da6a3ce929d0e0e4736"
    );
}

#[tokio::test]
async fn without_an_opentelemetry_layer_nothing_is_added() {
    let bus = EventBus::new(Arc::new(MemoryTransport::new()), "trading-service");
    let (seen, mut handled) = mpsc::unbounded_channel();
    let consumer = bus
        .subscribe(SubscribeOptions::new("game"), recording_handler(seen))
        .await
        .unwrap();
    bus.publish(spec_trade()).await.unwrap();
    let (traceparent, handler_trace) = recv(&mut handled).await;
    consumer.shutdown().await.unwrap();
    assert_eq!(traceparent, None);
    assert_eq!(handler_trace, TraceId::INVALID);
}

#[tokio::test]
async fn grpc_calls_carry_trace_context_in_metadata() {
    use switchboard::transport::grpc::{GrpcTransport, proto};
    use switchboard::transport::push::PushConfig;

    let tracing = Tracing::install();
    let receiver = GrpcTransport::new(PushConfig::default()).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .layer(ExtractTraceContextLayer::new())
            .add_service(receiver.push_service())
            .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
    );
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{address}"))
        .unwrap()
        .connect_lazy();
    let mut client = proto::push_client::PushClient::new(
        ServiceBuilder::new()
            .layer(InjectTraceContextLayer::new())
            .service(channel),
    );
    let root = tracing::info_span!("order");
    let root_trace = root.context().span().span_context().trace_id();
    // No subscriber for the topic: the receiver answers an error, after the
    // server span has started.
    let answer = client
        .deliver(proto::DeliverRequest::default())
        .instrument(root)
        .await;
    assert!(answer.is_err());
    server.abort();

    let client_span = tracing.span("http.client");
    let server_span = tracing.span("http.server");
    assert_eq!(client_span.span_context.trace_id(), root_trace);
    assert_eq!(server_span.span_context.trace_id(), root_trace);
    assert_eq!(
        server_span.parent_span_id,
        client_span.span_context.span_id()
    );
}

/// `JsonService` over a client under `InjectTraceContextLayer`: each call is
/// an `http.client` span whose context the server receives as `traceparent`.
#[tokio::test]
async fn a_json_service_over_the_client_layer_sends_the_trace_context() {
    use switchboard::transport::http::{JsonRequest, JsonService};

    let tracing = Tracing::install();
    let app = axum::Router::new().route(
        "/orders/{id}",
        axum::routing::get(|headers: axum::http::HeaderMap| async move {
            let traceparent = headers
                .get(TRACEPARENT)
                .map(|value| value.to_str().unwrap().to_owned());
            axum::Json(traceparent)
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let server = tokio::spawn(async move { axum::serve(listener, app).await });

    let traced = ServiceBuilder::new()
        .layer(InjectTraceContextLayer::new())
        .service(reqwest::Client::new());
    let orders =
        JsonService::<JsonRequest, Option<String>, _>::at(traced, format!("http://{address}"));
    let seen = orders
        .oneshot(JsonRequest::get("/orders/{id}").with_param("id", 7))
        .await
        .unwrap();
    server.abort();

    let client_span = tracing.span("http.client");
    assert_eq!(
        seen.expect("the request carried a traceparent"),
        format!(
            "00-{}-{}-01",
            client_span.span_context.trace_id(),
            client_span.span_context.span_id()
        )
    );
}
