//! Stream entries taken straight from a reply's [`Value`], for the read
//! every delivery goes through. redis-rs's `StreamReadReply` first parses
//! a deep copy of the whole reply (to try a second layout when the first
//! fails) and builds a `HashMap` of `String`s per entry; here the reply is
//! walked once and every id, name and value is moved out of it.

use redis::streams::StreamId;
use redis::{FromRedisValue, ParsingError, Value};

/// One stream entry: its id, and its fields in the order Redis sent them,
/// each name as the bytes Redis sent.
#[derive(Debug, Default, PartialEq)]
pub(super) struct StreamEntry {
    pub(super) id: String,
    pub(super) fields: Vec<(Vec<u8>, Value)>,
}

impl StreamEntry {
    /// The value of field `name`, if the entry has it.
    pub(super) fn field(&self, name: &str) -> Option<&Value> {
        self.fields
            .iter()
            .find(|(field, _)| field == name.as_bytes())
            .map(|(_, value)| value)
    }
}

/// For the paths that parse with redis-rs's own reply types (claims, the
/// dead-letter stream): rare enough that its `HashMap` does not matter.
impl From<StreamId> for StreamEntry {
    fn from(entry: StreamId) -> Self {
        Self {
            id: entry.id,
            fields: entry
                .map
                .into_iter()
                .map(|(name, value)| (name.into_bytes(), value))
                .collect(),
        }
    }
}

/// The entries of an `XREADGROUP` reply, of every stream it names (the
/// consumer reads one). A read that timed out replies nil: read it as
/// `Option<ReadEntries>`.
#[derive(Debug, Default, PartialEq)]
pub(super) struct ReadEntries(pub(super) Vec<StreamEntry>);

impl FromRedisValue for ReadEntries {
    fn from_redis_value(value: Value) -> Result<Self, ParsingError> {
        let mut entries = Vec::new();
        // RESP2: `[[stream, [entry, ...]], ...]`; RESP3: `{stream: [entry, ...]}`.
        match value {
            Value::Array(streams) => {
                for stream in streams {
                    let Value::Array(pair) = stream else {
                        return Err(unexpected("a [stream, entries] pair", &stream));
                    };
                    let Some(listed) = pair.into_iter().nth(1) else {
                        return Err("a stream without its entries".to_owned().into());
                    };
                    push_entries(listed, &mut entries)?;
                }
            }
            Value::Map(streams) => {
                for (_, listed) in streams {
                    push_entries(listed, &mut entries)?;
                }
            }
            Value::Nil => {}
            other => return Err(unexpected("the streams of a read", &other)),
        }
        Ok(Self(entries))
    }
}

/// Appends the entries of one stream: each `[id, [name, value, ...]]` (a
/// read with `CLAIM` adds two elements after the fields, ignored here). The
/// fields of an entry deleted while pending are nil: no fields.
fn push_entries(listed: Value, entries: &mut Vec<StreamEntry>) -> Result<(), ParsingError> {
    let Value::Array(listed) = listed else {
        return Err(unexpected("a list of entries", &listed));
    };
    entries.reserve(listed.len());
    for entry in listed {
        let Value::Array(parts) = entry else {
            return Err(unexpected("an [id, fields] entry", &entry));
        };
        let mut parts = parts.into_iter();
        let id = match parts.next() {
            Some(Value::BulkString(bytes)) => String::from_utf8(bytes)?,
            Some(Value::SimpleString(text)) => text,
            other => return Err(unexpected("an entry id", &other.unwrap_or(Value::Nil))),
        };
        let fields = match parts.next() {
            Some(Value::Array(flat)) => pairs(flat)?,
            Some(Value::Map(map)) => map
                .into_iter()
                .map(|(name, value)| Ok((name_bytes(name)?, value)))
                .collect::<Result<_, ParsingError>>()?,
            Some(Value::Nil) | None => Vec::new(),
            Some(other) => return Err(unexpected("an entry's fields", &other)),
        };
        entries.push(StreamEntry { id, fields });
    }
    Ok(())
}

/// `[name, value, name, value, ...]` as pairs.
fn pairs(flat: Vec<Value>) -> Result<Vec<(Vec<u8>, Value)>, ParsingError> {
    if !flat.len().is_multiple_of(2) {
        return Err(format!("{} field names and values: not pairs", flat.len()).into());
    }
    let mut fields = Vec::with_capacity(flat.len() / 2);
    let mut flat = flat.into_iter();
    while let (Some(name), Some(value)) = (flat.next(), flat.next()) {
        fields.push((name_bytes(name)?, value));
    }
    Ok(fields)
}

