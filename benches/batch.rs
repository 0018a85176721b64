//! Game applying `trade.executed` to its ledger one by one beside in
//! batches of 100 ([`EventBus::subscribe_batch`]), and in batches of 100
//! ordered by user (`batch_100_by_user`: an `OrderingKey` on the user, so
//! each user's trades are applied in order; a batch may hold many trades
//! of one user), in events per second from the publish of 1 000 trades
//! until the last is applied.
//!
//! * `ledger_sqlite`: the ledger is a SQLite file (WAL, `synchronous =
//!   FULL`): each trade is remembered by event id (so a redelivery is not
//!   applied twice) and added to the user's position. One by one, that is
//!   a transaction per trade; batched, one per batch — where batching pays.
//! * `ledger_in_memory`: the same ledger in a `HashMap` behind a mutex, so
//!   the difference is the consume loop's own cost per message.
//!
//! Memory transport, 20 users, concurrency 1 (a single-writer ledger), a
//! batch waits at most 5 ms to fill; current-thread tokio runtime.
//! `cargo bench --bench batch --features outbox` (SQLite is bundled; the
//! database lives in the temp directory and is removed afterwards).

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use serde::{Deserialize, Serialize};
use sqlx::SqlitePool;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use switchboard::{
    ConsumerHandle, Error, Event, EventBus, EventEnvelope, MemoryTransport, Message, OrderingKey,
    SubscribeOptions, batch_fn, handler_fn,
};
use tokio::sync::watch;

const TRADES: u64 = 1_000;
const USERS: u64 = 20;
const BATCH: usize = 100;

#[derive(Debug, Clone, Serialize, Deserialize)]
struct TradeExecuted {
    order_id: String,
    user_id: String,
    symbol: String,
    quantity: i64,
    price: f64,
}

impl Event for TradeExecuted {
    const TYPE: &'static str = "trade.executed";
    const VERSION: &'static str = "1.0";
}

fn trade(n: u64) -> TradeExecuted {
    TradeExecuted {
        order_id: n.to_string(),
        user_id: (n % USERS).to_string(),
        symbol: "AAPL".into(),
        quantity: 100,
        price: 150.0,
    }
}

/// Where Game keeps positions, and how many trades it has applied.
#[derive(Clone)]
enum Ledger {
    Sqlite(SqlitePool),
    InMemory(Arc<Mutex<MemoryLedger>>),
}

#[derive(Default)]
struct MemoryLedger {
    applied: HashSet<uuid::Uuid>,
    positions: HashMap<(String, String), i64>,
}

impl Ledger {
    /// Applies `trades` in one transaction (one lock).
    async fn apply(&self, trades: &[Message<TradeExecuted>]) -> Result<(), Error> {
        match self {
            Self::Sqlite(pool) => {
                let failed = |error: sqlx::Error| Error::transient(error.to_string());
                let mut tx = pool.begin().await.map_err(failed)?;
                for message in trades {
                    let trade = message.payload();
                    let first = sqlx::query("INSERT OR IGNORE INTO applied (event_id) VALUES (?)")
                        .bind(message.event_id().to_string())
                        .execute(&mut *tx)
                        .await
                        .map_err(failed)?
                        .rows_affected()
                        == 1;
                    if first {
                        sqlx::query(
                            "INSERT INTO positions (user_id, symbol, quantity) VALUES (?, ?, ?) \
                             ON CONFLICT (user_id, symbol) DO UPDATE SET quantity = quantity + excluded.quantity",
                        )
                        .bind(&trade.user_id)
                        .bind(&trade.symbol)
                        .bind(trade.quantity)
                        .execute(&mut *tx)
                        .await
                        .map_err(failed)?;
                    }
                }
                tx.commit().await.map_err(failed)
            }
            Self::InMemory(ledger) => {
                let mut ledger = ledger.lock().expect("ledger lock");
                for message in trades {
                    let trade = message.payload();
                    if ledger.applied.insert(message.event_id()) {
                        *ledger
                            .positions
                            .entry((trade.user_id.clone(), trade.symbol.clone()))
                            .or_default() += trade.quantity;
                    }
                }
                Ok(())
            }
        }
    }
}

