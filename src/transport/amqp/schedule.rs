//! Scheduled publishing on plain RabbitMQ (no plugin): delay buckets.
//!
//! RabbitMQ expires only the head of a queue, so one queue with a TTL per
//! message cannot hold several delays; a queue whose *every* message has the
//! same TTL (`x-message-ttl`) expires them in order. So a scheduled message
//! waits in a ladder of such **buckets**, `<exchange>.delay.<ttl>ms` with
//! TTLs of 10 ms × 2^k (k = 0..=27, so up to about 15.5 days per hop): quorum
//! queues that dead-letter **at least once** (`x-dead-letter-strategy =
//! at-least-once`, `x-overflow = reject-publish`) to one queue,
//! `<exchange>.delay.due`. A mover in every transport consumes that queue
//! (see [`mover`](super::mover)): a message whose time has not come goes
//! into the largest bucket that does not overshoot what is left (rounded up
//! to 10 ms); one whose time has come is published — through the topic
//! exchange, so every group gets it — and only then acked. An arbitrary
//! delay takes as many hops as its binary digits in units of 10 ms (a day:
//! at most 23), never one queue per distinct delay.
//!
//! Names are new queues, declared on first use with the arguments above; no
//! existing queue gets an argument (which RabbitMQ would refuse with
//! `PRECONDITION_FAILED`). Changing the ladder means new names.
//!
//! Where a message goes when due is in its headers: `x-sb-due-at` (Unix
//! milliseconds, the publisher's clock) and `x-sb-scheduled-topic` (the
//! routing key). Like every `x-sb-` header, they are not handed to
//! consumers.

use std::collections::{HashMap, HashSet};
use std::sync::{Mutex, Weak};
use std::time::Duration;

use bytes::Bytes;
use chrono::{DateTime, Utc};
use lapin::BasicProperties;
use lapin::options::QueueDeclareOptions;
use lapin::types::{AMQPValue, FieldTable, ShortString};
use tokio::time::Instant;

use super::connection::{CLOSE_TIMEOUT, Link};
use super::declare::long_string;
use super::error::amqp_error;
use super::properties::{self, publish_properties};
use super::publisher::publish_direct;
use super::{AmqpConfig, Shared, lock};
use crate::error::{Error, ErrorKind};
use crate::transport::{RawMessage, due_millis, validate_name};

/// When the message is due: Unix milliseconds.
pub(crate) const DUE_AT: &str = "x-sb-due-at";
/// The topic (routing key) it is published to when due.
pub(crate) const SCHEDULED_TOPIC: &str = "x-sb-scheduled-topic";
/// Or the one queue it goes back to when due (a nack's delay outliving its
/// subscription).
pub(crate) const SCHEDULED_QUEUE: &str = "x-sb-scheduled-queue";
/// The shortest bucket's TTL: the ladder's unit.
pub const BUCKET_UNIT: Duration = Duration::from_millis(10);
/// The longest bucket is `BUCKET_UNIT × 2^TOP_LEVEL`.
const TOP_LEVEL: u32 = 27;
/// The first and the longest pause before a bucket's refused (nacked)
/// publish is sent again.
const NACKED_PAUSE: (Duration, Duration) = (Duration::from_millis(10), Duration::from_millis(200));
/// How long a delay bucket that confirmed nothing is passed over before it
/// is tried again (see [`into_bucket`]).
pub(crate) const SILENT_BUCKET_RECHECK: Duration = Duration::from_secs(5 * 60);
/// What the broker adds when it dead-letters, dropped before the next hop
/// (a message would otherwise carry one `x-death` entry per bucket).
pub(crate) const BROKER_HEADERS: &[&str] = &[
    "x-death",
    "x-first-death-exchange",
    "x-first-death-queue",
    "x-first-death-reason",
    "x-last-death-exchange",
    "x-last-death-queue",
    "x-last-death-reason",
    "x-delivery-count",
];

/// Which buckets this transport declared, per publishing connection.
#[derive(Default)]
pub(crate) struct Scheduled {
    declared: Mutex<HashSet<(u64, u32)>>,
    /// Buckets that confirmed nothing, per publishing connection, and since
    /// when (see [`into_bucket`]).
    passed_over: Mutex<HashMap<(u64, u32), Instant>>,
    pub(super) mover: Mutex<Option<tokio::task::AbortHandle>>,
    /// The mover's channel, kept here too so that closing the transport
    /// closes it politely before the connection: dropped by the aborted
    /// task alone, lapin would close it on its own while the connection
    /// closes, and log that as a connection error.
    pub(super) mover_channel: Mutex<Option<lapin::Channel>>,
}

