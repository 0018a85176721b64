//! What several test and bench files share: the SPEC §5.1 document and its
//! payload type.

use serde::{Deserialize, Serialize};
use switchboard::Event;

/// SPEC §5.1 verbatim, with its `"uuid"` placeholder replaced by a real UUID.
#[allow(dead_code)]
pub const SPEC_DOCUMENT: &str = r#"{
  "event_id": "6f1c0f4e-8a3b-4c1d-9e2f-0a1b2c3d4e5f",
  "event_type": "trade.executed",
  "timestamp": "2026-02-19T12:00:00Z",
  "source": "trading-service",
  "version": "1.0",
  "payload": {
    "order_id": "123",
    "user_id": "456",
    "symbol": "AAPL",
    "quantity": 100,
    "price": 150.00
  }
}"#;

/// The event id in [`SPEC_DOCUMENT`].
#[allow(dead_code)]
pub const SPEC_EVENT_ID: &str = "6f1c0f4e-8a3b-4c1d-9e2f-0a1b2c3d4e5f";

/// The payload of SPEC §5.1's example event.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
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

/// The trade of [`SPEC_DOCUMENT`].
#[allow(dead_code)]
pub fn spec_trade() -> TradeExecuted {
    TradeExecuted {
        order_id: "123".into(),
        user_id: "456".into(),
        symbol: "AAPL".into(),
        quantity: 100,
        price: 150.0,
    }
}
