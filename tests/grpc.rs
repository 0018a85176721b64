//! The gRPC push transport passes the conformance suite: the factory builds
//! a transport whose publisher pushes every topic to its own receiver,
//! served on a free local port.

use std::sync::Arc;

use switchboard::Transport;
use switchboard::config::RetryConfig;
use switchboard::transport::grpc::GrpcTransport;
use switchboard::transport::push::{PushConfig, PushEndpoint, PushRoutes};

async fn wired_to_itself() -> Arc<dyn Transport> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("a free local port");
    let url = format!("http://{}", listener.local_addr().expect("local address"));
    let config = PushConfig::new(PushRoutes::new().default_route(PushEndpoint::new(url)))
        .with_retry(
            RetryConfig::default()
                .with_max_attempts(5)
                .with_backoff_ms(5)
                .with_backoff_multiplier(2.0)
                .with_max_backoff_ms(100),
        );
    let transport = GrpcTransport::new(config).expect("a gRPC transport");
    tokio::spawn(transport.serve(listener));
    Arc::new(transport)
}

switchboard::conformance_tests!(wired_to_itself);

// ------------------------------------------- outcomes and the retry owner

/// The publisher's loop (5 attempts in `wired_to_itself`) is the one retry
/// owner of a push: a handler asking for a retry is called once per attempt.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_a_handler_asks_for_is_the_publishers_alone() {
    switchboard::testing::outcomes::push_retries_have_one_owner(wired_to_itself().await, 5).await;
}

/// An envelope of a major version the receiver's member does not know is
/// given back: retried by the publisher, which then fails saying why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_push_no_member_can_read_fails_saying_why() {
    switchboard::testing::outcomes::a_push_nobody_can_read_fails_saying_why(
        wired_to_itself().await,
        5,
    )
    .await;
}

// ------------------------------------------------- the receiver's answers

mod receiver {
    use std::time::Duration;

    use bytes::{Buf, BufMut, Bytes};
    use futures_util::FutureExt;
    use prost::Message;
    use switchboard::transport::grpc::{GrpcTransport, proto, unary};
    use switchboard::transport::push::{PushConfig, PushEndpoint, PushRoutes};
    use switchboard::{ErrorKind, Publisher, RawMessage, SubscribeOptions, Subscriber};
    use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
    use tonic::codegen::http::uri::PathAndQuery;
    use tonic::transport::{Channel, Endpoint};
    use tonic::{Code, Status};
    use tower::{Service, ServiceExt};

    const LIMIT: usize = 1024;

    /// Sends request bytes exactly as given, so tests can send what no
    /// well-behaved client would.
    #[derive(Debug, Clone, Copy, Default)]
    pub(super) struct RawCodec;

    impl Codec for RawCodec {
        type Encode = Bytes;
        type Decode = Bytes;
        type Encoder = RawCodec;
        type Decoder = RawCodec;
        fn encoder(&mut self) -> RawCodec {
            RawCodec
        }
        fn decoder(&mut self) -> RawCodec {
            RawCodec
        }
    }

