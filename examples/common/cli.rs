//! Flags shared by the examples, and failing with one line that says what
//! to do (a newcomer's first run must not end in a backtrace).

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::process::ExitCode;

use switchboard::Error;

use super::brokers::Brokers;
use super::database::Database;

/// Parsed flags. Every example accepts the same set and says which it needs.
#[derive(Debug, Default, Clone)]
pub struct Flags {
    pub port: u16,
    pub redis: Option<String>,
    pub amqp: Option<String>,
    pub namespace: Option<String>,
    pub auth: Option<SocketAddr>,
    pub market: Option<SocketAddr>,
    pub game: Option<SocketAddr>,
    pub orders: Option<usize>,
    /// Auth: the directory of its signing keys.
    pub keys: Option<std::path::PathBuf>,
    /// Auth: rotate the signing key this often.
    pub rotate_every: Option<std::time::Duration>,
    /// Trading and Game: the file of Auth's key-signing key (public PEM).
    pub trust_anchor: Option<std::path::PathBuf>,

    /// Where state is kept (`--database` or `DATABASE_URL`); none: an
    /// embedded SQLite file in a temporary directory.
    pub database: Option<String>,
    /// This process's Redis Streams consumer name (`--consumer`), kept
    /// across restarts.
    pub consumer: Option<String>,
    /// `--console`: keep running after the scripted session, with each
    /// service's operator console.
    pub console: bool,
}

/// What went wrong, for a one-line message and an exit code.
#[derive(Debug)]
pub enum Failure {
    /// Bad flags (exit 2).
    Usage(String),
    /// The run failed (exit 1).
    Run(Error),
}

impl From<Error> for Failure {
    fn from(error: Error) -> Self {
        Failure::Run(error)
    }
}

/// Runs `main`'s body and turns its result into an exit code, printing a
/// failure as one line on stderr.
pub fn exit(program: &str, result: Result<(), Failure>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Usage(message)) => {
            eprintln!("{program}: {message} (see --help)");
            ExitCode::from(2)
        }
        Err(Failure::Run(error)) => {
            eprintln!("{program}: {error}");
            ExitCode::FAILURE
        }
    }
}

fn address(flag: &str, value: &str) -> Result<SocketAddr, Failure> {
    let value = value.trim_start_matches("http://").trim_end_matches('/');
    if let Ok(address) = value.parse() {
        return Ok(address);
    }
    if let Ok(port) = value.parse::<u16>() {
        return Ok(SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port));
    }
    Err(Failure::Usage(format!(
        "{flag} wants HOST:PORT (like 127.0.0.1:7001) or a port, got {value:?}"
    )))
}

impl Flags {
    /// Parses `args` (without the program name); `REDIS_URL` and `AMQP_URL`
    /// fill in `--redis` and `--amqp`. `--help` prints `usage` and returns
    /// `None`.
    pub fn parse(
        args: impl IntoIterator<Item = String>,
        usage: &str,
    ) -> Result<Option<Self>, Failure> {
        let mut flags = Flags {
            redis: std::env::var("REDIS_URL")
                .ok()
                .filter(|url| !url.is_empty()),
            amqp: std::env::var("AMQP_URL").ok().filter(|url| !url.is_empty()),
            database: std::env::var("DATABASE_URL")
                .ok()
                .filter(|url| !url.is_empty()),
            ..Flags::default()
        };
        let mut args = args.into_iter();
        while let Some(flag) = args.next() {
            if flag == "--help" || flag == "-h" {
                println!("{usage}");
                return Ok(None);
            }
            if flag == "--console" {
                flags.console = true;
                continue;
            }
            let (name, inline) = match flag.split_once('=') {
                Some((name, value)) => (name.to_owned(), Some(value.to_owned())),
                None => (flag.clone(), None),
            };
            let known = [
                "--port",
                "--redis",
                "--amqp",
                "--namespace",
                "--auth",
                "--market",
                "--game",
                "--orders",
                "--keys",
                "--rotate-every",
                "--trust-anchor",
                "--database",
                "--consumer",
            ];
            if !known.contains(&name.as_str()) {
                return Err(Failure::Usage(format!("unknown argument {flag:?}")));
            }
            let value = match inline.or_else(|| args.next()) {
                Some(value) => value,
                None => return Err(Failure::Usage(format!("{name} needs a value"))),
            };
            match name.as_str() {
                "--port" => {
                    flags.port = value.parse().map_err(|_| {
                        Failure::Usage(format!("--port wants a number 0-65535, got {value:?}"))
                    })?
                }
                "--redis" => flags.redis = Some(value),
                "--amqp" => flags.amqp = Some(value),
                "--namespace" => flags.namespace = Some(value),
                "--database" => flags.database = Some(value),
                "--consumer" => flags.consumer = Some(value),
                "--auth" => flags.auth = Some(address("--auth", &value)?),
                "--market" => flags.market = Some(address("--market", &value)?),
                "--game" => flags.game = Some(address("--game", &value)?),
                "--orders" => {
                    let orders = value.parse().ok().filter(|orders| *orders > 0);
                    flags.orders = Some(orders.ok_or_else(|| {
                        Failure::Usage(format!("--orders wants a positive number, got {value:?}"))
                    })?)
                }
                "--keys" => flags.keys = Some(value.into()),
                "--trust-anchor" => flags.trust_anchor = Some(value.into()),
                "--rotate-every" => {
                    let seconds = value.parse().ok().filter(|seconds| *seconds > 0);
                    flags.rotate_every = Some(std::time::Duration::from_secs(seconds.ok_or_else(
                        || {
                            Failure::Usage(format!(
                                "--rotate-every wants a positive number of seconds, got {value:?}"
                            ))
                        },
                    )?))
                }
                _ => unreachable!("checked against the known flags"),
            }
        }
        Ok(Some(flags))
    }

