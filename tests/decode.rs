//! Decoding untrusted bytes: every kind of bad input gets its own
//! `DecodeError` naming the problem, the size limit holds both ways, and no
//! input — random, mutated or absurdly nested — makes the decoder panic.

mod common;

use common::TradeExecuted;
use proptest::prelude::*;
use serde_json::{Map, Value, json};
use switchboard::{Codec, DEFAULT_MAX_SIZE, DecodeError, Error, ErrorKind, EventEnvelope};

const REQUIRED_FIELDS: [&str; 6] = [
    "event_id",
    "event_type",
    "timestamp",
    "source",
    "version",
    "payload",
];

/// The string-valued envelope fields: all required fields but the payload.
const STRING_FIELDS: [&str; 5] = ["event_id", "event_type", "timestamp", "source", "version"];

fn valid_document() -> Map<String, Value> {
    let Value::Object(document) = json!({
        "event_id": "6f1c0f4e-8a3b-4c1d-9e2f-0a1b2c3d4e5f",
        "event_type": "trade.executed",
        "timestamp": "2026-02-19T12:00:00Z",
        "source": "trading-service",
        "version": "1.0",
        "payload": {
            "order_id": "123",
            "user_id": "456",
            "symbol": "AAPL",
            "quantity": 100,
            "price": 150.00
        }
    }) else {
        unreachable!()
    };
    document
}

fn encode(document: &Map<String, Value>) -> Vec<u8> {
    serde_json::to_vec(document).unwrap()
}

/// The valid document with one field set to `value`.
fn with_field(field: &str, value: Value) -> Vec<u8> {
    let mut document = valid_document();
    document.insert(field.to_owned(), value);
    encode(&document)
}

/// The valid document with one payload field set to `value`.
fn with_payload_field(field: &str, value: Value) -> Vec<u8> {
    let mut document = valid_document();
    document["payload"]
        .as_object_mut()
        .unwrap()
        .insert(field.to_owned(), value);
    encode(&document)
}

fn without_field(field: &str) -> Vec<u8> {
    let mut document = valid_document();
    document.remove(field).expect("field present");
    encode(&document)
}

fn typed_error(bytes: &[u8]) -> DecodeError {
    typed_error_with(Codec::default(), bytes)
}

fn typed_error_with(codec: Codec, bytes: &[u8]) -> DecodeError {
    let error = codec
        .decode::<TradeExecuted>(bytes)
        .expect_err("typed decode must refuse this input");
    assert_is_permanent_decode_error(&error);
    error
}

fn untyped_error(bytes: &[u8]) -> DecodeError {
    untyped_error_with(Codec::default(), bytes)
}

fn untyped_error_with(codec: Codec, bytes: &[u8]) -> DecodeError {
    let error = codec
        .decode_value(bytes)
        .expect_err("untyped decode must refuse this input");
    assert_is_permanent_decode_error(&error);
    error
}

/// A consumer dead-letters a message on a non-retryable error, and tools
/// recover the exact problem from the crate error.
fn assert_is_permanent_decode_error(error: &DecodeError) {
    let wrapped = Error::from(error.clone());
    assert_eq!(wrapped.kind(), ErrorKind::Decode, "{error}");
    assert!(!wrapped.is_retryable(), "{error}");
    assert_eq!(wrapped.decode_error(), Some(error));
}

/// Both decoders agree on the error.
fn both_errors(bytes: &[u8]) -> DecodeError {
    let typed = typed_error(bytes);
    assert_eq!(untyped_error(bytes), typed, "typed and untyped disagree");
    typed
}

#[test]
fn the_valid_document_decodes_both_ways() {
    // Every refusal below comes from a one-field change to this document.
    let bytes = encode(&valid_document());
    Codec::default().decode::<TradeExecuted>(&bytes).unwrap();
    Codec::default().decode_value(&bytes).unwrap();
}

#[test]
fn bytes_that_are_not_json_are_not_json() {
    for input in [
        &b""[..],
        b"{ not json",
        b"{\"event_id\": ",
        b"\xff\xfe",
        b"nul",
    ] {
        let error = both_errors(input);
        assert!(
            matches!(error, DecodeError::NotJson { .. }),
            "{input:?}: {error:?}"
        );
        assert!(error.to_string().contains("not JSON"), "{error}");
    }
}

#[test]
fn json_that_is_not_an_object_is_not_an_object() {
    for input in ["[]", "[1, 2]", "42", "1.5", "\"text\"", "null", "true"] {
        let error = both_errors(input.as_bytes());
        assert_eq!(error, DecodeError::NotAnObject, "{input}");
        assert!(error.to_string().contains("JSON object"), "{error}");
    }
}

