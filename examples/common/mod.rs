//! The four services of the strategy as a small library the examples share:
//! `trading.rs` embeds all four in one process, `auth.rs`, `market.rs` and
//! `game.rs` run one each, `platform.rs` runs all four against real brokers,
//! and `tests/services.rs` takes them down and brings them back.
//!
//! | module | what |
//! |---|---|
//! | `domain` | strategy §5.2 events (decimal prices and quantities), topology |
//! | `proto` | Market's and Auth's gRPC APIs, generated code checked in |
//! | `brokers` | in-memory bus, or Redis Streams / Pub/Sub and RabbitMQ |
//! | `database` | PostgreSQL (`DATABASE_URL`) or an embedded SQLite file; outbox relays |
//! | `auth_store`, `market_store`, `trading_store`, `game_store` | each service's tables |
//! | `auth_service`, `market_service`, `trading_service`, `game_service` | the services |
//! | `auth_keys` | Auth's signing keys on disk, their rotation and signed announcement |
//! | `session` | the gateway client (with strategy §4.2 degradation) and the scripted session |
//! | `cli` | flags, and one-line errors instead of panics |
//! | `net` | restartable servers, latency histograms |
//! | `console` | each service's operator console under `/console` |

// Each example uses only part of this library.
#![allow(dead_code)]

pub mod auth_keys;
pub mod auth_service;
pub mod auth_store;
pub mod brokers;
pub mod cli;
pub mod console;
pub mod database;
pub mod domain;
pub mod game_service;
pub mod game_store;
pub mod market_service;
pub mod market_store;
pub mod net;
pub mod operator;
pub mod platform;
pub mod session;
pub mod trading_service;
pub mod trading_store;

/// The services' gRPC APIs, generated from `examples/common/proto/*.proto`
/// and checked in (`tests/proto_codegen.rs` regenerates and compares).
pub mod proto {
    /// `market.v1`: Market's price query.
    pub mod market {
        include!("proto/market.v1.rs");
    }
    /// `auth.v1`: Auth's user lookup.
    pub mod auth {
        include!("proto/auth.v1.rs");
    }
}
