//! The transactional outbox and inbox on the machine's PostgreSQL
//! (`SWITCHBOARD_PG_URL`, default `postgres://postgres@127.0.0.1:5432/test`)
//! and on SQLite files. Each test has its own random table prefix.

#[path = "outbox/atomic.rs"]
mod atomic;
#[path = "outbox/inbox.rs"]
mod inbox;
#[path = "outbox/ordering.rs"]
mod ordering;
#[path = "outbox/redelivery.rs"]
mod redelivery;
#[path = "outbox/relay.rs"]
mod relay;
#[path = "outbox/restart.rs"]
mod restart;
#[path = "outbox/support.rs"]
mod support;
#[path = "outbox/trace.rs"]
mod trace;
