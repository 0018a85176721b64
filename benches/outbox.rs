//! The transactional outbox beside publishing directly, on the machine's
//! PostgreSQL and Redis Streams:
//!
//! * `outbox_one_event`: one event from the writer's BEGIN until Redis
//!   accepted it and the relay deleted the row (relay woken by NOTIFY),
//!   beside one direct `publish` and beside the writer's transaction alone
//!   (an insert and its COMMIT, a WAL flush).
//! * `outbox_relay_throughput`: a relay draining 500 committed rows in
//!   batches of 100 (its start included), beside 5 direct `publish_batch`
//!   calls of 100; and `relay_drain_steady`, 5 000 rows timed from the
//!   first batch sent, so the relay's start is left out.
//! * `outbox_writer_tx`: transactions per second of 4 concurrent writers,
//!   each inserting a business row and enqueueing one event, with NOTIFY off
//!   and on, beside the business insert alone.
//!
//! `cargo bench --bench outbox --features outbox,redis-streams`
//! (PostgreSQL at `SWITCHBOARD_PG_URL`, default
//! `postgres://postgres@127.0.0.1:5432/test`; Redis at 127.0.0.1:6379 or
//! `SWITCHBOARD_REDIS_URL`; current-thread tokio runtime). Each run uses
//! its own table prefix and stream keys and removes them afterwards.

use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use serde::{Deserialize, Serialize};
use sqlx::postgres::PgPoolOptions;
use sqlx::{AssertSqlSafe, PgPool};
use switchboard::outbox::{Outbox, Relay, RelayConfig, RelayHandle};
use switchboard::transport::redis_streams::{RedisStreamsConfig, RedisStreamsTransport};
use switchboard::{Codec, Event, EventEnvelope, Publisher, RawMessage, Transport, header};

#[derive(Debug, Clone, Serialize, Deserialize)]
struct TradeExecuted {
    order_id: String,
    user_id: String,
    symbol: String,
    quantity: u64,
    price: f64,
}

impl Event for TradeExecuted {
    const TYPE: &'static str = "trade.executed";
    const VERSION: &'static str = "1.0";
}

fn trade(n: u64) -> TradeExecuted {
    TradeExecuted {
        order_id: n.to_string(),
        user_id: "456".into(),
        symbol: "AAPL".into(),
        quantity: 100,
        price: 150.0,
    }
}

fn raw(n: u64) -> RawMessage {
    let envelope = EventEnvelope::new("trading-service", trade(n));
    RawMessage::new(Codec::default().encode(&envelope).expect("encode"))
        .with_header(header::EVENT_ID, envelope.event_id().to_string())
        .with_header(header::EVENT_TYPE, TradeExecuted::TYPE)
}

fn env(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.to_owned())
}

struct Setup {
    runtime: tokio::runtime::Runtime,
    pool: PgPool,
    transport: Arc<RedisStreamsTransport>,
    redis: redis::aio::ConnectionManager,
    prefix: String,
}

impl Setup {
    fn new() -> Self {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let prefix = format!("bench{}_", &uuid::Uuid::new_v4().simple().to_string()[..12]);
        let (pool, transport, redis) = runtime.block_on(async {
            let pool = PgPoolOptions::new()
                .max_connections(10)
                .connect(&env(
                    "SWITCHBOARD_PG_URL",
                    "postgres://postgres@127.0.0.1:5432/test",
                ))
                .await
                .expect("PostgreSQL");
            let redis_url = env("SWITCHBOARD_REDIS_URL", "redis://127.0.0.1:6379");
            let config =
                RedisStreamsConfig::default().with_key_prefix(format!("sb-bench-{prefix}:"));
            let transport = RedisStreamsTransport::connect_with(&redis_url, config)
                .await
                .expect("Redis");
            let redis = redis::Client::open(redis_url)
                .expect("client")
                .get_connection_manager()
                .await
                .expect("raw connection");
            (pool, Arc::new(transport), redis)
        });
        Self {
            runtime,
            pool,
            transport,
            redis,
            prefix,
        }
    }

