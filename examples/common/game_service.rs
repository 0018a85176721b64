//! Game: keeps every player's holdings from `trade.executed`, learns players
//! from `user.registered` (and asks Auth over gRPC about one it has not
//! heard of), follows `price.updated`, publishes `holding.changed`, values
//! holdings with Market's HTTP price API, downloads price history from
//! Market's HTTP/2 file stream, and checks Auth's tokens locally.
//!
//! strategy §2: 📞 Game → Auth (gRPC), 📞 Game → Market (HTTP), ✉ Auth → Game
//! (token verification, no call). §5.2: consumes user.registered,
//! trade.executed and price.updated; publishes holding.changed.
//!
//! The ledger — players, holdings, every trade applied — is in the
//! database (`game_store`): a trade is applied through the inbox, its mark
//! and its effect in one transaction, so a trade delivered twice or
//! redelivered after a crash is applied once.
//!
//! Degradation (§4.2): Market down → the last price, flagged delayed with
//! its age (`StaleCache`).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{Path, Query, State};
use axum::routing::get;
use axum::{Json, Router};
use chrono::Utc;
use futures_util::StreamExt;
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use switchboard::auth::{AuthLayer, TokenVerifier};
use switchboard::middleware::Resilience;
use switchboard::middleware::circuit_breaker::CircuitBreakerLayer;
use switchboard::middleware::dead_letter::DeadLetterAlert;
use switchboard::middleware::fallback::{Freshness, StaleCache};
use switchboard::observe::BudgetChecks;
use switchboard::outbox::RelayHandle;
use switchboard::transfer::TransferClient;
use switchboard::transport::grpc::unary;
use switchboard::transport::http::{ErrorResponse, JsonService};
use switchboard::{
    ConsumerHandle, Error, ErrorKind, EventBus, Message, SubscribeOptions, handler_fn,
};
use tokio::sync::watch;
use tower::ServiceExt;
use tower::util::BoxCloneSyncService;

use super::brokers::Brokers;
use super::console::ServiceConsole;
use super::database::{Database, close_relays, outbox_sources, spawn_relays};
use super::domain::{PriceUpdated, TradeExecuted, UserRegistered, groups};
use super::game_store::{GameStore, TradeHandler};
use super::market_service::{Quote, QuoteRequest};
use super::net::{Latencies, PathStats, Server, bind, shut_down, stop_all};
use super::proto::auth as pb;

/// strategy §3's names for the paths Game times.
pub const PATH_TRADING_GAME: &str = "Trading → Game (Redis)";
pub const PATH_GAME_MARKET: &str = "Game → Market (HTTP)";

/// One position, valued.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Position {
    pub symbol: String,
    pub quantity: Decimal,
    /// Market's price; `None` when Market is down and no price was ever
    /// seen.
    pub price: Option<Decimal>,
    /// The price is an old one served while Market is down (strategy §4.2).
    pub price_delayed: bool,
    /// How old a delayed price is.
    pub price_age_ms: Option<u64>,
    pub value: Option<Decimal>,
}

/// A player's holdings as `GET /v1/holdings/{user}` answers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Portfolio {
    pub user_id: String,
    pub username: Option<String>,
    pub trades_applied: u64,
    pub positions: Vec<Position>,
    /// Set by a gateway serving its last snapshot while Game is down
    /// (strategy §4.2, "return basic data"); Game itself never sets it.
    #[serde(default)]
    pub basic: bool,
}

/// `GET /v1/charts/{symbol}`: what the history download brought.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Chart {
    pub symbol: String,
    pub points: usize,
    pub bytes: u64,
    pub last_price: Option<Decimal>,
}

/// `GET /v1/stats`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GameStats {
    pub players: usize,
    /// Players Game had to ask Auth about over gRPC (a trade came before
    /// their `user.registered`).
    pub auth_lookups: u64,
    pub trades_applied: u64,
    pub price_updates_seen: u64,
    pub latency: BTreeMap<String, PathStats>,
}

#[derive(Debug, Deserialize)]
struct WaitQuery {
    /// Answer once this user has at least this many trades applied (or
    /// after 10 s).
    trades_at_least: Option<u64>,
}

/// What Game counts in memory (figures, not state: the ledger is in the
/// database, `game_store`).
#[derive(Default)]
struct Counters {
    price_updates: u64,
    auth_lookups: u64,
}

type Quotes = StaleCache<
    switchboard::middleware::Client<JsonService<QuoteRequest, Quote>>,
    fn(&QuoteRequest) -> String,
    String,
    Quote,
