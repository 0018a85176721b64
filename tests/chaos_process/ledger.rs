//! What the example services left in the database after a faulted session,
//! read straight from their tables (`examples/common/*_store.rs`), and the
//! check that every order committed by Trading was applied by Game exactly
//! once and settled.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use rust_decimal::Decimal;
use sqlx::{AssertSqlSafe, PgPool};

/// The PostgreSQL the services keep their state in (`DATABASE_URL`, or the
/// machine's shared server).
pub fn database_url() -> String {
    std::env::var("DATABASE_URL")
        .ok()
        .filter(|url| !url.is_empty())
        .unwrap_or_else(|| "postgres://postgres@127.0.0.1:5432/test".into())
}

pub async fn connect() -> PgPool {
    let url = database_url();
    PgPool::connect(&url)
        .await
        .unwrap_or_else(|error| panic!("PostgreSQL at {url}: {error}"))
}

/// A namespace whose table prefixes stay short (the services prefix their
/// tables with it) and whose topics meet no other run's.
pub fn namespace() -> String {
    format!("x{}", &uuid::Uuid::new_v4().simple().to_string()[..12])
}

/// The database's view of one run.
#[derive(Debug, Default)]
pub struct Ledger {
    /// Orders Trading committed.
    pub orders: u64,
    /// Of them, settled by the settlement worker.
    pub settled: u64,
    /// Trades Game applied (lines in `game_trades`).
    pub applied: u64,
    /// Orders applied more than once, and orders never applied.
    pub applied_twice: u64,
    pub never_applied: u64,
    /// Game's inbox marks.
    pub marks: u64,
    /// (user, symbol) → quantity: what the orders add up to, what Game's
    /// trade lines add up to, what Game's holdings say.
    pub ordered: BTreeMap<(String, String), Decimal>,
    pub traded: BTreeMap<(String, String), Decimal>,
    pub held: BTreeMap<(String, String), Decimal>,
}

fn decimal(text: &str) -> Decimal {
    text.parse()
        .unwrap_or_else(|error| panic!("{text:?} in the database: {error}"))
}

async fn rows<T>(pool: &PgPool, sql: String) -> Vec<T>
where
    T: for<'r> sqlx::FromRow<'r, sqlx::postgres::PgRow> + Send + Unpin,
{
    sqlx::query_as(AssertSqlSafe(sql.clone()))
        .fetch_all(pool)
        .await
        .unwrap_or_else(|error| panic!("{sql}: {error}"))
}

impl Ledger {
    pub async fn read(pool: &PgPool, namespace: &str) -> Self {
        let (trading, game) = (
            format!("{namespace}_trading_"),
            format!("{namespace}_game_"),
        );
        let mut ledger = Ledger::default();
        let orders: Vec<(String, String, String, String, String, i64)> = rows(
            pool,
            format!(
                "SELECT order_id, user_id, symbol, side, quantity, settled FROM {trading}orders"
            ),
        )
        .await;
        let applied: Vec<(String, String, String, String)> = rows(
            pool,
            format!("SELECT order_id, user_id, symbol, change FROM {game}trades"),
        )
        .await;
        let held: Vec<(String, String, String)> = rows(
            pool,
            format!("SELECT user_id, symbol, quantity FROM {game}holdings"),
        )
        .await;
        let marks: Vec<(i64,)> = rows(pool, format!("SELECT count(*) FROM {game}inbox")).await;
        let mut times: BTreeMap<String, u64> = BTreeMap::new();
        for (order_id, ..) in &applied {
            *times.entry(order_id.clone()).or_default() += 1;
        }
        for (order_id, user, symbol, side, quantity, settled) in orders {
            ledger.orders += 1;
            ledger.settled += settled as u64;
            let quantity = decimal(&quantity);
            let signed = if side == "sell" { -quantity } else { quantity };
            *ledger.ordered.entry((user, symbol)).or_default() += signed;
            match times.get(&order_id).copied().unwrap_or(0) {
                0 => ledger.never_applied += 1,
                1 => {}
                _ => ledger.applied_twice += 1,
            }
        }
        for (_, user, symbol, change) in applied {
            ledger.applied += 1;
            *ledger.traded.entry((user, symbol)).or_default() += decimal(&change);
        }
        for (user, symbol, quantity) in held {
            ledger.held.insert((user, symbol), decimal(&quantity));
        }
        ledger.marks = marks.first().map_or(0, |(count,)| *count as u64);
        ledger
    }

