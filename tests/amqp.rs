//! The RabbitMQ transport against the machine's broker (127.0.0.1:5672,
//! guest/guest): the conformance suite on classic and quorum queues.
//!
//! Every transport gets a random exchange (auto-deleted once its last queue
//! goes) and every queue an `x-expires`, so a failed run leaves nothing
//! behind on the shared broker.

use std::sync::Arc;
use std::time::Duration;

use switchboard::Transport;
use switchboard::transport::amqp::{AmqpConfig, AmqpTransport, QueueType, Unroutable};

const BROKER: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

fn config(queue_type: QueueType) -> AmqpConfig {
    AmqpConfig::new(BROKER)
        .with_exchange(format!("sb-test-{}", uuid::Uuid::new_v4().simple()))
        .with_exchange_auto_delete(true)
        .with_queue_expires(Duration::from_secs(60))
        .with_queue_type(queue_type)
}

async fn transport(queue_type: QueueType) -> Arc<dyn Transport> {
    Arc::new(
        AmqpTransport::connect(config(queue_type))
            .await
            .expect("RabbitMQ on 127.0.0.1:5672 (guest/guest)"),
    )
}

mod classic {
    use super::*;
    switchboard::conformance_tests!(|| transport(QueueType::Classic));
}

mod quorum {
    use super::*;
    switchboard::conformance_tests!(|| transport(QueueType::Quorum));
}

// ------------------------------------------------------------- shared helpers

use std::collections::BTreeSet;

use lapin::options::{BasicGetOptions, BasicPublishOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Connection, ConnectionProperties};
use serde::{Deserialize, Serialize};
use switchboard::testing::proxy::FaultProxy;
use switchboard::transport::amqp::ConnectionState;
use switchboard::{
    DeadLetter, Delivery, ErrorKind, Event, EventBus, Message, Publisher, RawMessage, Redrive,
    SubscribeOptions, Subscriber, Subscription, Topology, handler_fn, header,
};
use tokio::sync::mpsc;
use uuid::Uuid;

const PATIENCE: Duration = Duration::from_secs(30);

/// Logs to the test output when `RUST_LOG` is set.
fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}

fn unique(label: &str) -> String {
    format!("{label}-{}", Uuid::new_v4().simple())
}

async fn connect(config: AmqpConfig) -> AmqpTransport {
    AmqpTransport::connect(config)
        .await
        .expect("RabbitMQ on 127.0.0.1:5672 (guest/guest)")
}

fn config_name(transport: &AmqpTransport, topic: &str, group: &str) -> String {
    transport
        .config()
        .queue_name(topic, group)
        .expect("queue name")
}

async fn raw_channel() -> (Connection, lapin::Channel) {
    let connection = Connection::connect(BROKER, ConnectionProperties::default())
        .await
        .expect("raw lapin connection");
    let channel = connection.create_channel().await.expect("raw channel");
    (connection, channel)
}

async fn recv(subscription: &mut Subscription, what: &str) -> Delivery {
    tokio::time::timeout(PATIENCE, subscription.recv())
        .await
        .unwrap_or_else(|_| panic!("{what}: nothing delivered within {PATIENCE:?}"))
        .unwrap_or_else(|| panic!("{what}: the subscription ended"))
}

async fn ack(delivery: Delivery) {
    delivery.ack().await.expect("ack");
}