#[test]
fn each_missing_required_field_is_named() {
    for field in REQUIRED_FIELDS {
        let error = both_errors(&without_field(field));
        assert_eq!(error, DecodeError::MissingField { field });
        assert!(error.to_string().contains(field), "{error}");
    }
}

#[test]
fn headers_are_optional() {
    let bytes = encode(&valid_document());
    assert!(!String::from_utf8_lossy(&bytes).contains("headers"));
    let envelope = Codec::default().decode::<TradeExecuted>(&bytes).unwrap();
    assert!(envelope.headers().is_empty());
}

#[test]
fn a_number_for_source_is_the_wrong_type() {
    let error = both_errors(&with_field("source", json!(5)));
    assert!(
        matches!(
            error,
            DecodeError::WrongType {
                field: "source",
                ..
            }
        ),
        "{error:?}"
    );
    assert!(error.to_string().contains("source"), "{error}");
}

#[test]
fn a_number_for_version_is_the_wrong_type() {
    // `1.0` unquoted is the likeliest slip in a hand-written envelope.
    let error = both_errors(&with_field("version", json!(1.0)));
    assert!(
        matches!(
            error,
            DecodeError::WrongType {
                field: "version",
                ..
            }
        ),
        "{error:?}"
    );
    assert!(error.to_string().contains("version"), "{error}");
}

#[test]
fn each_string_field_of_another_json_type_is_the_wrong_type() {
    for field in STRING_FIELDS {
        for value in [
            json!(5),
            json!(1.0),
            json!(true),
            json!(null),
            json!([]),
            json!({}),
        ] {
            let error = both_errors(&with_field(field, value.clone()));
            assert!(
                matches!(error, DecodeError::WrongType { field: found, .. } if found == field),
                "{field} = {value}: {error:?}"
            );
        }
    }
}

#[test]
fn headers_that_are_not_an_object_of_strings_are_the_wrong_type() {
    for headers in [
        json!("correlation-id"),
        json!(["correlation-id", "req-7"]),
        json!({ "retries": 3 }),
        json!({ "correlation-id": "req-7", "nested": { "a": "b" } }),
        json!({ "correlation-id": null }),
        json!(null),
    ] {
        let error = both_errors(&with_field("headers", headers.clone()));
        assert!(
            matches!(
                error,
                DecodeError::WrongType {
                    field: "headers",
                    ..
                }
            ),
            "{headers}: {error:?}"
        );
        assert!(error.to_string().contains("headers"), "{error}");
    }
}

#[test]
fn an_event_id_that_is_not_a_uuid_is_a_bad_event_id() {
    for value in [
        "uuid",
        "",
        "6f1c0f4e-8a3b-4c1d-9e2f-0a1b2c3d4e5",
        "not-a-uuid-at-all",
    ] {
        let error = both_errors(&with_field("event_id", json!(value)));
        assert_eq!(
            error,
            DecodeError::BadEventId {
                value: value.into()
            }
        );
        assert!(error.to_string().contains("event_id"), "{error}");
    }
}

#[test]
fn a_timestamp_that_is_not_rfc3339_is_a_bad_timestamp() {
    for value in [
        "yesterday",
        "2026-02-30T12:00:00Z",
        "2026-02-19T12:00:00",
        "2026-02-19",
        "1771502400",
    ] {
        let error = both_errors(&with_field("timestamp", json!(value)));
        assert_eq!(
            error,
            DecodeError::BadTimestamp {
                value: value.into()
            }
        );
        assert!(error.to_string().contains("timestamp"), "{error}");
    }
}

#[test]
fn a_timestamp_with_an_offset_is_read_as_utc() {
    let bytes = with_field("timestamp", json!("2026-02-19T14:00:00+02:00"));
    let envelope = Codec::default().decode::<TradeExecuted>(&bytes).unwrap();
    assert_eq!(
        envelope.timestamp(),
        "2026-02-19T12:00:00Z"
            .parse::<chrono::DateTime<chrono::Utc>>()
            .unwrap()
    );
}

#[test]
fn a_version_that_is_not_major_minor_is_a_bad_version() {
    for value in ["one", "", "v1.0", "1.x", "1.", ".1", "-1.0"] {
        let error = both_errors(&with_field("version", json!(value)));
        assert_eq!(
            error,
            DecodeError::BadVersion {
                value: value.into()
            }
        );
        assert!(error.to_string().contains("version"), "{error}");
    }
}

