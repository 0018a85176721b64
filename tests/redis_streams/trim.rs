//! Trimming: `KeepNeeded` never removes what a group still needs, a stale
//! group stops pinning it, group-less streams are trimmed by length or age,
//! and a bounded dead-letter stream warns when it evicts.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use redis::aio::MultiplexedConnection;
use redis::streams::{StreamRangeReply, StreamReadOptions, StreamReadReply};
use redis::{AsyncCommands, Value};
use switchboard::transport::redis_streams::{
    KeepNeeded, RedisStreamsConfig, RedisStreamsTransport, TrimPolicy,
};
use switchboard::{
    DeadLetter, Publisher, RawMessage, SubscribeOptions, Subscriber, Topology, Transport,
};
use tracing::field::{Field, Visit};
use tracing_subscriber::layer::{Context, SubscriberExt};

const PATIENCE: Duration = Duration::from_secs(30);

fn unique(label: &str) -> String {
    format!("rs-trim-{label}-{}", uuid::Uuid::new_v4().simple())
}

fn config() -> RedisStreamsConfig {
    RedisStreamsConfig::default()
        .with_key_prefix(format!("sb-test-{}:", uuid::Uuid::new_v4().simple()))
        .with_block(Duration::from_secs(1))
}

async fn connect(config: RedisStreamsConfig) -> RedisStreamsTransport {
    RedisStreamsTransport::connect_with(&super::redis_url(), config)
        .await
        .expect("connect to Redis")
}

async fn raw() -> MultiplexedConnection {
    redis::Client::open(super::redis_url())
        .expect("client")
        .get_multiplexed_async_connection()
        .await
        .expect("connect to Redis")
}

async fn ids(conn: &mut MultiplexedConnection, key: &str) -> Vec<String> {
    let reply: StreamRangeReply = conn.xrange_all(key).await.expect("XRANGE");
    reply.ids.into_iter().map(|entry| entry.id).collect()
}

/// Reads up to `count` new entries for `group` as `consumer`; their ids.
async fn read(
    conn: &mut MultiplexedConnection,
    key: &str,
    group: &str,
    consumer: &str,
    count: usize,
) -> Vec<String> {
    let options = StreamReadOptions::default()
        .group(group, consumer)
        .count(count);
    let reply: StreamReadReply = conn
        .xread_options(&[key], &[">"], &options)
        .await
        .expect("XREADGROUP");
    reply
        .keys
        .into_iter()
        .flat_map(|key| key.ids)
        .map(|entry| entry.id)
        .collect()
}

async fn ack(conn: &mut MultiplexedConnection, key: &str, group: &str, ids: &[String]) {
    let _: i64 = conn.xack(key, group, ids).await.expect("XACK");
}

async fn publish_n(transport: &RedisStreamsTransport, topic: &str, n: usize) {
    let messages = (0..n)
        .map(|i| RawMessage::new(format!("{{\"n\":{i}}}")))
        .collect();
    transport
        .publish_batch(topic, messages)
        .await
        .expect("publish");
}