>;
type Users = BoxCloneSyncService<pb::GetUserRequest, pb::User, Error>;

struct GameState {
    store: GameStore,
    trades: TradeHandler,
    counters: Mutex<Counters>,
    /// Bumped after every trade applied: wakes holdings waiters.
    changed: watch::Sender<u64>,
    quotes: Quotes,
    users: Users,
    market_transfer: SocketAddr,
    events: EventBus,
    latency: Latencies,
}

impl GameState {
    async fn on_trade(&self, message: Message<TradeExecuted>) -> Result<(), Error> {
        let trade = message.payload();
        if self.store.player(&trade.user_id).await?.is_none() {
            // trade.executed and user.registered travel on different
            // streams, so a trade can come first: ask Auth (outside the
            // ledger's transaction: no lock held over a call). A user Auth
            // has never heard of is a poison event (NotFound is not
            // retryable), and goes to the dead-letter queue.
            let user = self
                .users
                .clone()
                .oneshot(pb::GetUserRequest {
                    user_id: trade.user_id.clone(),
                })
                .await
                .map_err(|error| {
                    if error.kind() == ErrorKind::NotFound {
                        Error::permanent(format!(
                            "trade {} is for user {}, whom Auth does not know",
                            trade.order_id, trade.user_id
                        ))
                    } else {
                        error
                    }
                })?;
            self.counters.lock().expect("counters lock").auth_lookups += 1;
            self.store.add_player(&user.user_id, &user.username).await?;
        }
        let sent = message.envelope().timestamp();
        // Mark, holding, trade line and holding.changed in one transaction;
        // a duplicate finds its mark and changes nothing.
        self.trades.clone().oneshot(message).await?;
        self.changed.send_modify(|version| *version += 1);
        let took = (Utc::now() - sent).to_std().unwrap_or_default();
        self.latency.record(PATH_TRADING_GAME, took);
        Ok(())
    }

    /// Waits (at most `patience`) until `user_id` has at least `trades`
    /// trades applied.
    async fn wait_for_trades(
        &self,
        user_id: &str,
        trades: u64,
        patience: Duration,
    ) -> Result<(), Error> {
        let deadline = tokio::time::Instant::now() + patience;
        let mut changed = self.changed.subscribe();
        loop {
            changed.mark_unchanged();
            if self.store.trades_applied(Some(user_id)).await? >= trades {
                return Ok(());
            }
            let wake = tokio::time::timeout(Duration::from_millis(100), changed.changed());
            if tokio::time::timeout_at(deadline, wake).await.is_err() {
                return Ok(());
            }
        }
    }

    async fn portfolio(&self, user_id: &str) -> Result<Portfolio, Error> {
        let holdings = self.store.holdings(user_id).await?;
        let mut positions = Vec::new();
        for (symbol, quantity) in holdings.positions {
            let started = Instant::now();
            let quote = self
                .quotes
                .clone()
                .oneshot(QuoteRequest {
                    symbol: symbol.clone(),
                })
                .await;
            self.latency.record(PATH_GAME_MARKET, started.elapsed());
            let (price, price_delayed, price_age_ms) = match quote {
                Ok(cached) => match cached.freshness {
                    Freshness::Fresh => (Some(cached.value.price), false, None),
                    Freshness::Stale { age } => (
                        Some(cached.value.price),
                        true,
                        Some(u64::try_from(age.as_millis()).unwrap_or(u64::MAX)),
                    ),
                },
                Err(_) => (None, true, None),
            };
            positions.push(Position {
                symbol,
                quantity,
                price,
                price_delayed,
                price_age_ms,
                value: price.map(|price| price * quantity),
            });
        }
        Ok(Portfolio {
            user_id: user_id.to_owned(),
            username: holdings.username,
            trades_applied: holdings.trades_applied,
            positions,
            basic: false,
        })
    }

    async fn chart(&self, symbol: &str) -> Result<Chart, Error> {
        let client = TransferClient::connect(self.market_transfer).await?;
        let mut download = client.download(&format!("{symbol}.csv")).await?;
        let (mut bytes, mut text) = (0_u64, String::new());
        while let Some(chunk) = download.next().await {
            let chunk = chunk?;
            bytes += chunk.len() as u64;
            text.push_str(&String::from_utf8_lossy(&chunk));
        }
        let points: Vec<&str> = text.lines().skip(1).collect();
        let last_price = points
            .last()
            .and_then(|line| line.split(',').nth(1))
            .and_then(|price| price.parse().ok());
        Ok(Chart {
            symbol: symbol.to_owned(),
            points: points.len(),
            bytes,
            last_price,
        })
    }