fn seq_message(seq: u64) -> RawMessage {
    RawMessage::new(format!(r#"{{"seq":{seq}}}"#))
        .with_header("seq", seq.to_string())
        .with_header(header::EVENT_ID, Uuid::new_v4().to_string())
}

fn seq_of(delivery: &Delivery) -> u64 {
    delivery.headers()["seq"].parse().expect("seq header")
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct TradeExecuted {
    order_id: String,
    user_id: String,
    symbol: String,
    quantity: u64,
    price: f64,
}

impl Event for TradeExecuted {
    const TYPE: &'static str = "trade.executed";
    const VERSION: &'static str = "1.0";
}

// ------------------------------------------------------------ connection loss

/// Four publishers stream messages through a proxy; after `CUT_AFTER` of them
/// returned `Ok`, every connection is cut, then restored. Every publish that
/// returned `Ok` is consumed — the consumer also lost its connection and
/// resumed by itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_publish_that_returned_ok_is_consumed_across_a_cut_connection() {
    const TOTAL: u64 = 2000;
    const CUT_AFTER: usize = 600;
    init_tracing();
    let proxy = FaultProxy::start("127.0.0.1:5672".parse().unwrap())
        .await
        .expect("proxy");
    let mut config = config(QueueType::Classic)
        .with_heartbeat(Duration::from_secs(1))
        .with_reconnect_delay(Duration::from_millis(20), Duration::from_millis(200));
    config.uri = format!("amqp://guest:guest@{}/%2f", proxy.addr());
    let transport = connect(config).await;
    let mut state = transport.connection_state();
    assert_eq!(*state.borrow(), ConnectionState::Connected);

    let topic = unique("cut");
    let group = unique("g");
    transport
        .declare(&Topology::new().with_groups(topic.clone(), [group.clone()]))
        .await
        .expect("declare");
    let mut subscription = transport
        .subscribe(&topic, SubscribeOptions::new(group).with_prefetch(100))
        .await
        .expect("subscribe");
    let (consumed_tx, mut consumed) = mpsc::unbounded_channel();
    let consumer = tokio::spawn(async move {
        while let Some(delivery) = subscription.recv().await {
            let seq = seq_of(&delivery);
            // An ack lost with the connection is redelivered: count it then.
            if delivery.ack().await.is_ok() {
                consumed_tx.send(seq).ok();
            }
        }
    });

    let (ok_tx, mut oks) = mpsc::unbounded_channel();
    let mut publishers = Vec::new();
    for publisher in 0..4 {
        let (transport, topic, ok_tx) = (transport.clone(), topic.clone(), ok_tx.clone());
        publishers.push(tokio::spawn(async move {
            let mut errors = 0;
            for seq in (publisher..TOTAL).step_by(4) {
                match transport.publish(&topic, seq_message(seq)).await {
                    Ok(()) => {
                        ok_tx.send(seq).ok();
                    }
                    Err(error) => {
                        assert!(error.is_retryable(), "{error}");
                        errors += 1;
                    }
                }
            }
            errors
        }));
    }
    drop(ok_tx);

    let mut published_ok = BTreeSet::new();
    while published_ok.len() < CUT_AFTER {
        published_ok.insert(oks.recv().await.expect("publishers running"));
    }
    proxy.cut();
    proxy.all_closed().await;
    tokio::time::timeout(
        PATIENCE,
        state.wait_for(|state| *state == ConnectionState::Reconnecting),
    )
    .await
    .expect("the transport notices the cut")
    .expect("state watch");
    proxy.restore();
    tokio::time::timeout(
        PATIENCE,
        state.wait_for(|state| *state == ConnectionState::Connected),
    )
    .await
    .expect("the transport reconnects")
    .expect("state watch");

    let mut errors = 0;
    for publisher in publishers {
        errors += publisher.await.expect("publisher task");
    }
    while let Some(seq) = oks.recv().await {
        published_ok.insert(seq);
    }
    assert!(
        published_ok.len() > CUT_AFTER,
        "publishing went on after the restore ({} ok, {errors} errors)",
        published_ok.len()
    );

    let mut seen = BTreeSet::new();
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while !published_ok.is_subset(&seen) {
        match tokio::time::timeout_at(deadline, consumed.recv()).await {
            Ok(Some(seq)) => {
                seen.insert(seq);
            }
            _ => {
                let lost: Vec<_> = published_ok.difference(&seen).take(20).collect();
                panic!(
                    "{} of {} publishes that returned Ok were never consumed; first: {lost:?}",
                    published_ok.difference(&seen).count(),
                    published_ok.len()
                );
            }
        }
    }
    consumer.abort();
}

// --------------------------------------------------------------- publishing

/// Messages are persistent, typed and timestamped plain AMQP messages; a
/// message no queue is bound for is an error, not silence.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_are_persistent_with_plain_properties_and_unroutable_is_an_error() {
    let config = config(QueueType::Classic);
    let transport = connect(config.clone()).await;
    let topic = unique("props");
    let group = unique("g");
    transport
        .declare(&Topology::new().with_groups(topic.clone(), [group.clone()]))
        .await
        .expect("declare");
    let event_id = Uuid::new_v4().to_string();
    let message = RawMessage::new("{}")
        .with_header(header::EVENT_ID, event_id.clone())
        .with_header(header::EVENT_TYPE, "trade.executed")
        .with_header("correlation-id", "c-1");
    transport.publish(&topic, message).await.expect("publish");

    let (_connection, channel) = raw_channel().await;
    let got = channel
        .basic_get(
            config.queue_name(&topic, &group).unwrap().into(),
            BasicGetOptions { no_ack: true },
        )
        .await
        .expect("basic_get")
        .expect("the message is in the group's queue");
    let properties = &got.delivery.properties;
    assert_eq!(properties.delivery_mode(), &Some(2), "persistent");
    assert_eq!(
        properties.content_type().as_ref().map(|t| t.as_str()),
        Some("application/json")
    );
    assert_eq!(
        properties.message_id().as_ref().map(|id| id.as_str()),
        Some(event_id.as_str())
    );
    assert_eq!(
        properties.kind().as_ref().map(|t| t.as_str()),
        Some("trade.executed")
    );
    assert!(properties.timestamp().is_some_and(|t| t > 0));
    let headers = properties.headers().clone().unwrap_or_default();
    assert_eq!(
        headers.inner().get("correlation-id"),
        Some(&AMQPValue::LongString("c-1".into()))
    );

    let error = transport
        .publish(&unique("nobody-listens"), RawMessage::new("{}"))
        .await
        .expect_err("an unroutable message is an error");
    assert_eq!(error.kind(), ErrorKind::NotFound, "{error}");
    let error = transport
        .publish_batch(
            &unique("nobody-listens"),
            vec![RawMessage::new("1"), RawMessage::new("2")],
        )
        .await
        .expect_err("an unroutable batch is an error");
    assert_eq!(error.kind(), ErrorKind::NotFound, "{error}");
}

#[tokio::test]
async fn a_publisher_that_chose_to_discard_unroutable_messages_needs_no_consumer_groups() {
    let transport = connect(config(QueueType::Classic).with_unroutable(Unroutable::Discard)).await;
    let topic = unique("nobody-listens-yet");
    transport
        .publish(&topic, RawMessage::new("{}"))
        .await
        .expect("discarded as configured");
    transport
        .publish_batch(&topic, vec![RawMessage::new("1"), RawMessage::new("2")])
        .await
        .expect("discarded as configured");

    // Once a group exists, its messages are routed and kept as always.
    let mut subscription = transport
        .subscribe(&topic, SubscribeOptions::new("late"))
        .await
        .expect("subscribe");
    transport
        .publish(&topic, seq_message(7))
        .await
        .expect("routed");
    let delivery = recv(&mut subscription, "the routed message").await;
    assert_eq!(seq_of(&delivery), 7, "the discarded ones never arrive");
    ack(delivery).await;
    subscription.shutdown().await.expect("shutdown");
}

// ----------------------------------------------------- attempts and abandon

/// Classic queues count attempts in a header written on republish, quorum
/// queues by `x-delivery-count`; either way a nack comes back with the
/// attempt raised, a delivery dropped unsettled comes back at once, and
/// neither count takes a return twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attempts_are_counted_on_classic_and_quorum_queues() {
    for queue_type in [QueueType::Classic, QueueType::Quorum] {
        let transport = connect(config(queue_type)).await;
        let topic = unique("attempts");
        let mut subscription = transport
            .subscribe(&topic, SubscribeOptions::new(unique("g")))
            .await
            .expect("subscribe");
        transport
            .publish(&topic, seq_message(7))
            .await
            .expect("publish");
        for expected in 1..=3 {
            let delivery = recv(&mut subscription, "nacked message").await;
            assert_eq!(delivery.attempt(), expected, "{queue_type:?}");
            assert_eq!(seq_of(&delivery), 7);
            delivery.nack(Duration::ZERO).await.expect("nack");
        }
        let delivery = recv(&mut subscription, "before abandoning").await;
        assert_eq!(delivery.attempt(), 4, "{queue_type:?}");
        drop(delivery);
        let delivery = recv(&mut subscription, "abandoned message").await;
        assert_eq!(seq_of(&delivery), 7);
        assert_eq!(delivery.attempt(), 5, "{queue_type:?}");
        assert_eq!(
            delivery.delivery_count(),
            2,
            "{queue_type:?}: one without an outcome"
        );
        // A nack after a return the broker counted: neither count may take
        // that return twice.
        delivery.nack(Duration::ZERO).await.expect("nack");
        let delivery = recv(&mut subscription, "nacked after a return").await;
        assert_eq!(delivery.attempt(), 6, "{queue_type:?}");
        assert_eq!(
            delivery.delivery_count(),
            2,
            "{queue_type:?}: a nack is an outcome"
        );
        ack(delivery).await;
        subscription.shutdown().await.expect("shutdown");
    }
}

