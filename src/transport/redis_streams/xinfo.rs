//! Reading `XINFO` replies, which come as a map in RESP3 and as a flat list
//! of field/value pairs in RESP2.

use redis::Value;

/// The field/value pairs of an `XINFO` entry.
pub(super) fn pairs(info: &Value) -> Vec<(String, &Value)> {
    match info {
        Value::Map(pairs) => pairs
            .iter()
            .filter_map(|(k, v)| Some((text(k)?, v)))
            .collect(),
        Value::Array(items) => items
            .chunks(2)
            .filter_map(|p| Some((text(p.first()?)?, p.get(1)?)))
            .collect(),
        _ => Vec::new(),
    }
}

/// A bulk or simple string as text.
pub(super) fn text(value: &Value) -> Option<String> {
    match value {
        Value::BulkString(bytes) => Some(String::from_utf8_lossy(bytes).into_owned()),
        Value::SimpleString(text) => Some(text.clone()),
        _ => None,
    }
}

/// A non-negative integer.
pub(super) fn int(value: &Value) -> Option<u64> {
    match value {
        Value::Int(n) => u64::try_from(*n).ok(),
        _ => None,
    }
}
