//! Idempotent consumers: each event id is handled once, however often it is
//! delivered.

mod store;

pub use store::{DedupeStore, Mark};
