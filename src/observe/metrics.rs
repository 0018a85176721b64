//! Metric names and the small functions the bus and the layers call to
//! record them through the [`metrics`] facade.
//!
//! Every function here is one or two `metrics` macro calls: with no recorder
//! installed they cost a few nanoseconds, and with one they go to the
//! recorder the application chose (Prometheus, StatsD, OpenTelemetry…),
//! which keeps its own (usually sharded or atomic) storage — this crate adds
//! no lock of its own.
//!
//! With feature `http`, [`handler`] and [`router`] serve the exporter's text
//! at `/metrics` (the render function is the exporter's, such as
//! `metrics-exporter-prometheus`'s `PrometheusHandle::render`).

use std::borrow::Cow;
use std::time::Duration;

use crate::error::ErrorKind;

mod publish_handles;
#[cfg(feature = "http")]
mod scrape;
pub(crate) use publish_handles::PublishMetrics;
#[cfg(feature = "http")]
#[cfg_attr(docsrs, doc(cfg(feature = "http")))]
pub use scrape::{PROMETHEUS_CONTENT_TYPE, handler, router};

/// Counter of publishes, labels `transport`, `topic`, `outcome` (`ok` / `error`).
pub const PUBLISH_TOTAL: &str = "switchboard_publish_total";
/// Histogram of publish latency in seconds, labels `transport`, `topic`, `outcome`.
pub const PUBLISH_DURATION: &str = "switchboard_publish_duration_seconds";
/// Counter of consumed deliveries, labels `transport`, `topic`, `group`,
/// `outcome` (`ack` / `nack` / `give_back` / `dead_letter` / `rejected` / `dropped` / `unsettled`).
pub const CONSUME_TOTAL: &str = "switchboard_consume_total";
/// Histogram of handling time (decode to settled) in seconds, labels
/// `transport`, `topic`, `group`, `outcome`.
pub const CONSUME_DURATION: &str = "switchboard_consume_duration_seconds";
/// Counter of calls through a [`CallMetrics`](super::CallMetrics) layer, labels
/// `path`, `transport`, `outcome` (`ok` or the error kind, such as `timeout`).
pub const CALL_TOTAL: &str = "switchboard_call_total";
/// Histogram of call latency in seconds, labels `path`, `transport`, `outcome`.
pub const CALL_DURATION: &str = "switchboard_call_duration_seconds";
/// Counter of retries (attempts after the first), label `kind` (the error
/// kind that caused the retry).
pub const RETRIES_TOTAL: &str = "switchboard_retries_total";
/// Counter of retries not made although attempts were left, label `reason`
/// (`budget`: the retry budget was spent / `may_have_applied`: the failure
/// may have taken effect and the call is not idempotent).
pub const RETRIES_REFUSED_TOTAL: &str = "switchboard_retries_refused_total";
/// Counter of circuit-breaker state changes, labels `breaker`, `to`
/// (`closed` / `open` / `half_open`).
pub const BREAKER_TRANSITIONS_TOTAL: &str = "switchboard_breaker_transitions_total";
/// Gauge of a circuit breaker's state, label `breaker`: 0 closed, 1 half
/// open, 2 open.
pub const BREAKER_STATE: &str = "switchboard_breaker_state";
/// Counter of messages the consume loop dead-lettered, labels `transport`,
/// `topic`, `group`.
pub const DEAD_LETTERS_TOTAL: &str = "switchboard_dead_letters_total";
/// Gauge of a topic's dead-letter queue depth, labels `transport`, `topic`;
/// set when [`DeadLetterAdmin`](crate::middleware::dead_letter::DeadLetterAdmin)
/// lists the whole queue (fewer letters than the limit) and set to 0 after
/// `redrive_all`.
pub const DEAD_LETTER_DEPTH: &str = "switchboard_dead_letter_depth";
/// Counter of duplicates the dedupe layer caught, labels `topic`, `group`,
/// `state` (`done`: skipped and acked / `in_progress`: requeued).
pub const DEDUPE_HITS_TOTAL: &str = "switchboard_dedupe_hits_total";
/// Counter of latency-budget checks that found a path's P99 over its budget,
/// label `path`.
pub const BUDGET_BREACHES_TOTAL: &str = "switchboard_budget_breaches_total";
/// Gauge of a path's P99 latency in seconds over the last check window,
/// label `path`.
pub const LATENCY_P99: &str = "switchboard_latency_p99_seconds";
/// Counter of messages a transport dropped on purpose because a bounded
/// queue was full, labels `transport`, `topic`, `reason` (such as
/// `inbox_full`).
pub const DROPPED_TOTAL: &str = "switchboard_dropped_total";
/// Counter of pushed messages a receiver refused because its bounded queue
/// was full (the publisher was told to retry later), labels `transport`,
/// `topic`.
pub const PUSH_REFUSED_TOTAL: &str = "switchboard_push_refused_total";
/// Gauge of a consumer group's lag: messages of the topic not yet delivered
/// to the group, labels `transport`, `topic`, `group`; sampled on an
/// interval by each subscription.
pub const CONSUMER_LAG: &str = "switchboard_consumer_lag";
/// Counter of dedupe marks evicted for room before their TTL ran out (a
/// duplicate arriving later is no longer caught), label `store`.
pub const DEDUPE_EVICTIONS_TOTAL: &str = "switchboard_dedupe_evictions_total";
/// Counter of stream entries a scheduled or explicit trim removed, labels
/// `transport`, `topic`, `policy` (`max_len` / `max_age` / `keep_needed`).
pub const STREAM_TRIMMED_TOTAL: &str = "switchboard_stream_trimmed_total";
/// Gauge of a stream's consumer groups found stale (idle past
/// `stale_group_after`) and kept, labels `transport`, `topic`; set on each
/// `keep_needed` trim. Such a group no longer holds back trimming.
pub const STREAM_STALE_GROUPS: &str = "switchboard_stream_stale_groups";
/// Counter of stale consumer groups a trim destroyed, labels `transport`,
/// `topic`.
pub const STREAM_GROUPS_DESTROYED_TOTAL: &str = "switchboard_stream_groups_destroyed_total";
/// Counter of dead letters evicted because the dead-letter stream was at
/// its bound, labels `transport`, `topic`. Each one is a message lost.
pub const DEAD_LETTERS_EVICTED_TOTAL: &str = "switchboard_dead_letters_evicted_total";

