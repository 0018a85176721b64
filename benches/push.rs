//! One event pushed and acked by the subscriber's handler, over gRPC and
//! over HTTP webhooks, beside the raw round trip of the same client and
//! server libraries with a handler that answers at once (the floor).
//! Sequential, one `current_thread` runtime (cheaper wake-ups on a small VM).
//!
//! `cargo bench --features grpc,http --bench push`

use std::sync::Arc;

use axum::routing::post;
use criterion::{Criterion, criterion_group, criterion_main};
use switchboard::transport::grpc::{GrpcTransport, proto};
use switchboard::transport::http::HttpTransport;
use switchboard::transport::push::{PushConfig, PushEndpoint, PushRoutes};
use switchboard::{Publisher, RawMessage, SubscribeOptions, Transport};
use tokio::net::TcpListener;

const TOPIC: &str = "trade.executed";
const BODY: &str = r#"{"event_id":"1b4e28ba-2fa1-11d2-883f-0016d3cca427","event_type":"trade.executed","timestamp":"2026-11-23T10:00:00Z","source":"trading-service","version":"1.0","payload":{"order_id":"123","user_id":"456","symbol":"AAPL","quantity":100,"price":150.0}}"#;

async fn listener() -> (TcpListener, String) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("a port");
    let url = format!("http://{}", listener.local_addr().expect("address"));
    (listener, url)
}

fn config(url: String) -> PushConfig {
    PushConfig::new(PushRoutes::new().route(TOPIC, PushEndpoint::new(url).for_group("game")))
}

/// Subscribes and acks everything, as a handler that succeeds would.
async fn ack_all(transport: Arc<dyn Transport>) {
    let mut subscription = transport
        .subscribe(TOPIC, SubscribeOptions::new("game"))
        .await
        .expect("subscribe");
    tokio::spawn(async move {
        while let Some(delivery) = subscription.recv().await {
            let _ = delivery.ack().await;
        }
    });
}

struct Immediate;

#[tonic::async_trait]
impl proto::push_server::Push for Immediate {
    async fn deliver(
        &self,
        _request: tonic::Request<proto::DeliverRequest>,
    ) -> Result<tonic::Response<proto::DeliverReply>, tonic::Status> {
        Ok(tonic::Response::new(proto::DeliverReply {}))
    }
}

fn push(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let message = RawMessage::new(BODY).with_header("event-id", "1b4e28ba");
    let mut group = c.benchmark_group("push_round_trip");

    let grpc = runtime.block_on(async {
        let (listener, url) = listener().await;
        let transport = GrpcTransport::new(config(url)).expect("grpc");
        tokio::spawn(transport.serve(listener));
        ack_all(Arc::new(transport.clone())).await;
        transport
    });
    group.bench_function("grpc_transport", |b| {
        b.to_async(&runtime)
            .iter(|| async { grpc.publish(TOPIC, message.clone()).await.expect("publish") })
    });

    let raw_grpc = runtime.block_on(async {
        let (listener, url) = listener().await;
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(proto::push_server::PushServer::new(Immediate))
                .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
        );
        let channel = tonic::transport::Endpoint::from_shared(url)
            .expect("url")
            .connect_lazy();
        proto::push_client::PushClient::new(channel)
    });
    group.bench_function("raw_tonic_unary", |b| {
        b.to_async(&runtime).iter(|| {
            let mut client = raw_grpc.clone();
            let request = proto::DeliverRequest {
                topic: TOPIC.into(),
                body: BODY.into(),
                ..Default::default()
            };
            async move { client.deliver(request).await.expect("deliver") }
        })
    });

    let http = runtime.block_on(async {
        let (listener, url) = listener().await;
        let transport = HttpTransport::new(config(url)).expect("http");
        tokio::spawn(transport.serve(listener));
        ack_all(Arc::new(transport.clone())).await;
        transport
    });
    group.bench_function("http_transport", |b| {
        b.to_async(&runtime)
            .iter(|| async { http.publish(TOPIC, message.clone()).await.expect("publish") })
    });

    let (client, raw_url) = runtime.block_on(async {
        let (listener, url) = listener().await;
        let app = axum::Router::new().route("/events/{topic}", post(|| async { "" }));
        tokio::spawn(async move { axum::serve(listener, app).await });
        (reqwest::Client::new(), format!("{url}/events/{TOPIC}"))
    });
    group.bench_function("raw_reqwest_axum", |b| {
        b.to_async(&runtime).iter(|| async {
            client
                .post(&raw_url)
                .body(BODY)
                .send()
                .await
                .expect("post")
                .bytes()
                .await
                .expect("body")
        })
    });
    group.finish();
}

criterion_group!(benches, push);
criterion_main!(benches);
