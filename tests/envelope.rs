//! The event message standard of SPEC §5.1: the literal document decodes into
//! typed and untyped envelopes, re-encodes to the same document, and the
//! event-type and version rules hold.

mod common;

use chrono::{DateTime, SubsecRound, TimeZone, Utc};
use common::{SPEC_DOCUMENT, SPEC_EVENT_ID, TradeExecuted, spec_trade};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};
use switchboard::{Codec, DecodeError, Event, EventEnvelope};
use uuid::Uuid;

/// Its fields are a subset of `TradeExecuted`'s, so a trade's payload would
/// deserialize into it: only the event type can keep the two apart.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct OrderCreated {
    order_id: String,
    symbol: String,
}

impl Event for OrderCreated {
    const TYPE: &'static str = "order.created";
    const VERSION: &'static str = "1.0";
}

/// A schema already at its second major version, to show the rule is about
/// the consumer's own major rather than a fixed "1".
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct TradeSettled {
    order_id: String,
}

impl Event for TradeSettled {
    const TYPE: &'static str = "trade.settled";
    const VERSION: &'static str = "2.1";
}

fn spec_instant() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 2, 19, 12, 0, 0).unwrap()
}

fn parse(bytes: &[u8]) -> Map<String, Value> {
    match serde_json::from_slice(bytes).expect("valid JSON") {
        Value::Object(object) => object,
        other => panic!("not an object: {other}"),
    }
}

fn instant(value: &Value) -> DateTime<Utc> {
    let text = value.as_str().expect("timestamp is a string");
    DateTime::parse_from_rfc3339(text)
        .expect("timestamp is RFC 3339")
        .with_timezone(&Utc)
}

fn keys(object: &Map<String, Value>) -> Vec<&str> {
    let mut keys: Vec<_> = object.keys().map(String::as_str).collect();
    keys.sort_unstable();
    keys
}

/// Semantic equality with the spec document: the same keys at both levels and
/// the same values, the timestamp compared as an instant because the encoder
/// always writes microseconds.
fn assert_same_as_spec_document(encoded: &[u8]) {
    let written = parse(encoded);
    let spec = parse(SPEC_DOCUMENT.as_bytes());

    assert_eq!(keys(&written), keys(&spec), "top-level keys");
    for (key, spec_value) in &spec {
        if key == "timestamp" {
            assert_eq!(instant(&written[key]), instant(spec_value), "timestamp");
        } else {
            assert_eq!(&written[key], spec_value, "field {key}");
        }
    }
    assert_eq!(written["timestamp"], "2026-02-19T12:00:00.000000Z");

    let written_payload = written["payload"].as_object().expect("payload object");
    let spec_payload = spec["payload"].as_object().unwrap();
    assert_eq!(keys(written_payload), keys(spec_payload), "payload keys");
}

fn spec_document_with(field: &str, value: Value) -> Vec<u8> {
    let mut document = parse(SPEC_DOCUMENT.as_bytes());
    document.insert(field.to_owned(), value);
    serde_json::to_vec(&document).unwrap()
}

#[test]
fn spec_document_decodes_into_a_typed_envelope() {
    let envelope = Codec::default()
        .decode::<TradeExecuted>(SPEC_DOCUMENT.as_bytes())
        .expect("the spec's own example is a valid envelope");

    assert_eq!(envelope.event_id(), Uuid::parse_str(SPEC_EVENT_ID).unwrap());
    assert_eq!(envelope.event_type(), "trade.executed");
    assert_eq!(envelope.timestamp(), spec_instant());
    assert_eq!(envelope.source(), "trading-service");
    assert_eq!(envelope.version(), "1.0");
    assert!(envelope.headers().is_empty());

    let payload = envelope.payload();
    assert_eq!(payload.order_id, "123");
    assert_eq!(payload.user_id, "456");
    assert_eq!(payload.symbol, "AAPL");
    assert_eq!(payload.quantity, 100);
    assert_eq!(payload.price, 150.0);
    assert_eq!(envelope.into_payload(), spec_trade());
}