// -------------------------------------------------------------- manual retry

/// Dead letters carry their facts, are listed, inspected by event id, and
/// redriven one by one or all at once, on classic and quorum queues.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_are_listed_inspected_and_redriven_one_or_all() {
    for queue_type in [QueueType::Classic, QueueType::Quorum] {
        let transport = connect(config(queue_type)).await;
        let topic = unique("retry");
        let group = unique("g");
        let mut subscription = transport
            .subscribe(&topic, SubscribeOptions::new(group.clone()))
            .await
            .expect("subscribe");
        let mut ids = Vec::new();
        for seq in 0..3 {
            let message = seq_message(seq);
            ids.push(message.headers[header::EVENT_ID].clone());
            transport.publish(&topic, message).await.expect("publish");
        }
        for _ in 0..3 {
            let delivery = recv(&mut subscription, "to dead-letter").await;
            let seq = seq_of(&delivery);
            delivery
                .dead_letter(
                    DeadLetter::new(format!("poison {seq}"))
                        .with_attempts(3)
                        .with_last_error("market: unavailable"),
                )
                .await
                .expect("dead_letter");
        }
        let queue = transport.dead_letters().expect("dead letters");
        let listed = queue.list(&topic, 10).await.expect("list");
        assert_eq!(listed.len(), 3, "{queue_type:?}: {listed:?}");
        for letter in &listed {
            let seq: u64 = letter.message.headers["seq"].parse().unwrap();
            assert_eq!(letter.id, ids[seq as usize]);
            assert_eq!(letter.reason, format!("poison {seq}"));
            assert_eq!(letter.attempts, 3);
            assert_eq!(letter.last_error.as_deref(), Some("market: unavailable"));
            assert_eq!(letter.topic, topic);
            assert_eq!(letter.group, group);
        }
        assert_eq!(queue.list(&topic, 2).await.expect("list").len(), 2);
        let inspected = queue.inspect(&topic, &ids[1]).await.expect("inspect");
        assert_eq!(inspected.message.headers["seq"], "1");
        // Browsing put everything back.
        assert_eq!(queue.list(&topic, 10).await.expect("list").len(), 3);

        assert_eq!(
            queue
                .redrive(&topic, Redrive::One(ids[1].clone()))
                .await
                .expect("redrive one"),
            1
        );
        let again = recv(&mut subscription, "redriven one").await;
        assert_eq!(seq_of(&again), 1);
        assert_eq!(again.attempt(), 1, "a redrive starts counting afresh");
        ack(again).await;
        let left: BTreeSet<String> = queue
            .list(&topic, 10)
            .await
            .expect("list")
            .into_iter()
            .map(|letter| letter.id)
            .collect();
        assert_eq!(left, BTreeSet::from([ids[0].clone(), ids[2].clone()]));
        let missing = queue
            .redrive(&topic, Redrive::One(ids[1].clone()))
            .await
            .expect_err("already redriven");
        assert_eq!(missing.kind(), ErrorKind::NotFound);

        assert_eq!(
            queue
                .redrive(&topic, Redrive::All)
                .await
                .expect("redrive all"),
            2
        );
        let mut back = BTreeSet::new();
        for _ in 0..2 {
            let delivery = recv(&mut subscription, "redriven all").await;
            back.insert(seq_of(&delivery));
            ack(delivery).await;
        }
        assert_eq!(back, BTreeSet::from([0, 2]));
        assert!(queue.list(&topic, 10).await.expect("list").is_empty());
        subscription.shutdown().await.expect("shutdown");
    }
}

