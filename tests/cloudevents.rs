//! CloudEvents 1.0 structured mode: what the conversion writes meets the
//! spec's required attributes, what it reads is checked, and the round trip
//! keeps the whole envelope.

mod common;

use common::{SPEC_DOCUMENT, TradeExecuted, spec_trade};
use serde_json::{Value, json};
use switchboard::cloudevents::{self, CloudEventError};
use switchboard::{Codec, DecodeError, EventEnvelope};
use uuid::Uuid;

fn spec_envelope() -> EventEnvelope<TradeExecuted> {
    Codec::default()
        .decode::<TradeExecuted>(SPEC_DOCUMENT.as_bytes())
        .expect("the SPEC document decodes")
}

fn spec_cloudevent() -> Value {
    cloudevents::to_structured(&spec_envelope()).expect("converts")
}

fn without(attribute: &str) -> Value {
    let mut event = spec_cloudevent();
    event.as_object_mut().unwrap().remove(attribute);
    event
}

fn with(attribute: &str, value: Value) -> Value {
    let mut event = spec_cloudevent();
    event[attribute] = value;
    event
}

#[test]
fn the_spec_event_has_every_required_attribute_and_the_mapped_optional_ones() {
    let event = spec_cloudevent();
    // CloudEvents 1.0 REQUIRED: id, source, specversion, type — non-empty strings.
    assert_eq!(event["specversion"], "1.0");
    assert_eq!(event["id"], "6f1c0f4e-8a3b-4c1d-9e2f-0a1b2c3d4e5f");
    assert_eq!(event["source"], "trading-service");
    assert_eq!(event["type"], "trade.executed");
    // OPTIONAL ones this mapping fills.
    assert_eq!(event["time"], "2026-02-19T12:00:00.000000Z");
    assert_eq!(event["datacontenttype"], "application/json");
    assert_eq!(
        event["version"], "1.0",
        "the envelope version as an extension"
    );
    assert_eq!(
        event["dataschema"], "urn:switchboard:event:trade.executed:1.0",
        "type and version as a URI for tools that do not read extensions"
    );
    let spec: Value = serde_json::from_str(SPEC_DOCUMENT).unwrap();
    assert_eq!(event["data"], spec["payload"]);
    let attributes: Vec<&String> = event.as_object().unwrap().keys().collect();
    assert_eq!(
        attributes.len(),
        9,
        "nothing beyond the mapped attributes: {attributes:?}"
    );
}

#[test]
fn every_attribute_name_is_lowercase_letters_and_digits() {
    let envelope = spec_envelope()
        .with_header(
            "traceparent",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        )
        .with_header("correlation-id", "req-7")
        .with_header("Odd_Name", "x");
    let event = cloudevents::to_structured(&envelope).unwrap();
    for name in event.as_object().unwrap().keys() {
        let valid = name == "data"
            || name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
        assert!(valid, "attribute name {name:?} breaks CloudEvents naming");
        assert!(name.len() <= 20, "{name:?} is longer than 20 characters");
    }
    assert_eq!(event["traceparent"], envelope.headers()["traceparent"]);
}

#[test]
fn typed_and_untyped_round_trips_keep_the_whole_envelope() {
    let envelope = EventEnvelope::new("trading-service", spec_trade())
        .with_header(
            "traceparent",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        )
        .with_header("correlation-id", "req-7");
    let event = cloudevents::to_structured(&envelope).unwrap();
    assert_eq!(
        cloudevents::from_structured::<TradeExecuted>(&event).unwrap(),
        envelope
    );

    let untyped = cloudevents::from_structured_value(&event).unwrap();
    assert_eq!(untyped.event_id(), envelope.event_id());
    assert_eq!(untyped.headers(), envelope.headers());
    assert_eq!(untyped.payload()["symbol"], "AAPL");
}

#[test]
fn a_foreign_event_with_a_non_uuid_id_gets_a_stable_event_id_and_keeps_its_id() {
    // The example of the CloudEvents JSON format spec, with the two
    // attributes this crate requires (time is there; version added).
    let foreign = json!({
        "specversion": "1.0",
        "type": "com.example.someevent",
        "source": "/mycontext",
        "id": "A234-1234-1234",
        "time": "2018-04-05T17:31:00Z",
        "comexampleextension1": "value",
        "comexampleothervalue": 5,
        "datacontenttype": "application/json",
        "version": "1.0",
        "data": { "appinfoA": "abc", "appinfoB": 123, "appinfoC": true }
    });
    let first = cloudevents::from_structured_value(&foreign).unwrap();
    let second = cloudevents::from_structured_value(&foreign).unwrap();
    assert_eq!(
        first.event_id(),
        second.event_id(),
        "same source + id, same event_id"
    );
    assert_eq!(first.event_id().get_version_num(), 5);
    assert_eq!(first.headers()["ceid"], "A234-1234-1234");
    assert_eq!(first.headers()["comexampleextension1"], "value");
    assert_eq!(first.headers()["comexampleothervalue"], "5");
    assert_eq!(first.event_type(), "com.example.someevent");

    let back = cloudevents::to_structured(&first).unwrap();
    assert_eq!(
        back["id"], "A234-1234-1234",
        "the original id goes back out"
    );
    assert!(back.get("ceid").is_none());

    let other_source = with_value(&foreign, "source", json!("/elsewhere"));
    let elsewhere = cloudevents::from_structured_value(&other_source).unwrap();
    assert_ne!(
        elsewhere.event_id(),
        first.event_id(),
        "ids are unique per source"
    );
}

fn with_value(event: &Value, attribute: &str, value: Value) -> Value {
    let mut event = event.clone();
    event[attribute] = value;
    event
}

