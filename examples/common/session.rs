//! The gateway in front of the four services, and the scripted session
//! `cargo run --example trading` plays through it.
//!
//! The gateway is where strategy §4.2's degradation is felt by a user, so it is
//! built from the library's pieces: a circuit breaker per service, and
//!
//! * Auth down → `Gate`: new registrations and logins refused; existing
//!   tokens keep working, since every service checks them locally;
//! * Trading down → `Gate`: read-only mode, orders refused with a clear
//!   error, reads (prices, holdings) served by Market and Game;
//! * Game down → `Fallback`: the last holdings snapshot, marked `basic`.
//!
//! (Market down is handled inside Game, with a `StaleCache`.)

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use reqwest::Method;
use rust_decimal::Decimal;
use rust_decimal_macros::dec;
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;
use switchboard::config::{CircuitBreakerConfig, ResilienceConfig, RetryConfig};
use switchboard::middleware::Resilience;
use switchboard::middleware::circuit_breaker::CircuitBreakerLayer;
use switchboard::middleware::fallback::{Access, Fallback, Gate};
use switchboard::{Error, ErrorKind};
use tower::util::BoxCloneSyncService;
use tower::{Service, ServiceExt};

use super::auth_service::{Credentials, Registered, Token};
use super::brokers;
use super::domain::Side;
use super::game_service::{Chart, GameStats, PATH_GAME_MARKET, PATH_TRADING_GAME, Portfolio};
use super::market_service::Quote;
use super::net::{Latencies, PathStats, from_reqwest, json_answer};
use super::trading_service::{OrderReceipt, PATH_TRADING_MARKET, PlaceOrder, TradingStats};

/// strategy §3's name for the path the gateway times.
pub const PATH_GATEWAY: &str = "Gateway → Service (HTTP)";

/// strategy §3: each path's P99 target.
pub const TARGETS: [(&str, Duration); 4] = [
    (PATH_GATEWAY, Duration::from_millis(50)),
    (PATH_TRADING_MARKET, Duration::from_millis(20)),
    (PATH_TRADING_GAME, Duration::from_millis(10)),
    (PATH_GAME_MARKET, Duration::from_millis(50)),
];

/// One HTTP call through the gateway.
#[derive(Debug, Clone)]
pub struct Call {
    pub access: Access,
    pub method: Method,
    pub path: String,
    pub token: Option<String>,
    pub body: Option<Value>,
}

impl Call {
    fn read(path: impl Into<String>, token: Option<&str>) -> Self {
        Self {
            access: Access::Read,
            method: Method::GET,
            path: path.into(),
            token: token.map(str::to_owned),
            body: None,
        }
    }

    fn write(path: impl Into<String>, token: Option<&str>, body: impl Serialize) -> Self {
        Self {
            access: Access::Write,
            method: Method::POST,
            path: path.into(),
            token: token.map(str::to_owned),
            body: Some(serde_json::to_value(body).expect("request bodies are JSON")),
        }
    }
}

/// One upstream service's HTTP API as a `tower::Service<Call>`.
#[derive(Debug, Clone)]
struct Rest {
    client: reqwest::Client,
    base: String,
}

impl Service<Call> for Rest {
    type Response = Value;
    type Error = Error;
    type Future = futures_util::future::BoxFuture<'static, Result<Value, Error>>;

    fn poll_ready(
        &mut self,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, call: Call) -> Self::Future {
        let mut request = self
            .client
            .request(call.method, format!("{}{}", self.base, call.path));
        if let Some(token) = &call.token {
            request = request.bearer_auth(token);
        }
        if let Some(body) = &call.body {
            request = request.json(body);
        }
        Box::pin(async move { json_answer(request.send().await.map_err(from_reqwest)?).await })
    }
}

type Upstream = BoxCloneSyncService<Call, Value, Error>;

/// Where the four services' HTTP APIs are.
#[derive(Debug, Clone, Copy)]
pub struct Addresses {
    pub auth: SocketAddr,
    pub trading: SocketAddr,
    pub market: SocketAddr,
    pub game: SocketAddr,
}