// -------------------------------------------------------- interop, bad input

fn spec_document(event_id: &str) -> String {
    format!(
        r#"{{
  "event_id": "{event_id}",
  "event_type": "trade.executed",
  "timestamp": "2026-02-19T12:00:00Z",
  "source": "trading-service",
  "version": "1.0",
  "payload": {{
    "order_id": "123",
    "user_id": "456",
    "symbol": "AAPL",
    "quantity": 100,
    "price": 150.00
  }}
}}"#
    )
}

async fn subscribe_trades(
    bus: &EventBus,
    group: &str,
) -> (
    switchboard::ConsumerHandle,
    mpsc::UnboundedReceiver<(Uuid, TradeExecuted)>,
) {
    let (seen, inbox) = mpsc::unbounded_channel();
    let consumer = bus
        .subscribe(
            SubscribeOptions::new(group),
            handler_fn(move |message: Message<TradeExecuted>| {
                let seen = seen.clone();
                async move {
                    seen.send((message.event_id(), message.payload().clone()))
                        .ok();
                    Ok::<_, switchboard::Error>(())
                }
            }),
        )
        .await
        .expect("subscribe");
    (consumer, inbox)
}

/// Another client publishing plain AMQP with the SPEC §5.1 body is understood,
/// and what switchboard publishes reads back through a raw `basic_get` as the
/// SPEC document.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_amqp_clients_and_switchboard_understand_each_other() {
    let config = config(QueueType::Classic);
    let transport = Arc::new(connect(config.clone()).await);
    let bus = EventBus::new(transport.clone(), "trading-service");
    let group = unique("game");
    bus.declare(&Topology::new().with_event::<TradeExecuted, _>([group.clone()]))
        .await
        .expect("declare");
    let (consumer, mut trades) = subscribe_trades(&bus, &group).await;

    // In: a raw lapin publish with nothing but plain AMQP properties.
    let (_connection, channel) = raw_channel().await;
    let event_id = Uuid::new_v4();
    channel
        .basic_publish(
            config.exchange.as_str().into(),
            "trade.executed".into(),
            BasicPublishOptions::default(),
            spec_document(&event_id.to_string()).as_bytes(),
            BasicProperties::default()
                .with_content_type("application/json".into())
                .with_delivery_mode(2)
                .with_message_id(event_id.to_string().into())
                .with_type("trade.executed".into()),
        )
        .await
        .expect("raw publish")
        .await
        .expect("raw confirm");
    let (id, trade) = tokio::time::timeout(PATIENCE, trades.recv())
        .await
        .expect("the raw message is consumed")
        .expect("consumer running");
    assert_eq!(id, event_id);
    assert_eq!(trade.symbol, "AAPL");
    assert_eq!(trade.quantity, 100);
    assert_eq!(trade.price, 150.0);
    consumer.shutdown().await.expect("shutdown");

    // Out: switchboard publishes, a raw basic_get reads the SPEC document.
    let trade = TradeExecuted {
        order_id: "124".into(),
        user_id: "456".into(),
        symbol: "MSFT".into(),
        quantity: 5,
        price: 410.25,
    };
    let published = bus.publish(trade).await.expect("publish");
    let got = channel
        .basic_get(
            config.queue_name("trade.executed", &group).unwrap().into(),
            BasicGetOptions { no_ack: true },
        )
        .await
        .expect("basic_get")
        .expect("a message");
    let document: serde_json::Value =
        serde_json::from_slice(&got.delivery.data).expect("the body is JSON");
    let keys: BTreeSet<&str> = document
        .as_object()
        .expect("an object")
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!(
        keys,
        BTreeSet::from([
            "event_id",
            "event_type",
            "timestamp",
            "source",
            "version",
            "payload"
        ])
    );
    assert_eq!(document["event_id"], published.to_string());
    assert_eq!(document["event_type"], "trade.executed");
    assert_eq!(document["source"], "trading-service");
    assert_eq!(document["version"], "1.0");
    assert_eq!(document["payload"]["symbol"], "MSFT");
    assert_eq!(
        got.delivery
            .properties
            .message_id()
            .as_ref()
            .map(|id| id.to_string()),
        Some(published.to_string())
    );
}

