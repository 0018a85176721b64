//! The event envelope of the wire format, and the [`Event`] trait that binds a
//! payload type to its name and version.
//!
//! The JSON form is exactly:
//!
//! ```json
//! {
//!   "event_id": "1b4e28ba-2fa1-41d2-883f-0016d3cca427",
//!   "event_type": "trade.executed",
//!   "timestamp": "2026-02-19T12:00:00.000000Z",
//!   "source": "trading-service",
//!   "version": "1.0",
//!   "payload": { "order_id": "123" }
//! }
//! ```
//!
//! plus an optional `headers` object of strings (correlation id, trace
//! context, dead-letter facts), left out when empty.
//!
//! Fields are private so that an envelope built for a payload type always
//! carries that type's [`Event::TYPE`] and [`Event::VERSION`]: a publisher
//! cannot send a `TradeExecuted` under another name. An envelope is read
//! with [`Codec`](crate::Codec) (which adds the size limit and the
//! field-by-field diagnosis) or with any serde deserializer — a file, an
//! axum `Json` extractor, a database row — and both check the same things:
//! the UUID, the RFC 3339 timestamp, the `MAJOR.MINOR` version, and for an
//! [`Event`] payload that the document names [`Event::TYPE`] and a version
//! of its major ([`EnvelopePayload`]).

use std::borrow::Cow;
use std::collections::BTreeMap;

use chrono::{DateTime, SubsecRound, Utc};
use serde::Serialize;
use serde::de::DeserializeOwned;
use uuid::Uuid;

/// String headers carried with an envelope or a raw message, sorted by name.
pub type Headers = BTreeMap<String, String>;

/// A payload type with a fixed event name and schema version.
///
/// ```
/// use serde::{Deserialize, Serialize};
/// use switchboard::Event;
///
/// #[derive(Debug, Serialize, Deserialize)]
/// struct UserRegistered {
///     user_id: String,
/// }
///
/// impl Event for UserRegistered {
///     const TYPE: &'static str = "user.registered";
///     const VERSION: &'static str = "1.0";
/// }
/// ```
pub trait Event: Serialize + DeserializeOwned + Send + Sync + 'static {
    /// The event name on the wire, such as `"trade.executed"`. The typed bus
    /// also uses it as the topic.
    const TYPE: &'static str;
    /// The schema version, `"MAJOR.MINOR"`. Consumers accept any version
    /// with the same major and refuse another major as unsupported.
    const VERSION: &'static str;
}

/// One event as it travels: identity, name, time, origin, version, payload.
///
/// ```
/// # use serde::{Deserialize, Serialize};
/// # #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
/// # struct UserRegistered { user_id: String }
/// # impl switchboard::Event for UserRegistered {
/// #     const TYPE: &'static str = "user.registered";
/// #     const VERSION: &'static str = "1.0";
/// # }
/// use switchboard::EventEnvelope;
///
/// let envelope = EventEnvelope::new("auth-service", UserRegistered { user_id: "42".into() })
///     .with_header("correlation-id", "req-7");
/// assert_eq!(envelope.event_type(), "user.registered");
/// assert_eq!(envelope.version(), "1.0");
/// assert_eq!(envelope.headers()["correlation-id"], "req-7");
/// ```
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct EventEnvelope<T> {
    event_id: Uuid,
    event_type: Cow<'static, str>,
    #[serde(serialize_with = "crate::codec::serialize_timestamp")]
    timestamp: DateTime<Utc>,
    source: String,
    version: Cow<'static, str>,
    payload: T,
    #[serde(skip_serializing_if = "Headers::is_empty")]
    headers: Headers,
}

impl<E: Event> EventEnvelope<E> {
    /// Wraps `payload` with a fresh UUID v4, the current time, and the type's
    /// name and version.
    pub fn new(source: impl Into<String>, payload: E) -> Self {
        Self::from_parts(
            Uuid::new_v4(),
            Cow::Borrowed(E::TYPE),
            now(),
            source.into(),
            Cow::Borrowed(E::VERSION),
            payload,
            Headers::new(),
        )
    }
}

