//! Market's tables: each symbol's price and its history.
//!
//! A `trade.executed` moves its symbol's price through the inbox: the mark,
//! the new price, its history line and the `price.updated` it causes
//! (outbox, relayed to the events broker) commit together, so a trade
//! delivered twice moves the price once.

use std::sync::Arc;

use futures_util::future::BoxFuture;
use rust_decimal::Decimal;
use sqlx::AssertSqlSafe;
use switchboard::{Error, ErrorKind, Message};
use tower::util::BoxCloneSyncService;

use super::brokers::Brokers;
use super::database::{Database, Store, db_error, on_db, open_store};
use super::domain::{PriceUpdated, Side, TradeExecuted};

const DDL: &[&str] = &[
    "CREATE TABLE IF NOT EXISTS {p}prices (
        symbol TEXT PRIMARY KEY,
        price TEXT NOT NULL,
        as_of BIGINT NOT NULL,
        trades BIGINT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS {p}history (
        symbol TEXT NOT NULL,
        seq BIGINT NOT NULL,
        at BIGINT NOT NULL,
        price TEXT NOT NULL,
        PRIMARY KEY (symbol, seq))",
];

struct Sql {
    open: String,
    open_history: String,
    /// Counts the trade on its symbol (and, on PostgreSQL, locks the row).
    touch: String,
    price: String,
    set_price: String,
    add_history: String,
    history: String,
    quote: String,
    all: String,
}

impl Sql {
    fn new(prices: &str, history: &str) -> Self {
        Self {
            open: format!(
                "INSERT INTO {prices} (symbol, price, as_of, trades) VALUES ($1, $2, $3, 0) \
                 ON CONFLICT (symbol) DO NOTHING"
            ),
            open_history: format!(
                "INSERT INTO {history} (symbol, seq, at, price) VALUES ($1, 0, $2, $3) \
                 ON CONFLICT (symbol, seq) DO NOTHING"
            ),
            touch: format!("UPDATE {prices} SET trades = trades + 1 WHERE symbol = $1"),
            price: format!("SELECT price, trades FROM {prices} WHERE symbol = $1"),
            set_price: format!("UPDATE {prices} SET price = $2, as_of = $3 WHERE symbol = $1"),
            add_history: format!(
                "INSERT INTO {history} (symbol, seq, at, price) VALUES ($1, $2, $3, $4)"
            ),
            history: format!("SELECT at, price FROM {history} WHERE symbol = $1 ORDER BY seq"),
            quote: format!("SELECT price, as_of FROM {prices} WHERE symbol = $1"),
            all: format!("SELECT symbol, price, as_of FROM {prices} ORDER BY symbol"),
        }
    }
}

fn decimal(text: &str) -> Result<Decimal, Error> {
    text.parse().map_err(|error| {
        Error::new(
            ErrorKind::Decode,
            format!("price {text:?} in the database: {error}"),
        )
    })
}

/// Market's prices in the database.
#[derive(Clone)]
pub struct MarketStore {
    store: Store,
    sql: Arc<Sql>,
}

/// The price handler: moves a price once per trade.
pub type TradeHandler = BoxCloneSyncService<Message<TradeExecuted>, (), Error>;

impl MarketStore {
    /// Opens (and creates) Market's tables, with `opening` prices for
    /// symbols it has never quoted.
    pub async fn open(
        database: &Database,
        brokers: &Brokers,
        opening: &[(&str, Decimal)],
        now_unix_ms: i64,
    ) -> Result<Self, Error> {
        let store = open_store(database, brokers, "market", "market-service", false, DDL).await?;
        let sql =
            on_db!(&store, tables => Sql::new(&tables.table("prices"), &tables.table("history")));
        let market = Self {
            store,
            sql: Arc::new(sql),
        };
        let sql = &market.sql;
        for (symbol, price) in opening {
            on_db!(&market.store, tables => {
                sqlx::query(AssertSqlSafe(sql.open.as_str()))
                    .bind(*symbol)
                    .bind(price.to_string())
                    .bind(now_unix_ms)
                    .execute(&tables.pool)
                    .await
                    .map_err(|e| db_error("open the prices", e))?;
                sqlx::query(AssertSqlSafe(sql.open_history.as_str()))
                    .bind(*symbol)
                    .bind(now_unix_ms)
                    .bind(price.to_string())
                    .execute(&tables.pool)
                    .await
                    .map_err(|e| db_error("open the history", e))?;
            });
        }
        Ok(market)
    }

