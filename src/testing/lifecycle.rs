//! The conformance case of [`Transport::close`]: what every transport
//! promises when it is closed (see `transport::lifecycle`).

use std::sync::Arc;

use super::conformance::{publish_in_background, recv_one, subscribe, test_message, unique};
use super::patience;
use crate::error::ErrorKind;
use crate::transport::{HealthState, SubscribeOptions, Transport};

/// `close` ends a subscription it handed out while that subscription is
/// held (its stream yields `None`, and `close` waits for its shutdown),
/// then refuses new work with a non-retryable [`ErrorKind::Closed`],
/// reports [`HealthState::Closed`], and is idempotent.
pub async fn close_ends_subscriptions_and_refuses_new_work(transport: Arc<dyn Transport>) {
    let topic = unique("close");
    let options = SubscribeOptions::new(unique("g"));
    let mut subscription = subscribe(&*transport, &topic, options.clone()).await;
    // In the background: a push publish returns once the receiver acked.
    let publishing = publish_in_background(&transport, &topic, 0..1);
    recv_one(&mut subscription, "before close")
        .await
        .ack()
        .await
        .expect("ack");
    publishing.await.expect("the publisher task");

    let closing = {
        let transport = transport.clone();
        tokio::spawn(async move { transport.close().await })
    };
    let ended = tokio::time::timeout(patience(), async {
        while let Some(delivery) = subscription.recv().await {
            delivery.ack().await.expect("ack while closing");
        }
    })
    .await;
    assert!(ended.is_ok(), "close did not end the subscription");
    subscription.shutdown().await.expect("shutdown once ended");
    closing
        .await
        .expect("the closing task")
        .expect("close once every subscription ended");

    assert_eq!(transport.health().state, HealthState::Closed);
    let refused = transport
        .publish(&topic, test_message(1))
        .await
        .expect_err("publish after close");
    assert_eq!(refused.kind(), ErrorKind::Closed, "{refused}");
    assert!(!refused.is_retryable());
    let refused = transport
        .subscribe(&topic, options)
        .await
        .expect_err("subscribe after close");
    assert_eq!(refused.kind(), ErrorKind::Closed, "{refused}");
    transport.close().await.expect("close is idempotent");
}
