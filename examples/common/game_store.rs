//! Game's tables: players, holdings, and every trade applied to them.
//!
//! A `trade.executed` is applied through the inbox: its mark
//! `(group, event_id)`, the holding's new quantity, the trade's line in
//! `<p>trades` and the `holding.changed` it causes (outbox, relayed to the
//! events broker) commit in one transaction. A trade delivered again — a
//! relay that died before deleting what it sent, a consumer killed before
//! its ack — finds its mark and changes nothing: the database decides, not
//! a time-to-live.

use std::collections::BTreeMap;
use std::sync::Arc;

use futures_util::future::BoxFuture;
use rust_decimal::Decimal;
use sqlx::AssertSqlSafe;
use switchboard::{Error, ErrorKind, Message};
use tower::util::BoxCloneSyncService;

use super::brokers::Brokers;
use super::database::{Database, Store, db_error, on_db, open_store};
use super::domain::{HoldingChanged, TradeExecuted};

const DDL: &[&str] = &[
    "CREATE TABLE IF NOT EXISTS {p}players (
        user_id TEXT PRIMARY KEY,
        username TEXT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS {p}holdings (
        user_id TEXT NOT NULL,
        symbol TEXT NOT NULL,
        quantity TEXT NOT NULL,
        trades BIGINT NOT NULL,
        PRIMARY KEY (user_id, symbol))",
    "CREATE TABLE IF NOT EXISTS {p}trades (
        event_id TEXT PRIMARY KEY,
        order_id TEXT NOT NULL,
        user_id TEXT NOT NULL,
        symbol TEXT NOT NULL,
        change TEXT NOT NULL,
        applied_at BIGINT NOT NULL)",
    "CREATE INDEX IF NOT EXISTS {p}trades_user ON {p}trades (user_id)",
];

struct Sql {
    add_player: String,
    player: String,
    players: String,
    /// Creates the holding or counts one more trade on it: on PostgreSQL it
    /// also locks the row, so two trades of one holding apply one after the
    /// other (SQLite: the inbox mark already holds the write lock).
    touch: String,
    quantity: String,
    set_quantity: String,
    log_trade: String,
    holdings: String,
    trades_of: String,
    trades_all: String,
}

impl Sql {
    fn new(players: &str, holdings: &str, trades: &str) -> Self {
        Self {
            add_player: format!(
                "INSERT INTO {players} (user_id, username) VALUES ($1, $2) \
                 ON CONFLICT (user_id) DO NOTHING"
            ),
            player: format!("SELECT username FROM {players} WHERE user_id = $1"),
            players: format!("SELECT count(*) FROM {players}"),
            touch: format!(
                "INSERT INTO {holdings} (user_id, symbol, quantity, trades) VALUES ($1, $2, '0', 1) \
                 ON CONFLICT (user_id, symbol) DO UPDATE SET trades = {holdings}.trades + 1"
            ),
            quantity: format!("SELECT quantity FROM {holdings} WHERE user_id = $1 AND symbol = $2"),
            set_quantity: format!(
                "UPDATE {holdings} SET quantity = $3 WHERE user_id = $1 AND symbol = $2"
            ),
            log_trade: format!(
                "INSERT INTO {trades} (event_id, order_id, user_id, symbol, change, applied_at) \
                 VALUES ($1, $2, $3, $4, $5, $6)"
            ),
            holdings: format!(
                "SELECT symbol, quantity, trades FROM {holdings} WHERE user_id = $1 ORDER BY symbol"
            ),
            trades_of: format!("SELECT count(*) FROM {trades} WHERE user_id = $1"),
            trades_all: format!("SELECT count(*) FROM {trades}"),
        }
    }
}

/// Game's ledger in the database.
#[derive(Clone)]
pub struct GameStore {
    store: Store,
    sql: Arc<Sql>,
}

/// The ledger's trade handler: applies a trade once.
pub type TradeHandler = BoxCloneSyncService<Message<TradeExecuted>, (), Error>;

fn decimal(text: &str) -> Result<Decimal, Error> {
    text.parse().map_err(|error| {
        Error::new(
            ErrorKind::Decode,
            format!("quantity {text:?} in the database: {error}"),
        )
    })
}

/// A user's holdings: symbol → quantity, and the trades applied.
#[derive(Debug, Clone, Default)]
pub struct Holdings {
    pub username: Option<String>,
    pub positions: BTreeMap<String, Decimal>,
    pub trades_applied: u64,
}

impl GameStore {
    /// Opens (and creates) Game's tables.
    pub async fn open(database: &Database, brokers: &Brokers) -> Result<Self, Error> {
        let store = open_store(database, brokers, "game", "game-service", false, DDL).await?;
        let sql = on_db!(&store, tables => Sql::new(
            &tables.table("players"),
            &tables.table("holdings"),
            &tables.table("trades"),
        ));
        Ok(Self {
            store,
            sql: Arc::new(sql),
        })
    }

