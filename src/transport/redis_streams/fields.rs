//! How a message is laid out in a stream entry's fields, both ways.

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
pub(super) fn message_from_fields(fields: Vec<(Vec<u8>, Value)>) -> (RawMessage, Option<String>) {
    let mut problem = None;
    if !fields
        .iter()
        .any(|(name, _)| name == FIELD_ENVELOPE.as_bytes())
    {
        let mut names: Vec<String> = fields
            .iter()
            .map(|(name, _)| String::from_utf8_lossy(name).into_owned())
            .collect();
        names.sort_unstable();
        problem = Some(format!(
            "stream entry has no `{FIELD_ENVELOPE}` field (fields: {})",
            names.join(", ")
        ));
    }
    let mut headers = Headers::new();
    let mut body = Bytes::new();
    // Every value and field name is moved, not copied: the hot path of
    // every delivery. A field name becomes its header name in place.
    for (mut field, value) in fields {
        match field.as_slice() {
            name if name == FIELD_ENVELOPE.as_bytes() => {
                body = value_into_bytes(value).unwrap_or_default()
            }
            name if name == FIELD_EVENT_ID.as_bytes() => {
                if let Some(text) = value_into_text(value) {
                    headers.insert(renamed(field, header::EVENT_ID), text);
                }
            }
            name if name == FIELD_EVENT_TYPE.as_bytes() => {
                if let Some(text) = value_into_text(value) {
                    headers.insert(renamed(field, header::EVENT_TYPE), text);
                }
            }
            name => {
                if name.starts_with(HEADER_FIELD_PREFIX.as_bytes())
                    && let Some(text) = value_into_text(value)
                {
                    field.drain(..HEADER_FIELD_PREFIX.len());
                    headers.insert(text_of(field), text);
                }
            }
        }
    }
    (RawMessage { headers, body }, problem)
}

/// `name` in the buffer of `field`.
fn renamed(mut field: Vec<u8>, name: &str) -> String {
    field.clear();
    let mut renamed = text_of(field);
    renamed.push_str(name);
    renamed
}

/// `bytes` as text, moved when they are UTF-8 (invalid sequences replaced).
fn text_of(bytes: Vec<u8>) -> String {
    String::from_utf8(bytes)
        .unwrap_or_else(|error| String::from_utf8_lossy(error.as_bytes()).into_owned())
}

/// The text of `value`, its bytes moved when they are UTF-8.
fn value_into_text(value: Value) -> Option<String> {
    match value {
        Value::BulkString(bytes) => Some(text_of(bytes)),
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
        let fields = vec![
            (b"payload".to_vec(), Value::BulkString(b"x".to_vec())),
            (b"h:trace".to_vec(), Value::BulkString(b"7".to_vec())),
            (b"h:odd".to_vec(), Value::BulkString(b"\xff!".to_vec())),
            (b"h:count".to_vec(), Value::Int(3)),
            (b"h:\xfe".to_vec(), Value::BulkString(b"name".to_vec())),
        ];
        let (message, problem) = message_from_fields(fields);
        assert_eq!(message.headers["trace"], "7");
        assert_eq!(
            message.headers["odd"], "\u{fffd}!",
            "invalid UTF-8 is replaced"
        );
        assert_eq!(message.headers["count"], "3");
        assert_eq!(
            message.headers["\u{fffd}"], "name",
            "an invalid header name is replaced too"
        );
        assert_eq!(message.headers.len(), 4, "{:?}", message.headers);
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
        let fields = args[1..]
            .chunks(2)
            .map(|pair| {
                (
                    pair[0].clone().into_bytes(),
                    Value::BulkString(pair[1].clone().into_bytes()),
                )
            })
            .collect();
        let (back, problem) = message_from_fields(fields);
        assert!(problem.is_none());
        assert_eq!(back.body, message.body);
        assert_eq!(back.headers["note"], "a b;c");
        assert_eq!(back.headers[header::EVENT_ID], "e-1");
        assert_eq!(back.headers[header::EVENT_TYPE], "t.x");
    }
}
