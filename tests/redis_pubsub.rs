//! The Redis Pub/Sub transport against the machine's Redis (127.0.0.1:6379):
//! the conformance suite, pattern subscriptions, interop with plain Redis
//! clients, recovery after its connection is killed, and a slow handler
//! under a flood of messages.

use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use switchboard::transport::redis_pubsub::{
    Channels, ConnectionState, FRAME_MAGIC, RedisPubSubOptions, RedisPubSubTransport,
    decode_payload,
};
use switchboard::{
    Delivery, Error, ErrorKind, Event, EventBus, Message, Publisher, RawMessage, SubscribeOptions,
    Subscriber, Subscription, Transport, handler_fn,
};
use uuid::Uuid;

const URL: &str = "redis://127.0.0.1:6379";
const PATIENCE: Duration = Duration::from_secs(20);

switchboard::conformance_tests!(|| async {
    // The suite checks delivery, not overload: an inbox that holds its
    // largest burst whole, so a subscriber starved of CPU (by the flood test
    // of this binary, for one) falls behind without dropping anything.
    let options =
        RedisPubSubOptions::default().with_inbox_capacity(switchboard::testing::message_count());
    Arc::new(
        RedisPubSubTransport::connect_with(URL, options)
            .await
            .expect("Redis on 127.0.0.1:6379"),
    ) as Arc<dyn Transport>
});

fn unique(label: &str) -> String {
    format!("ps-{label}-{}", Uuid::new_v4().simple())
}

async fn transport() -> RedisPubSubTransport {
    RedisPubSubTransport::connect(URL)
        .await
        .expect("Redis on 127.0.0.1:6379")
}

/// A plain RESP3 connection subscribed by hand, standing in for another
/// program's subscriber: it sees the exact bytes published.
struct RawSubscriber {
    _connection: redis::aio::MultiplexedConnection,
    pushed: tokio::sync::mpsc::UnboundedReceiver<redis::PushInfo>,
}

impl RawSubscriber {
    async fn subscribe(topic: &str) -> Self {
        let (pushes, pushed) = tokio::sync::mpsc::unbounded_channel();
        let config = redis::AsyncConnectionConfig::new().set_push_sender(pushes);
        let mut connection = redis::Client::open(format!("{URL}?protocol=resp3"))
            .expect("redis url")
            .get_multiplexed_async_connection_with_config(&config)
            .await
            .expect("raw RESP3 connection");
        connection.subscribe(topic).await.expect("raw SUBSCRIBE");
        Self {
            _connection: connection,
            pushed,
        }
    }

    /// The next `count` messages' payloads.
    async fn payloads(&mut self, count: usize) -> Vec<Vec<u8>> {
        let mut payloads = Vec::new();
        while payloads.len() < count {
            let push = tokio::time::timeout(PATIENCE, self.pushed.recv())
                .await
                .expect("a push in time")
                .expect("a push");
            if push.kind == redis::PushKind::Message {
                payloads.push(redis::from_redis_value(push.data[1].clone()).expect("bytes"));
            }
        }
        payloads
    }
}

/// A plain connection, standing in for another program or `redis-cli`.
async fn raw_connection() -> redis::aio::MultiplexedConnection {
    redis::Client::open(URL)
        .expect("redis url")
        .get_multiplexed_async_connection()
        .await
        .expect("a raw connection to Redis")
}

async fn recv(subscription: &mut Subscription, what: &str) -> Delivery {
    match tokio::time::timeout(PATIENCE, subscription.recv()).await {
        Ok(Some(delivery)) => delivery,
        Ok(None) => panic!("{what}: the subscription ended"),
        Err(_) => panic!("{what}: nothing arrived within {PATIENCE:?}"),
    }
}

async fn ack(delivery: Delivery) {
    delivery.ack().await.expect("ack");
}

