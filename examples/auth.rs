//! Auth on its own: registers users, issues Ed25519-signed tokens, publishes
//! `user.registered`, answers Game's user lookups over gRPC.
//!
//! ```text
//! cargo run --example auth -- --port 7001 --redis redis://127.0.0.1:6379
//! ```
//!
//! Prints `auth listening on http://ADDR` once it serves; stops on Ctrl-C or
//! SIGTERM.

#[path = "common/mod.rs"]
mod common;

use std::process::ExitCode;

use common::auth_service::AuthService;
use common::cli::{self, Failure, Flags};

const USAGE: &str = "\
cargo run --example auth -- --redis URL [--port N] [--namespace NAME] [--database URL]

  --port N            HTTP port (default: any free port); gRPC on another free port,
                      announced by GET /v1/endpoints
  --redis URL         where user.registered goes (or REDIS_URL)
  --namespace NAME    prefix of every topic and table (the same for all four services)
  --database URL      where users are kept (or DATABASE_URL): postgres://…; default an
                      embedded SQLite file in a temporary directory";

#[tokio::main]
async fn main() -> ExitCode {
    cli::exit("auth", run().await)
}

async fn run() -> Result<(), Failure> {
    let Some(flags) = Flags::parse(std::env::args().skip(1), USAGE)? else {
        return Ok(());
    };
    flags.require_redis("auth")?;
    let brokers = flags.brokers().await?;
    let database = flags.database().await?;
    let auth = AuthService::start(&brokers, &database, flags.listen()).await?;
    println!(
        "auth listening on http://{} (gRPC {})",
        auth.addrs().http,
        auth.addrs().grpc
    );
    cli::until_stopped().await;
    auth.shutdown().await?;
    brokers.close().await?;
    database.close().await;
    Ok(())
}
