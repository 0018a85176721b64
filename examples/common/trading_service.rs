//! Trading: takes orders over the HTTP gateway API (a token from Auth
//! required, checked locally), asks Market for the price over gRPC before
//! filling, publishes `order.created` and `trade.executed`, and hands each
//! fill's settlement to the task queue (RabbitMQ) as `settlement.requested`,
//! which its own settlement worker takes off the queue.
//!
//! strategy §2: 📞 Trading → Market (gRPC), 📢 Trading → Game (events on Redis
//! Streams). §5.2: publishes trade.executed and order.created, consumes
//! price.updated.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{Query, State};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use switchboard::auth::{AuthLayer, Claims, TokenVerifier};
use switchboard::middleware::Resilience;
use switchboard::middleware::circuit_breaker::CircuitBreakerLayer;
use switchboard::transport::grpc::unary;
use switchboard::transport::http::{ErrorResponse, JsonBody};
use switchboard::{
    ConsumerHandle, Error, ErrorKind, EventBus, Message, SubscribeOptions, handler_fn,
};
use tokio::sync::watch;
use tower::ServiceExt;
use tower::util::BoxCloneSyncService;

use super::brokers::Brokers;
use super::domain::{OrderCreated, PriceUpdated, SettlementRequested, Side, TradeExecuted, groups};
use super::net::{Latencies, PathStats, Server, bind, shut_down, stop_all};
use super::proto::market as pb;

/// strategy §3's name for the path this service times.
pub const PATH_TRADING_MARKET: &str = "Trading → Market (gRPC)";

/// The body of `POST /v1/orders`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PlaceOrder {
    pub symbol: String,
    pub side: Side,
    pub quantity: Decimal,
}

/// An order as Trading reports it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OrderReceipt {
    pub order_id: String,
    pub symbol: String,
    pub side: Side,
    pub quantity: Decimal,
    pub price: Decimal,
    pub settled: bool,
}

/// `GET /v1/stats`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TradingStats {
    pub orders: usize,
    pub settled: usize,
    pub price_updates_seen: u64,
    pub latency: std::collections::BTreeMap<String, PathStats>,
}

#[derive(Debug, Deserialize)]
struct WaitQuery {
    /// Answer once at least this many orders are settled (or after 10 s).
    settled_at_least: Option<usize>,
}

type PriceClient = BoxCloneSyncService<pb::GetPriceRequest, pb::Price, Error>;

struct TradingState {
    orders: Mutex<Vec<(String, OrderReceipt)>>,
    settled: watch::Sender<usize>,
    price_updates: Mutex<(u64, HashMap<String, Decimal>)>,
    market: PriceClient,
    events: EventBus,
    tasks: EventBus,
    latency: Latencies,
}

impl TradingState {
    async fn place(&self, user_id: &str, order: PlaceOrder) -> Result<OrderReceipt, Error> {
        if order.quantity <= Decimal::ZERO {
            return Err(Error::new(ErrorKind::Rejected, "quantity must be positive"));
        }
        let order_id = uuid::Uuid::new_v4().to_string();
        let started = Instant::now();
        let quote = self
            .market
            .clone()
            .oneshot(pb::GetPriceRequest {
                symbol: order.symbol.clone(),
            })
            .await;
        self.latency.record(PATH_TRADING_MARKET, started.elapsed());
        // Without a fresh price there is no fill: an order at a stale price
        // is a loss for someone. The caller gets a retryable error.
        let quote = quote.map_err(|error| match error.kind() {
            ErrorKind::NotFound | ErrorKind::Rejected => error,
            _ => Error::new(
                ErrorKind::Unavailable,
                format!("no price from Market, order not placed: {error}"),
            ),
        })?;
        let price: Decimal = quote.price.parse().map_err(|error| {
            Error::new(
                ErrorKind::Decode,
                format!("Market sent a bad price: {error}"),
            )
        })?;
        self.events
            .publish(OrderCreated {
                order_id: order_id.clone(),
                user_id: user_id.to_owned(),
                symbol: order.symbol.clone(),
                side: order.side,
                quantity: order.quantity,
            })
            .await?;
        // The demo fills at once at Market's price.
        self.events
            .publish(TradeExecuted {
                order_id: order_id.clone(),
                user_id: user_id.to_owned(),
                symbol: order.symbol.clone(),
                side: order.side,
                quantity: order.quantity,
                price,
            })
            .await?;
        let receipt = OrderReceipt {
            order_id: order_id.clone(),
            symbol: order.symbol.clone(),
            side: order.side,
            quantity: order.quantity,
            price,
            settled: false,
        };
        self.orders
            .lock()
            .expect("orders lock")
            .push((user_id.to_owned(), receipt.clone()));
        self.tasks
            .publish(SettlementRequested {
                order_id,
                user_id: user_id.to_owned(),
                symbol: order.symbol,
                side: order.side,
                quantity: order.quantity,
                price,
                amount: order.quantity * price,
            })
            .await?;
        Ok(receipt)
    }

