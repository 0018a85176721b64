//! Trading: takes orders over the HTTP gateway API (a token from Auth
//! required, checked locally), asks Market for the price over gRPC before
//! filling, publishes `order.created` and `trade.executed`, and hands each
//! fill's settlement to the task queue (RabbitMQ) as `settlement.requested`,
//! which its own settlement worker takes off the queue.
//!
//! strategy §2: 📞 Trading → Market (gRPC), 📢 Trading → Game (events on Redis
//! Streams). §5.2: publishes trade.executed and order.created, consumes
//! price.updated.
//!
//! Orders live in the database (`trading_store`): an order, its two events
//! and its settlement job commit in one transaction, and the relays send
//! them once committed — a broker outage delays them, never loses them.

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
use switchboard::observe::BudgetChecks;
use switchboard::outbox::RelayHandle;
use switchboard::transport::grpc::unary;
use switchboard::transport::http::{ErrorResponse, JsonBody};
use switchboard::{
    ConsumerHandle, Error, ErrorKind, EventBus, Message, SubscribeOptions, handler_fn,
};
use tokio::sync::watch;
use tower::ServiceExt;
use tower::util::BoxCloneSyncService;

use super::brokers::Brokers;
use super::console::ServiceConsole;
use super::database::{Database, close_relays, outbox_sources, spawn_relays};
use super::domain::{PriceUpdated, SettlementRequested, Side, groups};
use super::net::{Latencies, PathStats, Server, bind, shut_down, stop_all};
use super::proto::market as pb;
use super::trading_store::TradingStore;

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
    /// Count only this user's orders.
    user: Option<String>,
}

type PriceClient = BoxCloneSyncService<pb::GetPriceRequest, pb::Price, Error>;

struct TradingState {
    store: TradingStore,
    /// Bumped whenever an order is settled: wakes `GET /v1/stats` waiters.
    settled: watch::Sender<u64>,
    price_updates: Mutex<(u64, HashMap<String, Decimal>)>,
    market: PriceClient,
    latency: Latencies,
    /// For `/health`.
    events: EventBus,
    tasks: EventBus,
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
        // The demo fills at once at Market's price. The order, its
        // order.created and trade.executed and its settlement job commit
        // together; the relays send them once committed, however long a
        // broker is away.
        let receipt = OrderReceipt {
            order_id,
            symbol: order.symbol,
            side: order.side,
            quantity: order.quantity,
            price,
            settled: false,
        };
        self.store
            .place(user_id, &receipt, chrono::Utc::now().timestamp_millis())
            .await?;
        Ok(receipt)
    }

    /// Waits (at most 10 s) until at least `at_least` orders (of `user`, or
    /// of everyone) are settled.
    async fn wait_settled(&self, user: Option<&str>, at_least: usize) -> Result<(), Error> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        let mut settled = self.settled.subscribe();
        loop {
            settled.mark_unchanged();
            if self.store.counts(user).await?.1 >= at_least {
                return Ok(());
            }
            // Settled by another process (a restarted Trading's worker) or
            // missed: look again at least every 100 ms.
            let wake = tokio::time::timeout(Duration::from_millis(100), settled.changed());
            if tokio::time::timeout_at(deadline, wake).await.is_err() {
                return Ok(());
            }
        }
    }

    async fn stats(&self, user: Option<&str>) -> Result<TradingStats, Error> {
        let (orders, settled) = self.store.counts(user).await?;
        Ok(TradingStats {
            orders,
            settled,
            price_updates_seen: self.price_updates.lock().expect("prices lock").0,
            latency: self.latency.snapshot(),
        })
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
    relays: Vec<RelayHandle>,
    console: ServiceConsole,
    _budget_checks: BudgetChecks,
}

impl std::fmt::Debug for TradingService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TradingService")
            .field("addr", &self.addr)
            .finish()
    }
}

impl TradingService {
    /// Starts Trading on `database` (its tables created if missing); the
    /// relays start after the subscriptions, so the settlement queue exists
    /// before the first job is sent, and send what a previous run left.
    pub async fn start(
        brokers: &Brokers,
        database: &Database,
        config: TradingConfig,
    ) -> Result<Self, Error> {
        let store = TradingStore::open(database, brokers).await?;
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
        let (budgets, budget_checks) = super::console::budgets(&["trading_market"]);
        let state = Arc::new(TradingState {
            store: store.clone(),
            settled,
            price_updates: Mutex::default(),
            market,
            events: brokers.events("trading-service"),
            tasks: brokers.tasks("trading-service"),
            latency: Latencies::with_budgets(budgets.clone()),
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
            let settle = store.settle_handler();
            brokers
                .tasks("settlement-worker")
                .subscribe(
                    SubscribeOptions::new(groups::SETTLEMENT),
                    handler_fn(move |message: Message<SettlementRequested>| {
                        let (state, settle) = (state.clone(), settle.clone());
                        async move {
                            settle.oneshot(message).await?;
                            state.settled.send_modify(|settled| *settled += 1);
                            Ok::<_, Error>(())
                        }
                    }),
                )
                .await?
        };
        let relays = spawn_relays(
            store.store(),
            brokers.events.clone(),
            Some(brokers.tasks.clone()),
        );
        let listener = bind(config.http).await?;
        let addr = listener
            .local_addr()
            .map_err(|error| Error::new(ErrorKind::Connection, error.to_string()))?;
        let console = super::console::service_console(
            "trading-service",
            brokers,
            &[&prices_consumer, &settlement_worker, &auth_keys],
            &[&market_breaker],
            Some(&budgets),
            &[
                (&brokers.events, &[&prices_consumer]),
                (&brokers.tasks, &[&settlement_worker]),
            ],
            outbox_sources(store.store(), &relays),
        );
        let http = Server::http(listener, router(state.clone(), verifier.clone(), &console));
        Ok(Self {
            state,
            verifier,
            http: Some(http),
            addr,
            market_breaker,
            consumers: vec![prices_consumer, settlement_worker, auth_keys],
            relays,
            console,
            _budget_checks: budget_checks,
        })
    }

    /// Where the gateway API listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The operator console's URL.
    pub fn console_url(&self) -> String {
        format!("http://{}{}", self.addr, super::console::MOUNT)
    }

    /// The token the console's actions need.
    pub fn console_token(&self) -> &str {
        &self.console.token
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
            router(self.state.clone(), self.verifier.clone(), &self.console),
        ));
        Ok(())
    }

    /// Stops the server, drains the consumers and stops the relays.
    pub async fn shutdown(mut self) -> Result<(), Error> {
        self.stop().await;
        let consumers = shut_down(&mut self.consumers).await;
        close_relays(&mut self.relays).await?;
        consumers
    }
}

fn router(
    state: Arc<TradingState>,
    verifier: Arc<TokenVerifier>,
    console: &ServiceConsole,
) -> Router {
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
                        state
                            .store
                            .orders_of(&claims.sub)
                            .await
                            .map(Json)
                            .map_err(ErrorResponse::from)
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
                    let user = wait.user.as_deref();
                    if let Some(at_least) = wait.settled_at_least {
                        state
                            .wait_settled(user, at_least)
                            .await
                            .map_err(ErrorResponse::from)?;
                    }
                    state
                        .stats(user)
                        .await
                        .map(Json)
                        .map_err(ErrorResponse::from)
                },
            ),
        )
        .merge(authenticated)
        .with_state(state)
        .nest(super::console::MOUNT, console.console.router())
}
