//! The event both sides move: SPEC §5.1's `trade.executed` in SPEC's
//! envelope — through switchboard's `EventEnvelope`, and by hand as a plain
//! serde struct with the same fields, encoded and decoded with serde_json.

use serde::{Deserialize, Serialize};
use switchboard::Event;

pub const SOURCE: &str = "trading-service";

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TradeExecuted {
    pub order_id: String,
    pub user_id: String,
    pub symbol: String,
    pub quantity: u64,
    pub price: f64,
}

impl Event for TradeExecuted {
    const TYPE: &'static str = "trade.executed";
    const VERSION: &'static str = "1.0";
}

impl TradeExecuted {
    pub fn numbered(n: u64) -> Self {
        Self {
            order_id: n.to_string(),
            user_id: "456".into(),
            symbol: "AAPL".into(),
            quantity: 100,
            price: 150.0,
        }
    }
}

/// The envelope as a service writes it without switchboard.
#[derive(Serialize, Deserialize)]
pub struct RawEnvelope<T> {
    pub event_id: uuid::Uuid,
    pub event_type: String,
    pub timestamp: chrono::DateTime<chrono::Utc>,
    pub source: String,
    pub version: String,
    pub payload: T,
}

/// A fresh envelope around trade `n`, as JSON; and its event id.
pub fn raw_encode(n: u64) -> (Vec<u8>, uuid::Uuid) {
    let event_id = uuid::Uuid::new_v4();
    let json = serde_json::to_vec(&RawEnvelope {
        event_id,
        event_type: TradeExecuted::TYPE.into(),
        timestamp: chrono::Utc::now(),
        source: SOURCE.into(),
        version: TradeExecuted::VERSION.into(),
        payload: TradeExecuted::numbered(n),
    })
    .expect("JSON");
    (json, event_id)
}

/// Decodes an envelope as the raw consumer does; panics on a bad one (the
/// figures are meaningless if anything failed).
pub fn raw_decode(bytes: &[u8]) -> RawEnvelope<TradeExecuted> {
    serde_json::from_slice(bytes).expect("a trade.executed envelope")
}