/// A body that is not an envelope is dead-lettered with the reason, and the
/// consumer goes on to the next message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_dead_lettered_with_the_reason_and_the_consumer_carries_on() {
    let config = config(QueueType::Classic);
    let transport = Arc::new(connect(config.clone()).await);
    let bus = EventBus::new(transport.clone(), "trading-service");
    let group = unique("game");
    bus.declare(&Topology::new().with_event::<TradeExecuted, _>([group.clone()]))
        .await
        .expect("declare");
    let (consumer, mut trades) = subscribe_trades(&bus, &group).await;

    let (_connection, channel) = raw_channel().await;
    let bad_id = Uuid::new_v4().to_string();
    for (body, id) in [
        ("this is not JSON".to_owned(), bad_id.clone()),
        (
            spec_document(&Uuid::new_v4().to_string()),
            Uuid::new_v4().to_string(),
        ),
    ] {
        channel
            .basic_publish(
                config.exchange.as_str().into(),
                "trade.executed".into(),
                BasicPublishOptions::default(),
                body.as_bytes(),
                BasicProperties::default()
                    .with_delivery_mode(2)
                    .with_message_id(id.into())
                    .with_headers(FieldTable::default()),
            )
            .await
            .expect("raw publish")
            .await
            .expect("raw confirm");
    }
    let (_, trade) = tokio::time::timeout(PATIENCE, trades.recv())
        .await
        .expect("the good message after the bad one is handled")
        .expect("consumer running");
    assert_eq!(trade.order_id, "123");
    consumer.shutdown().await.expect("shutdown");

    let letter = transport
        .dead_letters()
        .expect("dead letters")
        .inspect("trade.executed", &bad_id)
        .await
        .expect("the bad message is in the dead-letter queue");
    assert!(
        letter.reason.contains("cannot decode"),
        "reason names the problem: {}",
        letter.reason
    );
    assert_eq!(letter.message.body.as_ref(), b"this is not JSON");
    assert_eq!(letter.group, group);
}