    fn settle(&self, job: &SettlementRequested) {
        let mut orders = self.orders.lock().expect("orders lock");
        if let Some((_, receipt)) = orders
            .iter_mut()
            .find(|(_, receipt)| receipt.order_id == job.order_id && !receipt.settled)
        {
            receipt.settled = true;
            self.settled.send_modify(|settled| *settled += 1);
        }
    }

    fn stats(&self) -> TradingStats {
        TradingStats {
            orders: self.orders.lock().expect("orders lock").len(),
            settled: *self.settled.borrow(),
            price_updates_seen: self.price_updates.lock().expect("prices lock").0,
            latency: self.latency.snapshot(),
        }
    }
}

/// What Trading needs to start.
#[derive(Debug, Clone)]
pub struct TradingConfig {
    /// Where the HTTP gateway API listens.
    pub http: SocketAddr,
    /// Market's gRPC address.
    pub market_grpc: SocketAddr,
    /// Auth's key-signing key (public PEM), pinned: Trading learns Auth's
    /// token keys from announcements it signed, and checks tokens locally.
    pub auth_trust_anchor_pem: String,
    /// The resilience settings (strategy §4.1 and §4.3 by default).
    pub resilience: Resilience,
}

/// A running Trading service.
pub struct TradingService {
    state: Arc<TradingState>,
    verifier: Arc<TokenVerifier>,
    http: Option<Server>,
    addr: SocketAddr,
    market_breaker: CircuitBreakerLayer,
    consumers: Vec<ConsumerHandle>,
}

impl std::fmt::Debug for TradingService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TradingService")
            .field("addr", &self.addr)
            .finish()
    }
}