impl EventEnvelope<serde_json::Value> {
    /// An untyped envelope, for tools that forward events they do not know
    /// (a dead-letter browser, a bridge). Typed code uses
    /// [`EventEnvelope::new`].
    pub fn untyped(
        event_type: impl Into<String>,
        version: impl Into<String>,
        source: impl Into<String>,
        payload: serde_json::Value,
    ) -> Self {
        Self::from_parts(
            Uuid::new_v4(),
            Cow::Owned(event_type.into()),
            now(),
            source.into(),
            Cow::Owned(version.into()),
            payload,
            Headers::new(),
        )
    }
}

impl EventEnvelope<serde_json::Value> {
    /// The envelope with `upcast`'s payload at `version`; the rest kept.
    pub(crate) fn upcast_payload(
        mut self,
        version: &str,
        upcast: &(dyn Fn(serde_json::Value) -> Result<serde_json::Value, String> + Send + Sync),
    ) -> Result<Self, String> {
        self.payload = upcast(self.payload)?;
        self.version = Cow::Owned(version.to_owned());
        Ok(self)
    }

    /// The typed envelope of this one's payload, once `E` accepts its
    /// event type and version.
    pub(crate) fn into_typed<E: Event>(self) -> Result<EventEnvelope<E>, crate::DecodeError> {
        let (event_type, version) = E::accept(&self.event_type, &self.version)?;
        let payload = serde_path_to_error::deserialize::<_, E>(self.payload).map_err(|error| {
            crate::DecodeError::BadPayload {
                event_type: E::TYPE,
                reason: crate::codec::quoted(&error.to_string()),
            }
        })?;
        Ok(EventEnvelope::from_parts(
            self.event_id,
            event_type,
            self.timestamp,
            self.source,
            version,
            payload,
            self.headers,
        ))
    }
}

impl<T> EventEnvelope<T> {
    pub(crate) fn from_parts(
        event_id: Uuid,
        event_type: Cow<'static, str>,
        timestamp: DateTime<Utc>,
        source: String,
        version: Cow<'static, str>,
        payload: T,
        headers: Headers,
    ) -> Self {
        Self {
            event_id,
            event_type,
            timestamp,
            source,
            version,
            payload,
            headers,
        }
    }

    /// Replaces the generated id, for a publisher that must re-send an event
    /// under the id it had (an outbox, a redrive tool).
    pub fn with_event_id(mut self, event_id: Uuid) -> Self {
        self.event_id = event_id;
        self
    }

    /// Adds or replaces one header.
    pub fn with_header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.insert(name.into(), value.into());
        self
    }

    /// The unique id consumers deduplicate on.
    pub fn event_id(&self) -> Uuid {
        self.event_id
    }

    /// The event name, such as `"trade.executed"`.
    pub fn event_type(&self) -> &str {
        &self.event_type
    }

    /// When the event was created, in UTC.
    pub fn timestamp(&self) -> DateTime<Utc> {
        self.timestamp
    }

    /// The service that created the event, such as `"trading-service"`.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// The schema version of the payload, `"MAJOR.MINOR"`.
    pub fn version(&self) -> &str {
        &self.version
    }

    /// The payload.
    pub fn payload(&self) -> &T {
        &self.payload
    }

    /// Takes the payload out.
    pub fn into_payload(self) -> T {
        self.payload
    }

    /// The headers (empty unless set).
    pub fn headers(&self) -> &Headers {
        &self.headers
    }

    /// The headers, to add trace context or correlation ids.
    pub fn headers_mut(&mut self) -> &mut Headers {
        &mut self.headers
    }
}

