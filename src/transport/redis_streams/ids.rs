//! Stream entry ids as numbers: what a subscription holds and acks is kept
//! as `(ms, seq)` pairs rather than strings, so holding and acking an entry
//! copies no id, and a batch's id range costs no parsing beyond the first.

use std::collections::HashSet;
use std::fmt::Write as _;

/// An entry id `<ms>-<seq>` as Redis writes it (decimal, no leading zeros),
/// or — never seen from Redis, kept for safety — any other text.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(super) enum EntryId {
    Parsed(u64, u64),
    Text(String),
}

impl EntryId {
    /// `id` as numbers when it is in Redis's own form, else as text.
    pub(super) fn of(id: &str) -> Self {
        parse(id).map_or_else(
            || Self::Text(id.to_owned()),
            |(ms, seq)| Self::Parsed(ms, seq),
        )
    }

    /// Appends the id as Redis writes it to `out`.
    pub(super) fn write_to(&self, out: &mut String) {
        match self {
            Self::Parsed(ms, seq) => {
                let _ = write!(out, "{ms}-{seq}");
            }
            Self::Text(text) => out.push_str(text),
        }
    }

    /// The id as Redis writes it.
    pub(super) fn text(&self) -> String {
        let mut out = String::new();
        self.write_to(&mut out);
        out
    }
}

/// `<ms>-<seq>`, both decimal without a sign or leading zeros (so the
/// numbers written back give the same text).
fn parse(id: &str) -> Option<(u64, u64)> {
    let (ms, seq) = id.split_once('-')?;
    Some((number(ms)?, number(seq)?))
}

fn number(digits: &str) -> Option<u64> {
    let bytes = digits.as_bytes();
    let canonical = !bytes.is_empty()
        && bytes.iter().all(u8::is_ascii_digit)
        && (bytes.len() == 1 || bytes[0] != b'0');
    if canonical { digits.parse().ok() } else { None }
}

/// The lowest and the highest of `ids` in stream order, as range bounds for
/// `XPENDING`; the whole stream (`-`, `+`) when an id is not in Redis's form.
pub(super) fn id_range(ids: &[EntryId]) -> Option<(EntryId, EntryId)> {
    let mut lowest = ids.first()?;
    let mut highest = lowest;
    for id in ids {
        if matches!(id, EntryId::Text(_)) {
            return Some((EntryId::Text("-".to_owned()), EntryId::Text("+".to_owned())));
        }
        if id < lowest {
            lowest = id;
        } else if id > highest {
            highest = id;
        }
    }
    Some((lowest.clone(), highest.clone()))
}

/// The ids a subscription holds (read, handed out, or waiting out a nack),
/// whose leases the keeper renews.
#[derive(Debug, Default)]
pub(super) struct HeldIds(HashSet<EntryId>);

impl HeldIds {
    pub(super) fn insert(&mut self, id: &str) {
        self.0.insert(EntryId::of(id));
    }

    /// Whether `id` was held.
    pub(super) fn remove(&mut self, id: &str) -> bool {
        match parse(id) {
            Some((ms, seq)) => self.0.remove(&EntryId::Parsed(ms, seq)),
            None => self.0.remove(&EntryId::Text(id.to_owned())),
        }
    }

    /// Whether `id` was held.
    pub(super) fn remove_id(&mut self, id: &EntryId) -> bool {
        self.0.remove(id)
    }

    pub(super) fn len(&self) -> usize {
        self.0.len()
    }

    /// Every id held, as Redis writes them.
    pub(super) fn texts(&self) -> Vec<String> {
        self.0.iter().map(EntryId::text).collect()
    }
}

/// Orders stream ids (`<ms>-<seq>`) numerically.
pub(super) fn stream_id_order(id: &str) -> (u64, u64) {
    let (ms, seq) = id.split_once('-').unwrap_or((id, "0"));
    (ms.parse().unwrap_or(0), seq.parse().unwrap_or(0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_ids_order_numerically() {
        assert!(stream_id_order("9-1") < stream_id_order("10-0"));
        assert!(stream_id_order("10-2") < stream_id_order("10-10"));
        assert!(EntryId::of("9-1") < EntryId::of("10-0"));
        assert!(EntryId::of("10-2") < EntryId::of("10-10"));
    }

    #[test]
    fn ids_round_trip_and_odd_ones_stay_text() {
        for id in [
            "0-0",
            "1700000000000-0",
            "10-10",
            &format!("{}-{}", u64::MAX, u64::MAX),
        ] {
            assert_eq!(EntryId::of(id).text(), id);
            assert!(matches!(EntryId::of(id), EntryId::Parsed(..)), "{id}");
        }
        for odd in ["01-1", "1-+1", "+1-1", "1", "a-b", "-", "1-"] {
            assert_eq!(EntryId::of(odd), EntryId::Text(odd.to_owned()), "{odd}");
        }
    }

    #[test]
    fn a_batch_range_spans_its_ids_in_stream_order() {
        let ids: Vec<EntryId> = ["10-10", "9-1", "10-2"].map(EntryId::of).to_vec();
        let (low, high) = id_range(&ids).expect("a range");
        assert_eq!(
            (low.text(), high.text()),
            ("9-1".to_owned(), "10-10".to_owned())
        );
        let odd = [EntryId::of("9-1"), EntryId::of("x")];
        let (low, high) = id_range(&odd).expect("a range");
        assert_eq!((low.text(), high.text()), ("-".to_owned(), "+".to_owned()));
        assert_eq!(id_range(&[]), None);
    }

    #[test]
    fn held_ids_are_found_by_their_text() {
        let mut held = HeldIds::default();
        held.insert("5-1");
        held.insert("odd");
        assert_eq!(held.len(), 2);
        assert!(held.remove("5-1"));
        assert!(!held.remove("5-1"));
        assert!(held.remove_id(&EntryId::of("odd")));
        assert_eq!(held.texts(), Vec::<String>::new());
    }
}
