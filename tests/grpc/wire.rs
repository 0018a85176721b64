//! The gRPC push fixture of `tests/fixtures/wire/v1`: the request's exact
//! bytes are read by the receiver, and today's publisher still sends them.
//! (It sends with the `receiver` module's byte-for-byte codec.)

use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::Bytes;
use prost::Message as _;
use switchboard::transport::grpc::{GrpcTransport, proto};
use switchboard::transport::push::{PushConfig, PushEndpoint, PushRoutes};
use switchboard::{Publisher, SubscribeOptions, Subscriber};
use tonic::codegen::http::uri::PathAndQuery;
use tonic::{Request, Response, Status};

use super::receiver::{RawCodec, served};

#[path = "../common/wire.rs"]
mod fixture;
use fixture::{GROUP, TOPIC, fixture_message};

const REQUEST: &[u8] = include_bytes!("../fixtures/wire/v1/grpc_push_deliver_request.bin");

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_v1_request_bytes_are_read_by_the_receiver() {
    let (transport, channel) = served().await;
    let mut subscription = transport
        .subscribe(TOPIC, SubscribeOptions::new(GROUP))
        .await
        .expect("subscribe");
    let sent = tokio::spawn(async move {
        let mut client = tonic::client::Grpc::new(channel);
        client.ready().await.expect("channel ready");
        let path = PathAndQuery::from_static("/switchboard.push.v1.Push/Deliver");
        client
            .unary(Request::new(Bytes::from_static(REQUEST)), path, RawCodec)
            .await
    });
    let delivery = tokio::time::timeout(std::time::Duration::from_secs(20), subscription.recv())
        .await
        .expect("delivered in time")
        .expect("a delivery");
    assert_eq!(delivery.message(), &fixture_message());
    assert_eq!(delivery.attempt(), 2);
    delivery.ack().await.expect("ack");
    sent.await
        .expect("the request task")
        .expect("the receiver answers OK once acked");
}

/// Refuses the first attempt (so the second carries attempt 2, as the
/// fixture does) and keeps the bytes of each request.
#[derive(Default)]
struct Capture {
    calls: AtomicUsize,
    requests: Mutex<Vec<Vec<u8>>>,
}

struct CaptureService(std::sync::Arc<Capture>);

#[tonic::async_trait]
impl proto::push_server::Push for CaptureService {
    async fn deliver(
        &self,
        request: Request<proto::DeliverRequest>,
    ) -> Result<Response<proto::DeliverReply>, Status> {
        self.0
            .requests
            .lock()
            .expect("requests")
            .push(request.into_inner().encode_to_vec());
        if self.0.calls.fetch_add(1, Ordering::SeqCst) == 0 {
            return Err(Status::unavailable("the first attempt is refused"));
        }
        Ok(Response::new(proto::DeliverReply {}))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn todays_publisher_still_sends_the_v1_request_bytes() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let capture = std::sync::Arc::new(Capture::default());
    let server = tonic::transport::Server::builder()
        .add_service(proto::push_server::PushServer::new(CaptureService(
            capture.clone(),
        )))
        .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener));
    tokio::spawn(server);
    let routes = PushRoutes::new().route(TOPIC, PushEndpoint::new(url).for_group(GROUP));
    let config = PushConfig::new(routes).with_retry(
        switchboard::config::RetryConfig::default()
            .with_max_attempts(2)
            .with_backoff_ms(1)
            .with_backoff_multiplier(1.0)
            .with_max_backoff_ms(1),
    );
    let transport = GrpcTransport::new(config).expect("a gRPC transport");
    transport
        .publish(TOPIC, fixture_message())
        .await
        .expect("publish");
    let requests = capture.requests.lock().expect("requests").clone();
    assert_eq!(requests.len(), 2);
    let first = proto::DeliverRequest::decode(requests[0].as_slice()).expect("protobuf");
    assert_eq!(first.attempt, 1);
    assert_eq!(
        requests[1], REQUEST,
        "today's writer changed the v1 request"
    );
}
