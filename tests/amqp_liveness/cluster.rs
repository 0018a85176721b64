//! A three-node cluster (private nodes, one Erlang cookie, joined with
//! `rabbitmqctl join_cluster`) and a quorum queue: four publishers send
//! persistent confirmed messages while a consumer acks, and the node that
//! holds the queue's leader is SIGKILLed a third of the way in. No message
//! whose publish returned `Ok` is lost; publishers and the consumer go on
//! through the survivors without a restart; duplicates are counted.
//!
//! Ignored by default (three nodes take about a minute to start on two
//! cores): `scripts/chaos` runs it with `--ignored cluster::`. Size:
//! `SWITCHBOARD_CLUSTER_MESSAGES` (default 20 000).

use std::time::{Duration, Instant};

use switchboard::transport::amqp::{AmqpTransport, QueueType};
use switchboard::{SubscribeOptions, Subscriber, Topology, Transport};

use super::load::{Load, PUBLISHERS};
use super::node::Node;
use super::{config, init_tracing, unique};

const PUBLISH_TIMEOUT: Duration = Duration::from_secs(5);
/// Scheduling on a loaded two-core machine, on top of the deadline.
const SLACK: Duration = Duration::from_secs(3);

fn messages() -> u64 {
    std::env::var("SWITCHBOARD_CLUSTER_MESSAGES")
        .ok()
        .and_then(|value| value.parse().ok())
        .unwrap_or(20_000)
}

/// Starts three nodes side by side and joins the second and third to the
/// first.
fn cluster() -> Vec<Node> {
    let started: Vec<_> = (0..3).map(|_| std::thread::spawn(Node::start)).collect();
    let nodes: Vec<Node> = started
        .into_iter()
        .map(|node| node.join().expect("start a node"))
        .collect();
    for node in &nodes[1..] {
        node.join(&nodes[0]);
    }
    let status = nodes[0].ctl(&["cluster_status"]);
    for node in &nodes {
        assert!(
            status.contains(node.name()),
            "{} not in the cluster: {status}",
            node.name()
        );
    }
    nodes
}

/// The index of the node that holds `queue`'s leader, asked of `ask`.
fn leader(nodes: &[Node], ask: &Node, queue: &str) -> usize {
    let listing = ask.ctl(&["list_queues", "-q", "--no-table-headers", "name", "leader"]);
    let line = listing
        .lines()
        .find(|line| line.split_whitespace().next() == Some(queue))
        .unwrap_or_else(|| panic!("{queue} not listed: {listing}"));
    let holder = line.split_whitespace().nth(1).expect("a leader column");
    nodes
        .iter()
        .position(|node| node.name() == holder)
        .unwrap_or_else(|| panic!("leader {holder} is none of the cluster's nodes"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "three private nodes, about a minute to start: scripts/chaos runs it"]
async fn cluster_leader_killed_loses_no_confirmed_message() {
    init_tracing();
    let started = Instant::now();
    let nodes = tokio::task::spawn_blocking(cluster)
        .await
        .expect("the cluster");
    let started_in = started.elapsed();
    let total = messages();
    let config = config(nodes[0].uri(), PUBLISH_TIMEOUT)
        .with_nodes(nodes[1..].iter().map(Node::uri))
        .with_queue_type(QueueType::Quorum);
    let transport = AmqpTransport::connect(config).await.expect("the cluster");
    let topic = unique("cluster");
    transport
        .declare(&Topology::new().with_groups(topic.clone(), ["g"]))
        .await
        .expect("declare");
    let queue = transport.config().queue_name(&topic, "g").expect("name");
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

    load.confirmed_at_least(total / 3).await;
    let killed = tokio::task::block_in_place(|| leader(&nodes, &nodes[0], &queue));
    let before = transport.connection_health();
    let confirmed_at_kill = load.confirmed();
    tokio::task::block_in_place(|| nodes[killed].kill());
    load.fault_from_now();
    let seen = load.finish().await;

    // Both connections are on survivors, and the queue has a new leader.
    let survivor = (killed + 1) % nodes.len();
    let after = transport.connection_health();
    let dead = nodes[killed].label();
    for node in [&after.publishing_node, &after.consuming_node] {
        assert!(
            node.as_deref().is_some_and(|node| node != dead),
            "a connection is not on a survivor: {after:?}"
        );
    }
    let new_leader = tokio::task::block_in_place(|| leader(&nodes, &nodes[survivor], &queue));
    assert_ne!(new_leader, killed, "the queue's leader moved");

    // On a line of its own, after the harness's "test … ..." prefix.
    eprintln!(
        "\ncluster node killed: 3 nodes (started and joined in {:.0} s), quorum queue, \
         leader's node SIGKILLed (connections were on {:?}/{:?}, now {:?}/{:?}); {total} \
         persistent messages from {PUBLISHERS} publishers, {total} confirmed \
         ({confirmed_at_kill} before the kill), {} consumed ({} duplicates), \
         lost 0; {} publishes failed retryably, slowest in {:.2} s (publish_timeout {} s); \
         publishing resumed {:.2} s and consuming {:.2} s after the kill",
        started_in.as_secs_f64(),
        before.publishing_node.unwrap_or_default(),
        before.consuming_node.unwrap_or_default(),
        after.publishing_node.unwrap_or_default(),
        after.consuming_node.unwrap_or_default(),
        seen.consumed,
        seen.duplicates,
        seen.failures.len(),
        seen.slowest_failure().as_secs_f64(),
        PUBLISH_TIMEOUT.as_secs(),
        seen.published_after_fault.as_secs_f64(),
        seen.consumed_after_fault.as_secs_f64(),
    );
}