/// A payload type an [`EventEnvelope`] deserializes with, and what it
/// checks of the envelope's name and version: every [`Event`] (the
/// document must name [`Event::TYPE`] and a version of the same major as
/// [`Event::VERSION`]; the minor version sent is kept) and
/// `serde_json::Value` (any event type, any `MAJOR.MINOR` version).
///
/// ```
/// # use serde::{Deserialize, Serialize};
/// # #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
/// # struct UserRegistered { user_id: String }
/// # impl switchboard::Event for UserRegistered {
/// #     const TYPE: &'static str = "user.registered";
/// #     const VERSION: &'static str = "1.0";
/// # }
/// use switchboard::EventEnvelope;
///
/// let document = r#"{"event_id":"6f1c0f4e-8a3b-4c1d-9e2f-0a1b2c3d4e5f",
///     "event_type":"user.registered","timestamp":"2026-02-19T12:00:00Z",
///     "source":"auth-service","version":"1.3","payload":{"user_id":"42"}}"#;
/// let typed: EventEnvelope<UserRegistered> = serde_json::from_str(document)?;
/// assert_eq!(typed.version(), "1.3");
/// let any: EventEnvelope<serde_json::Value> = serde_json::from_str(document)?;
/// assert_eq!(any.event_type(), "user.registered");
///
/// let other = document.replace("user.registered", "order.created");
/// let refused = serde_json::from_str::<EventEnvelope<UserRegistered>>(&other).unwrap_err();
/// assert!(refused.to_string().contains("order.created"), "{refused}");
/// # Ok::<(), serde_json::Error>(())
/// ```
pub trait EnvelopePayload: DeserializeOwned + sealed::Sealed {
    /// The envelope's event type and version to keep, or why a document
    /// naming `event_type` at `version` is not an envelope of this payload.
    #[doc(hidden)]
    fn accept(
        event_type: &str,
        version: &str,
    ) -> Result<(Cow<'static, str>, Cow<'static, str>), crate::DecodeError>;
}

impl<E: Event> EnvelopePayload for E {
    fn accept(
        event_type: &str,
        version: &str,
    ) -> Result<(Cow<'static, str>, Cow<'static, str>), crate::DecodeError> {
        crate::codec::check_type_and_version::<E>(event_type, version)?;
        // Keep the minor version the producer sent; borrow the consumer's
        // own text when it is the same.
        let version = if version == E::VERSION {
            Cow::Borrowed(E::VERSION)
        } else {
            Cow::Owned(version.to_owned())
        };
        Ok((Cow::Borrowed(E::TYPE), version))
    }
}

impl EnvelopePayload for serde_json::Value {
    fn accept(
        event_type: &str,
        version: &str,
    ) -> Result<(Cow<'static, str>, Cow<'static, str>), crate::DecodeError> {
        if major_version(version).is_none() {
            return Err(crate::DecodeError::BadVersion {
                value: crate::codec::quoted(version),
            });
        }
        Ok((
            Cow::Owned(event_type.to_owned()),
            Cow::Owned(version.to_owned()),
        ))
    }
}

mod sealed {
    /// Only the crate's two kinds of payload check envelopes.
    pub trait Sealed {}
    impl<E: super::Event> Sealed for E {}
    impl Sealed for serde_json::Value {}
}

/// The major part of a `"MAJOR.MINOR"` version, or `None` when the text is
/// not of that form.
pub(crate) fn major_version(version: &str) -> Option<u64> {
    // One pass over the bytes: this runs on every message decoded.
    let (mut major, mut in_major, mut part_len) = (0_u64, true, 0_usize);
    for &byte in version.as_bytes() {
        if byte == b'.' {
            if part_len == 0 {
                return None;
            }
            (in_major, part_len) = (false, 0);
            continue;
        }
        if !byte.is_ascii_digit() {
            return None;
        }
        if in_major {
            major = major.checked_mul(10)?.checked_add(u64::from(byte - b'0'))?;
        }
        part_len += 1;
    }
    (part_len > 0).then_some(major)
}

/// The current time at the precision the wire format keeps, so that an
/// envelope compares equal to itself after a round trip.
fn now() -> DateTime<Utc> {
    Utc::now().trunc_subsecs(6)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn major_version_reads_digits_only() {
        assert_eq!(major_version("1.0"), Some(1));
        assert_eq!(major_version("12.3.4"), Some(12));
        assert_eq!(major_version("2"), Some(2));
        assert_eq!(major_version("01.0"), Some(1));
        for bad in [
            "",
            "1.",
            ".1",
            "v1.0",
            "1.x",
            "1 .0",
            "-1.0",
            "1..0",
            "1.0.",
            "99999999999999999999.0",
        ] {
            assert_eq!(major_version(bad), None, "{bad:?}");
        }
    }
}
