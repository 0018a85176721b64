//! Market: serves prices over gRPC (for Trading) and HTTP (for Game),
//! consumes `trade.executed` and `order.created`, publishes `price.updated`
//! on Redis Streams and broadcasts `price.tick` on Redis Pub/Sub, and serves
//! each symbol's price history as a file streamed over HTTP/2.
//!
//! strategy §2: a callee only (📞 Trading → Market, 📞 Game → Market); it calls
//! nobody. §5.2: consumes trade.executed and order.created, publishes
//! price.updated.
//!
//! Prices and their history are in the database (`market_store`): a trade
//! moves its price through the inbox, with `price.updated` in the same
//! transaction (outbox).
//!
//! The price model is deliberately simple: each trade moves its symbol's
//! price by one tick in the trade's direction.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use async_trait::async_trait;
use axum::extract::{Path, State};
use axum::routing::{get, post};
use axum::{Json, Router};
use bytes::Bytes;
use chrono::Utc;
use rust_decimal::Decimal;
use rust_decimal_macros::dec;
use serde::{Deserialize, Serialize};
use switchboard::outbox::RelayHandle;
use switchboard::transfer::{ByteStream, FileStore, TransferServer};
use switchboard::transport::grpc::status_from_error;
use switchboard::transport::http::{ErrorResponse, JsonBody};
use switchboard::{
    ConsumerHandle, Error, ErrorKind, EventBus, Message, SubscribeOptions, handler_fn,
};
use tonic::{Request, Response, Status};
use tower::ServiceExt;

use super::brokers::Brokers;
use super::console::ServiceConsole;
use super::database::{Database, close_relays, outbox_sources, spawn_relays};
use super::domain::{OrderCreated, PriceTick, TradeExecuted, groups};
use super::market_store::{MarketStore, TradeHandler};
use super::net::{Server, bind, shut_down, stop_all};
use super::proto::market as pb;

/// One tick: how far a trade moves its symbol's price.
const TICK: Decimal = dec!(0.05);

/// The symbols Market quotes, with their opening prices.
pub fn opening_prices() -> Vec<(&'static str, Decimal)> {
    vec![
        ("AAPL", dec!(150.00)),
        ("MSFT", dec!(410.25)),
        ("NVDA", dec!(120.10)),
    ]
}

/// A price as Market's HTTP API answers it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Quote {
    pub symbol: String,
    pub price: Decimal,
    pub as_of_unix_ms: i64,
}

/// The body of `POST /v1/prices/quote`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct QuoteRequest {
    pub symbol: String,
}

/// What Market has seen, for `GET /v1/stats`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct MarketStats {
    pub orders_seen: u64,
    pub trades_seen: u64,
}

struct MarketState {
    store: MarketStore,
    trades: TradeHandler,
    orders_seen: AtomicU64,
    trades_seen: AtomicU64,
    broadcast: EventBus,
    /// For `/health`: where the relay sends price.updated.
    events: EventBus,
}

impl MarketState {
    async fn quote(&self, symbol: &str) -> Result<Quote, Error> {
        match self.store.quote(symbol).await? {
            Some((price, as_of_unix_ms)) => Ok(Quote {
                symbol: symbol.to_owned(),
                price,
                as_of_unix_ms,
            }),
            None => Err(Error::new(
                ErrorKind::NotFound,
                format!("Market does not quote {symbol}"),
            )),
        }
    }

    async fn on_trade(&self, message: Message<TradeExecuted>) -> Result<(), Error> {
        self.trades_seen.fetch_add(1, Ordering::SeqCst);
        let symbol = message.payload().symbol.clone();
        // The price, its history line and price.updated commit with the
        // inbox mark: a trade delivered twice moves the price once.
        self.trades.clone().oneshot(message).await?;
        // A tick nobody hears is not an error: broadcast is at most once.
        if let Ok(quote) = self.quote(&symbol).await {
            let tick = PriceTick {
                symbol,
                price: quote.price,
            };
            if let Err(error) = self.broadcast.publish(tick).await {
                tracing::debug!(%error, "tick not broadcast");
            }
        }
        Ok(())
    }

    async fn history_csv(&self, symbol: &str) -> Result<Option<Vec<Bytes>>, Error> {
        let points = self.store.history(symbol).await?;
        if points.is_empty() {
            return Ok(None);
        }
        let mut lines = vec![Bytes::from_static(b"unix_ms,price\n")];
        lines.extend(
            points
                .iter()
                .map(|(at, price)| Bytes::from(format!("{at},{price}\n"))),
        );
        Ok(Some(lines))
    }
}