    /// Where this service's HTTP API listens (`--port`, 0 = any free port).
    pub fn listen(&self) -> SocketAddr {
        SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), self.port)
    }

    /// The brokers the flags name: memory when none.
    pub async fn brokers(&self) -> Result<Brokers, Error> {
        if self.redis.is_none() && self.amqp.is_none() {
            // The namespace still prefixes the database tables.
            let mut brokers = Brokers::memory();
            brokers.namespace = self.namespace.clone();
            return Ok(brokers);
        }
        Brokers::connect_as(
            self.redis.as_deref(),
            self.amqp.as_deref(),
            self.namespace.clone(),
            self.consumer.as_deref(),
        )
        .await
    }

    /// The database the flags name: an embedded SQLite file when none.
    pub async fn database(&self) -> Result<Database, Error> {
        Database::open(self.database.as_deref()).await
    }

    /// A standalone service shares events with the others only through a
    /// broker: refuse to start on the in-memory bus.
    pub fn require_redis(&self, program: &str) -> Result<(), Failure> {
        if self.redis.is_none() {
            return Err(Failure::Usage(format!(
                "{program} on its own needs Redis to meet the other services: set REDIS_URL or pass --redis redis://127.0.0.1:6379 \
                 (or run `cargo run --example trading`, which embeds all four)"
            )));
        }
        Ok(())
    }
}

impl Flags {
    /// Auth's pinned key-signing key, read from `--trust-anchor`: Trading
    /// and Game on their own need it to trust Auth's key announcements.
    pub fn trust_anchor_pem(&self, program: &str) -> Result<String, Failure> {
        let Some(path) = &self.trust_anchor else {
            return Err(Failure::Usage(format!(
                "{program} on its own needs --trust-anchor FILE: Auth's key-signing key \
                 (the key-signing-key.pub.pem in Auth's --keys directory)"
            )));
        };
        std::fs::read_to_string(path)
            .map_err(|error| Failure::Usage(format!("--trust-anchor {}: {error}", path.display())))
    }
}

/// Waits for Ctrl-C or SIGTERM (how `scripts/test` stops a service by PID).
pub async fn until_stopped() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// Fetches `path` from a service's HTTP API, as text.
pub async fn fetch_text(service: &str, at: SocketAddr, path: &str) -> Result<String, Error> {
    let url = format!("http://{at}{path}");
    let fail = |why: String| {
        Error::new(
            switchboard::ErrorKind::Connection,
            format!(
                "cannot reach {service} at {at} ({why}); is it running? check --{}",
                service.to_lowercase()
            ),
        )
    };
    let response = reqwest::get(&url)
        .await
        .map_err(|error| fail(error.to_string()))?;
    if !response.status().is_success() {
        return Err(fail(format!("{url} answered {}", response.status())));
    }
    response
        .text()
        .await
        .map_err(|error| fail(error.to_string()))
}

/// Fetches `path` from a service's HTTP API, as JSON.
pub async fn fetch_json<T: serde::de::DeserializeOwned>(
    service: &str,
    at: SocketAddr,
    path: &str,
) -> Result<T, Error> {
    let text = fetch_text(service, at, path).await?;
    serde_json::from_str(&text).map_err(|error| {
        Error::new(
            switchboard::ErrorKind::Decode,
            format!("{service} at {at} sent unexpected {path}: {error}"),
        )
    })
}
