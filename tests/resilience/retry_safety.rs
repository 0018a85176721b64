//! Retries over real connections: a request is sent again only when it
//! certainly did not take effect, unless the call is idempotent, and a
//! server's delay is obeyed for no longer than `max_backoff_ms` — in a call
//! and in a consume loop's nack.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use axum::Router;
use axum::http::{HeaderMap, StatusCode, header};
use axum::routing::post;
use serde::{Deserialize, Serialize};
use switchboard::middleware::Resilience;
use switchboard::testing::proxy::FaultProxy;
use switchboard::transport::grpc::{proto, unary};
use switchboard::transport::http::JsonService;
use switchboard::{
    Effect, Error, ErrorKind, Event, EventBus, MemoryTransport, Message, SubscribeOptions,
    Topology, handler_fn,
};
use tokio::net::TcpListener;
use tokio::sync::{Notify, mpsc};
use tower::ServiceExt;

/// Three attempts, 10 ms apart, no jitter; a wait is at most 20 ms.
const YAML: &str = "\
retry:
  max_attempts: 3
  backoff_ms: 10
  max_backoff_ms: 20
  jitter: false
";

#[derive(Debug, Clone, Serialize, Deserialize)]
struct PlaceOrder {
    symbol: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Receipt {
    order_id: u64,
}

fn order() -> PlaceOrder {
    PlaceOrder {
        symbol: "AAPL".into(),
    }
}

/// Serves `app` on a free local port.
async fn serve(app: Router) -> std::net::SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    address
}

fn orders(address: impl std::fmt::Display) -> JsonService<PlaceOrder, Receipt> {
    JsonService::post(reqwest::Client::new(), format!("http://{address}/orders"))
}

/// An order service that takes each order, says so, and never answers:
/// whatever happens to the connection now, the order may have been placed.
async fn order_service_that_never_answers() -> (std::net::SocketAddr, Arc<AtomicU32>, Arc<Notify>) {
    let placed = Arc::new(AtomicU32::new(0));
    let reached = Arc::new(Notify::new());
    let app = Router::new().route(
        "/orders",
        post({
            let (placed, reached) = (placed.clone(), reached.clone());
            move || async move {
                placed.fetch_add(1, Ordering::SeqCst);
                reached.notify_one();
                std::future::pending::<axum::Json<Receipt>>().await
            }
        }),
    );
    (serve(app).await, placed, reached)
}