/// The gateway: one client per service, with breakers and degradation.
#[derive(Clone)]
pub struct Gateway {
    auth: Upstream,
    trading: Upstream,
    market: Upstream,
    game: Upstream,
    auth_breaker: CircuitBreakerLayer,
    trading_breaker: CircuitBreakerLayer,
    game_breaker: CircuitBreakerLayer,
    latency: Latencies,
}

impl std::fmt::Debug for Gateway {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gateway").finish_non_exhaustive()
    }
}

/// The gateway's resilience: strategy §4.1's breaker, but no retries — an order
/// is not idempotent, and a user can press the button again. The timeout
/// outlasts the services' publish deadline, so an order placed while a
/// broker restarts waits for it instead of failing.
pub fn gateway_resilience(breaker: CircuitBreakerConfig) -> Resilience {
    Resilience::new(
        ResilienceConfig::default()
            .with_circuit_breaker(breaker)
            .with_retry(RetryConfig::default().with_max_attempts(1)),
    )
    .with_timeout(brokers::PUBLISH_DEADLINE + Duration::from_secs(15))
}

fn access(call: &Call) -> Access {
    call.access
}

impl Gateway {
    /// A gateway to `addresses`, with `resilience` around each service.
    pub fn new(addresses: Addresses, resilience: &Resilience) -> Self {
        let client = reqwest::Client::new();
        let rest = |at: SocketAddr| Rest {
            client: client.clone(),
            base: format!("http://{at}"),
        };
        let auth_breaker = resilience.breaker("auth");
        let trading_breaker = resilience.breaker("trading");
        let game_breaker = resilience.breaker("game");
        let classify: fn(&Call) -> Access = access;
        let auth = Gate::new(
            resilience.client_with_breaker(&auth_breaker, rest(addresses.auth)),
            &auth_breaker,
            classify,
        );
        let trading = Gate::new(
            resilience.client_with_breaker(&trading_breaker, rest(addresses.trading)),
            &trading_breaker,
            classify,
        );
        let snapshots: Arc<Mutex<HashMap<String, Value>>> = Arc::default();
        let game = Fallback::new(
            Remember {
                inner: resilience.client_with_breaker(&game_breaker, rest(addresses.game)),
                snapshots: snapshots.clone(),
            },
            move |call: &Call, error: Error| {
                let key = call.path.split('?').next().unwrap_or_default();
                match snapshots.lock().expect("snapshots lock").get(key) {
                    Some(snapshot) => {
                        let mut basic = snapshot.clone();
                        basic["basic"] = Value::Bool(true);
                        Ok(basic)
                    }
                    None => Err(error),
                }
            },
        );
        Self {
            auth: BoxCloneSyncService::new(auth),
            trading: BoxCloneSyncService::new(trading),
            market: BoxCloneSyncService::new(resilience.client("market", rest(addresses.market))),
            game: BoxCloneSyncService::new(game),
            auth_breaker,
            trading_breaker,
            game_breaker,
            latency: Latencies::default(),
        }
    }

    pub fn auth_breaker(&self) -> &CircuitBreakerLayer {
        &self.auth_breaker
    }

    pub fn trading_breaker(&self) -> &CircuitBreakerLayer {
        &self.trading_breaker
    }

    pub fn game_breaker(&self) -> &CircuitBreakerLayer {
        &self.game_breaker
    }

    /// The gateway's own latency figures.
    pub fn latency(&self) -> &Latencies {
        &self.latency
    }

    async fn send<T: DeserializeOwned>(upstream: &Upstream, call: Call) -> Result<T, Error> {
        let value = upstream.clone().oneshot(call).await?;
        serde_json::from_value(value)
            .map_err(|error| Error::new(ErrorKind::Decode, format!("unexpected answer: {error}")))
    }

    /// Registers a user with Auth (refused while Auth is down).
    pub async fn register(&self, username: &str, password: &str) -> Result<String, Error> {
        let credentials = Credentials {
            username: username.into(),
            password: password.into(),
        };
        let call = Call::write("/v1/users", None, credentials);
        let registered: Registered = Self::send(&self.auth, call).await?;
        Ok(registered.user_id)
    }

