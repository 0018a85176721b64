//! Flow control and leases on Redis Streams: what `XPENDING` shows while a
//! dependency is down, a slow handler's entry kept from other members, and
//! a stalled owner that lost its entry unable to settle it from under the
//! new owner.

use std::sync::Arc;
use std::time::Duration;

use redis::streams::StreamPendingCountReply;
use switchboard::testing::flow::{STORM_SLACK, Storm, requeue_storm};
use switchboard::testing::proxy::FaultProxy;
use switchboard::transport::redis_streams::{RedisStreamsConfig, RedisStreamsTransport};
use switchboard::{
    ErrorKind, Publisher, RawMessage, SubscribeOptions, Subscriber, Topology, Transport,
};

use super::redis_specific::{raw, recv};
use super::redis_url;

fn unique(label: &str) -> String {
    format!("rs-flow-{label}-{}", uuid::Uuid::new_v4().simple())
}

fn config(prefix: &str) -> RedisStreamsConfig {
    RedisStreamsConfig::default()
        .with_key_prefix(prefix)
        .with_block(Duration::from_millis(500))
}

async fn connect_to(url: &str, config: RedisStreamsConfig) -> RedisStreamsTransport {
    RedisStreamsTransport::connect_with(url, config)
        .await
        .unwrap_or_else(|error| panic!("connect to Redis at {url}: {error}"))
}

/// Each pending entry of `group` with its owner.
async fn pending(stream: &str, group: &str) -> Vec<(String, String)> {
    let reply: StreamPendingCountReply = redis::cmd("XPENDING")
        .arg(stream)
        .arg(group)
        .arg("-")
        .arg("+")
        .arg(10_000)
        .query_async(&mut raw().await)
        .await
        .expect("XPENDING");
    reply
        .ids
        .into_iter()
        .map(|entry| (entry.id, entry.consumer))
        .collect()
}

/// The conformance storm with `XPENDING` for the group sampled beside it:
/// while the handler refuses, Redis holds no more pending entries for the
/// group than the prefetch (plus the slack), not the backlog.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_requeue_storm_keeps_xpending_at_the_prefetch() {
    let prefix = format!("sb-test-{}:", uuid::Uuid::new_v4().simple());
    let transport = connect_to(&redis_url(), config(&prefix)).await;
    let keys = transport.clone();
    let storm = Storm::conformance();
    let prefetch = storm.prefetch;
    let report = requeue_storm(Arc::new(transport), storm, move |topic, group| {
        let stream = keys.stream_key(&topic);
        async move { pending(&stream, &group).await.len() }
    })
    .await;
    eprintln!("requeue storm on redis-streams with XPENDING sampled: {report:?}");
    assert!(
        report.probe_max <= prefetch + STORM_SLACK,
        "XPENDING reached {} with prefetch {prefetch}: {report:?}",
        report.probe_max,
    );
    assert!(
        report.touched_while_refusing <= prefetch + STORM_SLACK,
        "{report:?}"
    );
    assert_eq!(report.handled_twice, 0, "{report:?}");
}

