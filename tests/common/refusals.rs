//! Counts `switchboard_push_refused_total` for one transport and topic as it
//! is recorded, so a push test can wait for refusals instead of guessing
//! with sleeps. Included by `tests/grpc.rs` and `tests/http.rs`.

use std::sync::Arc;
use std::time::Duration;

use metrics::{
    Counter, CounterFn, Gauge, Histogram, Key, KeyName, Metadata, Recorder, SharedString, Unit,
};
use switchboard::observe::metrics::PUSH_REFUSED_TOTAL;
use tokio::sync::watch;

/// A recorder that counts refusals of `topic` by `transport` and ignores
/// everything else. Install it for the test's thread with
/// [`metrics::set_default_local_recorder`]: a `#[tokio::test]` runs the
/// receiver's tasks on that thread too.
pub struct Refusals {
    transport: &'static str,
    topic: &'static str,
    count: Arc<Count>,
}

struct Count(watch::Sender<u64>);

impl CounterFn for Count {
    fn increment(&self, value: u64) {
        self.0.send_modify(|count| *count += value);
    }

    fn absolute(&self, value: u64) {
        self.0.send_modify(|count| *count = (*count).max(value));
    }
}

impl Refusals {
    pub fn new(transport: &'static str, topic: &'static str) -> Self {
        Self {
            transport,
            topic,
            count: Arc::new(Count(watch::Sender::new(0))),
        }
    }

    /// Refusals counted so far.
    pub fn count(&self) -> u64 {
        *self.count.0.borrow()
    }

    /// Waits until at least `n` refusals are counted (failing the test
    /// after 5 s).
    pub async fn wait_for(&self, n: u64) {
        let mut counted = self.count.0.subscribe();
        tokio::time::timeout(
            Duration::from_secs(5),
            counted.wait_for(|count| *count >= n),
        )
        .await
        .unwrap_or_else(|_| panic!("{n} refusals expected, {} counted", self.count()))
        .expect("the counter lives as long as the recorder");
    }
}

impl Recorder for Refusals {
    fn describe_counter(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_gauge(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_histogram(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}

    fn register_counter(&self, key: &Key, _: &Metadata<'_>) -> Counter {
        let label = |name: &str| {
            key.labels()
                .find(|label| label.key() == name)
                .map(|label| label.value().to_owned())
        };
        if key.name() == PUSH_REFUSED_TOTAL
            && label("transport").as_deref() == Some(self.transport)
            && label("topic").as_deref() == Some(self.topic)
        {
            Counter::from_arc(self.count.clone())
        } else {
            Counter::noop()
        }
    }

    fn register_gauge(&self, _: &Key, _: &Metadata<'_>) -> Gauge {
        Gauge::noop()
    }

    fn register_histogram(&self, _: &Key, _: &Metadata<'_>) -> Histogram {
        Histogram::noop()
    }
}
