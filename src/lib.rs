//! Typed events and queries between services, with one envelope, one delivery
//! contract and the resilience to outlive a failing dependency.
//!
//! * [`EventEnvelope`] is the wire format every event travels in; the
//!   [`Event`] trait binds a payload type to its name and version, and the
//!   [`Codec`] refuses bad input with an error naming the problem.
//! * [`Transport`] is the untyped, object-safe delivery contract
//!   ([`Publisher`], [`Subscriber`], [`Delivery`], [`Capabilities`]);
//!   [`MemoryTransport`] keeps all of it in-process and needs no broker.
//! * [`EventBus`] publishes typed payloads and runs consume loops that hand
//!   [`Message`]s to tower services, settling each delivery by the result.
//! * [`Topology`] declares which groups subscribe to which events, before the
//!   first publish.
//! * [`config`] reads the circuit-breaker and retry settings from YAML.
//! * [`middleware`] keeps callers and consumers alive when a dependency
//!   fails: circuit breaker, retry, timeout, degraded answers, idempotent
//!   consumers and dead letters, assembled by
//!   [`Resilience`](middleware::Resilience).
//! * [`observe`] carries trace context across services (feature `otel`),
//!   records metrics through the `metrics` facade, and checks each path's
//!   latency against its budget.
//!
//! # Quick start
//!
//! ```
//! use std::sync::Arc;
//! use serde::{Deserialize, Serialize};
//! use switchboard::{handler_fn, Event, EventBus, MemoryTransport, Message, SubscribeOptions, Topology};
//!
//! #[derive(Debug, Clone, Serialize, Deserialize)]
//! struct TradeExecuted { order_id: String, symbol: String, quantity: u64 }
//! impl Event for TradeExecuted {
//!     const TYPE: &'static str = "trade.executed";
//!     const VERSION: &'static str = "1.0";
//! }
//!
//! # tokio::runtime::Runtime::new().unwrap().block_on(async {
//! let bus = EventBus::new(Arc::new(MemoryTransport::new()), "trading-service");
//! bus.declare(&Topology::new().with_event::<TradeExecuted, _>(["game"])).await?;
//!
//! // Published before the consumer starts: the declared group keeps it.
//! bus.publish(TradeExecuted { order_id: "123".into(), symbol: "AAPL".into(), quantity: 100 }).await?;
//!
//! let (done, mut seen) = tokio::sync::mpsc::unbounded_channel();
//! let consumer = bus
//!     .subscribe(SubscribeOptions::new("game"), handler_fn(move |message: Message<TradeExecuted>| {
//!         let done = done.clone();
//!         async move {
//!             done.send(message.payload().quantity).ok();
//!             Ok(())
//!         }
//!     }))
//!     .await?;
//! assert_eq!(seen.recv().await, Some(100));
//! consumer.shutdown().await?;
//! # Ok::<(), switchboard::Error>(())
//! # }).unwrap();
//! ```
//!
//! # Features
//!
//! | feature | what it adds |
//! |---|---|
//! | `redis-streams` | [`RedisStreamsTransport`](transport::redis_streams): consumer groups on Redis Streams |
//! | `redis-pubsub` | [`RedisPubSubTransport`]: broadcast over Redis Pub/Sub, at most once |
//! | `amqp` | `transport::amqp`: RabbitMQ task queue (lapin 4 on tokio) — persistent, confirmed, dead-lettered, reconnecting |
//! | `auth` | [`auth`]: local verification of Auth's tokens (EdDSA or RS256) and a tower layer for HTTP and gRPC servers |
//! | `grpc` | `transport::grpc`: tonic clients as tower services, status mapping, event push over gRPC |
//! | `http` | `transport::http`: JSON over reqwest as a tower service, axum extractors, webhook push |
//! | `file-transfer` | [`transfer`]: streaming file upload and download over HTTP/2 in bounded memory |
//! | `otel` | `observe::trace`: W3C trace context across transports and HTTP/gRPC calls through `tracing-opentelemetry` |
//! | `outbox` | `outbox`: transactional outbox and inbox on sqlx (PostgreSQL, SQLite) — an event is sent if and only if its transaction committed, applied once |
//! | `test-util` | `switchboard::testing`: the conformance suite any transport can run, and a fault-injecting TCP proxy |
//!
//! Without features the crate is the in-memory core: envelope, codec,
//! contract, bus, topology, config, middleware.
#![forbid(unsafe_code)]
#![deny(missing_docs, missing_debug_implementations, unreachable_pub)]
#![warn(rust_2018_idioms)]
#![cfg_attr(docsrs, feature(doc_cfg))]

