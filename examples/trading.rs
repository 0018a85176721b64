//! Start here: the strategy's four services running a scripted session.
//!
//! ```text
//! cargo run --example trading                 # no broker, no database server needed
//! REDIS_URL=redis://127.0.0.1:6379 AMQP_URL=amqp://guest:guest@127.0.0.1:5672 \
//!     cargo run --example trading             # the same on Redis and RabbitMQ
//! cargo run --example trading -- --auth 127.0.0.1:7001 --market 127.0.0.1:7002 \
//!     --game 127.0.0.1:7003 --redis redis://127.0.0.1:6379 \
//!     --trust-anchor ./auth-keys/key-signing-key.pub.pem       # against separate processes
//! ```
//!
//! Without the others' addresses, Auth, Market and Game run in this process
//! (on loopback ports, over real gRPC, HTTP and HTTP/2), events on the
//! in-memory bus unless `REDIS_URL` / `AMQP_URL` (or `--redis` / `--amqp`)
//! name brokers. A user registers, logs in and places orders; Trading asks
//! Market for each price over gRPC and publishes order.created and
//! trade.executed; Game applies the trades to the user's holdings; the
//! settlement jobs go through the task queue. At the end, each strategy §3
//! path's P50 / P99 beside its target.
//!
//! Each service keeps its state in a database — an embedded SQLite file in
//! a temporary directory by default, PostgreSQL when `DATABASE_URL` (or
//! `--database`) names one — and sends its events through a transactional
//! outbox, so a broker outage delays events and never loses them.

#[path = "common/mod.rs"]
mod common;

use std::process::ExitCode;

use common::cli::{self, Failure, Flags};
use common::market_service::MarketAddrs;
use common::platform::Platform;
use common::session::{self, Addresses, Gateway, gateway_resilience};
use common::trading_service::{TradingConfig, TradingService};
use switchboard::middleware::Resilience;

const USAGE: &str = "\
cargo run --example trading [-- FLAGS]

  --orders N          orders to place (default 200)
  --redis URL         events on Redis Streams, ticks on Redis Pub/Sub (or REDIS_URL)
  --amqp URL          settlement jobs on RabbitMQ (or AMQP_URL)
  --namespace NAME    prefix of every topic and table, so runs sharing a broker or a
                      database never meet
  --database URL      where the services keep their state (or DATABASE_URL):
                      postgres://USER@HOST:PORT/DB; default an embedded SQLite file in a
                      temporary directory, removed at the end
  --auth ADDR --market ADDR --game ADDR
                      use these running services instead of embedding them
                      (their HTTP addresses; needs --redis and --trust-anchor)
  --trust-anchor FILE Auth's key-signing key, public PEM (key-signing-key.pub.pem in
                      Auth's --keys directory): Trading trusts the key sets it signed
  --port N            Trading's own HTTP port (default: any free port)
  --consumer NAME     this process's Redis Streams consumer name, kept across restarts
  --console           after the session, keep running and print each service's operator
                      console URL (actions need the printed token, or CONSOLE_TOKEN)";

#[tokio::main]
async fn main() -> ExitCode {
    cli::exit("trading", run().await)
}

async fn run() -> Result<(), Failure> {
    let Some(flags) = Flags::parse(std::env::args().skip(1), USAGE)? else {
        return Ok(());
    };
    let orders = flags.orders.unwrap_or(200);
    let resilience = Resilience::default();
    let brokers = flags.brokers().await?;
    println!("brokers  {}", brokers.description);
    let database = flags.database().await?;
    println!("database {}", database.description);
    let (ticker, ticks) = session::listen_to_ticks(&brokers).await?;
    match (flags.auth, flags.market, flags.game) {
        (None, None, None) => {
            let platform = Platform::start(&brokers, &database, &resilience, None).await?;
            let addresses = platform.addresses();
            println!(
                "started  Auth {}, Market {}, Game {}, Trading {} in this process",
                addresses.auth, addresses.market, addresses.game, addresses.trading
            );
            let gateway = Gateway::new(addresses, &gateway_resilience(Default::default()));
            let report = session::run(&gateway, orders).await?;
            if flags.console {
                platform.print_consoles();
                println!("         running until Ctrl-C");
                cli::until_stopped().await;
            }
            platform.shutdown().await?;
            print_ticks(ticker, &ticks).await?;
            brokers.close().await?;
            database.close().await;
            println!("done     {} orders for {}", report.orders, report.user_id);
            Ok(())
        }
        (Some(auth), Some(market), Some(game)) => {
            flags.require_redis("trading against separate services")?;
            let trust_anchor = flags.trust_anchor_pem("trading")?;
            let endpoints: MarketAddrs = cli::fetch_json("Market", market, "/v1/endpoints").await?;
            cli::fetch_text("Game", game, "/health").await?;
            let trading = TradingService::start(
                &brokers,
                &database,
                TradingConfig {
                    http: flags.listen(),
                    market_grpc: endpoints.grpc,
                    auth_trust_anchor_pem: trust_anchor,
                    resilience,
                },
            )
            .await?;
            let addresses = Addresses {
                auth,
                trading: trading.addr(),
                market,
                game,
            };
            println!(
                "started  Trading {}; Auth {auth}, Market {market}, Game {game} are separate processes",
                trading.addr()
            );
            let gateway = Gateway::new(addresses, &gateway_resilience(Default::default()));
            let report = session::run(&gateway, orders).await?;
            if flags.console {
                println!(
                    "console  Trading {} (operator token {})",
                    trading.console_url(),
                    trading.console_token()
                );
                println!("         running until Ctrl-C");
                cli::until_stopped().await;
            }
            trading.shutdown().await?;
            print_ticks(ticker, &ticks).await?;
            brokers.close().await?;
            database.close().await;
            println!("done     {} orders for {}", report.orders, report.user_id);
            Ok(())
        }
        _ => Err(Failure::Usage(
            "give all of --auth, --market and --game (to use running services) or none (to embed them)".into(),
        )),
    }
}

async fn print_ticks(
    ticker: switchboard::ConsumerHandle,
    ticks: &std::sync::atomic::AtomicU64,
) -> Result<(), switchboard::Error> {
    ticker.shutdown().await?;
    println!(
        "ticker   {} price.tick broadcasts heard (Pub/Sub: at most once, live only)",
        ticks.load(std::sync::atomic::Ordering::SeqCst)
    );
    Ok(())
}
