//! JSON encoding and checked decoding of [`EventEnvelope`]s.
//!
//! Decoding takes untrusted bytes. It refuses a document over the size limit
//! before parsing it, so memory use is bounded by the limit (serde_json also
//! bounds nesting depth); it never panics; and each kind of bad input gets its
//! own [`DecodeError`] naming the problem.
//!
//! Valid input takes one pass straight into the typed envelope. Only when that
//! pass fails is the document parsed again, field by field, to say exactly
//! what is wrong — so the diagnosis costs nothing on the happy path.

use std::borrow::Cow;

use bytes::Bytes;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::Value;
use uuid::Uuid;

use crate::envelope::{EnvelopePayload, Event, EventEnvelope, Headers, major_version};
use crate::error::{Error, ErrorKind};
use crate::upcast::Upcasters;

mod timestamp;

use timestamp::deserialize_timestamp;
pub(crate) use timestamp::{format_timestamp, serialize_timestamp};

/// The default size limit for one encoded envelope: 1 MiB.
pub const DEFAULT_MAX_SIZE: usize = 1024 * 1024;

/// The most characters of untrusted text a [`DecodeError`] quotes: a field's
/// value, or the parser's message (which itself quotes the payload, as in
/// `invalid type: string "…"`). Longer text is cut there and ends in `…`, so
/// an error, a log line or a dead letter's reason never carries a whole
/// payload (which may hold secrets) and stays small.
///
/// ```
/// use switchboard::{Codec, DecodeError, QUOTE_LIMIT};
/// # #[derive(Debug, serde::Serialize, serde::Deserialize)]
/// # struct Tick { n: u32 }
/// # impl switchboard::Event for Tick { const TYPE: &'static str = "tick"; const VERSION: &'static str = "1.0"; }
/// let long = "x".repeat(10_000);
/// let bytes = format!(
///     r#"{{"event_id":"{}","event_type":"tick","version":"1.0","timestamp":"2026-01-01T00:00:00Z","source":"s","payload":{{"n":"{long}"}}}}"#,
///     uuid::Uuid::new_v4()
/// );
/// let error = Codec::default().decode::<Tick>(bytes.as_bytes()).unwrap_err();
/// assert!(matches!(error, DecodeError::BadPayload { .. }), "{error}");
/// assert!(error.to_string().len() < QUOTE_LIMIT + 100, "{error}");
/// ```
pub const QUOTE_LIMIT: usize = 120;

/// `text` cut to [`QUOTE_LIMIT`] characters.
pub(crate) fn quoted(text: &str) -> String {
    match text.char_indices().nth(QUOTE_LIMIT) {
        None => text.to_owned(),
        Some((end, _)) => format!("{}…", &text[..end]),
    }
}

