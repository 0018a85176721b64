//! SQLite: one writer at a time, so ids follow commit order by themselves;
//! one relay (no advisory locks to lease partitions with).

use std::time::Duration;

use async_trait::async_trait;
use sqlx::sqlite::{SqliteConnection, SqliteRow};
use sqlx::{AssertSqlSafe, Row, Sqlite};

use super::{Backend, LeaseRequest, NewRow, ParkedRow, Scope, StoredRow, now_micros, placeholders};
use crate::error::Error;
use crate::outbox::error::from_sqlx;
use crate::outbox::schema::Tables;

/// A statement built from table names (validated identifiers) and
/// constants; every value is a bind parameter.
fn sql(text: String) -> AssertSqlSafe<String> {
    AssertSqlSafe(text)
}

/// The table of the one relay's lease.
fn lease_table(tables: &Tables) -> String {
    format!("{}_lease", tables.outbox)
}

fn stored(row: SqliteRow) -> Result<StoredRow, sqlx::Error> {
    Ok(StoredRow {
        id: row.try_get(0)?,
        topic: row.try_get(1)?,
        key: row.try_get(2)?,
        headers: row.try_get(3)?,
        body: bytes::Bytes::from(row.try_get::<Vec<u8>, _>(4)?),
    })
}

#[async_trait]
impl Backend for Sqlite {
    const NAME: &'static str = "sqlite";
    const SEPARATE_DELETES: bool = false;

