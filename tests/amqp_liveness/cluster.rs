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

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use switchboard::transport::amqp::{AmqpTransport, QueueType};
use switchboard::{Publisher, SubscribeOptions, Subscriber, Topology, Transport};
use tokio::sync::watch;

use super::node::Node;
use super::{PATIENCE, config, init_tracing, seq_message, seq_of, unique};

const PUBLISHERS: u64 = 4;
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

/// When something first happened after the kill.
#[derive(Default)]
struct Since {
    killed: std::sync::Mutex<Option<Instant>>,
    published: std::sync::Mutex<Option<Duration>>,
    consumed: std::sync::Mutex<Option<Duration>>,
}

impl Since {
    fn mark(&self, slot: &std::sync::Mutex<Option<Duration>>) {
        let Some(killed) = *self.killed.lock().unwrap() else {
            return;
        };
        slot.lock().unwrap().get_or_insert_with(|| killed.elapsed());
    }
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
    let mut subscription = transport
        .subscribe(&topic, SubscribeOptions::new("g").with_prefetch(200))
        .await
        .expect("subscribe");
    let since = Arc::new(Since::default());

    let (consumed_tx, mut consumed_rx) = watch::channel(0_u64);
    let consumer = {
        let since = since.clone();
        tokio::spawn(async move {
            let (mut seen, mut duplicates) = (BTreeSet::new(), 0_u64);
            while let Some(delivery) = subscription.recv().await {
                since.mark(&since.consumed);
                if !seen.insert(seq_of(&delivery)) {
                    duplicates += 1;
                }
                // An ack lost with the node: the message comes again, and
                // the set counts it once.
                let _ = delivery.ack().await;
                consumed_tx.send_replace(seen.len() as u64);
                if seen.len() as u64 == total {
                    break;
                }
            }
            (seen, duplicates)
        })
    };

    let confirmed = Arc::new(AtomicU64::new(0));
    let (confirmed_tx, mut confirmed_rx) = watch::channel(0_u64);
    let confirmed_tx = Arc::new(confirmed_tx);
    let failures = Arc::new(std::sync::Mutex::new(Vec::<Duration>::new()));
    let publishers: Vec<_> = (0..PUBLISHERS)
        .map(|publisher| {
            let (transport, topic) = (transport.clone(), topic.clone());
            let (confirmed, confirmed_tx) = (confirmed.clone(), confirmed_tx.clone());
            let (failures, since) = (failures.clone(), since.clone());
            tokio::spawn(async move {
                let per = total / PUBLISHERS;
                let first = publisher * per;
                let last = if publisher + 1 == PUBLISHERS {
                    total
                } else {
                    first + per
                };
                for seq in first..last {
                    // What a caller's retry would do: the same message
                    // again until the broker confirms it.
                    loop {
                        let started = Instant::now();
                        match transport.publish(&topic, seq_message(seq)).await {
                            Ok(()) => {
                                since.mark(&since.published);
                                let now = confirmed.fetch_add(1, Ordering::Relaxed) + 1;
                                confirmed_tx.send_replace(now);
                                break;
                            }
                            Err(error) => {
                                let took = started.elapsed();
                                assert!(error.is_retryable(), "{error}");
                                assert!(
                                    took <= PUBLISH_TIMEOUT + SLACK,
                                    "a publish failed after {took:?}, past its deadline: {error}"
                                );
                                failures.lock().unwrap().push(took);
                                // A pause before trying again (failures
                                // that come at once must not spin).
                                tokio::time::sleep(Duration::from_millis(50)).await;
                            }
                        }
                    }
                }
            })
        })
        .collect();

    confirmed_rx
        .wait_for(|confirmed| *confirmed >= total / 3)
        .await
        .expect("publishers");
    let killed = tokio::task::block_in_place(|| leader(&nodes, &nodes[0], &queue));
    let before = transport.health();
    let confirmed_at_kill = confirmed.load(Ordering::Relaxed);
    tokio::task::block_in_place(|| nodes[killed].kill());
    *since.killed.lock().unwrap() = Some(Instant::now());

    for publisher in publishers {
        tokio::time::timeout(PATIENCE * 3, publisher)
            .await
            .expect("publishers finish on the survivors")
            .expect("publisher");
    }
    let all = tokio::time::timeout(
        PATIENCE * 3,
        consumed_rx.wait_for(|consumed| *consumed == total),
    )
    .await
    .is_ok();
    assert!(
        all,
        "only {} of {total} confirmed messages consumed",
        *consumed_rx.borrow()
    );
    let (seen, duplicates) = consumer.await.expect("consumer");
    let confirmed = confirmed.load(Ordering::Relaxed);
    let lost = (0..total).filter(|seq| !seen.contains(seq)).count();
    assert_eq!(confirmed, total);
    assert_eq!(lost, 0, "confirmed messages lost");

    // Both connections are on survivors, and the queue has a new leader.
    let survivor = (killed + 1) % nodes.len();
    let after = transport.health();
    let dead = nodes[killed].label();
    for node in [&after.publishing_node, &after.consuming_node] {
        assert!(
            node.as_deref().is_some_and(|node| node != dead),
            "a connection is not on a survivor: {after:?}"
        );
    }
    let new_leader = tokio::task::block_in_place(|| leader(&nodes, &nodes[survivor], &queue));
    assert_ne!(new_leader, killed, "the queue's leader moved");

    let failures = failures.lock().unwrap();
    let slowest = failures.iter().max().copied().unwrap_or_default();
    let published = since.published.lock().unwrap().unwrap_or_default();
    let consumed = since.consumed.lock().unwrap().unwrap_or_default();
    // On a line of its own, after the harness's "test … ..." prefix.
    eprintln!(
        "\ncluster node killed: 3 nodes (started and joined in {:.0} s), quorum queue, \
         leader's node SIGKILLed (connections were on {:?}/{:?}, now {:?}/{:?}); {total} \
         persistent messages from {PUBLISHERS} publishers, {confirmed} confirmed \
         ({confirmed_at_kill} before the kill), {} consumed ({duplicates} duplicates), \
         lost 0; {} publishes failed retryably, slowest in {:.2} s (publish_timeout {} s); \
         publishing resumed {:.2} s and consuming {:.2} s after the kill",
        started_in.as_secs_f64(),
        before.publishing_node.unwrap_or_default(),
        before.consuming_node.unwrap_or_default(),
        after.publishing_node.unwrap_or_default(),
        after.consuming_node.unwrap_or_default(),
        seen.len(),
        failures.len(),
        slowest.as_secs_f64(),
        PUBLISH_TIMEOUT.as_secs(),
        published.as_secs_f64(),
        consumed.as_secs_f64(),
    );
}
