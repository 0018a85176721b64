//! The operator console: one page per service that shows what the service
//! holds — its transports, consumers, circuit breakers, latency budgets,
//! dead letters and outbox — and redrives dead letters with a click.
//!
//! [`Console::builder`] takes the handles the service already has and
//! [`Console::router`] (or [`router`]) returns an axum [`Router`] to mount,
//! for example under `/console`. Everything it serves comes from this crate:
//! server-rendered HTML, one small plain script (refresh every two seconds,
//! the redrive buttons with a confirmation), one stylesheet, inline SVG
//! charts — no CDN, no build step, no framework — and a JSON API under the
//! same router for scripts:
//!
//! | Route | Answers |
//! |---|---|
//! | `GET /` | the page |
//! | `GET /fragment` | the page's sections (what the script refreshes) |
//! | `GET /dead-letters/{topic}/{id}` | one dead letter, its envelope with long values cut |
//! | `GET /api/overview` | everything the page shows, as JSON |
//! | `GET /api/dead-letters/{topic}[?limit=N]` | a topic's dead letters |
//! | `GET /api/dead-letters/{topic}/{id}` | one dead letter |
//! | `POST /api/dead-letters/{topic}/{id}/redrive` | redrive one (an action) |
//! | `POST /api/dead-letters/{topic}/redrive-all` | redrive a topic's (an action) |
//!
//! # Actions
//!
//! An action is refused with 403 when a browser sent it from another site
//! (its `Origin` is not the console's host, or `Sec-Fetch-Site` says
//! cross-site), with 403 when the console is [read-only](ConsoleBuilder::read_only),
//! and with 401 without `Authorization: Bearer` carrying the
//! [operator token](ConsoleBuilder::operator_token) or a token the
//! [verifier](ConsoleBuilder::verifier) accepts. A console given neither
//! refuses every action. Every action, done or refused, is logged (target
//! `switchboard::console`) with who did it: the token's subject, or
//! `operator-token`.
//!
//! # Bounded
//!
//! The console shares the service's runtime, so it never waits long on
//! anyone: each read of a broker or a database runs under a time limit
//! (2 s, actions 10 s), lists stop at a limit (50 letters a topic), and at
//! most four reads run at once however many browsers look (past that a
//! request waits up to the read limit, then gets 503); a slow source shows
//! as "no answer", and the rest of the page renders.
//! Unknown topics and ids are 404, malformed ones 400.
//!
//! ```
//! use std::sync::Arc;
//! use std::time::Duration;
//! use serde::{Deserialize, Serialize};
//! use switchboard::config::CircuitBreakerConfig;
//! use switchboard::console::Console;
//! use switchboard::middleware::circuit_breaker::CircuitBreakerLayer;
//! use switchboard::middleware::dead_letter::DeadLetterAdmin;
//! use switchboard::observe::{BudgetConfig, LatencyBudgets};
//! use switchboard::{Error, Event, EventBus, MemoryTransport, Message, SubscribeOptions, handler_fn};
//! use tower::ServiceExt;
//!
//! #[derive(Debug, Clone, Serialize, Deserialize)]
//! struct Trade { qty: u32 }
//! impl Event for Trade {
//!     const TYPE: &'static str = "trade.executed";
//!     const VERSION: &'static str = "1.0";
//! }
//!
//! # tokio::runtime::Runtime::new().unwrap().block_on(async {
//! let transport = Arc::new(MemoryTransport::new());
//! let bus = EventBus::new(transport.clone(), "game");
//! let ledger = bus
//!     .subscribe(SubscribeOptions::new("game"), handler_fn(|_: Message<Trade>| async {
//!         Err::<(), _>(Error::permanent("unknown player"))
//!     }))
//!     .await?;
//! let market = CircuitBreakerLayer::named("market", CircuitBreakerConfig::default());
//! let budgets = LatencyBudgets::new(&BudgetConfig::spec());
//!
//! let console = Console::builder("game")
//!     .bus("events", &bus)
//!     .consumer(&ledger)
//!     .breaker(&market)
//!     .budgets(&budgets)
//!     .dead_letters(DeadLetterAdmin::new(transport.clone()), ["trade.executed"])
//!     .operator_token("a long random operator token")
//!     .build();
//! let app = axum::Router::new().nest("/console", console.router());
//!
//! bus.publish(Trade { qty: 3 }).await?;
//! # while ledger.stats().failed == 0 { tokio::task::yield_now().await; }
//! let get = |uri: &str| axum::http::Request::get(uri).body(axum::body::Body::empty()).unwrap();
//! let page = app.clone().oneshot(get("/console")).await.unwrap();
//! assert_eq!(page.status(), 200);
//! let overview = app.clone().oneshot(get("/console/api/overview")).await.unwrap();
//! assert_eq!(overview.status(), 200);
//!
//! // An action without the operator's token is refused.
//! let redrive = axum::http::Request::post("/console/api/dead-letters/trade.executed/redrive-all")
//!     .body(axum::body::Body::empty())
//!     .unwrap();
//! assert_eq!(app.clone().oneshot(redrive).await.unwrap().status(), 401);
//! // An unknown topic is a 404, not a failure.
//! let unknown = app.oneshot(get("/console/api/dead-letters/nope")).await.unwrap();
//! assert_eq!(unknown.status(), 404);
//! # Ok::<(), switchboard::Error>(())
//! # }).unwrap();
//! ```

