//! `EventEnvelope<T>` through plain serde: the same checks as the codec,
//! for readers that are not the codec (a file, an axum `Json` extractor, a
//! database row).

use serde_json::{Value, json};
use switchboard::{Codec, EventEnvelope};

use super::common::{SPEC_DOCUMENT, SPEC_EVENT_ID, TradeExecuted, spec_trade};
use super::{OrderCreated, TradeSettled};

fn spec_json() -> Value {
    serde_json::from_str(SPEC_DOCUMENT).unwrap()
}

#[test]
fn the_spec_document_deserializes_with_plain_serde_json() {
    let envelope: EventEnvelope<TradeExecuted> = serde_json::from_str(SPEC_DOCUMENT).unwrap();
    assert_eq!(envelope.event_id().to_string(), SPEC_EVENT_ID);
    assert_eq!(envelope.event_type(), "trade.executed");
    assert_eq!(envelope.payload(), &spec_trade());
    // The same envelope the codec reads, and the same after a round trip.
    let decoded = Codec::default()
        .decode::<TradeExecuted>(SPEC_DOCUMENT.as_bytes())
        .unwrap();
    assert_eq!(envelope, decoded);
    let again: EventEnvelope<TradeExecuted> =
        serde_json::from_str(&serde_json::to_string(&envelope).unwrap()).unwrap();
    assert_eq!(again, envelope);
    // A deserializer that cannot lend strings (a JSON value) reads it too.
    let owned: EventEnvelope<TradeExecuted> = serde_json::from_value(spec_json()).unwrap();
    assert_eq!(owned, envelope);
}

#[test]
fn another_event_type_never_becomes_a_typed_envelope() {
    // Its payload fits OrderCreated's fields: only the name keeps them apart.
    let error = serde_json::from_str::<EventEnvelope<OrderCreated>>(SPEC_DOCUMENT).unwrap_err();
    assert!(error.to_string().contains("trade.executed"), "{error}");
}

#[test]
fn another_major_version_is_refused_and_the_minor_sent_is_kept() {
    let mut document = spec_json();
    document["version"] = json!("2.0");
    let error =
        serde_json::from_value::<EventEnvelope<TradeExecuted>>(document.clone()).unwrap_err();
    assert!(error.to_string().contains("not supported"), "{error}");
    document["version"] = json!("1.7");
    let newer_minor: EventEnvelope<TradeExecuted> = serde_json::from_value(document).unwrap();
    assert_eq!(newer_minor.version(), "1.7");
    // A type whose own major is 2 refuses 1.x the same way.
    let mut settled = spec_json();
    settled["event_type"] = json!("trade.settled");
    settled["payload"] = json!({ "order_id": "123" });
    assert!(serde_json::from_value::<EventEnvelope<TradeSettled>>(settled).is_err());
}

#[test]
fn bad_ids_timestamps_and_versions_are_refused() {
    for (field, value) in [
        ("event_id", json!("not-a-uuid")),
        ("timestamp", json!("yesterday")),
        ("version", json!("one")),
        ("version", json!("1.x")),
    ] {
        let mut document = spec_json();
        document[field] = value.clone();
        assert!(
            serde_json::from_value::<EventEnvelope<TradeExecuted>>(document.clone()).is_err(),
            "{field} = {value} as a typed envelope"
        );
        assert!(
            serde_json::from_value::<EventEnvelope<Value>>(document).is_err(),
            "{field} = {value} as an untyped envelope"
        );
    }
}

#[test]
fn an_untyped_envelope_keeps_any_event_type() {
    let mut document = spec_json();
    document["event_type"] = json!("anything.at.all");
    document["version"] = json!("7.2");
    let envelope: EventEnvelope<Value> = serde_json::from_value(document).unwrap();
    assert_eq!(envelope.event_type(), "anything.at.all");
    assert_eq!(envelope.version(), "7.2");
    assert_eq!(envelope.payload()["symbol"], "AAPL");
}
