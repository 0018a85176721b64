//! The webhook push transport passes the conformance suite (the factory
//! builds a transport whose publisher pushes every topic to its own receiver
//! on a free local port), and the JSON service and receiver refuse bad input
//! with typed errors.

use std::sync::Arc;

use switchboard::Transport;
use switchboard::config::RetryConfig;
use switchboard::transport::http::HttpTransport;
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
    let transport = HttpTransport::new(config).expect("an HTTP transport");
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

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use switchboard::transport::http::{GROUP, HEADERS, HttpTransport};
    use switchboard::transport::push::{PushConfig, PushEndpoint, PushRoutes};
    use switchboard::{ErrorKind, Publisher, RawMessage, SubscribeOptions, Subscriber};

    const LIMIT: usize = 1024;

    async fn served() -> (HttpTransport, String) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let config = PushConfig::new(PushRoutes::new().default_route(PushEndpoint::new(&url)))
            .with_max_body_bytes(LIMIT)
            .with_retry(
                switchboard::config::RetryConfig::default()
                    .with_max_attempts(2)
                    .with_backoff_ms(1)
                    .with_backoff_multiplier(1.0)
                    .with_max_backoff_ms(1),
            );
        let transport = HttpTransport::new(config).unwrap();
        tokio::spawn(transport.serve(listener));
        (transport, url)
    }

    async fn error_json(response: reqwest::Response) -> serde_json::Value {
        assert_eq!(
            response.headers()["content-type"],
            "application/json",
            "error bodies are JSON"
        );
        let body = response.bytes().await.unwrap();
        serde_json::from_slice(&body).unwrap()
    }

    #[tokio::test]
    async fn malformed_header_json_attempt_or_names_are_400_with_a_message() {
        let (transport, url) = served().await;
        let _subscription = transport
            .subscribe("t", SubscribeOptions::new("g"))
            .await
            .unwrap();
        let client = reqwest::Client::new();
        let cases = [
            (
                "/events/t",
                HEADERS,
                "{not json",
                "must be a JSON object of strings",
            ),
            (
                "/events/t",
                HEADERS,
                r#"{"a":1}"#,
                "must be a JSON object of strings",
            ),
            ("/events/t", "switchboard-attempt", "first", "whole number"),
            ("/events/t", GROUP, "no spaces", "invalid group name"),
            ("/events/bad%20topic", "x-unused", "", "invalid topic name"),
            ("/events/%FF", "x-unused", "", "bad topic in the path"),
        ];
        for (path, header, value, says) in cases {
            let response = client
                .post(format!("{url}{path}"))
                .header(header, value)
                .body("x")
                .send()
                .await
                .unwrap();
            assert_eq!(response.status(), 400, "{path} {header}: {value}");
            let body = error_json(response).await;
            assert_eq!(body["error"]["kind"], "rejected");
            let message = body["error"]["message"].as_str().unwrap();
            assert!(message.contains(says), "{message:?} should say {says:?}");
        }
        still_delivers(&transport).await;
    }

    #[tokio::test]
    async fn oversize_bodies_are_413_whether_declared_or_streamed() {
        let (transport, url) = served().await;
        let _subscription = transport
            .subscribe("t", SubscribeOptions::new("g"))
            .await
            .unwrap();
        let client = reqwest::Client::new();
        let declared = client
            .post(format!("{url}/events/t"))
            .body(vec![b'x'; LIMIT + 1])
            .send()
            .await
            .unwrap();
        assert_eq!(declared.status(), 413);
        let body = error_json(declared).await;
        assert!(
            body["error"]["message"]
                .as_str()
                .unwrap()
                .contains("over the limit")
        );

        // Chunked, with no Content-Length: found while reading.
        let address = url.trim_start_matches("http://");
        let mut stream = tokio::net::TcpStream::connect(address).await.unwrap();
        let chunk = "x".repeat(LIMIT / 2);
        let mut request = format!(
            "POST /events/t HTTP/1.1\r\nhost: {address}\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n"
        );
        for _ in 0..4 {
            request.push_str(&format!("{:x}\r\n{chunk}\r\n", chunk.len()));
        }
        request.push_str("0\r\n\r\n");
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut answer = Vec::new();
        stream.read_to_end(&mut answer).await.unwrap();
        let answer = String::from_utf8_lossy(&answer);
        assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");

        let error = transport
            .publish("t", RawMessage::new(vec![b'x'; LIMIT + 1]))
            .await
            .unwrap_err();
        assert_eq!(
            error.kind(),
            ErrorKind::Encode,
            "refused before sending: {error}"
        );
        still_delivers(&transport).await;
    }

    #[tokio::test]
    async fn a_nack_is_503_with_its_delay_and_the_publisher_retries() {
        let (transport, url) = served().await;
        let mut subscription = transport
            .subscribe("nacked", SubscribeOptions::new("g"))
            .await
            .unwrap();
        let raw = tokio::spawn(async move {
            reqwest::Client::new()
                .post(format!("{url}/events/nacked"))
                .body("x")
                .send()
                .await
                .unwrap()
        });
        let delivery = subscription.recv().await.unwrap();
        delivery.nack(Duration::from_millis(1500)).await.unwrap();
        let response = raw.await.unwrap();
        assert_eq!(response.status(), 503);
        assert_eq!(response.headers()["switchboard-retry-after-ms"], "1500");
        assert_eq!(response.headers()["retry-after"], "2");

        let publisher = transport.clone();
        let publishing =
            tokio::spawn(async move { publisher.publish("nacked", RawMessage::new("y")).await });
        let first = subscription.recv().await.unwrap();
        first.nack(Duration::ZERO).await.unwrap();
        let second = subscription.recv().await.unwrap();
        assert_eq!(second.attempt(), 2);
        second.ack().await.unwrap();
        publishing
            .await
            .unwrap()
            .expect("acked on the second attempt");
    }

    #[tokio::test]
    async fn no_subscriber_is_a_retryable_error_for_the_publisher() {
        let (transport, _url) = served().await;
        let error = transport
            .publish("nobody.listens", RawMessage::new("x"))
            .await
            .unwrap_err();
        assert_eq!(error.kind(), ErrorKind::Unavailable, "{error}");
        assert!(error.message().contains("no group subscribes"), "{error}");
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
        let transport = HttpTransport::new(config).unwrap();
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
        let transport = HttpTransport::new(PushConfig::default()).unwrap();
        let error = transport
            .serve_on(taken.local_addr().unwrap())
            .await
            .unwrap_err();
        assert_eq!(error.kind(), ErrorKind::Connection, "{error}");
    }

    async fn still_delivers(transport: &HttpTransport) {
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

// ------------------------------------------------------- the JSON service

mod json {
    use std::time::Duration;

    use axum::Extension;
    use axum::routing::post;
    use serde::{Deserialize, Serialize};
    use switchboard::transport::http::{ErrorResponse, JsonBody, JsonService, MaxBodyBytes};
    use switchboard::{Error, ErrorKind};
    use tower::{Service, ServiceExt};

    #[derive(Debug, Serialize, Deserialize)]
    struct Order {
        symbol: String,
        quantity: u32,
    }

    #[derive(Debug, Serialize, Deserialize, PartialEq)]
    struct Placed {
        id: u64,
    }

    /// A small order API: refuses quantity 0 (400), "LOCKED" (401), "SLOW"
    /// never answers in time, "DOWN" is 503.
    async fn api() -> String {
        let app = axum::Router::new()
            .route(
                "/orders",
                post(|JsonBody(order): JsonBody<Order>| async move {
                    match (order.symbol.as_str(), order.quantity) {
                        (_, 0) => Err(ErrorResponse::from(Error::permanent(
                            "quantity must be positive",
                        ))),
                        ("LOCKED", _) => {
                            Err(Error::new(ErrorKind::Unauthorized, "who are you").into())
                        }
                        ("DOWN", _) => Err(Error::transient("market closed").into()),
                        ("SLOW", _) => {
                            std::future::pending::<()>().await;
                            unreachable!()
                        }
                        _ => Ok(serde_json::to_string(&Placed { id: 7 }).unwrap()),
                    }
                }),
            )
            .route("/garbage", post(|| async { "this is not JSON" }))
            .layer(Extension(MaxBodyBytes(256)));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await });
        url
    }

    fn order(symbol: &str, quantity: u32) -> Order {
        Order {
            symbol: symbol.into(),
            quantity,
        }
    }

    #[tokio::test]
    async fn answers_and_refusals_come_back_typed() {
        let url = api().await;
        let client = reqwest::Client::new();
        let mut orders =
            JsonService::<Order, Placed>::post(client.clone(), format!("{url}/orders"))
                .with_timeout(Duration::from_millis(300));
        let mut call = async |order: Order| orders.ready().await.unwrap().call(order).await;

        assert_eq!(call(order("AAPL", 5)).await.unwrap(), Placed { id: 7 });

        let cases = [
            (
                order("AAPL", 0),
                ErrorKind::Rejected,
                "HTTP 400: quantity must be positive",
            ),
            (
                order("LOCKED", 1),
                ErrorKind::Unauthorized,
                "HTTP 401: who are you",
            ),
            (
                order("DOWN", 1),
                ErrorKind::Unavailable,
                "HTTP 503: market closed",
            ),
            (
                order(&"X".repeat(300), 1),
                ErrorKind::Rejected,
                "HTTP 413: the request body is over the limit of 256 bytes",
            ),
        ];
        for (request, kind, message) in cases {
            let error = call(request).await.unwrap_err();
            assert_eq!((error.kind(), error.message()), (kind, message));
        }
        let error = call(order("SLOW", 1)).await.unwrap_err();
        assert_eq!(error.kind(), ErrorKind::Timeout, "{error}");
        assert!(error.is_retryable());

        let mut garbage = JsonService::<Order, Placed>::post(client, format!("{url}/garbage"));
        let error = garbage
            .ready()
            .await
            .unwrap()
            .call(order("AAPL", 1))
            .await
            .unwrap_err();
        assert_eq!(error.kind(), ErrorKind::Decode, "{error}");
        assert!(!error.is_retryable());
    }

    #[tokio::test]
    async fn malformed_json_is_400_naming_what_is_wrong() {
        let url = api().await;
        let client = reqwest::Client::new();
        let cases = [
            ("{ not json", "the request body is not the expected JSON"),
            (r#"{"symbol":"AAPL","quantity":"five"}"#, "quantity"),
            (r#"{"symbol":"AAPL"}"#, "missing field `quantity`"),
        ];
        for (body, says) in cases {
            let response = client
                .post(format!("{url}/orders"))
                .header("content-type", "application/json")
                .body(body)
                .send()
                .await
                .unwrap();
            assert_eq!(response.status(), 400, "{body}");
            let json: serde_json::Value =
                serde_json::from_slice(&response.bytes().await.unwrap()).unwrap();
            assert_eq!(json["error"]["kind"], "rejected");
            let message = json["error"]["message"].as_str().unwrap();
            assert!(message.contains(says), "{message:?} should say {says:?}");
        }
    }
}

#[path = "http/json_client.rs"]
mod json_client;

// ------------------------------------------- a full queue pushes back

#[path = "common/refusals.rs"]
mod refusals;

mod full_queue {
    use std::collections::BTreeMap;
    use std::sync::Arc;
    use std::time::Duration;

    use switchboard::transport::http::{HttpTransport, REFUSED, REFUSED_QUEUE_FULL};
    use switchboard::transport::push::{PushConfig, PushEndpoint, PushRoutes};
    use switchboard::{Publisher, RawMessage, SubscribeOptions, Subscriber};
    use tokio::sync::{Semaphore, mpsc};
    use tokio::task::JoinSet;

    use super::refusals::Refusals;

    const TOPIC: &str = "busy";
    const CAPACITY: usize = 2;

    #[tokio::test]
    async fn a_full_queue_is_503_at_once_and_the_publisher_loses_nothing() {
        let refusals = Refusals::new("http", TOPIC);
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
        let transport = HttpTransport::new(config).unwrap();
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
        // two are refused straight away with 503 and a retry hint.
        let client = reqwest::Client::new();
        let mut raw = JoinSet::new();
        for n in 0..CAPACITY + 2 {
            let request = client
                .post(format!("{url}/events/{TOPIC}"))
                .body(format!("raw-{n}"));
            raw.spawn(async move { request.send().await.unwrap() });
        }
        for _ in 0..2 {
            let response = raw.join_next().await.unwrap().unwrap();
            assert_eq!(response.status(), 503);
            assert_eq!(response.headers()["retry-after"], "1");
            assert_eq!(response.headers()["switchboard-retry-after-ms"], "100");
            assert_eq!(response.headers()[REFUSED], REFUSED_QUEUE_FULL);
            let body: serde_json::Value = response.json().await.unwrap();
            assert_eq!(body["error"]["kind"], "unavailable");
            let message = body["error"]["message"].as_str().unwrap();
            assert!(message.contains("waiting"), "{message}");
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
            assert_eq!(answer.unwrap().status(), 204, "a queued request is handled");
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

#[path = "http/wire.rs"]
mod wire;

#[path = "http/close.rs"]
mod close;

#[path = "http/dead_letter_webhook.rs"]
mod dead_letter_webhook;

#[path = "common/push_connect.rs"]
mod push_connect;

#[tokio::test]
async fn a_silent_receiver_fails_within_the_connect_timeout() {
    push_connect::a_silent_receiver_fails_within_the_connect_timeout(|config| {
        Arc::new(HttpTransport::new(config).unwrap())
    })
    .await;
}

#[path = "http/authenticated.rs"]
mod authenticated;