/// Why bytes are not an acceptable envelope.
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The document is larger than the codec's limit; it was not parsed.
    #[error("document is {size} bytes, over the {limit}-byte limit")]
    TooLarge {
        /// Size of the document in bytes.
        size: usize,
        /// The configured limit in bytes.
        limit: usize,
    },
    /// The bytes are not JSON the parser accepts: a syntax error, or nesting
    /// deeper than 128 levels.
    #[error("not JSON: {reason}")]
    NotJson {
        /// The parser's message, with line and column.
        reason: String,
    },
    /// The JSON document is not an object.
    #[error("the envelope must be a JSON object")]
    NotAnObject,
    /// A required field is absent.
    #[error("missing field `{field}`")]
    MissingField {
        /// The field's name.
        field: &'static str,
    },
    /// A field has the wrong JSON type.
    #[error("field `{field}` must be {expected}")]
    WrongType {
        /// The field's name.
        field: &'static str,
        /// What the field must hold.
        expected: &'static str,
    },
    /// `event_id` is not a UUID.
    #[error("field `event_id` is not a UUID: {value:?}")]
    BadEventId {
        /// The text found.
        value: String,
    },
    /// `timestamp` is not an RFC 3339 date-time.
    #[error("field `timestamp` is not an RFC 3339 date-time: {value:?}")]
    BadTimestamp {
        /// The text found.
        value: String,
    },
    /// `version` is not of the form `MAJOR.MINOR`.
    #[error("field `version` is not MAJOR.MINOR: {value:?}")]
    BadVersion {
        /// The text found.
        value: String,
    },
    /// The envelope names another event type than the one decoded into.
    #[error("event type {found:?} where {expected:?} was expected")]
    TypeMismatch {
        /// The type the consumer reads.
        expected: &'static str,
        /// The type the envelope names.
        found: String,
    },
    /// The envelope's major version is not the consumer's.
    #[error(
        "version {found:?} is not supported: this consumer reads major version of {supported:?}"
    )]
    UnsupportedVersion {
        /// The version the envelope carries.
        found: String,
        /// The version the consumer was built for.
        supported: &'static str,
    },
    /// The payload does not fit the event type.
    #[error("payload does not match {event_type}: {reason}")]
    BadPayload {
        /// The event type decoded into.
        event_type: &'static str,
        /// The deserializer's message.
        reason: String,
    },
    /// An upcaster refused the payload it was given
    /// ([`Upcasters`](crate::Upcasters)).
    #[error("cannot upcast {event_type} {from_major}.x to {to_version}: {reason}")]
    UpcastFailed {
        /// The event type.
        event_type: String,
        /// The major version the failing step reads.
        from_major: u64,
        /// The version it writes.
        to_version: String,
        /// What the upcaster said.
        reason: String,
    },
    /// Anything else the parser refused (a duplicated field, for example).
    #[error("invalid envelope: {reason}")]
    Malformed {
        /// The parser's message.
        reason: String,
    },
}

/// Encodes envelopes to JSON and decodes them back with a size limit.
///
/// ```
/// # use serde::{Deserialize, Serialize};
/// # #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
/// # struct UserRegistered { user_id: String }
/// # impl switchboard::Event for UserRegistered {
/// #     const TYPE: &'static str = "user.registered";
/// #     const VERSION: &'static str = "1.0";
/// # }
/// use switchboard::{Codec, DecodeError, EventEnvelope};
///
/// let codec = Codec::default();
/// let sent = EventEnvelope::new("auth-service", UserRegistered { user_id: "42".into() });
/// let bytes = codec.encode(&sent)?;
/// let received = codec.decode::<UserRegistered>(&bytes)?;
/// assert_eq!(received, sent);
///
/// let tiny = Codec::default().with_max_size(16);
/// assert!(matches!(tiny.decode::<UserRegistered>(&bytes), Err(DecodeError::TooLarge { .. })));
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, Clone)]
pub struct Codec {
    max_size: usize,
    upcasters: Upcasters,
}

impl Default for Codec {
    fn default() -> Self {
        Self {
            max_size: DEFAULT_MAX_SIZE,
            upcasters: Upcasters::new(),
        }
    }
}

impl Codec {
    /// Sets the largest document, in bytes, that encodes or decodes.
    pub fn with_max_size(mut self, bytes: usize) -> Self {
        self.max_size = bytes;
        self
    }

    /// The size limit in bytes.
    pub fn max_size(&self) -> usize {
        self.max_size
    }

    /// Encodes an envelope to JSON, refusing one a consumer would refuse: a
    /// `version` that is not `MAJOR.MINOR`, or a document over the size
    /// limit.
    pub fn encode<T: Serialize>(&self, envelope: &EventEnvelope<T>) -> Result<Bytes, Error> {
        if major_version(envelope.version()).is_none() {
            return Err(Error::new(
                ErrorKind::Encode,
                format!(
                    "{} envelope has version {:?}, not MAJOR.MINOR",
                    envelope.event_type(),
                    envelope.version()
                ),
            ));
        }
        let mut buffer = Vec::with_capacity(512);
        serde_json::to_writer(&mut buffer, envelope).map_err(|error| {
            Error::new(
                ErrorKind::Encode,
                format!("{}: {error}", envelope.event_type()),
            )
        })?;
        if buffer.len() > self.max_size {
            return Err(Error::new(
                ErrorKind::Encode,
                format!(
                    "{} envelope is {} bytes, over the {}-byte limit",
                    envelope.event_type(),
                    buffer.len(),
                    self.max_size
                ),
            ));
        }
        Ok(Bytes::from(buffer))
    }

