//! The golden fixtures of `tests/fixtures/wire/v1` that need no broker: the
//! envelope JSON, the Pub/Sub payload forms and the gRPC push request. Each
//! is decoded by the crate's own reader, and today's writer must still
//! produce the same bytes — a change of wire form is a new fixture version,
//! never an edit (see `tests/fixtures/README.md`).

use serde_json::json;
use switchboard::Codec;

#[path = "../common/wire.rs"]
mod fixture;
use fixture::fixture_message;

const ENVELOPE: &[u8] = include_bytes!("../fixtures/wire/v1/envelope.json");

#[test]
fn the_v1_envelope_decodes_and_encodes_to_the_same_bytes() {
    let codec = Codec::default();
    let envelope = codec.decode_value(ENVELOPE).expect("v1 envelope decodes");
    assert_eq!(
        envelope.event_id().to_string(),
        "1b4e28ba-2fa1-41d2-883f-0016d3cca427"
    );
    assert_eq!(envelope.event_type(), "trade.executed");
    assert_eq!(
        envelope.timestamp().to_rfc3339(),
        "2026-02-19T12:00:00+00:00"
    );
    assert_eq!(envelope.source(), "trading-service");
    assert_eq!(envelope.version(), "1.0");
    assert_eq!(
        envelope.payload(),
        &json!({"order_id": "123", "price": 150.0, "quantity": 100, "symbol": "AAPL"})
    );
    assert_eq!(envelope.headers()["correlation-id"], "req-7");
    assert_eq!(envelope.headers().len(), 1);
    let again = codec.encode(&envelope).expect("encode");
    assert_eq!(
        String::from_utf8_lossy(&again),
        String::from_utf8_lossy(ENVELOPE),
        "today's writer changed the v1 envelope"
    );
    // The message fixture carries the same envelope as its body.
    assert_eq!(fixture_message().body.as_ref(), ENVELOPE);
}

#[cfg(feature = "redis-pubsub")]
#[test]
fn the_v1_pubsub_payloads_decode_and_encode_to_the_same_bytes() {
    use switchboard::transport::redis_pubsub::{decode_payload, encode_payload};
    const FRAMED: &[u8] = include_bytes!("../fixtures/wire/v1/redis_pubsub_frame_headers.bin");
    const PLAIN: &[u8] = include_bytes!("../fixtures/wire/v1/redis_pubsub_frame_plain.bin");

    let message = fixture_message();
    assert_eq!(decode_payload(FRAMED.into()), message);
    assert_eq!(encode_payload(&message).expect("encode").as_ref(), FRAMED);

    let plain = switchboard::RawMessage::new(message.body.clone());
    assert_eq!(decode_payload(PLAIN.into()), plain);
    assert_eq!(encode_payload(&plain).expect("encode").as_ref(), PLAIN);
}

#[cfg(feature = "redis-pubsub")]
#[test]
fn the_version_2_pubsub_frame_decodes_and_encodes_to_the_same_bytes() {
    use switchboard::transport::redis_pubsub::{FrameVersion, decode_payload, encode_payload_with};
    const FRAMED: &[u8] = include_bytes!("../fixtures/wire/v1/redis_pubsub_frame_v2_headers.bin");

    let message = fixture_message();
    assert_eq!(decode_payload(FRAMED.into()), message);
    let encoded = encode_payload_with(&message, FrameVersion::V2).expect("encode");
    assert_eq!(encoded.as_ref(), FRAMED);
}

#[cfg(feature = "grpc")]
#[test]
fn the_v1_grpc_push_request_decodes_and_encodes_to_the_same_bytes() {
    use switchboard::reexports::prost::Message as _;
    use switchboard::transport::grpc::proto::DeliverRequest;
    const REQUEST: &[u8] = include_bytes!("../fixtures/wire/v1/grpc_push_deliver_request.bin");
    const EXPECTED: &str = include_str!("../fixtures/wire/v1/grpc_push_deliver_request.json");

    let expected: serde_json::Value = serde_json::from_str(EXPECTED).expect("JSON");
    let message = fixture_message();
    let request = DeliverRequest::decode(REQUEST).expect("v1 request decodes");
    assert_eq!(request.topic, expected["topic"]);
    assert_eq!(request.group.as_deref(), expected["group"].as_str());
    assert_eq!(u64::from(request.attempt), expected["attempt"]);
    assert_eq!(request.headers, message.headers);
    assert_eq!(request.body.as_ref(), message.body.as_ref());
    assert_eq!(request.encode_to_vec(), REQUEST);
}