impl Scheduled {
    /// Whether the bucket of `level` is passed over on connection
    /// `generation`.
    fn passes_over(&self, generation: u64, level: u32) -> bool {
        let mut passed_over = lock(&self.passed_over);
        passed_over.retain(|_, since| since.elapsed() < SILENT_BUCKET_RECHECK);
        passed_over.contains_key(&(generation, level))
    }

    fn pass_over(&self, generation: u64, level: u32) {
        lock(&self.passed_over).insert((generation, level), Instant::now());
    }

    /// Stops the mover (on close; dropping the transport stops it too).
    pub(crate) fn stop(&self) {
        if let Some(task) = lock(&self.mover).take() {
            task.abort();
        }
    }

    /// Stops the mover and closes its channel, within [`CLOSE_TIMEOUT`].
    pub(crate) async fn stop_and_close(&self) {
        self.stop();
        let channel = lock(&self.mover_channel).take();
        if let Some(channel) = channel.filter(|channel| channel.status().connected()) {
            let _ = tokio::time::timeout(CLOSE_TIMEOUT, channel.close(200, "closing".into())).await;
        }
    }
}

impl Drop for Scheduled {
    fn drop(&mut self) {
        self.stop();
    }
}

impl AmqpConfig {
    /// The queue every bucket dead-letters into and the movers consume:
    /// `<exchange>.delay.due`.
    pub fn due_queue(&self) -> String {
        format!("{}.delay.due", self.exchange)
    }

    /// The bucket of `level`: `<exchange>.delay.<ttl>ms`.
    pub(crate) fn bucket_queue(&self, level: u32) -> String {
        format!(
            "{}.delay.{}ms",
            self.exchange,
            bucket_ttl(level).as_millis()
        )
    }
}

fn bucket_ttl(level: u32) -> Duration {
    BUCKET_UNIT * (1_u32 << level)
}

/// The bucket for a message with `left` to wait: the largest whose TTL is
/// not above `left` rounded up to the unit; `None` when nothing is left.
pub(crate) fn bucket_for(left: Duration) -> Option<u32> {
    if left.is_zero() {
        return None;
    }
    let unit = BUCKET_UNIT.as_nanos();
    let units = left.as_nanos().div_ceil(unit);
    Some((units.ilog2()).min(TOP_LEVEL))
}

/// How long until `due_at_ms` (Unix milliseconds) by this machine's clock.
pub(crate) fn left_until(due_at_ms: i64) -> Duration {
    let now = Utc::now().timestamp_millis();
    Duration::from_millis(due_at_ms.saturating_sub(now).max(0) as u64)
}

/// Schedules `message` for `topic` at `at`: into the bucket for the time
/// left, or, when it is due already, an ordinary publish.
pub(crate) async fn publish_at(
    shared: &Shared,
    topic: &str,
    message: RawMessage,
    at: DateTime<Utc>,
) -> Result<(), Error> {
    validate_name("topic", topic)?;
    let due_at = due_millis(at);
    let Some(level) = bucket_for(left_until(due_at)) else {
        return super::publisher::publish(shared, topic, message).await;
    };
    let properties = properties::with_headers(
        &publish_properties(&message, &shared.config.content_type),
        &[
            (DUE_AT, due_at.to_string()),
            (SCHEDULED_TOPIC, topic.to_owned()),
        ],
        &[],
    );
    into_bucket(shared, level, &message.body, properties).await
}