    async fn stats(&self) -> Result<GameStats, Error> {
        let players = self.store.players().await? as usize;
        let trades_applied = self.store.trades_applied(None).await?;
        let counters = self.counters.lock().expect("counters lock");
        Ok(GameStats {
            players,
            auth_lookups: counters.auth_lookups,
            trades_applied,
            price_updates_seen: counters.price_updates,
            latency: self.latency.snapshot(),
        })
    }
}

/// What Game needs to start.
#[derive(Debug, Clone)]
pub struct GameConfig {
    pub http: SocketAddr,
    pub market_http: SocketAddr,
    pub market_transfer: SocketAddr,
    pub auth_grpc: SocketAddr,
    /// Auth's key-signing key (public PEM), pinned: Game learns Auth's
    /// token keys from announcements it signed.
    pub auth_trust_anchor_pem: String,
    pub resilience: Resilience,
    /// Told about every dead-lettered event (operations' pager).
    pub alert: Option<Arc<dyn DeadLetterAlert>>,
}

/// A running Game service.
pub struct GameService {
    state: Arc<GameState>,
    verifier: Arc<TokenVerifier>,
    http: Option<Server>,
    addr: SocketAddr,
    market_breaker: CircuitBreakerLayer,
    auth_breaker: CircuitBreakerLayer,
    consumers: Vec<ConsumerHandle>,
    relays: Vec<RelayHandle>,
    console: ServiceConsole,
    _budget_checks: BudgetChecks,
}

impl std::fmt::Debug for GameService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GameService")
            .field("addr", &self.addr)
            .finish()
    }
}

impl GameService {
    /// Starts Game on `database` (its tables created if missing), with the
    /// relay of its `holding.changed` events.
    pub async fn start(
        brokers: &Brokers,
        database: &Database,
        config: GameConfig,
    ) -> Result<Self, Error> {
        let store = GameStore::open(database, brokers).await?;
        let (verifier, auth_keys) = super::auth_keys::follow_auth_keys(
            brokers,
            "game-service",
            super::auth_service::GAME_AUDIENCE,
            &config.auth_trust_anchor_pem,
        )
        .await?;
        let resilience = config.resilience.clone();
        let market_breaker = resilience.breaker("market");
        let quote = JsonService::<QuoteRequest, Quote>::post(
            reqwest::Client::new(),
            format!("http://{}/v1/prices/quote", config.market_http),
        );
        let key: fn(&QuoteRequest) -> String = |request| request.symbol.clone();
        // Quotes and user lookups are reads: safe to send again after a
        // timeout. So are the ledger's handlers below: the inbox makes a
        // trade's second run a no-op.
        let reads = resilience.clone().idempotent();
        let quotes = StaleCache::new(
            reads.client_with_breaker(&market_breaker, quote),
            key,
            1_000,
        );
        let auth_breaker = resilience.breaker("auth");
        let channel =
            tonic::transport::Endpoint::from_shared(format!("http://{}", config.auth_grpc))
                .map_err(|error| Error::new(ErrorKind::Config, format!("Auth address: {error}")))?
                .connect_timeout(Duration::from_secs(1))
                .connect_lazy();
        let get_user = unary(
            pb::users_client::UsersClient::new(channel),
            |mut client, request: pb::GetUserRequest| async move { client.get_user(request).await },
        );
        let users = BoxCloneSyncService::new(reads.client_with_breaker(&auth_breaker, get_user));
        let (changed, _) = watch::channel(0);
        let (budgets, budget_checks) = super::console::budgets(&["trading_game", "game_market"]);
        let state = Arc::new(GameState {
            trades: store.trade_handler(),
            store: store.clone(),
            counters: Mutex::default(),
            changed,
            quotes,
            users,
            market_transfer: config.market_transfer,
            events: brokers.events("game-service"),
            latency: Latencies::with_budgets(budgets.clone()),
        });
        // A timed-out attempt at a trade rolled back, or committed with its
        // inbox mark: either way another attempt is safe, so a slow
        // database (or a process paused past the timeout) costs a retry,
        // not a dead letter.
        let mut handlers = resilience.clone().idempotent();
        if let Some(alert) = config.alert.clone() {
            handlers = handlers.with_alert(alert);
        }
        let bus = brokers.events("game-service");
        let trades = {
            let state = state.clone();
            bus.subscribe(
                SubscribeOptions::new(groups::GAME),
                handlers.consumer(
                    "ledger",
                    handler_fn(move |message: Message<TradeExecuted>| {
                        let state = state.clone();
                        async move { state.on_trade(message).await }
                    }),
                ),
            )
            .await?
        };
        // Players land in the same ledger: its timeout, a breaker of their own.
        let users = {
            let state = state.clone();
            bus.subscribe(
                SubscribeOptions::new(groups::GAME),
                handlers.path("ledger").consumer(
                    "players",
                    handler_fn(move |message: Message<UserRegistered>| {
                        // Recorded by its key: a second time changes nothing.
                        let state = state.clone();
                        async move {
                            let user = message.payload();
                            state.store.add_player(&user.user_id, &user.username).await
                        }
                    }),
                ),
            )
            .await?
        };
        let prices = {
            let state = state.clone();
            bus.subscribe(
                SubscribeOptions::new(groups::GAME),
                handler_fn(move |_: Message<PriceUpdated>| {
                    state.counters.lock().expect("counters lock").price_updates += 1;
                    async { Ok::<_, Error>(()) }
                }),
            )
            .await?
        };
        let listener = bind(config.http).await?;
        let addr = listener
            .local_addr()
            .map_err(|error| Error::new(ErrorKind::Connection, error.to_string()))?;
        let relays = spawn_relays(store.store(), brokers.events.clone(), None);
        let console = super::console::service_console(
            "game-service",
            brokers,
            &[&trades, &users, &prices, &auth_keys],
            &[&market_breaker, &auth_breaker],
            Some(&budgets),
            &[(&brokers.events, &[&trades, &users, &prices])],
            outbox_sources(store.store(), &relays),
        );
        let consumers = vec![trades, users, prices, auth_keys];
        let http = Server::http(listener, router(state.clone(), verifier.clone(), &console));
        Ok(Self {
            state,
            verifier,
            http: Some(http),
            addr,
            market_breaker,
            auth_breaker,
            consumers,
            relays,
            console,
            _budget_checks: budget_checks,
        })
    }

