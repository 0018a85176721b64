//! How a message is laid out in a stream entry's fields, both ways.

use std::collections::HashMap;

use bytes::Bytes;
use redis::{Cmd, Value};

use super::{FIELD_ENVELOPE, FIELD_EVENT_ID, FIELD_EVENT_TYPE, HEADER_FIELD_PREFIX};
use crate::envelope::Headers;
use crate::transport::{RawMessage, header};

/// Appends the fields of `message` to an `XADD`.
pub(super) fn append_message_fields(cmd: &mut Cmd, message: &RawMessage) {
    cmd.arg(FIELD_ENVELOPE).arg(message.body.as_ref());
    let event_id = message.headers.get(header::EVENT_ID);
    let event_type = message.headers.get(header::EVENT_TYPE);
    if let (Some(event_id), Some(event_type)) = (event_id, event_type) {
        cmd.arg(FIELD_EVENT_TYPE).arg(event_type);
        cmd.arg(FIELD_EVENT_ID).arg(event_id);
    } else {
        // A raw publish without the bus's headers: take them from the body
        // when it is an envelope, so XRANGE still shows them.
        let found = envelope_ids(&message.body);
        if let Some(event_type) = event_type.cloned().or(found.event_type) {
            cmd.arg(FIELD_EVENT_TYPE).arg(event_type);
        }
        if let Some(event_id) = event_id.cloned().or(found.event_id) {
            cmd.arg(FIELD_EVENT_ID).arg(event_id);
        }
    }
    for (name, value) in &message.headers {
        if name != header::EVENT_ID && name != header::EVENT_TYPE {
            cmd.arg(format!("{HEADER_FIELD_PREFIX}{name}")).arg(value);
        }
    }
}

#[derive(Default, serde::Deserialize)]
struct EnvelopeIds {
    event_id: Option<String>,
    event_type: Option<String>,
}

fn envelope_ids(body: &[u8]) -> EnvelopeIds {
    serde_json::from_slice(body).unwrap_or_default()
}

/// The message an entry carries, and why it cannot be handed out when it
/// cannot (no `envelope` field).
pub(super) fn message_from_fields(map: HashMap<String, Value>) -> (RawMessage, Option<String>) {
    let mut problem = None;
    if !map.contains_key(FIELD_ENVELOPE) {
        let mut fields: Vec<&str> = map.keys().map(String::as_str).collect();
        fields.sort_unstable();
        problem = Some(format!(
            "stream entry has no `{FIELD_ENVELOPE}` field (fields: {})",
            fields.join(", ")
        ));
    }
    let mut headers = Headers::new();
    let mut body = Bytes::new();
    // Every value and field name is moved, not copied: the hot path of
    // every delivery. A field name becomes its header name in place.
    for (mut field, value) in map {
        match field.as_str() {
            FIELD_ENVELOPE => body = value_into_bytes(value).unwrap_or_default(),
            FIELD_EVENT_ID => {
                if let Some(text) = value_into_text(value) {
                    headers.insert(renamed(field, header::EVENT_ID), text);
                }
            }
            FIELD_EVENT_TYPE => {
                if let Some(text) = value_into_text(value) {
                    headers.insert(renamed(field, header::EVENT_TYPE), text);
                }
            }
            other => {
                if other.starts_with(HEADER_FIELD_PREFIX)
                    && let Some(text) = value_into_text(value)
                {
                    field.drain(..HEADER_FIELD_PREFIX.len());
                    headers.insert(field, text);
                }
            }
        }
    }
    (RawMessage { headers, body }, problem)
}

/// `name` in the buffer of `field` (which holds at least as many bytes).
fn renamed(mut field: String, name: &str) -> String {
    field.clear();
    field.push_str(name);
    field
}

/// The text of `value`, its bytes moved when they are UTF-8.
fn value_into_text(value: Value) -> Option<String> {
    match value {
        Value::BulkString(bytes) => Some(
            String::from_utf8(bytes)
                .unwrap_or_else(|error| String::from_utf8_lossy(error.as_bytes()).into_owned()),
        ),
        Value::SimpleString(text) => Some(text),
        other => value_text(&other),
    }
}

fn value_into_bytes(value: Value) -> Option<Bytes> {
    match value {
        Value::BulkString(bytes) => Some(Bytes::from(bytes)),
        other => value_bytes(&other),
    }
}

fn value_bytes(value: &Value) -> Option<Bytes> {
    match value {
        Value::BulkString(bytes) => Some(Bytes::copy_from_slice(bytes)),
        Value::SimpleString(text) => Some(Bytes::copy_from_slice(text.as_bytes())),
        Value::Int(n) => Some(Bytes::from(n.to_string())),
        _ => None,
    }
}

pub(super) fn value_text(value: &Value) -> Option<String> {
    value_bytes(value).map(|bytes| String::from_utf8_lossy(&bytes).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_entry_without_envelope_is_a_problem_naming_its_fields() {
        let mut map = HashMap::new();
        map.insert("payload".to_owned(), Value::BulkString(b"x".to_vec()));
        map.insert("h:trace".to_owned(), Value::BulkString(b"7".to_vec()));
        map.insert("h:odd".to_owned(), Value::BulkString(b"\xff!".to_vec()));
        map.insert("h:count".to_owned(), Value::Int(3));
        let (message, problem) = message_from_fields(map);
        assert_eq!(message.headers["trace"], "7");
        assert_eq!(
            message.headers["odd"], "\u{fffd}!",
            "invalid UTF-8 is replaced"
        );
        assert_eq!(message.headers["count"], "3");
        assert_eq!(message.headers.len(), 3, "{:?}", message.headers);
        let problem = problem.expect("a problem");
        assert!(problem.contains("no `envelope` field"), "{problem}");
        assert!(problem.contains("payload"), "{problem}");
    }

    #[test]
    fn fields_round_trip_headers() {
        let message = RawMessage::new(r#"{"event_id":"e-1","event_type":"t.x"}"#)
            .with_header("note", "a b;c");
        let mut cmd = redis::cmd("XADD");
        append_message_fields(&mut cmd, &message);
        let args: Vec<String> = cmd
            .args_iter()
            .map(|arg| match arg {
                redis::Arg::Simple(bytes) => String::from_utf8_lossy(bytes).into_owned(),
                _ => String::new(),
            })
            .collect();
        let mut map = HashMap::new();
        for pair in args[1..].chunks(2) {
            map.insert(
                pair[0].clone(),
                Value::BulkString(pair[1].clone().into_bytes()),
            );
        }
        let (back, problem) = message_from_fields(map);
        assert!(problem.is_none());
        assert_eq!(back.body, message.body);
        assert_eq!(back.headers["note"], "a b;c");
        assert_eq!(back.headers[header::EVENT_ID], "e-1");
        assert_eq!(back.headers[header::EVENT_TYPE], "t.x");
    }
}