/// The price-history files (`AAPL.csv`, ...) as a read-only `FileStore`,
/// made 64 lines to a chunk as the download pulls them (fewer, fuller
/// frames than a line each).
struct HistoryFiles(Arc<MarketState>);

#[async_trait]
impl FileStore for HistoryFiles {
    async fn put(&self, name: &str, _chunks: ByteStream) -> Result<u64, Error> {
        Err(Error::new(
            ErrorKind::Rejected,
            format!("price history is read-only; cannot store {name}"),
        ))
    }

    async fn get(&self, name: &str) -> Result<(ByteStream, Option<u64>), Error> {
        let not_found = || Error::new(ErrorKind::NotFound, format!("no price history {name}"));
        let symbol = name.strip_suffix(".csv").ok_or_else(not_found)?;
        let lines = self.0.history_csv(symbol).await?.ok_or_else(not_found)?;
        let length = lines.iter().map(|line| line.len() as u64).sum();
        let chunks: Vec<Bytes> = lines
            .chunks(64)
            .map(|group| Bytes::from(group.concat()))
            .collect();
        let stream = futures_util::stream::iter(chunks.into_iter().map(Ok));
        Ok((Box::pin(stream), Some(length)))
    }
}

/// Where Market listens.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct MarketAddrs {
    pub http: SocketAddr,
    pub grpc: SocketAddr,
    pub transfer: SocketAddr,
}

/// A running Market service.
pub struct MarketService {
    state: Arc<MarketState>,
    servers: Vec<Server>,
    consumers: Vec<ConsumerHandle>,
    relays: Vec<RelayHandle>,
    addrs: MarketAddrs,
    console: ServiceConsole,
}

impl std::fmt::Debug for MarketService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MarketService")
            .field("addrs", &self.addrs)
            .finish()
    }
}

impl MarketService {
    /// Starts Market on `database` (its tables created if missing, opening
    /// prices for symbols it never quoted): HTTP on `http`, gRPC and the
    /// history transfer on any free ports (announced by `GET
    /// /v1/endpoints`), the relay of its `price.updated` events.
    pub async fn start(
        brokers: &Brokers,
        database: &Database,
        http: SocketAddr,
    ) -> Result<Self, Error> {
        let store = MarketStore::open(
            database,
            brokers,
            &opening_prices(),
            Utc::now().timestamp_millis(),
        )
        .await?;
        let state = Arc::new(MarketState {
            trades: store.trade_handler(TICK),
            store: store.clone(),
            orders_seen: AtomicU64::new(0),
            trades_seen: AtomicU64::new(0),
            events: brokers.events("market-service"),
            broadcast: brokers.broadcast("market-service"),
        });
        let consumers = vec![
            {
                let state = state.clone();
                state
                    .events
                    .clone()
                    .subscribe(
                        SubscribeOptions::new(groups::MARKET),
                        handler_fn(move |message: Message<TradeExecuted>| {
                            let state = state.clone();
                            async move { state.on_trade(message).await }
                        }),
                    )
                    .await?
            },
            {
                let state = state.clone();
                state
                    .events
                    .clone()
                    .subscribe(
                        SubscribeOptions::new(groups::MARKET),
                        handler_fn(move |_: Message<OrderCreated>| {
                            state.orders_seen.fetch_add(1, Ordering::SeqCst);
                            async { Ok::<_, Error>(()) }
                        }),
                    )
                    .await?
            },
        ];
        let http_listener = bind(http).await?;
        let grpc_listener = bind(SocketAddr::new(http.ip(), 0)).await?;
        let transfer_listener = bind(SocketAddr::new(http.ip(), 0)).await?;
        let local = |listener: &tokio::net::TcpListener| {
            listener
                .local_addr()
                .map_err(|error| Error::new(ErrorKind::Connection, error.to_string()))
        };
        let addrs = MarketAddrs {
            http: local(&http_listener)?,
            grpc: local(&grpc_listener)?,
            transfer: local(&transfer_listener)?,
        };
        let relays = spawn_relays(store.store(), brokers.events.clone(), None);
        let console = super::console::service_console(
            "market-service",
            brokers,
            &consumers.iter().collect::<Vec<_>>(),
            &[],
            None,
            &[(&brokers.events, &consumers.iter().collect::<Vec<_>>())],
            outbox_sources(store.store(), &relays),
        );
        let mut service = Self {
            state,
            servers: Vec::new(),
            consumers,
            relays,
            addrs,
            console,
        };
        service.serve(http_listener, grpc_listener, transfer_listener);
        Ok(service)
    }