#[cfg(feature = "auth")]
pub mod auth;
#[cfg(any(feature = "auth", feature = "console"))]
mod bearer;
mod bus;
pub mod cloudevents;
mod codec;
pub mod config;
#[cfg(feature = "console")]
#[cfg_attr(docsrs, doc(cfg(feature = "console")))]
pub mod console;
mod dead_letter;
mod envelope;
mod error;
pub mod middleware;
pub mod observe;
#[cfg(feature = "outbox")]
#[cfg_attr(docsrs, doc(cfg(feature = "outbox")))]
pub mod outbox;
mod outcome;
pub mod reexports;
#[cfg(feature = "test-util")]
pub mod testing;
#[cfg(feature = "tls")]
pub mod tls;
mod topology;
#[cfg(feature = "file-transfer")]
pub mod transfer;
pub mod transport;
pub mod upcast;

// The examples of the README and of the guides in docs/ compile and run as
// doctests.
#[cfg(all(
    doctest,
    feature = "test-util",
    feature = "redis-streams",
    feature = "redis-pubsub",
    feature = "amqp",
    feature = "grpc",
    feature = "http",
    feature = "auth",
    feature = "otel"
))]
mod guides {
    #[doc = include_str!("../README.md")]
    struct ReadmeDoctests;

    #[doc = include_str!("../docs/transports.md")]
    struct TransportsGuide;

    #[doc = include_str!("../docs/resilience.md")]
    struct ResilienceGuide;

    #[doc = include_str!("../docs/observability.md")]
    struct ObservabilityGuide;

    #[doc = include_str!("../docs/reliability.md")]
    struct ReliabilityGuide;

    #[doc = include_str!("../docs/services.md")]
    struct ServicesGuide;

    #[doc = include_str!("../docs/performance.md")]
    struct PerformanceGuide;

    #[cfg(feature = "console")]
    #[doc = include_str!("../docs/console.md")]
    struct ConsoleGuide;
}

pub use bus::{BatchFn, BatchSlot, batch_fn};
pub use bus::{
    BoxedHandlerFn, ConsumerHandle, ConsumerHealth, ConsumerMonitor, ConsumerStats, DeadLetterOf,
    DeadLetters, EventBus, HandlerFn, LastError, Message, handler_fn, handler_fn_boxed,
};
pub use codec::{Codec, DEFAULT_MAX_SIZE, DecodeError, QUOTE_LIMIT};
pub use dead_letter::DEAD_LETTER_TEXT_LIMIT;
pub use envelope::{EnvelopePayload, Event, EventEnvelope, Headers};
pub use error::{BoxError, Effect, Error, ErrorKind};
pub use outcome::Outcome;
// The outbox's main types at the root, behind its feature; its config and
// parked-row types stay in `switchboard::outbox`.
#[cfg(feature = "outbox")]
pub use outbox::{Inbox, Outbox, Relay};
pub use topology::Topology;
pub use upcast::Upcasters;
// Every transport type at the root, behind its feature; its config and
// helpers stay in its module (`transport::amqp::AmqpConfig`, ...).
#[cfg(feature = "amqp")]
pub use transport::amqp::AmqpTransport;
#[cfg(feature = "grpc")]
pub use transport::grpc::GrpcTransport;
#[cfg(feature = "http")]
pub use transport::http::HttpTransport;
pub use transport::memory::MemoryTransport;
#[cfg(feature = "redis-pubsub")]
pub use transport::redis_pubsub::RedisPubSubTransport;
#[cfg(feature = "redis-streams")]
pub use transport::redis_streams::RedisStreamsTransport;
pub use transport::{
    Acker, Capabilities, DeadLetter, DeadLetterQueue, DeadLettered, Delivery, DeliveryMode,
    GiveBackLimit, HealthState, Publisher, RawMessage, Redrive, SettleError, Settled,
    SubscribeOptions, Subscriber, Subscription, Transport, TransportHealth, header, validate_name,
};

// What a subscription orders its messages by (`SubscribeOptions::ordering_key`).
pub use transport::OrderingKey;