/// Gauge of outbox rows waiting to be sent (parked rows not counted), label
/// `outbox` (the table); sampled by each relay.
pub const OUTBOX_PENDING: &str = "switchboard_outbox_pending";
/// Gauge of the age in seconds of the oldest outbox row waiting: the
/// relay's lag, label `outbox`; sampled by each relay.
pub const OUTBOX_LAG: &str = "switchboard_outbox_lag_seconds";
/// Counter of outbox rows the transport accepted, labels `outbox`, `topic`.
pub const OUTBOX_SENT_TOTAL: &str = "switchboard_outbox_sent_total";
/// Counter of outbox rows parked because the transport refused them for
/// good, labels `outbox`, `topic`. Each one waits for an operator.
pub const OUTBOX_PARKED_TOTAL: &str = "switchboard_outbox_parked_total";
/// Gauge of when a circuit breaker last left the closed state, as Unix
/// seconds, label `breaker`; 0 while it is closed. A half-open trial that
/// fails does not move it, so `time() - this` is how long the dependency
/// has been shut out.
pub const BREAKER_OPEN_SINCE: &str = "switchboard_breaker_open_since_seconds";
/// Gauge of a circuit breaker's reset timeout in seconds, label `breaker`;
/// set with every state change. An alert compares how long the breaker has
/// been open with it (`docs/alerts/`).
pub const BREAKER_RESET_TIMEOUT: &str = "switchboard_breaker_reset_timeout_seconds";
/// Gauge of a path's P99 budget in seconds, label `path`; set with
/// [`LATENCY_P99`] at every budget check.
pub const LATENCY_BUDGET: &str = "switchboard_latency_budget_seconds";
/// Gauge of where a consumer stands, labels `transport`, `topic`, `group`:
/// 0 running, 1 paused (its handler is not ready, such as an open breaker),
/// 2 stopped (shut down or its subscription ended), 3 failed (the handler
/// failed for good: the consumer is dead until restarted).
pub const CONSUMER_STATE: &str = "switchboard_consumer_state";

