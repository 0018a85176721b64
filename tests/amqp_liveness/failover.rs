//! Failover between nodes without a cluster: two `FaultProxy`s in front of
//! the shared broker stand for two nodes. Cutting the one in use moves both
//! connections to the other; publishing goes on, the consumer resumes on
//! its queue there, and `health` names the second node.

use std::collections::BTreeSet;
use std::time::Duration;

use switchboard::testing::proxy::FaultProxy;
use switchboard::transport::amqp::{AmqpConfig, AmqpTransport, ConnectionState};
use switchboard::{Publisher, SubscribeOptions, Subscriber, Topology, Transport};

use super::{PATIENCE, config, init_tracing, recv, seq_message, seq_of, unique};

const PUBLISH_TIMEOUT: Duration = Duration::from_secs(5);

async fn node() -> (FaultProxy, String) {
    let proxy = FaultProxy::start("127.0.0.1:5672".parse().unwrap())
        .await
        .expect("proxy");
    let uri = format!("amqp://guest:guest@{}/%2f", proxy.addr());
    (proxy, uri)
}

fn two_nodes(first: String, second: String) -> AmqpConfig {
    config(first, PUBLISH_TIMEOUT).with_nodes([second])
}

/// What a caller's retry does: the same message again until confirmed.
async fn publish(transport: &AmqpTransport, topic: &str, seq: u64) {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        match transport.publish(topic, seq_message(seq)).await {
            Ok(()) => return,
            Err(error) => {
                assert!(error.is_retryable(), "{error}");
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "message {seq} not confirmed within {PATIENCE:?}: {error}"
                );
                // The transport is reconnecting: a pause before the retry
                // so it does not spin on a failure that comes at once.
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cutting_the_node_in_use_fails_over_to_the_next_and_the_consumer_resumes() {
    init_tracing();
    let (first, first_uri) = node().await;
    let (second, second_uri) = node().await;
    let transport = AmqpTransport::connect(two_nodes(first_uri, second_uri))
        .await
        .expect("RabbitMQ on 127.0.0.1:5672 (guest/guest)");
    let (first_label, second_label) = (first.addr().to_string(), second.addr().to_string());
    let health = transport.connection_health();
    assert!(health.is_up(), "{health:?}");
    assert_eq!(
        health.publishing_node.as_deref(),
        Some(first_label.as_str())
    );
    assert_eq!(health.consuming_node.as_deref(), Some(first_label.as_str()));
    assert_eq!(
        second.open_connections(),
        0,
        "the second node is not used yet"
    );

    let topic = unique("failover");
    transport
        .declare(&Topology::new().with_groups(topic.clone(), ["g"]))
        .await
        .expect("declare");
    let mut subscription = transport
        .subscribe(&topic, SubscribeOptions::new("g").with_prefetch(20))
        .await
        .expect("subscribe");

    const BEFORE: u64 = 50;
    const TOTAL: u64 = 100;
    let mut seen = BTreeSet::new();
    for seq in 0..BEFORE {
        publish(&transport, &topic, seq).await;
    }
    while (seen.len() as u64) < BEFORE {
        let delivery = recv(&mut subscription, "before the cut").await;
        seen.insert(seq_of(&delivery));
        delivery.ack().await.expect("ack before the cut");
    }

    first.cut();
    first.all_closed().await;
    for seq in BEFORE..TOTAL {
        publish(&transport, &topic, seq).await;
    }
    let mut duplicates = 0;
    while (seen.len() as u64) < TOTAL {
        let delivery = recv(&mut subscription, "after the cut").await;
        if !seen.insert(seq_of(&delivery)) {
            duplicates += 1;
        }
        // An ack lost with the first node's connection only brings the
        // message again; the set counts it once.
        let _ = delivery.ack().await;
    }
    assert_eq!(seen, (0..TOTAL).collect::<BTreeSet<_>>());
    assert!(
        duplicates <= 20,
        "at most a prefetch redelivered: {duplicates}"
    );

    // The consumer came back, so the consuming connection is up: on the
    // second node, as is the publishing one that confirmed the rest.
    let mut consuming = transport.consumer_connection_state();
    tokio::time::timeout(
        PATIENCE,
        consuming.wait_for(|state| *state == ConnectionState::Connected),
    )
    .await
    .expect("consuming connection up")
    .expect("transport alive");
    let health = transport.connection_health();
    assert!(health.is_up(), "{health:?}");
    assert_eq!(
        health.publishing_node.as_deref(),
        Some(second_label.as_str())
    );
    assert_eq!(
        health.consuming_node.as_deref(),
        Some(second_label.as_str())
    );
    assert_eq!(
        first.open_connections(),
        0,
        "nothing goes through the cut node"
    );
    assert!(second.open_connections() >= 2, "both connections moved");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_first_node_that_is_down_is_skipped_at_connect() {
    init_tracing();
    let (first, first_uri) = node().await;
    let (second, second_uri) = node().await;
    first.cut();
    let transport = AmqpTransport::connect(two_nodes(first_uri.clone(), second_uri))
        .await
        .expect("connects through the second node");
    let health = transport.connection_health();
    assert_eq!(
        health.publishing_node,
        Some(second.addr().to_string()),
        "{health:?}"
    );
    assert_eq!(health.consuming_node, Some(second.addr().to_string()));

    // Every node down: connect fails, naming the last node tried.
    second.cut();
    let error = AmqpTransport::connect(two_nodes(
        first_uri,
        format!("amqp://guest:guest@{}/%2f", second.addr()),
    ))
    .await
    .expect_err("no node answers");
    assert!(error.is_retryable(), "{error}");
    assert!(
        error.message().contains(&second.addr().to_string()),
        "{error}"
    );
}
