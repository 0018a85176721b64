//! Metrics through the `metrics` facade, exported for Prometheus, on the
//! in-memory bus:
//!
//! ```text
//! cargo run --example metrics
//! ```
//!
//! The application picks the exporter: here `metrics-exporter-prometheus`,
//! installed before the bus is built, renders the scrape text a
//! `/metrics` endpoint would serve. Trading publishes trades, Game consumes
//! them (one is poison and is dead-lettered), a Market client is measured
//! against its strategy §3 budget, and the budget check runs once.

use std::sync::Arc;
use std::time::Duration;

use metrics_exporter_prometheus::PrometheusBuilder;
use serde::{Deserialize, Serialize};
use switchboard::middleware::dead_letter::DeadLetterAdmin;
use switchboard::observe::{BudgetConfig, CallMetricsLayer, LatencyBudgets};
use switchboard::{Error, Event, EventBus, MemoryTransport, Message, SubscribeOptions, handler_fn};
use tokio::sync::mpsc;
use tower::{ServiceBuilder, ServiceExt, service_fn};

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

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    // 1. The exporter, first: metrics recorded before it go nowhere.
    let prometheus = PrometheusBuilder::new().install_recorder()?;
    switchboard::observe::metrics::describe(); // `# HELP` lines

    // 2. Trading → Game over the bus.
    let bus = EventBus::new(Arc::new(MemoryTransport::new()), "trading-service");
    let (handled, mut seen) = mpsc::unbounded_channel();
    let game = bus
        .subscribe(
            SubscribeOptions::new("game"),
            handler_fn(move |message: Message<TradeExecuted>| {
                let handled = handled.clone();
                async move {
                    handled.send(()).ok();
                    if message.payload().quantity == 0 {
                        return Err(Error::permanent("a trade of nothing"));
                    }
                    Ok(())
                }
            }),
        )
        .await?;
    for quantity in [100, 50, 0] {
        let trade = TradeExecuted {
            order_id: format!("order-{quantity}"),
            symbol: "AAPL".into(),
            quantity,
        };
        bus.publish(trade).await?;
    }
    for _ in 0..3 {
        seen.recv().await;
    }
    game.shutdown().await?;
    DeadLetterAdmin::new(bus.transport().clone())
        .list("trade.executed", 100)
        .await?;

    // 3. Trading → Market, measured against its 20 ms budget.
    let budgets = LatencyBudgets::new(&BudgetConfig::from_yaml("budgets: { trading_market: 20 }")?);
    let market = ServiceBuilder::new()
        .layer(
            CallMetricsLayer::new("trading_market", "grpc")
                .with_budget(budgets.recorder("trading_market").expect("configured")),
        )
        .service(service_fn(|symbol: &'static str| async move {
            tokio::time::sleep(Duration::from_millis(2)).await;
            Ok::<_, Error>((symbol, 150.0))
        }));
    for _ in 0..5 {
        market.clone().oneshot("AAPL").await?;
    }
    budgets.check_now();

    // 4. What a scrape of /metrics returns. A service serves it with
    //    `switchboard::observe::metrics::router(move || prometheus.render())`
    //    merged into its axum router (feature `http`).
    println!("{}", prometheus.render());
    Ok(())
}
