//! [`RawMessage`] ⇄ AMQP properties and headers.
//!
//! Plain AMQP properties carry what any other client can read without this
//! crate (`message_id`, `type`, `content_type`, `timestamp`, persistence);
//! the message's own headers travel as string AMQP headers. The transport's
//! bookkeeping headers (attempts, dead-letter facts) start with `x-sb-` and
//! are not handed to consumers as message headers.

use chrono::Utc;
use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable, ShortString};
use uuid::Uuid;

use super::declare::long_string;
use crate::transport::{RawMessage, header};

/// Deliveries before this one, written when a message is republished (by a
/// nack, or to count a redelivery on a classic queue).
pub(crate) const ATTEMPTS: &str = "x-sb-attempts";
/// Deliveries before this one that ended without an outcome (a crash, a
/// lost connection, a delivery dropped unsettled), written on republish.
pub(crate) const REDELIVERIES: &str = "x-sb-redeliveries";
/// Dead-letter facts.
pub(crate) const DLQ_REASON: &str = "x-sb-dlq-reason";
pub(crate) const DLQ_ATTEMPTS: &str = "x-sb-dlq-attempts";
pub(crate) const DLQ_TOPIC: &str = "x-sb-dlq-topic";
pub(crate) const DLQ_GROUP: &str = "x-sb-dlq-group";
pub(crate) const DLQ_ERROR: &str = "x-sb-dlq-last-error";
pub(crate) const DLQ_TIME: &str = "x-sb-dlq-time";

/// Persistent (delivery mode 2).
const PERSISTENT: u8 = 2;

/// The properties of a new message: persistent, typed, timestamped, with
/// `message_id` = the event id (a fresh UUID when the message has none).
pub(crate) fn publish_properties(message: &RawMessage, content_type: &str) -> BasicProperties {
    let message_id = message
        .headers
        .get(header::EVENT_ID)
        .filter(|id| id.len() <= 255)
        .cloned()
        .unwrap_or_else(|| Uuid::new_v4().to_string());
    let mut properties = BasicProperties::default()
        .with_delivery_mode(PERSISTENT)
        .with_content_type(content_type.into())
        .with_message_id(message_id.into())
        .with_timestamp(Utc::now().timestamp().max(0) as u64)
        .with_headers(headers_table(message));
    if let Some(event_type) = message
        .headers
        .get(header::EVENT_TYPE)
        .filter(|kind| kind.len() <= 255)
    {
        properties = properties.with_type(event_type.as_str().into());
    }
    properties
}

fn headers_table(message: &RawMessage) -> FieldTable {
    let mut table = FieldTable::default();
    for (name, value) in &message.headers {
        // AMQP header names are short strings; longer ones cannot travel.
        if let Ok(name) = ShortString::try_new(name.as_str()) {
            table.insert(name, long_string(value));
        }
    }
    table
}

/// The same properties with `extra` headers set and `removed` ones dropped.
pub(crate) fn with_headers(
    properties: &BasicProperties,
    extra: &[(&str, String)],
    removed: &[&str],
) -> BasicProperties {
    let mut table = properties.headers().clone().unwrap_or_default();
    let mut kept = FieldTable::default();
    for (name, value) in table.inner() {
        if !removed.iter().any(|removed| removed == &name.as_str()) {
            kept.insert(name.clone(), value.clone());
        }
    }
    table = kept;
    for (name, value) in extra {
        table.insert((*name).into(), long_string(value));
    }
    properties.clone().with_headers(table)
}

/// The message a consumer sees: the body, the string headers (not the
/// transport's own), and the event id and type from `message_id` and `type`
/// when a plain AMQP client set only those.
pub(crate) fn raw_message(body: Vec<u8>, properties: &BasicProperties) -> RawMessage {
    let mut message = RawMessage::new(body);
    if let Some(table) = properties.headers() {
        for (name, value) in table.inner() {
            let name = name.as_str();
            if name.starts_with("x-sb-")
                || name.starts_with("x-death")
                || name == "x-delivery-count"
            {
                continue;
            }
            if let Some(value) = string_value(value) {
                message.headers.insert(name.to_owned(), value);
            }
        }
    }
    if let Some(id) = properties.message_id() {
        message
            .headers
            .entry(header::EVENT_ID.to_owned())
            .or_insert_with(|| id.to_string());
    }
    if let Some(kind) = properties.kind() {
        message
            .headers
            .entry(header::EVENT_TYPE.to_owned())
            .or_insert_with(|| kind.to_string());
    }
    message
}

/// A header's value as text, when it is a string or a number.
pub(crate) fn string_value(value: &AMQPValue) -> Option<String> {
    match value {
        AMQPValue::LongString(text) => Some(String::from_utf8_lossy(text.as_bytes()).into_owned()),
        AMQPValue::ShortString(text) => Some(text.to_string()),
        other => number_value(other).map(|number| number.to_string()),
    }
}

/// A header's value as a number, when it is one (or a string of one).
pub(crate) fn number_value(value: &AMQPValue) -> Option<i64> {
    match value {
        AMQPValue::ShortShortInt(n) => Some((*n).into()),
        AMQPValue::ShortShortUInt(n) => Some((*n).into()),
        AMQPValue::ShortInt(n) => Some((*n).into()),
        AMQPValue::ShortUInt(n) => Some((*n).into()),
        AMQPValue::LongInt(n) => Some((*n).into()),
        AMQPValue::LongUInt(n) => Some((*n).into()),
        AMQPValue::LongLongInt(n) => Some(*n),
        AMQPValue::LongString(text) => std::str::from_utf8(text.as_bytes()).ok()?.parse().ok(),
        AMQPValue::ShortString(text) => text.as_str().parse().ok(),
        _ => None,
    }
}

/// One header of `properties`.
pub(crate) fn header_value<'a>(
    properties: &'a BasicProperties,
    name: &str,
) -> Option<&'a AMQPValue> {
    properties.headers().as_ref()?.inner().get(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_and_ids_survive_the_round_trip() {
        let message = RawMessage::new("{}")
            .with_header(header::EVENT_ID, "e-1")
            .with_header(header::EVENT_TYPE, "trade.executed")
            .with_header("correlation-id", "c-9");
        let properties = publish_properties(&message, "application/json");
        assert_eq!(properties.delivery_mode(), &Some(2));
        assert_eq!(
            properties.message_id().as_ref().map(|id| id.as_str()),
            Some("e-1")
        );
        assert_eq!(
            properties.kind().as_ref().map(|kind| kind.as_str()),
            Some("trade.executed")
        );
        let bookkeeping = with_headers(&properties, &[(ATTEMPTS, "2".to_owned())], &[]);
        let back = raw_message(b"{}".to_vec(), &bookkeeping);
        assert_eq!(back, message, "bookkeeping headers stay out of the message");
    }

    #[test]
    fn plain_amqp_properties_become_headers() {
        let properties = BasicProperties::default()
            .with_message_id("m-1".into())
            .with_type("order.created".into());
        let message = raw_message(Vec::new(), &properties);
        assert_eq!(message.headers[header::EVENT_ID], "m-1");
        assert_eq!(message.headers[header::EVENT_TYPE], "order.created");
    }
}
