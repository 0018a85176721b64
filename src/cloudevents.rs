//! CloudEvents 1.0 structured-mode JSON, to plug switchboard's events into
//! tools that speak CloudEvents (brokers, gateways, Knative, Dapr).
//!
//! The mapping, envelope ↔ CloudEvent:
//!
//! | envelope | CloudEvent |
//! |---|---|
//! | `event_id` | `id` |
//! | `source` | `source` |
//! | `event_type` | `type` |
//! | — | `specversion` = `"1.0"` |
//! | `timestamp` | `time` |
//! | — | `datacontenttype` = `"application/json"` |
//! | `payload` | `data` |
//! | `version` | extension attribute `version`, and in `dataschema` = `urn:switchboard:event:{type}:{version}` |
//! | a header whose name is a valid attribute name (`traceparent`) | that extension attribute |
//! | other headers (`correlation-id`) | extension `sbheaders`: the headers as a JSON object in a string |
//!
//! **CloudEvents from other producers** carry no `version` extension. The
//! version is then read from `dataschema` when its last segment (after the
//! last `/` or `:`, a leading `v` and a trailing `.json` removed) is
//! `MAJOR.MINOR` or `MAJOR` (`https://schemas.example.com/trade.executed/v2`
//! is `2.0`), else it is the default given to
//! [`from_structured_with`] / [`from_structured_value_with`]; with neither,
//! the event is refused as [`CloudEventError::Missing`] `version`.
//!
//! CloudEvents identifies an event by `source` + `id`, and its `id` need not
//! be a UUID. An incoming `id` that is not one becomes a name-based UUID (v5)
//! of `source` and `id` — so the same event always gets the same `event_id`
//! and deduplicates — and the original `id` is kept in the header `ceid`,
//! which turns back into `id` on the way out.
//!
//! ```
//! use serde::{Deserialize, Serialize};
//! use switchboard::{cloudevents, Event, EventEnvelope};
//!
//! #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
//! struct PriceUpdated { symbol: String, price: String }
//! impl Event for PriceUpdated {
//!     const TYPE: &'static str = "price.updated";
//!     const VERSION: &'static str = "1.0";
//! }
//!
//! let envelope = EventEnvelope::new("market-service", PriceUpdated { symbol: "AAPL".into(), price: "150.00".into() });
//! let cloudevent = cloudevents::to_structured(&envelope)?;
//! assert_eq!(cloudevent["specversion"], "1.0");
//! assert_eq!(cloudevent["type"], "price.updated");
//! assert_eq!(cloudevent["data"]["symbol"], "AAPL");
//!
//! let back = cloudevents::from_structured::<PriceUpdated>(&cloudevent)?;
//! assert_eq!(back, envelope);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use serde::Serialize;
use serde_json::{Map, Value};
use uuid::Uuid;

use crate::codec::{Codec, DecodeError, format_timestamp};
use crate::envelope::{Event, EventEnvelope, Headers};
use crate::error::{Error, ErrorKind};

/// The CloudEvents version this module reads and writes.
pub const SPEC_VERSION: &str = "1.0";

/// The header that keeps an incoming CloudEvent `id` that is not a UUID.
pub const ID_HEADER: &str = "ceid";

/// The extension attribute carrying headers whose names are not valid
/// CloudEvents attribute names.
pub const HEADERS_EXTENSION: &str = "sbheaders";

/// The `dataschema` written for an envelope: this prefix, the event type,
/// `:`, the version.
pub const DATASCHEMA_PREFIX: &str = "urn:switchboard:event:";

/// The namespace of the name-based UUIDs given to CloudEvents whose `id` is
/// not a UUID.
const ID_NAMESPACE: Uuid = Uuid::from_u128(0x5b0a_2d6e_8f4c_4e1a_9c3b_7d1e_2f60_a4c8);

/// Attributes with a meaning of their own, never taken as extensions.
const RESERVED: [&str; 10] = [
    "id",
    "source",
    "specversion",
    "type",
    "datacontenttype",
    "dataschema",
    "subject",
    "time",
    "data",
    "data_base64",
];

