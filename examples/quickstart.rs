//! The crate on the in-memory bus, no broker needed:
//!
//! ```text
//! cargo run --example quickstart
//! ```
//!
//! Trading publishes `trade.executed`; Game and Market consume it in their
//! own groups. One trade is poison for Game's handler: it lands in the
//! dead-letter queue with its reason, an operator fixes the cause and
//! redrives it, and Game handles it on the second pass.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use switchboard::{
    Error, Event, EventBus, MemoryTransport, Message, Redrive, SubscribeOptions, Topology,
    handler_fn,
};
use tokio::sync::mpsc;

#[derive(Debug, Clone, Serialize, Deserialize)]
struct TradeExecuted {
    order_id: String,
    symbol: String,
    quantity: u64,
}

impl Event for TradeExecuted {
    const TYPE: &'static str = "trade.executed";
    const VERSION: &'static str = "1.0";
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Error> {
    let transport = Arc::new(MemoryTransport::new());
    let trading = EventBus::new(transport.clone(), "trading-service");
    let game = EventBus::new(transport.clone(), "game-service");
    let market = EventBus::new(transport.clone(), "market-service");

    // strategy §5.2: trade.executed goes to Game and Market. Declared first, so
    // nothing published before a consumer starts is lost.
    let topology = Topology::new().with_event::<TradeExecuted, _>(["game", "market"]);
    trading.declare(&topology).await?;

    // Game refuses order 2 until an operator has fixed its cause.
    let fixed: Arc<Mutex<BTreeSet<String>>> = Arc::default();
    let (handled, mut log) = mpsc::unbounded_channel::<String>();

    let game_consumer = {
        let (fixed, handled) = (fixed.clone(), handled.clone());
        game.subscribe(
            SubscribeOptions::new("game"),
            handler_fn(move |message: Message<TradeExecuted>| {
                let (fixed, handled) = (fixed.clone(), handled.clone());
                async move {
                    let trade = message.payload();
                    if trade.order_id == "2" && !fixed.lock().unwrap().contains(&trade.order_id) {
                        return Err(Error::permanent("unknown user for order 2"));
                    }
                    handled
                        .send(format!(
                            "game   holds {} x {}",
                            trade.quantity, trade.symbol
                        ))
                        .ok();
                    Ok(())
                }
            }),
        )
        .await?
    };
    let market_consumer = market
        .subscribe(
            SubscribeOptions::new("market").with_concurrency(4),
            handler_fn(move |message: Message<TradeExecuted>| {
                let handled = handled.clone();
                async move {
                    let trade = message.payload();
                    handled
                        .send(format!(
                            "market saw order {} ({})",
                            trade.order_id, trade.symbol
                        ))
                        .ok();
                    Ok(())
                }
            }),
        )
        .await?;

    for (order_id, symbol, quantity) in [("1", "AAPL", 100), ("2", "MSFT", 5), ("3", "NVDA", 20)] {
        let event_id = trading
            .publish(TradeExecuted {
                order_id: order_id.into(),
                symbol: symbol.into(),
                quantity,
            })
            .await?;
        println!("trading published order {order_id} as event {event_id}");
    }
    // Three for Market, two for Game (order 2 is dead-lettered).
    for _ in 0..5 {
        println!("{}", log.recv().await.expect("a handled event"));
    }

    let dead_letters = trading.dead_letters::<TradeExecuted>()?;
    let mut letters = dead_letters.list(10).await?;
    // Game's handler settles order 2 before it pulls order 3, and order 3 is
    // in the log above, so the dead letter is there by now.
    let letter = letters.pop().expect("order 2 was dead-lettered");
    println!(
        "dead letter {} (group {}): {}; attempts {}; last error: {}",
        letter.id(),
        letter.group(),
        letter.reason(),
        letter.attempts(),
        letter.last_error().unwrap_or("-"),
    );

    fixed.lock().unwrap().insert("2".into());
    let redriven = dead_letters
        .redrive(Redrive::One(letter.id().to_owned()))
        .await?;
    println!("redrove {redriven} dead letter(s) to their group");
    println!("{}", log.recv().await.expect("the redriven event"));

    game_consumer.shutdown().await?;
    market_consumer.shutdown().await?;
    println!("consumers drained and stopped");
    Ok(())
}
