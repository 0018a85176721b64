//! Transactional outbox and inbox (feature `outbox`): an event is published
//! if and only if the database write that caused it committed, and its
//! effect on a consumer is applied once.
//!
//! ```text
//!  service:   BEGIN; INSERT order …; outbox.enqueue_event(&mut tx, OrderPlaced {..}); COMMIT
//!  relay:     lease key partitions ▸ read committed rows in id order ▸ publish_batch ▸ DELETE
//!  consumer:  BEGIN; inbox claim (group, event_id) ▸ apply effect ▸ COMMIT ▸ ack
//! ```
//!
//! # Guarantees
//!
//! | | PostgreSQL | SQLite |
//! |---|---|---|
//! | atomic with the business write | yes: the row is in the caller's transaction; rolled back → never sent | yes |
//! | sent | at least once: a row is deleted only after the transport accepted it | at least once |
//! | can duplicate | a relay that dies (or loses its database session) between the transport's accept and the delete; a batch retried after a partial accept; a database crash (the relay deletes with `synchronous_commit = off` unless [`synchronous_deletes`](RelayConfig::synchronous_deletes), so its last deletes before the crash are undone) | a relay that dies between accept and delete; a batch retried after a partial accept |
//! | ordered | per ordering key (default: the topic), in commit order, across any number of relays | per key, in commit order; one relay sends at a time (a lease row) |
//! | applied once (inbox) | the mark `(group, event_id)` commits with the effect | the same |
//! | lost | never by the relay; a row the transport refuses for good is parked, not dropped | the same |
//!
//! What the transport then does with the message (persistence, redelivery)
//! is its own guarantee ([`Capabilities`](crate::Capabilities)).
//!
//! # Ordering
//!
//! Row ids do not follow commit order by themselves: transaction A draws
//! id 10, B draws 11, B commits first, and a relay reading in id order
//! sends 11 before 10 exists. So, on PostgreSQL:
//!
//! * [`Outbox::enqueue`] takes `pg_advisory_xact_lock(<outbox>, hash(key))`
//!   in the statement that draws the id. Same-key transactions queue on it
//!   until the holder commits or rolls back, so per key id order *is* commit
//!   order. **Cost**: same-key writers serialise from their enqueue to their
//!   commit — enqueue last, just before committing. Keys whose hashes
//!   collide (32 bits) serialise too, which costs time but never order. Two
//!   transactions that enqueue two keys in opposite orders can deadlock;
//!   PostgreSQL aborts one (`40P01`, retryable). [`Outbox::lock_key`] takes
//!   the same lock earlier, for a transaction that reads per-key state (a
//!   sequence number, an aggregate's version) to put into the event.
//! * Relays lease **key partitions**, never rows: `key_hash mod partitions`
//!   ([`RelayConfig::partitions`], 32 by default, the same for every relay)
//!   is locked with `pg_try_advisory_lock` on a session the relay holds for
//!   itself. Each live relay also holds a membership lock, so relays count
//!   each other in `pg_locks` and each takes `ceil(partitions / relays)`;
//!   every [`rebalance_interval`](RelayConfig::rebalance_interval) a relay
//!   with too many gives some back between rounds and one with too few takes
//!   free ones. A relay that dies loses its session, and with it its leases.
//!   (Row-level `FOR UPDATE SKIP LOCKED` with two relays would let one send
//!   row 11 of a key while the other still holds row 10.)
//! * **Cost of the leases**: one connection per relay taken out of the pool
//!   for its lifetime, a few `pg_locks` reads per rebalance, and no more
//!   parallelism than there are partitions. A relay whose session drops
//!   while a publish is under way may be overtaken by the relay that takes
//!   the partition over: the rows in flight then arrive twice, the late copy
//!   after later rows — the inbox drops it as a duplicate.
//!
//! SQLite has one writer at a time, so ids follow commit order already. It
//! has no advisory locks, so **one relay sends at a time**: relays take a
//! lease row (`<prefix>outbox_lease`) that the holder renews every
//! `rebalance_interval` and gives back on close; the others stand by and
//! take over when it is given back or has not been renewed for three
//! intervals (at least 1 s). A holder stalled longer than that can overlap
//! with its successor, as on PostgreSQL after a lost session. Open the
//! database in WAL journal mode (`SqliteJournalMode::Wal`) so the relay
//! reads while a writer writes, with a `busy_timeout` for the writers.
//!
//! # The relay
//!
//! [`Relay`] reads up to [`batch_size`](RelayConfig::batch_size) rows of its
//! partitions, publishes each run of same-topic rows with one
//! [`publish_batch`](crate::Publisher::publish_batch) — the stored envelope
//! bytes as they are, so the `event_id` and the trace context written at
//! enqueue reach the consumer — and deletes what the transport accepted.
//! While a backlog drains, the database deletes the batch just accepted and
//! reads the next one while the transport takes the current one (on
//! PostgreSQL on two sessions of the relay's own, taken from the pool and
//! kept: size the pool for them, plus one with `listen`); a batch
//! is published only once the one before it was accepted, and the relay's
//! database session reads in id order through the primary key (it never
//! scans or sorts the pending rows, so a batch costs the same with 100 rows
//! waiting or a million).
//! A transport or database outage ends the round without deleting what was
//! not accepted; the relay retries with exponential backoff (`backon`) and
//! never gives up. It polls every [`poll_interval`](RelayConfig::poll_interval);
//! on PostgreSQL, [`Outbox::with_notify`] (writers) and
//! [`RelayConfig::with_listen`] (relay) add `LISTEN`/`NOTIFY` as a wake-up
//! hint. `NOTIFY` is off by default: PostgreSQL serialises the commits of
//! every notifying transaction on one global lock, which caps writer
//! throughput (see the `outbox` benchmark).
//!
//! A row the transport refuses for good (a non-retryable error: refused as
//! invalid, too large, unroutable) is **parked**: it stays in the table
//! with `parked_at` and `parked_reason` set, counted in
//! `switchboard_outbox_parked_total`, logged as an error and reported to the
//! [`ParkedAlert`] hook. By default it **holds its key**
//! ([`OnRefused::HoldKey`]): the key's later rows wait until an operator
//! [unparks](Outbox::unpark) it (it keeps its id, so its place) or
//! [discards](Outbox::discard) it — order is kept at the price of a stuck
//! key; [`OnRefused::ParkAndContinue`] lets the key go on with a hole.
//!
//! [`RelayHandle::close`] stops a relay within a deadline; rows it had
//! published but not deleted when it was stopped are sent again.
//!
//! **Where to run it.** Inside the service (`Relay::spawn` at start-up) is
//! simplest: every replica runs one and the leases share the partitions out.
//! In its own process (a small binary with the same pool settings and
//! [`Relay::run`] until SIGTERM) when the service's replicas are many and
//! the database's connections few — each relay holds one connection, plus
//! one for `LISTEN`.
//!
//! # The inbox
//!
//! [`Inbox::handler`] makes a handler the bus subscribes like any other:
//! for each message it begins a transaction, inserts the mark
//! `(group, event_id)`, runs the user's function with the transaction and
//! commits — effect and mark together. A redelivered duplicate finds the
//! mark and is acked without running; a failed function rolls back both, so
//! the redelivery runs it again. [`Inbox::cleanup`] (or
//! [`Inbox::spawn_cleanup`]) removes marks older than a retention.
//!
//! It stands **instead of** the [dedupe layer](crate::middleware::dedupe)
//! for handlers whose effect is in the same database: the dedupe layer's
//! marks live beside the effect (moka, Redis), so a crash between the
//! effect and the done mark applies it twice; the inbox's mark cannot
//! commit without the effect. Keep the retry, timeout and dead-letter
//! layers outside it as usual (a retry runs a fresh transaction); put the
//! dedupe layer outside it only to turn duplicates away before they take a
//! connection.
//!
//! # Schema
//!
//! [`Outbox::migrate`] creates, if missing (idempotent, safe to run from
//! several services at once), for a prefix `p_`:
//!
//! ```text
//! p_outbox (id BIGSERIAL PRIMARY KEY,        -- INTEGER AUTOINCREMENT on SQLite
//!           topic, ordering_key TEXT, key_hash BIGINT, event_id TEXT,
//!           headers TEXT (JSON), body BYTEA (the envelope as published),
//!           created_at TIMESTAMPTZ DEFAULT now(), attempts INTEGER,
//!           parked_at TIMESTAMPTZ NULL, parked_reason TEXT NULL)
//!   + index p_outbox_parked_key (ordering_key) WHERE parked_at IS NOT NULL
//! p_inbox  (consumer_group TEXT, event_id TEXT, handled_at TIMESTAMPTZ,
//!           PRIMARY KEY (consumer_group, event_id))
//!   + index p_inbox_handled_at (handled_at)
//! p_outbox_lease (id = 1, holder TEXT, expires_at)   -- SQLite only: the relay's lease
//! ```
//!
//! The prefix is a plain lower-case identifier (checked); a test or a
//! tenant can have its own tables.
//!
//! # Autovacuum
//!
//! The outbox table is insert-then-delete: every row dies within seconds,
//! and the default autovacuum trigger (20 % of the table dead) lets a busy
//! outbox bloat and its id index fill with dead entries the relay's scan
//! walks. Vacuum it by a fixed count instead:
//!
//! ```sql
//! ALTER TABLE p_outbox SET (autovacuum_vacuum_scale_factor = 0,
//!   autovacuum_vacuum_threshold = 5000, autovacuum_vacuum_cost_delay = 0);
//! ```
//!
//! The inbox grows until [`Inbox::cleanup`]; its deletes come in bulk, and
//! the defaults suit it. A long-running transaction anywhere in the
//! database holds back vacuum of both.
//!
//! # Example
//!
//! ```
//! use std::sync::Arc;
//! use std::time::Duration;
//! use serde::{Deserialize, Serialize};
//! use switchboard::outbox::{Inbox, Outbox, Relay, RelayConfig};
//! use switchboard::{Event, EventBus, MemoryTransport, SubscribeOptions, Topology};
//!
//! #[derive(Debug, Clone, Serialize, Deserialize)]
//! struct OrderPlaced { order_id: i64 }
//! impl Event for OrderPlaced {
//!     const TYPE: &'static str = "order.placed";
//!     const VERSION: &'static str = "1.0";
//! }
//!
//! # tokio::runtime::Runtime::new().unwrap().block_on(async {
//! let file = std::env::temp_dir().join(format!("outbox-doc-{}.db", uuid::Uuid::new_v4()));
//! let pool = sqlx::sqlite::SqlitePoolOptions::new()
//!     .connect(&format!("sqlite://{}?mode=rwc", file.display()))
//!     .await
//!     .unwrap();
//! let outbox = Outbox::new("shop_", "orders")?;
//! outbox.migrate(&pool).await?;
//! sqlx::query("CREATE TABLE orders (id INTEGER PRIMARY KEY)").execute(&pool).await.unwrap();
//! sqlx::query("CREATE TABLE shipments (order_id INTEGER PRIMARY KEY)").execute(&pool).await.unwrap();
//!
//! let transport = Arc::new(MemoryTransport::new());
//! let bus = EventBus::new(transport.clone(), "shipping");
//! bus.declare(&Topology::new().with_event::<OrderPlaced, _>(["shipping"])).await?;
//!
//! // The business write and the event commit together.
//! let mut tx = pool.begin().await.unwrap();
//! sqlx::query("INSERT INTO orders (id) VALUES (7)").execute(&mut *tx).await.unwrap();
//! outbox.enqueue_event(&mut tx, OrderPlaced { order_id: 7 }).await?;
//! tx.commit().await.unwrap();
//!
//! let relay = Relay::new(&outbox, pool.clone(), transport)
//!     .with_config(RelayConfig::default().with_poll_interval(Duration::from_millis(10)))
//!     .spawn();
//!
//! // The consumer's effect and its inbox mark commit together.
//! let inbox = Inbox::new(pool.clone(), "shop_")?;
//! let consumer = bus
//!     .subscribe(SubscribeOptions::new("shipping"), inbox.handler(|tx, message: switchboard::Message<OrderPlaced>| {
//!         Box::pin(async move {
//!             sqlx::query("INSERT INTO shipments (order_id) VALUES (?)")
//!                 .bind(message.payload().order_id)
//!                 .execute(&mut **tx)
//!                 .await
//!                 .map_err(|e| switchboard::Error::transient(e.to_string()))?;
//!             Ok(())
//!         })
//!     }))
//!     .await?;
//!
//! let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
//! loop {
//!     let shipped: i64 = sqlx::query_scalar("SELECT count(*) FROM shipments")
//!         .fetch_one(&pool).await.unwrap();
//!     if shipped == 1 { break; }
//!     assert!(tokio::time::Instant::now() < deadline, "not shipped");
//!     tokio::time::sleep(Duration::from_millis(10)).await;
//! }
//! consumer.shutdown().await?;
//! relay.close(Duration::from_secs(5)).await?;
//! # let _ = std::fs::remove_file(&file);
//! # Ok::<(), switchboard::Error>(())
//! # }).unwrap();
//! ```