    fn outbox(&self, name: &str, notify: bool) -> Outbox<sqlx::Postgres> {
        let outbox = Outbox::new(&format!("{}{name}_", self.prefix), "trading-service")
            .expect("prefix")
            .with_notify(notify);
        self.runtime
            .block_on(outbox.migrate(&self.pool))
            .expect("migrate");
        outbox
    }

    fn relay(&self, outbox: &Outbox<sqlx::Postgres>, config: RelayConfig) -> RelayHandle {
        let _guard = self.runtime.enter();
        Relay::new(
            outbox,
            self.pool.clone(),
            self.transport.clone() as Arc<dyn Transport>,
        )
        .with_config(config)
        .spawn()
    }

    /// Drops the tables and stream of one benchmark.
    fn clean(&self, outbox: &Outbox<sqlx::Postgres>, topic: &str) {
        self.runtime.block_on(async {
            let drop = format!(
                "DROP TABLE IF EXISTS {}, {}",
                outbox.outbox_table(),
                outbox.inbox_table()
            );
            let _ = sqlx::query(AssertSqlSafe(drop)).execute(&self.pool).await;
            let _: Result<(), _> = redis::cmd("DEL")
                .arg(self.transport.stream_key(topic))
                .query_async(&mut self.redis.clone())
                .await;
        });
    }
}

async fn enqueue_one(pool: &PgPool, outbox: &Outbox<sqlx::Postgres>, topic: &str, n: u64) {
    let mut tx = pool.begin().await.expect("begin");
    let envelope = EventEnvelope::new("trading-service", trade(n));
    outbox
        .enqueue(&mut tx, topic, &envelope)
        .await
        .expect("enqueue");
    tx.commit().await.expect("commit");
}

/// Waits until the relay has sent `count` rows in all: woken by the relay,
/// so no spinning waiter takes a core from the relay, PostgreSQL and Redis.
async fn sent(relay: &RelayHandle, count: u64) {
    relay
        .stats()
        .wait_for_sent(count, Duration::from_secs(30))
        .await
        .expect("the relay fell behind");
}

fn one_event(c: &mut Criterion, setup: &Setup) {
    let topic = format!("one-{}", uuid::Uuid::new_v4().simple());
    let outbox = setup.outbox("one", true);
    let relay = setup.relay(
        &outbox,
        RelayConfig::default()
            .with_listen(true)
            .with_poll_interval(Duration::from_secs(1)),
    );
    // A second outbox whose relay waits for the WAL flush of its deletes.
    let flushed = setup.outbox("flushed", true);
    let synchronous = setup.relay(
        &flushed,
        RelayConfig::default()
            .with_listen(true)
            .with_poll_interval(Duration::from_secs(1))
            .with_synchronous_deletes(true),
    );
    let mut group = c.benchmark_group("outbox_one_event");
    group.bench_function("direct_publish", |b| {
        b.to_async(&setup.runtime).iter_custom(|iters| {
            let transport = setup.transport.clone();
            let topic = topic.clone();
            async move {
                let mut spent = Duration::ZERO;
                for n in 0..iters {
                    let message = raw(n);
                    let started = Instant::now();
                    transport.publish(&topic, message).await.expect("publish");
                    spent += started.elapsed();
                }
                spent
            }
        });
    });
    // What the writer's COMMIT alone costs here (a WAL flush): the floor
    // under the outbox path.
    let orders = format!("{}one_orders", setup.prefix);
    setup.runtime.block_on(async {
        let create = format!("CREATE TABLE {orders} (id BIGSERIAL PRIMARY KEY, body TEXT)");
        sqlx::query(AssertSqlSafe(create))
            .execute(&setup.pool)
            .await
            .expect("orders table");
    });
    group.bench_function("insert_and_commit_only", |b| {
        b.to_async(&setup.runtime).iter_custom(|iters| {
            let (pool, orders) = (&setup.pool, &orders);
            async move {
                let started = Instant::now();
                for _ in 0..iters {
                    let mut tx = pool.begin().await.expect("begin");
                    sqlx::query(AssertSqlSafe(format!(
                        "INSERT INTO {orders} (body) VALUES ('order')"
                    )))
                    .execute(&mut *tx)
                    .await
                    .expect("insert");
                    tx.commit().await.expect("commit");
                }
                started.elapsed()
            }
        });
    });
    for (name, relay, outbox) in [
        ("outbox_commit_to_redis", &relay, &outbox),
        (
            "outbox_commit_to_redis_synchronous_deletes",
            &synchronous,
            &flushed,
        ),
    ] {
        group.bench_function(name, |b| {
            b.to_async(&setup.runtime).iter_custom(|iters| {
                let (pool, topic) = (&setup.pool, &topic);
                async move {
                    let mut spent = Duration::ZERO;
                    for n in 0..iters {
                        let before = relay.stats().sent();
                        let started = Instant::now();
                        enqueue_one(pool, outbox, topic, n).await;
                        sent(relay, before + 1).await;
                        spent += started.elapsed();
                    }
                    spent
                }
            });
        });
    }
    group.finish();
    for relay in [relay, synchronous] {
        setup
            .runtime
            .block_on(relay.close(Duration::from_secs(10)))
            .expect("close");
    }
    setup.clean(&outbox, &topic);
    setup.clean(&flushed, &topic);
    setup.runtime.block_on(async {
        let drop = format!("DROP TABLE IF EXISTS {orders}");
        let _ = sqlx::query(AssertSqlSafe(drop)).execute(&setup.pool).await;
    });
}

