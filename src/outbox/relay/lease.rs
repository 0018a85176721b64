//! The relay's own database session and the partition leases it holds.
//!
//! Leases are session-level advisory locks (PostgreSQL), so they live
//! exactly as long as this connection: a relay that dies, or whose
//! connection drops, frees its partitions for the others at once. The
//! connection is detached from the pool for the same reason — returned to
//! the pool, it would keep the locks for whoever borrowed it next.

use std::time::Duration;

use sqlx::Connection;
use tokio::time::Instant;

use crate::error::Error;
use crate::outbox::OutboxDatabase;
use crate::outbox::backend::{LeaseRequest, Scope};
use crate::outbox::error::from_sqlx;
use crate::outbox::schema::Tables;

/// What a round works with.
pub(super) struct Session<'l, DB: OutboxDatabase> {
    /// Holds the leases; reads (and, without a deleter, deletes).
    pub(super) conn: &'l mut DB::Connection,
    /// Deletes sent rows while `conn` reads.
    pub(super) deleter: Option<&'l mut DB::Connection>,
    /// What this relay may send.
    pub(super) scope: &'l Scope,
}

pub(super) struct Lease<DB: OutboxDatabase> {
    pool: sqlx::Pool<DB>,
    /// This relay's id, the holder of the SQLite lease.
    id: String,
    conn: Option<DB::Connection>,
    /// The second session that deletes sent rows (PostgreSQL), so a delete
    /// and the next read run at once.
    deleter: Option<DB::Connection>,
    held: Vec<i64>,
    scope: Scope,
    next_rebalance: Instant,
}

impl<DB: OutboxDatabase> Lease<DB> {
    pub(super) fn new(pool: sqlx::Pool<DB>) -> Self {
        Self {
            pool,
            id: uuid::Uuid::new_v4().to_string(),
            conn: None,
            deleter: None,
            held: Vec::new(),
            scope: Scope::Partitions {
                partitions: 1,
                held: Vec::new(),
            },
            next_rebalance: Instant::now(),
        }
    }

    /// The relay's connection, its deleting one if any, and what it may
    /// send now, connecting and rebalancing first when due.
    pub(super) async fn session(
        &mut self,
        tables: &Tables,
        partitions: u32,
        every: Duration,
        synchronous: bool,
    ) -> Result<Session<'_, DB>, Error> {
        if self.conn.is_none() {
            let conn = Self::connect(&self.pool, synchronous).await?;
            self.deleter = if DB::SEPARATE_DELETES {
                Some(Self::connect(&self.pool, synchronous).await?)
            } else {
                None
            };
            self.conn = Some(conn);
            self.held.clear();
            self.next_rebalance = Instant::now();
        }
        let conn = self.conn.as_mut().expect("connected above");
        if Instant::now() >= self.next_rebalance {
            let request = LeaseRequest {
                partitions: i64::from(partitions),
                relay: &self.id,
                // Renewed every `every`: a holder that misses a few renewals
                // (it died) leaves the lease to another relay.
                ttl: (every * 3).max(Duration::from_secs(1)),
            };
            self.scope = DB::rebalance(conn, tables, &request, &mut self.held).await?;
            self.next_rebalance = Instant::now() + every;
        }
        Ok(Session {
            conn,
            deleter: self.deleter.as_mut(),
            scope: &self.scope,
        })
    }

    /// A session of its own, out of the pool: its locks and settings must
    /// not pass to the pool's next borrower.
    async fn connect(pool: &sqlx::Pool<DB>, synchronous: bool) -> Result<DB::Connection, Error> {
        let mut conn = pool
            .acquire()
            .await
            .map_err(|e| from_sqlx("outbox relay connect", e))?
            .detach();
        DB::relay_session(&mut conn, synchronous).await?;
        Ok(conn)
    }

    /// Forgets the connection after an error: dropping it ends the session
    /// and with it every lease, which other relays then take over.
    pub(super) fn lost(&mut self) {
        self.conn = None;
        self.deleter = None;
        self.held.clear();
    }

    /// Ends the session cleanly, giving every lease back.
    pub(super) async fn release(&mut self, tables: &Tables) {
        self.held.clear();
        if let Some(deleter) = self.deleter.take() {
            let _ = tokio::time::timeout(Duration::from_secs(5), deleter.close()).await;
        }
        if let Some(mut conn) = self.conn.take() {
            let _ = tokio::time::timeout(
                Duration::from_secs(5),
                DB::release(&mut conn, tables, &self.id),
            )
            .await;
            let _ = tokio::time::timeout(Duration::from_secs(5), conn.close()).await;
        }
    }
}
