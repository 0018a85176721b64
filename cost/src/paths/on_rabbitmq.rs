//! The RabbitMQ sides, raw (lapin by hand) and through the bus.

#![allow(clippy::wildcard_imports)]

use super::*;

pub(super) async fn amqp_bus(name: &str) -> EventBus {
    let config = AmqpConfig::new(amqp_url())
        .with_exchange(name.to_owned())
        .with_exchange_auto_delete(true)
        .with_queue_expires(Duration::from_secs(300));
    let transport = AmqpTransport::connect(config).await.expect("RabbitMQ");
    let bus = EventBus::new(Arc::new(transport), SOURCE);
    bus.declare(&Topology::new().with_event::<TradeExecuted, _>([GROUP]))
        .await
        .expect("declare");
    bus
}

pub(super) fn raw_properties(event_id: uuid::Uuid) -> BasicProperties {
    BasicProperties::default()
        .with_delivery_mode(2)
        .with_content_type("application/json".into())
        .with_message_id(event_id.to_string().into())
        .with_type(TradeExecuted::TYPE.into())
        .with_timestamp(chrono::Utc::now().timestamp() as u64)
}

/// The same shape by hand: a topic exchange, a durable queue bound to it,
/// a channel in confirm mode.
pub(super) async fn raw_amqp(name: &str) -> (lapin::Connection, lapin::Channel) {
    let connection = lapin::Connection::connect(&amqp_url(), Default::default())
        .await
        .expect("RabbitMQ");
    let channel = connection.create_channel().await.expect("channel");
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirm_select");
    let exchange = format!("{name}.raw");
    channel
        .exchange_declare(
            exchange.as_str().into(),
            ExchangeKind::Topic,
            ExchangeDeclareOptions {
                durable: true,
                auto_delete: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .expect("exchange_declare");
    let queue = format!("{exchange}.{GROUP}");
    let mut arguments = FieldTable::default();
    arguments.insert(
        ShortString::from("x-expires"),
        AMQPValue::LongLongInt(300_000),
    );
    channel
        .queue_declare(
            queue.as_str().into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            arguments,
        )
        .await
        .expect("queue_declare");
    channel
        .queue_bind(
            queue.as_str().into(),
            exchange.as_str().into(),
            TradeExecuted::TYPE.into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("queue_bind");
    (connection, channel)
}

/// One persistent, mandatory publish, its confirm awaited.
pub(super) async fn raw_amqp_publish(channel: &lapin::Channel, exchange: &str, n: u64) {
    let (body, event_id) = raw_encode(n);
    let confirm = channel
        .basic_publish(
            exchange.into(),
            TradeExecuted::TYPE.into(),
            BasicPublishOptions {
                mandatory: true,
                immediate: false,
            },
            &body,
            raw_properties(event_id),
        )
        .await
        .expect("publish");
    match confirm.await.expect("confirm") {
        Confirmation::Ack(None) => {}
        other => panic!("not confirmed: {other:?}"),
    }
}

/// Prefetch [`BATCH`], each delivery decoded, handled and acked.
pub(super) async fn amqp_consume_raw(
    connection: &lapin::Connection,
    _: &lapin::Channel,
    name: &str,
    n: u64,
) {
    let channel = connection.create_channel().await.expect("channel");
    channel
        .basic_qos(BATCH as u16, BasicQosOptions::default())
        .await
        .expect("basic_qos");
    let queue = format!("{name}.raw.{GROUP}");
    let mut deliveries = channel
        .basic_consume(
            queue.as_str().into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("basic_consume");
    for _ in 0..n {
        let delivery = deliveries
            .next()
            .await
            .expect("a delivery")
            .expect("a delivery");
        std::hint::black_box(raw_decode(&delivery.data).payload.quantity);
        delivery.ack(BasicAckOptions::default()).await.expect("ack");
    }
}