mod auth;
mod chart;
mod inspect;
#[cfg(feature = "outbox")]
mod outbox;
mod page;
mod routes;
#[cfg(test)]
mod stall_tests;
mod view;

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;

#[cfg(feature = "outbox")]
pub use self::outbox::OutboxSource;
use crate::middleware::circuit_breaker::CircuitBreakerLayer;
use crate::middleware::dead_letter::DeadLetterAdmin;
use crate::observe::LatencyBudgets;
use crate::{ConsumerHandle, ConsumerMonitor, EventBus};

/// How long the console waits on one source, and how much it lists.
#[derive(Debug, Clone, Copy)]
struct Limits {
    timeout: Duration,
    action_timeout: Duration,
    list: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            timeout: Duration::from_secs(2),
            action_timeout: Duration::from_secs(10),
            list: 50,
        }
    }
}

/// What the console reads from, shared by its handlers.
struct Sources {
    service: String,
    buses: Vec<(String, EventBus)>,
    consumers: Vec<ConsumerMonitor>,
    breakers: Vec<CircuitBreakerLayer>,
    budgets: Option<LatencyBudgets>,
    dead_letters: BTreeMap<String, DeadLetterAdmin>,
    #[cfg(feature = "outbox")]
    outboxes: Vec<OutboxSource>,
    operators: auth::Operators,
    read_only: bool,
    limits: Limits,
    /// Reads of brokers and databases in flight at once, across every
    /// browser and script looking: past it a request waits (within the
    /// read time limit), then is refused with 503.
    reads: tokio::sync::Semaphore,
}

/// How many console reads run at once.
const CONCURRENT_READS: usize = 4;

/// A service's operator console; see the [module docs](self).
#[derive(Clone)]
pub struct Console {
    sources: Arc<Sources>,
}

impl Console {
    /// Starts describing the console of the service called `service` (the
    /// page's title).
    pub fn builder(service: impl Into<String>) -> ConsoleBuilder {
        ConsoleBuilder {
            sources: Sources {
                service: service.into(),
                buses: Vec::new(),
                consumers: Vec::new(),
                breakers: Vec::new(),
                budgets: None,
                dead_letters: BTreeMap::new(),
                #[cfg(feature = "outbox")]
                outboxes: Vec::new(),
                operators: auth::Operators::default(),
                read_only: false,
                limits: Limits::default(),
                reads: tokio::sync::Semaphore::new(CONCURRENT_READS),
            },
        }
    }

    /// The console's routes, to mount with [`Router::nest`] (such as under
    /// `/console`) or serve as they are.
    pub fn router(&self) -> Router {
        routes::routes(self.sources.clone())
    }

    /// Whether actions are refused whatever the token.
    pub fn is_read_only(&self) -> bool {
        self.sources.read_only
    }
}