    /// Auth's endpoints: a read, so it is served while new logins are
    /// refused, and it is the call that finds Auth back.
    pub async fn auth_endpoints(&self) -> Result<Value, Error> {
        Self::send(&self.auth, Call::read("/v1/endpoints", None)).await
    }

    /// Logs in: a new token from Auth (refused while Auth is down).
    pub async fn login(&self, username: &str, password: &str) -> Result<String, Error> {
        let credentials = Credentials {
            username: username.into(),
            password: password.into(),
        };
        let token: Token =
            Self::send(&self.auth, Call::write("/v1/tokens", None, credentials)).await?;
        Ok(token.token)
    }

    /// Places an order with Trading (refused in read-only mode).
    pub async fn place_order(&self, token: &str, order: PlaceOrder) -> Result<OrderReceipt, Error> {
        let started = Instant::now();
        let receipt =
            Self::send(&self.trading, Call::write("/v1/orders", Some(token), order)).await;
        self.latency.record(PATH_GATEWAY, started.elapsed());
        receipt
    }

    /// The user's orders, from Trading.
    pub async fn orders(&self, token: &str) -> Result<Vec<OrderReceipt>, Error> {
        Self::send(&self.trading, Call::read("/v1/orders", Some(token))).await
    }

    /// Every price, from Market (a read: served in read-only mode).
    pub async fn prices(&self) -> Result<BTreeMap<String, Quote>, Error> {
        Self::send(&self.market, Call::read("/v1/prices", None)).await
    }

    /// The user's holdings from Game, or the last snapshot marked `basic`
    /// while Game is down. With `trades_at_least`, Game answers once it has
    /// applied that many of the user's trades.
    pub async fn holdings(
        &self,
        token: &str,
        user_id: &str,
        trades_at_least: Option<u64>,
    ) -> Result<Portfolio, Error> {
        let mut path = format!("/v1/holdings/{user_id}");
        if let Some(trades) = trades_at_least {
            path.push_str(&format!("?trades_at_least={trades}"));
        }
        Self::send(&self.game, Call::read(path, Some(token))).await
    }

    /// A price chart: Game downloads Market's history file over HTTP/2.
    pub async fn chart(&self, token: &str, symbol: &str) -> Result<Chart, Error> {
        Self::send(
            &self.game,
            Call::read(format!("/v1/charts/{symbol}"), Some(token)),
        )
        .await
    }

    /// Trading's figures for `user_id`'s orders; waits until
    /// `settled_at_least` of them are settled.
    pub async fn trading_stats(
        &self,
        user_id: &str,
        settled_at_least: usize,
    ) -> Result<TradingStats, Error> {
        let path = format!("/v1/stats?settled_at_least={settled_at_least}&user={user_id}");
        Self::send(&self.trading, Call::read(path, None)).await
    }

    /// Game's figures.
    pub async fn game_stats(&self) -> Result<GameStats, Error> {
        Self::send(&self.game, Call::read("/v1/stats", None)).await
    }
}

/// Keeps the last good answer of each holdings read for the fallback.
#[derive(Clone)]
struct Remember<S> {
    inner: S,
    snapshots: Arc<Mutex<HashMap<String, Value>>>,
}

impl<S> Service<Call> for Remember<S>
where
    S: Service<Call, Response = Value, Error = Error>,
    S::Future: Send + 'static,
{
    type Response = Value;
    type Error = Error;
    type Future = futures_util::future::BoxFuture<'static, Result<Value, Error>>;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, call: Call) -> Self::Future {
        let key = call
            .path
            .starts_with("/v1/holdings/")
            .then(|| call.path.split('?').next().unwrap_or_default().to_owned());
        let future = self.inner.call(call);
        let snapshots = self.snapshots.clone();
        Box::pin(async move {
            let value = future.await?;
            if let Some(key) = key {
                snapshots
                    .lock()
                    .expect("snapshots lock")
                    .insert(key, value.clone());
            }
            Ok(value)
        })
    }
}

