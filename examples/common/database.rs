//! Where the services keep their state: PostgreSQL when `DATABASE_URL` (or
//! `--database`) names one, otherwise an embedded SQLite file in a new
//! temporary directory, so `cargo run --example trading` needs no server.
//!
//! Each service owns tables under its own prefix (`trading_orders`,
//! `game_holdings`, …; with `--namespace demo`, `demo_trading_orders`), and
//! an outbox and inbox beside them (`switchboard::outbox`): what a service
//! writes and the events that say so commit in one transaction, a relay in
//! the service publishes them once committed, and a consumer's effect
//! commits with its inbox mark. The services' SQL runs on both databases
//! (`$1` placeholders, `TEXT` decimals, `BIGINT` counts); [`on_db!`] runs one
//! body against whichever the store is.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use sqlx::postgres::PgPoolOptions;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{PgPool, Postgres, Sqlite, SqlitePool};
use switchboard::outbox::{Inbox, Outbox, OutboxDatabase, Relay, RelayConfig, RelayHandle};
use switchboard::{Error, ErrorKind, Transport};

use super::brokers::{Brokers, redact};

/// How long opening the database may take before the example gives up with
/// a message saying what to check.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// How long a service waits for its relays to hand over what they are
/// sending when it shuts down.
pub const RELAY_CLOSE: Duration = Duration::from_secs(10);

/// One of the two databases the outbox runs on.
#[derive(Debug, Clone)]
pub enum Db<P, S> {
    Postgres(P),
    Sqlite(S),
}

/// Runs `$body` with `$part` bound to the PostgreSQL or the SQLite side of
/// a [`Db`]: the same SQL and the same code, typed for each.
macro_rules! on_db {
    ($db:expr, $part:ident => $body:expr) => {
        match $db {
            super::database::Db::Postgres($part) => $body,
            super::database::Db::Sqlite($part) => $body,
        }
    };
}
pub(crate) use on_db;

/// The database the services of this process use.
#[derive(Clone)]
pub struct Database {
    pools: Db<PgPool, SqlitePool>,
    /// For the banner.
    pub description: String,
    /// The temporary directory of an embedded SQLite file, removed by
    /// [`Database::close`].
    scratch: Option<Arc<PathBuf>>,
}

impl Database {
    /// Where the in-process platform's Auth keeps its signing keys beside
    /// an embedded database (its temporary directory), so a token outlives
    /// the platform's restart on it; `None` on PostgreSQL, where the
    /// platform keeps them in memory (the separate Auth process has
    /// `--keys`).
    pub fn auth_keys_dir(&self) -> Option<PathBuf> {
        self.scratch.as_ref().map(|dir| dir.join("auth-keys"))
    }
}

impl std::fmt::Debug for Database {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Database")
            .field("description", &self.description)
            .finish_non_exhaustive()
    }
}

fn refused(url: &str, why: impl std::fmt::Display) -> Error {
    Error::new(
        ErrorKind::Connection,
        format!(
            "cannot open the database at {} ({why}); start PostgreSQL or fix DATABASE_URL \
             (postgres://USER@HOST:PORT/DB), or unset it to keep the services' state in an \
             embedded SQLite file",
            redact(url)
        ),
    )
}

impl Database {
    /// `url` when given (`postgres://…`, or `sqlite://FILE`), else a new
    /// SQLite file in a temporary directory.
    pub async fn open(url: Option<&str>) -> Result<Self, Error> {
        match url {
            Some(url) if url.starts_with("postgres://") || url.starts_with("postgresql://") => {
                let pool = PgPoolOptions::new()
                    .max_connections(24)
                    .acquire_timeout(CONNECT_TIMEOUT)
                    .connect(url);
                let pool = match tokio::time::timeout(CONNECT_TIMEOUT, pool).await {
                    Ok(Ok(pool)) => pool,
                    Ok(Err(error)) => return Err(refused(url, error)),
                    Err(_) => {
                        return Err(refused(url, format!("no answer in {CONNECT_TIMEOUT:?}")));
                    }
                };
                Ok(Self {
                    pools: Db::Postgres(pool),
                    description: format!("state in PostgreSQL at {}", redact(url)),
                    scratch: None,
                })
            }
            Some(url) if url.starts_with("sqlite:") => {
                let path = url
                    .trim_start_matches("sqlite:")
                    .trim_start_matches("//")
                    .split('?')
                    .next()
                    .unwrap_or_default();
                let pool = sqlite(PathBuf::from(path))
                    .await
                    .map_err(|error| refused(url, error))?;
                Ok(Self {
                    pools: Db::Sqlite(pool),
                    description: format!("state in the SQLite file {path}"),
                    scratch: None,
                })
            }
            Some(url) => Err(refused(
                url,
                "not a postgres:// or sqlite:// URL".to_owned(),
            )),
            None => {
                let dir = std::env::temp_dir().join(format!(
                    "switchboard-services-{}",
                    uuid::Uuid::new_v4().simple()
                ));
                std::fs::create_dir_all(&dir).map_err(|error| {
                    Error::new(
                        ErrorKind::Config,
                        format!("cannot create {}: {error}", dir.display()),
                    )
                })?;
                let file = dir.join("services.db");
                let pool = sqlite(file.clone()).await.map_err(|error| {
                    Error::new(
                        ErrorKind::Config,
                        format!("cannot open {}: {error}", file.display()),
                    )
                })?;
                Ok(Self {
                    pools: Db::Sqlite(pool),
                    description: format!(
                        "state in an embedded SQLite file, {} (set DATABASE_URL for PostgreSQL)",
                        file.display()
                    ),
                    scratch: Some(Arc::new(dir)),
                })
            }
        }
    }