/// Polls `check` until it holds or [`PATIENCE`] runs out.
async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while !check().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting: {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn cleanup(conn: &mut MultiplexedConnection, transport: &RedisStreamsTransport, topic: &str) {
    let _: i64 = conn
        .del(&[
            transport.stream_key(topic),
            transport.dead_letter_key(topic),
        ])
        .await
        .expect("DEL");
}

#[tokio::test]
async fn an_entry_pending_in_any_group_survives_a_trim() {
    // An hour between scheduled runs: only the explicit trims below run.
    let keep = KeepNeeded::every(Duration::from_secs(3600));
    let transport = connect(config().with_trim(TrimPolicy::KeepNeeded(keep))).await;
    let topic = unique("pending");
    let key = transport.stream_key(&topic);
    transport
        .declare(&Topology::new().with_groups(&topic, ["first", "second"]))
        .await
        .expect("declare");
    publish_n(&transport, &topic, 10).await;
    let mut conn = raw().await;
    let all = ids(&mut conn, &key).await;
    assert_eq!(all.len(), 10);

    // `first` read everything and left entry 3 pending; `second` read and
    // acknowledged 8 entries and has not read the last two.
    let read_first = read(&mut conn, &key, "first", "a", 10).await;
    let acked: Vec<String> = read_first
        .iter()
        .filter(|id| **id != all[3])
        .cloned()
        .collect();
    ack(&mut conn, &key, "first", &acked).await;
    let read_second = read(&mut conn, &key, "second", "b", 8).await;
    ack(&mut conn, &key, "second", &read_second).await;

    let report = transport.trim(&topic).await.expect("trim");
    assert_eq!(report.trimmed, 3, "{report:?}");
    assert_eq!(report.min_id.as_deref(), Some(all[3].as_str()));
    assert_eq!(
        ids(&mut conn, &key).await,
        all[3..],
        "the pending entry and what follows stay"
    );

    // Once acknowledged, `second`'s unread entries are the oldest needed.
    ack(&mut conn, &key, "first", &[all[3].clone()]).await;
    let report = transport.trim(&topic).await.expect("trim");
    assert_eq!(report.trimmed, 5, "{report:?}");
    assert_eq!(
        ids(&mut conn, &key).await,
        all[8..],
        "entries a group has not read stay"
    );

    cleanup(&mut conn, &transport, &topic).await;
}

#[tokio::test]
async fn an_abandoned_group_stops_pinning_after_its_timeout() {
    let stale_after = Duration::from_secs(3);
    let keep = KeepNeeded::every(Duration::from_millis(100))
        .with_stale_group_after(stale_after)
        .with_destroy_stale(true);
    let transport = connect(config().with_trim(TrimPolicy::KeepNeeded(keep))).await;
    let topic = unique("abandoned");
    let key = transport.stream_key(&topic);
    transport
        .declare(&Topology::new().with_groups(&topic, ["live", "ghost"]))
        .await
        .expect("declare");
    // A live subscriber reads (and so stays active) every `block`.
    let mut live = transport
        .subscribe(&topic, SubscribeOptions::new("live"))
        .await
        .expect("subscribe");
    publish_n(&transport, &topic, 5).await;
    let mut conn = raw().await;
    let all = ids(&mut conn, &key).await;
    // The ghost reads everything and never acknowledges nor reads again.
    assert_eq!(read(&mut conn, &key, "ghost", "gone", 5).await, all);
    for _ in 0..5 {
        let delivery = tokio::time::timeout(PATIENCE, live.recv())
            .await
            .expect("a delivery in time")
            .expect("a delivery");
        delivery.ack().await.expect("ack");
    }

    // Fresh, the ghost's pending entries pin the trim.
    let report = transport.trim(&topic).await.expect("trim");
    assert!(report.stale_groups.is_empty(), "{report:?}");
    assert_eq!(ids(&mut conn, &key).await, all);

    // Past `stale_after` the scheduled trim destroys it and trims.
    eventually("the ghost group destroyed and its entries trimmed", || {
        let mut conn = conn.clone();
        let key = key.clone();
        async move {
            let groups: Vec<Value> = redis::cmd("XINFO")
                .arg("GROUPS")
                .arg(&key)
                .query_async(&mut conn)
                .await
                .expect("XINFO GROUPS");
            let len: usize = conn.xlen(&key).await.expect("XLEN");
            groups.len() == 1 && len == 0
        }
    })
    .await;
    live.shutdown().await.expect("shutdown");
    cleanup(&mut conn, &transport, &topic).await;
}

#[tokio::test]
async fn a_stream_without_groups_is_trimmed_by_age_or_length() {
    let aged = unique("aged");
    let long = unique("long");
    let transport = connect(
        config()
            .with_topic_trim(
                &aged,
                TrimPolicy::MaxAge {
                    max_age: Duration::from_millis(300),
                    every: Duration::from_millis(100),
                },
            )
            .with_topic_trim(&long, TrimPolicy::MaxLen(10)),
    )
    .await;
    let mut conn = raw().await;

    // Publishing starts the scheduled trim; entries older than the age go.
    publish_n(&transport, &aged, 3).await;
    let aged_key = transport.stream_key(&aged);
    eventually("entries past max_age trimmed", || {
        let mut conn = conn.clone();
        let key = aged_key.clone();
        async move { conn.xlen::<_, usize>(&key).await.expect("XLEN") == 0 }
    })
    .await;

    // `MAXLEN ~ 10` keeps at least 10, and drops whole nodes (100 entries
    // each by default) beyond that.
    publish_n(&transport, &long, 300).await;
    transport.trim(&long).await.expect("trim");
    let len: usize = conn.xlen(transport.stream_key(&long)).await.expect("XLEN");
    assert!((10..300).contains(&len), "XLEN {len}");

    cleanup(&mut conn, &transport, &aged).await;
    cleanup(&mut conn, &transport, &long).await;
}

/// Counts warnings whose message mentions the dead-letter bound.
#[derive(Clone, Default)]
struct BoundWarnings(Arc<Mutex<usize>>);

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for BoundWarnings {
    fn on_event(&self, event: &tracing::Event<'_>, _: Context<'_, S>) {
        struct Message(bool);
        impl Visit for Message {
            fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
                if field.name() == "message" && format!("{value:?}").contains("dlq_max_len") {
                    self.0 = true;
                }
            }
        }
        let mut message = Message(false);
        event.record(&mut message);
        if *event.metadata().level() == tracing::Level::WARN && message.0 {
            *self.0.lock().unwrap() += 1;
        }
    }
}

// One thread: the warning is emitted on the task that dead-letters, which
// runs where the subscriber installed below is the default.
#[tokio::test(flavor = "current_thread")]
async fn a_dead_letter_stream_at_its_bound_warns_and_keeps_the_newest() {
    let warnings = BoundWarnings::default();
    let _guard =
        tracing::subscriber::set_default(tracing_subscriber::registry().with(warnings.clone()));
    let transport = connect(config().with_dlq_max_len(2)).await;
    let topic = unique("dlq");
    let mut subscription = transport
        .subscribe(&topic, SubscribeOptions::new("g"))
        .await
        .expect("subscribe");
    for i in 0..3_usize {
        let message =
            RawMessage::new("poison").with_header(switchboard::header::EVENT_ID, format!("p-{i}"));
        transport.publish(&topic, message).await.expect("publish");
        let delivery = tokio::time::timeout(PATIENCE, subscription.recv())
            .await
            .expect("a delivery in time")
            .expect("a delivery");
        delivery
            .dead_letter(DeadLetter::new("test: poison"))
            .await
            .expect("dead-letter");
        assert_eq!(
            *warnings.0.lock().unwrap(),
            i.saturating_sub(1),
            "after letter {i}"
        );
    }
    let letters = transport
        .dead_letters()
        .expect("a DLQ")
        .list(&topic, 10)
        .await
        .expect("list");
    let kept: Vec<&str> = letters.iter().map(|letter| letter.id.as_str()).collect();
    assert_eq!(kept, ["p-1", "p-2"], "the oldest is evicted at the bound");
    subscription.shutdown().await.expect("shutdown");
    let mut conn = raw().await;
    cleanup(&mut conn, &transport, &topic).await;
}