/// Listens to Market's `price.tick` broadcast (Redis Pub/Sub: at most once,
/// so the count may be short of the trades when a tick is missed) and counts
/// the ticks heard.
pub async fn listen_to_ticks(
    brokers: &super::brokers::Brokers,
) -> Result<(switchboard::ConsumerHandle, Arc<AtomicU64>), Error> {
    use super::domain::{PriceTick, groups};
    use switchboard::{Message, SubscribeOptions, handler_fn};

    let heard = Arc::new(AtomicU64::new(0));
    let count = heard.clone();
    let consumer = brokers
        .broadcast("gateway")
        .subscribe(
            SubscribeOptions::new(groups::TICKER),
            handler_fn(move |_: Message<PriceTick>| {
                count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                async { Ok::<_, Error>(()) }
            }),
        )
        .await?;
    Ok((consumer, heard))
}

/// How long the session waits, after its last order, for Game to apply
/// every trade and the settlement worker to settle every order: a broker
/// restart meanwhile delays them (the outboxes hold them), never loses them.
pub const CATCH_UP: Duration = Duration::from_secs(60);

/// What the scripted session did, for the caller (and the smoke test).
#[derive(Debug)]
pub struct Report {
    pub user_id: String,
    pub orders: usize,
    pub portfolio: Portfolio,
    pub settled: usize,
    pub latency: BTreeMap<String, PathStats>,
}

