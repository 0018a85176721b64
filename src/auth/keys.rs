//! The verifier's key set, selected by a token's `kid`, and swapped whole
//! when a newer announcement arrives.
//!
//! Readers never wait on a writer for longer than an `Arc` clone: the set is
//! immutable once built, and an update builds the new set aside and swaps
//! the pointer under a write lock held for that instant only.

use std::sync::{Arc, PoisonError, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::DecodingKey;

/// One key the verifier accepts.
#[derive(Clone)]
pub(super) struct VerificationKey {
    /// `None` only for the key given to a one-key constructor: it answers
    /// tokens whatever their `kid`, as before key sets existed.
    pub(super) kid: Option<String>,
    pub(super) key: DecodingKey,
    /// Refused from this time on (seconds since the Unix epoch).
    pub(super) not_after: Option<u64>,
}

/// An immutable key set and the announcement it came from.
#[derive(Clone, Default)]
pub(super) struct KeySet {
    /// The announcement's sequence; `None` for a set given at construction.
    pub(super) sequence: Option<u64>,
    pub(super) keys: Vec<VerificationKey>,
}

impl KeySet {
    pub(super) fn one(key: DecodingKey) -> Self {
        Self {
            sequence: None,
            keys: vec![VerificationKey {
                kid: None,
                key,
                not_after: None,
            }],
        }
    }

    /// The key for a token naming `kid`: the one of that id, else a
    /// nameless key from a one-key constructor.
    pub(super) fn find(&self, kid: Option<&str>) -> Option<&VerificationKey> {
        kid.and_then(|kid| self.keys.iter().find(|key| key.kid.as_deref() == Some(kid)))
            .or_else(|| self.keys.iter().find(|key| key.kid.is_none()))
    }
}

/// The shared, swappable key set of a verifier and its clones.
#[derive(Default)]
pub(super) struct KeyRing {
    current: RwLock<Arc<KeySet>>,
}

impl KeyRing {
    pub(super) fn new(set: KeySet) -> Self {
        Self {
            current: RwLock::new(Arc::new(set)),
        }
    }

    pub(super) fn current(&self) -> Arc<KeySet> {
        // A poisoned lock only means a writer panicked between two pointer
        // moves; the pointer is always a whole set.
        self.current
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Installs `set` unless the current set came from an announcement at
    /// least as new; says whether it did.
    pub(super) fn replace_if_newer(&self, set: KeySet) -> bool {
        let mut current = self.current.write().unwrap_or_else(PoisonError::into_inner);
        let newer = match (current.sequence, set.sequence) {
            (Some(held), Some(offered)) => offered > held,
            _ => true,
        };
        if newer {
            *current = Arc::new(set);
        }
        newer
    }
}

/// Where the verifier reads the time for key lifetimes: the system clock
/// unless a test injects one.
#[derive(Clone)]
pub(super) struct Clock(Option<Arc<dyn Fn() -> SystemTime + Send + Sync>>);

impl Clock {
    pub(super) fn system() -> Self {
        Self(None)
    }

    pub(super) fn custom(now: impl Fn() -> SystemTime + Send + Sync + 'static) -> Self {
        Self(Some(Arc::new(now)))
    }

    /// Seconds since the Unix epoch (0 for a time before it).
    pub(super) fn unix_secs(&self) -> u64 {
        let now = match &self.0 {
            Some(now) => now(),
            None => SystemTime::now(),
        };
        now.duration_since(UNIX_EPOCH)
            .unwrap_or(Duration::ZERO)
            .as_secs()
    }
}
