//! Market on its own: prices over gRPC and HTTP, `price.updated` on Redis
//! Streams, ticks on Redis Pub/Sub, price history as an HTTP/2 file stream;
//! consumes `trade.executed` and `order.created`.
//!
//! ```text
//! cargo run --example market -- --port 7002 --redis redis://127.0.0.1:6379
//! ```
//!
//! Prints `market listening on http://ADDR` once it serves; stops on Ctrl-C
//! or SIGTERM.

#[path = "common/mod.rs"]
mod common;

use std::process::ExitCode;

use common::cli::{self, Failure, Flags};
use common::market_service::MarketService;

const USAGE: &str = "\
cargo run --example market -- --redis URL [--port N] [--namespace NAME] [--database URL]

  --port N            HTTP port (default: any free port); gRPC and the HTTP/2 history
                      stream on other free ports, announced by GET /v1/endpoints
  --redis URL         events and ticks (or REDIS_URL)
  --namespace NAME    prefix of every topic and table (the same for all four services)
  --database URL      where prices are kept (or DATABASE_URL): postgres://…; default an
                      embedded SQLite file in a temporary directory
  --consumer NAME     this process's Redis Streams consumer name, kept across restarts";

#[tokio::main]
async fn main() -> ExitCode {
    cli::exit("market", run().await)
}

async fn run() -> Result<(), Failure> {
    let Some(flags) = Flags::parse(std::env::args().skip(1), USAGE)? else {
        return Ok(());
    };
    flags.require_redis("market")?;
    let brokers = flags.brokers().await?;
    let database = flags.database().await?;
    let market = MarketService::start(&brokers, &database, flags.listen()).await?;
    let addrs = market.addrs();
    println!(
        "market listening on http://{} (gRPC {}, history over HTTP/2 {})",
        addrs.http, addrs.grpc, addrs.transfer
    );
    println!(
        "market console {} (operator token {})",
        market.console_url(),
        market.console_token()
    );
    cli::until_stopped().await;
    market.shutdown().await?;
    brokers.close().await?;
    database.close().await;
    Ok(())
}