    impl Encoder for RawCodec {
        type Item = Bytes;
        type Error = Status;
        fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
            dst.put(item);
            Ok(())
        }
    }

    impl Decoder for RawCodec {
        type Item = Bytes;
        type Error = Status;
        fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Bytes>, Status> {
            Ok(Some(src.copy_to_bytes(src.remaining())))
        }
    }

    /// A transport with a small body limit serving on a free port, and a
    /// channel to it.
    pub(super) async fn served() -> (GrpcTransport, Channel) {
        served_with_max_backoff(1).await
    }

    /// [`served`], obeying a receiver's delay for up to `max_backoff_ms`.
    async fn served_with_max_backoff(max_backoff_ms: u64) -> (GrpcTransport, Channel) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let config = PushConfig::new(PushRoutes::new().default_route(PushEndpoint::new(&url)))
            .with_max_body_bytes(LIMIT)
            .with_retry(
                switchboard::config::RetryConfig::default()
                    .with_max_attempts(2)
                    .with_backoff_ms(1)
                    .with_backoff_multiplier(1.0)
                    .with_max_backoff_ms(max_backoff_ms),
            );
        let transport = GrpcTransport::new(config).unwrap();
        tokio::spawn(transport.serve(listener));
        let channel = Endpoint::from_shared(url).unwrap().connect_lazy();
        (transport, channel)
    }

    async fn send_raw(channel: &Channel, bytes: Vec<u8>) -> Status {
        let mut client = tonic::client::Grpc::new(channel.clone());
        client.ready().await.expect("channel ready");
        let path = PathAndQuery::from_static("/switchboard.push.v1.Push/Deliver");
        client
            .unary(tonic::Request::new(Bytes::from(bytes)), path, RawCodec)
            .await
            .expect_err("the receiver refuses the request")
    }

    #[tokio::test]
    async fn malformed_protobuf_is_invalid_argument_with_a_message() {
        let (transport, channel) = served().await;
        // A field tag with a truncated varint: not protobuf.
        let status = send_raw(&channel, vec![0x0a, 0xff, 0xff, 0xff]).await;
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
        assert!(status.message().contains("decode"), "{status:?}");
        // A string field that is not UTF-8.
        let status = send_raw(&channel, vec![0x0a, 0x02, 0xc3, 0x28]).await;
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");

        // The receiver still works afterwards.
        still_delivers(&transport).await;
    }

    #[tokio::test]
    async fn oversize_bodies_are_resource_exhausted_at_both_limits() {
        let (transport, channel) = served().await;
        let just_over = proto::DeliverRequest {
            topic: "t".into(),
            body: vec![b'x'; LIMIT + 1].into(),
            ..Default::default()
        };
        let status = send_raw(&channel, just_over.encode_to_vec()).await;
        assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
        assert!(status.message().contains("over the limit"), "{status:?}");

        // Far over: refused while decoding, before the message is read whole.
        let far_over = proto::DeliverRequest {
            topic: "t".into(),
            body: vec![b'x'; LIMIT + 200 * 1024].into(),
            ..Default::default()
        };
        let status = send_raw(&channel, far_over.encode_to_vec()).await;
        assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");

        // The publisher refuses it before sending, with a typed error.
        let error = transport
            .publish("t", RawMessage::new(vec![b'x'; LIMIT + 1]))
            .await
            .unwrap_err();
        assert_eq!(error.kind(), ErrorKind::Encode, "{error}");
        still_delivers(&transport).await;
    }

    #[tokio::test]
    async fn clients_see_typed_errors_through_the_tower_adapter() {
        let (_transport, channel) = served().await;
        let client = proto::push_client::PushClient::new(channel);
        let mut deliver = unary(
            client,
            |mut client, request: proto::DeliverRequest| async move { client.deliver(request).await },
        );
        let bad_topic = proto::DeliverRequest {
            topic: "no spaces allowed".into(),
            ..Default::default()
        };
        let error = deliver
            .ready()
            .await
            .unwrap()
            .call(bad_topic)
            .await
            .unwrap_err();
        assert_eq!(error.kind(), ErrorKind::Rejected, "{error}");
        assert!(!error.is_retryable());
        assert!(
            error
                .message()
                .starts_with("gRPC INVALID_ARGUMENT: invalid topic name"),
            "{error}"
        );

        let nobody = proto::DeliverRequest {
            topic: "nobody.listens".into(),
            ..Default::default()
        };
        let error = deliver
            .ready()
            .await
            .unwrap()
            .call(nobody)
            .await
            .unwrap_err();
        assert_eq!(error.kind(), ErrorKind::Unavailable, "{error}");
        assert!(error.is_retryable());
    }

    #[tokio::test]
    async fn a_nack_reaches_the_publisher_as_a_retry_and_its_delay_is_kept() {
        // Waited for up to max_backoff_ms (100): a 50 ms nack in full, a
        // day's nack for 100 ms.
        for (nack, waited_at_least, waited_less_than) in [
            (Duration::from_millis(50), Duration::from_millis(50), None),
            (
                Duration::from_secs(86_400),
                Duration::from_millis(100),
                Some(Duration::from_secs(60)),
            ),
        ] {
            let (transport, _channel) = served_with_max_backoff(100).await;
            let mut subscription = transport
                .subscribe("nacked", SubscribeOptions::new("g"))
                .await
                .unwrap();
            let publisher = transport.clone();
            let publishing = tokio::spawn(async move {
                let started = tokio::time::Instant::now();
                let result = publisher.publish("nacked", RawMessage::new("x")).await;
                (result, started.elapsed())
            });
            let first = subscription.recv().await.unwrap();
            assert_eq!(first.attempt(), 1);
            first.nack(nack).await.unwrap();
            let second = subscription.recv().await.unwrap();
            assert_eq!(second.attempt(), 2, "the publisher sent it again");
            second.nack(Duration::ZERO).await.unwrap();
            // max_attempts is 2: the publisher gives up with a retryable error.
            let (result, elapsed) = publishing.await.unwrap();
            let error = result.unwrap_err();
            assert_eq!(error.kind(), ErrorKind::Unavailable, "{error}");
            assert!(error.message().contains("nacked"), "{error}");
            assert!(
                elapsed >= waited_at_least,
                "waited out the nack of {nack:?}: {elapsed:?}"
            );
            if let Some(bound) = waited_less_than {
                assert!(elapsed < bound, "obeyed a {nack:?} nack: {elapsed:?}");
            }
        }
    }

    #[tokio::test]
    async fn a_delivery_dropped_unsettled_is_sent_again() {
        let (transport, _channel) = served().await;
        let mut subscription = transport
            .subscribe("dropped", SubscribeOptions::new("g"))
            .await
            .unwrap();
        let publisher = transport.clone();
        let publishing =
            tokio::spawn(async move { publisher.publish("dropped", RawMessage::new("x")).await });
        drop(subscription.recv().await.unwrap());
        let again = subscription.recv().await.unwrap();
        assert_eq!(again.attempt(), 2);
        again.ack().await.unwrap();
        publishing
            .await
            .unwrap()
            .expect("acked on the second attempt");
    }

    #[tokio::test]
    async fn each_routed_group_gets_the_message_once_and_others_none() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let routes = PushRoutes::new()
            .route("routed", PushEndpoint::new(&url).for_group("a"))
            .route("routed", PushEndpoint::new(&url).for_group("b"));
        let transport = GrpcTransport::new(PushConfig::new(routes)).unwrap();
        tokio::spawn(transport.serve(listener));
        let mut subscriptions = Vec::new();
        for group in ["a", "b", "c"] {
            let subscription = transport
                .subscribe("routed", SubscribeOptions::new(group))
                .await
                .unwrap();
            subscriptions.push(subscription);
        }
        let publisher = transport.clone();
        let publishing =
            tokio::spawn(async move { publisher.publish("routed", RawMessage::new("x")).await });
        for subscription in &mut subscriptions[..2] {
            let delivery = subscription.recv().await.unwrap();
            assert_eq!(delivery.group(), subscription.group());
            delivery.ack().await.unwrap();
        }
        publishing.await.unwrap().expect("both routed groups acked");
        for subscription in &mut subscriptions {
            // Publish returned only after every routed group acked, so
            // anything else would already be waiting here.
            assert!(
                subscription.recv().now_or_never().is_none(),
                "group {} got a second or unrouted copy",
                subscription.group()
            );
        }
    }

    #[tokio::test]
    async fn a_receiver_that_is_down_is_a_retryable_connection_error() {
        let closed = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", closed.local_addr().unwrap());
        drop(closed);
        let config = PushConfig::new(PushRoutes::new().default_route(PushEndpoint::new(url)))
            .with_retry(
                switchboard::config::RetryConfig::default()
                    .with_max_attempts(2)
                    .with_backoff_ms(1)
                    .with_backoff_multiplier(1.0)
                    .with_max_backoff_ms(1),
            );
        let transport = GrpcTransport::new(config).unwrap();
        let error = transport
            .publish("t", RawMessage::new("x"))
            .await
            .unwrap_err();
        assert_eq!(error.kind(), ErrorKind::Connection, "{error}");
        assert!(error.is_retryable());
    }

    #[tokio::test]
    async fn serving_on_a_taken_address_is_a_connection_error() {
        let taken = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let transport = GrpcTransport::new(PushConfig::default()).unwrap();
        let error = transport
            .serve_on(taken.local_addr().unwrap())
            .await
            .unwrap_err();
        assert_eq!(error.kind(), ErrorKind::Connection, "{error}");
    }

    async fn still_delivers(transport: &GrpcTransport) {
        let mut subscription = transport
            .subscribe("after-bad-input", SubscribeOptions::new("g"))
            .await
            .unwrap();
        let publisher = transport.clone();
        let publishing = tokio::spawn(async move {
            publisher
                .publish("after-bad-input", RawMessage::new("fine"))
                .await
        });
        let delivery = subscription.recv().await.unwrap();
        assert_eq!(delivery.body().as_ref(), b"fine");
        delivery.ack().await.unwrap();
        publishing
            .await
            .unwrap()
            .expect("published after bad input");
    }
}