/// A publish that cannot reach the broker within the publish timeout is
/// returned as a retryable error, not dropped; once the broker is back the
/// transport has declared its topology again, and publishes and consumes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_without_a_broker_is_a_retryable_error_and_the_transport_recovers_its_topology() {
    let proxy = FaultProxy::start("127.0.0.1:5672".parse().unwrap())
        .await
        .expect("proxy");
    let mut config = config(QueueType::Quorum)
        .with_heartbeat(Duration::from_secs(1))
        .with_reconnect_delay(Duration::from_millis(20), Duration::from_millis(200))
        .with_publish_timeout(Duration::from_millis(300));
    config.uri = format!("amqp://guest:guest@{}/%2f", proxy.addr());
    let transport = connect(config).await;
    let topic = unique("away");
    let mut subscription = transport
        .subscribe(&topic, SubscribeOptions::new(unique("g")))
        .await
        .expect("subscribe");

    // Declared but not subscribed: only the reconnection declares it again.
    let declared_topic = unique("declared");
    let declared_queue = config_name(&transport, &declared_topic, "g");
    transport
        .declare(&Topology::new().with_groups(declared_topic.clone(), ["g"]))
        .await
        .expect("declare");

    proxy.cut();
    proxy.all_closed().await;
    let (_connection, channel) = raw_channel().await;
    channel
        .queue_delete(
            declared_queue.as_str().into(),
            lapin::options::QueueDeleteOptions::default(),
        )
        .await
        .expect("delete the queue while the transport is away");
    let error = transport
        .publish(&topic, seq_message(1))
        .await
        .expect_err("no broker within the publish timeout");
    assert_eq!(error.kind(), ErrorKind::Connection, "{error}");
    assert!(error.is_retryable());

    proxy.restore();
    let mut state = transport.connection_state();
    tokio::time::timeout(
        PATIENCE,
        state.wait_for(|state| *state == ConnectionState::Connected),
    )
    .await
    .expect("reconnects")
    .expect("state watch");
    channel
        .queue_declare(
            declared_queue.as_str().into(),
            lapin::options::QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .expect("the reconnection declared the topology again");
    transport
        .publish(&topic, seq_message(2))
        .await
        .expect("publish after the restore");
    let delivery = recv(&mut subscription, "after the restore").await;
    assert_eq!(seq_of(&delivery), 2);
    ack(delivery).await;
}