    /// The underlying tables (for the relay).
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Moves the trade's symbol by `tick` in the trade's direction, records
    /// the history line and enqueues `price.updated`, with the inbox mark.
    /// A symbol Market does not quote is a permanent error (dead letter).
    pub fn trade_handler(&self, tick: Decimal) -> TradeHandler {
        let sql = self.sql.clone();
        on_db!(&self.store, tables => {
            let outbox = tables.events.clone();
            BoxCloneSyncService::new(tables.inbox.handler(
                move |tx, message: Message<TradeExecuted>| -> BoxFuture<'_, Result<(), Error>> {
                    let (sql, outbox) = (sql.clone(), outbox.clone());
                    Box::pin(async move {
                        let trade = message.payload();
                        let touched = sqlx::query(AssertSqlSafe(sql.touch.as_str()))
                            .bind(&trade.symbol)
                            .execute(&mut **tx)
                            .await
                            .map_err(|e| db_error("lock the price", e))?;
                        if touched.rows_affected() == 0 {
                            // Never priceable: retrying will not help.
                            return Err(Error::permanent(format!("unknown symbol {}", trade.symbol)));
                        }
                        let (price, seq): (String, i64) =
                            sqlx::query_as(AssertSqlSafe(sql.price.as_str()))
                                .bind(&trade.symbol)
                                .fetch_one(&mut **tx)
                                .await
                                .map_err(|e| db_error("read the price", e))?;
                        let previous = decimal(&price)?;
                        let price = match trade.side {
                            Side::Buy => previous + tick,
                            Side::Sell => (previous - tick).max(tick),
                        };
                        let now = chrono::Utc::now().timestamp_millis();
                        sqlx::query(AssertSqlSafe(sql.set_price.as_str()))
                            .bind(&trade.symbol)
                            .bind(price.to_string())
                            .bind(now)
                            .execute(&mut **tx)
                            .await
                            .map_err(|e| db_error("update the price", e))?;
                        sqlx::query(AssertSqlSafe(sql.add_history.as_str()))
                            .bind(&trade.symbol)
                            .bind(seq)
                            .bind(now)
                            .bind(price.to_string())
                            .execute(&mut **tx)
                            .await
                            .map_err(|e| db_error("record the history", e))?;
                        outbox
                            .enqueue_event_keyed(
                                &mut *tx,
                                &trade.symbol,
                                PriceUpdated {
                                    symbol: trade.symbol.clone(),
                                    price,
                                    previous,
                                },
                            )
                            .await?;
                        Ok(())
                    })
                },
            ))
        })
    }

    /// A symbol's price and when it was set, if Market quotes it.
    pub async fn quote(&self, symbol: &str) -> Result<Option<(Decimal, i64)>, Error> {
        let sql = &self.sql;
        let row: Option<(String, i64)> = on_db!(&self.store, tables => {
            sqlx::query_as(AssertSqlSafe(sql.quote.as_str()))
                .bind(symbol)
                .fetch_optional(&tables.pool)
                .await
                .map_err(|e| db_error("read the price", e))?
        });
        row.map(|(price, as_of)| Ok((decimal(&price)?, as_of)))
            .transpose()
    }

    /// Every symbol's price: (symbol, price, as of).
    pub async fn all(&self) -> Result<Vec<(String, Decimal, i64)>, Error> {
        let sql = &self.sql;
        let rows: Vec<(String, String, i64)> = on_db!(&self.store, tables => {
            sqlx::query_as(AssertSqlSafe(sql.all.as_str()))
                .fetch_all(&tables.pool)
                .await
                .map_err(|e| db_error("read the prices", e))?
        });
        rows.into_iter()
            .map(|(symbol, price, as_of)| Ok((symbol, decimal(&price)?, as_of)))
            .collect()
    }

    /// A symbol's history (unix ms, price), oldest first; empty when Market
    /// does not quote it.
    pub async fn history(&self, symbol: &str) -> Result<Vec<(i64, Decimal)>, Error> {
        let sql = &self.sql;
        let rows: Vec<(i64, String)> = on_db!(&self.store, tables => {
            sqlx::query_as(AssertSqlSafe(sql.history.as_str()))
                .bind(symbol)
                .fetch_all(&tables.pool)
                .await
                .map_err(|e| db_error("read the history", e))?
        });
        rows.into_iter()
            .map(|(at, price)| Ok((at, decimal(&price)?)))
            .collect()
    }
}
