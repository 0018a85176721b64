//! Where dedupe marks live: in process (`MemoryDedupeStore`) or shared by a service's
//! replicas (Redis).

use std::time::Duration;

use async_trait::async_trait;

use crate::error::Error;

/// What a store answered when asked to mark an event id in progress.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Mark {
    /// There was no mark: the caller now holds the id in progress and must
    /// [`complete`](DedupeStore::complete) or
    /// [`release`](DedupeStore::release) it.
    Acquired,
    /// Another holder is handling this id right now.
    InProgress,
    /// This id has been handled already.
    Done,
}

/// A store of dedupe marks keyed by event id.
///
/// An in-progress mark carries a fencing token chosen by its holder and a
/// TTL longer than the handler's timeout, so a holder that dies cannot block
/// the id forever, and a holder whose mark expired and was taken by another
/// cannot complete or release the newer holder's mark. A holder that is
/// still working [`extend`](Self::extend)s its mark, so the TTL only bounds
/// how long a holder that died keeps the id from being handled again.
#[async_trait]
pub trait DedupeStore: Send + Sync + 'static {
    /// Marks `key` in progress under `token` for `ttl` unless a mark exists
    /// (Redis: `SET key token NX PX ttl`); says which mark was found.
    async fn try_begin(&self, key: &str, token: &str, ttl: Duration) -> Result<Mark, Error>;

    /// Pushes the expiry of `token`'s in-progress mark out to `ttl` from now
    /// (compare-and-set on the token; Redis: `PEXPIRE` when the value is
    /// still `token`'s). Returns `false`, changing nothing, when `token` no
    /// longer holds the mark: it expired or was evicted (and perhaps another
    /// holder took it), or it is done.
    async fn extend(&self, key: &str, token: &str, ttl: Duration) -> Result<bool, Error>;

    /// Turns `token`'s in-progress mark into a done mark kept for `ttl`.
    /// Returns `false`, changing nothing, when `token` no longer holds the
    /// mark (it expired, and perhaps another holder took it).
    async fn complete(&self, key: &str, token: &str, ttl: Duration) -> Result<bool, Error>;

    /// Removes `token`'s in-progress mark so a redelivery runs the handler
    /// again (compare-and-delete). Returns `false` when `token` no longer
    /// holds it.
    async fn release(&self, key: &str, token: &str) -> Result<bool, Error>;
}
