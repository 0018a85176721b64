//! Trading's tables: every order it accepts, and whether it is settled.
//!
//! An order, its `order.created` and `trade.executed` (outbox `<p>outbox`,
//! relayed to the events broker) and its settlement job (outbox
//! `<p>jobs_outbox`, relayed to the task queue) commit in one transaction:
//! an order accepted is an order whose events and job go out, however long a
//! broker is away. The settlement worker marks the order settled in one
//! transaction with its inbox mark, so a job delivered twice settles once.

use std::sync::Arc;

use futures_util::future::BoxFuture;
use rust_decimal::Decimal;
use sqlx::AssertSqlSafe;
use switchboard::{Error, ErrorKind, Message};
use tower::util::BoxCloneSyncService;

use super::brokers::Brokers;
use super::database::{Database, Store, db_error, on_db, open_store};
use super::domain::{OrderCreated, SettlementRequested, Side, TradeExecuted};
use super::trading_service::OrderReceipt;

const DDL: &[&str] = &[
    "CREATE TABLE IF NOT EXISTS {p}orders (
        order_id TEXT PRIMARY KEY,
        user_id TEXT NOT NULL,
        symbol TEXT NOT NULL,
        side TEXT NOT NULL,
        quantity TEXT NOT NULL,
        price TEXT NOT NULL,
        settled BIGINT NOT NULL DEFAULT 0,
        placed_at BIGINT NOT NULL)",
    "CREATE INDEX IF NOT EXISTS {p}orders_user ON {p}orders (user_id)",
];

struct Sql {
    insert: String,
    settle: String,
    mine: String,
    count_all: String,
    count_user: String,
}

impl Sql {
    fn new(orders: &str) -> Self {
        Self {
            insert: format!(
                "INSERT INTO {orders} (order_id, user_id, symbol, side, quantity, price, placed_at) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7)"
            ),
            settle: format!("UPDATE {orders} SET settled = 1 WHERE order_id = $1 AND settled = 0"),
            mine: format!(
                "SELECT order_id, symbol, side, quantity, price, settled FROM {orders} \
                 WHERE user_id = $1 ORDER BY placed_at, order_id"
            ),
            count_all: format!(
                "SELECT count(*), CAST(coalesce(sum(settled), 0) AS BIGINT) FROM {orders}"
            ),
            count_user: format!(
                "SELECT count(*), CAST(coalesce(sum(settled), 0) AS BIGINT) FROM {orders} \
                 WHERE user_id = $1"
            ),
        }
    }
}

/// Trading's orders in the database.
#[derive(Clone)]
pub struct TradingStore {
    store: Store,
    sql: Arc<Sql>,
}

/// The settlement worker's handler: settles an order once.
pub type SettleHandler = BoxCloneSyncService<Message<SettlementRequested>, (), Error>;

fn side_text(side: Side) -> &'static str {
    match side {
        Side::Buy => "buy",
        Side::Sell => "sell",
    }
}

fn decimal(column: &str, text: &str) -> Result<Decimal, Error> {
    text.parse().map_err(|error| {
        Error::new(
            ErrorKind::Decode,
            format!("{column} {text:?} in the database: {error}"),
        )
    })
}

type OrderRow = (String, String, String, String, String, i64);

impl TradingStore {
    /// Opens (and creates) Trading's tables.
    pub async fn open(database: &Database, brokers: &Brokers) -> Result<Self, Error> {
        let store = open_store(database, brokers, "trading", "trading-service", true, DDL).await?;
        let orders = on_db!(&store, tables => tables.table("orders"));
        Ok(Self {
            store,
            sql: Arc::new(Sql::new(&orders)),
        })
    }

