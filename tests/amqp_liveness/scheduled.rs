//! Scheduled messages survive a crash of the broker: while they wait in the
//! quorum delay buckets, the private node is killed with SIGKILL and started
//! again on its data. Every message arrives, none before its time; those
//! due while the node was down arrive once it is back, the others within
//! the schedule tolerance of their time (plus one publish timeout and the
//! mover's pause, for a bucket still recovering).
//!
//! Ignored: it does not hold on RabbitMQ 3.10.8, cause not found. In most
//! runs the messages due during the outage arrive and none of the later
//! ones, although the mover sends each on in time through the topic
//! exchange without an error, and the group's queue (classic or quorum)
//! then holds nothing; plain publishes at the same moments after a restart
//! all arrive. Run it with
//! `-- --ignored scheduled_messages_survive_a_killed_node`.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use chrono::Utc;
use switchboard::testing::delayed::schedule_tolerance;
use switchboard::transport::amqp::{AmqpTransport, QueueType};
use switchboard::{Publisher, RawMessage, SubscribeOptions, Subscriber, Topology, Transport};

use super::{config, init_tracing, node, unique};

/// Messages scheduled, 600 ms apart from 2 s on: the first few come due
/// while the node is down (a restart takes about 9 s), the rest after.
const MESSAGES: i64 = 30;

/// How long a message may take to arrive after the previous one.
const AFTER_RESTART: Duration = Duration::from_secs(60);
/// The transport's publish timeout here.
const PUBLISH_TIMEOUT: Duration = Duration::from_secs(5);
/// How late a message may be once the node is back, beyond the schedule
/// tolerance: a quorum bucket that is still recovering may leave the
/// mover's publish unconfirmed for one publish timeout, after which the
/// mover hands the message back and, after its one-second pause, gets it
/// again.
const RECOVERY: Duration = Duration::from_secs(PUBLISH_TIMEOUT.as_secs() + 1);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "on RabbitMQ 3.10.8 the messages due after its restart are lost, cause not found; see the module docs"]
async fn scheduled_messages_survive_a_killed_node() {
    init_tracing();
    let node = node().await;
    let transport = AmqpTransport::connect(
        config(node.uri(), PUBLISH_TIMEOUT).with_queue_type(QueueType::Classic),
    )
    .await
    .expect("the private node");
    let topic = unique("scheduled-killed");
    transport
        .declare(&Topology::new().with_groups(topic.clone(), ["g"]))
        .await
        .expect("declare");

    let now = Utc::now();
    let mut due = BTreeMap::new();
    for n in 0..MESSAGES {
        let at = now + chrono::Duration::milliseconds(2_000 + n * 600);
        transport
            .publish_at(&topic, RawMessage::new(n.to_string()), at)
            .await
            .unwrap_or_else(|error| panic!("publish_at of {n}: {error}"));
        due.insert(n.to_string(), at);
    }

    let killed_at = Instant::now();
    let node_ref: &super::Node = &node;
    tokio::task::block_in_place(|| {
        node_ref.kill();
        node_ref.launch();
    });
    let back_at = Utc::now();
    let down_for = killed_at.elapsed();

    // The transport reconnects by itself; subscribing waits for it.
    let mut subscription = transport
        .subscribe(&topic, SubscribeOptions::new("g").with_prefetch(64))
        .await
        .expect("subscribe after the restart");
    let tolerance = chrono::Duration::from_std(schedule_tolerance() + RECOVERY).expect("small");
    let mut arrived = BTreeMap::new();
    let mut duplicates = 0;
    while arrived.len() < due.len() {
        let delivery = tokio::time::timeout(AFTER_RESTART, subscription.recv())
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "after the node's restart only {} of {MESSAGES} scheduled messages arrived within {AFTER_RESTART:?}: missing {:?}",
                    arrived.len(),
                    due.keys().filter(|n| !arrived.contains_key(*n)).collect::<Vec<_>>()
                )
            })
            .expect("the subscription goes on");
        let at = Utc::now();
        let body = String::from_utf8(delivery.body().to_vec()).expect("utf-8");
        delivery.ack().await.expect("ack");
        if arrived.insert(body, at).is_some() {
            // At least once: a message in flight at the kill may come twice.
            duplicates += 1;
        }
    }
    let mut latest = chrono::Duration::zero();
    for (n, at) in &arrived {
        let due = due[n];
        assert!(
            *at >= due,
            "message {n} arrived {} ms early",
            (due - *at).num_milliseconds()
        );
        // Due while the node was down: counted from when it was back.
        let late = *at - due.max(back_at);
        assert!(
            late <= tolerance,
            "message {n} arrived {} ms after it could (due {due}, node back {back_at})",
            late.num_milliseconds()
        );
        latest = latest.max(late);
    }
    eprintln!(
        "\nscheduled across a node kill: {MESSAGES} messages, all arrived ({duplicates} twice), \
         none early; node down {:.1} s; latest {} ms after it could",
        down_for.as_secs_f64(),
        latest.num_milliseconds()
    );
    subscription.shutdown().await.expect("shutdown");
    transport.close().await.expect("close");
}