/// A label value: borrowed when static, shared otherwise.
pub(crate) type Label = Cow<'static, str>;

pub(crate) fn published(transport: &'static str, topic: Label, ok: bool, elapsed: Duration) {
    let outcome = if ok { "ok" } else { "error" };
    let labels = [
        ("transport", Label::Borrowed(transport)),
        ("topic", topic),
        ("outcome", Label::Borrowed(outcome)),
    ];
    metrics::counter!(PUBLISH_TOTAL, &labels).increment(1);
    metrics::histogram!(PUBLISH_DURATION, &labels).record(elapsed);
}

pub(crate) fn consumed(
    transport: &'static str,
    topic: std::sync::Arc<str>,
    group: std::sync::Arc<str>,
    outcome: &'static str,
    elapsed: Duration,
) {
    metrics::counter!(
        CONSUME_TOTAL,
        "transport" => transport,
        "topic" => topic.clone(),
        "group" => group.clone(),
        "outcome" => outcome,
    )
    .increment(1);
    metrics::histogram!(
        CONSUME_DURATION,
        "transport" => transport,
        "topic" => topic.clone(),
        "group" => group.clone(),
        "outcome" => outcome,
    )
    .record(elapsed);
    if outcome == "dead_letter" {
        metrics::counter!(
            DEAD_LETTERS_TOTAL,
            "transport" => transport,
            "topic" => topic,
            "group" => group,
        )
        .increment(1);
    }
}

/// The outcomes [`ConsumeMetrics`] keeps handles for: every `outcome`
/// label of [`CONSUME_TOTAL`].
const CONSUME_OUTCOMES: [&str; 7] = [
    "ack",
    "nack",
    "give_back",
    "dead_letter",
    "rejected",
    "dropped",
    "unsettled",
];

/// The consume metrics of one subscription: each outcome's counter and
/// histogram are looked up in the recorder the first time that outcome
/// happens and kept, so a message costs two atomic updates rather than two
/// label sets built and registered. Only on first use: a series shows up
/// once it has something to count, as with [`consumed`].
pub(crate) struct ConsumeMetrics {
    transport: &'static str,
    topic: std::sync::Arc<str>,
    group: std::sync::Arc<str>,
    handles: [std::sync::OnceLock<(metrics::Counter, metrics::Histogram)>; 7],
}

impl ConsumeMetrics {
    pub(crate) fn new(
        transport: &'static str,
        topic: std::sync::Arc<str>,
        group: std::sync::Arc<str>,
    ) -> Self {
        Self {
            transport,
            topic,
            group,
            handles: Default::default(),
        }
    }

    /// Records one consumed delivery of `topic` (a pattern subscription's
    /// deliveries have topics of their own: those go the long way).
    pub(crate) fn record(
        &self,
        topic: &std::sync::Arc<str>,
        outcome: &'static str,
        elapsed: Duration,
    ) {
        let index = CONSUME_OUTCOMES.iter().position(|known| *known == outcome);
        let ours = std::sync::Arc::ptr_eq(topic, &self.topic) || **topic == *self.topic;
        let (Some(index), true, false) = (index, ours, outcome == "dead_letter") else {
            consumed(
                self.transport,
                topic.clone(),
                self.group.clone(),
                outcome,
                elapsed,
            );
            return;
        };
        let (counter, histogram) = self.handles[index].get_or_init(|| {
            let labels = [
                ("transport", Label::Borrowed(self.transport)),
                ("topic", Label::Owned(self.topic.to_string())),
                ("group", Label::Owned(self.group.to_string())),
                ("outcome", Label::Borrowed(CONSUME_OUTCOMES[index])),
            ];
            (
                metrics::counter!(CONSUME_TOTAL, &labels),
                metrics::histogram!(CONSUME_DURATION, &labels),
            )
        });
        counter.increment(1);
        histogram.record(elapsed);
    }
}

