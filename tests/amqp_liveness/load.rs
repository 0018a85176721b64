//! The load both node proofs run while a node dies: four publishers sending
//! the persistent confirmed messages `0..total`, each sent again until the
//! broker confirms it (what a caller's retry would do), and a consumer that
//! acks; with when publishing and consuming first succeeded after the
//! fault.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use switchboard::transport::amqp::AmqpTransport;
use switchboard::{Publisher, Subscription};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::{PATIENCE, seq_message, seq_of};

pub const PUBLISHERS: u64 = 4;

/// When publishing and consuming first succeeded after the fault.
#[derive(Default)]
struct Since {
    fault: Mutex<Option<Instant>>,
    published: Mutex<Option<Duration>>,
    consumed: Mutex<Option<Duration>>,
}

impl Since {
    fn mark(&self, slot: &Mutex<Option<Duration>>) {
        let Some(fault) = *self.fault.lock().unwrap() else {
            return;
        };
        slot.lock().unwrap().get_or_insert_with(|| fault.elapsed());
    }
}

/// The publishers and the consumer, running.
pub struct Load {
    total: u64,
    since: Arc<Since>,
    confirmed: Arc<AtomicU64>,
    confirmed_rx: watch::Receiver<u64>,
    consumed_rx: watch::Receiver<u64>,
    failures: Arc<Mutex<Vec<Duration>>>,
    consumer: JoinHandle<(BTreeSet<u64>, u64)>,
    publishers: Vec<JoinHandle<()>>,
}

/// What the load saw, once every message was confirmed and consumed.
pub struct Seen {
    pub consumed: usize,
    pub duplicates: u64,
    /// How long each failed publish took before it failed.
    pub failures: Vec<Duration>,
    pub published_after_fault: Duration,
    pub consumed_after_fault: Duration,
}

impl Seen {
    pub fn slowest_failure(&self) -> Duration {
        self.failures.iter().max().copied().unwrap_or_default()
    }
}

impl Load {
    /// Starts the load on `topic`, consuming from `subscription`; every
    /// failed publish must be retryable and fail within `deadline`.
    pub fn start(
        transport: &AmqpTransport,
        topic: &str,
        mut subscription: Subscription,
        total: u64,
        deadline: Duration,
    ) -> Self {
        let since = Arc::new(Since::default());
        let (consumed_tx, consumed_rx) = watch::channel(0_u64);
        let consumer = {
            let since = since.clone();
            tokio::spawn(async move {
                let (mut seen, mut duplicates) = (BTreeSet::new(), 0_u64);
                while let Some(delivery) = subscription.recv().await {
                    since.mark(&since.consumed);
                    if !seen.insert(seq_of(&delivery)) {
                        duplicates += 1;
                    }
                    // An ack lost with the node: the message comes again,
                    // and the set counts it once.
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
        let (confirmed_tx, confirmed_rx) = watch::channel(0_u64);
        let confirmed_tx = Arc::new(confirmed_tx);
        let failures = Arc::new(Mutex::new(Vec::new()));
        let per = total / PUBLISHERS;
        let publishers = (0..PUBLISHERS)
            .map(|publisher| {
                let (transport, topic) = (transport.clone(), topic.to_owned());
                let (confirmed, confirmed_tx) = (confirmed.clone(), confirmed_tx.clone());
                let (failures, since) = (failures.clone(), since.clone());
                let first = publisher * per;
                let last = if publisher + 1 == PUBLISHERS {
                    total
                } else {
                    first + per
                };
                tokio::spawn(async move {
                    for seq in first..last {
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
                                        took <= deadline,
                                        "a publish failed after {took:?}, past its deadline: {error}"
                                    );
                                    failures.lock().unwrap().push(took);
                                    // Failures that come at once must not spin.
                                    tokio::time::sleep(Duration::from_millis(50)).await;
                                }
                            }
                        }
                    }
                })
            })
            .collect();
        Self {
            total,
            since,
            confirmed,
            confirmed_rx,
            consumed_rx,
            failures,
            consumer,
            publishers,
        }
    }

    /// Waits until `n` publishes were confirmed.
    pub async fn confirmed_at_least(&mut self, n: u64) {
        self.confirmed_rx
            .wait_for(|confirmed| *confirmed >= n)
            .await
            .expect("publishers");
    }

    /// How many publishes were confirmed so far.
    pub fn confirmed(&self) -> u64 {
        self.confirmed.load(Ordering::Relaxed)
    }

    /// The fault is over (or has just happened): resumption counts from now.
    pub fn fault_from_now(&self) {
        *self.since.fault.lock().unwrap() = Some(Instant::now());
    }

    /// Waits for every publish to be confirmed and every message consumed,
    /// and asserts that none was lost.
    pub async fn finish(mut self) -> Seen {
        for publisher in std::mem::take(&mut self.publishers) {
            tokio::time::timeout(PATIENCE * 3, publisher)
                .await
                .expect("publishers finish after the fault")
                .expect("publisher");
        }
        let total = self.total;
        let all = tokio::time::timeout(
            PATIENCE * 3,
            self.consumed_rx.wait_for(|consumed| *consumed == total),
        )
        .await
        .is_ok();
        assert!(
            all,
            "only {} of {total} confirmed messages consumed",
            *self.consumed_rx.borrow()
        );
        let (seen, duplicates) = (&mut self.consumer).await.expect("consumer");
        assert_eq!(self.confirmed(), total);
        let lost = (0..total).filter(|seq| !seen.contains(seq)).count();
        assert_eq!(lost, 0, "confirmed messages lost");
        let failures = std::mem::take(&mut *self.failures.lock().unwrap());
        Seen {
            consumed: seen.len(),
            duplicates,
            failures,
            published_after_fault: self.since.published.lock().unwrap().unwrap_or_default(),
            consumed_after_fault: self.since.consumed.lock().unwrap().unwrap_or_default(),
        }
    }
}
