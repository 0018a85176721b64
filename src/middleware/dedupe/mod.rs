//! Idempotent consumers: each event id is handled once, however often it is
//! delivered.

#[cfg(any(feature = "redis-streams", feature = "redis-pubsub"))]
mod redis;
mod store;

#[cfg(any(feature = "redis-streams", feature = "redis-pubsub"))]
pub use self::redis::RedisDedupeStore;
pub use store::{DedupeStore, Mark};