/// Why a JSON document is not a CloudEvent this crate can read.
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CloudEventError {
    /// The document is not a JSON object.
    #[error("a CloudEvent must be a JSON object")]
    NotAnObject,
    /// A required attribute is absent (`time` and `version` are required
    /// here because the envelope has them).
    #[error("missing CloudEvents attribute `{attribute}`")]
    Missing {
        /// The attribute's name.
        attribute: &'static str,
    },
    /// An attribute is not a non-empty string.
    #[error("CloudEvents attribute `{attribute}` must be a non-empty string")]
    NotAString {
        /// The attribute's name.
        attribute: String,
    },
    /// `specversion` is not `"1.0"`.
    #[error("CloudEvents specversion {found:?} is not supported (only \"1.0\")")]
    UnsupportedSpecVersion {
        /// The version found.
        found: String,
    },
    /// `data` is not JSON (`datacontenttype` is not JSON, or `data_base64`).
    #[error("CloudEvents data must be JSON, found {found}")]
    NotJsonData {
        /// What was found instead.
        found: String,
    },
    /// `time` is not an RFC 3339 date-time.
    #[error("CloudEvents `time` is not an RFC 3339 date-time: {value:?}")]
    BadTime {
        /// The text found.
        value: String,
    },
    /// The `sbheaders` extension is not a JSON object of strings.
    #[error("CloudEvents extension `sbheaders` must be a JSON object of strings in a string")]
    BadHeaders,
    /// The event converts into an envelope the consumer refuses (another
    /// event type, another major version, a payload of the wrong shape).
    #[error(transparent)]
    Envelope(#[from] DecodeError),
}

impl From<CloudEventError> for Error {
    fn from(error: CloudEventError) -> Self {
        Self::new(ErrorKind::Decode, error.to_string()).with_source(error)
    }
}

/// Converts an envelope to a CloudEvents 1.0 structured-mode JSON document.
pub fn to_structured<T: Serialize>(envelope: &EventEnvelope<T>) -> Result<Value, Error> {
    let data = serde_json::to_value(envelope.payload()).map_err(|error| {
        Error::new(
            ErrorKind::Encode,
            format!("{} payload: {error}", envelope.event_type()),
        )
    })?;
    let mut headers = envelope.headers().clone();
    let id = headers
        .remove(ID_HEADER)
        .unwrap_or_else(|| envelope.event_id().to_string());
    let mut event = Map::new();
    event.insert("specversion".into(), SPEC_VERSION.into());
    event.insert("id".into(), id.into());
    event.insert("source".into(), envelope.source().into());
    event.insert("type".into(), envelope.event_type().into());
    event.insert(
        "time".into(),
        format_timestamp(&envelope.timestamp()).into(),
    );
    event.insert("datacontenttype".into(), "application/json".into());
    event.insert("version".into(), envelope.version().into());
    event.insert(
        "dataschema".into(),
        format!(
            "{DATASCHEMA_PREFIX}{}:{}",
            envelope.event_type(),
            envelope.version()
        )
        .into(),
    );
    let mut others = Map::new();
    for (name, value) in headers {
        if is_extension_name(&name) && !event.contains_key(&name) {
            event.insert(name, value.into());
        } else {
            others.insert(name, value.into());
        }
    }
    if !others.is_empty() {
        event.insert(
            HEADERS_EXTENSION.into(),
            Value::Object(others).to_string().into(),
        );
    }
    event.insert("data".into(), data);
    Ok(Value::Object(event))
}

/// Reads a CloudEvents 1.0 structured-mode JSON document as an envelope of
/// event type `E`, with the same checks as [`Codec::decode`].
///
/// The version is the `version` extension, else the one in `dataschema`
/// (see the [module docs](self)); an event with neither is refused.
pub fn from_structured<E: Event>(document: &Value) -> Result<EventEnvelope<E>, CloudEventError> {
    from_structured_with::<E>(document, None)
}

/// [`from_structured`], taking `default_version` for an event that says
/// its version neither in a `version` extension nor in `dataschema` — as
/// CloudEvents from other producers do.
///
/// ```
/// use serde::{Deserialize, Serialize};
/// use serde_json::json;
/// use switchboard::{cloudevents, Event};
///
/// #[derive(Debug, Serialize, Deserialize)]
/// struct PriceUpdated { symbol: String }
/// impl Event for PriceUpdated {
///     const TYPE: &'static str = "price.updated";
///     const VERSION: &'static str = "1.0";
/// }
///
/// // As another SDK writes it: no `version`, no `dataschema`.
/// let foreign = json!({
///     "specversion": "1.0", "id": "A234-1234-1234", "source": "/market",
///     "type": "price.updated", "time": "2026-02-19T12:00:00Z",
///     "datacontenttype": "application/json", "data": { "symbol": "AAPL" }
/// });
/// assert!(cloudevents::from_structured::<PriceUpdated>(&foreign).is_err());
/// let read = cloudevents::from_structured_with::<PriceUpdated>(&foreign, Some("1.0"))?;
/// assert_eq!(read.version(), "1.0");
/// # Ok::<(), cloudevents::CloudEventError>(())
/// ```
pub fn from_structured_with<E: Event>(
    document: &Value,
    default_version: Option<&str>,
) -> Result<EventEnvelope<E>, CloudEventError> {
    let envelope = envelope_document(document, default_version)?;
    Ok(unlimited().decode::<E>(&envelope)?)
}

/// Reads a CloudEvents 1.0 structured-mode JSON document as an untyped
/// envelope.
pub fn from_structured_value(document: &Value) -> Result<EventEnvelope<Value>, CloudEventError> {
    from_structured_value_with(document, None)
}

/// [`from_structured_value`] with a default version, as
/// [`from_structured_with`].
pub fn from_structured_value_with(
    document: &Value,
    default_version: Option<&str>,
) -> Result<EventEnvelope<Value>, CloudEventError> {
    let envelope = envelope_document(document, default_version)?;
    Ok(unlimited().decode_value(&envelope)?)
}

/// The version a `dataschema` URI names in its last segment: after the
/// last `/` or `:`, without a leading `v` or a trailing `.json`, as
/// `MAJOR.MINOR` or `MAJOR` (then `MAJOR.0`).
fn version_in_dataschema(dataschema: &str) -> Option<String> {
    let last = dataschema.rsplit(['/', ':']).next()?;
    let last = last.strip_suffix(".json").unwrap_or(last);
    let last = last.strip_prefix('v').unwrap_or(last);
    let digits = |part: &str| !part.is_empty() && part.bytes().all(|b| b.is_ascii_digit());
    match last.split_once('.') {
        Some((major, minor)) if digits(major) && digits(minor) => Some(last.to_owned()),
        None if digits(last) => Some(format!("{last}.0")),
        _ => None,
    }
}

/// The document was parsed already; its size is the caller's business.
fn unlimited() -> Codec {
    Codec::default().with_max_size(usize::MAX)
}

/// Checks the CloudEvents attributes and rewrites the event as envelope JSON.
fn envelope_document(
    document: &Value,
    default_version: Option<&str>,
) -> Result<Vec<u8>, CloudEventError> {
    let event = document.as_object().ok_or(CloudEventError::NotAnObject)?;
    let specversion = required(event, "specversion")?;
    if specversion != SPEC_VERSION {
        return Err(CloudEventError::UnsupportedSpecVersion {
            found: specversion.to_owned(),
        });
    }
    let id = required(event, "id")?;
    let source = required(event, "source")?;
    let event_type = required(event, "type")?;
    let time = required(event, "time")?;
    if chrono::DateTime::parse_from_rfc3339(time).is_err() {
        return Err(CloudEventError::BadTime {
            value: time.to_owned(),
        });
    }
    let version = match required(event, "version") {
        Ok(version) => version.to_owned(),
        Err(CloudEventError::Missing { .. }) => event
            .get("dataschema")
            .and_then(Value::as_str)
            .and_then(version_in_dataschema)
            .or_else(|| default_version.map(str::to_owned))
            .ok_or(CloudEventError::Missing {
                attribute: "version",
            })?,
        Err(other) => return Err(other),
    };
    if let Some(content_type) = event.get("datacontenttype") {
        let content_type = content_type.as_str().unwrap_or_default();
        if !is_json_content_type(content_type) {
            return Err(CloudEventError::NotJsonData {
                found: format!("datacontenttype {content_type:?}"),
            });
        }
    }
    if event.contains_key("data_base64") {
        return Err(CloudEventError::NotJsonData {
            found: "data_base64".into(),
        });
    }

    let mut headers = extensions(event)?;
    let event_id = match Uuid::try_parse(id) {
        Ok(uuid) => uuid,
        Err(_) => {
            headers.insert(ID_HEADER.into(), id.into());
            Uuid::new_v5(&ID_NAMESPACE, format!("{source}\n{id}").as_bytes())
        }
    };
    let mut envelope = Map::new();
    envelope.insert("event_id".into(), event_id.to_string().into());
    envelope.insert("event_type".into(), event_type.into());
    envelope.insert("timestamp".into(), time.into());
    envelope.insert("source".into(), source.into());
    envelope.insert("version".into(), version.into());
    envelope.insert(
        "payload".into(),
        event.get("data").cloned().unwrap_or(Value::Null),
    );
    if !headers.is_empty() {
        envelope.insert(
            "headers".into(),
            serde_json::to_value(headers).unwrap_or_default(),
        );
    }
    Ok(Value::Object(envelope).to_string().into_bytes())
}

fn required<'a>(
    event: &'a Map<String, Value>,
    attribute: &'static str,
) -> Result<&'a str, CloudEventError> {
    match event.get(attribute) {
        None => Err(CloudEventError::Missing { attribute }),
        Some(Value::String(text)) if !text.is_empty() => Ok(text),
        Some(_) => Err(CloudEventError::NotAString {
            attribute: attribute.to_owned(),
        }),
    }
}

