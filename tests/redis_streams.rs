//! The Redis Streams transport passes the whole conformance suite against
//! the machine's Redis (127.0.0.1:6379, or `SWITCHBOARD_REDIS_URL`). Every
//! case uses random topic names, and each transport a random key prefix and
//! consumer name, so cases run in parallel and reruns see no stale data.

use std::sync::Arc;
use std::time::Duration;

use switchboard::Transport;
use switchboard::transport::redis_streams::{RedisStreamsConfig, RedisStreamsTransport};

fn redis_url() -> String {
    std::env::var("SWITCHBOARD_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned())
}

async fn transport() -> Arc<dyn Transport> {
    let config = RedisStreamsConfig::default()
        .with_key_prefix(format!("sb-test-{}:", uuid::Uuid::new_v4().simple()))
        // Short, so the redelivery cases do not wait the default 30 s.
        .with_claim_idle(Duration::from_millis(500))
        .with_block(Duration::from_secs(1));
    let transport = RedisStreamsTransport::connect_with(&redis_url(), config)
        .await
        .unwrap_or_else(|error| panic!("connect to Redis at {}: {error}", redis_url()));
    Arc::new(transport)
}

switchboard::conformance_tests!(transport);