impl fmt::Debug for Console {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Console")
            .field("service", &self.sources.service)
            .field("consumers", &self.sources.consumers.len())
            .field("breakers", &self.sources.breakers.len())
            .field(
                "topics",
                &self.sources.dead_letters.keys().collect::<Vec<_>>(),
            )
            .field("operators", &self.sources.operators)
            .field("read_only", &self.sources.read_only)
            .finish()
    }
}

/// The routes of `console` (the same as [`Console::router`]).
pub fn router(console: &Console) -> Router {
    console.router()
}

/// Describes a [`Console`]: what it shows and who may act from it.
pub struct ConsoleBuilder {
    sources: Sources,
}

impl ConsoleBuilder {
    /// Shows `bus`'s transport and its connection state, as `name`.
    pub fn bus(mut self, name: impl Into<String>, bus: &EventBus) -> Self {
        self.sources.buses.push((name.into(), bus.clone()));
        self
    }

    /// Shows a consumer: topic, group, state, in flight, handled, failed
    /// and its last error. The console only watches it: dropping the
    /// handle still stops the consumer.
    pub fn consumer(self, handle: &ConsumerHandle) -> Self {
        self.consumer_monitor(handle.monitor())
    }

    /// Shows a consumer by its [`ConsumerMonitor`].
    pub fn consumer_monitor(mut self, monitor: ConsumerMonitor) -> Self {
        self.sources.consumers.push(monitor);
        self
    }

    /// Shows a circuit breaker: state, since when, failures.
    pub fn breaker(mut self, breaker: &CircuitBreakerLayer) -> Self {
        self.sources.breakers.push(breaker.clone());
        self
    }

    /// Shows every path of `budgets` — P50 and P99 of its recent checks
    /// against the P99 target, charted. The history comes from the checks
    /// ([`LatencyBudgets::spawn_checks`] or `check_now`): the console reads
    /// it and never checks itself.
    pub fn budgets(mut self, budgets: &LatencyBudgets) -> Self {
        self.sources.budgets = Some(budgets.clone());
        self
    }

    /// Shows the dead letters of `topics` (full topic names, namespace
    /// included) kept by `admin`'s transport, and lets operators redrive
    /// them. Topics not named here are 404.
    pub fn dead_letters<T: Into<String>>(
        mut self,
        admin: DeadLetterAdmin,
        topics: impl IntoIterator<Item = T>,
    ) -> Self {
        for topic in topics {
            self.sources
                .dead_letters
                .insert(topic.into(), admin.clone());
        }
        self
    }

    /// Shows an outbox: its relay's counts and, when the source has them,
    /// pending rows and lag.
    #[cfg(feature = "outbox")]
    pub fn outbox(mut self, outbox: OutboxSource) -> Self {
        self.sources.outboxes.push(outbox);
        self
    }

    /// Lets actions through with `Authorization: Bearer <token>`: a shared
    /// operator token, compared in constant time, logged as
    /// `operator-token`. An empty token is no token.
    pub fn operator_token(mut self, token: impl Into<String>) -> Self {
        let token = token.into();
        self.sources.operators.token = (!token.is_empty()).then_some(token);
        self
    }

    /// Lets actions through with a token `verifier` accepts (the Auth
    /// service's, as [`AuthLayer`](crate::auth::AuthLayer) checks them);
    /// the action is logged with the token's subject.
    #[cfg(feature = "auth")]
    pub fn verifier(mut self, verifier: Arc<crate::auth::TokenVerifier>) -> Self {
        self.sources.operators.verifier = Some(verifier);
        self
    }

    /// A console for dashboards: no action buttons, and every action
    /// refused with 403 whatever the token.
    pub fn read_only(mut self) -> Self {
        self.sources.read_only = true;
        self
    }

    /// How long one read of a broker or database may take (default 2 s).
    pub fn read_timeout(mut self, limit: Duration) -> Self {
        self.sources.limits.timeout = limit;
        self
    }

    /// The most dead letters listed per topic (default 50, at least 1).
    pub fn list_limit(mut self, limit: usize) -> Self {
        self.sources.limits.list = limit.max(1);
        self
    }

    /// The console.
    pub fn build(self) -> Console {
        Console {
            sources: Arc::new(self.sources),
        }
    }
}

impl fmt::Debug for ConsoleBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConsoleBuilder")
            .field("service", &self.sources.service)
            .finish_non_exhaustive()
    }
}