#[test]
fn another_event_type_is_a_type_mismatch() {
    let bytes = with_field("event_type", json!("order.created"));
    let error = typed_error(&bytes);
    assert_eq!(
        error,
        DecodeError::TypeMismatch {
            expected: "trade.executed",
            found: "order.created".into(),
        }
    );
    assert!(error.to_string().contains("order.created"), "{error}");
    assert!(error.to_string().contains("trade.executed"), "{error}");

    // Forwarding tools read every event type.
    let envelope = Codec::default().decode_value(&bytes).unwrap();
    assert_eq!(envelope.event_type(), "order.created");
}

#[test]
fn another_event_type_is_a_type_mismatch_even_with_a_bad_payload() {
    // The type is what was wrong; the payload was never meant for this type.
    let mut document = valid_document();
    document.insert("event_type".into(), json!("order.created"));
    document.insert("payload".into(), json!({ "order_id": 7 }));
    assert!(matches!(
        typed_error(&encode(&document)),
        DecodeError::TypeMismatch { .. }
    ));
}

#[test]
fn another_major_version_is_unsupported() {
    let bytes = with_field("version", json!("2.0"));
    let error = typed_error(&bytes);
    assert_eq!(
        error,
        DecodeError::UnsupportedVersion {
            found: "2.0".into(),
            supported: "1.0",
        }
    );
    assert!(error.to_string().contains("2.0"), "{error}");

    // Forwarding tools read every version, and keep it.
    let envelope = Codec::default().decode_value(&bytes).unwrap();
    assert_eq!(envelope.version(), "2.0");
}

#[test]
fn a_payload_of_the_wrong_shape_is_a_bad_payload_naming_the_field() {
    let error = typed_error(&with_payload_field("quantity", json!("100")));
    let DecodeError::BadPayload { event_type, reason } = &error else {
        panic!("expected BadPayload, got {error:?}");
    };
    assert_eq!(*event_type, "trade.executed");
    assert!(reason.contains("quantity"), "{reason}");
    assert!(error.to_string().contains("trade.executed"), "{error}");
}

#[test]
fn a_payload_missing_a_field_is_a_bad_payload_naming_the_field() {
    let mut document = valid_document();
    document["payload"]
        .as_object_mut()
        .unwrap()
        .remove("symbol");
    let error = typed_error(&encode(&document));
    assert!(
        matches!(&error, DecodeError::BadPayload { reason, .. } if reason.contains("symbol")),
        "{error:?}"
    );
}

#[test]
fn a_payload_that_is_not_an_object_is_a_bad_payload() {
    for payload in [json!(null), json!("trade"), json!([1, 2])] {
        let bytes = with_field("payload", payload.clone());
        assert!(
            matches!(typed_error(&bytes), DecodeError::BadPayload { .. }),
            "{payload}"
        );
        // The untyped payload is any JSON value.
        let envelope = Codec::default().decode_value(&bytes).unwrap();
        assert_eq!(envelope.payload(), &payload);
    }
}

#[test]
fn a_duplicated_field_is_malformed() {
    // The parser takes no side between two values for one field.
    let bytes = br#"{"event_id":"6f1c0f4e-8a3b-4c1d-9e2f-0a1b2c3d4e5f","event_type":"trade.executed","timestamp":"2026-02-19T12:00:00Z","source":"a","source":"b","version":"1.0","payload":{"order_id":"123","user_id":"456","symbol":"AAPL","quantity":100,"price":150.0}}"#;
    let error = both_errors(bytes);
    assert!(
        matches!(&error, DecodeError::Malformed { reason } if reason.contains("source")),
        "{error:?}"
    );
}

/// A valid envelope whose `source` alone is `len` bytes long.
fn envelope_with_source_of(len: usize) -> EventEnvelope<TradeExecuted> {
    let trade = TradeExecuted {
        order_id: "123".into(),
        user_id: "456".into(),
        symbol: "AAPL".into(),
        quantity: 100,
        price: 150.0,
    };
    EventEnvelope::new("x".repeat(len), trade)
}

/// The bytes of an otherwise valid envelope over the default limit.
fn oversized_document() -> Vec<u8> {
    with_field("source", json!("x".repeat(DEFAULT_MAX_SIZE)))
}

#[test]
fn a_document_over_the_default_limit_is_too_large() {
    let bytes = oversized_document();
    assert!(bytes.len() > DEFAULT_MAX_SIZE);
    assert_eq!(DEFAULT_MAX_SIZE, 1024 * 1024);
    let error = both_errors(&bytes);
    assert_eq!(
        error,
        DecodeError::TooLarge {
            size: bytes.len(),
            limit: DEFAULT_MAX_SIZE,
        }
    );
    let text = error.to_string();
    assert!(text.contains(&bytes.len().to_string()), "{text}");
    assert!(text.contains(&DEFAULT_MAX_SIZE.to_string()), "{text}");
}

