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
        .with_retry(RetryConfig {
            max_attempts: 5,
            backoff_ms: 5,
            backoff_multiplier: 2.0,
            max_backoff_ms: 100,
        });
    let transport = GrpcTransport::new(config).expect("a gRPC transport");
    tokio::spawn(transport.serve(listener));
    Arc::new(transport)
}

switchboard::conformance_tests!(wired_to_itself);
