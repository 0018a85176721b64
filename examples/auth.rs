//! Auth on its own: registers users, issues Ed25519-signed tokens, publishes
//! `user.registered` and its key set (`auth.keys_rotated`), answers Game's
//! user lookups over gRPC.
//!
//! ```text
//! cargo run --example auth -- --port 7001 --redis redis://127.0.0.1:6379 --keys ./auth-keys
//! ```
//!
//! The keys in `--keys` survive a restart; the first start makes them, and
//! Trading and Game pin `./auth-keys/key-signing-key.pub.pem`.
//!
//! Prints `auth listening on http://ADDR` once it serves; stops on Ctrl-C or
//! SIGTERM.

#[path = "common/mod.rs"]
mod common;

use std::process::ExitCode;

use common::auth_keys::{DEFAULT_KEY_OVERLAP, KeySource};
use common::auth_service::{AuthConfig, AuthService};
use common::cli::{self, Failure, Flags};

const USAGE: &str = "\
cargo run --example auth -- --redis URL --keys DIR [--port N] [--namespace NAME] [--rotate-every SECS] [--database URL]

  --port N            HTTP port (default: any free port); gRPC on another free port,
                      announced by GET /v1/endpoints
  --redis URL         where user.registered and the key announcements go (or REDIS_URL)
  --keys DIR          Auth's signing keys, kept across restarts (made on the first start);
                      DIR/key-signing-key.pub.pem is what Trading and Game pin
  --rotate-every SECS rotate the signing key this often (default: never); the old key
                      keeps verifying for 30 minutes
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
    let Some(keys) = flags.keys.clone() else {
        return Err(Failure::Usage(
            "auth needs --keys DIR: where its signing keys live across restarts".into(),
        ));
    };
    let brokers = flags.brokers().await?;
    let database = flags.database().await?;
    let config = AuthConfig {
        http: flags.listen(),
        keys: KeySource::Dir(keys),
        overlap: DEFAULT_KEY_OVERLAP,
        rotate_every: flags.rotate_every,
    };
    let auth = AuthService::start(&brokers, &database, config).await?;
    println!(
        "auth listening on http://{} (gRPC {})",
        auth.addrs().http,
        auth.addrs().grpc
    );
    println!(
        "auth console {} (operator token {})",
        auth.console_url(),
        auth.console_token()
    );
    cli::until_stopped().await;
    auth.shutdown().await?;
    brokers.close().await?;
    database.close().await;
    Ok(())
}
