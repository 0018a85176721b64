//! Connecting to a broker that is down fails by itself, retryably.

use std::time::Duration;

use switchboard::ErrorKind;
use switchboard::transport::amqp::{AmqpConfig, AmqpTransport};

#[tokio::test]
async fn connecting_to_a_broker_that_is_down_fails_retryably_within_the_connect_timeout() {
    let port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    };
    let config = AmqpConfig::new(format!("amqp://guest:guest@127.0.0.1:{port}/%2f"))
        .with_connect_timeout(Duration::from_millis(500));
    // A guard against a hang; the transport's own timeout is under test.
    let error = tokio::time::timeout(Duration::from_secs(30), AmqpTransport::connect(config))
        .await
        .expect("connect gives up by itself")
        .unwrap_err();
    assert!(error.is_retryable(), "{error}");
    assert!(
        matches!(error.kind(), ErrorKind::Connection | ErrorKind::Timeout),
        "{error}"
    );
}

#[test]
fn the_connect_timeout_is_five_seconds_unless_set() {
    assert_eq!(
        AmqpConfig::default().connect_timeout,
        Duration::from_secs(5)
    );
}