/// Publishes a message (confirmed) into the bucket of `level`, declaring
/// the bucket and the due queue first on this connection. A bucket that
/// confirms nothing within the publish timeout while the broker does not
/// block publishing is passed over on this connection for
/// [`SILENT_BUCKET_RECHECK`], and the message goes into the next shorter
/// bucket (one hop more, never early): such a bucket can be a quorum queue
/// that a broker crash left without a leader (see the
/// [transport's docs](super#scheduled-messages)), and would otherwise hold
/// up every message that needs it for ever.
pub(crate) async fn into_bucket(
    shared: &Shared,
    mut level: u32,
    body: &Bytes,
    properties: BasicProperties,
) -> Result<(), Error> {
    loop {
        let generation = ensure_bucket(shared, level).await?;
        if level > 0 && shared.scheduled.passes_over(generation, level) {
            level -= 1;
            continue;
        }
        match publish_into(shared, level, body, properties.clone()).await {
            Err(error)
                if error.kind() == ErrorKind::Timeout
                    && level > 0
                    && shared.supervisor.blocked().is_none() =>
            {
                tracing::warn!(
                    %error,
                    queue = shared.config.bucket_queue(level),
                    "amqp: a delay bucket confirms nothing; using shorter buckets on this connection \
                     (a quorum queue without a leader after a broker crash? delete it, and it is declared again)"
                );
                shared.scheduled.pass_over(generation, level);
                level -= 1;
            }
            other => return other,
        }
    }
}

async fn publish_into(
    shared: &Shared,
    level: u32,
    body: &Bytes,
    properties: BasicProperties,
) -> Result<(), Error> {
    let queue = shared.config.bucket_queue(level);
    let deadline = Instant::now() + shared.config.publish_timeout;
    let mut pause = NACKED_PAUSE.0;
    loop {
        match publish_direct(shared, &queue, body, properties.clone()).await {
            // Deleted behind our back (by hand, or an `x-expires`): declare
            // it again and try once more.
            Err(error) if error.kind() == ErrorKind::NotFound => {
                lock(&shared.scheduled.declared).clear();
                ensure_bucket(shared, level).await?;
                return publish_direct(shared, &queue, body, properties).await;
            }
            // A quorum queue just declared can refuse (nack) publishes while
            // it settles: the broker did not take the message, so sending it
            // again is safe, within the publish timeout.
            Err(error)
                if error.kind() == ErrorKind::Unavailable && Instant::now() + pause < deadline =>
            {
                tracing::debug!(%error, queue, "amqp: a delay bucket refused a message; sending it again");
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(NACKED_PAUSE.1);
            }
            other => return other,
        }
    }
}

/// Declares the due queue and every bucket up to the one of `longest`.
pub(crate) async fn declare_buckets(shared: &Shared, longest: Duration) -> Result<(), Error> {
    let top = bucket_for(longest).unwrap_or(0);
    for level in 0..=top {
        ensure_bucket(shared, level).await?;
    }
    Ok(())
}

/// Declares the bucket of `level` on the publishing connection unless done
/// already; the connection's generation.
async fn ensure_bucket(shared: &Shared, level: u32) -> Result<u64, Error> {
    let deadline = Instant::now() + shared.config.publish_timeout;
    let link = shared.supervisor.wait_link(deadline).await?;
    if lock(&shared.scheduled.declared).contains(&(link.generation, level)) {
        return Ok(link.generation);
    }
    let declared = declare_bucket(&shared.config, &link, level);
    let guarded = shared.supervisor.guard(link.generation, declared);
    tokio::time::timeout_at(deadline, guarded)
        .await
        .unwrap_or_else(|_| {
            Err(Error::new(
                ErrorKind::Timeout,
                "amqp: the broker did not answer the delay bucket's declaration in time",
            ))
        })
        .inspect_err(|error| shared.supervisor.failed(&link, error))?;
    lock(&shared.scheduled.declared).insert((link.generation, level));
    Ok(link.generation)
}

async fn declare_bucket(config: &AmqpConfig, link: &Link, level: u32) -> Result<(), Error> {
    let channel = link
        .connection
        .create_channel()
        .await
        .map_err(|error| amqp_error("open a channel", error))?;
    let declared = async {
        declare_due_queue(config, &channel).await?;
        channel
            .queue_declare(
                config.bucket_queue(level).as_str().into(),
                durable(),
                bucket_arguments(config, level),
            )
            .await
            .map_err(|error| amqp_error("declare a delay bucket", error))?;
        Ok(())
    }
    .await;
    let _ = tokio::time::timeout(CLOSE_TIMEOUT, channel.close(200, "declared".into())).await;
    declared
}