// ------------------------------------------- a full queue pushes back

#[path = "grpc/wire.rs"]
mod wire;

#[path = "common/refusals.rs"]
mod refusals;

mod full_queue {
    use std::collections::BTreeMap;
    use std::sync::Arc;
    use std::time::Duration;

    use switchboard::transport::grpc::{GrpcTransport, RETRY_PUSHBACK_MS, proto};
    use switchboard::transport::push::{PushConfig, PushEndpoint, PushRoutes};
    use switchboard::{Publisher, RawMessage, SubscribeOptions, Subscriber};
    use tokio::sync::{Semaphore, mpsc};
    use tokio::task::JoinSet;
    use tonic::Code;
    use tonic::transport::Endpoint;

    use super::refusals::Refusals;

    const TOPIC: &str = "busy";
    const CAPACITY: usize = 2;

    #[tokio::test]
    async fn a_full_queue_is_refused_at_once_and_the_publisher_loses_nothing() {
        let refusals = Refusals::new("grpc", TOPIC);
        let _recorder = metrics::set_default_local_recorder(&refusals);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let config = PushConfig::new(PushRoutes::new().default_route(PushEndpoint::new(&url)))
            .with_queue_capacity(CAPACITY)
            .with_timeout(Duration::from_secs(10))
            .with_retry(
                switchboard::config::RetryConfig::default()
                    .with_max_attempts(2)
                    .with_backoff_ms(1)
                    .with_backoff_multiplier(1.0)
                    .with_max_backoff_ms(1),
            );
        let transport = GrpcTransport::new(config).unwrap();
        tokio::spawn(transport.serve(listener));

        // The handler takes one message at a time and holds each until the
        // gate opens; what it settles is reported on `handled`.
        let mut subscription = transport
            .subscribe(TOPIC, SubscribeOptions::new("g"))
            .await
            .unwrap();
        let gate = Arc::new(Semaphore::new(0));
        let (taken, mut took) = mpsc::unbounded_channel();
        let (handled, mut settled) = mpsc::unbounded_channel();
        let handler = tokio::spawn({
            let gate = gate.clone();
            async move {
                while let Some(delivery) = subscription.recv().await {
                    let _ = taken.send(());
                    drop(gate.acquire().await.unwrap());
                    let body = String::from_utf8(delivery.body().to_vec()).unwrap();
                    let _ = handled.send((body, delivery.attempt()));
                    delivery.ack().await.unwrap();
                }
            }
        });
        let publish = |body: String| {
            let publisher = transport.clone();
            tokio::spawn(async move { publisher.publish(TOPIC, RawMessage::new(body)).await })
        };

        // The first message is at the handler, which holds it.
        let mut publishing = vec![publish("published-0".into())];
        took.recv().await.unwrap();

        // Two more than the queue holds, at once: two wait in the queue and
        // two are refused straight away, with a retry hint.
        let client =
            proto::push_client::PushClient::new(Endpoint::from_shared(url).unwrap().connect_lazy());
        let mut raw = JoinSet::new();
        for n in 0..CAPACITY + 2 {
            let mut client = client.clone();
            raw.spawn(async move {
                let request = proto::DeliverRequest {
                    topic: TOPIC.into(),
                    body: format!("raw-{n}").into(),
                    attempt: 1,
                    ..Default::default()
                };
                client.deliver(request).await
            });
        }
        for _ in 0..2 {
            let status = raw.join_next().await.unwrap().unwrap().unwrap_err();
            assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
            assert_eq!(status.metadata().get(RETRY_PUSHBACK_MS).unwrap(), "100");
            assert!(status.message().contains("waiting"), "{status:?}");
        }
        assert_eq!(refusals.count(), 2);

        // The queue stays full while the handler holds its message: the
        // publisher's pushes are refused too, and it keeps trying.
        publishing.extend((1..5).map(|n| publish(format!("published-{n}"))));
        refusals.wait_for(2 + 4).await;
        assert_eq!(raw.len(), CAPACITY, "the queued requests still wait");

        // Once the handler goes on, everything arrives: the queued requests
        // and every published message, each once and as its first attempt.
        gate.add_permits(1);
        for publishing in publishing {
            publishing
                .await
                .unwrap()
                .expect("published despite the refusals");
        }
        while let Some(answer) = raw.join_next().await {
            answer.unwrap().expect("a queued request is handled");
        }
        let mut seen = BTreeMap::new();
        for _ in 0..5 + CAPACITY {
            let (body, attempt) = settled.recv().await.unwrap();
            assert_eq!(attempt, 1, "{body}: a refusal is not an attempt");
            *seen.entry(body).or_insert(0) += 1;
        }
        for n in 0..5 {
            assert_eq!(seen.get(&format!("published-{n}")), Some(&1), "{seen:?}");
        }
        assert!(settled.try_recv().is_err(), "nothing twice: {seen:?}");
        handler.abort();
    }
}

#[path = "common/push_connect.rs"]
mod push_connect;

#[tokio::test]
async fn a_silent_receiver_fails_within_the_connect_timeout() {
    push_connect::a_silent_receiver_fails_within_the_connect_timeout(|config| {
        Arc::new(GrpcTransport::new(config).unwrap())
    })
    .await;
}
