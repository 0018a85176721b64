//! The resilience stacks end to end: their order, per-path timeouts, one
//! breaker shared by an RPC client and a consumer, the consumer stack's
//! breaker over a real `EventBus`, and idempotent consumers with dead
//! letters and redrive over the in-memory transport.

mod consumer_breaker;
mod idempotent_consumers;
mod order;
// Retries over real HTTP and gRPC connections, cut through a FaultProxy.
#[cfg(all(feature = "http", feature = "grpc", feature = "test-util"))]
mod retry_safety;

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use switchboard::config::ResilienceConfig;
use switchboard::middleware::dead_letter::{DeadLetterAlert, DeadLetterFacts};
use switchboard::{Error, Event, EventBus, MemoryTransport, Topology};
use tokio::sync::mpsc;
use tower::{Service, service_fn};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct TradeExecuted {
    order_id: u64,
}

impl Event for TradeExecuted {
    const TYPE: &'static str = "trade.executed";
    const VERSION: &'static str = "1.0";
}

/// A bus on a fresh in-memory transport, with the group declared.
async fn bus(group: &str) -> (EventBus, MemoryTransport) {
    let transport = MemoryTransport::new();
    let bus = EventBus::new(Arc::new(transport.clone()), "trading-service");
    bus.declare(&Topology::new().with_event::<TradeExecuted, _>([group]))
        .await
        .unwrap();
    (bus, transport)
}

/// A dependency that fails with `Unavailable` while `down` is set and counts
/// the calls that reach it.
#[derive(Clone, Default)]
struct Market {
    down: Arc<Mutex<bool>>,
    calls: Arc<AtomicU32>,
}

impl Market {
    fn set_down(&self, down: bool) {
        *self.down.lock().unwrap() = down;
    }

    fn calls(&self) -> u32 {
        self.calls.load(Ordering::SeqCst)
    }

    fn quote(&self) -> Result<f64, Error> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        if *self.down.lock().unwrap() {
            Err(Error::transient("market: 503"))
        } else {
            Ok(150.0)
        }
    }

    fn service(
        &self,
    ) -> impl Service<String, Response = f64, Error = Error, Future: Send> + Clone + Send + 'static
    {
        let market = self.clone();
        service_fn(move |_symbol: String| std::future::ready(market.quote()))
    }
}

fn spec() -> ResilienceConfig {
    ResilienceConfig::default()
}

/// An alert hook that forwards the facts to the test.
#[derive(Debug)]
struct Forward(mpsc::UnboundedSender<DeadLetterFacts>);

impl DeadLetterAlert for Forward {
    fn alert(&self, facts: &DeadLetterFacts) {
        self.0.send(facts.clone()).ok();
    }
}
