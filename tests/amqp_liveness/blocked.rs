//! A private node whose memory alarm blocks publishing: `publish` fails
//! with `Timeout` within `publish_timeout`, a consumer's own publish (a
//! dead letter) gives up within it too, consumers that only ack keep acking
//! on their own connection, and once the alarm clears publishing resumes
//! without a restart.

use std::time::{Duration, Instant};

use switchboard::transport::amqp::{AmqpTransport, ConnectionState};
use switchboard::{
    DeadLetter, Effect, ErrorKind, Publisher, RawMessage, SubscribeOptions, Subscriber, Topology,
    Transport,
};

use super::{Node, PATIENCE, config, init_tracing, node, recv, seq_message, unique};

const PUBLISH_TIMEOUT: Duration = Duration::from_secs(3);
/// Scheduling on a loaded two-core machine, on top of the deadline.
const SLACK: Duration = Duration::from_secs(2);
const BACKLOG: u64 = 200;
const PREFETCH: usize = 10;

/// Lifts the alarm however the test ends, so the node's next test finds
/// it as it was.
struct Alarm<'a>(&'a Node);

impl<'a> Alarm<'a> {
    fn raise(node: &'a Node) -> Self {
        node.ctl(&["set_vm_memory_high_watermark", "0.0000001"]);
        Self(node)
    }
}

impl Drop for Alarm<'_> {
    fn drop(&mut self) {
        self.0.ctl(&["set_vm_memory_high_watermark", "0.4"]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blocked_node_fails_publishes_in_time_and_keeps_acking() {
    init_tracing();
    let node = node().await;
    let transport = AmqpTransport::connect(config(node.uri(), PUBLISH_TIMEOUT))
        .await
        .expect("the private node");
    let topic = unique("blocked");
    transport
        .declare(&Topology::new().with_groups(topic.clone(), ["g"]))
        .await
        .expect("declare");
    let backlog: Vec<RawMessage> = (0..BACKLOG).map(seq_message).collect();
    transport
        .publish_batch(&topic, backlog)
        .await
        .expect("the backlog");
    let mut subscription = transport
        .subscribe(&topic, SubscribeOptions::new("g").with_prefetch(PREFETCH))
        .await
        .expect("subscribe");

    let node_ref: &Node = &node;
    let alarm = tokio::task::block_in_place(|| Alarm::raise(node_ref));
    // The broker blocks a connection when it next publishes: what it read
    // before may still be confirmed.
    let mut first_failure = None;
    for seq in 0..50 {
        let started = Instant::now();
        if let Err(error) = transport.publish(&topic, seq_message(1_000 + seq)).await {
            first_failure = Some((error, started.elapsed()));
            break;
        }
    }
    let (error, first_took) = first_failure.expect("a publish fails once the node is blocked");
    assert_eq!(error.kind(), ErrorKind::Timeout, "{error}");
    assert!(error.is_retryable());
    assert_eq!(
        error.effect(),
        Effect::Unknown,
        "sent: the broker may take it later"
    );
    assert!(first_took <= PUBLISH_TIMEOUT + SLACK, "{first_took:?}");
    let mut state = transport.connection_state();
    tokio::time::timeout(
        PATIENCE,
        state.wait_for(|state| *state == ConnectionState::Blocked),
    )
    .await
    .expect("the state says blocked")
    .expect("state watch");
    let health = transport.connection_health();
    assert_eq!(health.consuming, ConnectionState::Connected, "{health:?}");
    assert!(health.blocked.is_some(), "{health:?}");

    // While blocked: a publish is not even sent, and says why.
    let started = Instant::now();
    let error = transport
        .publish(&topic, seq_message(2_000))
        .await
        .expect_err("still blocked");
    let blocked_took = started.elapsed();
    assert_eq!(error.kind(), ErrorKind::Timeout, "{error}");
    assert!(error.message().contains("blocks publishing"), "{error}");
    assert_eq!(
        error.effect(),
        Effect::NotApplied,
        "never sent: safe to send again"
    );
    assert!(blocked_took <= PUBLISH_TIMEOUT + SLACK, "{blocked_took:?}");

    // A consumer's own publish (a dead letter, on the publishing
    // connection) gives the delivery back within the timeout; acks, on the
    // consuming connection, keep flowing: with a prefetch of 10 the whole
    // backlog only arrives if they reach the broker.
    let delivery = recv(&mut subscription, "the first of the backlog").await;
    let started = Instant::now();
    let (error, delivery) = delivery
        .dead_letter(DeadLetter::new("blocked test"))
        .await
        .expect_err("a dead letter cannot be published while blocked")
        .into_parts();
    let dead_letter_took = started.elapsed();
    assert!(error.is_retryable(), "{error}");
    assert!(
        dead_letter_took <= PUBLISH_TIMEOUT + SLACK,
        "{dead_letter_took:?}"
    );
    let acking = Instant::now();
    delivery.ack().await.expect("ack");
    for _ in 1..BACKLOG {
        let delivery = recv(&mut subscription, "the backlog while blocked").await;
        delivery.ack().await.expect("ack");
    }
    let acked_in = acking.elapsed();
    assert_eq!(
        *transport.connection_state().borrow(),
        ConnectionState::Blocked
    );

    // The alarm clears: the same transport publishes again.
    tokio::task::block_in_place(|| drop(alarm));
    let restored = Instant::now();
    let mut tries = 0;
    loop {
        tries += 1;
        match transport.publish(&topic, seq_message(3_000)).await {
            Ok(()) => break,
            Err(error) => {
                assert!(error.is_retryable(), "{error}");
                assert!(
                    restored.elapsed() < PATIENCE,
                    "publishing does not resume: {error}"
                );
            }
        }
    }
    let resumed_in = restored.elapsed();
    tokio::time::timeout(
        PATIENCE,
        state.wait_for(|state| *state == ConnectionState::Connected),
    )
    .await
    .expect("the state says connected again")
    .expect("state watch");
    // On a line of its own, after the harness's "test … ..." prefix.
    eprintln!(
        "\nnode blocked: publish failed with Timeout in {:.2} s (the first, sent before the broker said blocked) and \
         {:.2} s (not sent), a dead letter gave up in {:.2} s (publish_timeout {} s); \
         {BACKLOG} messages consumed and acked while blocked in {:.2} s (prefetch {PREFETCH}); \
         publishing resumed {:.2} s after the alarm cleared ({tries} tries)",
        first_took.as_secs_f64(),
        blocked_took.as_secs_f64(),
        dead_letter_took.as_secs_f64(),
        PUBLISH_TIMEOUT.as_secs(),
        acked_in.as_secs_f64(),
        resumed_in.as_secs_f64(),
    );
}