#[test]
fn each_missing_required_attribute_is_named() {
    for attribute in ["specversion", "id", "source", "type", "time"] {
        assert_eq!(
            cloudevents::from_structured::<TradeExecuted>(&without(attribute)).unwrap_err(),
            CloudEventError::Missing { attribute },
        );
    }
    // The version may come from `dataschema`; with neither it is missing.
    let mut neither = without("version");
    neither.as_object_mut().unwrap().remove("dataschema");
    assert_eq!(
        cloudevents::from_structured::<TradeExecuted>(&neither).unwrap_err(),
        CloudEventError::Missing {
            attribute: "version"
        },
    );
}

/// The CloudEvents JSON format spec's own example as other SDKs write it:
/// no `version` extension, no `dataschema`.
fn foreign_event() -> Value {
    json!({
        "specversion": "1.0",
        "type": "trade.executed",
        "source": "/mycontext",
        "id": "A234-1234-1234",
        "time": "2018-04-05T17:31:00Z",
        "comexampleextension1": "value",
        "datacontenttype": "application/json",
        "data": {
            "order_id": "123", "user_id": "456", "symbol": "AAPL",
            "quantity": 100, "price": 150.0
        }
    })
}

#[test]
fn a_cloudevent_from_another_producer_is_read_with_a_configured_default_version() {
    let foreign = foreign_event();
    assert_eq!(
        cloudevents::from_structured::<TradeExecuted>(&foreign).unwrap_err(),
        CloudEventError::Missing {
            attribute: "version"
        },
        "no version anywhere and no default"
    );
    let read = cloudevents::from_structured_with::<TradeExecuted>(&foreign, Some("1.0")).unwrap();
    assert_eq!(read.version(), "1.0");
    assert_eq!(read.payload().symbol, "AAPL");
    assert_eq!(read.headers()["ceid"], "A234-1234-1234");
    let untyped = cloudevents::from_structured_value_with(&foreign, Some("1.0")).unwrap();
    assert_eq!(untyped.event_type(), "trade.executed");
}

#[test]
fn a_dataschema_names_the_version_and_wins_over_the_default() {
    let mut foreign = foreign_event();
    foreign["dataschema"] = json!("https://schemas.example.com/trade.executed/v1.2.json");
    let read = cloudevents::from_structured_with::<TradeExecuted>(&foreign, Some("1.0")).unwrap();
    assert_eq!(read.version(), "1.2");
    // A schema of another major is refused as any other major version is.
    foreign["dataschema"] = json!("https://schemas.example.com/trade.executed/v2");
    let error =
        cloudevents::from_structured_with::<TradeExecuted>(&foreign, Some("1.0")).unwrap_err();
    assert!(
        matches!(
            error,
            CloudEventError::Envelope(switchboard::DecodeError::UnsupportedVersion { .. })
        ),
        "{error}"
    );
}

#[test]
fn required_attributes_must_be_non_empty_strings() {
    for attribute in ["id", "source", "type"] {
        for value in [json!(""), json!(5), json!(null)] {
            let error =
                cloudevents::from_structured::<TradeExecuted>(&with(attribute, value.clone()))
                    .unwrap_err();
            assert_eq!(
                error,
                CloudEventError::NotAString {
                    attribute: attribute.to_owned()
                },
                "{attribute} = {value}"
            );
        }
    }
}

#[test]
fn another_specversion_is_refused() {
    let error = cloudevents::from_structured::<TradeExecuted>(&with("specversion", json!("0.3")))
        .unwrap_err();
    assert_eq!(
        error,
        CloudEventError::UnsupportedSpecVersion {
            found: "0.3".into()
        }
    );
}

#[test]
fn data_that_is_not_json_is_refused() {
    let text = with("datacontenttype", json!("text/plain"));
    assert!(matches!(
        cloudevents::from_structured_value(&text),
        Err(CloudEventError::NotJsonData { .. })
    ));
    let mut binary = without("data");
    binary["data_base64"] = json!("AAEC");
    assert!(matches!(
        cloudevents::from_structured_value(&binary),
        Err(CloudEventError::NotJsonData { .. })
    ));
    let charset = with("datacontenttype", json!("application/json; charset=utf-8"));
    assert!(cloudevents::from_structured_value(&charset).is_ok());
}

#[test]
fn a_bad_time_is_refused() {
    let error = cloudevents::from_structured::<TradeExecuted>(&with("time", json!("yesterday")))
        .unwrap_err();
    assert_eq!(
        error,
        CloudEventError::BadTime {
            value: "yesterday".into()
        }
    );
}

#[test]
fn the_envelope_rules_still_hold() {
    let other_type = with("type", json!("order.created"));
    assert!(matches!(
        cloudevents::from_structured::<TradeExecuted>(&other_type),
        Err(CloudEventError::Envelope(DecodeError::TypeMismatch { .. }))
    ));
    let next_major = with("version", json!("2.0"));
    assert!(matches!(
        cloudevents::from_structured::<TradeExecuted>(&next_major),
        Err(CloudEventError::Envelope(
            DecodeError::UnsupportedVersion { .. }
        ))
    ));
    let no_data = without("data");
    assert!(matches!(
        cloudevents::from_structured::<TradeExecuted>(&no_data),
        Err(CloudEventError::Envelope(DecodeError::BadPayload { .. }))
    ));
    assert_eq!(
        cloudevents::from_structured_value(&json!([1, 2])).unwrap_err(),
        CloudEventError::NotAnObject
    );
}

#[test]
fn a_uuid_id_is_the_event_id_itself() {
    let id = Uuid::new_v4();
    let event = with("id", json!(id.to_string()));
    let envelope = cloudevents::from_structured::<TradeExecuted>(&event).unwrap();
    assert_eq!(envelope.event_id(), id);
    assert!(envelope.headers().is_empty());
}
