//! Dedupe marks in Redis, so every replica of a service sees the same marks
//! (strategy §6.2): an event handled by one replica is not handled again by
//! another that receives a redelivery.
//!
//! Each mark is one string key, `<prefix>:<key>`:
//!
//! | value | meaning | set by |
//! |---|---|---|
//! | `progress:<token>` | held in progress by `token` | [`try_begin`](DedupeStore::try_begin): `SET key value NX PX ttl`; [`extend`](DedupeStore::extend) pushes its expiry out |
//! | `done` | handled | [`complete`](DedupeStore::complete), with its own TTL |
//! | (no key) | never seen, released, or expired | [`release`](DedupeStore::release), or Redis expiring the key |
//!
//! The in-progress value carries the holder's token so that `extend`,
//! `complete` and `release` are compare-and-set / compare-and-delete Lua
//! scripts: a holder whose mark expired (its renewals failed, or it was
//! presumed dead) cannot extend a newer holder's mark, turn it into `done`,
//! nor delete it. [`extend`](DedupeStore::extend) is `PEXPIRE` on the key
//! while its value is still the holder's. The prefix in front of the token
//! keeps every token distinct from `done`.
//!
//! `try_begin` runs the `SET NX PX` and, when a mark exists, reads it in the
//! same Lua script: one round trip, and no gap in which the mark could
//! expire between the two.

use std::fmt;
use std::time::Duration;

use async_trait::async_trait;
use redis::Script;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};

use super::{DedupeStore, Mark};
use crate::error::{Error, ErrorKind};
use crate::transport::redis_support::{
    DEFAULT_CONNECT_TIMEOUT, connection_manager, open_client, redis_error,
};

/// The value of a done mark.
const DONE: &str = "done";
/// The start of an in-progress mark's value; the holder's token follows.
const IN_PROGRESS: &str = "progress:";

/// `SET NX PX`, and when a mark exists, which one.
const TRY_BEGIN: &str = r"
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  return 'acquired'
end
if redis.call('GET', KEYS[1]) == ARGV[3] then
  return 'done'
end
return 'in-progress'
";

/// Compare-and-set on the expiry: only the current holder extends its mark.
const EXTEND: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
";

/// Compare-and-set: only the current holder turns its mark into `done`.
const COMPLETE: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
  return 1
end
return 0
";

/// Compare-and-delete: only the current holder removes its mark.
const RELEASE: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
";

/// A [`DedupeStore`] on Redis, shared by every replica that uses the same
/// Redis and prefix. Clones share one connection, which reconnects by
/// itself.
///
/// Needs a Redis at 127.0.0.1:6379:
///
/// ```
/// use std::time::Duration;
/// use switchboard::middleware::dedupe::{DedupeStore, Mark, RedisDedupeStore};
///
/// # tokio::runtime::Runtime::new().unwrap().block_on(async {
/// # let prefix = format!("doc:{}", uuid::Uuid::new_v4().simple());
/// // Two replicas of the game service.
/// let one = RedisDedupeStore::connect("redis://127.0.0.1:6379", &prefix).await?;
/// let two = RedisDedupeStore::connect("redis://127.0.0.1:6379", &prefix).await?;
///
/// let minute = Duration::from_secs(60);
/// assert_eq!(one.try_begin("evt-1", "token-a", minute).await?, Mark::Acquired);
/// assert_eq!(two.try_begin("evt-1", "token-b", minute).await?, Mark::InProgress);
/// assert!(one.complete("evt-1", "token-a", Duration::from_secs(3600)).await?);
/// assert_eq!(two.try_begin("evt-1", "token-b", minute).await?, Mark::Done);
/// # Ok::<(), switchboard::Error>(())
/// # }).unwrap();
/// ```
#[derive(Clone)]
pub struct RedisDedupeStore {
    connection: ConnectionManager,
    prefix: String,
    try_begin: Script,
    extend: Script,
    complete: Script,
    release: Script,
}

impl RedisDedupeStore {
    /// A store on `connection` whose keys are `<prefix>:<key>`. Services
    /// (not replicas) that share a Redis use different prefixes, such as
    /// `game:dedupe`.
    pub fn new(connection: ConnectionManager, prefix: impl Into<String>) -> Self {
        Self {
            connection,
            prefix: prefix.into(),
            try_begin: Script::new(TRY_BEGIN),
            extend: Script::new(EXTEND),
            complete: Script::new(COMPLETE),
            release: Script::new(RELEASE),
        }
    }