pub(crate) fn called(path: &Label, transport: &Label, outcome: &'static str, elapsed: Duration) {
    let labels = [
        ("path", path.clone()),
        ("transport", transport.clone()),
        ("outcome", Label::Borrowed(outcome)),
    ];
    metrics::counter!(CALL_TOTAL, &labels).increment(1);
    metrics::histogram!(CALL_DURATION, &labels).record(elapsed);
}

pub(crate) fn retried(kind: ErrorKind) {
    metrics::counter!(RETRIES_TOTAL, "kind" => kind_label(kind)).increment(1);
}

pub(crate) fn retry_refused(reason: &'static str) {
    metrics::counter!(RETRIES_REFUSED_TOTAL, "reason" => reason).increment(1);
}

/// A breaker's state change: `left_closed` when it went from closed to open
/// (the moment [`BREAKER_OPEN_SINCE`] records).
pub(crate) fn breaker_changed(
    breaker: &str,
    to: &'static str,
    level: f64,
    left_closed: bool,
    reset_timeout: Duration,
) {
    let name = Label::Owned(breaker.to_owned());
    metrics::counter!(BREAKER_TRANSITIONS_TOTAL, "breaker" => name.clone(), "to" => to)
        .increment(1);
    metrics::gauge!(BREAKER_STATE, "breaker" => name.clone()).set(level);
    metrics::gauge!(BREAKER_RESET_TIMEOUT, "breaker" => name.clone())
        .set(reset_timeout.as_secs_f64());
    let since = metrics::gauge!(BREAKER_OPEN_SINCE, "breaker" => name);
    if to == "closed" {
        since.set(0.0);
    } else if left_closed {
        since.set(unix_seconds_now());
    }
}

fn unix_seconds_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |since| since.as_secs_f64())
}

pub(crate) fn dead_letter_depth(transport: &'static str, topic: &str, depth: usize) {
    metrics::gauge!(DEAD_LETTER_DEPTH, "transport" => transport, "topic" => topic.to_owned())
        .set(depth as f64);
}

pub(crate) fn dedupe_hit(
    topic: std::sync::Arc<str>,
    group: std::sync::Arc<str>,
    state: &'static str,
) {
    metrics::counter!(DEDUPE_HITS_TOTAL, "topic" => topic, "group" => group, "state" => state)
        .increment(1);
}

pub(crate) fn budget_checked(path: &str, p99: Duration, budget: Duration, breached: bool) {
    metrics::gauge!(LATENCY_P99, "path" => path.to_owned()).set(p99.as_secs_f64());
    metrics::gauge!(LATENCY_BUDGET, "path" => path.to_owned()).set(budget.as_secs_f64());
    if breached {
        metrics::counter!(BUDGET_BREACHES_TOTAL, "path" => path.to_owned()).increment(1);
    }
}

#[cfg_attr(not(feature = "redis-pubsub"), allow(dead_code))]
pub(crate) fn dropped(transport: &'static str, topic: std::sync::Arc<str>, reason: &'static str) {
    metrics::counter!(DROPPED_TOTAL, "transport" => transport, "topic" => topic, "reason" => reason)
        .increment(1);
}

#[cfg_attr(not(any(feature = "grpc", feature = "http")), allow(dead_code))]
pub(crate) fn push_refused(transport: &'static str, topic: std::sync::Arc<str>) {
    metrics::counter!(PUSH_REFUSED_TOTAL, "transport" => transport, "topic" => topic).increment(1);
}

pub(crate) fn consumer_lag(
    transport: &'static str,
    topic: std::sync::Arc<str>,
    group: std::sync::Arc<str>,
    lag: u64,
) {
    metrics::gauge!(CONSUMER_LAG, "transport" => transport, "topic" => topic, "group" => group)
        .set(lag as f64);
}