use std::borrow::Cow;
use std::fmt;
use std::marker::PhantomData;
use std::sync::Arc;
use std::time::Duration;

use crate::codec::Codec;
use crate::error::Error;

mod backend;
mod enqueue;
mod error;
mod inbox;
mod relay;
mod schema;

pub use backend::ParkedRow;
pub use inbox::{CleanupTask, Inbox, InboxHandler};
pub use relay::{OnRefused, ParkedAlert, ParkedEvent, Relay, RelayConfig, RelayHandle, RelayStats};
pub use schema::MAX_PREFIX_LEN;
use schema::Tables;

/// A database the outbox runs on: [`sqlx::Postgres`] or [`sqlx::Sqlite`].
/// Sealed: the statements of each live in the crate.
pub trait OutboxDatabase: backend::Backend {}

impl OutboxDatabase for sqlx::Postgres {}
impl OutboxDatabase for sqlx::Sqlite {}

pub(crate) struct Shared {
    pub(crate) tables: Tables,
    pub(crate) source: String,
    pub(crate) codec: Codec,
    pub(crate) namespace: Option<String>,
    pub(crate) notify: bool,
}

/// Writes events into the caller's database transaction; see the
/// [module docs](self).
///
/// ```
/// use switchboard::outbox::Outbox;
///
/// let outbox = Outbox::<sqlx::Postgres>::new("shop_", "orders")?.with_notify(true);
/// assert_eq!(outbox.outbox_table(), "shop_outbox");
/// assert_eq!(outbox.inbox_table(), "shop_inbox");
/// assert!(Outbox::<sqlx::Postgres>::new("shop; DROP", "orders").is_err());
/// # Ok::<(), switchboard::Error>(())
/// ```
pub struct Outbox<DB: OutboxDatabase> {
    pub(crate) shared: Arc<Shared>,
    _db: PhantomData<fn() -> DB>,
}