    /// The underlying tables (for the relays).
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Records a filled order with its two events and its settlement job,
    /// all in one transaction.
    pub async fn place(
        &self,
        user_id: &str,
        receipt: &OrderReceipt,
        placed_at_unix_ms: i64,
    ) -> Result<(), Error> {
        let created = OrderCreated {
            order_id: receipt.order_id.clone(),
            user_id: user_id.to_owned(),
            symbol: receipt.symbol.clone(),
            side: receipt.side,
            quantity: receipt.quantity,
        };
        let executed = TradeExecuted {
            order_id: receipt.order_id.clone(),
            user_id: user_id.to_owned(),
            symbol: receipt.symbol.clone(),
            side: receipt.side,
            quantity: receipt.quantity,
            price: receipt.price,
        };
        let job = SettlementRequested {
            order_id: receipt.order_id.clone(),
            user_id: user_id.to_owned(),
            symbol: receipt.symbol.clone(),
            side: receipt.side,
            quantity: receipt.quantity,
            price: receipt.price,
            amount: receipt.quantity * receipt.price,
        };
        let sql = &self.sql;
        on_db!(&self.store, tables => {
            let mut tx = tables.pool.begin().await.map_err(|e| db_error("begin an order", e))?;
            sqlx::query(AssertSqlSafe(sql.insert.as_str()))
                .bind(&receipt.order_id)
                .bind(user_id)
                .bind(&receipt.symbol)
                .bind(side_text(receipt.side))
                .bind(receipt.quantity.to_string())
                .bind(receipt.price.to_string())
                .bind(placed_at_unix_ms)
                .execute(&mut *tx)
                .await
                .map_err(|e| db_error("record the order", e))?;
            // A user's events in the order of their orders; enqueued last,
            // just before the commit (the key's lock is held until then).
            tables.events.enqueue_event_keyed(&mut tx, user_id, created).await?;
            tables.events.enqueue_event_keyed(&mut tx, user_id, executed).await?;
            tables.jobs.enqueue_event_keyed(&mut tx, user_id, job).await?;
            tx.commit().await.map_err(|e| db_error("commit the order", e))
        })
    }

    /// The settlement worker: marks the job's order settled, in one
    /// transaction with the job's inbox mark.
    pub fn settle_handler(&self) -> SettleHandler {
        let sql = self.sql.clone();
        on_db!(&self.store, tables => {
            BoxCloneSyncService::new(tables.inbox.handler(
                move |tx, message: Message<SettlementRequested>| -> BoxFuture<'_, Result<(), Error>> {
                    let sql = sql.clone();
                    Box::pin(async move {
                        sqlx::query(AssertSqlSafe(sql.settle.as_str()))
                            .bind(&message.payload().order_id)
                            .execute(&mut **tx)
                            .await
                            .map_err(|e| db_error("settle the order", e))?;
                        Ok(())
                    })
                },
            ))
        })
    }

    /// `user_id`'s orders, oldest first.
    pub async fn orders_of(&self, user_id: &str) -> Result<Vec<OrderReceipt>, Error> {
        let sql = &self.sql;
        let rows: Vec<OrderRow> = on_db!(&self.store, tables => {
            sqlx::query_as(AssertSqlSafe(sql.mine.as_str()))
                .bind(user_id)
                .fetch_all(&tables.pool)
                .await
                .map_err(|e| db_error("read the orders", e))?
        });
        rows.into_iter()
            .map(|(order_id, symbol, side, quantity, price, settled)| {
                Ok(OrderReceipt {
                    order_id,
                    symbol,
                    side: if side == "sell" {
                        Side::Sell
                    } else {
                        Side::Buy
                    },
                    quantity: decimal("quantity", &quantity)?,
                    price: decimal("price", &price)?,
                    settled: settled != 0,
                })
            })
            .collect()
    }

    /// (orders, settled), of `user_id` or of everyone.
    pub async fn counts(&self, user_id: Option<&str>) -> Result<(usize, usize), Error> {
        let sql = &self.sql;
        let (orders, settled): (i64, i64) = on_db!(&self.store, tables => {
            match user_id {
                Some(user_id) => sqlx::query_as(AssertSqlSafe(sql.count_user.as_str()))
                    .bind(user_id)
                    .fetch_one(&tables.pool)
                    .await,
                None => sqlx::query_as(AssertSqlSafe(sql.count_all.as_str()))
                    .fetch_one(&tables.pool)
                    .await,
            }
            .map_err(|e| db_error("count the orders", e))?
        });
        Ok((orders as usize, settled as usize))
    }
}