    /// Closes the pool and removes the embedded file's directory, if this
    /// process made one.
    pub async fn close(&self) {
        on_db!(&self.pools, pool => pool.close().await);
        if let Some(dir) = &self.scratch {
            let _ = std::fs::remove_dir_all(dir.as_path());
        }
    }
}

async fn sqlite(file: PathBuf) -> Result<SqlitePool, sqlx::Error> {
    // WAL: relays read while a writer writes; a busy timeout: the four
    // services of one process share the file and its one writer at a time.
    let options = SqliteConnectOptions::new()
        .filename(file)
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        .synchronous(SqliteSynchronous::Normal)
        .busy_timeout(Duration::from_secs(10));
    SqlitePoolOptions::new()
        .max_connections(16)
        .acquire_timeout(Duration::from_secs(10))
        .connect_with(options)
        .await
}

/// The table prefix of `service` under `namespace`: `trading_`, or
/// `demo_trading_` for `--namespace demo` (anything but letters and digits
/// becomes `_`), so runs sharing a database never meet.
pub fn table_prefix(namespace: Option<&str>, service: &str) -> Result<String, Error> {
    let namespace = namespace
        .map(|namespace| {
            let plain: String = namespace
                .chars()
                .map(|c| {
                    if c.is_ascii_alphanumeric() {
                        c.to_ascii_lowercase()
                    } else {
                        '_'
                    }
                })
                .collect();
            if plain.starts_with(|c: char| c.is_ascii_digit()) {
                format!("n{plain}_")
            } else {
                format!("{plain}_")
            }
        })
        .unwrap_or_default();
    let prefix = format!("{namespace}{service}_");
    if prefix.len() > switchboard::outbox::MAX_PREFIX_LEN {
        return Err(Error::new(
            ErrorKind::Config,
            format!(
                "the table prefix {prefix:?} is too long (at most {} bytes): use a shorter --namespace",
                switchboard::outbox::MAX_PREFIX_LEN
            ),
        ));
    }
    Ok(prefix)
}

/// One service's tables in one database: its pool, its table prefix, its
/// outbox of events (and of task-queue jobs, for Trading) and its inbox.
pub struct Tables<DB: OutboxDatabase> {
    pub pool: sqlx::Pool<DB>,
    pub prefix: String,
    /// Catalogue events, relayed to the events transport.
    pub events: Outbox<DB>,
    /// Task-queue jobs, relayed to the tasks transport (`<prefix>jobs_`).
    pub jobs: Outbox<DB>,
    pub inbox: Inbox<DB>,
}

impl<DB: OutboxDatabase> Clone for Tables<DB> {
    fn clone(&self) -> Self {
        Self {
            pool: self.pool.clone(),
            prefix: self.prefix.clone(),
            events: self.events.clone(),
            jobs: self.jobs.clone(),
            inbox: self.inbox.clone(),
        }
    }
}

impl<DB: OutboxDatabase> Tables<DB> {
    fn new(
        pool: sqlx::Pool<DB>,
        prefix: String,
        source: &str,
        namespace: Option<&str>,
    ) -> Result<Self, Error> {
        let outbox = |prefix: &str| -> Result<Outbox<DB>, Error> {
            // NOTIFY wakes the relay at once (PostgreSQL; SQLite ignores it).
            let outbox = Outbox::new(prefix, source)?.with_notify(true);
            Ok(match namespace {
                Some(namespace) => outbox.with_namespace(namespace),
                None => outbox,
            })
        };
        let events = outbox(&prefix)?;
        let jobs = outbox(&format!("{prefix}jobs_"))?;
        let inbox = events.inbox(pool.clone());
        Ok(Self {
            pool,
            prefix,
            events,
            jobs,
            inbox,
        })
    }

    /// `<prefix><name>`.
    pub fn table(&self, name: &str) -> String {
        format!("{}{name}", self.prefix)
    }
}

/// A service's [`Tables`] on whichever database the process uses.
pub type Store = Db<Tables<Postgres>, Tables<Sqlite>>;

