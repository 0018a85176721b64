//! A push transport's connect timeout: a receiver whose address never
//! completes a TCP handshake fails the publish with a retryable error once
//! `connect_timeout` passes, long before the per-attempt timeout (30 s).
//! Included by `tests/grpc.rs` and `tests/http.rs`.

use std::sync::Arc;
use std::time::Duration;

use switchboard::config::RetryConfig;
use switchboard::transport::push::{PushConfig, PushEndpoint, PushRoutes};
use switchboard::{RawMessage, Transport};

#[path = "unanswered.rs"]
mod unanswered;

pub async fn a_silent_receiver_fails_within_the_connect_timeout(
    make: impl FnOnce(PushConfig) -> Arc<dyn Transport>,
) {
    let silent = unanswered::Unanswered::new().await;
    let url = format!("http://{}", silent.addr);
    let config = PushConfig::new(PushRoutes::new().default_route(PushEndpoint::new(url)))
        .with_connect_timeout(Duration::from_millis(300))
        .with_retry(RetryConfig::default().with_max_attempts(1));
    assert_eq!(config.timeout(), Duration::from_secs(30));
    let transport = make(config);
    let publishing = transport.publish("t", RawMessage::new("x"));
    // Below the attempt timeout: only the connect timeout can end it.
    let error = tokio::time::timeout(Duration::from_secs(20), publishing)
        .await
        .expect("the connect timeout ends the attempt")
        .unwrap_err();
    assert!(error.is_retryable(), "{error:?}");
}