    async fn migrate(pool: &sqlx::Pool<Self>, tables: &Tables) -> Result<(), Error> {
        let (o, i) = (&tables.outbox, &tables.inbox);
        // AUTOINCREMENT: ids are never reused, even after the table empties.
        let statements = [
            format!(
                "CREATE TABLE IF NOT EXISTS {o} (
                    id INTEGER PRIMARY KEY AUTOINCREMENT,
                    topic TEXT NOT NULL,
                    ordering_key TEXT NOT NULL,
                    key_hash INTEGER NOT NULL,
                    event_id TEXT NOT NULL,
                    headers TEXT NOT NULL,
                    body BLOB NOT NULL,
                    created_at INTEGER NOT NULL,
                    attempts INTEGER NOT NULL DEFAULT 0,
                    parked_at INTEGER,
                    parked_reason TEXT
                )"
            ),
            format!(
                "CREATE INDEX IF NOT EXISTS {o}_parked_key ON {o} (ordering_key) \
                 WHERE parked_at IS NOT NULL"
            ),
            format!(
                "CREATE TABLE IF NOT EXISTS {i} (
                    consumer_group TEXT NOT NULL,
                    event_id TEXT NOT NULL,
                    handled_at INTEGER NOT NULL,
                    PRIMARY KEY (consumer_group, event_id)
                )"
            ),
            format!("CREATE INDEX IF NOT EXISTS {i}_handled_at ON {i} (handled_at)"),
            format!(
                "CREATE TABLE IF NOT EXISTS {o}_lease (
                    id INTEGER PRIMARY KEY CHECK (id = 1),
                    holder TEXT NOT NULL,
                    expires_at INTEGER NOT NULL
                )"
            ),
        ];
        let mut tx = pool
            .begin()
            .await
            .map_err(|e| from_sqlx("outbox migrate", e))?;
        for statement in statements {
            sqlx::query(sql(statement))
                .execute(&mut *tx)
                .await
                .map_err(|e| from_sqlx("outbox migrate", e))?;
        }
        tx.commit()
            .await
            .map_err(|e| from_sqlx("outbox migrate", e))
    }

    async fn insert(
        conn: &mut SqliteConnection,
        tables: &Tables,
        row: NewRow<'_>,
        _notify: bool,
    ) -> Result<i64, Error> {
        // SQLite has one writer at a time: the id is drawn under the write
        // lock the transaction then holds until it commits, so id order is
        // commit order for every key.
        let insert = format!(
            "INSERT INTO {} (topic, ordering_key, key_hash, event_id, headers, body, created_at) \
             VALUES (?, ?, ?, ?, ?, ?, ?) RETURNING id",
            tables.outbox
        );
        sqlx::query_scalar(sql(insert))
            .bind(row.topic)
            .bind(row.key)
            .bind(row.key_hash)
            .bind(row.event_id)
            .bind(row.headers)
            .bind(row.body)
            .bind(now_micros())
            .fetch_one(&mut *conn)
            .await
            .map_err(|e| from_sqlx("outbox enqueue", e))
    }

    async fn lock_key(
        conn: &mut SqliteConnection,
        tables: &Tables,
        _key_hash: i64,
    ) -> Result<(), Error> {
        // A write that changes nothing still takes the database's write
        // lock, which serialises every key at once.
        let query = format!("UPDATE {} SET id = id WHERE 0", lease_table(tables));
        sqlx::query(sql(query))
            .execute(&mut *conn)
            .await
            .map_err(|e| from_sqlx("outbox lock key", e))?;
        Ok(())
    }

    async fn relay_session(_conn: &mut SqliteConnection, _synchronous: bool) -> Result<(), Error> {
        Ok(())
    }

    async fn fetch(
        conn: &mut SqliteConnection,
        tables: &Tables,
        _scope: &Scope,
        limit: i64,
        hold_parked: bool,
        after: i64,
    ) -> Result<Vec<StoredRow>, Error> {
        let hold = if hold_parked {
            format!(
                "AND NOT EXISTS (SELECT 1 FROM {o} p WHERE p.parked_at IS NOT NULL \
                 AND p.ordering_key = o.ordering_key)",
                o = tables.outbox
            )
        } else {
            String::new()
        };
        let query = format!(
            "SELECT o.id, o.topic, o.ordering_key, o.headers, o.body FROM {o} o \
             WHERE o.id > ? AND o.parked_at IS NULL {hold} ORDER BY o.id LIMIT ?",
            o = tables.outbox
        );
        let rows = sqlx::query(sql(query))
            .bind(after)
            .bind(limit)
            .fetch_all(&mut *conn)
            .await
            .map_err(|e| from_sqlx("outbox fetch", e))?;
        rows.into_iter()
            .map(stored)
            .collect::<Result<_, _>>()
            .map_err(|e| from_sqlx("outbox fetch", e))
    }

    async fn delete(
        conn: &mut SqliteConnection,
        tables: &Tables,
        ids: &[i64],
    ) -> Result<(), Error> {
        if ids.is_empty() {
            return Ok(());
        }
        let query = format!(
            "DELETE FROM {} WHERE id IN ({})",
            tables.outbox,
            placeholders(ids.len())
        );
        let mut delete = sqlx::query(sql(query));
        for id in ids {
            delete = delete.bind(*id);
        }
        delete
            .execute(&mut *conn)
            .await
            .map_err(|e| from_sqlx("outbox delete", e))?;
        Ok(())
    }

    async fn park(
        conn: &mut SqliteConnection,
        tables: &Tables,
        id: i64,
        reason: &str,
    ) -> Result<(), Error> {
        let query = format!(
            "UPDATE {} SET parked_at = ?, parked_reason = ?, attempts = attempts + 1 WHERE id = ?",
            tables.outbox
        );
        sqlx::query(sql(query))
            .bind(now_micros())
            .bind(reason)
            .bind(id)
            .execute(&mut *conn)
            .await
            .map_err(|e| from_sqlx("outbox park", e))?;
        Ok(())
    }

    async fn pending(
        conn: &mut SqliteConnection,
        tables: &Tables,
    ) -> Result<(u64, Option<f64>), Error> {
        let query = format!(
            "SELECT count(*), min(created_at) FROM {} WHERE parked_at IS NULL",
            tables.outbox
        );
        let (count, oldest): (i64, Option<i64>) = sqlx::query_as(sql(query))
            .fetch_one(&mut *conn)
            .await
            .map_err(|e| from_sqlx("outbox pending", e))?;
        let age = oldest.map(|oldest| ((now_micros() - oldest).max(0)) as f64 / 1e6);
        Ok((count.max(0) as u64, age))
    }

    async fn rebalance(
        conn: &mut SqliteConnection,
        tables: &Tables,
        lease: &LeaseRequest<'_>,
        _held: &mut Vec<i64>,
    ) -> Result<Scope, Error> {
        // One relay per database: the lease row names the holder until it
        // expires; the holder renews it at every rebalance.
        let now = now_micros();
        let ttl = lease.ttl.as_micros().min(i64::MAX as u128 / 2) as i64;
        let claim = format!(
            "INSERT INTO {l} (id, holder, expires_at) VALUES (1, ?1, ?2 + ?3) \
             ON CONFLICT (id) DO UPDATE SET holder = excluded.holder, \
             expires_at = excluded.expires_at \
             WHERE {l}.holder = excluded.holder OR {l}.expires_at < ?2",
            l = lease_table(tables)
        );
        sqlx::query(sql(claim))
            .bind(lease.relay)
            .bind(now)
            .bind(ttl)
            .execute(&mut *conn)
            .await
            .map_err(|e| from_sqlx("outbox relay lease", e))?;
        let holder: Option<String> = sqlx::query_scalar(sql(format!(
            "SELECT holder FROM {} WHERE id = 1",
            lease_table(tables)
        )))
        .fetch_optional(&mut *conn)
        .await
        .map_err(|e| from_sqlx("outbox relay lease", e))?;
        Ok(if holder.as_deref() == Some(lease.relay) {
            Scope::All
        } else {
            // Another relay sends: stand by.
            Scope::Partitions {
                partitions: 1,
                held: Vec::new(),
            }
        })
    }

    async fn release(
        conn: &mut SqliteConnection,
        tables: &Tables,
        relay: &str,
    ) -> Result<(), Error> {
        let query = format!("DELETE FROM {} WHERE holder = ?", lease_table(tables));
        sqlx::query(sql(query))
            .bind(relay)
            .execute(&mut *conn)
            .await
            .map_err(|e| from_sqlx("outbox relay lease", e))?;
        Ok(())
    }

    async fn list_parked(
        conn: &mut SqliteConnection,
        tables: &Tables,
        limit: i64,
    ) -> Result<Vec<ParkedRow>, Error> {
        let query = format!(
            "SELECT id, topic, ordering_key, event_id, coalesce(parked_reason, ''), parked_at, body \
             FROM {} WHERE parked_at IS NOT NULL ORDER BY id LIMIT ?",
            tables.outbox
        );
        let rows = sqlx::query(sql(query))
            .bind(limit)
            .fetch_all(&mut *conn)
            .await
            .map_err(|e| from_sqlx("outbox list parked", e))?;
        rows.into_iter()
            .map(|row| {
                Ok(ParkedRow {
                    id: row.try_get(0)?,
                    topic: row.try_get(1)?,
                    key: row.try_get(2)?,
                    event_id: row.try_get(3)?,
                    reason: row.try_get(4)?,
                    parked_at: super::micros_to_time(row.try_get(5)?),
                    body: row.try_get(6)?,
                })
            })
            .collect::<Result<_, sqlx::Error>>()
            .map_err(|e| from_sqlx("outbox list parked", e))
    }

    async fn unpark(conn: &mut SqliteConnection, tables: &Tables, id: i64) -> Result<bool, Error> {
        let query = format!(
            "UPDATE {} SET parked_at = NULL, parked_reason = NULL \
             WHERE id = ? AND parked_at IS NOT NULL",
            tables.outbox
        );
        let done = sqlx::query(sql(query))
            .bind(id)
            .execute(&mut *conn)
            .await
            .map_err(|e| from_sqlx("outbox unpark", e))?;
        Ok(done.rows_affected() == 1)
    }

    async fn discard(conn: &mut SqliteConnection, tables: &Tables, id: i64) -> Result<bool, Error> {
        let query = format!(
            "DELETE FROM {} WHERE id = ? AND parked_at IS NOT NULL",
            tables.outbox
        );
        let done = sqlx::query(sql(query))
            .bind(id)
            .execute(&mut *conn)
            .await
            .map_err(|e| from_sqlx("outbox discard", e))?;
        Ok(done.rows_affected() == 1)
    }

    fn listen(
        _pool: &sqlx::Pool<Self>,
        _channel: String,
        _wake: std::sync::Arc<tokio::sync::Notify>,
    ) -> Option<tokio::task::JoinHandle<()>> {
        None
    }

    async fn inbox_claim(
        conn: &mut SqliteConnection,
        tables: &Tables,
        group: &str,
        event_id: &str,
    ) -> Result<bool, Error> {
        let query = format!(
            "INSERT OR IGNORE INTO {} (consumer_group, event_id, handled_at) VALUES (?, ?, ?)",
            tables.inbox
        );
        let done = sqlx::query(sql(query))
            .bind(group)
            .bind(event_id)
            .bind(now_micros())
            .execute(&mut *conn)
            .await
            .map_err(|e| from_sqlx("inbox claim", e))?;
        Ok(done.rows_affected() == 1)
    }

    async fn inbox_cleanup(
        conn: &mut SqliteConnection,
        tables: &Tables,
        older_than: Duration,
    ) -> Result<u64, Error> {
        let cutoff =
            now_micros().saturating_sub(older_than.as_micros().min(i64::MAX as u128) as i64);
        let query = format!("DELETE FROM {} WHERE handled_at < ?", tables.inbox);
        let done = sqlx::query(sql(query))
            .bind(cutoff)
            .execute(&mut *conn)
            .await
            .map_err(|e| from_sqlx("inbox cleanup", e))?;
        Ok(done.rows_affected())
    }
}