/// A broker that hangs without closing the connection is noticed by the
/// missing heartbeats; the transport reconnects once it answers again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeats_notice_a_peer_that_hangs() {
    let proxy = FaultProxy::start("127.0.0.1:5672".parse().unwrap())
        .await
        .expect("proxy");
    let mut config = config(QueueType::Classic)
        .with_heartbeat(Duration::from_secs(1))
        .with_reconnect_delay(Duration::from_millis(20), Duration::from_millis(200));
    config.uri = format!("amqp://guest:guest@{}/%2f", proxy.addr());
    let transport = connect(config).await;
    let mut state = transport.connection_state();

    proxy.stall();
    assert_eq!(proxy.open_connections(), 2, "both connections stay open");
    tokio::time::timeout(
        PATIENCE,
        state.wait_for(|state| *state == ConnectionState::Reconnecting),
    )
    .await
    .expect("the missing heartbeats are noticed")
    .expect("state watch");
    proxy.restore();
    tokio::time::timeout(
        PATIENCE,
        state.wait_for(|state| *state == ConnectionState::Connected),
    )
    .await
    .expect("reconnects once the peer answers")
    .expect("state watch");
    let topic = unique("hang");
    transport
        .declare(&Topology::new().with_groups(topic.clone(), [unique("g")]))
        .await
        .expect("declare on the new connection");
    transport
        .publish(&topic, seq_message(1))
        .await
        .expect("publish on the new connection");
}

