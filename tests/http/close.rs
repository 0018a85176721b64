//! Closing a push transport stops its server and its subscriptions.

use std::time::Duration;

use switchboard::transport::http::HttpTransport;
use switchboard::transport::push::PushConfig;
use switchboard::{
    ErrorKind, HealthState, Publisher, RawMessage, SubscribeOptions, Subscriber, Transport,
};

#[tokio::test]
async fn close_stops_the_server_and_ends_the_subscriptions() {
    let transport = HttpTransport::new(PushConfig::default()).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let serving = tokio::spawn(transport.serve(listener));
    let mut subscription = transport
        .subscribe("price.updated", SubscribeOptions::new("game"))
        .await
        .unwrap();
    assert!(transport.health().is_up());

    let consumer = tokio::spawn(async move {
        while subscription.recv().await.is_some() {}
        subscription.shutdown().await
    });
    transport.close().await.unwrap();
    consumer.await.unwrap().unwrap();
    // A guard against a hang: the server stops by itself once closed.
    let served = tokio::time::timeout(Duration::from_secs(30), serving)
        .await
        .expect("the server stops on close");
    served.unwrap().unwrap();

    assert_eq!(transport.health().state, HealthState::Closed);
    let refused = transport
        .publish("price.updated", RawMessage::new("x"))
        .await
        .unwrap_err();
    assert_eq!(refused.kind(), ErrorKind::Closed);
    transport.close().await.expect("idempotent");
}