#[cfg_attr(not(feature = "redis-streams"), allow(dead_code))]
pub(crate) fn stream_trimmed(
    transport: &'static str,
    topic: std::sync::Arc<str>,
    policy: &'static str,
    trimmed: u64,
) {
    metrics::counter!(STREAM_TRIMMED_TOTAL, "transport" => transport, "topic" => topic, "policy" => policy)
        .increment(trimmed);
}

#[cfg_attr(not(feature = "redis-streams"), allow(dead_code))]
pub(crate) fn stale_groups(
    transport: &'static str,
    topic: std::sync::Arc<str>,
    kept: usize,
    destroyed: usize,
) {
    metrics::gauge!(STREAM_STALE_GROUPS, "transport" => transport, "topic" => topic.clone())
        .set(kept as f64);
    if destroyed > 0 {
        metrics::counter!(STREAM_GROUPS_DESTROYED_TOTAL, "transport" => transport, "topic" => topic)
            .increment(destroyed as u64);
    }
}

#[cfg_attr(not(feature = "redis-streams"), allow(dead_code))]
pub(crate) fn dead_letter_evicted(transport: &'static str, topic: std::sync::Arc<str>) {
    metrics::counter!(DEAD_LETTERS_EVICTED_TOTAL, "transport" => transport, "topic" => topic)
        .increment(1);
}

#[cfg_attr(not(feature = "outbox"), allow(dead_code))]
pub(crate) fn outbox_pending(outbox: Label, pending: u64, lag_seconds: f64) {
    metrics::gauge!(OUTBOX_PENDING, "outbox" => outbox.clone()).set(pending as f64);
    metrics::gauge!(OUTBOX_LAG, "outbox" => outbox).set(lag_seconds);
}

#[cfg_attr(not(feature = "outbox"), allow(dead_code))]
pub(crate) fn outbox_sent(outbox: Label, topic: &str, count: u64) {
    metrics::counter!(OUTBOX_SENT_TOTAL, "outbox" => outbox, "topic" => topic.to_owned())
        .increment(count);
}

#[cfg_attr(not(feature = "outbox"), allow(dead_code))]
pub(crate) fn outbox_parked(outbox: Label, topic: &str) {
    metrics::counter!(OUTBOX_PARKED_TOTAL, "outbox" => outbox, "topic" => topic.to_owned())
        .increment(1);
}

/// The value [`CONSUMER_STATE`] gives a consumer's health, or 3 for a
/// consumer whose handler failed for good.
pub(crate) fn consumer_state(
    transport: &'static str,
    topic: &str,
    group: &str,
    state: Option<crate::bus::ConsumerHealth>,
) {
    use crate::bus::ConsumerHealth;
    let level = match state {
        Some(ConsumerHealth::Running) => 0.0,
        Some(ConsumerHealth::Paused) => 1.0,
        Some(ConsumerHealth::Stopped) => 2.0,
        None => 3.0,
    };
    metrics::gauge!(
        CONSUMER_STATE,
        "transport" => transport,
        "topic" => topic.to_owned(),
        "group" => group.to_owned(),
    )
    .set(level);
}

/// The eviction counter of a dedupe store, to look up once and keep: a
/// store full to capacity evicts on every new mark.
pub(crate) fn dedupe_evictions(store: &'static str) -> metrics::Counter {
    metrics::counter!(DEDUPE_EVICTIONS_TOTAL, "store" => store)
}

/// The `outcome` / `kind` label of an error kind: one snake-case word, the
/// same as in JSON error bodies.
pub(crate) fn kind_label(kind: ErrorKind) -> &'static str {
    crate::error::kind_name(kind)
}