    /// Connects to the Redis at `url` with a 5 s connect and response
    /// timeout (a Redis that is down fails `connect` within 5 s) and makes
    /// a store with `prefix` (see [`new`](Self::new)). To tune the
    /// connection, build the [`ConnectionManager`] yourself and use `new`.
    pub async fn connect(url: &str, prefix: impl Into<String>) -> Result<Self, Error> {
        Self::connect_with_tls_ca(url, None, prefix).await
    }

    /// Like [`connect`](Self::connect), trusting the CA `tls_ca_pem` (PEM)
    /// for a `rediss://` URL instead of the system's roots (feature
    /// `redis-tls`). A certificate it does not vouch for fails with
    /// [`ErrorKind::Rejected`](crate::ErrorKind::Rejected), not retried.
    pub async fn connect_with_tls_ca(
        url: &str,
        tls_ca_pem: Option<&[u8]>,
        prefix: impl Into<String>,
    ) -> Result<Self, Error> {
        let client = open_client(url, tls_ca_pem)?;
        // Few connection retries per command: while Redis is away a dedupe
        // check fails fast with a retryable error (the consumer's retry and
        // requeue decide) instead of holding the handler for seconds.
        let config = ConnectionManagerConfig::new()
            .set_response_timeout(Some(Duration::from_secs(5)))
            .set_max_delay(Duration::from_secs(1))
            .set_number_of_retries(2);
        let connection =
            connection_manager("dedupe", &client, config, DEFAULT_CONNECT_TIMEOUT).await?;
        Ok(Self::new(connection, prefix))
    }

    /// The prefix of every key.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The Redis key that holds `key`'s mark.
    pub fn redis_key(&self, key: &str) -> String {
        format!("{}:{key}", self.prefix)
    }
}

#[async_trait]
impl DedupeStore for RedisDedupeStore {
    async fn try_begin(&self, key: &str, token: &str, ttl: Duration) -> Result<Mark, Error> {
        let mut connection = self.connection.clone();
        let answer: String = self
            .try_begin
            .key(self.redis_key(key))
            .arg(format!("{IN_PROGRESS}{token}"))
            .arg(millis(ttl))
            .arg(DONE)
            .invoke_async(&mut connection)
            .await
            .map_err(|error| redis_error("dedupe try_begin", error))?;
        match answer.as_str() {
            "acquired" => Ok(Mark::Acquired),
            "done" => Ok(Mark::Done),
            "in-progress" => Ok(Mark::InProgress),
            other => Err(Error::new(
                ErrorKind::Unavailable,
                format!("redis dedupe try_begin: unexpected answer {other:?}"),
            )),
        }
    }

    async fn extend(&self, key: &str, token: &str, ttl: Duration) -> Result<bool, Error> {
        let mut connection = self.connection.clone();
        let extended: i64 = self
            .extend
            .key(self.redis_key(key))
            .arg(format!("{IN_PROGRESS}{token}"))
            .arg(millis(ttl))
            .invoke_async(&mut connection)
            .await
            .map_err(|error| redis_error("dedupe extend", error))?;
        Ok(extended == 1)
    }

    async fn complete(&self, key: &str, token: &str, ttl: Duration) -> Result<bool, Error> {
        let mut connection = self.connection.clone();
        let changed: i64 = self
            .complete
            .key(self.redis_key(key))
            .arg(format!("{IN_PROGRESS}{token}"))
            .arg(DONE)
            .arg(millis(ttl))
            .invoke_async(&mut connection)
            .await
            .map_err(|error| redis_error("dedupe complete", error))?;
        Ok(changed == 1)
    }

    async fn release(&self, key: &str, token: &str) -> Result<bool, Error> {
        let mut connection = self.connection.clone();
        let deleted: i64 = self
            .release
            .key(self.redis_key(key))
            .arg(format!("{IN_PROGRESS}{token}"))
            .invoke_async(&mut connection)
            .await
            .map_err(|error| redis_error("dedupe release", error))?;
        Ok(deleted == 1)
    }
}

/// A TTL in whole milliseconds for `PX`, rounded up and at least 1 (Redis
/// refuses `PX 0`).
fn millis(ttl: Duration) -> u64 {
    let millis = ttl.as_nanos().div_ceil(1_000_000);
    u64::try_from(millis).unwrap_or(u64::MAX).max(1)
}

impl fmt::Debug for RedisDedupeStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisDedupeStore")
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ttls_round_up_to_at_least_one_millisecond() {
        assert_eq!(millis(Duration::ZERO), 1);
        assert_eq!(millis(Duration::from_micros(1)), 1);
        assert_eq!(millis(Duration::from_micros(1500)), 2);
        assert_eq!(millis(Duration::from_secs(30)), 30_000);
        assert_eq!(millis(Duration::MAX), u64::MAX);
    }
}