/// A quorum queue dead-letters by itself too (at least once, into the same
/// `<queue>.dlq`): a message another client rejects without requeue is
/// listed with the broker's reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quorum_queues_dead_letter_broker_side_into_the_same_queue() {
    let config = config(QueueType::Quorum);
    let transport = connect(config.clone()).await;
    let topic = unique("broker-dlq");
    let group = unique("g");
    transport
        .declare(&Topology::new().with_groups(topic.clone(), [group.clone()]))
        .await
        .expect("declare");
    let message = seq_message(5);
    let event_id = message.headers[header::EVENT_ID].clone();
    transport.publish(&topic, message).await.expect("publish");

    let (_connection, channel) = raw_channel().await;
    let got = channel
        .basic_get(
            config.queue_name(&topic, &group).unwrap().into(),
            BasicGetOptions { no_ack: false },
        )
        .await
        .expect("basic_get")
        .expect("a message");
    got.delivery
        .acker
        .reject(lapin::options::BasicRejectOptions { requeue: false })
        .await
        .expect("reject");

    let queue = transport.dead_letters().expect("dead letters");
    let deadline = tokio::time::Instant::now() + PATIENCE;
    // Dead-lettering is asynchronous in the broker: look until it is there.
    let letter = loop {
        match queue.inspect(&topic, &event_id).await {
            Ok(letter) => break letter,
            Err(error) if error.kind() == ErrorKind::NotFound => {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "never dead-lettered"
                );
                tokio::task::yield_now().await;
            }
            Err(error) => panic!("inspect: {error}"),
        }
    };
    assert_eq!(letter.reason, "broker: rejected");
    assert_eq!(letter.group, group);
    assert_eq!(letter.message.headers["seq"], "5");
}

#[path = "common/redrive.rs"]
mod redrive;

#[tokio::test]
async fn a_redrive_of_all_moves_only_what_the_queue_held() {
    redrive::redrive_all_moves_only_what_was_there(transport(QueueType::Quorum).await).await;
}

/// A browse holds at most 1 000 dead letters unacked: an id further back is
/// reported as out of reach, not searched for by holding the whole queue,
/// and nothing is lost by looking.
#[tokio::test]
async fn inspect_looks_at_the_first_thousand_dead_letters_and_says_so() {
    use switchboard::{DeadLetter, RawMessage, SubscribeOptions, Topology, header};

    let transport = transport(QueueType::Classic).await;
    let id = uuid::Uuid::new_v4().simple().to_string();
    let (topic, group) = (format!("browse.{id}"), format!("g-{id}"));
    transport
        .declare(&Topology::new().with_groups(topic.clone(), [group.clone()]))
        .await
        .expect("declare");
    let mut subscription = transport
        .subscribe(&topic, SubscribeOptions::new(group))
        .await
        .expect("subscribe");
    let ids: Vec<String> = (0..1_001)
        .map(|_| uuid::Uuid::new_v4().to_string())
        .collect();
    let messages = ids
        .iter()
        .map(|id| RawMessage::new("x").with_header(header::EVENT_ID, id.clone()))
        .collect();
    transport
        .publish_batch(&topic, messages)
        .await
        .expect("publish");
    for _ in 0..ids.len() {
        let delivery = tokio::time::timeout(Duration::from_secs(30), subscription.recv())
            .await
            .expect("a delivery in time")
            .expect("the subscription is open");
        delivery
            .dead_letter(DeadLetter::new("browse test"))
            .await
            .expect("dead-letter");
    }
    let queue = transport.dead_letters().expect("a dead-letter queue");
    let first = queue.inspect(&topic, &ids[0]).await.expect("the first");
    assert_eq!(first.id, ids[0]);
    let error = queue
        .inspect(&topic, &ids[1_000])
        .await
        .expect_err("the 1 001st is out of reach");
    assert_eq!(error.kind(), switchboard::ErrorKind::NotFound, "{error}");
    assert!(error.message().contains("first 1000"), "{error}");
    assert_eq!(
        queue.list(&topic, 2_000).await.expect("list").len(),
        ids.len(),
        "looking removed nothing"
    );
    subscription.shutdown().await.expect("shutdown");
}

#[path = "amqp/wire.rs"]
mod wire;

#[path = "amqp/lag.rs"]
mod lag;

#[path = "amqp/clean_exit.rs"]
mod clean_exit;

#[path = "amqp/connect_timeout.rs"]
mod connect_timeout;

#[path = "common/ordering.rs"]
mod ordering_scenario;

#[path = "amqp/ordering.rs"]
mod ordering;

#[path = "amqp/schedule.rs"]
mod schedule;