/// The scripted session: register, log in, place `orders` orders, watch
/// Game's holdings catch up, download a chart, wait for settlement, and
/// print what happened and each strategy §3 path's P50 / P99 beside its target.
pub async fn run(gateway: &Gateway, orders: usize) -> Result<Report, Error> {
    let username = format!("alice-{}", &uuid::Uuid::new_v4().simple().to_string()[..6]);
    let password = "correct horse battery";
    let user_id = gateway.register(&username, password).await?;
    println!("auth     registered {username} as {user_id}; user.registered published");
    let token = gateway.login(&username, password).await?;
    println!("auth     issued an Ed25519-signed token; Trading and Game check it locally");

    let plan = [
        ("AAPL", Side::Buy, dec!(10)),
        ("MSFT", Side::Buy, dec!(2.5)),
        ("NVDA", Side::Buy, dec!(40)),
        ("AAPL", Side::Sell, dec!(3)),
    ];
    let mut expected: BTreeMap<&str, Decimal> = BTreeMap::new();
    for i in 0..orders {
        let (symbol, side, quantity) = plan[i % plan.len()];
        let order = PlaceOrder {
            symbol: symbol.into(),
            side,
            quantity,
        };
        let receipt = gateway.place_order(&token, order).await?;
        *expected.entry(symbol).or_default() += side.signed(quantity);
        if i < plan.len() {
            println!(
                "trading  order {} {:?} {} {} filled at {} (price from Market over gRPC); order.created, trade.executed, settlement.requested sent",
                &receipt.order_id[..8],
                receipt.side,
                receipt.quantity,
                receipt.symbol,
                receipt.price
            );
        }
    }
    if orders > plan.len() {
        println!("trading  ... {} orders placed in all", orders);
    }

    // Game answers once it has applied them all or after 10 s; a broker
    // restart in between delays the trades (the outbox holds them), so ask
    // again until CATCH_UP is over.
    let deadline = Instant::now() + CATCH_UP;
    let portfolio = loop {
        let portfolio = match gateway
            .holdings(&token, &user_id, Some(orders as u64))
            .await
        {
            Ok(portfolio) => portfolio,
            // Game restarting (its answer cut, nothing kept to fall back
            // on yet): ask again until CATCH_UP is over.
            Err(error) if error.is_retryable() && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
            Err(error) => return Err(error),
        };
        if portfolio.trades_applied >= orders as u64 || Instant::now() >= deadline {
            break portfolio;
        }
        if portfolio.basic {
            // Game is down and the gateway answered from its snapshot.
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    };
    if portfolio.trades_applied != orders as u64 {
        return Err(Error::new(
            ErrorKind::Timeout,
            format!(
                "Game applied {} of {orders} trades within {} s",
                portfolio.trades_applied,
                CATCH_UP.as_secs()
            ),
        ));
    }
    println!(
        "game     applied {} trades for {}; holdings (valued with Market's HTTP price):",
        portfolio.trades_applied,
        portfolio.username.as_deref().unwrap_or("?")
    );
    for position in &portfolio.positions {
        println!(
            "           {:<5} {:>8} @ {:>8} = {:>10}{}",
            position.symbol,
            position.quantity,
            position
                .price
                .map_or_else(|| "-".to_owned(), |price| price.to_string()),
            position
                .value
                .map_or_else(|| "-".to_owned(), |value| value.round_dp(2).to_string()),
            if position.price_delayed {
                "  (delayed)"
            } else {
                ""
            }
        );
        let wanted = expected
            .get(position.symbol.as_str())
            .copied()
            .unwrap_or_default();
        if position.quantity != wanted {
            return Err(Error::new(
                ErrorKind::Rejected,
                format!(
                    "Game holds {} {} but the orders add up to {wanted}",
                    position.quantity, position.symbol
                ),
            ));
        }
    }
    // A player refreshing the page: more Game → Market samples.
    for _ in 0..10 {
        gateway.holdings(&token, &user_id, None).await?;
    }

    let chart = gateway.chart(&token, "AAPL").await?;
    println!(
        "game     downloaded AAPL's price history from Market over HTTP/2: {} points, {} bytes, last {}",
        chart.points,
        chart.bytes,
        chart
            .last_price
            .map_or_else(|| "-".into(), |price| price.to_string())
    );
    let trading = loop {
        let trading = gateway.trading_stats(&user_id, orders).await?;
        if trading.settled >= orders || Instant::now() >= deadline {
            break trading;
        }
    };
    if trading.settled < orders {
        return Err(Error::new(
            ErrorKind::Timeout,
            format!(
                "Trading settled {} of {orders} orders within {} s",
                trading.settled,
                CATCH_UP.as_secs()
            ),
        ));
    }
    println!(
        "trading  {} of {} settlement jobs done by the worker on the task queue; {} price.updated seen so far",
        trading.settled, trading.orders, trading.price_updates_seen
    );
    let game = gateway.game_stats().await?;
    println!(
        "game     {} players known ({} looked up in Auth over gRPC), {} price.updated seen so far; holding.changed published per trade",
        game.players, game.auth_lookups, game.price_updates_seen
    );

    let mut latency = gateway.latency().snapshot();
    latency.extend(trading.latency);
    latency.extend(game.latency);
    print_latency(&latency);
    Ok(Report {
        user_id,
        orders,
        portfolio,
        settled: trading.settled,
        latency,
    })
}

fn ms(micros: u64) -> String {
    format!("{:.2} ms", micros as f64 / 1000.0)
}

/// The strategy §3 table with this run's figures.
pub fn print_latency(latency: &BTreeMap<String, PathStats>) {
    println!();
    println!(
        "{:<28} {:>7} {:>10} {:>10} {:>12}  ",
        "strategy §3 path", "samples", "P50", "P99", "P99 target"
    );
    for (path, target) in TARGETS {
        match latency.get(path) {
            Some(stats) => {
                let within = Duration::from_micros(stats.p99_us) <= target;
                println!(
                    "{:<28} {:>7} {:>10} {:>10} {:>12}  {}",
                    path,
                    stats.count,
                    ms(stats.p50_us),
                    ms(stats.p99_us),
                    format!("{} ms", target.as_millis()),
                    if within { "ok" } else { "OVER" }
                );
            }
            None => println!("{path:<28} {:>7}", 0),
        }
    }
    if cfg!(debug_assertions) {
        println!(
            "(debug build; `cargo run --release --example trading` for representative figures)"
        );
    }
}