    /// Decodes an envelope of event type `E`, checking its type and version.
    ///
    /// An envelope of another major version is read through the codec's
    /// [upcasters](Self::with_upcasters) when a chain of them leads to
    /// `E`'s major; otherwise it is [`DecodeError::UnsupportedVersion`].
    pub fn decode<E: Event>(&self, bytes: &[u8]) -> Result<EventEnvelope<E>, DecodeError> {
        self.check_size(bytes)?;
        let decoded = match serde_json::from_slice::<Wire<'_, E>>(bytes) {
            Ok(wire) => wire.into_checked_envelope(),
            Err(error) => Err(diagnose(bytes, error, Some(check_typed::<E>))),
        };
        match decoded {
            Err(DecodeError::UnsupportedVersion { .. }) if !self.upcasters.is_empty() => {
                self.decode_upcast::<E>(bytes)
            }
            decoded => decoded,
        }
    }

    /// The cold path of an older major: read untyped, upcast, then type.
    fn decode_upcast<E: Event>(&self, bytes: &[u8]) -> Result<EventEnvelope<E>, DecodeError> {
        let envelope = self.decode_value(bytes)?;
        let found = envelope.version().to_owned();
        let target = major_version(E::VERSION).unwrap_or_default();
        match self.upcasters.upcast(envelope, target)? {
            Some(upcast) => upcast.into_typed::<E>(),
            None => Err(DecodeError::UnsupportedVersion {
                found,
                supported: E::VERSION,
            }),
        }
    }

    /// Reads older major versions of events through `upcasters`; see
    /// [`Upcasters`].
    pub fn with_upcasters(mut self, upcasters: Upcasters) -> Self {
        self.upcasters = upcasters;
        self
    }

    /// The upcasters [`decode`](Self::decode) uses.
    pub fn upcasters(&self) -> &Upcasters {
        &self.upcasters
    }

    /// Decodes an envelope of any event type, keeping the payload as JSON.
    pub fn decode_value(
        &self,
        bytes: &[u8],
    ) -> Result<EventEnvelope<serde_json::Value>, DecodeError> {
        self.check_size(bytes)?;
        match serde_json::from_slice::<Wire<'_, Value>>(bytes) {
            Ok(wire) => wire.into_checked_envelope(),
            Err(error) => Err(diagnose(bytes, error, None)),
        }
    }

    fn check_size(&self, bytes: &[u8]) -> Result<(), DecodeError> {
        if bytes.len() > self.max_size {
            return Err(DecodeError::TooLarge {
                size: bytes.len(),
                limit: self.max_size,
            });
        }
        Ok(())
    }
}

/// The envelope as it is parsed: borrowed strings where the JSON allows.
#[derive(Deserialize)]
struct Wire<'a, T> {
    event_id: Uuid,
    #[serde(borrow)]
    event_type: Cow<'a, str>,
    #[serde(deserialize_with = "deserialize_timestamp")]
    timestamp: DateTime<Utc>,
    source: String,
    #[serde(borrow)]
    version: Cow<'a, str>,
    payload: T,
    #[serde(default)]
    headers: Headers,
}

impl<T: EnvelopePayload> Wire<'_, T> {
    /// The envelope, once `T` accepted its event type and version.
    fn into_checked_envelope(self) -> Result<EventEnvelope<T>, DecodeError> {
        let (event_type, version) = T::accept(&self.event_type, &self.version)?;
        Ok(EventEnvelope::from_parts(
            self.event_id,
            event_type,
            self.timestamp,
            self.source,
            version,
            self.payload,
            self.headers,
        ))
    }
}

/// The same checks as [`Codec::decode`] and [`Codec::decode_value`], for
/// any serde format; see [`EnvelopePayload`].
impl<'de, T: EnvelopePayload> Deserialize<'de> for EventEnvelope<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        Wire::<'de, T>::deserialize(deserializer)?
            .into_checked_envelope()
            .map_err(serde::de::Error::custom)
    }
}

