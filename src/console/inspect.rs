//! One dead letter in full — its facts, headers and envelope — with long
//! payload values cut, so inspecting a letter neither floods the page nor
//! shows more of a customer's data than a diagnosis needs.

use std::collections::BTreeMap;

use serde::Serialize;
use serde_json::Value;

use super::view::LetterView;
use crate::transport::DeadLettered;

/// The most characters of one string value shown.
pub(super) const VALUE_LIMIT: usize = 120;
/// The most items of one array or object shown.
const ITEMS_LIMIT: usize = 20;
/// How deep the envelope is shown.
const DEPTH_LIMIT: usize = 6;
/// The most bytes of a body that is not JSON shown.
const RAW_LIMIT: usize = 512;

/// `GET api/dead-letters/{topic}/{id}`.
#[derive(Debug, Clone, Serialize)]
pub(super) struct LetterDetail {
    #[serde(flatten)]
    pub(super) letter: LetterView,
    pub(super) headers: BTreeMap<String, String>,
    pub(super) body_bytes: usize,
    /// The envelope as JSON with long values cut, or the start of a body
    /// that is not JSON as text.
    pub(super) envelope: Value,
}

impl From<&DeadLettered> for LetterDetail {
    fn from(letter: &DeadLettered) -> Self {
        let body = &letter.message.body;
        let envelope = match serde_json::from_slice::<Value>(body) {
            Ok(value) => truncate(value, 0),
            Err(_) => {
                let shown = &body[..body.len().min(RAW_LIMIT)];
                Value::String(cut(String::from_utf8_lossy(shown).into_owned(), RAW_LIMIT))
            }
        };
        Self {
            letter: LetterView::from(letter),
            headers: letter
                .message
                .headers
                .iter()
                .map(|(name, value)| (name.clone(), cut(value.clone(), VALUE_LIMIT)))
                .collect(),
            body_bytes: body.len(),
            envelope,
        }
    }
}

fn cut(text: String, limit: usize) -> String {
    match text.char_indices().nth(limit) {
        None => text,
        Some((end, _)) => format!("{}… ({} chars)", &text[..end], text.chars().count()),
    }
}

/// `value` with strings cut to [`VALUE_LIMIT`] characters, arrays and
/// objects to [`ITEMS_LIMIT`] items, and nothing deeper than
/// [`DEPTH_LIMIT`].
pub(super) fn truncate(value: Value, depth: usize) -> Value {
    if depth >= DEPTH_LIMIT && matches!(value, Value::Array(_) | Value::Object(_)) {
        return Value::String("…".to_owned());
    }
    match value {
        Value::String(text) => Value::String(cut(text, VALUE_LIMIT)),
        Value::Array(items) => {
            let total = items.len();
            let mut shown: Vec<Value> = items
                .into_iter()
                .take(ITEMS_LIMIT)
                .map(|item| truncate(item, depth + 1))
                .collect();
            if total > ITEMS_LIMIT {
                shown.push(Value::String(format!("… {} more", total - ITEMS_LIMIT)));
            }
            Value::Array(shown)
        }
        Value::Object(fields) => {
            let total = fields.len();
            let mut shown: serde_json::Map<String, Value> = fields
                .into_iter()
                .take(ITEMS_LIMIT)
                .map(|(name, item)| (name, truncate(item, depth + 1)))
                .collect();
            if total > ITEMS_LIMIT {
                shown.insert(
                    "…".to_owned(),
                    Value::String(format!("{} more fields", total - ITEMS_LIMIT)),
                );
            }
            Value::Object(shown)
        }
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_values_are_cut_and_short_ones_kept() {
        let value = serde_json::json!({
            "id": "a1",
            "payload": { "note": "x".repeat(10_000), "items": (0..100).collect::<Vec<_>>() }
        });
        let shown = truncate(value, 0);
        assert_eq!(shown["id"], "a1");
        let note = shown["payload"]["note"].as_str().unwrap();
        assert!(note.chars().count() < VALUE_LIMIT + 30, "{note}");
        assert!(note.contains("10000 chars"), "{note}");
        assert_eq!(
            shown["payload"]["items"].as_array().unwrap().len(),
            ITEMS_LIMIT + 1
        );
    }
}