    /// Every order applied once, settled, and the holdings its sum.
    pub fn complete(&self) -> bool {
        self.orders > 0
            && self.applied == self.orders
            && self.settled == self.orders
            && self.never_applied == 0
            && self.applied_twice == 0
    }

    /// Asserts what "an order accepted is an order settled, once" means in
    /// the tables.
    pub fn assert_exactly_once(&self, what: &str) {
        assert_eq!(
            self.never_applied, 0,
            "{what}: orders Game never applied: {self:?}"
        );
        assert_eq!(
            self.applied_twice, 0,
            "{what}: orders Game applied twice: {self:?}"
        );
        assert_eq!(
            self.applied, self.orders,
            "{what}: trade lines vs orders: {self:?}"
        );
        assert_eq!(
            self.marks, self.applied,
            "{what}: inbox marks vs trade lines: {self:?}"
        );
        assert_eq!(
            self.settled, self.orders,
            "{what}: orders not settled: {self:?}"
        );
        let nonzero =
            |map: &BTreeMap<(String, String), Decimal>| -> BTreeMap<(String, String), Decimal> {
                map.iter()
                    .filter(|(_, quantity)| !quantity.is_zero())
                    .map(|(key, quantity)| (key.clone(), quantity.normalize()))
                    .collect()
            };
        assert_eq!(
            nonzero(&self.traded),
            nonzero(&self.ordered),
            "{what}: Game's trade lines do not add up to Trading's orders"
        );
        assert_eq!(
            nonzero(&self.held),
            nonzero(&self.ordered),
            "{what}: Game's holdings are not the sum of the orders"
        );
    }

    /// Reads until [`complete`](Self::complete) or `patience` is over (Game
    /// and the settlement worker catch up after the session ends).
    pub async fn settle(pool: &PgPool, namespace: &str, patience: Duration) -> (Self, Duration) {
        let started = Instant::now();
        loop {
            let ledger = Self::read(pool, namespace).await;
            if ledger.complete() || started.elapsed() > patience {
                return (ledger, started.elapsed());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// One line of figures.
    pub fn figures(&self) -> String {
        format!(
            "{} orders committed, {} applied by Game once each ({} inbox marks), {} settled",
            self.orders, self.applied, self.marks, self.settled
        )
    }
}

/// Orders Trading has committed so far (0 before its tables exist).
pub async fn orders(pool: &PgPool, namespace: &str) -> u64 {
    let sql = format!("SELECT count(*) FROM {namespace}_trading_orders");
    sqlx::query_scalar::<_, i64>(AssertSqlSafe(sql))
        .fetch_one(pool)
        .await
        .map_or(0, |count| count as u64)
}

/// Orders committed once every transaction still writing to the orders
/// table has ended: a SIGKILLed Trading may have sent a `COMMIT` the
/// server finishes after the process is gone. A `SHARE` lock waits for
/// every writer (a commit in flight lands, a dead client's transaction is
/// rolled back), then the count is read under it.
pub async fn orders_settled(pool: &PgPool, namespace: &str) -> u64 {
    let mut tx = pool.begin().await.expect("a transaction");
    let table = format!("{namespace}_trading_orders");
    sqlx::query(AssertSqlSafe(format!("LOCK TABLE {table} IN SHARE MODE")))
        .execute(&mut *tx)
        .await
        .unwrap_or_else(|error| panic!("lock {table}: {error}"));
    let count =
        sqlx::query_scalar::<_, i64>(AssertSqlSafe(format!("SELECT count(*) FROM {table}")))
            .fetch_one(&mut *tx)
            .await
            .expect("count the orders");
    tx.commit().await.expect("end the lock");
    count as u64
}

/// Trades Game has applied so far (0 before its tables exist).
pub async fn applied(pool: &PgPool, namespace: &str) -> u64 {
    let sql = format!("SELECT count(*) FROM {namespace}_game_trades");
    sqlx::query_scalar::<_, i64>(AssertSqlSafe(sql))
        .fetch_one(pool)
        .await
        .map_or(0, |count| count as u64)
}

/// Drops the run's tables.
pub async fn drop_tables(pool: &PgPool, namespace: &str) {
    let tables: Vec<String> = sqlx::query_scalar(
        "SELECT tablename FROM pg_tables WHERE schemaname = current_schema() AND tablename LIKE $1",
    )
    .bind(format!("{namespace}\\_%"))
    .fetch_all(pool)
    .await
    .unwrap_or_default();
    for table in tables {
        let _ = sqlx::query(AssertSqlSafe(format!(
            "DROP TABLE IF EXISTS {table} CASCADE"
        )))
        .execute(pool)
        .await;
    }
}