impl TradingService {
    /// Starts Trading.
    pub async fn start(brokers: &Brokers, config: TradingConfig) -> Result<Self, Error> {
        let (verifier, auth_keys) = super::auth_keys::follow_auth_keys(
            brokers,
            "trading-service",
            super::auth_service::TRADING_AUDIENCE,
            &config.auth_trust_anchor_pem,
        )
        .await?;
        let channel =
            tonic::transport::Endpoint::from_shared(format!("http://{}", config.market_grpc))
                .map_err(|error| Error::new(ErrorKind::Config, format!("Market address: {error}")))?
                .connect_timeout(Duration::from_secs(1))
                .connect_lazy();
        let prices = pb::prices_client::PricesClient::new(channel);
        let get_price = unary(
            prices,
            |mut client, request: pb::GetPriceRequest| async move { client.get_price(request).await },
        );
        let market_breaker = config.resilience.breaker("market");
        // A price lookup is a read: safe to send again after a timeout.
        let market = BoxCloneSyncService::new(
            config
                .resilience
                .clone()
                .idempotent()
                .client_with_breaker(&market_breaker, get_price),
        );
        let (settled, _) = watch::channel(0);
        let state = Arc::new(TradingState {
            orders: Mutex::default(),
            settled,
            price_updates: Mutex::default(),
            market,
            events: brokers.events("trading-service"),
            tasks: brokers.tasks("trading-service"),
            latency: Latencies::default(),
        });
        let prices_consumer = {
            let state = state.clone();
            brokers
                .events("trading-service")
                .subscribe(
                    SubscribeOptions::new(groups::TRADING),
                    handler_fn(move |message: Message<PriceUpdated>| {
                        let update = message.payload();
                        let mut prices = state.price_updates.lock().expect("prices lock");
                        prices.0 += 1;
                        prices.1.insert(update.symbol.clone(), update.price);
                        async { Ok::<_, Error>(()) }
                    }),
                )
                .await?
        };
        let settlement_worker = {
            let state = state.clone();
            brokers
                .tasks("settlement-worker")
                .subscribe(
                    SubscribeOptions::new(groups::SETTLEMENT),
                    handler_fn(move |message: Message<SettlementRequested>| {
                        state.settle(message.payload());
                        async { Ok::<_, Error>(()) }
                    }),
                )
                .await?
        };
        let listener = bind(config.http).await?;
        let addr = listener
            .local_addr()
            .map_err(|error| Error::new(ErrorKind::Connection, error.to_string()))?;
        let http = Server::http(listener, router(state.clone(), verifier.clone()));
        Ok(Self {
            state,
            verifier,
            http: Some(http),
            addr,
            market_breaker,
            consumers: vec![prices_consumer, settlement_worker, auth_keys],
        })
    }

    /// Where the gateway API listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The breaker on the Trading → Market path.
    pub fn market_breaker(&self) -> &CircuitBreakerLayer {
        &self.market_breaker
    }

    /// Takes the gateway API down.
    pub async fn stop(&mut self) {
        stop_all(self.http.take()).await;
    }

    /// Serves again on the same port.
    pub async fn restart(&mut self) -> Result<(), Error> {
        self.stop().await;
        let listener = bind(self.addr).await?;
        self.http = Some(Server::http(
            listener,
            router(self.state.clone(), self.verifier.clone()),
        ));
        Ok(())
    }

    /// Stops the server and drains the consumers.
    pub async fn shutdown(mut self) -> Result<(), Error> {
        self.stop().await;
        shut_down(&mut self.consumers).await
    }
}

fn router(state: Arc<TradingState>, verifier: Arc<TokenVerifier>) -> Router {
    let authenticated =
        Router::new()
            .route(
                "/v1/orders",
                post(
                    |State(state): State<Arc<TradingState>>,
                     Extension(claims): Extension<Claims>,
                     JsonBody(order): JsonBody<PlaceOrder>| async move {
                        state
                            .place(&claims.sub, order)
                            .await
                            .map(Json)
                            .map_err(ErrorResponse::from)
                    },
                )
                .get(
                    |State(state): State<Arc<TradingState>>,
                     Extension(claims): Extension<Claims>| async move {
                        let orders = state.orders.lock().expect("orders lock");
                        let mine: Vec<OrderReceipt> = orders
                            .iter()
                            .filter(|(user, _)| *user == claims.sub)
                            .map(|(_, receipt)| receipt.clone())
                            .collect();
                        Json(mine)
                    },
                ),
            )
            .route_layer(AuthLayer::new(verifier));
    Router::new()
        .route(
            "/health",
            get(|State(state): State<Arc<TradingState>>| async move {
                super::brokers::health_response(&[&state.events, &state.tasks])
            }),
        )
        .route(
            "/v1/stats",
            get(
                |State(state): State<Arc<TradingState>>, Query(wait): Query<WaitQuery>| async move {
                    if let Some(at_least) = wait.settled_at_least {
                        let mut settled = state.settled.subscribe();
                        let reached = settled.wait_for(|settled| *settled >= at_least);
                        let _ = tokio::time::timeout(Duration::from_secs(10), reached).await;
                    }
                    Json(state.stats())
                },
            ),
        )
        .merge(authenticated)
        .with_state(state)
}