impl<DB: OutboxDatabase> Clone for Outbox<DB> {
    fn clone(&self) -> Self {
        Self {
            shared: self.shared.clone(),
            _db: PhantomData,
        }
    }
}

impl<DB: OutboxDatabase> Outbox<DB> {
    /// An outbox in the tables `<prefix>outbox` / `<prefix>inbox` whose
    /// events carry `source` (such as `"trading-service"`). The prefix must
    /// be a plain lower-case identifier of at most [`MAX_PREFIX_LEN`] bytes
    /// ([`ErrorKind::Config`](crate::ErrorKind::Config) otherwise).
    pub fn new(prefix: &str, source: impl Into<String>) -> Result<Self, Error> {
        Ok(Self {
            shared: Arc::new(Shared {
                tables: Tables::new(prefix)?,
                source: source.into(),
                codec: Codec::default(),
                namespace: None,
                notify: false,
            }),
            _db: PhantomData,
        })
    }

    fn edit(mut self, change: impl FnOnce(&mut Shared)) -> Self {
        if Arc::get_mut(&mut self.shared).is_none() {
            let old = &self.shared;
            self.shared = Arc::new(Shared {
                tables: old.tables.clone(),
                source: old.source.clone(),
                codec: old.codec.clone(),
                namespace: old.namespace.clone(),
                notify: old.notify,
            });
        }
        change(Arc::get_mut(&mut self.shared).expect("unique after the copy"));
        self
    }

