//! All four services in one process against the real brokers: events on
//! Redis Streams, ticks on Redis Pub/Sub, settlement jobs on RabbitMQ.
//!
//! ```text
//! REDIS_URL=redis://127.0.0.1:6379 AMQP_URL=amqp://guest:guest@127.0.0.1:5672 \
//!     DATABASE_URL=postgres://postgres@127.0.0.1:5432/test cargo run --example platform
//! ```
//!
//! Prints each service's address; `cargo run --example trading -- --auth ..
//! --market .. --game ..` (same brokers and namespace) then plays the
//! session against it. Stops on Ctrl-C or SIGTERM.

#[path = "common/mod.rs"]
mod common;

use std::process::ExitCode;

use common::cli::{self, Failure, Flags};
use common::platform::Platform;
use switchboard::middleware::Resilience;

const USAGE: &str = "\
cargo run --example platform -- [--redis URL] [--amqp URL] [--namespace NAME] [--database URL]

  --redis URL         events and ticks (or REDIS_URL); required
  --amqp URL          settlement jobs (or AMQP_URL); required
  --namespace NAME    prefix of every topic and table
  --database URL      where the services keep their state (or DATABASE_URL): postgres://…;
                      default an embedded SQLite file in a temporary directory";

#[tokio::main]
async fn main() -> ExitCode {
    cli::exit("platform", run().await)
}

async fn run() -> Result<(), Failure> {
    let Some(flags) = Flags::parse(std::env::args().skip(1), USAGE)? else {
        return Ok(());
    };
    if flags.redis.is_none() || flags.amqp.is_none() {
        return Err(Failure::Usage(
            "platform runs against the real brokers: set REDIS_URL and AMQP_URL (or --redis and --amqp); \
             `cargo run --example trading` needs neither"
                .into(),
        ));
    }
    let brokers = flags.brokers().await?;
    println!("brokers  {}", brokers.description);
    let database = flags.database().await?;
    println!("database {}", database.description);
    let platform = Platform::start(&brokers, &database, &Resilience::default(), None).await?;
    let addresses = platform.addresses();
    println!("auth     listening on http://{}", addresses.auth);
    println!("market   listening on http://{}", addresses.market);
    println!("game     listening on http://{}", addresses.game);
    println!("trading  listening on http://{}", addresses.trading);
    platform.print_consoles();
    let namespace = flags
        .namespace
        .as_ref()
        .map(|namespace| format!(" --namespace {namespace}"))
        .unwrap_or_default();
    let redis = common::brokers::redact(flags.redis.as_deref().unwrap_or_default());
    println!(
        "try: cargo run --example trading -- --redis {redis} --auth {} --market {} --game {}{namespace}",
        addresses.auth, addresses.market, addresses.game
    );
    cli::until_stopped().await;
    platform.shutdown().await?;
    brokers.close().await?;
    database.close().await;
    Ok(())
}