#[test]
fn a_document_over_a_configured_limit_is_too_large() {
    let codec = Codec::default().with_max_size(100);
    let bytes = encode(&valid_document());
    assert!(bytes.len() > 100);
    let expected = DecodeError::TooLarge {
        size: bytes.len(),
        limit: 100,
    };
    assert_eq!(typed_error_with(codec.clone(), &bytes), expected, "typed");
    assert_eq!(untyped_error_with(codec, &bytes), expected, "untyped");
}

#[test]
fn the_size_limit_is_checked_before_parsing() {
    // Garbage over the limit is refused for its size, never parsed.
    let codec = Codec::default().with_max_size(100);
    let bytes = vec![b'['; 101];
    let expected = DecodeError::TooLarge {
        size: 101,
        limit: 100,
    };
    assert_eq!(typed_error_with(codec.clone(), &bytes), expected);
    assert_eq!(untyped_error_with(codec, &bytes), expected);
}

#[test]
fn a_document_exactly_at_the_limit_is_accepted() {
    let bytes = encode(&valid_document());
    let at_limit = Codec::default().with_max_size(bytes.len());
    at_limit.decode::<TradeExecuted>(&bytes).unwrap();
    at_limit.decode_value(&bytes).unwrap();

    let one_under = Codec::default().with_max_size(bytes.len() - 1);
    assert!(matches!(
        typed_error_with(one_under, &bytes),
        DecodeError::TooLarge { .. }
    ));
}

#[test]
fn a_document_exactly_at_the_default_limit_is_accepted() {
    let codec = Codec::default();
    let overhead = codec.encode(&envelope_with_source_of(0)).unwrap().len();
    let envelope = envelope_with_source_of(DEFAULT_MAX_SIZE - overhead);
    let bytes = codec.encode(&envelope).expect("exactly at the limit");
    assert_eq!(bytes.len(), DEFAULT_MAX_SIZE);
    assert_eq!(codec.decode::<TradeExecuted>(&bytes).unwrap(), envelope);
    codec.decode_value(&bytes).unwrap();
}

#[test]
fn encode_refuses_an_envelope_over_the_limit() {
    let codec = Codec::default();
    let error = codec
        .encode(&envelope_with_source_of(DEFAULT_MAX_SIZE))
        .expect_err("a consumer with the same limit would refuse it");
    assert_eq!(error.kind(), ErrorKind::Encode);
    assert!(!error.is_retryable());

    let small = Codec::default().with_max_size(100);
    let error = small.encode(&envelope_with_source_of(0)).unwrap_err();
    assert_eq!(error.kind(), ErrorKind::Encode);
}

#[test]
fn encode_accepts_an_envelope_exactly_at_the_limit() {
    let envelope = envelope_with_source_of(0);
    let len = Codec::default().encode(&envelope).unwrap().len();
    Codec::default()
        .with_max_size(len)
        .encode(&envelope)
        .unwrap();
    let error = Codec::default()
        .with_max_size(len - 1)
        .encode(&envelope)
        .unwrap_err();
    assert_eq!(error.kind(), ErrorKind::Encode);
}

#[test]
fn every_variant_says_what_is_wrong() {
    let cases = [
        (
            DecodeError::TooLarge {
                size: 2000,
                limit: 1000,
            },
            vec!["2000", "1000"],
        ),
        (
            DecodeError::NotJson {
                reason: "EOF at line 1".into(),
            },
            vec!["JSON", "EOF at line 1"],
        ),
        (DecodeError::NotAnObject, vec!["object"]),
        (
            DecodeError::MissingField { field: "event_id" },
            vec!["missing", "event_id"],
        ),
        (
            DecodeError::WrongType {
                field: "source",
                expected: "a string",
            },
            vec!["source", "a string"],
        ),
        (
            DecodeError::BadEventId {
                value: "uuid".into(),
            },
            vec!["event_id", "uuid"],
        ),
        (
            DecodeError::BadTimestamp {
                value: "yesterday".into(),
            },
            vec!["timestamp", "yesterday"],
        ),
        (
            DecodeError::BadVersion {
                value: "one".into(),
            },
            vec!["version", "one"],
        ),
        (
            DecodeError::TypeMismatch {
                expected: "trade.executed",
                found: "order.created".into(),
            },
            vec!["trade.executed", "order.created"],
        ),
        (
            DecodeError::UnsupportedVersion {
                found: "2.0".into(),
                supported: "1.0",
            },
            vec!["2.0", "1.0"],
        ),
        (
            DecodeError::BadPayload {
                event_type: "trade.executed",
                reason: "missing field `quantity`".into(),
            },
            vec!["trade.executed", "quantity"],
        ),
        (
            DecodeError::Malformed {
                reason: "duplicate field `source`".into(),
            },
            vec!["source"],
        ),
    ];
    for (error, needles) in cases {
        let text = error.to_string();
        for needle in needles {
            assert!(text.contains(needle), "{text:?} lacks {needle:?}");
        }
        // The crate error keeps the explanation in its message.
        assert!(Error::from(error).to_string().contains(&text));
    }
}

