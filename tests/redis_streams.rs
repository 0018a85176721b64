//! The Redis Streams transport passes the whole conformance suite against
//! the machine's Redis (127.0.0.1:6379, or `SWITCHBOARD_REDIS_URL`). Every
//! case uses random topic names, and each transport a random key prefix and
//! consumer name, so cases run in parallel and reruns see no stale data.

use std::sync::Arc;
use std::time::Duration;

use switchboard::Transport;
use switchboard::transport::redis_streams::{RedisStreamsConfig, RedisStreamsTransport};

fn redis_url() -> String {
    std::env::var("SWITCHBOARD_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned())
}

async fn transport() -> Arc<dyn Transport> {
    let config = RedisStreamsConfig::default()
        .with_key_prefix(format!("sb-test-{}:", uuid::Uuid::new_v4().simple()))
        // Short, so the redelivery cases do not wait the default 30 s.
        .with_claim_idle(Duration::from_millis(500))
        .with_block(Duration::from_secs(1));
    let transport = RedisStreamsTransport::connect_with(&redis_url(), config)
        .await
        .unwrap_or_else(|error| panic!("connect to Redis at {}: {error}", redis_url()));
    Arc::new(transport)
}

switchboard::conformance_tests!(transport);

#[path = "redis_streams/flow.rs"]
mod flow;

#[path = "redis_streams/cut.rs"]
mod cut;

// ------------------------------------------------ Redis-specific behaviour

mod redis_specific {
    use std::collections::BTreeSet;
    use std::sync::Arc;
    use std::time::Duration;

    use redis::AsyncCommands;
    use serde::{Deserialize, Serialize};
    use switchboard::transport::redis_streams::{
        FIELD_ENVELOPE, FIELD_EVENT_ID, FIELD_EVENT_TYPE, RedisStreamsConfig, RedisStreamsTransport,
    };
    use switchboard::{
        DeadLetter, Delivery, Error, Event, EventBus, Message, Publisher, RawMessage, Redrive,
        SubscribeOptions, Subscriber, Subscription, Topology, Transport, handler_fn,
    };
    use tokio::sync::mpsc;

    const PATIENCE: Duration = Duration::from_secs(30);

    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    struct TradeExecuted {
        order_id: String,
        quantity: u64,
    }

    impl Event for TradeExecuted {
        const TYPE: &'static str = "trade.executed";
        const VERSION: &'static str = "1.0";
    }

    fn unique(label: &str) -> String {
        format!("rs-{label}-{}", uuid::Uuid::new_v4().simple())
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

    pub(crate) async fn raw() -> redis::aio::MultiplexedConnection {
        redis::Client::open(super::redis_url())
            .expect("client")
            .get_multiplexed_async_connection()
            .await
            .expect("raw connection")
    }

    pub(crate) async fn recv(subscription: &mut Subscription) -> Delivery {
        tokio::time::timeout(PATIENCE, subscription.recv())
            .await
            .expect("a delivery in time")
            .expect("subscription open")
    }

    fn ok<T>(result: Result<T, switchboard::SettleError>) -> T {
        result.expect("settle")
    }

    #[tokio::test]
    async fn persistent_only_when_the_server_runs_aof() {
        let transport = connect(config()).await;
        let mut conn = raw().await;
        let settings: std::collections::HashMap<String, String> = redis::cmd("CONFIG")
            .arg("GET")
            .arg("append*")
            .query_async(&mut conn)
            .await
            .expect("CONFIG GET");
        let aof = settings["appendonly"] == "yes"
            && matches!(settings["appendfsync"].as_str(), "always" | "everysec");
        assert_eq!(transport.capabilities().persistent, aof, "{settings:?}");
    }

    /// SPEC §5.1 interop, outward: what the bus publishes reads back with a
    /// plain XRANGE as the standard event JSON, with `event_type` and
    /// `event_id` fields beside it.
    #[tokio::test]
    async fn published_events_read_back_with_plain_xrange_as_spec_json() {
        let transport = connect(config()).await;
        let bus = EventBus::new(Arc::new(transport.clone()), "trading-service")
            .with_namespace(unique("ns"));
        let event_id = bus
            .publish(TradeExecuted {
                order_id: "123".into(),
                quantity: 100,
            })
            .await
            .expect("publish");
        let key = transport.stream_key(&bus.topic_of::<TradeExecuted>());
        let entries: redis::streams::StreamRangeReply =
            raw().await.xrange_all(&key).await.expect("XRANGE");
        assert_eq!(entries.ids.len(), 1);
        let entry = &entries.ids[0];
        let field = |name: &str| entry.get::<String>(name).unwrap_or_default();
        assert_eq!(field(FIELD_EVENT_TYPE), "trade.executed");
        assert_eq!(field(FIELD_EVENT_ID), event_id.to_string());
        let json: serde_json::Value =
            serde_json::from_str(&field(FIELD_ENVELOPE)).expect("the envelope field is JSON");
        assert_eq!(json["event_id"], event_id.to_string());
        assert_eq!(json["event_type"], "trade.executed");
        assert_eq!(json["source"], "trading-service");
        assert_eq!(json["version"], "1.0");
        assert_eq!(json["payload"]["order_id"], "123");
        assert_eq!(json["payload"]["quantity"], 100);
        let timestamp = json["timestamp"].as_str().expect("timestamp is a string");
        chrono::DateTime::parse_from_rfc3339(timestamp).expect("RFC 3339 timestamp");
    }

    /// SPEC §5.1 interop, inward: another program's plain XADD in the same
    /// format is consumed by a switchboard subscriber.
    #[tokio::test]
    async fn a_plain_xadd_from_another_program_is_consumed() {
        let transport = connect(config()).await;
        let bus =
            EventBus::new(Arc::new(transport.clone()), "game-service").with_namespace(unique("ns"));
        let group = unique("g");
        bus.declare(&Topology::new().with_event::<TradeExecuted, _>([group.clone()]))
            .await
            .expect("declare");
        let event_id = uuid::Uuid::new_v4();
        let json = format!(
            r#"{{"event_id":"{event_id}","event_type":"trade.executed","timestamp":"2026-02-19T12:00:00Z","source":"legacy-php","version":"1.0","payload":{{"order_id":"777","quantity":5}}}}"#
        );
        let key = transport.stream_key(&bus.topic_of::<TradeExecuted>());
        let _: String = raw()
            .await
            .xadd(
                &key,
                "*",
                &[
                    ("envelope", json.as_str()),
                    ("event_type", "trade.executed"),
                    ("event_id", &event_id.to_string()),
                ],
            )
            .await
            .expect("raw XADD");
        let (seen, mut handled) = mpsc::unbounded_channel();
        let consumer = bus
            .subscribe(
                SubscribeOptions::new(group),
                handler_fn(move |message: Message<TradeExecuted>| {
                    let seen = seen.clone();
                    async move {
                        seen.send((message.event_id(), message.payload().clone()))
                            .ok();
                        Ok::<_, Error>(())
                    }
                }),
            )
            .await
            .expect("subscribe");
        let (id, payload) = tokio::time::timeout(PATIENCE, handled.recv())
            .await
            .expect("handled in time")
            .expect("a message");
        assert_eq!(id, event_id);
        assert_eq!(
            payload,
            TradeExecuted {
                order_id: "777".into(),
                quantity: 5
            }
        );
        consumer.shutdown().await.expect("shutdown");
    }

    /// Entries that are not JSON, have the wrong type, or lack the envelope
    /// field go to the dead-letter stream with the reason, and the valid
    /// event behind them is handled.
    #[tokio::test]
    async fn bad_entries_are_dead_lettered_with_a_reason_and_block_nothing() {
        let transport = connect(config()).await;
        let bus = EventBus::new(Arc::new(transport.clone()), "test").with_namespace(unique("ns"));
        let group = unique("g");
        let topic = bus.topic_of::<TradeExecuted>().into_owned();
        bus.declare(&Topology::new().with_event::<TradeExecuted, _>([group.clone()]))
            .await
            .expect("declare");
        let key = transport.stream_key(&topic);
        let mut conn = raw().await;
        let wrong_type = format!(
            r#"{{"event_id":"{}","event_type":"trade.executed","timestamp":"2026-02-19T12:00:00Z","source":"x","version":"1.0","payload":{{"order_id":"1","quantity":"many"}}}}"#,
            uuid::Uuid::new_v4()
        );
        let other_event = wrong_type
            .replace(
                r#""event_type":"trade.executed""#,
                r#""event_type":"order.created""#,
            )
            .replace(r#""many""#, "3");
        let bad: [&[(&str, &str)]; 4] = [
            &[("envelope", "{ not json"), ("event_id", "bad-not-json")],
            &[("envelope", &wrong_type), ("event_id", "bad-wrong-type")],
            &[("envelope", &other_event), ("event_id", "bad-other-event")],
            &[("payload", "{}"), ("event_id", "bad-no-envelope")],
        ];
        for fields in bad {
            let _: String = conn.xadd(&key, "*", fields).await.expect("raw XADD");
        }
        bus.publish(TradeExecuted {
            order_id: "good".into(),
            quantity: 1,
        })
        .await
        .expect("publish a valid event");

        let (seen, mut handled) = mpsc::unbounded_channel();
        let consumer = bus
            .subscribe(
                SubscribeOptions::new(group.clone()),
                handler_fn(move |message: Message<TradeExecuted>| {
                    let seen = seen.clone();
                    async move {
                        seen.send(message.payload().order_id.clone()).ok();
                        Ok::<_, Error>(())
                    }
                }),
            )
            .await
            .expect("subscribe");
        let first = tokio::time::timeout(PATIENCE, handled.recv()).await;
        assert_eq!(first.ok().flatten().as_deref(), Some("good"));
        consumer.shutdown().await.expect("shutdown");
        assert!(
            handled.try_recv().is_err(),
            "only the valid event is handled"
        );

        let queue = transport.dead_letters().expect("dead letters");
        let letters = queue.list(&topic, 10).await.expect("list");
        let reasons: Vec<(String, String)> = letters
            .iter()
            .map(|letter| (letter.id.clone(), letter.reason.clone()))
            .collect();
        assert_eq!(letters.len(), 4, "{reasons:?}");
        let reason = |id: &str| {
            letters
                .iter()
                .find(|letter| letter.id == id)
                .unwrap_or_else(|| panic!("{id} dead-lettered: {reasons:?}"))
                .reason
                .clone()
        };
        assert!(reason("bad-not-json").contains("not JSON"), "{reasons:?}");
        assert!(
            reason("bad-wrong-type").contains("invalid type"),
            "{reasons:?}"
        );
        assert!(
            reason("bad-other-event").contains("order.created"),
            "{reasons:?}"
        );
        assert!(
            reason("bad-no-envelope").contains("no `envelope` field"),
            "{reasons:?}"
        );
        for letter in &letters {
            assert_eq!(letter.group, group);
        }
        let pending: redis::streams::StreamPendingReply =
            conn.xpending(&key, &group).await.expect("XPENDING");
        assert_eq!(pending.count(), 0, "nothing left pending");
    }

    /// nack keeps the entry (same stream id, no re-XADD) and re-reads it
    /// after the delay with the delivery counter raised.
    #[tokio::test]
    async fn nack_rereads_the_same_entry_with_its_counter_raised() {
        let transport = connect(config()).await;
        let topic = unique("nack");
        let mut subscription = transport
            .subscribe(&topic, SubscribeOptions::new(unique("g")))
            .await
            .expect("subscribe");
        transport
            .publish(&topic, RawMessage::new("once"))
            .await
            .expect("publish");
        for attempt in 1..=3 {
            let delivery = recv(&mut subscription).await;
            assert_eq!(delivery.attempt(), attempt);
            assert_eq!(delivery.body().as_ref(), b"once");
            if attempt < 3 {
                ok(delivery.nack(Duration::from_millis(20)).await);
            } else {
                ok(delivery.ack().await);
            }
        }
        let len: usize = raw()
            .await
            .xlen(transport.stream_key(&topic))
            .await
            .expect("XLEN");
        assert_eq!(len, 1, "nack never adds the entry again");
        subscription.shutdown().await.expect("shutdown");
    }

    /// A consumer that dies holding an entry: a live member of the group
    /// takes it over with XAUTOCLAIM once it has been idle for claim_idle,
    /// with the delivery counter raised.
    #[tokio::test]
    async fn a_dead_consumers_entries_are_reclaimed_by_a_live_one() {
        let config = config().with_claim_idle(Duration::from_millis(300));
        let dying = connect(config.clone()).await;
        let live = connect(config).await;
        let topic = unique("reclaim");
        let group = unique("g");
        let mut doomed = dying
            .subscribe(
                &topic,
                SubscribeOptions::new(group.clone()).with_prefetch(1),
            )
            .await
            .expect("subscribe");
        dying
            .publish(&topic, RawMessage::new("orphan"))
            .await
            .expect("publish");
        let held = recv(&mut doomed).await;
        // A crash: the delivery is neither settled nor handed back.
        std::mem::forget(held);
        drop(doomed);

        let mut survivor = live
            .subscribe(&topic, SubscribeOptions::new(group))
            .await
            .expect("subscribe");
        let delivery = recv(&mut survivor).await;
        assert_eq!(delivery.body().as_ref(), b"orphan");
        assert_eq!(delivery.attempt(), 2, "the counter counts both deliveries");
        ok(delivery.ack().await);
        survivor.shutdown().await.expect("shutdown");
    }

    /// A subscriber restarted under the same consumer name re-reads its own
    /// pending entries first (Redis's `XREADGROUP ... 0`), without waiting
    /// for claim_idle.
    #[tokio::test]
    async fn a_restart_under_the_same_name_rereads_its_own_pending_entries() {
        let name = unique("pod");
        let config = config()
            .with_consumer_name(name)
            .with_claim_idle(Duration::from_secs(3600));
        let topic = unique("restart");
        let group = unique("g");
        let before = connect(config.clone()).await;
        let mut first = before
            .subscribe(&topic, SubscribeOptions::new(group.clone()))
            .await
            .expect("subscribe");
        before
            .publish(&topic, RawMessage::new("unfinished"))
            .await
            .expect("publish");
        std::mem::forget(recv(&mut first).await);
        drop(first);

        let after = connect(config).await;
        let mut second = after
            .subscribe(&topic, SubscribeOptions::new(group))
            .await
            .expect("subscribe");
        let delivery = recv(&mut second).await;
        assert_eq!(delivery.body().as_ref(), b"unfinished");
        assert_eq!(delivery.attempt(), 2);
        ok(delivery.ack().await);
        second.shutdown().await.expect("shutdown");
    }

    /// Dead-lettering is atomic (the entry leaves the pending list as it
    /// enters the DLQ), and a redrive reaches only the group that gave up.
    #[tokio::test]
    async fn redrive_goes_back_only_to_the_group_that_gave_up() {
        let transport = connect(config()).await;
        let topic = unique("redrive");
        let (gave_up, handled) = (unique("g"), unique("g"));
        transport
            .declare(
                &Topology::new().with_groups(topic.clone(), [gave_up.clone(), handled.clone()]),
            )
            .await
            .expect("declare");
        let mut failing = transport
            .subscribe(&topic, SubscribeOptions::new(gave_up.clone()))
            .await
            .expect("subscribe");
        let mut fine = transport
            .subscribe(&topic, SubscribeOptions::new(handled.clone()))
            .await
            .expect("subscribe");
        let poison = RawMessage::new("poison").with_header(switchboard::header::EVENT_ID, "p-1");
        transport.publish(&topic, poison).await.expect("publish");
        ok(recv(&mut fine).await.ack().await);
        let delivery = recv(&mut failing).await;
        ok(delivery
            .dead_letter(DeadLetter::new("test: poison").with_last_error("boom"))
            .await);
        let key = transport.stream_key(&topic);
        let pending: redis::streams::StreamPendingReply = raw()
            .await
            .xpending(&key, &gave_up)
            .await
            .expect("XPENDING");
        assert_eq!(pending.count(), 0, "dead-lettered entries are acknowledged");
        let dlq_len: usize = raw()
            .await
            .xlen(transport.dead_letter_key(&topic))
            .await
            .expect("XLEN");
        assert_eq!(dlq_len, 1);

        let queue = transport.dead_letters().expect("dlq");
        assert_eq!(
            queue.redrive(&topic, Redrive::All).await.expect("redrive"),
            1
        );
        let again = recv(&mut failing).await;
        assert_eq!(again.body().as_ref(), b"poison");
        ok(again.ack().await);
        // The other group skips the redriven entry: the next thing it sees
        // is the marker published after it.
        transport
            .publish(&topic, RawMessage::new("marker"))
            .await
            .expect("publish");
        let next = recv(&mut fine).await;
        assert_eq!(next.body().as_ref(), b"marker");
        ok(next.ack().await);
        ok(recv(&mut failing).await.ack().await);
        failing.shutdown().await.expect("shutdown");
        fine.shutdown().await.expect("shutdown");
    }

    /// Trimming is off by default and approximate when on.
    #[tokio::test]
    async fn streams_are_trimmed_only_when_asked() {
        let messages: Vec<RawMessage> = (0..1000).map(|n| RawMessage::new(n.to_string())).collect();
        let untrimmed = connect(config()).await;
        let trimmed = connect(config().with_max_len(10)).await;
        let mut lengths = Vec::new();
        for transport in [&untrimmed, &trimmed] {
            let topic = unique("trim");
            transport
                .publish_batch(&topic, messages.clone())
                .await
                .expect("publish");
            let len: usize = raw()
                .await
                .xlen(transport.stream_key(&topic))
                .await
                .expect("XLEN");
            lengths.push(len);
        }
        assert_eq!(lengths[0], 1000, "no trimming by default");
        assert!(lengths[1] < 1000, "MAXLEN ~ 10 trimmed: {}", lengths[1]);
    }

    /// Competing members of one group split the work and nothing is lost
    /// when one of them stops mid-stream.
    #[tokio::test]
    async fn a_member_stopping_mid_stream_loses_nothing() {
        let transport = connect(config().with_claim_idle(Duration::from_secs(3600))).await;
        let topic = unique("stop");
        let group = unique("g");
        transport
            .declare(&Topology::new().with_groups(topic.clone(), [group.clone()]))
            .await
            .expect("declare");
        let messages: Vec<RawMessage> = (0..300).map(|n| RawMessage::new(n.to_string())).collect();
        transport
            .publish_batch(&topic, messages)
            .await
            .expect("publish");
        let mut quitter = transport
            .subscribe(
                &topic,
                SubscribeOptions::new(group.clone()).with_prefetch(50),
            )
            .await
            .expect("subscribe");
        let mut seen = BTreeSet::new();
        for _ in 0..10 {
            let delivery = recv(&mut quitter).await;
            seen.insert(String::from_utf8_lossy(delivery.body()).into_owned());
            ok(delivery.ack().await);
        }
        // Up to 50 more were read ahead; shutdown hands them back at once.
        quitter.shutdown().await.expect("shutdown");
        let mut stayer = transport
            .subscribe(&topic, SubscribeOptions::new(group))
            .await
            .expect("subscribe");
        while seen.len() < 300 {
            let delivery = recv(&mut stayer).await;
            seen.insert(String::from_utf8_lossy(delivery.body()).into_owned());
            ok(delivery.ack().await);
        }
        stayer.shutdown().await.expect("shutdown");
    }

    /// A read blocks longer than redis-rs's default 500 ms reply timeout
    /// without failing: blocking reads have their own connection and
    /// timeout (PITFALLS). A failed read would log a warning.
    #[test]
    fn a_blocking_read_outlives_the_default_response_timeout() {
        #[derive(Clone, Default)]
        struct Capture(Arc<std::sync::Mutex<Vec<u8>>>);
        impl std::io::Write for Capture {
            fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(bytes);
                Ok(bytes.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let logs = Capture::default();
        let writer = logs.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::WARN)
            .with_writer(move || writer.clone())
            .finish();
        let _guard = tracing::subscriber::set_default(subscriber);
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async {
            let transport = connect(config().with_block(Duration::from_millis(1500))).await;
            let topic = unique("block");
            let mut subscription = transport
                .subscribe(&topic, SubscribeOptions::new(unique("g")))
                .await
                .expect("subscribe");
            // Nothing is published: the read blocks past 500 ms.
            let idle = tokio::time::timeout(Duration::from_millis(1200), subscription.recv()).await;
            assert!(idle.is_err(), "nothing to deliver yet");
            transport
                .publish(&topic, RawMessage::new("late"))
                .await
                .expect("publish");
            let delivery = recv(&mut subscription).await;
            assert_eq!(delivery.body().as_ref(), b"late");
            ok(delivery.ack().await);
            subscription.shutdown().await.expect("shutdown");
        });
        let logs = String::from_utf8_lossy(&logs.0.lock().unwrap()).into_owned();
        assert!(
            !logs.contains("XREADGROUP"),
            "a blocking read failed: {logs}"
        );
    }

    /// A group created by `subscribe` starts at the beginning of the stream
    /// by default (nothing published earlier is missed), or after the last
    /// entry with `GroupStart::End`.
    #[tokio::test]
    async fn where_a_new_group_starts() {
        use switchboard::transport::redis_streams::GroupStart;
        for (start, first_seen) in [
            (GroupStart::Beginning, "before"),
            (GroupStart::End, "after"),
        ] {
            let transport = connect(config().with_group_start(start)).await;
            let topic = unique("start");
            transport
                .publish(&topic, RawMessage::new("before"))
                .await
                .expect("publish");
            let mut subscription = transport
                .subscribe(&topic, SubscribeOptions::new(unique("g")))
                .await
                .expect("subscribe");
            transport
                .publish(&topic, RawMessage::new("after"))
                .await
                .expect("publish");
            let delivery = recv(&mut subscription).await;
            assert_eq!(delivery.body().as_ref(), first_seen.as_bytes(), "{start:?}");
            ok(delivery.ack().await);
            subscription.shutdown().await.expect("shutdown");
        }
    }
}

#[path = "common/redrive.rs"]
mod redrive;

#[tokio::test]
async fn a_redrive_of_all_moves_only_what_the_queue_held() {
    redrive::redrive_all_moves_only_what_was_there(transport().await).await;
}

#[path = "redis_streams/wire.rs"]
mod wire;

#[path = "redis_streams/lag.rs"]
mod lag;

#[path = "redis_streams/trim.rs"]
mod trim;

#[path = "redis_streams/lifecycle.rs"]
mod lifecycle;

#[path = "common/ordering.rs"]
mod ordering_scenario;

#[path = "redis_streams/ordering.rs"]
mod ordering;

#[path = "redis_streams/schedule.rs"]
mod schedule;

#[path = "redis_streams/acks.rs"]
mod acks;
