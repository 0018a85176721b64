//! A private node killed with SIGKILL while four publishers send persistent
//! confirmed messages and a consumer acks, then started again on the same
//! data directory: no message whose publish returned `Ok` is lost, every
//! publish during the outage fails within its `publish_timeout` with a
//! retryable error, and publishers and the consumer resume by themselves.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use switchboard::transport::amqp::AmqpTransport;
use switchboard::{Publisher, SubscribeOptions, Subscriber, Topology, Transport};
use tokio::sync::watch;

use super::{PATIENCE, config, init_tracing, node, seq_message, seq_of, unique};

const PUBLISHERS: u64 = 4;
const PUBLISH_TIMEOUT: Duration = Duration::from_secs(3);
/// Scheduling on a loaded two-core machine, on top of the deadline.
const SLACK: Duration = Duration::from_secs(2);

fn messages() -> u64 {
    std::env::var("SWITCHBOARD_NODE_MESSAGES")
        .ok()
        .and_then(|value| value.parse().ok())
        .unwrap_or(2_000)
}

/// When something first happened after the node answered again.
#[derive(Default)]
struct Since {
    restarted: std::sync::Mutex<Option<Instant>>,
    published: std::sync::Mutex<Option<Duration>>,
    consumed: std::sync::Mutex<Option<Duration>>,
}

impl Since {
    fn mark(&self, slot: &std::sync::Mutex<Option<Duration>>) {
        let Some(restarted) = *self.restarted.lock().unwrap() else {
            return;
        };
        slot.lock()
            .unwrap()
            .get_or_insert_with(|| restarted.elapsed());
    }
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

    // Kill it a third of the way in, and start it again on its data.
    confirmed_rx
        .wait_for(|confirmed| *confirmed >= total / 3)
        .await
        .expect("publishers");
    let killed_at = Instant::now();
    let confirmed_at_kill = confirmed.load(Ordering::Relaxed);
    let node_ref: &super::Node = &node;
    tokio::task::block_in_place(|| {
        node_ref.kill();
        node_ref.launch();
    });
    *since.restarted.lock().unwrap() = Some(Instant::now());
    let down_for = killed_at.elapsed();

    for publisher in publishers {
        tokio::time::timeout(PATIENCE * 3, publisher)
            .await
            .expect("publishers finish after the restart")
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
    let failures = failures.lock().unwrap();
    let slowest = failures.iter().max().copied().unwrap_or_default();
    let published = since.published.lock().unwrap().unwrap_or_default();
    let consumed = since.consumed.lock().unwrap().unwrap_or_default();
    // On a line of its own, after the harness's "test … ..." prefix.
    eprintln!(
        "\nnode killed: {total} persistent messages from {PUBLISHERS} publishers, \
         {confirmed} confirmed ({confirmed_at_kill} before the kill), {} consumed \
         ({duplicates} redelivered), lost 0; {} publishes failed retryably, slowest in \
         {:.2} s (publish_timeout {} s); node down {:.1} s; publishing resumed {:.2} s \
         and consuming {:.2} s after it answered",
        seen.len(),
        failures.len(),
        slowest.as_secs_f64(),
        PUBLISH_TIMEOUT.as_secs(),
        down_for.as_secs_f64(),
        published.as_secs_f64(),
        consumed.as_secs_f64(),
    );
}
