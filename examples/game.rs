//! Game on its own: holdings from `trade.executed`, players from
//! `user.registered` (and Auth's gRPC lookup), `holding.changed` out, prices
//! from Market's HTTP API, history from Market's HTTP/2 stream, tokens
//! checked locally with Auth's keys, learnt from its signed announcements on
//! the bus (the key-signing key is pinned with `--trust-anchor`).
//!
//! ```text
//! cargo run --example game -- --port 7003 --auth 127.0.0.1:7001 \
//!     --market 127.0.0.1:7002 --redis redis://127.0.0.1:6379 \
//!     --trust-anchor ./auth-keys/key-signing-key.pub.pem
//! ```
//!
//! Prints `game listening on http://ADDR` once it serves; stops on Ctrl-C or
//! SIGTERM.

#[path = "common/mod.rs"]
mod common;

use std::process::ExitCode;

use common::cli::{self, Failure, Flags};
use common::game_service::{GameConfig, GameService};
use common::market_service::MarketAddrs;
use switchboard::middleware::Resilience;

const USAGE: &str = "\
cargo run --example game -- --auth ADDR --market ADDR --redis URL --trust-anchor FILE [--port N] [--namespace NAME] [--database URL]

  --auth ADDR         Auth's HTTP address (for its gRPC endpoint)
  --trust-anchor FILE Auth's key-signing key, public PEM (key-signing-key.pub.pem in
                      Auth's --keys directory): Game trusts the key sets it signed
  --market ADDR       Market's HTTP address
  --port N            HTTP port (default: any free port)
  --redis URL         events (or REDIS_URL)
  --namespace NAME    prefix of every topic and table (the same for all four services)
  --database URL      where holdings are kept (or DATABASE_URL): postgres://…; default an
                      embedded SQLite file in a temporary directory
  --consumer NAME     this process's Redis Streams consumer name, kept across restarts
                      (a restart takes up its unfinished events at once)";

#[derive(serde::Deserialize)]
struct AuthEndpoints {
    grpc: std::net::SocketAddr,
}

#[tokio::main]
async fn main() -> ExitCode {
    cli::exit("game", run().await)
}

async fn run() -> Result<(), Failure> {
    let Some(flags) = Flags::parse(std::env::args().skip(1), USAGE)? else {
        return Ok(());
    };
    let (Some(auth), Some(market)) = (flags.auth, flags.market) else {
        return Err(Failure::Usage(
            "game needs --auth and --market (the HTTP addresses they print)".into(),
        ));
    };
    flags.require_redis("game")?;
    let trust_anchor = flags.trust_anchor_pem("game")?;
    let brokers = flags.brokers().await?;
    let database = flags.database().await?;
    let auth_endpoints: AuthEndpoints = cli::fetch_json("Auth", auth, "/v1/endpoints").await?;
    let market_endpoints: MarketAddrs = cli::fetch_json("Market", market, "/v1/endpoints").await?;
    let game = GameService::start(
        &brokers,
        &database,
        GameConfig {
            http: flags.listen(),
            market_http: market_endpoints.http,
            market_transfer: market_endpoints.transfer,
            auth_grpc: auth_endpoints.grpc,
            auth_trust_anchor_pem: trust_anchor,
            resilience: Resilience::default(),
            alert: None,
        },
    )
    .await?;
    println!("game listening on http://{}", game.addr());
    println!(
        "game console {} (operator token {})",
        game.console_url(),
        game.console_token()
    );
    cli::until_stopped().await;
    game.shutdown().await?;
    brokers.close().await?;
    database.close().await;
    Ok(())
}