/// Declares `<exchange>.delay.due` (a quorum queue) on `channel`.
pub(crate) async fn declare_due_queue(
    config: &AmqpConfig,
    channel: &lapin::Channel,
) -> Result<(), Error> {
    let mut arguments = FieldTable::default();
    arguments.insert(ShortString::from("x-queue-type"), long_string("quorum"));
    if let Some(expires) = config.queue_expires {
        arguments.insert(ShortString::from("x-expires"), millis(expires));
    }
    channel
        .queue_declare(config.due_queue().as_str().into(), durable(), arguments)
        .await
        .map_err(|error| amqp_error("declare the due queue of scheduled messages", error))?;
    Ok(())
}

fn bucket_arguments(config: &AmqpConfig, level: u32) -> FieldTable {
    let ttl = bucket_ttl(level);
    let mut arguments = FieldTable::default();
    let mut set = |name: &str, value: AMQPValue| {
        arguments.insert(ShortString::from(name), value);
    };
    set("x-queue-type", long_string("quorum"));
    set("x-message-ttl", millis(ttl));
    set("x-dead-letter-exchange", long_string(""));
    set(
        "x-dead-letter-routing-key",
        long_string(&config.due_queue()),
    );
    set("x-dead-letter-strategy", long_string("at-least-once"));
    set("x-overflow", long_string("reject-publish"));
    if let Some(expires) = config.queue_expires {
        // Every publish declares the bucket again, so a message in it
        // expires out of it long before the bucket could.
        set("x-expires", millis(expires.max(ttl * 2)));
    }
    arguments
}

fn durable() -> QueueDeclareOptions {
    QueueDeclareOptions {
        durable: true,
        ..QueueDeclareOptions::default()
    }
}

fn millis(duration: Duration) -> AMQPValue {
    AMQPValue::LongLongInt(duration.as_millis().clamp(1, i64::MAX as u128) as i64)
}

/// Starts the transport's mover (see [`mover`](super::mover)).
pub(crate) fn start_mover(shared: &std::sync::Arc<Shared>) {
    let weak: Weak<Shared> = std::sync::Arc::downgrade(shared);
    let task = tokio::spawn(super::mover::run(weak));
    *lock(&shared.scheduled.mover) = Some(task.abort_handle());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bucket_never_overshoots_the_time_left_rounded_up_to_the_unit() {
        assert_eq!(bucket_for(Duration::ZERO), None);
        assert_eq!(bucket_for(Duration::from_millis(3)), Some(0), "10 ms");
        assert_eq!(bucket_for(Duration::from_millis(10)), Some(0));
        assert_eq!(bucket_for(Duration::from_millis(19)), Some(1), "20 ms");
        assert_eq!(bucket_for(Duration::from_millis(1_500)), Some(7), "1280 ms");
        // `declare_delay_buckets`: levels 0 to these, as its docs count them.
        assert_eq!(
            bucket_for(Duration::from_secs(60)),
            Some(12),
            "13 for a minute"
        );
        assert_eq!(
            bucket_for(Duration::from_secs(86_400)),
            Some(23),
            "24 for a day"
        );
        assert_eq!(
            bucket_for(Duration::from_secs(365 * 86_400)),
            Some(TOP_LEVEL),
            "a year cycles through the top bucket"
        );
    }

    #[test]
    fn a_delay_takes_one_hop_per_binary_digit() {
        let mut left = Duration::from_millis(1_500);
        let mut hops = Vec::new();
        while let Some(level) = bucket_for(left) {
            hops.push(bucket_ttl(level).as_millis());
            left = left.saturating_sub(bucket_ttl(level));
        }
        assert_eq!(hops, vec![1280, 160, 40, 20]);
    }

    #[test]
    fn buckets_dead_letter_at_least_once_to_the_due_queue() {
        let config = AmqpConfig::new("amqp://127.0.0.1").with_exchange("platform");
        assert_eq!(config.bucket_queue(0), "platform.delay.10ms");
        assert_eq!(config.due_queue(), "platform.delay.due");
        let arguments = bucket_arguments(&config, 3);
        let inner = arguments.inner();
        assert_eq!(inner["x-message-ttl"], AMQPValue::LongLongInt(80));
        assert_eq!(
            inner["x-dead-letter-strategy"],
            long_string("at-least-once")
        );
        assert_eq!(inner["x-overflow"], long_string("reject-publish"));
        assert_eq!(
            inner["x-dead-letter-routing-key"],
            long_string("platform.delay.due")
        );
        assert!(!inner.contains_key("x-expires"));
    }
}