/// A handler that takes three times `claim_idle`: its subscription renews
/// the lease, so another member of the group, claiming idle entries all
/// the while, never receives the entry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_handler_keeps_its_entry_from_other_members() {
    let prefix = format!("sb-test-{}:", uuid::Uuid::new_v4().simple());
    let claim_idle = Duration::from_millis(300);
    let slow_name = unique("slow");
    let slow = connect_to(
        &redis_url(),
        config(&prefix)
            .with_claim_idle(claim_idle)
            .with_consumer_name(slow_name.clone()),
    )
    .await;
    let other = connect_to(&redis_url(), config(&prefix).with_claim_idle(claim_idle)).await;
    let (topic, group) = (unique("lease"), unique("g"));
    slow.declare(&Topology::new().with_groups(topic.clone(), [group.clone()]))
        .await
        .expect("declare");
    let mut holder = slow
        .subscribe(&topic, SubscribeOptions::new(group.clone()))
        .await
        .expect("subscribe the slow member");
    slow.publish(&topic, RawMessage::new("slow work"))
        .await
        .expect("publish");
    let delivery = recv(&mut holder).await;
    let mut rival = other
        .subscribe(&topic, SubscribeOptions::new(group.clone()))
        .await
        .expect("subscribe the other member");

    // The handler's own work: three times claim_idle.
    let stolen = tokio::time::timeout(3 * claim_idle, rival.recv()).await;
    assert!(
        stolen.is_err(),
        "another member received an entry whose handler was still running"
    );
    let owners = pending(&slow.stream_key(&topic), &group).await;
    assert_eq!(owners.len(), 1, "{owners:?}");
    assert_eq!(
        owners[0].1,
        format!("{slow_name}-1"),
        "still the slow member's"
    );
    delivery.ack().await.expect("ack");
    assert!(pending(&slow.stream_key(&topic), &group).await.is_empty());
    holder.shutdown().await.expect("shutdown");
    rival.shutdown().await.expect("shutdown");
}

/// The lease race: owner A stalls (its connection passes no byte) past
/// `claim_idle` mid-handler, B takes the entry over; once A is released,
/// `XPENDING` still names B, and A's late ack fails without removing B's
/// entry — B's outcome is the one that counts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_owner_cannot_settle_an_entry_taken_over() {
    let prefix = format!("sb-test-{}:", uuid::Uuid::new_v4().simple());
    let claim_idle = Duration::from_millis(400);
    let target = redis_url()
        .trim_start_matches("redis://")
        .trim_end_matches('/')
        .parse()
        .expect("SWITCHBOARD_REDIS_URL as redis://host:port");
    let proxy = FaultProxy::start(target).await.expect("proxy");
    let (a_name, b_name) = (unique("a"), unique("b"));
    let a = connect_to(
        &format!("redis://{}", proxy.addr()),
        config(&prefix)
            .with_claim_idle(claim_idle)
            .with_consumer_name(a_name.clone())
            .with_response_timeout(Duration::from_millis(500)),
    )
    .await;
    let b = connect_to(
        &redis_url(),
        config(&prefix)
            .with_claim_idle(claim_idle)
            .with_consumer_name(b_name.clone()),
    )
    .await;
    let (topic, group) = (unique("race"), unique("g"));
    b.declare(&Topology::new().with_groups(topic.clone(), [group.clone()]))
        .await
        .expect("declare");
    let mut a_sub = a
        .subscribe(&topic, SubscribeOptions::new(group.clone()))
        .await
        .expect("subscribe A");
    b.publish(&topic, RawMessage::new("contested"))
        .await
        .expect("publish");
    let a_delivery = recv(&mut a_sub).await;

    proxy.stall();
    let mut b_sub = b
        .subscribe(&topic, SubscribeOptions::new(group.clone()))
        .await
        .expect("subscribe B");
    let b_delivery = recv(&mut b_sub).await;
    assert_eq!(b_delivery.body().as_ref(), b"contested");
    assert_eq!(
        b_delivery.delivery_count(),
        2,
        "A's delivery ended without an outcome"
    );
    proxy.restore();

    let stream = b.stream_key(&topic);
    let (error, _a_delivery) = a_delivery
        .ack()
        .await
        .expect_err("A's late ack of an entry B holds must fail")
        .into_parts();
    assert_eq!(error.kind(), ErrorKind::Rejected, "{error}");
    // A's lease renewals after the stall must not take it back either.
    tokio::time::sleep(2 * claim_idle).await;
    let owners = pending(&stream, &group).await;
    assert_eq!(
        owners,
        vec![(owners[0].0.clone(), format!("{b_name}-1"))],
        "B owns the entry"
    );
    b_delivery.ack().await.expect("B's ack");
    assert!(pending(&stream, &group).await.is_empty());
    a_sub.shutdown().await.expect("shutdown A");
    b_sub.shutdown().await.expect("shutdown B");
}