#[test]
fn very_deep_nesting_is_an_error_not_a_stack_overflow() {
    let bytes = vec![b'['; 100_000];
    assert!(matches!(both_errors(&bytes), DecodeError::NotJson { .. }));

    let balanced = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
    assert!(matches!(
        both_errors(balanced.as_bytes()),
        DecodeError::NotJson { .. }
    ));
}

#[test]
fn very_deep_nesting_inside_a_valid_envelope_is_an_error() {
    let nested = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
    let text = String::from_utf8(encode(&valid_document()))
        .unwrap()
        .replace("\"trading-service\"", &nested);
    // Which variant is secondary; `both_errors` already demands a refusal.
    both_errors(text.as_bytes());
}

/// Decodes `bytes`, encodes the envelope and decodes that again: a consumer
/// that forwards what it read must forward the same event.
fn assert_round_trip_is_stable(bytes: &[u8]) {
    let codec = Codec::default();
    let first = codec.decode::<TradeExecuted>(bytes).unwrap();
    let second = codec
        .decode::<TradeExecuted>(&codec.encode(&first).unwrap())
        .unwrap();
    assert_eq!(second, first);

    let first = codec.decode_value(bytes).unwrap();
    let second = codec.decode_value(&codec.encode(&first).unwrap()).unwrap();
    assert_eq!(second, first);
}

#[test]
fn a_sub_microsecond_timestamp_survives_a_round_trip() {
    // RFC 3339 allows any number of fractional digits; the encoder writes six.
    assert_round_trip_is_stable(&with_field(
        "timestamp",
        json!("2026-02-19T12:00:00.123456789Z"),
    ));
}

#[test]
fn a_leap_second_survives_a_round_trip() {
    assert_round_trip_is_stable(&with_field("timestamp", json!("2026-06-30T23:59:60.5Z")));
}

#[test]
fn a_decoded_price_survives_a_round_trip() {
    // The shortest text for this double only reads back as the same double
    // when the parser rounds correctly.
    assert_round_trip_is_stable(&with_payload_field("price", json!(1.0715660391465826e-75)));
}

// ---------------------------------------------------------------------------
// Property tests: nothing the decoder is fed makes it panic, and whatever it
// accepts survives a round trip unchanged.
// ---------------------------------------------------------------------------

/// The envelope paths a structural mutation may target.
const PATHS: [&[&str]; 12] = [
    &["event_id"],
    &["event_type"],
    &["timestamp"],
    &["source"],
    &["version"],
    &["payload"],
    &["headers"],
    &["payload", "order_id"],
    &["payload", "user_id"],
    &["payload", "symbol"],
    &["payload", "quantity"],
    &["payload", "price"],
];

#[derive(Debug, Clone)]
enum Mutation {
    FlipBit {
        at: usize,
        bit: u8,
    },
    InsertByte {
        at: usize,
        byte: u8,
    },
    DeleteByte {
        at: usize,
    },
    Truncate {
        at: usize,
    },
    Replace {
        path: usize,
        value: Value,
    },
    DeleteKey {
        path: usize,
    },
    DuplicateKey {
        path: usize,
        value: Value,
    },
    Nest {
        path: usize,
        depth: usize,
        balanced: bool,
    },
}