    /// Where Game's HTTP API listens.
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

    /// The breaker on the Game → Market path.
    pub fn market_breaker(&self) -> &CircuitBreakerLayer {
        &self.market_breaker
    }

    /// The breaker on the Game → Auth path.
    pub fn auth_breaker(&self) -> &CircuitBreakerLayer {
        &self.auth_breaker
    }

    /// A player's holdings, valued (what `GET /v1/holdings/{user}` answers).
    pub async fn portfolio(&self, user_id: &str) -> Result<Portfolio, Error> {
        self.state.portfolio(user_id).await
    }

    /// Waits until `user_id` has at least `trades` trades applied (for at
    /// most a minute).
    pub async fn wait_for_trades(&self, user_id: &str, trades: u64) {
        let _ = self
            .state
            .wait_for_trades(user_id, trades, Duration::from_secs(60))
            .await;
    }

    /// Takes the HTTP API down.
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

    /// Stops the server, drains the consumers and stops the relay.
    pub async fn shutdown(mut self) -> Result<(), Error> {
        self.stop().await;
        let consumers = shut_down(&mut self.consumers).await;
        close_relays(&mut self.relays).await?;
        consumers
    }
}

fn router(state: Arc<GameState>, verifier: Arc<TokenVerifier>, console: &ServiceConsole) -> Router {
    let authenticated = Router::new()
        .route(
            "/v1/holdings/{user_id}",
            get(
                |State(state): State<Arc<GameState>>,
                 Path(user_id): Path<String>,
                 Query(wait): Query<WaitQuery>| async move {
                    if let Some(at_least) = wait.trades_at_least {
                        state
                            .wait_for_trades(&user_id, at_least, Duration::from_secs(10))
                            .await
                            .map_err(ErrorResponse::from)?;
                    }
                    state
                        .portfolio(&user_id)
                        .await
                        .map(Json)
                        .map_err(ErrorResponse::from)
                },
            ),
        )
        .route(
            "/v1/charts/{symbol}",
            get(
                |State(state): State<Arc<GameState>>, Path(symbol): Path<String>| async move {
                    state
                        .chart(&symbol)
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
            get(|State(state): State<Arc<GameState>>| async move {
                super::brokers::health_response(&[&state.events])
            }),
        )
        .route(
            "/v1/stats",
            get(|State(state): State<Arc<GameState>>| async move {
                state.stats().await.map(Json).map_err(ErrorResponse::from)
            }),
        )
        .merge(authenticated)
        .with_state(state)
        .nest(super::console::MOUNT, console.console.router())
}