fn name_bytes(name: Value) -> Result<Vec<u8>, ParsingError> {
    match name {
        Value::BulkString(bytes) => Ok(bytes),
        Value::SimpleString(text) => Ok(text.into_bytes()),
        other => Err(unexpected("a field name", &other)),
    }
}

fn unexpected(wanted: &str, found: &Value) -> ParsingError {
    format!("stream read reply: expected {wanted}, found {found:?}").into()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bulk(text: &str) -> Value {
        Value::BulkString(text.as_bytes().to_vec())
    }

    fn entry(id: &str, fields: &[(&str, &str)]) -> Value {
        let flat = fields
            .iter()
            .flat_map(|(name, value)| [bulk(name), bulk(value)])
            .collect();
        Value::Array(vec![bulk(id), Value::Array(flat)])
    }

    fn expected(id: &str, fields: &[(&str, &str)]) -> StreamEntry {
        StreamEntry {
            id: id.to_owned(),
            fields: fields
                .iter()
                .map(|(name, value)| (name.as_bytes().to_vec(), bulk(value)))
                .collect(),
        }
    }

    #[test]
    fn reads_the_resp2_layout_in_order() {
        let reply = Value::Array(vec![Value::Array(vec![
            bulk("s"),
            Value::Array(vec![
                entry("1-0", &[("envelope", "{}"), ("h:a", "1")]),
                entry("2-0", &[("envelope", "[]")]),
            ]),
        ])]);
        let ReadEntries(entries) = ReadEntries::from_redis_value(reply).unwrap();
        assert_eq!(
            entries,
            [
                expected("1-0", &[("envelope", "{}"), ("h:a", "1")]),
                expected("2-0", &[("envelope", "[]")]),
            ]
        );
        assert_eq!(entries[0].field("h:a"), Some(&bulk("1")));
        assert_eq!(entries[0].field("h:b"), None);
    }

    #[test]
    fn reads_the_resp3_layout_and_claim_extras() {
        let mut claimed = entry("3-0", &[("envelope", "{}")]);
        if let Value::Array(parts) = &mut claimed {
            parts.extend([Value::Int(1500), Value::Int(2)]);
        }
        let reply = Value::Map(vec![(bulk("s"), Value::Array(vec![claimed]))]);
        let ReadEntries(entries) = ReadEntries::from_redis_value(reply).unwrap();
        assert_eq!(entries, [expected("3-0", &[("envelope", "{}")])]);
    }

    #[test]
    fn a_deleted_entry_has_no_fields_and_a_timeout_no_entries() {
        let reply = Value::Array(vec![Value::Array(vec![
            bulk("s"),
            Value::Array(vec![Value::Array(vec![bulk("4-0"), Value::Nil])]),
        ])]);
        let ReadEntries(entries) = ReadEntries::from_redis_value(reply).unwrap();
        assert_eq!(entries, [expected("4-0", &[])]);
        let timed_out: Option<ReadEntries> = redis::from_redis_value(Value::Nil).unwrap();
        assert_eq!(timed_out, None);
    }

    #[test]
    fn a_malformed_reply_is_an_error_saying_what_was_expected() {
        let odd = Value::Array(vec![Value::Array(vec![
            bulk("s"),
            Value::Array(vec![Value::Array(vec![
                bulk("5-0"),
                Value::Array(vec![bulk("envelope")]),
            ])]),
        ])]);
        let error = ReadEntries::from_redis_value(odd).unwrap_err().to_string();
        assert!(error.contains("not pairs"), "{error}");
        let error = ReadEntries::from_redis_value(Value::Int(3))
            .unwrap_err()
            .to_string();
        assert!(error.contains("expected the streams of a read"), "{error}");
    }

    #[test]
    fn an_entry_from_redis_rs_keeps_its_fields() {
        let mut map = std::collections::HashMap::new();
        map.insert("envelope".to_owned(), bulk("{}"));
        let entry = StreamEntry::from(StreamId {
            id: "6-0".to_owned(),
            map,
            ..StreamId::default()
        });
        assert_eq!(entry, expected("6-0", &[("envelope", "{}")]));
    }
}
