//! Everything that differs between PostgreSQL and SQLite, behind one sealed
//! trait: the schema, the statements, the relays' leases.
//!
//! The rest of the module is generic over [`Backend`] and holds no SQL.
#![allow(unreachable_pub)] // sealed: public in a private module

use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};

use super::schema::Tables;
use crate::error::Error;

mod postgres;
mod sqlite;

/// A row to write.
#[derive(Debug)]
pub struct NewRow<'a> {
    pub topic: &'a str,
    pub key: &'a str,
    pub key_hash: i64,
    pub event_id: String,
    /// The transport headers, as a JSON object of strings.
    pub headers: String,
    /// The encoded envelope, published as it is.
    pub body: &'a [u8],
}

/// A row the relay read.
#[derive(Debug, Clone)]
pub struct StoredRow {
    pub id: i64,
    pub topic: String,
    pub key: String,
    pub headers: String,
    /// Shared with the message that carries it, not copied.
    pub body: bytes::Bytes,
}

/// What a relay asks for when it rebalances.
#[derive(Debug, Clone, Copy)]
pub struct LeaseRequest<'a> {
    /// The number of key partitions the relays share (PostgreSQL).
    pub partitions: i64,
    /// This relay's id.
    pub relay: &'a str,
    /// How long a lease lasts unless renewed (SQLite).
    pub ttl: Duration,
}

/// Which rows a relay may send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    /// All of them (SQLite: one relay).
    All,
    /// Rows whose `key_hash mod partitions` is one of `held`.
    Partitions { partitions: i64, held: Vec<i64> },
}

/// A row the relay set aside because the transport refused it for good.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParkedRow {
    /// The row's id (its place in the key's order).
    pub id: i64,
    /// The topic it is for.
    pub topic: String,
    /// Its ordering key.
    pub key: String,
    /// The envelope's `event_id`.
    pub event_id: String,
    /// What the transport said.
    pub reason: String,
    /// When it was parked.
    pub parked_at: DateTime<Utc>,
    /// The encoded envelope.
    pub body: Vec<u8>,
}

/// The SQL of one database.
#[async_trait]
pub trait Backend: sqlx::Database {
    /// For logs and errors.
    const NAME: &'static str;

    /// Whether the relay deletes sent rows on a second session, while its
    /// first reads the next batch (PostgreSQL); SQLite has one writer and
    /// does both on one.
    const SEPARATE_DELETES: bool;

    /// Creates the tables and indexes if missing; safe to run concurrently.
    async fn migrate(pool: &sqlx::Pool<Self>, tables: &Tables) -> Result<(), Error>;

    /// Writes one row inside the caller's transaction, after taking the
    /// key's write lock (PostgreSQL) so the id follows commit order per key.
    async fn insert(
        conn: &mut Self::Connection,
        tables: &Tables,
        row: NewRow<'_>,
        notify: bool,
    ) -> Result<i64, Error>;

    /// Takes the key's write lock now, until the transaction ends.
    async fn lock_key(
        conn: &mut Self::Connection,
        tables: &Tables,
        key_hash: i64,
    ) -> Result<(), Error>;

    /// Sets up the relay's own session once connected: whether its writes
    /// wait for the WAL flush, and (PostgreSQL) plans that read the table
    /// in id order through its index, whatever its statistics say.
    async fn relay_session(conn: &mut Self::Connection, synchronous: bool) -> Result<(), Error>;

    /// Up to `limit` sendable rows in `scope` with an id above `after`, in
    /// id order. With `hold_parked`, rows whose key has a parked row are
    /// left out.
    async fn fetch(
        conn: &mut Self::Connection,
        tables: &Tables,
        scope: &Scope,
        limit: i64,
        hold_parked: bool,
        after: i64,
    ) -> Result<Vec<StoredRow>, Error>;

    /// Removes sent rows.
    async fn delete(conn: &mut Self::Connection, tables: &Tables, ids: &[i64])
    -> Result<(), Error>;

    /// Sets a row aside with the reason.
    async fn park(
        conn: &mut Self::Connection,
        tables: &Tables,
        id: i64,
        reason: &str,
    ) -> Result<(), Error>;

    /// Rows waiting (not parked), and the age of the oldest in seconds.
    async fn pending(
        conn: &mut Self::Connection,
        tables: &Tables,
    ) -> Result<(u64, Option<f64>), Error>;

    /// Takes or gives back leases so each live relay holds its share
    /// (PostgreSQL: key partitions; SQLite: the one relay's lease, held by
    /// `relay` for `ttl` and renewed at each call); returns the scope this
    /// relay may send.
    async fn rebalance(
        conn: &mut Self::Connection,
        tables: &Tables,
        lease: &LeaseRequest<'_>,
        held: &mut Vec<i64>,
    ) -> Result<Scope, Error>;

    /// Gives this relay's leases back before its session closes.
    async fn release(
        conn: &mut Self::Connection,
        tables: &Tables,
        relay: &str,
    ) -> Result<(), Error>;

    /// Parked rows, oldest first.
    async fn list_parked(
        conn: &mut Self::Connection,
        tables: &Tables,
        limit: i64,
    ) -> Result<Vec<ParkedRow>, Error>;

    /// Puts a parked row back in line (it keeps its id, so its place).
    async fn unpark(conn: &mut Self::Connection, tables: &Tables, id: i64) -> Result<bool, Error>;

    /// Deletes a parked row for good, releasing its key.
    async fn discard(conn: &mut Self::Connection, tables: &Tables, id: i64) -> Result<bool, Error>;

    /// Starts a task that wakes `wake` on every notification of `channel`,
    /// reconnecting as needed; `None` where the database has no
    /// notifications (SQLite).
    fn listen(
        pool: &sqlx::Pool<Self>,
        channel: String,
        wake: std::sync::Arc<tokio::sync::Notify>,
    ) -> Option<tokio::task::JoinHandle<()>>;

    /// Records `(group, event_id)`; `false` when it was there already.
    async fn inbox_claim(
        conn: &mut Self::Connection,
        tables: &Tables,
        group: &str,
        event_id: &str,
    ) -> Result<bool, Error>;

    /// Deletes inbox marks older than `older_than`; returns how many.
    async fn inbox_cleanup(
        conn: &mut Self::Connection,
        tables: &Tables,
        older_than: Duration,
    ) -> Result<u64, Error>;
}

/// `?, ?, ?` for SQLite's `IN (…)` lists.
pub(super) fn placeholders(count: usize) -> String {
    vec!["?"; count].join(", ")
}

/// Microseconds since the Unix epoch as a time (the epoch for nonsense).
pub(super) fn micros_to_time(micros: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_micros(micros).unwrap_or_default()
}

/// Now, in microseconds since the Unix epoch (SQLite's clock column).
pub(super) fn now_micros() -> i64 {
    Utc::now().timestamp_micros()
}