/// Extension attributes become headers; `sbheaders` is unpacked.
fn extensions(event: &Map<String, Value>) -> Result<Headers, CloudEventError> {
    let mut headers = Headers::new();
    for (name, value) in event {
        if RESERVED.contains(&name.as_str()) || name == "version" {
            continue;
        }
        if name == HEADERS_EXTENSION {
            let packed: Map<String, Value> = value
                .as_str()
                .and_then(|text| serde_json::from_str(text).ok())
                .ok_or(CloudEventError::BadHeaders)?;
            for (name, value) in packed {
                let Value::String(value) = value else {
                    return Err(CloudEventError::BadHeaders);
                };
                headers.insert(name, value);
            }
            continue;
        }
        // Extension values may be strings, numbers or booleans; headers are
        // strings, so the others keep their JSON text.
        let text = match value {
            Value::String(text) => text.clone(),
            other => other.to_string(),
        };
        headers.insert(name.clone(), text);
    }
    Ok(headers)
}

/// CloudEvents 1.0: extension attribute names are lowercase ASCII letters
/// and digits (at most 20 characters, so every consumer accepts them).
fn is_extension_name(name: &str) -> bool {
    (1..=20).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        && !RESERVED.contains(&name)
        && name != HEADERS_EXTENSION
}

fn is_json_content_type(content_type: &str) -> bool {
    let essence = content_type
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase();
    essence == "application/json" || essence.ends_with("+json")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extension_names_follow_the_spec() {
        assert!(is_extension_name("traceparent"));
        assert!(is_extension_name("version2"));
        for bad in [
            "",
            "correlation-id",
            "Trace",
            "a_b",
            "id",
            "data",
            "sbheaders",
        ] {
            assert!(!is_extension_name(bad), "{bad:?}");
        }
        assert!(!is_extension_name("abcdefghijklmnopqrstu"), "21 characters");
    }

    #[test]
    fn a_version_is_read_from_the_last_segment_of_a_dataschema() {
        for (schema, version) in [
            ("urn:switchboard:event:trade.executed:1.3", Some("1.3")),
            ("https://schemas.example.com/trade.executed/v2", Some("2.0")),
            ("https://schemas.example.com/trade/2.1.json", Some("2.1")),
            ("https://schemas.example.com/trade.json", None),
            ("urn:x:latest", None),
            ("", None),
        ] {
            assert_eq!(
                version_in_dataschema(schema).as_deref(),
                version,
                "{schema}"
            );
        }
    }

    #[test]
    fn json_content_types_are_recognised() {
        for json in [
            "application/json",
            "application/json; charset=utf-8",
            "application/cloudevents+json",
            "APPLICATION/JSON",
        ] {
            assert!(is_json_content_type(json), "{json}");
        }
        assert!(!is_json_content_type("text/plain"));
        assert!(!is_json_content_type("application/octet-stream"));
    }
}