    /// The underlying tables (for the relay).
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Records a player (once; a second time changes nothing).
    pub async fn add_player(&self, user_id: &str, username: &str) -> Result<(), Error> {
        let sql = &self.sql;
        on_db!(&self.store, tables => {
            sqlx::query(AssertSqlSafe(sql.add_player.as_str()))
                .bind(user_id)
                .bind(username)
                .execute(&tables.pool)
                .await
                .map(|_| ())
                .map_err(|e| db_error("record the player", e))
        })
    }

    /// A player's name, if Game knows them.
    pub async fn player(&self, user_id: &str) -> Result<Option<String>, Error> {
        let sql = &self.sql;
        on_db!(&self.store, tables => {
            sqlx::query_scalar(AssertSqlSafe(sql.player.as_str()))
                .bind(user_id)
                .fetch_optional(&tables.pool)
                .await
                .map_err(|e| db_error("read the player", e))
        })
    }

    /// Applies a trade to its holding, logs it and enqueues the
    /// `holding.changed` it causes — with the inbox mark, in one
    /// transaction.
    pub fn trade_handler(&self) -> TradeHandler {
        let sql = self.sql.clone();
        on_db!(&self.store, tables => {
            let outbox = tables.events.clone();
            BoxCloneSyncService::new(tables.inbox.handler(
                move |tx, message: Message<TradeExecuted>| -> BoxFuture<'_, Result<(), Error>> {
                    let (sql, outbox) = (sql.clone(), outbox.clone());
                    Box::pin(async move {
                        let trade = message.payload();
                        let change = trade.side.signed(trade.quantity);
                        sqlx::query(AssertSqlSafe(sql.touch.as_str()))
                            .bind(&trade.user_id)
                            .bind(&trade.symbol)
                            .execute(&mut **tx)
                            .await
                            .map_err(|e| db_error("lock the holding", e))?;
                        let held: String = sqlx::query_scalar(AssertSqlSafe(sql.quantity.as_str()))
                            .bind(&trade.user_id)
                            .bind(&trade.symbol)
                            .fetch_one(&mut **tx)
                            .await
                            .map_err(|e| db_error("read the holding", e))?;
                        let quantity = decimal(&held)? + change;
                        sqlx::query(AssertSqlSafe(sql.set_quantity.as_str()))
                            .bind(&trade.user_id)
                            .bind(&trade.symbol)
                            .bind(quantity.to_string())
                            .execute(&mut **tx)
                            .await
                            .map_err(|e| db_error("update the holding", e))?;
                        sqlx::query(AssertSqlSafe(sql.log_trade.as_str()))
                            .bind(message.event_id().to_string())
                            .bind(&trade.order_id)
                            .bind(&trade.user_id)
                            .bind(&trade.symbol)
                            .bind(change.to_string())
                            .bind(chrono::Utc::now().timestamp_millis())
                            .execute(&mut **tx)
                            .await
                            .map_err(|e| db_error("log the trade", e))?;
                        outbox
                            .enqueue_event_keyed(
                                &mut *tx,
                                &trade.user_id,
                                HoldingChanged {
                                    user_id: trade.user_id.clone(),
                                    symbol: trade.symbol.clone(),
                                    quantity,
                                    change,
                                    caused_by: message.event_id().to_string(),
                                },
                            )
                            .await?;
                        Ok(())
                    })
                },
            ))
        })
    }

    /// A user's holdings and how many trades made them.
    pub async fn holdings(&self, user_id: &str) -> Result<Holdings, Error> {
        let username = self.player(user_id).await?;
        let sql = &self.sql;
        let rows: Vec<(String, String, i64)> = on_db!(&self.store, tables => {
            sqlx::query_as(AssertSqlSafe(sql.holdings.as_str()))
                .bind(user_id)
                .fetch_all(&tables.pool)
                .await
                .map_err(|e| db_error("read the holdings", e))?
        });
        let mut holdings = Holdings {
            username,
            ..Holdings::default()
        };
        for (symbol, quantity, trades) in rows {
            holdings.positions.insert(symbol, decimal(&quantity)?);
            holdings.trades_applied += trades as u64;
        }
        Ok(holdings)
    }

    /// Trades applied, of `user_id` or of everyone.
    pub async fn trades_applied(&self, user_id: Option<&str>) -> Result<u64, Error> {
        let sql = &self.sql;
        let count: i64 = on_db!(&self.store, tables => {
            match user_id {
                Some(user_id) => sqlx::query_scalar(AssertSqlSafe(sql.trades_of.as_str()))
                    .bind(user_id)
                    .fetch_one(&tables.pool)
                    .await,
                None => sqlx::query_scalar(AssertSqlSafe(sql.trades_all.as_str()))
                    .fetch_one(&tables.pool)
                    .await,
            }
            .map_err(|e| db_error("count the trades", e))?
        });
        Ok(count as u64)
    }

    /// Players known.
    pub async fn players(&self) -> Result<u64, Error> {
        let sql = &self.sql;
        let count: i64 = on_db!(&self.store, tables => {
            sqlx::query_scalar(AssertSqlSafe(sql.players.as_str()))
                .fetch_one(&tables.pool)
                .await
                .map_err(|e| db_error("count the players", e))?
        });
        Ok(count as u64)
    }
}
