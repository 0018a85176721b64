//! PostgreSQL: per-key write locks, partition leases on advisory locks,
//! optional `NOTIFY`.

use std::time::Duration;

use async_trait::async_trait;
use sqlx::postgres::{PgConnection, PgRow};
use sqlx::{AssertSqlSafe, Postgres, Row};

use super::{Backend, LeaseRequest, NewRow, ParkedRow, Scope, StoredRow};
use crate::error::Error;
use crate::outbox::error::from_sqlx;
use crate::outbox::schema::Tables;

/// Runs a statement built from table names (validated identifiers) and
/// constants; every value is a bind parameter.
fn sql(text: String) -> AssertSqlSafe<String> {
    AssertSqlSafe(text)
}

fn stored(row: PgRow) -> Result<StoredRow, sqlx::Error> {
    Ok(StoredRow {
        id: row.try_get(0)?,
        topic: row.try_get(1)?,
        key: row.try_get(2)?,
        headers: row.try_get(3)?,
        body: bytes::Bytes::from(row.try_get::<Vec<u8>, _>(4)?),
    })
}

/// The condition that holds back every row of a key that has a parked row:
/// the parked keys are read once per statement (through the partial index
/// of parked rows), not once per row.
fn hold_clause(tables: &Tables) -> String {
    format!(
        "AND o.ordering_key <> ALL(ARRAY(SELECT p.ordering_key FROM {o} p \
         WHERE p.parked_at IS NOT NULL))",
        o = tables.outbox
    )
}

/// The relay's read: `$1` rows at most, ids above `$2`, and in a
/// partitioned scope only keys whose hash modulo `$3` is in `$4`.
fn fetch_sql(tables: &Tables, scope: &Scope, hold_parked: bool) -> String {
    let partitions = match scope {
        Scope::All => "",
        Scope::Partitions { .. } => "AND mod(o.key_hash, $3) = ANY($4)",
    };
    let hold = if hold_parked {
        hold_clause(tables)
    } else {
        String::new()
    };
    format!(
        "SELECT o.id, o.topic, o.ordering_key, o.headers, o.body FROM {o} o \
         WHERE o.id > $2 AND o.parked_at IS NULL {partitions} {hold} ORDER BY o.id LIMIT $1",
        o = tables.outbox
    )
}

#[async_trait]
impl Backend for Postgres {
    const NAME: &'static str = "postgres";
    const SEPARATE_DELETES: bool = true;

