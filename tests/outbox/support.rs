//! Pools, prefixes, an event type, transports that fail on demand.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use sqlx::postgres::PgPoolOptions;
use sqlx::sqlite::SqlitePoolOptions;
use sqlx::{AssertSqlSafe, PgPool, SqlitePool};
use switchboard::{
    Capabilities, Error, ErrorKind, Event, Publisher, RawMessage, SubscribeOptions, Subscriber,
    Subscription, Topology, Transport,
};

/// The event every test sends.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Step {
    pub key: String,
    pub n: u64,
    pub note: String,
}

impl Event for Step {
    const TYPE: &'static str = "outbox.step";
    const VERSION: &'static str = "1.0";
}

pub fn step(key: &str, n: u64) -> Step {
    Step {
        key: key.to_owned(),
        n,
        note: String::new(),
    }
}

/// A fresh table prefix.
pub fn prefix() -> String {
    format!("t{}_", &uuid::Uuid::new_v4().simple().to_string()[..16])
}

pub fn pg_url() -> String {
    std::env::var("SWITCHBOARD_PG_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned())
}

pub async fn pg() -> PgPool {
    PgPoolOptions::new()
        .max_connections(12)
        .acquire_timeout(Duration::from_secs(10))
        .connect(&pg_url())
        .await
        .expect("PostgreSQL at SWITCHBOARD_PG_URL")
}

/// A pool on a new SQLite file (WAL, so the relay reads while a writer
/// writes).
pub async fn sqlite() -> SqlitePool {
    let file = std::env::temp_dir().join(format!("outbox-{}.db", uuid::Uuid::new_v4().simple()));
    let options = sqlx::sqlite::SqliteConnectOptions::new()
        .filename(file)
        .create_if_missing(true)
        .journal_mode(sqlx::sqlite::SqliteJournalMode::Wal)
        .busy_timeout(Duration::from_secs(5));
    SqlitePoolOptions::new()
        .max_connections(4)
        .connect_with(options)
        .await
        .expect("a SQLite file")
}

/// Drops a test's tables (best effort).
pub async fn drop_pg_tables(pool: &PgPool, prefix: &str) {
    let statement = format!("DROP TABLE IF EXISTS {prefix}outbox, {prefix}inbox, {prefix}effects");
    let _ = sqlx::query(AssertSqlSafe(statement)).execute(pool).await;
}

/// Polls `check` until it holds, failing after `within`.
pub async fn eventually<F, Fut>(what: &str, within: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if check().await {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

pub const WITHIN: Duration = Duration::from_secs(20);

/// A transport over another that can be made to fail: `down` fails every
/// publish as a lost connection; a body containing `refuse` is refused for
/// good; `hang_after_accept` lets the inner transport accept, then never
/// answers (the relay dies before it can delete).
pub struct Faulty {
    pub inner: Arc<dyn Transport>,
    pub down: AtomicBool,
    pub refuse: Option<&'static str>,
    pub hang_after_accept: AtomicBool,
    pub accepted_then_hung: tokio::sync::Notify,
    pub delay: Option<Duration>,
}

impl Faulty {
    pub fn over(inner: Arc<dyn Transport>) -> Self {
        Self {
            inner,
            down: AtomicBool::new(false),
            refuse: None,
            hang_after_accept: AtomicBool::new(false),
            accepted_then_hung: tokio::sync::Notify::new(),
            delay: None,
        }
    }
}

#[async_trait]
impl Publisher for Faulty {
    async fn publish(&self, topic: &str, message: RawMessage) -> Result<(), Error> {
        self.publish_batch(topic, vec![message]).await
    }

    async fn publish_batch(&self, topic: &str, messages: Vec<RawMessage>) -> Result<(), Error> {
        if self.down.load(Ordering::SeqCst) {
            return Err(Error::new(ErrorKind::Connection, "broker down (test)"));
        }
        if let Some(delay) = self.delay {
            let jitter = rand_below(delay.as_micros() as u64 + 1);
            tokio::time::sleep(Duration::from_micros(jitter)).await;
        }
        if let Some(refused) = self.refuse {
            let poisoned = messages
                .iter()
                .any(|message| String::from_utf8_lossy(&message.body).contains(refused));
            if poisoned {
                return Err(Error::permanent("message refused by the broker (test)"));
            }
        }
        self.inner.publish_batch(topic, messages).await?;
        if self.hang_after_accept.load(Ordering::SeqCst) {
            self.accepted_then_hung.notify_one();
            std::future::pending::<()>().await;
        }
        Ok(())
    }
}

#[async_trait]
impl Subscriber for Faulty {
    async fn subscribe(
        &self,
        topic: &str,
        options: SubscribeOptions,
    ) -> Result<Subscription, Error> {
        self.inner.subscribe(topic, options).await
    }
}

#[async_trait]
impl Transport for Faulty {
    fn name(&self) -> &'static str {
        "faulty"
    }

    fn capabilities(&self) -> Capabilities {
        self.inner.capabilities()
    }

    async fn declare(&self, topology: &Topology) -> Result<(), Error> {
        self.inner.declare(topology).await
    }
}

/// A small random number (no rand dependency: uuid's randomness).
pub fn rand_below(bound: u64) -> u64 {
    (uuid::Uuid::new_v4().as_u128() as u64) % bound.max(1)
}

/// A bus over `transport` with a `seen` group whose handler forwards what
/// `pick` takes of each step; the receiver gets them in handling order.
pub async fn consumer<T: Send + 'static>(
    transport: std::sync::Arc<dyn switchboard::Transport>,
    pick: fn(&Step) -> T,
) -> (
    switchboard::ConsumerHandle,
    tokio::sync::mpsc::UnboundedReceiver<T>,
) {
    use switchboard::{EventBus, Message, SubscribeOptions, Topology, handler_fn};
    let bus = EventBus::new(transport, "test");
    bus.declare(&Topology::new().with_event::<Step, _>(["seen"]))
        .await
        .unwrap();
    let (seen, rx) = tokio::sync::mpsc::unbounded_channel();
    let handle = bus
        .subscribe(
            SubscribeOptions::new("seen"),
            handler_fn(move |message: Message<Step>| {
                seen.send(pick(message.payload())).ok();
                async { Ok(()) }
            }),
        )
        .await
        .unwrap();
    (handle, rx)
}

/// The next thing the consumer forwarded, within [`WITHIN`].
pub async fn next<T>(rx: &mut tokio::sync::mpsc::UnboundedReceiver<T>) -> T {
    tokio::time::timeout(WITHIN, rx.recv())
        .await
        .expect("delivered in time")
        .expect("consumer alive")
}

/// A fresh outbox (random prefix, migrated) on the shared PostgreSQL and an
/// empty `<prefix>effects (event_id, n)` table for a handler's effects.
pub async fn pg_outbox_with_effects() -> (
    PgPool,
    String,
    switchboard::outbox::Outbox<sqlx::Postgres>,
    String,
) {
    let pool = pg().await;
    let prefix = prefix();
    let outbox = switchboard::outbox::Outbox::new(&prefix, "test").unwrap();
    outbox.migrate(&pool).await.unwrap();
    let effects = format!("{prefix}effects");
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "CREATE TABLE {effects} (event_id TEXT NOT NULL, n BIGINT NOT NULL)"
    )))
    .execute(&pool)
    .await
    .unwrap();
    (pool, prefix, outbox, effects)
}