/// Opens `service`'s tables (creating them: `ddl`, `{p}` for the prefix)
/// with events from `source`; `jobs` adds the task-queue outbox.
pub async fn open_store(
    database: &Database,
    brokers: &Brokers,
    service: &str,
    source: &str,
    jobs: bool,
    ddl: &[&str],
) -> Result<Store, Error> {
    let namespace = brokers.namespace.as_deref();
    let prefix = table_prefix(namespace, service)?;
    let store = match &database.pools {
        Db::Postgres(pool) => Db::Postgres(Tables::new(pool.clone(), prefix, source, namespace)?),
        Db::Sqlite(pool) => Db::Sqlite(Tables::new(pool.clone(), prefix, source, namespace)?),
    };
    // The outbox tables, then the service's (`{p}`: the prefix); every
    // statement idempotent.
    on_db!(&store, tables => {
        tables.events.migrate(&tables.pool).await?;
        if jobs {
            tables.jobs.migrate(&tables.pool).await?;
        }
        for statement in ddl {
            let statement = statement.replace("{p}", &tables.prefix);
            sqlx::raw_sql(sqlx::AssertSqlSafe(statement))
                .execute(&tables.pool)
                .await
                .map_err(|error| db_error("create the service's tables", error))?;
        }
    });
    Ok(store)
}

/// How the services' relays run: woken by `NOTIFY` on PostgreSQL, polling
/// briefly on SQLite (where nothing wakes them), and never waiting longer
/// than a second between tries while a broker is down, so a broker that
/// comes back is used within a second.
fn relay_config(postgres: bool) -> RelayConfig {
    let config =
        RelayConfig::default().with_backoff(Duration::from_millis(50), Duration::from_secs(1));
    if postgres {
        config
            .with_listen(true)
            .with_poll_interval(Duration::from_millis(200))
            .with_rebalance_interval(Duration::from_secs(1))
    } else {
        config.with_poll_interval(Duration::from_millis(5))
    }
}

/// Starts the relay of `store`'s event outbox to `events`, and of its job
/// outbox to `tasks` when given.
pub fn spawn_relays(
    store: &Store,
    events: Arc<dyn Transport>,
    tasks: Option<Arc<dyn Transport>>,
) -> Vec<RelayHandle> {
    fn spawn<DB: OutboxDatabase>(
        tables: &Tables<DB>,
        postgres: bool,
        events: Arc<dyn Transport>,
        tasks: Option<Arc<dyn Transport>>,
    ) -> Vec<RelayHandle> {
        let mut relays = vec![
            Relay::new(&tables.events, tables.pool.clone(), events)
                .with_config(relay_config(postgres))
                .spawn(),
        ];
        if let Some(tasks) = tasks {
            relays.push(
                Relay::new(&tables.jobs, tables.pool.clone(), tasks)
                    .with_config(relay_config(postgres))
                    .spawn(),
            );
        }
        relays
    }
    match store {
        Db::Postgres(tables) => spawn(tables, true, events, tasks),
        Db::Sqlite(tables) => spawn(tables, false, events, tasks),
    }
}

/// Stops `relays`, each within [`RELAY_CLOSE`]; what one had sent but not
/// yet deleted is sent again at the next start (the inbox absorbs it).
pub async fn close_relays(relays: &mut Vec<RelayHandle>) -> Result<(), Error> {
    let mut result = Ok(());
    for relay in relays.drain(..) {
        if let Err(error) = relay.close(RELAY_CLOSE).await {
            result = Err(error);
        }
    }
    result
}

/// A sqlx error as the crate's error: a lost or busy database is worth a
/// retry; a statement the database refuses is not.
pub fn db_error(what: &str, error: sqlx::Error) -> Error {
    let retryable = match &error {
        sqlx::Error::Database(database) => {
            let code = database.code().unwrap_or_default();
            // serialization failure, deadlock, SQLITE_BUSY / SQLITE_LOCKED
            matches!(code.as_ref(), "40001" | "40P01" | "5" | "6" | "517" | "261")
                || code.starts_with("08")
        }
        sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut | sqlx::Error::Protocol(_) => true,
        _ => false,
    };
    let message = format!("{what}: {error}");
    if retryable {
        Error::new(ErrorKind::Unavailable, message)
    } else {
        Error::new(ErrorKind::Rejected, message)
    }
}

/// Whether `error` is a unique-key violation (on either database).
pub fn is_unique_violation(error: &sqlx::Error) -> bool {
    matches!(error, sqlx::Error::Database(database) if database.is_unique_violation())
}

/// What the operator console shows of `relays` (from [`spawn_relays`] on
/// `store`): each relay's counts, and its outbox's pending rows and lag.
pub fn outbox_sources(
    store: &Store,
    relays: &[RelayHandle],
) -> Vec<switchboard::console::OutboxSource> {
    fn sources<DB: OutboxDatabase>(
        tables: &Tables<DB>,
        relays: &[RelayHandle],
    ) -> Vec<switchboard::console::OutboxSource> {
        let outboxes = [("events", &tables.events), ("tasks", &tables.jobs)];
        relays
            .iter()
            .zip(outboxes)
            .map(|(relay, (name, outbox))| {
                switchboard::console::OutboxSource::new(name, relay.shared_stats())
                    .with_pending(outbox.clone(), tables.pool.clone())
            })
            .collect()
    }
    match store {
        Db::Postgres(tables) => sources(tables, relays),
        Db::Sqlite(tables) => sources(tables, relays),
    }
}
