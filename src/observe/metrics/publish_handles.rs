//! The publish metrics of one bus, looked up in the recorder once per topic
//! and outcome rather than per message.

use std::collections::HashMap;
use std::sync::{Arc, OnceLock, RwLock};
use std::time::Duration;

use super::{Label, PUBLISH_DURATION, PUBLISH_TOTAL, published};

/// The most topics whose handles a bus keeps; publishes to further topics
/// go the long way, so a bus publishing to ever new topics does not grow.
const MOST_TOPICS: usize = 1024;

/// A counter and a histogram of one topic and outcome.
type Handles = OnceLock<(metrics::Counter, metrics::Histogram)>;

/// `switchboard_publish_total` and `switchboard_publish_duration_seconds`
/// of one bus: each topic's handles are looked up the first time it is
/// published to with that outcome and kept, so a publish costs a map
/// look-up and two atomic updates rather than two label sets built and
/// registered (as [`ConsumeMetrics`](super::ConsumeMetrics) does for a
/// subscription). Clones share the handles.
#[derive(Clone, Default)]
pub(crate) struct PublishMetrics {
    by_topic: Arc<RwLock<HashMap<Label, Arc<[Handles; 2]>>>>,
}

impl PublishMetrics {
    /// Records one publish (or batch) to `topic` over `transport`.
    pub(crate) fn record(
        &self,
        transport: &'static str,
        topic: Label,
        ok: bool,
        elapsed: Duration,
    ) {
        let known = self
            .by_topic
            .read()
            .ok()
            .and_then(|by_topic| by_topic.get(&topic).cloned());
        let handles = match known {
            Some(handles) => handles,
            None => {
                let Ok(mut by_topic) = self.by_topic.write() else {
                    return published(transport, topic, ok, elapsed);
                };
                if by_topic.len() >= MOST_TOPICS && !by_topic.contains_key(&topic) {
                    drop(by_topic);
                    return published(transport, topic, ok, elapsed);
                }
                by_topic.entry(topic.clone()).or_default().clone()
            }
        };
        let outcome = if ok { "ok" } else { "error" };
        let (counter, histogram) = handles[usize::from(!ok)].get_or_init(|| {
            let labels = [
                ("transport", Label::Borrowed(transport)),
                ("topic", topic),
                ("outcome", Label::Borrowed(outcome)),
            ];
            (
                metrics::counter!(PUBLISH_TOTAL, &labels),
                metrics::histogram!(PUBLISH_DURATION, &labels),
            )
        });
        counter.increment(1);
        histogram.record(elapsed);
    }
}

#[cfg(test)]
mod tests {
    use metrics_util::debugging::{DebugValue, DebuggingRecorder};

    use super::*;

    #[test]
    fn each_publish_is_counted_under_its_topic_and_outcome() {
        let recorder = DebuggingRecorder::new();
        let snapshotter = recorder.snapshotter();
        let kept = PublishMetrics::default();
        metrics::with_local_recorder(&recorder, || {
            for _ in 0..3 {
                kept.record("redis-streams", Label::Borrowed("a"), true, Duration::ZERO);
            }
            kept.record("redis-streams", Label::Borrowed("a"), false, Duration::ZERO);
            kept.clone()
                .record("redis-streams", Label::Borrowed("b"), true, Duration::ZERO);
        });
        let mut counts: Vec<(String, String, u64)> = snapshotter
            .snapshot()
            .into_vec()
            .into_iter()
            .filter(|(key, ..)| key.key().name() == PUBLISH_TOTAL)
            .map(|(key, _, _, value)| {
                let label = |name: &str| {
                    key.key()
                        .labels()
                        .find(|label| label.key() == name)
                        .map(|label| label.value().to_owned())
                        .unwrap_or_default()
                };
                let DebugValue::Counter(count) = value else {
                    panic!("a counter");
                };
                (label("topic"), label("outcome"), count)
            })
            .collect();
        counts.sort();
        assert_eq!(
            counts,
            [
                ("a".to_owned(), "error".to_owned(), 1),
                ("a".to_owned(), "ok".to_owned(), 3),
                ("b".to_owned(), "ok".to_owned(), 1),
            ]
        );
    }
}
