//! A private node killed with SIGKILL while four publishers send persistent
//! confirmed messages and a consumer acks, then started again on the same
//! data directory: no message whose publish returned `Ok` is lost, every
//! publish during the outage fails within its `publish_timeout` with a
//! retryable error, and publishers and the consumer resume by themselves.

use std::time::{Duration, Instant};

use switchboard::transport::amqp::AmqpTransport;
use switchboard::{SubscribeOptions, Subscriber, Topology, Transport};

use super::load::{Load, PUBLISHERS};
use super::{config, init_tracing, node, unique};

const PUBLISH_TIMEOUT: Duration = Duration::from_secs(3);
/// Scheduling on a loaded two-core machine, on top of the deadline.
const SLACK: Duration = Duration::from_secs(2);

fn messages() -> u64 {
    std::env::var("SWITCHBOARD_NODE_MESSAGES")
        .ok()
        .and_then(|value| value.parse().ok())
        .unwrap_or(2_000)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_node_loses_no_confirmed_message() {
    init_tracing();
    let node = node().await;
    let total = messages();
    let transport = AmqpTransport::connect(config(node.uri(), PUBLISH_TIMEOUT))
        .await
        .expect("the private node");
    let topic = unique("killed");
    transport
        .declare(&Topology::new().with_groups(topic.clone(), ["g"]))
        .await
        .expect("declare");
    let subscription = transport
        .subscribe(&topic, SubscribeOptions::new("g").with_prefetch(200))
        .await
        .expect("subscribe");
    let mut load = Load::start(
        &transport,
        &topic,
        subscription,
        total,
        PUBLISH_TIMEOUT + SLACK,
    );

    // Kill it a third of the way in, and start it again on its data.
    load.confirmed_at_least(total / 3).await;
    let killed_at = Instant::now();
    let confirmed_at_kill = load.confirmed();
    let node_ref: &super::Node = &node;
    tokio::task::block_in_place(|| {
        node_ref.kill();
        node_ref.launch();
    });
    load.fault_from_now();
    let down_for = killed_at.elapsed();
    let seen = load.finish().await;
    // On a line of its own, after the harness's "test … ..." prefix.
    eprintln!(
        "\nnode killed: {total} persistent messages from {PUBLISHERS} publishers, \
         {total} confirmed ({confirmed_at_kill} before the kill), {} consumed \
         ({} redelivered), lost 0; {} publishes failed retryably, slowest in \
         {:.2} s (publish_timeout {} s); node down {:.1} s; publishing resumed {:.2} s \
         and consuming {:.2} s after it answered",
        seen.consumed,
        seen.duplicates,
        seen.failures.len(),
        seen.slowest_failure().as_secs_f64(),
        PUBLISH_TIMEOUT.as_secs(),
        down_for.as_secs_f64(),
        seen.published_after_fault.as_secs_f64(),
        seen.consumed_after_fault.as_secs_f64(),
    );
}