#[tokio::test]
async fn a_lost_response_to_a_call_that_is_not_idempotent_is_not_retried() {
    let (server, placed, reached) = order_service_that_never_answers().await;
    let proxy = FaultProxy::start(server).await.unwrap();
    let client = Resilience::from_yaml(YAML)
        .unwrap()
        .client("orders", orders(proxy.addr()));

    let call = tokio::spawn(client.oneshot(order()));
    // The order reached the server; then the connection dies before the
    // answer comes back.
    reached.notified().await;
    proxy.cut();
    let error = call.await.unwrap().unwrap_err();
    assert_eq!(error.kind(), ErrorKind::Connection, "{error}");
    assert_eq!(error.effect(), Effect::Unknown, "{error}");
    assert_eq!(error.attempts(), Some(1), "the order was sent again");
    assert_eq!(placed.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn a_lost_response_to_an_idempotent_call_is_retried() {
    let (server, placed, reached) = order_service_that_never_answers().await;
    let proxy = FaultProxy::start(server).await.unwrap();
    let client = Resilience::from_yaml(YAML)
        .unwrap()
        .idempotent()
        .client("orders", orders(proxy.addr()));

    let call = tokio::spawn(client.oneshot(order()));
    reached.notified().await;
    proxy.cut();
    let error = call.await.unwrap().unwrap_err();
    // Every attempt was made; the proxy, still cut, closed the later ones.
    assert_eq!(error.attempts(), Some(3), "{error}");
    assert_eq!(placed.load(Ordering::SeqCst), 1);
}

/// Answers every order with `status`, counting them.
async fn order_service_answering(status: StatusCode) -> (std::net::SocketAddr, Arc<AtomicU32>) {
    let calls = Arc::new(AtomicU32::new(0));
    let app = Router::new().route(
        "/orders",
        post({
            let calls = calls.clone();
            move || async move {
                calls.fetch_add(1, Ordering::SeqCst);
                status
            }
        }),
    );
    (serve(app).await, calls)
}

#[tokio::test]
async fn a_503_or_429_is_retried_for_any_call_and_a_500_or_502_only_for_an_idempotent_one() {
    let resilience = Resilience::from_yaml(YAML).unwrap();
    for (status, not_idempotent, idempotent) in [
        (StatusCode::SERVICE_UNAVAILABLE, 3, 3),
        (StatusCode::TOO_MANY_REQUESTS, 3, 3),
        (StatusCode::INTERNAL_SERVER_ERROR, 1, 3),
        (StatusCode::BAD_GATEWAY, 1, 3),
    ] {
        let (server, calls) = order_service_answering(status).await;
        let error = resilience
            .client("orders", orders(server))
            .oneshot(order())
            .await
            .unwrap_err();
        assert_eq!(calls.load(Ordering::SeqCst), not_idempotent, "{status}");
        assert_eq!(error.attempts(), Some(not_idempotent), "{status}");

        let (server, calls) = order_service_answering(status).await;
        resilience
            .clone()
            .idempotent()
            .client("orders", orders(server))
            .oneshot(order())
            .await
            .unwrap_err();
        assert_eq!(
            calls.load(Ordering::SeqCst),
            idempotent,
            "{status}, idempotent"
        );
    }
}

/// A local port nothing listens on.
async fn closed_port() -> std::net::SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    listener.local_addr().unwrap()
}

#[tokio::test]
async fn a_refused_connection_is_retried_for_any_call_over_http_and_grpc() {
    let resilience = Resilience::from_yaml(YAML).unwrap();
    let error = resilience
        .client("orders", orders(closed_port().await))
        .oneshot(order())
        .await
        .unwrap_err();
    assert_eq!(error.kind(), ErrorKind::Connection, "{error}");
    assert_eq!(error.effect(), Effect::NotApplied, "{error}");
    assert_eq!(error.attempts(), Some(3));

    let channel =
        tonic::transport::Endpoint::from_shared(format!("http://{}", closed_port().await))
            .unwrap()
            .connect_lazy();
    let deliver = unary(
        proto::push_client::PushClient::new(channel),
        |mut client, request: proto::DeliverRequest| async move { client.deliver(request).await },
    );
    let error = resilience
        .client("push", deliver)
        .oneshot(proto::DeliverRequest::default())
        .await
        .unwrap_err();
    assert_eq!(error.kind(), ErrorKind::Connection, "{error}");
    assert_eq!(error.effect(), Effect::NotApplied, "{error}");
    assert_eq!(error.attempts(), Some(3));
}

/// A gRPC server that fails every call with `code`, counting them.
struct Failing {
    code: tonic::Code,
    calls: Arc<AtomicU32>,
}

#[async_trait::async_trait]
impl proto::push_server::Push for Failing {
    async fn deliver(
        &self,
        _: tonic::Request<proto::DeliverRequest>,
    ) -> Result<tonic::Response<proto::DeliverReply>, tonic::Status> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        Err(tonic::Status::new(self.code, "scripted"))
    }
}

#[tokio::test]
async fn grpc_unknown_internal_and_data_loss_are_retried_only_for_an_idempotent_call() {
    let resilience = Resilience::from_yaml(YAML).unwrap();
    for (code, not_idempotent) in [
        (tonic::Code::Unknown, 1),
        (tonic::Code::Internal, 1),
        (tonic::Code::DataLoss, 1),
        (tonic::Code::Cancelled, 1),
        (tonic::Code::Unavailable, 1),
        (tonic::Code::ResourceExhausted, 3),
    ] {
        for idempotent in [false, true] {
            let calls = Arc::new(AtomicU32::new(0));
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let address = listener.local_addr().unwrap();
            let server = tokio::spawn(
                tonic::transport::Server::builder()
                    .add_service(proto::push_server::PushServer::new(Failing {
                        code,
                        calls: calls.clone(),
                    }))
                    .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
            );
            let channel = tonic::transport::Endpoint::from_shared(format!("http://{address}"))
                .unwrap()
                .connect_lazy();
            let deliver = unary(
                proto::push_client::PushClient::new(channel),
                |mut client, request: proto::DeliverRequest| async move {
                    client.deliver(request).await
                },
            );
            let stack = if idempotent {
                resilience.clone().idempotent()
            } else {
                resilience.clone()
            };
            stack
                .client("push", deliver)
                .oneshot(proto::DeliverRequest::default())
                .await
                .unwrap_err();
            let expected = if idempotent { 3 } else { not_idempotent };
            assert_eq!(
                calls.load(Ordering::SeqCst),
                expected,
                "{code:?}, idempotent: {idempotent}"
            );
            server.abort();
        }
    }
}

