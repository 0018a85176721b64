//! Silence is checked: a subscription whose connection goes half-open (the
//! proxy keeps the socket open and forwards nothing, as a hung peer or a
//! dropped route would) notices through its pings and subscribes again on
//! a fresh connection once the path is back.

use std::time::{Duration, Instant};

use switchboard::testing::proxy::FaultProxy;
use switchboard::transport::redis_pubsub::{
    Channels, ConnectionState, RedisPubSubOptions, RedisPubSubTransport,
};
use switchboard::{Publisher, RawMessage, SubscribeOptions};

use super::{PATIENCE, URL, ack, recv, unique};

const PING_INTERVAL: Duration = Duration::from_millis(200);
const PING_TIMEOUT: Duration = Duration::from_millis(300);

#[tokio::test]
async fn a_half_open_subscription_is_noticed_by_its_pings_and_replaced() {
    let proxy = FaultProxy::start("127.0.0.1:6379".parse().unwrap())
        .await
        .expect("start the proxy");
    let options = RedisPubSubOptions::default()
        .with_ping(PING_INTERVAL, PING_TIMEOUT)
        .with_response_timeout(Duration::from_millis(500))
        .with_connection_timeout(Duration::from_millis(500))
        .with_reconnect_delays(Duration::from_millis(10), Duration::from_millis(100));
    let through_proxy =
        RedisPubSubTransport::connect_with(&format!("redis://{}", proxy.addr()), options)
            .await
            .expect("connect through the proxy");
    // Publishing goes straight to Redis: only the subscription is stalled.
    let publisher = RedisPubSubTransport::connect(URL)
        .await
        .expect("Redis on 127.0.0.1:6379");
    let topic = unique("stall");
    let (mut subscription, mut status) = through_proxy
        .subscribe_to(Channels::Topic(topic.clone()), SubscribeOptions::new("g"))
        .await
        .expect("subscribe");
    publisher
        .publish(&topic, RawMessage::new("before"))
        .await
        .expect("publish");
    ack(recv(&mut subscription, "before the stall").await).await;
    assert_eq!(
        status.current(),
        ConnectionState::Subscribed { connection: 1 }
    );

    proxy.stall();
    let stalled = Instant::now();
    tokio::time::timeout(
        PATIENCE,
        status.wait_for(|state| matches!(state, ConnectionState::Reconnecting { .. })),
    )
    .await
    .expect("the silent connection is noticed")
    .expect("the subscription is still open");
    let noticed = stalled.elapsed();

    proxy.restore();
    let state = tokio::time::timeout(
        PATIENCE,
        status.wait_for(|state| matches!(state, ConnectionState::Subscribed { .. })),
    )
    .await
    .expect("subscribed again once the path is back")
    .expect("the subscription is still open");
    assert!(
        matches!(state, ConnectionState::Subscribed { connection } if connection >= 2),
        "a fresh connection: {state:?}"
    );
    publisher
        .publish(&topic, RawMessage::new("after"))
        .await
        .expect("publish");
    let delivery = recv(&mut subscription, "after the stall").await;
    assert_eq!(delivery.body().as_ref(), b"after");
    ack(delivery).await;
    println!(
        "pubsub stall noticed in {} ms (ping every {} ms, answer within {} ms)",
        noticed.as_millis(),
        PING_INTERVAL.as_millis(),
        PING_TIMEOUT.as_millis()
    );
    subscription.shutdown().await.expect("shutdown");
}
