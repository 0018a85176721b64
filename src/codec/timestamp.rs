//! The envelope timestamp's wire form: RFC 3339, UTC, six fractional
//! digits, written and read without a `String` per envelope.

use chrono::{DateTime, SecondsFormat, SubsecRound, Utc};
use serde::{Deserializer, Serializer};

/// Writes a timestamp as RFC 3339 UTC with exactly six fractional digits, so
/// every envelope's timestamp has the same length and sorts as text.
pub(crate) fn serialize_timestamp<S: Serializer>(
    timestamp: &DateTime<Utc>,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    // Written straight into the output: no `String` per envelope.
    serializer.collect_str(&WireTimestamp(timestamp))
}

/// A timestamp displayed in its wire form (see [`format_timestamp`]).
struct WireTimestamp<'a>(&'a DateTime<Utc>);

impl std::fmt::Display for WireTimestamp<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        use chrono::{Datelike, Timelike};
        let t = self.0;
        let (year, nanos) = (t.year(), t.nanosecond());
        // Four-digit years and no leap second: the digits by hand (about a
        // tenth of chrono's formatting); anything else as chrono writes it.
        let (Ok(year @ 0..=9999), 0..=999_999_999) = (u32::try_from(year), nanos) else {
            return f.write_str(&format_timestamp(t));
        };
        let mut out = *b"0000-00-00T00:00:00.000000Z";
        let mut put = |at: usize, width: usize, mut value: u32| {
            for slot in out[at..at + width].iter_mut().rev() {
                *slot = b'0' + (value % 10) as u8;
                value /= 10;
            }
        };
        put(0, 4, year);
        put(5, 2, t.month());
        put(8, 2, t.day());
        put(11, 2, t.hour());
        put(14, 2, t.minute());
        put(17, 2, t.second());
        put(20, 6, nanos / 1_000);
        // Only ASCII digits were written into an ASCII template.
        f.write_str(std::str::from_utf8(&out).map_err(|_| std::fmt::Error)?)
    }
}

/// The wire form of a timestamp: RFC 3339, UTC, six fractional digits.
pub(crate) fn format_timestamp(timestamp: &DateTime<Utc>) -> String {
    timestamp.to_rfc3339_opts(SecondsFormat::Micros, true)
}

/// Reads any RFC 3339 date-time (any offset) as UTC, at the precision the
/// wire format writes, so a decoded envelope re-encodes to an equal one.
pub(super) fn deserialize_timestamp<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<DateTime<Utc>, D::Error> {
    // A visitor, not `Cow<str>` (whose `Deserialize` always copies): the
    // text is parsed where the parser holds it, without a `String`.
    struct Rfc3339;
    impl serde::de::Visitor<'_> for Rfc3339 {
        type Value = DateTime<Utc>;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("an RFC 3339 date-time")
        }
        fn visit_str<E: serde::de::Error>(self, text: &str) -> Result<Self::Value, E> {
            DateTime::parse_from_rfc3339(text)
                .map(|timestamp| timestamp.with_timezone(&Utc).trunc_subsecs(6))
                .map_err(E::custom)
        }
    }
    deserializer.deserialize_str(Rfc3339)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_timestamps_are_written_as_chrono_writes_them() {
        for text in [
            "2026-12-07T20:28:06.123456Z",
            "0000-01-01T00:00:00Z",
            "9999-12-31T23:59:59.999999Z",
            "1998-12-31T23:59:60.5Z",
            "+10000-01-01T00:00:00Z",
            "-0001-01-01T00:00:00Z",
        ] {
            let timestamp = DateTime::parse_from_rfc3339(text).map_or_else(
                |_| text.parse::<DateTime<Utc>>().unwrap(),
                |t| t.with_timezone(&Utc),
            );
            let written = WireTimestamp(&timestamp).to_string();
            assert_eq!(written, format_timestamp(&timestamp), "{text}");
        }
    }
}
