//! The four services' shared language: the strategy §5.2 events, the settlement
//! job, and the topology declared from the catalogue at start-up.
//!
//! Prices and quantities are `rust_decimal::Decimal`, never `f64`: 0.1 + 0.2
//! is not 0.3 in binary floating point, and money that drifts by a fraction
//! of a cent per trade does not reconcile. On the wire a decimal is a JSON
//! string (`"150.25"`), so no JSON parser on the way rounds it either.

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use switchboard::Event;

/// Buy or sell.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Side {
    /// Adds to the holding.
    Buy,
    /// Takes from the holding.
    Sell,
}

impl Side {
    /// `quantity` with the sign this side gives a holding.
    pub fn signed(self, quantity: Decimal) -> Decimal {
        match self {
            Side::Buy => quantity,
            Side::Sell => -quantity,
        }
    }
}

/// `user.registered`: Auth → Game.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UserRegistered {
    pub user_id: String,
    pub username: String,
    pub registered_at: DateTime<Utc>,
}

impl Event for UserRegistered {
    const TYPE: &'static str = "user.registered";
    const VERSION: &'static str = "1.0";
}

/// `order.created`: Trading → Market.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OrderCreated {
    pub order_id: String,
    pub user_id: String,
    pub symbol: String,
    pub side: Side,
    pub quantity: Decimal,
}

impl Event for OrderCreated {
    const TYPE: &'static str = "order.created";
    const VERSION: &'static str = "1.0";
}

/// `trade.executed`: Trading → Game, Market. The strategy §5.1 payload plus the
/// side.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TradeExecuted {
    pub order_id: String,
    pub user_id: String,
    pub symbol: String,
    pub side: Side,
    pub quantity: Decimal,
    pub price: Decimal,
}

impl Event for TradeExecuted {
    const TYPE: &'static str = "trade.executed";
    const VERSION: &'static str = "1.0";
}

/// `price.updated`: Market → Trading, Game.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PriceUpdated {
    pub symbol: String,
    pub price: Decimal,
    pub previous: Decimal,
}

impl Event for PriceUpdated {
    const TYPE: &'static str = "price.updated";
    const VERSION: &'static str = "1.0";
}

/// `holding.changed`: Game → nobody yet (strategy §5.2 lists no subscriber; it
/// is there for whoever needs it next).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HoldingChanged {
    pub user_id: String,
    pub symbol: String,
    pub quantity: Decimal,
    pub change: Decimal,
    /// The `trade.executed` event that changed it.
    pub caused_by: String,
}

impl Event for HoldingChanged {
    const TYPE: &'static str = "holding.changed";
    const VERSION: &'static str = "1.0";
}

/// `price.tick`: Market's live broadcast on Redis Pub/Sub (strategy §1.2,
/// "broadcast messages"). At most once: a listener that is away misses ticks,
/// which is fine for a live ticker and why it is not in the event catalogue.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PriceTick {
    pub symbol: String,
    pub price: Decimal,
}

impl Event for PriceTick {
    const TYPE: &'static str = "price.tick";
    const VERSION: &'static str = "1.0";
}

/// `settlement.requested`: a job on the RabbitMQ task queue (strategy §1.2,
/// "task queue"): persistent, acknowledged, done exactly by one worker.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SettlementRequested {
    pub order_id: String,
    pub user_id: String,
    pub symbol: String,
    pub side: Side,
    pub quantity: Decimal,
    pub price: Decimal,
    /// `quantity × price`, exact.
    pub amount: Decimal,
}

impl Event for SettlementRequested {
    const TYPE: &'static str = "settlement.requested";
    const VERSION: &'static str = "1.0";
}

/// Consumer groups, one per consuming service.
pub mod groups {
    pub const GAME: &str = "game";
    pub const MARKET: &str = "market";
    pub const TRADING: &str = "trading";
    pub const SETTLEMENT: &str = "settlement";
    pub const TICKER: &str = "ticker";
}