const ROWS: u64 = 500;
const BATCH: usize = 100;

fn relay_throughput(c: &mut Criterion, setup: &Setup) {
    let topic = format!("drain-{}", uuid::Uuid::new_v4().simple());
    let outbox = setup.outbox("drain", false);
    let mut group = c.benchmark_group("outbox_relay_throughput");
    group.throughput(Throughput::Elements(ROWS));
    group.sample_size(10);
    group.bench_function("direct_publish_batch", |b| {
        b.to_async(&setup.runtime).iter_custom(|iters| {
            let transport = setup.transport.clone();
            let topic = topic.clone();
            async move {
                let mut spent = Duration::ZERO;
                for _ in 0..iters {
                    let batches: Vec<Vec<RawMessage>> = (0..ROWS / BATCH as u64)
                        .map(|b| (0..BATCH as u64).map(|n| raw(b * 1000 + n)).collect())
                        .collect();
                    let started = Instant::now();
                    for batch in batches {
                        transport
                            .publish_batch(&topic, batch)
                            .await
                            .expect("publish");
                    }
                    spent += started.elapsed();
                }
                spent
            }
        });
    });
    group.bench_function("relay_drain", |b| {
        b.to_async(&setup.runtime).iter_custom(|iters| {
            let (pool, outbox, topic) = (&setup.pool, &outbox, &topic);
            async move {
                let mut spent = Duration::ZERO;
                for _ in 0..iters {
                    // Committed beforehand, in transactions of 100.
                    commit_rows(pool, outbox, topic, ROWS).await;
                    let started = Instant::now();
                    let relay = drain_relay(setup, outbox);
                    sent(&relay, ROWS).await;
                    spent += started.elapsed();
                    relay.close(Duration::from_secs(10)).await.expect("close");
                }
                spent
            }
        });
    });
    // Steady state: the relay's start (its leases) left out — the clock
    // starts once the first batch is sent, and counts the rows after it.
    group.throughput(Throughput::Elements(STEADY_ROWS - BATCH as u64));
    group.bench_function("relay_drain_steady", |b| {
        b.to_async(&setup.runtime).iter_custom(|iters| {
            let (pool, outbox, topic) = (&setup.pool, &outbox, &topic);
            async move {
                let mut spent = Duration::ZERO;
                for _ in 0..iters {
                    commit_rows(pool, outbox, topic, STEADY_ROWS).await;
                    let relay = drain_relay(setup, outbox);
                    sent(&relay, BATCH as u64).await;
                    let started = Instant::now();
                    sent(&relay, STEADY_ROWS).await;
                    spent += started.elapsed();
                    relay.close(Duration::from_secs(10)).await.expect("close");
                }
                spent
            }
        });
    });
    group.finish();
    setup.clean(&outbox, &topic);
}

/// Rows of the steady-state drain: the first batch starts the clock.
const STEADY_ROWS: u64 = 5_000;