pub(crate) fn check_type_and_version<E: Event>(
    event_type: &str,
    version: &str,
) -> Result<(), DecodeError> {
    if event_type != E::TYPE {
        return Err(DecodeError::TypeMismatch {
            expected: E::TYPE,
            found: quoted(event_type),
        });
    }
    let Some(found) = major_version(version) else {
        return Err(DecodeError::BadVersion {
            value: quoted(version),
        });
    };
    if major_version(E::VERSION) != Some(found) {
        return Err(DecodeError::UnsupportedVersion {
            found: quoted(version),
            supported: E::VERSION,
        });
    }
    Ok(())
}

/// The typed checks of the slow path: type, version, then payload shape.
fn check_typed<E: Event>(fields: &Fields<'_>) -> Result<(), DecodeError> {
    check_type_and_version::<E>(fields.event_type, fields.version)?;
    // The path names the payload field at fault (`quantity: invalid type`).
    serde_path_to_error::deserialize::<_, E>(fields.payload).map_err(|error| {
        DecodeError::BadPayload {
            event_type: E::TYPE,
            reason: quoted(&error.to_string()),
        }
    })?;
    Ok(())
}

/// The envelope's fields after the field-by-field check.
struct Fields<'a> {
    event_type: &'a str,
    version: &'a str,
    payload: &'a Value,
}

/// The checks only a typed decode makes, run after the envelope's own.
type TypedCheck = fn(&Fields<'_>) -> Result<(), DecodeError>;

/// Explains why the fast pass failed, by checking one field at a time in the
/// order a reader would: JSON, object, each envelope field, then the typed
/// checks.
fn diagnose(bytes: &[u8], fast_error: serde_json::Error, typed: Option<TypedCheck>) -> DecodeError {
    let document: Value = match serde_json::from_slice(bytes) {
        Ok(document) => document,
        Err(error) => {
            return DecodeError::NotJson {
                reason: quoted(&error.to_string()),
            };
        }
    };
    let Some(object) = document.as_object() else {
        return DecodeError::NotAnObject;
    };
    let text = |field: &'static str| -> Result<&str, DecodeError> {
        match object.get(field) {
            None => Err(DecodeError::MissingField { field }),
            Some(Value::String(text)) => Ok(text),
            Some(_) => Err(DecodeError::WrongType {
                field,
                expected: "a string",
            }),
        }
    };
    let fields = (|| {
        let event_id = text("event_id")?;
        if Uuid::try_parse(event_id).is_err() {
            return Err(DecodeError::BadEventId {
                value: quoted(event_id),
            });
        }
        let event_type = text("event_type")?;
        let timestamp = text("timestamp")?;
        if DateTime::parse_from_rfc3339(timestamp).is_err() {
            return Err(DecodeError::BadTimestamp {
                value: quoted(timestamp),
            });
        }
        text("source")?;
        let version = text("version")?;
        if major_version(version).is_none() {
            return Err(DecodeError::BadVersion {
                value: quoted(version),
            });
        }
        match object.get("headers") {
            None => {}
            Some(Value::Object(headers)) if headers.values().all(Value::is_string) => {}
            Some(_) => {
                return Err(DecodeError::WrongType {
                    field: "headers",
                    expected: "an object of strings",
                });
            }
        }
        let payload = object
            .get("payload")
            .ok_or(DecodeError::MissingField { field: "payload" })?;
        Ok(Fields {
            event_type,
            version,
            payload,
        })
    })();
    match fields.and_then(|fields| typed.map_or(Ok(()), |check| check(&fields))) {
        Err(specific) => specific,
        Ok(()) => DecodeError::Malformed {
            reason: quoted(&fast_error.to_string()),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encode_refuses_a_version_a_consumer_would_refuse() {
        let envelope = EventEnvelope::untyped("trade.executed", "one", "svc", Value::Null);
        let error = Codec::default().encode(&envelope).unwrap_err();
        assert_eq!(error.kind(), ErrorKind::Encode);
        assert!(error.message().contains("\"one\""), "{error}");
    }
}