#[test]
fn spec_document_decodes_into_an_untyped_envelope() {
    let envelope = Codec::default()
        .decode_value(SPEC_DOCUMENT.as_bytes())
        .expect("the spec's own example is a valid envelope");

    assert_eq!(envelope.event_id(), Uuid::parse_str(SPEC_EVENT_ID).unwrap());
    assert_eq!(envelope.event_type(), "trade.executed");
    assert_eq!(envelope.timestamp(), spec_instant());
    assert_eq!(envelope.source(), "trading-service");
    assert_eq!(envelope.version(), "1.0");
    assert!(envelope.headers().is_empty());
    assert_eq!(
        envelope.payload(),
        &json!({
            "order_id": "123",
            "user_id": "456",
            "symbol": "AAPL",
            "quantity": 100,
            "price": 150.0,
        })
    );
}

#[test]
fn typed_envelope_reencodes_to_the_spec_document() {
    let codec = Codec::default();
    let envelope = codec
        .decode::<TradeExecuted>(SPEC_DOCUMENT.as_bytes())
        .unwrap();
    assert_same_as_spec_document(&codec.encode(&envelope).unwrap());
}

#[test]
fn untyped_envelope_reencodes_to_the_spec_document() {
    let codec = Codec::default();
    let envelope = codec.decode_value(SPEC_DOCUMENT.as_bytes()).unwrap();
    assert_same_as_spec_document(&codec.encode(&envelope).unwrap());
}

#[test]
fn empty_headers_are_left_out_of_the_encoding() {
    let codec = Codec::default();
    let typed = codec
        .decode::<TradeExecuted>(SPEC_DOCUMENT.as_bytes())
        .unwrap();
    let untyped = codec.decode_value(SPEC_DOCUMENT.as_bytes()).unwrap();

    assert!(!parse(&codec.encode(&typed).unwrap()).contains_key("headers"));
    assert!(!parse(&codec.encode(&untyped).unwrap()).contains_key("headers"));
    let fresh = EventEnvelope::new("trading-service", spec_trade());
    assert!(!parse(&codec.encode(&fresh).unwrap()).contains_key("headers"));
}

#[test]
fn headers_are_written_as_an_object_of_strings_once_set() {
    let codec = Codec::default();
    let envelope = codec
        .decode::<TradeExecuted>(SPEC_DOCUMENT.as_bytes())
        .unwrap()
        .with_header("correlation-id", "req-7")
        .with_header("traceparent", "00-abc-def-01");

    let written = parse(&codec.encode(&envelope).unwrap());
    assert_eq!(
        written["headers"],
        json!({ "correlation-id": "req-7", "traceparent": "00-abc-def-01" })
    );
}

#[test]
fn new_fills_in_the_types_name_and_version() {
    let envelope = EventEnvelope::new("trading-service", spec_trade());
    assert_eq!(envelope.event_type(), "trade.executed");
    assert_eq!(envelope.version(), "1.0");
    assert_eq!(envelope.source(), "trading-service");
    assert_eq!(envelope.payload(), &spec_trade());
    assert!(envelope.headers().is_empty());
}

#[test]
fn new_stamps_the_current_time() {
    // The envelope keeps microseconds, so it may fall just before `before`.
    let before = Utc::now().trunc_subsecs(6);
    let envelope = EventEnvelope::new("trading-service", spec_trade());
    let after = Utc::now();
    assert!(
        before <= envelope.timestamp() && envelope.timestamp() <= after,
        "{} not within [{before}, {after}]",
        envelope.timestamp()
    );
}

#[test]
fn new_gives_each_envelope_a_distinct_v4_id() {
    let first = EventEnvelope::new("trading-service", spec_trade());
    let second = EventEnvelope::new("trading-service", spec_trade());
    for id in [first.event_id(), second.event_id()] {
        assert_eq!(id.get_version(), Some(uuid::Version::Random), "{id}");
        assert_eq!(id.get_variant(), uuid::Variant::RFC4122, "{id}");
    }
    assert_ne!(first.event_id(), second.event_id());
}

#[test]
fn new_envelope_round_trips_through_the_codec() {
    let codec = Codec::default();
    let sent = EventEnvelope::new("trading-service", spec_trade());
    let received = codec
        .decode::<TradeExecuted>(&codec.encode(&sent).unwrap())
        .unwrap();
    assert_eq!(received, sent);
}

#[test]
fn new_envelope_round_trips_with_its_headers() {
    let codec = Codec::default();
    let sent = EventEnvelope::new("trading-service", spec_trade())
        .with_header("correlation-id", "req-7")
        .with_header("x-empty", "");
    let received = codec
        .decode::<TradeExecuted>(&codec.encode(&sent).unwrap())
        .unwrap();
    assert_eq!(received, sent);
    assert_eq!(received.headers()["correlation-id"], "req-7");
    assert_eq!(received.headers()["x-empty"], "");
}