/// Strings that sit near the edge of what some field accepts, so that
/// replacements land on valid values often enough to exercise the
/// accepting paths too.
fn interesting_string() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("6f1c0f4e-8a3b-4c1d-9e2f-0a1b2c3d4e5f".to_owned()),
        Just("{6f1c0f4e-8a3b-4c1d-9e2f-0a1b2c3d4e5f}".to_owned()),
        Just("6f1c0f4e8a3b4c1d9e2f0a1b2c3d4e5f".to_owned()),
        Just("trade.executed".to_owned()),
        Just("order.created".to_owned()),
        Just("2026-02-19T12:00:00Z".to_owned()),
        Just("2026-02-19T12:00:00.123456Z".to_owned()),
        Just("2026-02-19T14:00:00+02:00".to_owned()),
        Just("2026-02-19T12:00:00.123456789Z".to_owned()),
        Just("2026-06-30T23:59:60.5Z".to_owned()),
        Just("2026-02-30T12:00:00Z".to_owned()),
        Just("1.0".to_owned()),
        Just("1.7".to_owned()),
        Just("2.0".to_owned()),
        Just(String::new()),
        any::<String>(),
    ]
}

/// Any finite double, drawn from its bits so that every exponent and every
/// last digit is as likely as any other.
fn finite_f64() -> impl Strategy<Value = f64> {
    any::<u64>()
        .prop_map(f64::from_bits)
        .prop_filter("JSON has no NaN or infinity", |x| x.is_finite())
}

fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<u64>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        (-1.0e6..1.0e6f64).prop_map(|x| json!((x * 100.0).round() / 100.0)),
        finite_f64().prop_map(|x| json!(x)),
        interesting_string().prop_map(Value::String),
    ];
    leaf.prop_recursive(4, 32, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::btree_map("[a-z_]{0,8}", inner, 0..4)
                .prop_map(|map| Value::Object(map.into_iter().collect())),
        ]
    })
}

fn mutation() -> impl Strategy<Value = Mutation> {
    let path = 0..PATHS.len();
    prop_oneof![
        (any::<usize>(), 0..8u8).prop_map(|(at, bit)| Mutation::FlipBit { at, bit }),
        (any::<usize>(), any::<u8>()).prop_map(|(at, byte)| Mutation::InsertByte { at, byte }),
        any::<usize>().prop_map(|at| Mutation::DeleteByte { at }),
        any::<usize>().prop_map(|at| Mutation::Truncate { at }),
        (path.clone(), json_value()).prop_map(|(path, value)| Mutation::Replace { path, value }),
        path.clone().prop_map(|path| Mutation::DeleteKey { path }),
        (path.clone(), json_value())
            .prop_map(|(path, value)| Mutation::DuplicateKey { path, value }),
        (path, 1..12_000usize, any::<bool>()).prop_map(|(path, depth, balanced)| {
            Mutation::Nest {
                path,
                depth,
                balanced,
            }
        }),
    ]
}

/// A placeholder string swapped for raw text after serializing, to put
/// text `serde_json` would never write (a duplicate key, deep nesting) at a
/// chosen place in the document.
const SPLICE: &str = "\u{1}splice\u{1}";

/// Sets the value at `path`, creating the parent object if it is missing.
fn set_path(document: &mut Map<String, Value>, path: &[&str], value: Value) {
    match path {
        [key] => {
            document.insert((*key).to_owned(), value);
        }
        [parent, key] => {
            let parent = document
                .entry((*parent).to_owned())
                .or_insert_with(|| json!({}));
            if let Value::Object(parent) = parent {
                parent.insert((*key).to_owned(), value);
            }
        }
        _ => unreachable!(),
    }
}

fn remove_path(document: &mut Map<String, Value>, path: &[&str]) {
    match path {
        [key] => {
            document.remove(*key);
        }
        [parent, key] => {
            if let Some(Value::Object(parent)) = document.get_mut(*parent) {
                parent.remove(*key);
            }
        }
        _ => unreachable!(),
    }
}

/// Applies `edit` to the document when the bytes still hold a JSON object,
/// then writes it back, splicing `raw` in place of the placeholder.
fn edit_object(bytes: &mut Vec<u8>, raw: &str, edit: impl FnOnce(&mut Map<String, Value>)) {
    let Ok(Value::Object(mut document)) = serde_json::from_slice::<Value>(bytes) else {
        return;
    };
    edit(&mut document);
    let text = serde_json::to_string(&document).unwrap();
    let placeholder = serde_json::to_string(SPLICE).unwrap();
    *bytes = text.replace(&placeholder, raw).into_bytes();
}