/// The id `CLIENT LIST` shows for the connection named `name`, if any.
async fn client_id(raw: &mut redis::aio::MultiplexedConnection, name: &str) -> Option<i64> {
    let list: String = redis::cmd("CLIENT")
        .arg("LIST")
        .query_async(raw)
        .await
        .expect("CLIENT LIST");
    list.lines().find_map(|line| {
        let field = |key: &str| {
            line.split(' ')
                .find_map(|pair| pair.strip_prefix(key)?.strip_prefix('='))
        };
        (field("name")? == name).then(|| field("id")?.parse().ok())?
    })
}

#[tokio::test]
async fn subscribe_returns_once_redis_counts_the_subscriber() {
    let transport = transport().await;
    let topic = unique("numsub");
    let subscription = transport
        .subscribe(&topic, SubscribeOptions::new("g"))
        .await
        .expect("subscribe");
    let mut raw = raw_connection().await;
    let (_, count): (String, i64) = redis::cmd("PUBSUB")
        .arg("NUMSUB")
        .arg(&topic)
        .query_async(&mut raw)
        .await
        .expect("PUBSUB NUMSUB");
    assert_eq!(
        count, 1,
        "SUBSCRIBE was confirmed before subscribe returned"
    );

    subscription.shutdown().await.expect("shutdown");
    let (_, count): (String, i64) = redis::cmd("PUBSUB")
        .arg("NUMSUB")
        .arg(&topic)
        .query_async(&mut raw)
        .await
        .expect("PUBSUB NUMSUB");
    assert_eq!(count, 0, "shutdown closes the subscriber's connection");
}

#[tokio::test]
async fn capabilities_say_broadcast_at_most_once() {
    let transport = transport().await;
    let caps = transport.capabilities();
    assert_eq!(caps.delivery, switchboard::DeliveryMode::Broadcast);
    assert!(!caps.persistent && !caps.redelivers_unacked && !caps.nack && !caps.dead_letter);
    let error = transport
        .dead_letters()
        .err()
        .expect("no dead-letter queue");
    assert_eq!(error.kind(), ErrorKind::Unsupported);
}