#[test]
fn a_published_price_arrives_unchanged() {
    // Money must not drift by a unit in the last place between services;
    // this double's shortest text reads back exactly only when the parser
    // rounds correctly.
    let codec = Codec::default();
    let trade = TradeExecuted {
        price: 1.0715660391465826e-75,
        ..spec_trade()
    };
    let sent = EventEnvelope::new("trading-service", trade);
    let received = codec
        .decode::<TradeExecuted>(&codec.encode(&sent).unwrap())
        .unwrap();
    assert_eq!(
        received.payload().price.to_bits(),
        sent.payload().price.to_bits()
    );
}

#[test]
fn untyped_envelope_round_trips_through_the_codec() {
    let codec = Codec::default();
    let sent = EventEnvelope::untyped(
        "trade.executed",
        "1.3",
        "bridge",
        json!({ "order_id": "123", "extra": [1, 2, { "deep": null }] }),
    )
    .with_header("correlation-id", "req-7");
    let received = codec.decode_value(&codec.encode(&sent).unwrap()).unwrap();
    assert_eq!(received, sent);
}

#[test]
fn with_event_id_survives_the_round_trip() {
    let codec = Codec::default();
    let id = Uuid::parse_str(SPEC_EVENT_ID).unwrap();
    let sent = EventEnvelope::new("outbox", spec_trade()).with_event_id(id);
    let received = codec
        .decode::<TradeExecuted>(&codec.encode(&sent).unwrap())
        .unwrap();
    assert_eq!(received.event_id(), id);
}

#[test]
fn a_newer_minor_version_is_read_by_an_older_consumer() {
    let document = spec_document_with("version", json!("1.7"));
    let envelope = Codec::default()
        .decode::<TradeExecuted>(&document)
        .expect("1.7 shares the consumer's major version 1");
    assert_eq!(envelope.payload(), &spec_trade());
    assert_eq!(envelope.version(), "1.7", "the producer's version is kept");
}

#[test]
fn another_major_version_is_refused() {
    let document = spec_document_with("version", json!("2.0"));
    let error = Codec::default()
        .decode::<TradeExecuted>(&document)
        .unwrap_err();
    assert_eq!(
        error,
        DecodeError::UnsupportedVersion {
            found: "2.0".into(),
            supported: "1.0",
        }
    );
}

fn settled_document(version: &str) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "event_id": SPEC_EVENT_ID,
        "event_type": "trade.settled",
        "timestamp": "2026-02-19T12:00:00Z",
        "source": "settlement-service",
        "version": version,
        "payload": { "order_id": "123" },
    }))
    .unwrap()
}

#[test]
fn a_second_major_consumer_reads_its_own_major_only() {
    let codec = Codec::default();
    for accepted in ["2.0", "2.1", "2.9"] {
        let envelope = codec
            .decode::<TradeSettled>(&settled_document(accepted))
            .unwrap_or_else(|error| panic!("{accepted}: {error}"));
        assert_eq!(envelope.payload().order_id, "123");
    }
    for refused in ["1.0", "3.0"] {
        assert_eq!(
            codec
                .decode::<TradeSettled>(&settled_document(refused))
                .unwrap_err(),
            DecodeError::UnsupportedVersion {
                found: refused.into(),
                supported: "2.1",
            }
        );
    }
}

#[test]
fn a_trade_cannot_be_read_as_another_event_type() {
    // OrderCreated's fields are all present in a trade's payload, so only the
    // event type check stands between the two.
    let error = Codec::default()
        .decode::<OrderCreated>(SPEC_DOCUMENT.as_bytes())
        .unwrap_err();
    assert_eq!(
        error,
        DecodeError::TypeMismatch {
            expected: "order.created",
            found: "trade.executed".into(),
        }
    );
}

#[test]
fn an_encoded_trade_cannot_be_read_as_another_event_type() {
    let codec = Codec::default();
    let bytes = codec
        .encode(&EventEnvelope::new("trading-service", spec_trade()))
        .unwrap();
    assert_eq!(
        codec.decode::<OrderCreated>(&bytes).unwrap_err(),
        DecodeError::TypeMismatch {
            expected: "order.created",
            found: "trade.executed".into(),
        }
    );
}

#[path = "envelope/wire.rs"]
mod wire;

#[path = "envelope/serde.rs"]
mod serde_symmetric;

#[path = "envelope/upcast.rs"]
mod upcast;