    async fn migrate(pool: &sqlx::Pool<Self>, tables: &Tables) -> Result<(), Error> {
        let (o, i) = (&tables.outbox, &tables.inbox);
        let statements = [
            format!(
                "CREATE TABLE IF NOT EXISTS {o} (
                    id BIGSERIAL PRIMARY KEY,
                    topic TEXT NOT NULL,
                    ordering_key TEXT NOT NULL,
                    key_hash BIGINT NOT NULL,
                    event_id TEXT NOT NULL,
                    headers TEXT NOT NULL,
                    body BYTEA NOT NULL,
                    created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
                    attempts INTEGER NOT NULL DEFAULT 0,
                    parked_at TIMESTAMPTZ,
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
                    handled_at TIMESTAMPTZ NOT NULL DEFAULT now(),
                    PRIMARY KEY (consumer_group, event_id)
                )"
            ),
            format!("CREATE INDEX IF NOT EXISTS {i}_handled_at ON {i} (handled_at)"),
        ];
        let mut tx = pool
            .begin()
            .await
            .map_err(|e| from_sqlx("outbox migrate", e))?;
        // Two services migrating at once would race on the catalog
        // (`CREATE … IF NOT EXISTS` is not atomic): one at a time.
        sqlx::query("SELECT pg_advisory_xact_lock($1, 0)")
            .bind(tables.member_class)
            .execute(&mut *tx)
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
        conn: &mut PgConnection,
        tables: &Tables,
        row: NewRow<'_>,
        notify: bool,
    ) -> Result<i64, Error> {
        // The key's lock is taken in the same statement, before the id is
        // drawn: same-key transactions queue here until the holder ends, so
        // their ids follow their commit order.
        let insert = format!(
            "WITH locked AS (SELECT pg_advisory_xact_lock($1, $2))
             INSERT INTO {o} (topic, ordering_key, key_hash, event_id, headers, body)
             SELECT $3, $4, $5, $6, $7, $8 FROM locked
             RETURNING id",
            o = tables.outbox
        );
        let id: i64 = sqlx::query_scalar(sql(insert))
            .bind(tables.writer_class)
            .bind(row.key_hash as i32)
            .bind(row.topic)
            .bind(row.key)
            .bind(row.key_hash)
            .bind(row.event_id)
            .bind(row.headers)
            .bind(row.body)
            .fetch_one(&mut *conn)
            .await
            .map_err(|e| from_sqlx("outbox enqueue", e))?;
        if notify {
            sqlx::query("SELECT pg_notify($1, '')")
                .bind(&tables.channel)
                .execute(&mut *conn)
                .await
                .map_err(|e| from_sqlx("outbox notify", e))?;
        }
        Ok(id)
    }

    async fn lock_key(
        conn: &mut PgConnection,
        tables: &Tables,
        key_hash: i64,
    ) -> Result<(), Error> {
        // The lock enqueue takes (locks of one transaction stack).
        sqlx::query("SELECT pg_advisory_xact_lock($1, $2)")
            .bind(tables.writer_class)
            .bind(key_hash as i32)
            .execute(&mut *conn)
            .await
            .map_err(|e| from_sqlx("outbox lock key", e))?;
        Ok(())
    }

    async fn relay_session(conn: &mut PgConnection, synchronous: bool) -> Result<(), Error> {
        // The relay reads the oldest rows of its partitions, `ORDER BY id
        // LIMIT n`. A table that has just filled up has no statistics yet,
        // and the partition filter looks selective: the planner then scans
        // every pending row and sorts them — per batch, so draining a
        // backlog of n rows costs n² (4 ms a batch at 2 000 rows). This
        // session runs only the relay's statements, all written for an
        // index in id order: it plans them that way.
        //
        // Its writes (deleting sent rows, parking) need not wait for the
        // WAL flush unless asked: one lost to a crash means a row sent
        // again, which at-least-once allows and the inbox absorbs. Saves a
        // flush (milliseconds on a real disk) per batch.
        sqlx::query(
            "SELECT set_config('enable_seqscan', 'off', false), \
             set_config('enable_sort', 'off', false), \
             set_config('synchronous_commit', \
               coalesce($1, current_setting('synchronous_commit')), false)",
        )
        // Asked to wait: the server's own setting stays (it may be stricter
        // than `on`, e.g. `remote_apply` with a standby).
        .bind((!synchronous).then_some("off"))
        .execute(&mut *conn)
        .await
        .map_err(|e| from_sqlx("outbox relay session", e))?;
        Ok(())
    }

    async fn fetch(
        conn: &mut PgConnection,
        tables: &Tables,
        scope: &Scope,
        limit: i64,
        hold_parked: bool,
        after: i64,
    ) -> Result<Vec<StoredRow>, Error> {
        let query = sqlx::query(sql(fetch_sql(tables, scope, hold_parked)))
            .bind(limit)
            .bind(after);
        let query = match scope {
            Scope::All => query,
            Scope::Partitions { partitions, held } => query.bind(*partitions).bind(held),
        };
        query
            .fetch_all(&mut *conn)
            .await
            .map_err(|e| from_sqlx("outbox fetch", e))?
            .into_iter()
            .map(stored)
            .collect::<Result<_, _>>()
            .map_err(|e| from_sqlx("outbox fetch", e))
    }

    async fn delete(conn: &mut PgConnection, tables: &Tables, ids: &[i64]) -> Result<(), Error> {
        let query = format!("DELETE FROM {} WHERE id = ANY($1)", tables.outbox);
        sqlx::query(sql(query))
            .bind(ids)
            .execute(&mut *conn)
            .await
            .map_err(|e| from_sqlx("outbox delete", e))?;
        Ok(())
    }

    async fn park(
        conn: &mut PgConnection,
        tables: &Tables,
        id: i64,
        reason: &str,
    ) -> Result<(), Error> {
        let query = format!(
            "UPDATE {} SET parked_at = now(), parked_reason = $2, attempts = attempts + 1 \
             WHERE id = $1",
            tables.outbox
        );
        sqlx::query(sql(query))
            .bind(id)
            .bind(reason)
            .execute(&mut *conn)
            .await
            .map_err(|e| from_sqlx("outbox park", e))?;
        Ok(())
    }

    async fn pending(
        conn: &mut PgConnection,
        tables: &Tables,
    ) -> Result<(u64, Option<f64>), Error> {
        let query = format!(
            "SELECT count(*), EXTRACT(EPOCH FROM now() - min(created_at))::float8 \
             FROM {} WHERE parked_at IS NULL",
            tables.outbox
        );
        let (count, age): (i64, Option<f64>) = sqlx::query_as(sql(query))
            .fetch_one(&mut *conn)
            .await
            .map_err(|e| from_sqlx("outbox pending", e))?;
        Ok((count.max(0) as u64, age.map(|age| age.max(0.0))))
    }

    async fn rebalance(
        conn: &mut PgConnection,
        tables: &Tables,
        lease: &LeaseRequest<'_>,
        held: &mut Vec<i64>,
    ) -> Result<Scope, Error> {
        let partitions = lease.partitions;
        let failed = |e| from_sqlx("outbox relay lease", e);
        // Membership: one lock per live relay session, keyed by its backend
        // pid, so relays can count each other without a table of their own.
        sqlx::query(
            "SELECT pg_try_advisory_lock($1, pg_backend_pid()) \
             WHERE NOT EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory' \
               AND pid = pg_backend_pid() AND classid::int8 = $1 AND objsubid = 2)",
        )
        .bind(tables.member_class)
        .execute(&mut *conn)
        .await
        .map_err(failed)?;
        let of_class = "FROM pg_locks WHERE locktype = 'advisory' AND objsubid = 2 AND granted \
             AND classid::int8 = $1 \
             AND database = (SELECT oid FROM pg_database WHERE datname = current_database())";
        let live: i64 = sqlx::query_scalar(sql(format!("SELECT count(*) {of_class}")))
            .bind(tables.member_class)
            .fetch_one(&mut *conn)
            .await
            .map_err(failed)?;
        let fair = (partitions + live.max(1) - 1) / live.max(1);
        let taken: Vec<i64> = sqlx::query_scalar(sql(format!("SELECT objid::int8 {of_class}")))
            .bind(tables.lease_class)
            .fetch_all(&mut *conn)
            .await
            .map_err(failed)?;
        held.sort_unstable();
        // A partition past the count (the relays' setting changed) is given back.
        while let Some(&extra) = held.last() {
            if held.len() as i64 <= fair && extra < partitions {
                break;
            }
            held.pop();
            sqlx::query("SELECT pg_advisory_unlock($1, $2::int4)")
                .bind(tables.lease_class)
                .bind(extra)
                .execute(&mut *conn)
                .await
                .map_err(failed)?;
        }
        let wanted = fair - held.len() as i64;
        if wanted > 0 {
            let free: Vec<i64> = (0..partitions)
                .filter(|partition| !taken.contains(partition))
                .collect();
            // One round trip for all of them: the LIMIT stops the scan (and
            // the locking) once enough were taken.
            sqlx::query(
                "SELECT p FROM unnest($2::int8[]) AS p \
                 WHERE pg_try_advisory_lock($1, p::int4) LIMIT $3",
            )
            .bind(tables.lease_class)
            .bind(&free)
            .bind(wanted)
            .fetch_all(&mut *conn)
            .await
            .map_err(failed)?;
        }
        // What this session holds, from the server: the one truth, so a
        // lease is never held without being sent from.
        *held = sqlx::query_scalar(
            "SELECT objid::int8 FROM pg_locks WHERE locktype = 'advisory' AND objsubid = 2 \
             AND granted AND pid = pg_backend_pid() AND classid::int8 = $1 ORDER BY 1",
        )
        .bind(tables.lease_class)
        .fetch_all(&mut *conn)
        .await
        .map_err(failed)?;
        held.sort_unstable();
        Ok(Scope::Partitions {
            partitions,
            held: held.clone(),
        })
    }

    async fn release(
        _conn: &mut PgConnection,
        _tables: &Tables,
        _relay: &str,
    ) -> Result<(), Error> {
        // Session locks: closing the session gives them back.
        Ok(())
    }

    async fn list_parked(
        conn: &mut PgConnection,
        tables: &Tables,
        limit: i64,
    ) -> Result<Vec<ParkedRow>, Error> {
        let query = format!(
            "SELECT id, topic, ordering_key, event_id, coalesce(parked_reason, ''), \
             (EXTRACT(EPOCH FROM parked_at) * 1000000)::int8, body \
             FROM {} WHERE parked_at IS NOT NULL ORDER BY id LIMIT $1",
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

    async fn unpark(conn: &mut PgConnection, tables: &Tables, id: i64) -> Result<bool, Error> {
        let query = format!(
            "UPDATE {} SET parked_at = NULL, parked_reason = NULL \
             WHERE id = $1 AND parked_at IS NOT NULL",
            tables.outbox
        );
        let done = sqlx::query(sql(query))
            .bind(id)
            .execute(&mut *conn)
            .await
            .map_err(|e| from_sqlx("outbox unpark", e))?;
        Ok(done.rows_affected() == 1)
    }

    async fn discard(conn: &mut PgConnection, tables: &Tables, id: i64) -> Result<bool, Error> {
        let query = format!(
            "DELETE FROM {} WHERE id = $1 AND parked_at IS NOT NULL",
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
        pool: &sqlx::Pool<Self>,
        channel: String,
        wake: std::sync::Arc<tokio::sync::Notify>,
    ) -> Option<tokio::task::JoinHandle<()>> {
        let pool = pool.clone();
        Some(tokio::spawn(async move {
            // A hint only: the relay polls anyway, so a listener that is
            // down costs latency, never rows.
            let mut delays = backon::BackoffBuilder::build(
                backon::ExponentialBuilder::default()
                    .with_min_delay(Duration::from_millis(100))
                    .with_max_delay(Duration::from_secs(10))
                    .with_jitter()
                    .without_max_times(),
            );
            loop {
                let error: sqlx::Error = async {
                    let mut listener = match sqlx::postgres::PgListener::connect_with(&pool).await {
                        Ok(listener) => listener,
                        Err(error) => return error,
                    };
                    if let Err(error) = listener.listen(&channel).await {
                        return error;
                    }
                    // Rows may have come while nobody listened.
                    wake.notify_one();
                    loop {
                        if let Err(error) = listener.recv().await {
                            return error;
                        }
                        wake.notify_one();
                    }
                }
                .await;
                if matches!(error, sqlx::Error::PoolClosed) {
                    return;
                }
                tracing::warn!(%error, %channel, "outbox listener lost; polling meanwhile");
                tokio::time::sleep(delays.next().unwrap_or(Duration::from_secs(10))).await;
            }
        }))
    }

    async fn inbox_claim(
        conn: &mut PgConnection,
        tables: &Tables,
        group: &str,
        event_id: &str,
    ) -> Result<bool, Error> {
        // A second delivery running at the same time waits here on the key
        // until the first one's transaction ends: then it finds the mark
        // (committed) or takes it (rolled back).
        let query = format!(
            "INSERT INTO {} (consumer_group, event_id) VALUES ($1, $2) ON CONFLICT DO NOTHING",
            tables.inbox
        );
        let done = sqlx::query(sql(query))
            .bind(group)
            .bind(event_id)
            .execute(&mut *conn)
            .await
            .map_err(|e| from_sqlx("inbox claim", e))?;
        Ok(done.rows_affected() == 1)
    }

    async fn inbox_cleanup(
        conn: &mut PgConnection,
        tables: &Tables,
        older_than: Duration,
    ) -> Result<u64, Error> {
        let query = format!(
            "DELETE FROM {} WHERE handled_at < now() - make_interval(secs => $1)",
            tables.inbox
        );
        let done = sqlx::query(sql(query))
            .bind(older_than.as_secs_f64())
            .execute(&mut *conn)
            .await
            .map_err(|e| from_sqlx("inbox cleanup", e))?;
        Ok(done.rows_affected())
    }
}

#[cfg(test)]
mod tests {
    use sqlx::Connection;

    use super::*;

    /// The relay's read walks the id index and stops after a batch — it
    /// neither scans nor sorts the pending rows — on a table that has just
    /// filled up and has no statistics, where the planner left to itself
    /// scans and sorts (n² to drain n rows). Against the machine's
    /// PostgreSQL (`SWITCHBOARD_PG_URL`).
    #[tokio::test]
    async fn the_relay_reads_a_batch_through_the_id_index_without_statistics() {
        let url = std::env::var("SWITCHBOARD_PG_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned());
        let pool = sqlx::PgPool::connect(&url).await.expect("PostgreSQL");
        let prefix = format!("plan{}_", &uuid::Uuid::new_v4().simple().to_string()[..12]);
        let tables = Tables::new(&prefix).unwrap();
        Postgres::migrate(&pool, &tables).await.unwrap();
        let fill = format!(
            "INSERT INTO {} (topic, ordering_key, key_hash, event_id, headers, body) \
             SELECT 'topic', 'key' || (n % 50), n % 50, n::text, '{{}}', '\\x00' \
             FROM generate_series(1, 20000) AS n",
            tables.outbox
        );
        sqlx::query(sql(fill)).execute(&pool).await.unwrap();
        let mut conn = pool.acquire().await.unwrap().detach();
        Postgres::relay_session(&mut conn, false).await.unwrap();
        let partitioned = Scope::Partitions {
            partitions: 32,
            held: (0..32).collect(),
        };
        for (scope, hold) in [
            (&Scope::All, true),
            (&partitioned, true),
            (&partitioned, false),
        ] {
            let explain = format!("EXPLAIN {}", fetch_sql(&tables, scope, hold));
            let query = sqlx::query_scalar::<_, String>(sql(explain))
                .bind(100_i64)
                .bind(0_i64);
            let query = match scope {
                Scope::All => query,
                Scope::Partitions { partitions, held } => query.bind(*partitions).bind(held),
            };
            let plan = query.fetch_all(&mut conn).await.unwrap().join("\n");
            assert!(
                plan.contains(&format!("Index Scan using {}_pkey", tables.outbox)),
                "{plan}"
            );
            assert!(
                !plan.contains("Seq Scan") && !plan.contains("Sort"),
                "{plan}"
            );
        }
        conn.close().await.unwrap();
        let drop = format!("DROP TABLE {}, {}", tables.outbox, tables.inbox);
        sqlx::query(sql(drop)).execute(&pool).await.unwrap();
    }
}