#[tokio::test]
async fn pattern_subscription_receives_every_matching_channel() {
    let transport = transport().await;
    let prefix = unique("price");
    let mut subscription = transport
        .psubscribe(&format!("{prefix}.*"), SubscribeOptions::new("g"))
        .await
        .expect("psubscribe");
    assert_eq!(subscription.topic(), format!("{prefix}.*"));

    let other = unique("volume");
    for topic in [format!("{prefix}.AAPL"), other, format!("{prefix}.MSFT")] {
        let message = RawMessage::new(topic.clone()).with_header("channel", topic.clone());
        transport.publish(&topic, message).await.expect("publish");
    }
    for symbol in ["AAPL", "MSFT"] {
        let delivery = recv(&mut subscription, "pattern delivery").await;
        let channel = format!("{prefix}.{symbol}");
        assert_eq!(delivery.topic(), channel, "topic is the concrete channel");
        assert_eq!(delivery.body().as_ref(), channel.as_bytes());
        assert_eq!(delivery.headers()["channel"], channel, "headers intact");
        ack(delivery).await;
    }
    // The non-matching channel was published between the two: had it been
    // delivered, it would have come second above.
    let invalid = transport
        .psubscribe("no spaces *", SubscribeOptions::new("g"))
        .await
        .expect_err("an invalid pattern is refused");
    assert_eq!(invalid.kind(), ErrorKind::Rejected);
    subscription.shutdown().await.expect("shutdown");
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct PriceUpdated {
    symbol: String,
    price: f64,
}

impl Event for PriceUpdated {
    const TYPE: &'static str = "price.updated";
    const VERSION: &'static str = "1.0";
}

#[tokio::test]
async fn plain_spec_json_from_another_client_is_consumed_by_the_bus() {
    let transport = Arc::new(transport().await);
    let namespace = unique("interop");
    let bus = EventBus::new(transport.clone(), "game-service").with_namespace(namespace);
    let (seen, mut handled) = tokio::sync::mpsc::unbounded_channel();
    let consumer = bus
        .subscribe::<PriceUpdated, _>(
            SubscribeOptions::new("game"),
            handler_fn(move |message: Message<PriceUpdated>| {
                let seen = seen.clone();
                async move {
                    seen.send((message.event_id().to_string(), message.payload().clone()))
                        .ok();
                    Ok::<_, Error>(())
                }
            }),
        )
        .await
        .expect("subscribe through the bus");

    // What `redis-cli PUBLISH <topic> '<json>'` sends: SPEC §5.1, no framing.
    let event_id = Uuid::new_v4().to_string();
    let json = format!(
        r#"{{"event_id":"{event_id}","event_type":"price.updated","timestamp":"2026-02-19T12:00:00Z","source":"market-service","version":"1.0","payload":{{"symbol":"AAPL","price":150.0}}}}"#
    );
    let mut raw = raw_connection().await;
    let receivers: i64 = redis::cmd("PUBLISH")
        .arg(&*bus.topic_of::<PriceUpdated>())
        .arg(&json)
        .query_async(&mut raw)
        .await
        .expect("raw PUBLISH");
    assert_eq!(receivers, 1);

    let (id, payload) = tokio::time::timeout(PATIENCE, handled.recv())
        .await
        .expect("handled in time")
        .expect("handled");
    assert_eq!(id, event_id);
    assert_eq!(
        payload,
        PriceUpdated {
            symbol: "AAPL".into(),
            price: 150.0
        }
    );
    consumer.shutdown().await.expect("shutdown");
}

#[tokio::test]
async fn a_plain_subscriber_reads_the_documented_frame() {
    let transport = transport().await;
    let topic = unique("frame");
    // A plain RESP3 connection subscribed by hand, standing in for another
    // program's subscriber.
    let mut raw = RawSubscriber::subscribe(&topic).await;

    let headered = RawMessage::new(r#"{"a":1}"#).with_header("correlation-id", "req-7");
    let plain = RawMessage::new(r#"{"b":2}"#);
    transport
        .publish_batch(&topic, vec![headered.clone(), plain.clone()])
        .await
        .expect("publish_batch");

    let payloads = raw.payloads(2).await;
    assert!(payloads[0].starts_with(FRAME_MAGIC), "headers are framed");
    let length = u32::from_be_bytes(payloads[0][4..8].try_into().unwrap()) as usize;
    assert_eq!(
        &payloads[0][8..8 + length],
        br#"{"correlation-id":"req-7"}"#
    );
    assert_eq!(&payloads[0][8 + length..], br#"{"a":1}"#);
    assert_eq!(decode_payload(payloads[0].clone().into()), headered);
    assert_eq!(payloads[1], br#"{"b":2}"#, "no headers: the body alone");
}

#[tokio::test]
async fn subscriber_reconnects_after_its_connection_is_killed() {
    let transport = transport().await;
    let topic = unique("killed");
    let (mut subscription, mut status) = transport
        .subscribe_to(Channels::Topic(topic.clone()), SubscribeOptions::new("g"))
        .await
        .expect("subscribe");
    assert_eq!(
        status.current(),
        ConnectionState::Subscribed { connection: 1 }
    );
    transport
        .publish(&topic, RawMessage::new("before"))
        .await
        .expect("publish");
    ack(recv(&mut subscription, "before the kill").await).await;

    let mut raw = raw_connection().await;
    let first = client_id(&mut raw, status.client_name())
        .await
        .expect("the subscriber's connection is in CLIENT LIST under its name");
    let killed: i64 = redis::cmd("CLIENT")
        .arg("KILL")
        .arg("ID")
        .arg(first)
        .query_async(&mut raw)
        .await
        .expect("CLIENT KILL");
    assert_eq!(killed, 1, "one connection killed");

    let restored = tokio::time::timeout(
        PATIENCE,
        status.wait_for(
            |state| matches!(state, ConnectionState::Subscribed { connection } if *connection >= 2),
        ),
    )
    .await
    .expect("resubscribed in time")
    .expect("the subscription is still open");
    assert_eq!(restored, ConnectionState::Subscribed { connection: 2 });
    let second = client_id(&mut raw, status.client_name())
        .await
        .expect("the new connection carries the same name");
    assert_ne!(second, first, "a new connection");

    for n in 0..10 {
        transport
            .publish(
                &topic,
                RawMessage::new(format!("after {n}")).with_header("n", n.to_string()),
            )
            .await
            .expect("publish after resubscribe");
    }
    for n in 0..10 {
        let delivery = recv(&mut subscription, "after the reconnection").await;
        assert_eq!(delivery.body().as_ref(), format!("after {n}").as_bytes());
        assert_eq!(delivery.headers()["n"], n.to_string());
        ack(delivery).await;
    }

    subscription.shutdown().await.expect("shutdown");
    assert_eq!(status.current(), ConnectionState::Closed);
}

#[tokio::test]
async fn the_first_connection_failing_is_a_retryable_error() {
    // Port 1 is never a Redis.
    let error = RedisPubSubTransport::connect("redis://127.0.0.1:1")
        .await
        .expect_err("nothing listens on port 1");
    assert!(error.is_retryable(), "{error}");
    let error = RedisPubSubTransport::connect("not a url")
        .await
        .expect_err("a bad url");
    assert_eq!(error.kind(), ErrorKind::Config, "{error}");
}

/// A `redis-server` of the test's own on a free port, in a temporary
/// directory; killed (by its PID) and cleaned up when dropped, so a failing
/// test never leaves it behind. The shared Redis is never touched.
struct PrivateRedis {
    port: u16,
    dir: std::path::PathBuf,
    child: Option<std::process::Child>,
}

impl PrivateRedis {
    fn start() -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|listener| listener.local_addr())
            .expect("a free port")
            .port();
        let dir = std::env::temp_dir().join(unique("redis"));
        std::fs::create_dir_all(&dir).expect("a temporary directory");
        let mut server = Self {
            port,
            dir,
            child: None,
        };
        server.spawn();
        server
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    fn spawn(&mut self) {
        let child = std::process::Command::new("redis-server")
            .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .arg("--port")
            .arg(self.port.to_string())
            .arg("--dir")
            .arg(&self.dir)
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("redis-server is installed");
        self.child = Some(child);
    }

    /// Waits until the server answers PING, failing after a deadline.
    async fn wait_ready(&self) {
        let client = redis::Client::open(self.url()).expect("url");
        let deadline = tokio::time::Instant::now() + PATIENCE;
        loop {
            if let Ok(mut connection) = client.get_multiplexed_async_connection().await
                && redis::cmd("PING")
                    .query_async::<String>(&mut connection)
                    .await
                    .is_ok()
            {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "private redis-server on port {} does not answer PING",
                self.port
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// SIGKILLs the server this test started.
    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[tokio::test]
async fn subscriber_keeps_retrying_while_redis_is_down_and_resubscribes_when_it_is_back() {
    let mut server = PrivateRedis::start();
    server.wait_ready().await;
    let options = RedisPubSubOptions::default()
        .with_reconnect_delays(Duration::from_millis(10), Duration::from_millis(100));
    let transport = RedisPubSubTransport::connect_with(&server.url(), options)
        .await
        .expect("connect to the private Redis");
    let topic = unique("outage");
    let (mut subscription, mut status) = transport
        .subscribe_to(Channels::Topic(topic.clone()), SubscribeOptions::new("g"))
        .await
        .expect("subscribe");

    server.kill();
    let retrying = tokio::time::timeout(
        PATIENCE,
        status.wait_for(
            |state| matches!(state, ConnectionState::Reconnecting { attempt } if *attempt >= 3),
        ),
    )
    .await
    .expect("reconnection attempts in time")
    .expect("the subscription is still open");
    assert!(matches!(retrying, ConnectionState::Reconnecting { .. }));

    server.spawn();
    server.wait_ready().await;
    tokio::time::timeout(
        PATIENCE,
        status.wait_for(|state| *state == ConnectionState::Subscribed { connection: 2 }),
    )
    .await
    .expect("resubscribed in time")
    .expect("the subscription is still open");

    // A fresh publisher, so the test does not depend on when the first
    // transport's publishing connection notices the restart.
    let publisher = RedisPubSubTransport::connect(&server.url())
        .await
        .expect("connect to the restarted Redis");
    publisher
        .publish(&topic, RawMessage::new("back").with_header("h", "v"))
        .await
        .expect("publish");
    let delivery = recv(&mut subscription, "after the outage").await;
    assert_eq!(delivery.body().as_ref(), b"back");
    assert_eq!(delivery.headers()["h"], "v");
    ack(delivery).await;
    subscription.shutdown().await.expect("shutdown");
}

#[tokio::test]
async fn an_inbox_capacity_of_zero_is_a_config_error() {
    let options = RedisPubSubOptions::default().with_inbox_capacity(0);
    let error = RedisPubSubTransport::connect_with(URL, options)
        .await
        .expect_err("capacity 0 is refused");
    assert_eq!(error.kind(), ErrorKind::Config, "{error}");
}

/// A publisher at full speed against a handler many times slower: the
/// subscription's bounded inbox drops (and counts) what the handler cannot
/// take, memory stays flat and the connection is never cut off.
mod flood {
    use std::sync::atomic::{AtomicU64, Ordering};

    use super::*;

    /// Resident memory of this process in bytes (`VmRSS` of
    /// `/proc/self/status`).
    fn resident_bytes() -> u64 {
        let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
        let kib = status
            .lines()
            .find_map(|line| line.strip_prefix("VmRSS:"))
            .and_then(|value| value.trim().strip_suffix("kB"))
            .and_then(|kib| kib.trim().parse::<u64>().ok())
            .expect("a VmRSS line in kB");
        kib * 1024
    }

    const MIB: u64 = 1024 * 1024;
    /// Resident memory is sampled once per this many messages published.
    const SAMPLE_EVERY: u64 = 100;
    /// Concurrent publishing tasks, sharing one connection.
    const PUBLISHERS: usize = 4;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_slow_handler_keeps_memory_bounded_and_every_message_is_handled_or_counted() {
        let seconds: u64 = std::env::var("SWITCHBOARD_CHAOS_SECS")
            .ok()
            .and_then(|value| value.parse().ok())
            .unwrap_or(2);
        // Default options: an inbox of 1024 messages, dropping the oldest.
        let transport = transport().await;
        let topic = unique("flood");
        let (mut subscription, status) = transport
            .subscribe_to(Channels::Topic(topic.clone()), SubscribeOptions::new("g"))
            .await
            .expect("subscribe");
        let start_rss = resident_bytes();

        // The handler: 1 ms of work per message, so at most 1000 a second,
        // while the publishers below send several times as many (the test
        // checks they outran it).
        let (handled_count, mut handled) = tokio::sync::watch::channel(0_u64);
        let (stop, mut stopped) = tokio::sync::oneshot::channel::<()>();
        let handler = tokio::spawn(async move {
            loop {
                let delivery = tokio::select! {
                    _ = &mut stopped => break,
                    delivery = subscription.recv() => delivery.expect("the subscription is open"),
                };
                tokio::time::sleep(Duration::from_millis(1)).await;
                ack(delivery).await;
                handled_count.send_modify(|handled| *handled += 1);
            }
            subscription
        });

        // The publishers: a few tasks, each sending one PUBLISH after
        // another as fast as Redis answers. Each reply says how many
        // subscribers received the message, so `published` counts exactly
        // what reached ours.
        let published = Arc::new(AtomicU64::new(0));
        let peak_rss = Arc::new(AtomicU64::new(start_rss));
        let until = tokio::time::Instant::now() + Duration::from_secs(seconds);
        // redis-rs gives up on a reply after 500 ms by default; a busy
        // shared machine can stall that long without anything being wrong.
        let raw = redis::Client::open(URL)
            .expect("redis url")
            .get_multiplexed_async_connection_with_config(
                &redis::AsyncConnectionConfig::new().set_response_timeout(Some(PATIENCE)),
            )
            .await
            .expect("a publishing connection to Redis");
        let publishers: Vec<_> = (0..PUBLISHERS)
            .map(|_| {
                let (mut raw, topic) = (raw.clone(), topic.clone());
                let (published, peak_rss) = (published.clone(), peak_rss.clone());
                let body = format!("{:-<300}", "tick ");
                tokio::spawn(async move {
                    while tokio::time::Instant::now() < until {
                        let receivers: i64 = redis::cmd("PUBLISH")
                            .arg(&topic)
                            .arg(&body)
                            .query_async(&mut raw)
                            .await
                            .expect("PUBLISH");
                        assert_eq!(
                            receivers, 1,
                            "every message reaches the one subscriber: it was never disconnected"
                        );
                        if published.fetch_add(1, Ordering::Relaxed) % SAMPLE_EVERY == 0 {
                            peak_rss.fetch_max(resident_bytes(), Ordering::Relaxed);
                        }
                    }
                })
            })
            .collect();
        for publisher in publishers {
            publisher.await.expect("a publisher");
        }
        let published = published.load(Ordering::Relaxed);
        let handled_while_publishing = *handled.borrow();
        let mut peak_rss = peak_rss.load(Ordering::Relaxed);

        // Every message that reached the subscriber is either handled or
        // counted as dropped. The last change is always a handled message
        // (a full inbox is never empty), so the condition is checked each
        // time the handler finishes one, up to a deadline.
        let settled = tokio::time::timeout(
            PATIENCE,
            handled.wait_for(|&handled| handled + status.dropped() >= published),
        )
        .await
        .is_ok_and(|waited| waited.is_ok());
        let handled_now = *handled.borrow();
        let dropped = status.dropped();
        peak_rss = peak_rss.max(resident_bytes());
        let reconnections = match status.current() {
            ConnectionState::Subscribed { connection } => connection - 1,
            other => panic!("the subscription is {other:?}, not subscribed"),
        };
        println!(
            "flood for {seconds} s: published {published}, handled {handled_now} \
             ({handled_while_publishing} while publishing), dropped {dropped}, RSS start {} MiB \
             / peak {} MiB, reconnections {reconnections}",
            start_rss / MIB,
            peak_rss / MIB,
        );
        assert!(
            settled,
            "the inbox did not drain within {PATIENCE:?}: {handled_now} handled + {dropped} \
             dropped of {published} published"
        );
        assert_eq!(handled_now + dropped, published, "nothing lost uncounted");
        // That the flood outran the handler is what makes the case: a
        // handler keeping up would prove nothing about the bound. Twice its
        // pace is enough to overflow the inbox in 2 s (a loaded machine
        // slows the publishers more than the sleeping handler).
        assert!(
            published >= 2 * handled_while_publishing,
            "the publishers ({published}) were not twice as fast as the handler \
             ({handled_while_publishing} meanwhile)"
        );
        assert!(dropped > 0, "a slow handler makes the inbox drop");
        assert_eq!(reconnections, 0, "Redis never cut the subscriber off");
        // The inbox holds at most 1024 messages of ~300 bytes plus 64
        // unsettled deliveries: well under 1 MiB. 64 MiB of margin covers the
        // allocator's slack, the runtime and the other tests of this binary
        // running alongside; the unbounded queue this replaced grew by more
        // than 100 MiB in 5 s at a similar publish rate.
        let bound = start_rss + 64 * MIB;
        assert!(
            peak_rss < bound,
            "resident memory peaked at {} MiB, over the {} MiB bound",
            peak_rss / MIB,
            bound / MIB
        );

        stop.send(()).expect("the handler is running");
        let subscription = handler.await.expect("the handler");
        subscription.shutdown().await.expect("shutdown");
    }
}

#[path = "redis_pubsub/wire.rs"]
mod wire;

#[path = "redis_pubsub/stall.rs"]
mod stall;

#[path = "redis_pubsub/lifecycle.rs"]
mod lifecycle;