/// Registers a description and unit for every metric above with the
/// installed recorder, so an exporter can print them (Prometheus `# HELP`).
/// Call once, after installing the recorder; recording works without it.
///
/// ```
/// let recorder = metrics_util::debugging::DebuggingRecorder::new();
/// let snapshotter = recorder.snapshotter();
/// metrics::with_local_recorder(&recorder, || {
///     switchboard::observe::metrics::describe();
///     metrics::counter!(switchboard::observe::metrics::RETRIES_TOTAL).increment(1);
/// });
/// let (_, _, help, _) = snapshotter.snapshot().into_vec().pop().unwrap();
/// assert!(help.unwrap().contains("retries"));
/// ```
pub fn describe() {
    use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
    describe_counter!(PUBLISH_TOTAL, Unit::Count, "events published, by outcome");
    describe_histogram!(
        PUBLISH_DURATION,
        Unit::Seconds,
        "time until the transport accepted a publish"
    );
    describe_counter!(
        CONSUME_TOTAL,
        Unit::Count,
        "deliveries consumed, by how they were settled"
    );
    describe_histogram!(
        CONSUME_DURATION,
        Unit::Seconds,
        "time from a delivery's decode to its settlement"
    );
    describe_counter!(CALL_TOTAL, Unit::Count, "calls of a path, by outcome");
    describe_histogram!(CALL_DURATION, Unit::Seconds, "latency of a path's calls");
    describe_counter!(
        RETRIES_TOTAL,
        Unit::Count,
        "retries, by the error kind retried"
    );
    describe_counter!(
        RETRIES_REFUSED_TOTAL,
        Unit::Count,
        "retries not made: the budget was spent, or the call may have taken effect"
    );
    describe_counter!(
        BREAKER_TRANSITIONS_TOTAL,
        Unit::Count,
        "circuit-breaker state changes"
    );
    describe_gauge!(
        BREAKER_STATE,
        "circuit-breaker state: 0 closed, 1 half open, 2 open"
    );
    describe_counter!(
        DEAD_LETTERS_TOTAL,
        Unit::Count,
        "messages dead-lettered by consumers"
    );
    describe_gauge!(
        DEAD_LETTER_DEPTH,
        Unit::Count,
        "dead letters waiting, as last listed in full"
    );
    describe_counter!(
        DEDUPE_HITS_TOTAL,
        Unit::Count,
        "duplicate events caught by dedupe"
    );
    describe_counter!(
        BUDGET_BREACHES_TOTAL,
        Unit::Count,
        "budget checks that found a path's P99 over its budget"
    );
    describe_gauge!(
        LATENCY_P99,
        Unit::Seconds,
        "a path's P99 latency over the last budget-check window"
    );
    describe_counter!(
        DROPPED_TOTAL,
        Unit::Count,
        "messages dropped because a bounded queue was full"
    );
    describe_counter!(
        PUSH_REFUSED_TOTAL,
        Unit::Count,
        "pushed messages refused (retry later) because the receiver's queue was full"
    );
    describe_gauge!(
        CONSUMER_LAG,
        Unit::Count,
        "messages not yet delivered to a consumer group"
    );
    describe_gauge!(
        OUTBOX_PENDING,
        Unit::Count,
        "outbox rows waiting to be sent (parked rows not counted)"
    );
    describe_gauge!(
        OUTBOX_LAG,
        Unit::Seconds,
        "age of the oldest outbox row waiting to be sent"
    );
    describe_counter!(
        OUTBOX_SENT_TOTAL,
        Unit::Count,
        "outbox rows the transport accepted"
    );
    describe_counter!(
        OUTBOX_PARKED_TOTAL,
        Unit::Count,
        "outbox rows parked: the transport refused them for good"
    );
    describe_counter!(
        DEDUPE_EVICTIONS_TOTAL,
        Unit::Count,
        "dedupe marks evicted for room before their TTL"
    );
    describe_gauge!(
        BREAKER_OPEN_SINCE,
        Unit::Seconds,
        "when a circuit breaker last left closed (Unix time; 0 while closed)"
    );
    describe_gauge!(
        BREAKER_RESET_TIMEOUT,
        Unit::Seconds,
        "a circuit breaker's reset timeout"
    );
    describe_gauge!(LATENCY_BUDGET, Unit::Seconds, "a path's P99 budget");
    describe_gauge!(
        CONSUMER_STATE,
        "a consumer's state: 0 running, 1 paused, 2 stopped, 3 failed"
    );
}
