//! The webhook push fixture of `tests/fixtures/wire/v1`: the request sent
//! raw is read by the receiver, and today's publisher still sends it.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use axum::routing::post;
use serde_json::Value as Json;
use switchboard::config::RetryConfig;
use switchboard::transport::http::HttpTransport;
use switchboard::transport::push::{PushConfig, PushEndpoint, PushRoutes};
use switchboard::{Publisher, SubscribeOptions, Subscriber};
use tokio::sync::mpsc;

#[path = "../common/wire.rs"]
mod fixture;
use fixture::{GROUP, TOPIC, fixture_message};

const REQUEST: &str = include_str!("../fixtures/wire/v1/http_push_request.json");

async fn listener() -> (tokio::net::TcpListener, String) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("a free local port");
    let url = format!("http://{}", listener.local_addr().expect("local address"));
    (listener, url)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_v1_push_request_sent_raw_is_read_by_the_receiver() {
    let fixture: Json = serde_json::from_str(REQUEST).expect("JSON");
    let (listener, url) = listener().await;
    let transport =
        HttpTransport::new(PushConfig::new(PushRoutes::new())).expect("an HTTP transport");
    tokio::spawn(transport.serve(listener));
    let mut subscription = transport
        .subscribe(TOPIC, SubscribeOptions::new(GROUP))
        .await
        .expect("subscribe");

    let mut request = reqwest::Client::new().post(format!(
        "{url}{}",
        fixture["path"].as_str().expect("a path")
    ));
    for (name, value) in fixture["headers"].as_object().expect("headers") {
        request = request.header(name, value.as_str().expect("a string"));
    }
    let sent = tokio::spawn(
        request
            .body(fixture["body"].as_str().expect("a body").to_owned())
            .send(),
    );
    let delivery = tokio::time::timeout(std::time::Duration::from_secs(20), subscription.recv())
        .await
        .expect("delivered in time")
        .expect("a delivery");
    assert_eq!(delivery.message(), &fixture_message());
    assert_eq!(delivery.attempt(), 2);
    delivery.ack().await.expect("ack");
    let response = sent.await.expect("the request task").expect("a response");
    assert_eq!(response.status(), StatusCode::NO_CONTENT);
}

type Seen = mpsc::UnboundedSender<(String, HeaderMap, Bytes)>;

/// Refuses the first attempt (so the second carries attempt 2, as the
/// fixture does), accepts the others; tells the test what it got.
async fn capture(
    State((seen, calls)): State<(Seen, Arc<std::sync::atomic::AtomicUsize>)>,
    Path(topic): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> impl IntoResponse {
    seen.send((format!("/events/{topic}"), headers, body)).ok();
    if calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst) == 0 {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            [("retry-after", "0"), ("switchboard-retry-after-ms", "1")],
        )
            .into_response()
    } else {
        StatusCode::NO_CONTENT.into_response()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn todays_publisher_still_sends_the_v1_push_request() {
    let fixture: Json = serde_json::from_str(REQUEST).expect("JSON");
    let (listener, url) = listener().await;
    let (seen, mut got) = mpsc::unbounded_channel();
    let router = axum::Router::new()
        .route("/events/{topic}", post(capture))
        .with_state((seen, Arc::new(std::sync::atomic::AtomicUsize::new(0))));
    tokio::spawn(async move { axum::serve(listener, router).await });
    let routes = PushRoutes::new().route(TOPIC, PushEndpoint::new(url).for_group(GROUP));
    let config = PushConfig::new(routes).with_retry(
        RetryConfig::default()
            .with_max_attempts(2)
            .with_backoff_ms(1)
            .with_backoff_multiplier(1.0)
            .with_max_backoff_ms(1),
    );
    let transport = HttpTransport::new(config).expect("an HTTP transport");
    transport
        .publish(TOPIC, fixture_message())
        .await
        .expect("publish");

    let (_, first, _) = got.recv().await.expect("the first attempt");
    assert_eq!(first["switchboard-attempt"], "1");
    let (path, headers, body) = got.recv().await.expect("the second attempt");
    assert_eq!(path, fixture["path"]);
    assert_eq!(
        body.as_ref(),
        fixture["body"].as_str().expect("a body").as_bytes()
    );
    let wanted = fixture["headers"].as_object().expect("headers");
    for (name, value) in wanted {
        assert_eq!(
            headers
                .get(name.as_str())
                .map(|value| value.to_str().expect("ASCII")),
            value.as_str(),
            "today's writer changed the v1 header {name}"
        );
    }
    let extra: Vec<&str> = headers
        .keys()
        .map(|name| name.as_str())
        .filter(|name| name.starts_with("switchboard-") && !wanted.contains_key(*name))
        .collect();
    assert!(extra.is_empty(), "headers the v1 request lacks: {extra:?}");
}
