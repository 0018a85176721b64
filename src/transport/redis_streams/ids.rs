//! Stream entry ids as numbers: what a subscription holds and acks is kept
//! as `(ms, seq)` pairs rather than strings, parsed once when the entry is
//! read, so holding and acking an entry copies no id and a batch's id range
//! costs no parsing.

use std::collections::HashSet;
use std::hash::{BuildHasherDefault, Hasher};

/// An entry id `<ms>-<seq>` as Redis writes it (decimal, no leading zeros),
/// or — never seen from Redis, kept for safety — any other text.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(super) enum EntryId {
    Parsed(u64, u64),
    Text(String),
}

/// The most bytes an id in Redis's form takes: two `u64`s and a dash.
const MAX_ID_LEN: usize = 41;

impl EntryId {
    /// `id` as numbers when it is in Redis's own form, else as text.
    pub(super) fn of(id: &str) -> Self {
        parse(id).map_or_else(
            || Self::Text(id.to_owned()),
            |(ms, seq)| Self::Parsed(ms, seq),
        )
    }

    /// Calls `with` on the id as Redis writes it, written on the stack.
    pub(super) fn with_bytes<R>(&self, with: impl FnOnce(&[u8]) -> R) -> R {
        match self {
            Self::Parsed(ms, seq) => {
                let mut buffer = [0_u8; MAX_ID_LEN];
                let mut end = MAX_ID_LEN;
                end = write_digits(&mut buffer[..end], *seq);
                end -= 1;
                buffer[end] = b'-';
                let start = write_digits(&mut buffer[..end], *ms);
                with(&buffer[start..])
            }
            Self::Text(text) => with(text.as_bytes()),
        }
    }

    /// The id as Redis writes it.
    pub(super) fn text(&self) -> String {
        self.with_bytes(|bytes| String::from_utf8_lossy(bytes).into_owned())
    }
}

/// Writes `n` in decimal at the end of `buffer`; returns where it starts.
/// (The formatting machinery of `Display` costs several times more, on
/// every ack.)
fn write_digits(buffer: &mut [u8], mut n: u64) -> usize {
    let mut at = buffer.len();
    loop {
        at -= 1;
        buffer[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            return at;
        }
    }
}

/// `<ms>-<seq>`, both decimal without a sign or leading zeros (so the
/// numbers written back give the same text), in one pass.
fn parse(id: &str) -> Option<(u64, u64)> {
    let mut parts = [0_u64; 2];
    let mut part = 0;
    let mut digits = 0;
    for &byte in id.as_bytes() {
        if byte == b'-' && part == 0 && digits > 0 {
            part = 1;
            digits = 0;
            continue;
        }
        if !byte.is_ascii_digit() || (digits == 1 && parts[part] == 0) {
            return None;
        }
        parts[part] = parts[part]
            .checked_mul(10)?
            .checked_add(u64::from(byte - b'0'))?;
        digits += 1;
    }
    (part == 1 && digits > 0).then_some((parts[0], parts[1]))
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
pub(super) struct HeldIds(HashSet<EntryId, BuildHasherDefault<IdHasher>>);

impl HeldIds {
    pub(super) fn insert(&mut self, id: EntryId) {
        self.0.insert(id);
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

/// A multiply-and-rotate hash for the held set: its keys are ids Redis gave
/// out, a few hundred at most, so SipHash's guard against chosen keys buys
/// nothing here and costs more than the rest of holding an entry.
#[derive(Default)]
pub(super) struct IdHasher(u64);

impl Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &byte in bytes {
            self.write_u64(u64::from(byte));
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = (self.0.rotate_left(5) ^ n).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
    }

    fn write_usize(&mut self, n: usize) {
        self.write_u64(n as u64);
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
        for odd in [
            "01-1",
            "1-01",
            "1-+1",
            "+1-1",
            "1",
            "a-b",
            "-",
            "1-",
            "-1",
            "1-2-3",
            "1--2",
            "18446744073709551616-0",
        ] {
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
        held.insert(EntryId::of("5-1"));
        held.insert(EntryId::of("odd"));
        assert_eq!(held.len(), 2);
        assert!(held.remove("5-1"));
        assert!(!held.remove("5-1"));
        assert!(held.remove_id(&EntryId::of("odd")));
        assert_eq!(held.texts(), Vec::<String>::new());
    }
}