fn apply(bytes: &mut Vec<u8>, mutation: &Mutation) {
    let len = bytes.len();
    match mutation {
        Mutation::FlipBit { at, bit } if len > 0 => bytes[at % len] ^= 1 << bit,
        Mutation::InsertByte { at, byte } => bytes.insert(at % (len + 1), *byte),
        Mutation::DeleteByte { at } if len > 0 => {
            bytes.remove(at % len);
        }
        Mutation::Truncate { at } => bytes.truncate(at % (len + 1)),
        Mutation::Replace { path, value } => edit_object(bytes, "", |document| {
            set_path(document, PATHS[*path], value.clone());
        }),
        Mutation::DeleteKey { path } => edit_object(bytes, "", |document| {
            remove_path(document, PATHS[*path]);
        }),
        Mutation::DuplicateKey { path, value } => {
            // The key ends up written twice in a row, both times with `value`.
            let path = PATHS[*path];
            let key = path[path.len() - 1];
            let raw = format!(
                "{}, {}: {}",
                serde_json::to_string(&value).unwrap(),
                serde_json::to_string(key).unwrap(),
                serde_json::to_string(&value).unwrap(),
            );
            edit_object(bytes, &raw, |document| {
                set_path(document, path, Value::String(SPLICE.to_owned()));
            });
        }
        Mutation::Nest {
            path,
            depth,
            balanced,
        } => {
            let closing = if *balanced {
                "]".repeat(*depth)
            } else {
                String::new()
            };
            let raw = format!("{}{closing}", "[".repeat(*depth));
            edit_object(bytes, &raw, |document| {
                set_path(document, PATHS[*path], Value::String(SPLICE.to_owned()));
            });
        }
        Mutation::FlipBit { .. } | Mutation::DeleteByte { .. } => {}
    }
}

fn seed_envelopes() -> Vec<Vec<u8>> {
    let codec = Codec::default();
    let plain = codec
        .decode::<TradeExecuted>(&encode(&valid_document()))
        .unwrap();
    let with_headers = plain
        .clone()
        .with_header("correlation-id", "req-7")
        .with_header("traceparent", "00-abc-def-01");
    vec![
        encode(&valid_document()),
        serde_json::to_vec_pretty(&valid_document()).unwrap(),
        codec.encode(&plain).unwrap().to_vec(),
        codec.encode(&with_headers).unwrap().to_vec(),
    ]
}

/// The property itself: each decoder either accepts or names a problem, and
/// what it accepts encodes and decodes back to the same envelope.
fn check_decoders(bytes: &[u8]) -> Result<(), TestCaseError> {
    let codec = Codec::default();
    match codec.decode::<TradeExecuted>(bytes) {
        Ok(envelope) => {
            let encoded = codec
                .encode(&envelope)
                .map_err(|error| TestCaseError::fail(format!("re-encode failed: {error}")))?;
            let again = codec
                .decode::<TradeExecuted>(&encoded)
                .map_err(|error| TestCaseError::fail(format!("re-decode failed: {error}")))?;
            prop_assert_eq!(again, envelope);
        }
        Err(error) => assert_is_permanent_decode_error(&error),
    }
    match codec.decode_value(bytes) {
        Ok(envelope) => {
            let encoded = codec
                .encode(&envelope)
                .map_err(|error| TestCaseError::fail(format!("re-encode failed: {error}")))?;
            let again = codec
                .decode_value(&encoded)
                .map_err(|error| TestCaseError::fail(format!("re-decode failed: {error}")))?;
            prop_assert_eq!(again, envelope);
        }
        Err(error) => assert_is_permanent_decode_error(&error),
    }
    Ok(())
}

