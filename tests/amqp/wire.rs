//! The AMQP fixtures of `tests/fixtures/wire/v1`: a message's properties and
//! headers and a dead letter's, published raw with lapin and read by the
//! transport; and today's writers must still set the same properties and
//! headers.

use lapin::options::{BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel};
use serde_json::Value as Json;
use switchboard::transport::amqp::QueueType;
use switchboard::{DeadLetter, Publisher, Topology, Transport};

use super::{config, connect, raw_channel};

#[path = "../common/wire.rs"]
mod fixture;
use fixture::{GROUP, TOPIC, fixture_message};

const AMQP_MESSAGE: &str = include_str!("../fixtures/wire/v1/amqp_message.json");
const DEAD_LETTER: &str = include_str!("../fixtures/wire/v1/amqp_dead_letter.json");
/// The one header whose value varies per write.
const DLQ_TIME: &str = "x-sb-dlq-time";

/// The fixture's properties, every header an AMQP long string.
fn fixture_properties(fixture: &Json) -> BasicProperties {
    let properties = &fixture["properties"];
    let text = |name: &str| properties[name].as_str().expect("a string property");
    let mut headers = FieldTable::default();
    for (name, value) in properties["headers"].as_object().expect("headers") {
        headers.insert(
            name.as_str().into(),
            AMQPValue::LongString(value.as_str().expect("a string").into()),
        );
    }
    BasicProperties::default()
        .with_content_type(text("content_type").into())
        .with_delivery_mode(properties["delivery_mode"].as_u64().expect("a number") as u8)
        .with_message_id(text("message_id").into())
        .with_type(text("type").into())
        .with_headers(headers)
}

/// Asserts that `got` carries the fixture's properties, byte for byte; the
/// timestamp (which varies) must be there.
fn assert_same_properties(got: &BasicProperties, fixture: &Json, ignored_header: Option<&str>) {
    let wanted = fixture_properties(fixture);
    assert_eq!(got.content_type(), wanted.content_type());
    assert_eq!(got.delivery_mode(), wanted.delivery_mode());
    assert_eq!(got.message_id(), wanted.message_id());
    assert_eq!(got.kind(), wanted.kind());
    assert!(got.timestamp().is_some(), "a timestamp");
    let mut headers = got.headers().clone().expect("headers").inner().clone();
    if let Some(name) = ignored_header {
        let value = headers.remove(name).expect("the varying header");
        let AMQPValue::LongString(text) = value else {
            panic!("{name} is not a long string: {value:?}")
        };
        let text = String::from_utf8_lossy(text.as_bytes()).into_owned();
        let at = chrono::DateTime::parse_from_rfc3339(&text).expect("RFC 3339");
        assert_eq!(
            text,
            at.to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
            "microseconds, UTC"
        );
    }
    let mut wanted_headers = wanted.headers().clone().expect("headers").inner().clone();
    if let Some(name) = ignored_header {
        wanted_headers.remove(name);
    }
    assert_eq!(
        headers, wanted_headers,
        "today's writer changed the v1 headers"
    );
}

async fn confirmed_channel() -> (lapin::Connection, Channel) {
    let (connection, channel) = raw_channel().await;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirm select");
    (connection, channel)
}

async fn raw_get(channel: &Channel, queue: &str) -> lapin::message::BasicGetMessage {
    channel
        .basic_get(queue.into(), BasicGetOptions { no_ack: true })
        .await
        .expect("basic_get")
        .expect("a message")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_v1_message_is_read_and_still_written_property_for_property() {
    let fixture: Json = serde_json::from_str(AMQP_MESSAGE).expect("JSON");
    let config = config(QueueType::Classic);
    let transport = connect(config.clone()).await;
    transport
        .declare(&Topology::new().with_groups(TOPIC, [GROUP]))
        .await
        .expect("declare");
    let queue = config.queue_name(TOPIC, GROUP).expect("queue name");
    let (_connection, channel) = confirmed_channel().await;

    // Read: the fixture, published by a plain AMQP client.
    channel
        .basic_publish(
            config.exchange.as_str().into(),
            TOPIC.into(),
            BasicPublishOptions::default(),
            fixture["body"].as_str().expect("a body").as_bytes(),
            fixture_properties(&fixture),
        )
        .await
        .expect("raw publish")
        .await
        .expect("raw confirm");
    fixture::reads_the_fixture_message(&transport).await;

    // Write: today's publisher sets the same properties and headers.
    transport
        .publish(TOPIC, fixture_message())
        .await
        .expect("publish");
    let got = raw_get(&channel, &queue).await;
    assert_eq!(got.delivery.data, fixture_message().body.as_ref());
    assert_same_properties(&got.delivery.properties, &fixture, None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_v1_dead_letter_is_read_and_still_written_header_for_header() {
    let fixture: Json = serde_json::from_str(DEAD_LETTER).expect("JSON");
    let expected = &fixture["expected"];
    let config = config(QueueType::Classic);
    let transport = connect(config.clone()).await;
    transport
        .declare(&Topology::new().with_groups(TOPIC, [GROUP]))
        .await
        .expect("declare");
    let dlq = format!(
        "{}.dlq",
        config.queue_name(TOPIC, GROUP).expect("queue name")
    );
    let (_connection, channel) = confirmed_channel().await;

    // Read: the fixture, put into the dead-letter queue by a plain client.
    channel
        .basic_publish(
            "".into(),
            dlq.as_str().into(),
            BasicPublishOptions::default(),
            fixture["body"].as_str().expect("a body").as_bytes(),
            fixture_properties(&fixture),
        )
        .await
        .expect("raw publish")
        .await
        .expect("raw confirm");
    let letters = transport
        .dead_letters()
        .expect("a dead-letter queue")
        .list(TOPIC, 10)
        .await
        .expect("list");
    assert_eq!(letters.len(), 1);
    let letter = &letters[0];
    assert_eq!(letter.id, expected["id"]);
    assert_eq!(letter.topic, expected["topic"]);
    assert_eq!(letter.group, GROUP);
    assert_eq!(letter.reason, expected["reason"]);
    assert_eq!(u64::from(letter.attempts), expected["attempts"]);
    assert_eq!(
        letter.last_error.as_deref(),
        expected["last_error"].as_str()
    );
    assert_eq!(
        letter
            .dead_lettered_at
            .to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
        expected["dead_lettered_at"]
    );
    assert_eq!(letter.message, fixture_message());
    // The browse put it back; take it out before writing one.
    let _ = raw_get(&channel, &dlq).await;

    // Write: today's dead-lettering sets the same properties and headers;
    // only the time differs per write.
    transport
        .publish(TOPIC, fixture_message())
        .await
        .expect("publish");
    let (delivery, subscription) = fixture::first_delivery(&transport).await;
    delivery
        .dead_letter(
            DeadLetter::new("payment declined")
                .with_attempts(3)
                .with_last_error("card expired"),
        )
        .await
        .expect("dead-letter");
    subscription.shutdown().await.expect("shutdown");
    let got = raw_get(&channel, &dlq).await;
    assert_eq!(got.delivery.data, fixture_message().body.as_ref());
    assert_same_properties(&got.delivery.properties, &fixture, Some(DLQ_TIME));
}