/// Commits `rows` events to `topic` beforehand, in transactions of `BATCH`.
async fn commit_rows(pool: &PgPool, outbox: &Outbox<sqlx::Postgres>, topic: &str, rows: u64) {
    for chunk in 0..rows / BATCH as u64 {
        let mut tx = pool.begin().await.expect("begin");
        for n in 0..BATCH as u64 {
            let envelope = EventEnvelope::new("trading-service", trade(chunk * 1000 + n));
            outbox
                .enqueue(&mut tx, topic, &envelope)
                .await
                .expect("enqueue");
        }
        tx.commit().await.expect("commit");
    }
}

/// A relay sending in batches of `BATCH` to the bench's Redis.
fn drain_relay(setup: &Setup, outbox: &Outbox<sqlx::Postgres>) -> RelayHandle {
    Relay::new(
        outbox,
        setup.pool.clone(),
        setup.transport.clone() as Arc<dyn Transport>,
    )
    .with_config(RelayConfig::default().with_batch_size(BATCH))
    .spawn()
}

const WRITERS: u64 = 4;

fn writer_tx(c: &mut Criterion, setup: &Setup) {
    let topic = "writer";
    let quiet = setup.outbox("quiet", false);
    let loud = setup.outbox("loud", true);
    let orders = format!("{}orders", setup.prefix);
    setup.runtime.block_on(async {
        let create = format!(
            "CREATE TABLE IF NOT EXISTS {orders} (id BIGSERIAL PRIMARY KEY, body TEXT NOT NULL)"
        );
        sqlx::query(AssertSqlSafe(create))
            .execute(&setup.pool)
            .await
            .expect("orders table");
    });
    let mut group = c.benchmark_group("outbox_writer_tx");
    group.throughput(Throughput::Elements(1));
    let cases: [(&str, Option<&Outbox<sqlx::Postgres>>); 3] = [
        ("insert_only", None),
        ("insert_and_enqueue_notify_off", Some(&quiet)),
        ("insert_and_enqueue_notify_on", Some(&loud)),
    ];
    for (name, outbox) in cases {
        group.bench_function(BenchmarkId::new(name, WRITERS), |b| {
            b.to_async(&setup.runtime).iter_custom(|iters| {
                let (pool, orders) = (&setup.pool, &orders);
                async move {
                    let per_writer = iters.div_ceil(WRITERS);
                    let started = Instant::now();
                    let writers = (0..WRITERS).map(|writer| async move {
                        for n in 0..per_writer {
                            let mut tx = pool.begin().await.expect("begin");
                            sqlx::query(AssertSqlSafe(format!(
                                "INSERT INTO {orders} (body) VALUES ($1)"
                            )))
                            .bind("order")
                            .execute(&mut *tx)
                            .await
                            .expect("insert");
                            if let Some(outbox) = outbox {
                                // A key per writer: the writers do not wait
                                // on each other's key lock, only (with
                                // NOTIFY) on the notify queue.
                                let envelope = EventEnvelope::new(
                                    "trading-service",
                                    trade(writer * 1_000_000 + n),
                                );
                                outbox
                                    .enqueue_keyed(&mut tx, topic, &format!("w{writer}"), &envelope)
                                    .await
                                    .expect("enqueue");
                            }
                            tx.commit().await.expect("commit");
                        }
                    });
                    futures_util::future::join_all(writers).await;
                    // Time per transaction, over the whole run.
                    started
                        .elapsed()
                        .mul_f64(iters as f64 / (per_writer * WRITERS) as f64)
                }
            });
        });
    }
    group.finish();
    setup.clean(&quiet, topic);
    setup.clean(&loud, topic);
    setup.runtime.block_on(async {
        let drop = format!("DROP TABLE IF EXISTS {orders}");
        let _ = sqlx::query(AssertSqlSafe(drop)).execute(&setup.pool).await;
    });
}

fn benches(c: &mut Criterion) {
    let setup = Setup::new();
    one_event(c, &setup);
    relay_throughput(c, &setup);
    writer_tx(c, &setup);
}

criterion_group!(outbox, benches);
criterion_main!(outbox);