    fn serve(
        &mut self,
        http: tokio::net::TcpListener,
        grpc: tokio::net::TcpListener,
        transfer: tokio::net::TcpListener,
    ) {
        let prices = pb::prices_server::PricesServer::new(PricesGrpc(self.state.clone()));
        let files = TransferServer::new(Arc::new(HistoryFiles(self.state.clone())));
        self.servers = vec![
            Server::http(
                http,
                router(self.state.clone(), self.addrs)
                    .nest(super::console::MOUNT, self.console.console.router()),
            ),
            Server::grpc(grpc, tonic::service::Routes::new(prices)),
            Server::transfer(transfer, files),
        ];
    }

    /// Where it listens.
    pub fn addrs(&self) -> MarketAddrs {
        self.addrs
    }

    /// The operator console's URL.
    pub fn console_url(&self) -> String {
        format!("http://{}{}", self.addrs.http, super::console::MOUNT)
    }

    /// The token the console's actions need.
    pub fn console_token(&self) -> &str {
        &self.console.token
    }

    /// Takes every server down (consumers keep running: Market being
    /// unreachable is what the tests simulate).
    pub async fn stop(&mut self) {
        stop_all(self.servers.drain(..)).await;
    }

    /// Serves again on the same ports.
    pub async fn restart(&mut self) -> Result<(), Error> {
        self.stop().await;
        let http = bind(self.addrs.http).await?;
        let grpc = bind(self.addrs.grpc).await?;
        let transfer = bind(self.addrs.transfer).await?;
        self.serve(http, grpc, transfer);
        Ok(())
    }

    /// Stops servers, drains consumers and stops the relay.
    pub async fn shutdown(mut self) -> Result<(), Error> {
        self.stop().await;
        let consumers = shut_down(&mut self.consumers).await;
        close_relays(&mut self.relays).await?;
        consumers
    }
}

fn router(state: Arc<MarketState>, addrs: MarketAddrs) -> Router {
    Router::new()
        .route(
            "/health",
            get(|State(state): State<Arc<MarketState>>| async move {
                super::brokers::health_response(&[&state.events, &state.broadcast])
            }),
        )
        .route("/v1/endpoints", get(move || async move { Json(addrs) }))
        .route(
            "/v1/prices/quote",
            post(
                |State(state): State<Arc<MarketState>>,
                 JsonBody(request): JsonBody<QuoteRequest>| async move {
                    state
                        .quote(&request.symbol)
                        .await
                        .map(Json)
                        .map_err(ErrorResponse::from)
                },
            ),
        )
        .route(
            "/v1/prices",
            get(|State(state): State<Arc<MarketState>>| async move {
                let prices = state.store.all().await.map_err(ErrorResponse::from)?;
                let all: BTreeMap<String, Quote> = prices
                    .into_iter()
                    .map(|(symbol, price, as_of_unix_ms)| {
                        let quote = Quote {
                            symbol: symbol.clone(),
                            price,
                            as_of_unix_ms,
                        };
                        (symbol, quote)
                    })
                    .collect();
                Ok::<_, ErrorResponse>(Json(all))
            }),
        )
        .route(
            "/v1/prices/{symbol}",
            get(
                |State(state): State<Arc<MarketState>>, Path(symbol): Path<String>| async move {
                    state
                        .quote(&symbol)
                        .await
                        .map(Json)
                        .map_err(ErrorResponse::from)
                },
            ),
        )
        .route(
            "/v1/stats",
            get(|State(state): State<Arc<MarketState>>| async move {
                Json(MarketStats {
                    orders_seen: state.orders_seen.load(Ordering::SeqCst),
                    trades_seen: state.trades_seen.load(Ordering::SeqCst),
                })
            }),
        )
        .with_state(state)
}

struct PricesGrpc(Arc<MarketState>);

#[tonic::async_trait]
impl pb::prices_server::Prices for PricesGrpc {
    async fn get_price(
        &self,
        request: Request<pb::GetPriceRequest>,
    ) -> Result<Response<pb::Price>, Status> {
        let quote = self
            .0
            .quote(&request.into_inner().symbol)
            .await
            .map_err(|error| status_from_error(&error))?;
        Ok(Response::new(pb::Price {
            symbol: quote.symbol,
            price: quote.price.to_string(),
            as_of_unix_ms: quote.as_of_unix_ms,
        }))
    }
}
