//! Closing, connecting to a Redis that is down, and deleting a namespace.

use std::time::Duration;

use switchboard::transport::redis_streams::{RedisStreamsConfig, RedisStreamsTransport};
use switchboard::{ErrorKind, EventBus, RawMessage, Topology};

#[path = "../common/clean_exit.rs"]
mod harness;
#[path = "../common/unanswered.rs"]
mod unanswered;

#[test]
fn a_closed_transport_exits_without_an_error_in_any_log() {
    harness::assert_clean_exit(
        "lifecycle::a_closed_transport_exits_without_an_error_in_any_log",
        || async { harness::publish_consume_close(super::transport().await, 20).await },
    );
}

/// A port nothing listens on: bound, read, let go.
fn closed_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().port()
}

#[tokio::test]
async fn connecting_to_a_redis_that_is_down_fails_retryably_within_the_connect_timeout() {
    let url = format!("redis://127.0.0.1:{}", closed_port());
    let config = RedisStreamsConfig::default().with_connect_timeout(Duration::from_millis(500));
    let connecting = RedisStreamsTransport::connect_with(&url, config);
    // The bound is a guard against a hang; the transport's own timeout is
    // what the assertion is about.
    let error = tokio::time::timeout(Duration::from_secs(30), connecting)
        .await
        .expect("connect gives up by itself")
        .unwrap_err();
    assert_eq!(error.kind(), ErrorKind::Connection, "{error}");
    assert!(error.is_retryable());
}

#[tokio::test]
async fn connecting_to_a_redis_that_never_answers_fails_within_the_connect_timeout() {
    let silent = unanswered::Unanswered::new().await;
    let config = RedisStreamsConfig::default().with_connect_timeout(Duration::from_millis(300));
    let url = format!("redis://{}", silent.addr);
    let connecting = RedisStreamsTransport::connect_with(&url, config);
    let error = tokio::time::timeout(Duration::from_secs(20), connecting)
        .await
        .expect("connect gives up by itself")
        .unwrap_err();
    assert_eq!(error.kind(), ErrorKind::Connection, "{error}");
    assert!(error.message().contains("connect timeout"), "{error}");
}

#[test]
fn the_connect_timeout_is_five_seconds_unless_set() {
    assert_eq!(
        RedisStreamsConfig::default().connect_timeout,
        Duration::from_secs(5)
    );
}

#[tokio::test]
async fn a_zero_connect_timeout_is_refused() {
    let config = RedisStreamsConfig::default().with_connect_timeout(Duration::ZERO);
    let error = RedisStreamsTransport::connect_with(&super::redis_url(), config)
        .await
        .unwrap_err();
    assert_eq!(error.kind(), ErrorKind::Config);
}

#[tokio::test]
async fn purging_a_namespace_deletes_its_streams_and_dead_letters_only() {
    let transport = super::transport().await;
    let run = format!("run-{}", uuid::Uuid::new_v4().simple());
    let other = format!("{run}x");
    let bus = EventBus::new(transport.clone(), "tests").with_namespace(run.clone());
    bus.declare(
        &Topology::new()
            .with_groups("a", ["g"])
            .with_groups("b", ["g"]),
    )
    .await
    .unwrap();
    transport
        .publish(&format!("{other}.a"), RawMessage::new("kept"))
        .await
        .unwrap();
    // A dead letter under the namespace, as a consumer would leave it.
    transport
        .publish(&format!("{run}.a.dlq"), RawMessage::new("letter"))
        .await
        .unwrap();

    assert_eq!(bus.purge_namespace().await.unwrap(), 3);
    assert_eq!(bus.purge_namespace().await.unwrap(), 0, "nothing is left");
    // A namespace that only starts the same is not touched.
    assert_eq!(transport.purge_namespace(&other).await.unwrap(), 1);

    let unnamespaced = EventBus::new(transport, "tests");
    let error = unnamespaced.purge_namespace().await.unwrap_err();
    assert_eq!(error.kind(), ErrorKind::Config);
}

/// `health()` follows what the commands find: down (with the reason) once a
/// publish cannot reach Redis, up again once one gets through.
#[tokio::test]
async fn health_is_down_while_redis_cannot_be_reached_and_up_once_it_can() {
    use switchboard::testing::proxy::FaultProxy;
    use switchboard::{HealthState, Publisher, Transport};

    let target = super::redis_url()
        .trim_start_matches("redis://")
        .trim_end_matches('/')
        .parse()
        .unwrap();
    let proxy = FaultProxy::start(target).await.unwrap();
    let config = RedisStreamsConfig::default()
        .with_connect_timeout(Duration::from_millis(500))
        .with_response_timeout(Duration::from_millis(500));
    let transport =
        RedisStreamsTransport::connect_with(&format!("redis://{}", proxy.addr()), config)
            .await
            .unwrap();
    let topic = format!("health-{}", uuid::Uuid::new_v4().simple());
    transport
        .publish(&topic, RawMessage::new("a"))
        .await
        .unwrap();
    assert!(transport.health().is_up(), "{}", transport.health());

    proxy.cut();
    let failed = transport.publish(&topic, RawMessage::new("b")).await;
    assert!(failed.is_err(), "a publish through a cut proxy");
    let health = transport.health();
    assert!(matches!(health.state, HealthState::Down { .. }), "{health}");

    proxy.restore();
    // The connection comes back by itself; the first publish that gets
    // through says so. Bounded: a guard against a hang, not a speed target.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while transport
        .publish(&topic, RawMessage::new("c"))
        .await
        .is_err()
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "Redis never came back"
        );
        // A poll interval on Redis coming back, not a synchronisation.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(transport.health().is_up(), "{}", transport.health());
    transport.close().await.unwrap();
    assert_eq!(transport.health().state, HealthState::Closed);
}