/// Answers every order 503 with `Retry-After: 86400` — come back tomorrow.
async fn order_service_asking_for_a_day() -> (std::net::SocketAddr, Arc<AtomicU32>) {
    let calls = Arc::new(AtomicU32::new(0));
    let app = Router::new().route(
        "/orders",
        post({
            let calls = calls.clone();
            move || async move {
                calls.fetch_add(1, Ordering::SeqCst);
                let mut headers = HeaderMap::new();
                headers.insert(header::RETRY_AFTER, "86400".parse().unwrap());
                (StatusCode::SERVICE_UNAVAILABLE, headers)
            }
        }),
    );
    (serve(app).await, calls)
}

#[tokio::test]
async fn a_servers_retry_after_of_a_day_is_obeyed_for_at_most_max_backoff() {
    let (server, calls) = order_service_asking_for_a_day().await;
    let client = Resilience::from_yaml(YAML)
        .unwrap()
        .client("orders", orders(server));
    let started = Instant::now();
    let error = client.oneshot(order()).await.unwrap_err();
    assert_eq!(calls.load(Ordering::SeqCst), 3);
    // Two waits of 20 ms, not two days.
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(error.retry_after(), Some(Duration::from_millis(20)));
    assert_eq!(error.requeue_after(), Some(Duration::from_millis(20)));
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct OrderRequested {
    symbol: String,
}

impl Event for OrderRequested {
    const TYPE: &'static str = "order.requested";
    const VERSION: &'static str = "1.0";
}

#[tokio::test]
async fn a_servers_retry_after_reaches_the_consume_loop_as_a_nack_of_at_most_max_backoff() {
    let (server, _) = order_service_asking_for_a_day().await;
    let transport = MemoryTransport::new();
    let bus = EventBus::new(Arc::new(transport), "gateway");
    bus.declare(&Topology::new().with_event::<OrderRequested, _>(["orders"]))
        .await
        .unwrap();
    // Two attempts of the handler, each of two calls: four failures stay
    // below the client breaker's threshold of five, whose own 30 s requeue
    // would otherwise be what the loop sees.
    let resilience =
        Resilience::from_yaml(&YAML.replace("max_attempts: 3", "max_attempts: 2")).unwrap();
    let client = resilience.client("orders", orders(server));
    let handler = resilience.consumer(
        "orders",
        handler_fn(move |message: Message<OrderRequested>| {
            let client = client.clone();
            let symbol = message.payload().symbol.clone();
            async move {
                client.oneshot(PlaceOrder { symbol }).await?;
                Ok::<_, Error>(())
            }
        }),
    );
    // What the consume loop gets from the stack: the delay it nacks with.
    let (outcomes, mut outcome_rx) = mpsc::unbounded_channel();
    let observed = handler.map_result(move |result| {
        outcomes
            .send(result.as_ref().map_err(Error::requeue_after).copied())
            .ok();
        result
    });
    let consumer = bus
        .subscribe(SubscribeOptions::new("orders"), observed)
        .await
        .unwrap();
    bus.publish(OrderRequested {
        symbol: "AAPL".into(),
    })
    .await
    .unwrap();
    let outcome = outcome_rx.recv().await.unwrap();
    assert_eq!(outcome, Err(Some(Duration::from_millis(20))));
    consumer.abort();
}