async fn sqlite(path: &PathBuf) -> SqlitePool {
    let options = SqliteConnectOptions::new()
        .filename(path)
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        .synchronous(SqliteSynchronous::Full);
    let pool = SqlitePoolOptions::new()
        .max_connections(1)
        .connect_with(options)
        .await
        .expect("open SQLite");
    for ddl in [
        "CREATE TABLE applied (event_id TEXT PRIMARY KEY)",
        "CREATE TABLE positions (user_id TEXT, symbol TEXT, quantity INTEGER, PRIMARY KEY (user_id, symbol))",
    ] {
        sqlx::query(ddl).execute(&pool).await.expect("create table");
    }
    pool
}

/// How Game consumes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    OneByOne,
    Batched,
    /// Batched, each user's trades in order.
    BatchedByUser,
}

/// Subscribes Game's ledger, one by one or in batches; `applied` counts.
async fn subscribe(
    bus: &EventBus,
    ledger: Ledger,
    mode: Mode,
    applied: watch::Sender<u64>,
) -> ConsumerHandle {
    let mut options = SubscribeOptions::new("game").with_prefetch(2 * BATCH);
    if mode == Mode::BatchedByUser {
        let by_user =
            OrderingKey::of(|t: &EventEnvelope<TradeExecuted>| t.payload().user_id.clone());
        options = options.with_ordering_key(by_user);
    }
    let applied = Arc::new(applied);
    if mode != Mode::OneByOne {
        let handler = batch_fn(move |trades: Vec<Message<TradeExecuted>>| {
            let (ledger, applied) = (ledger.clone(), applied.clone());
            async move {
                match ledger.apply(&trades).await {
                    Ok(()) => {
                        applied.send_modify(|count| *count += trades.len() as u64);
                        trades.iter().map(|_| Ok(())).collect()
                    }
                    Err(error) => trades
                        .iter()
                        .map(|_| Err(Error::transient(error.to_string())))
                        .collect(),
                }
            }
        });
        let wait = Duration::from_millis(5);
        bus.subscribe_batch(options, BATCH, wait, handler)
            .await
            .expect("subscribe_batch")
    } else {
        let handler = handler_fn(move |trade: Message<TradeExecuted>| {
            let (ledger, applied) = (ledger.clone(), applied.clone());
            async move {
                ledger.apply(std::slice::from_ref(&trade)).await?;
                applied.send_modify(|count| *count += 1);
                Ok(())
            }
        });
        bus.subscribe(options, handler).await.expect("subscribe")
    }
}

fn ledgers(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    for store in ["sqlite", "in_memory"] {
        let mut group = c.benchmark_group(format!("ledger_{store}"));
        group.throughput(Throughput::Elements(TRADES));
        group.sample_size(10);
        group.measurement_time(Duration::from_secs(5));
        for (mode, name) in [
            (Mode::OneByOne, "one_by_one"),
            (Mode::Batched, "batch_100"),
            (Mode::BatchedByUser, "batch_100_by_user"),
        ] {
            let path = std::env::temp_dir().join(format!(
                "switchboard-bench-{}.db",
                uuid::Uuid::new_v4().simple()
            ));
            let bus = EventBus::new(Arc::new(MemoryTransport::new()), "trading-service");
            let (applied, seen) = watch::channel(0);
            let consumer = runtime.block_on(async {
                let ledger = match store {
                    "sqlite" => Ledger::Sqlite(sqlite(&path).await),
                    _ => Ledger::InMemory(Arc::default()),
                };
                subscribe(&bus, ledger, mode, applied).await
            });
            let mut next = 0;
            group.bench_function(BenchmarkId::from_parameter(name), |b| {
                b.to_async(&runtime).iter_custom(|iters| {
                    let (bus, mut seen) = (bus.clone(), seen.clone());
                    let first = next;
                    next += iters * TRADES;
                    async move {
                        let started = Instant::now();
                        for round in 0..iters {
                            let from = first + round * TRADES;
                            bus.publish_batch((from..from + TRADES).map(trade))
                                .await
                                .expect("publish");
                            let target = from + TRADES;
                            seen.wait_for(|count| *count >= target)
                                .await
                                .expect("the ledger runs");
                        }
                        started.elapsed()
                    }
                });
            });
            runtime.block_on(consumer.shutdown()).expect("shutdown");
            for file in [
                path.clone(),
                path.with_extension("db-wal"),
                path.with_extension("db-shm"),
            ] {
                let _ = std::fs::remove_file(file);
            }
        }
        group.finish();
    }
}

criterion_group!(benches, ledgers);
criterion_main!(benches);
