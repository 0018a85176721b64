//! Table names under a prefix, and the lock classes derived from it.

use crate::error::{Error, ErrorKind};

/// The longest prefix accepted: PostgreSQL cuts identifiers at 63 bytes and
/// the longest derived name (`<prefix>outbox_parked_key`) adds 18.
pub const MAX_PREFIX_LEN: usize = 40;

/// The names of an outbox's tables and the advisory-lock classes of its
/// writers and relays, all derived from one prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tables {
    pub(crate) prefix: String,
    pub(crate) outbox: String,
    pub(crate) inbox: String,
    /// PostgreSQL `NOTIFY` channel the writers signal and relays listen on.
    pub(crate) channel: String,
    /// Advisory-lock class of the per-key write lock (`pg_advisory_xact_lock`).
    pub(crate) writer_class: i32,
    /// Advisory-lock class of the relays' partition leases.
    pub(crate) lease_class: i32,
    /// Advisory-lock class of relay membership (one lock per live relay).
    pub(crate) member_class: i32,
}

impl Tables {
    /// Tables named `<prefix>outbox` and `<prefix>inbox`.
    ///
    /// The prefix is put into SQL as it is, so it must be a plain
    /// identifier: lower-case ASCII letters, digits and `_`, not starting
    /// with a digit, at most [`MAX_PREFIX_LEN`] bytes (empty is allowed).
    /// Anything else is refused with [`ErrorKind::Config`].
    pub(crate) fn new(prefix: &str) -> Result<Self, Error> {
        validate_prefix(prefix)?;
        let class = |role: &str| {
            // Positive, so the value reads the same as an oid in pg_locks.
            (fnv1a(format!("switchboard/{prefix}/{role}").as_bytes()) & 0x7fff_ffff) as i32
        };
        Ok(Self {
            prefix: prefix.to_owned(),
            outbox: format!("{prefix}outbox"),
            inbox: format!("{prefix}inbox"),
            channel: format!("{prefix}outbox"),
            writer_class: class("writer"),
            lease_class: class("lease"),
            member_class: class("member"),
        })
    }
}

/// Refuses a prefix that is not a plain lower-case SQL identifier.
pub(crate) fn validate_prefix(prefix: &str) -> Result<(), Error> {
    let plain = prefix
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
    let starts_well = !prefix.starts_with(|c: char| c.is_ascii_digit());
    if prefix.len() > MAX_PREFIX_LEN || !plain || !starts_well {
        return Err(Error::new(
            ErrorKind::Config,
            format!(
                "outbox table prefix {prefix:?}: use at most {MAX_PREFIX_LEN} lower-case \
                 ASCII letters, digits and '_', not starting with a digit"
            ),
        ));
    }
    Ok(())
}

/// FNV-1a, 64 bits: a hash of the ordering key that every process and
/// version computes alike (`std`'s hasher is randomised per process).
pub(crate) fn fnv1a(bytes: &[u8]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for &byte in bytes {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    hash
}

/// The stored hash of an ordering key: non-negative, so `mod(hash, n)` is a
/// partition number on every database.
pub(crate) fn key_hash(key: &str) -> i64 {
    (fnv1a(key.as_bytes()) & 0x7fff_ffff_ffff_ffff) as i64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_are_plain_identifiers() {
        for good in ["", "sb_", "orders_v2_", "a"] {
            assert!(Tables::new(good).is_ok(), "{good:?}");
        }
        for bad in ["Sb_", "1sb", "sb-", "sb;drop", "sb ", &"a".repeat(41)] {
            let error = Tables::new(bad).unwrap_err();
            assert_eq!(error.kind(), ErrorKind::Config, "{bad:?}");
        }
    }

    #[test]
    fn names_and_classes_follow_the_prefix() {
        let tables = Tables::new("sb_").unwrap();
        assert_eq!(tables.outbox, "sb_outbox");
        assert_eq!(tables.inbox, "sb_inbox");
        let other = Tables::new("other_").unwrap();
        assert_ne!(tables.writer_class, other.writer_class);
        assert_ne!(tables.writer_class, tables.lease_class);
        assert!(tables.lease_class >= 0 && tables.member_class >= 0);
    }

    #[test]
    fn key_hash_is_stable_and_non_negative() {
        // FNV-1a test vector: "a" → 0xaf63dc4c8601ec8c.
        assert_eq!(fnv1a(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(key_hash("a"), 0x2f63_dc4c_8601_ec8c);
        assert!(key_hash("order-17") >= 0);
    }
}