fn config() -> ProptestConfig {
    ProptestConfig {
        cases: 512,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn random_bytes_never_panic_the_decoder(
        bytes in prop::collection::vec(any::<u8>(), 0..2048),
    ) {
        check_decoders(&bytes)?;
    }

    #[test]
    fn mutated_envelopes_decode_or_name_a_problem(
        seed in 0..4usize,
        mutations in prop::collection::vec(mutation(), 1..4),
    ) {
        let mut bytes = seed_envelopes().swap_remove(seed);
        for mutation in &mutations {
            apply(&mut bytes, mutation);
        }
        check_decoders(&bytes)?;
    }

    #[test]
    fn accepted_timestamps_and_prices_survive_a_round_trip(
        seconds in 0..4_102_444_800i64,
        nanos in 0..1_000_000_000u32,
        precision in prop::sample::select(vec![
            chrono::SecondsFormat::Secs,
            chrono::SecondsFormat::Millis,
            chrono::SecondsFormat::Micros,
            chrono::SecondsFormat::Nanos,
        ]),
        offset_minutes in -1439..=1439i32,
        price in finite_f64(),
    ) {
        let instant = chrono::DateTime::from_timestamp(seconds, nanos).unwrap();
        let offset = chrono::FixedOffset::east_opt(offset_minutes * 60).unwrap();
        let timestamp = instant.with_timezone(&offset).to_rfc3339_opts(precision, false);
        let mut document = valid_document();
        document.insert("timestamp".into(), json!(timestamp));
        document["payload"]["price"] = json!(price);
        check_decoders(&encode(&document))?;
    }

    #[test]
    fn a_replaced_field_decodes_or_names_a_problem(
        path in 0..PATHS.len(),
        value in json_value(),
    ) {
        // One well-formed change at a time reaches the field checks, which
        // byte-level noise mostly stops short of.
        let mut bytes = encode(&valid_document());
        apply(&mut bytes, &Mutation::Replace { path, value });
        check_decoders(&bytes)?;
    }
}

// ------------------------------------------- quoted values are cut short

/// A value of thousands of characters (a leaked secret, a hostile sender)
/// is quoted up to `QUOTE_LIMIT` characters: its tail is in no message.
#[test]
fn a_decode_error_quotes_at_most_quote_limit_characters_of_the_input() {
    use switchboard::QUOTE_LIMIT;
    let long = format!("{}TAIL-SECRET", "x".repeat(5_000));
    let bad_inputs = [
        with_payload_field("quantity", json!(long)),
        with_payload_field("symbol", json!({ long.clone(): 1 })),
        with_field("event_id", json!(long)),
        with_field("timestamp", json!(long)),
        with_field("version", json!(long)),
        with_field("event_type", json!(long)),
        format!("{{\"event_id\": \"{long}").into_bytes(),
    ];
    for (n, bytes) in bad_inputs.iter().enumerate() {
        // Payload and event type errors only a typed decode sees.
        let mut errors = vec![typed_error(bytes)];
        if ![0, 1, 5].contains(&n) {
            errors.push(untyped_error(bytes));
        }
        for error in errors {
            let text = error.to_string();
            assert!(!text.contains("TAIL-SECRET"), "{text}");
            assert!(!format!("{error:?}").contains("TAIL-SECRET"));
            // The limit, the ellipsis and the message's own words.
            assert!(text.chars().count() <= QUOTE_LIMIT + 120, "{text}");
        }
    }
    // Short values are quoted whole, so the message still helps.
    let text = typed_error(&with_field("version", json!("v1"))).to_string();
    assert!(text.contains("\"v1\""), "{text}");
}

// ------------------------------------------- the fuzz corpus, replayed

/// Every input `scripts/fuzz` saved (and the seeds) decodes or is refused
/// without a panic, and a refusal quotes little of it: what the fuzz target
/// checks, kept checked on every test run.
#[test]
fn every_saved_fuzz_input_is_decoded_or_refused_without_a_panic() {
    let corpus = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/decode");
    let mut replayed = 0;
    for entry in std::fs::read_dir(&corpus).expect("the saved corpus") {
        let bytes = std::fs::read(entry.unwrap().path()).unwrap();
        let codec = Codec::default();
        if let Err(error) = codec.decode::<TradeExecuted>(&bytes) {
            assert_is_permanent_decode_error(&error);
            assert!(
                error.to_string().chars().count() <= 4 * switchboard::QUOTE_LIMIT + 200,
                "{error}"
            );
        }
        let _ = codec.decode_value(&bytes);
        replayed += 1;
    }
    assert!(replayed >= 17, "the seeds are there: {replayed}");
}

/// The other fuzz targets' saved corpora (`scripts/fuzz`), replayed with
/// the very checks the targets run (`fuzz/checks.rs`).
#[cfg(all(feature = "redis-pubsub", feature = "grpc"))]
#[path = "../fuzz/checks.rs"]
mod fuzz_checks;

#[cfg(all(feature = "redis-pubsub", feature = "grpc"))]
mod fuzz_corpora {
    use super::fuzz_checks as checks;

    /// Runs `check` on every saved input of `target`; at least its seeds.
    fn replay(target: &str, check: fn(&[u8])) {
        let corpus = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("fuzz/corpus")
            .join(target);
        let mut replayed = 0;
        for entry in std::fs::read_dir(&corpus).expect("the saved corpus") {
            check(&std::fs::read(entry.unwrap().path()).unwrap());
            replayed += 1;
        }
        assert!(replayed >= 2, "{target}: the seeds are there ({replayed})");
    }

    #[test]
    fn cloudevents() {
        replay("cloudevents", checks::cloudevents);
    }

    #[test]
    fn pubsub_frames() {
        replay("pubsub_frame", checks::pubsub_frame);
    }

    #[test]
    fn push_requests() {
        replay("push_request", checks::push_request);
    }

    #[test]
    fn config_yaml() {
        replay("config_yaml", checks::config_yaml);
    }
}