    /// Sends `NOTIFY` on every enqueue (PostgreSQL), so relays with
    /// [`RelayConfig::with_listen`] wake at once. Off by default: it
    /// serialises the commits of notifying transactions (see
    /// [the relay](self#the-relay)). SQLite ignores it.
    pub fn with_notify(self, yes: bool) -> Self {
        self.edit(|shared| shared.notify = yes)
    }

    /// Puts every topic under `namespace`, as
    /// [`EventBus::with_namespace`](crate::EventBus::with_namespace) does:
    /// a consumer's bus must use the same one.
    pub fn with_namespace(self, namespace: impl Into<String>) -> Self {
        let namespace = namespace.into();
        self.edit(|shared| shared.namespace = Some(namespace))
    }

    /// Replaces the codec (to change the size limit).
    pub fn with_codec(self, codec: Codec) -> Self {
        self.edit(|shared| shared.codec = codec)
    }

    /// The outbox table's name.
    pub fn outbox_table(&self) -> &str {
        &self.shared.tables.outbox
    }

    /// The inbox table's name.
    pub fn inbox_table(&self) -> &str {
        &self.shared.tables.inbox
    }

    /// `topic` under the namespace, if any.
    pub fn topic_named<'t>(&self, topic: &'t str) -> Cow<'t, str> {
        match &self.shared.namespace {
            None => Cow::Borrowed(topic),
            Some(namespace) => Cow::Owned(format!("{namespace}.{topic}")),
        }
    }

    /// Creates the tables and indexes if they are missing (see
    /// [Schema](self#schema)). Idempotent; several processes may run it at
    /// once.
    pub async fn migrate(&self, pool: &sqlx::Pool<DB>) -> Result<(), Error> {
        DB::migrate(pool, &self.shared.tables).await
    }

    /// The inbox in this outbox's tables.
    pub fn inbox(&self, pool: sqlx::Pool<DB>) -> Inbox<DB> {
        Inbox::new(pool, &self.shared.tables.prefix).expect("the prefix was checked")
    }

    /// Rows waiting to be sent (parked ones not counted) and the age of the
    /// oldest: the relay's lag.
    pub async fn pending(&self, pool: &sqlx::Pool<DB>) -> Result<(u64, Option<Duration>), Error> {
        let mut conn = pool
            .acquire()
            .await
            .map_err(|e| error::from_sqlx("outbox pending", e))?;
        let (count, age) = DB::pending(&mut conn, &self.shared.tables).await?;
        Ok((count, age.map(Duration::from_secs_f64)))
    }

    /// Up to `limit` parked rows, oldest first.
    pub async fn parked(
        &self,
        pool: &sqlx::Pool<DB>,
        limit: usize,
    ) -> Result<Vec<ParkedRow>, Error> {
        let mut conn = pool
            .acquire()
            .await
            .map_err(|e| error::from_sqlx("outbox parked", e))?;
        DB::list_parked(&mut conn, &self.shared.tables, limit as i64).await
    }

    /// Puts a parked row back in line (at its old place: it keeps its id);
    /// `false` when no parked row has this id.
    pub async fn unpark(&self, pool: &sqlx::Pool<DB>, id: i64) -> Result<bool, Error> {
        let mut conn = pool
            .acquire()
            .await
            .map_err(|e| error::from_sqlx("outbox unpark", e))?;
        DB::unpark(&mut conn, &self.shared.tables, id).await
    }

    /// Deletes a parked row for good, letting its key go on; `false` when
    /// no parked row has this id.
    pub async fn discard(&self, pool: &sqlx::Pool<DB>, id: i64) -> Result<bool, Error> {
        let mut conn = pool
            .acquire()
            .await
            .map_err(|e| error::from_sqlx("outbox discard", e))?;
        DB::discard(&mut conn, &self.shared.tables, id).await
    }
}

impl<DB: OutboxDatabase> fmt::Debug for Outbox<DB> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Outbox")
            .field("database", &<DB as backend::Backend>::NAME)
            .field("table", &self.shared.tables.outbox)
            .field("source", &self.shared.source)
            .field("notify", &self.shared.notify)
            .finish_non_exhaustive()
    }
}
