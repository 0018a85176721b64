//! The relay: sends committed outbox rows to a transport, in order per key,
//! and removes each only once the transport accepted it.
//!
//! One round: take the relay's share of key partitions (leases), read up to
//! [`batch_size`](RelayConfig::batch_size) sendable rows in id order,
//! publish each run of same-topic rows with one
//! [`publish_batch`](crate::Publisher::publish_batch), then delete what
//! was accepted. A failure the transport may get over (lost connection,
//! time-out, broker unavailable) ends the round with nothing deleted past
//! the failure; the relay waits (exponential backoff from `backon`) and
//! reads the same rows again, so an outage loses nothing and a row may be
//! sent twice (the consumer's [`Inbox`](crate::outbox::Inbox) absorbs it).
//! A row the transport refuses for good is parked (see [`OnRefused`]).

use std::collections::HashSet;
use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};
use futures_util::FutureExt;
use tokio::sync::{Notify, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::backend::{Scope, StoredRow};
use super::{Outbox, OutboxDatabase};
use crate::error::{Error, ErrorKind};
use crate::observe::metrics;
use crate::transport::{RawMessage, Transport};

mod config;
mod lease;

pub use config::{OnRefused, RelayConfig};
use lease::Lease;

/// What the relay tells an alert hook when it parks a row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParkedEvent {
    /// The row's id.
    pub id: i64,
    /// The topic it was for.
    pub topic: String,
    /// Its ordering key.
    pub key: String,
    /// Why the transport refused it.
    pub reason: String,
    /// Whether the key's later rows wait for it ([`OnRefused::HoldKey`]).
    pub holds_key: bool,
}

/// Told of every row the relay parks, beside the `tracing` error it logs
/// and the `switchboard_outbox_parked_total` counter: page someone, as the
/// row waits for an operator.
pub trait ParkedAlert: fmt::Debug + Send + Sync + 'static {
    /// A row was parked.
    fn parked(&self, event: &ParkedEvent);
}

#[derive(Debug)]
struct LogOnly;

impl ParkedAlert for LogOnly {
    fn parked(&self, _: &ParkedEvent) {}
}

/// Counts of what a relay did, for tests and health pages.
#[derive(Debug, Default)]
pub struct RelayStats {
    sent: AtomicU64,
    parked: AtomicU64,
    failures: AtomicU64,
    partitions: AtomicU64,
}

impl RelayStats {
    /// Rows the transport accepted (and the relay deleted or tried to).
    pub fn sent(&self) -> u64 {
        self.sent.load(Ordering::Relaxed)
    }

    /// Rows parked.
    pub fn parked(&self) -> u64 {
        self.parked.load(Ordering::Relaxed)
    }

    /// Rounds that ended in an outage of the transport or the database.
    pub fn failures(&self) -> u64 {
        self.failures.load(Ordering::Relaxed)
    }

    /// Partitions held after the last rebalance (0 on SQLite, where the
    /// one relay sends everything).
    pub fn partitions(&self) -> u64 {
        self.partitions.load(Ordering::Relaxed)
    }
}

/// Sends an [`Outbox`]'s committed rows to a [`Transport`]; see the
/// [module docs](crate::outbox#the-relay).
pub struct Relay<DB: OutboxDatabase> {
    outbox: Outbox<DB>,
    pool: sqlx::Pool<DB>,
    transport: Arc<dyn Transport>,
    config: RelayConfig,
    alert: Arc<dyn ParkedAlert>,
    stats: Arc<RelayStats>,
}

/// A running relay (from [`Relay::spawn`]). Dropping it asks the relay to
/// stop after its current round.
#[derive(Debug)]
pub struct RelayHandle {
    stop: watch::Sender<bool>,
    task: Option<JoinHandle<Result<(), Error>>>,
    stats: Arc<RelayStats>,
}

impl<DB: OutboxDatabase> Relay<DB> {
    /// A relay of `outbox`'s rows in `pool`'s database to `transport`, with
    /// [`RelayConfig::default`].
    pub fn new(outbox: &Outbox<DB>, pool: sqlx::Pool<DB>, transport: Arc<dyn Transport>) -> Self {
        Self {
            outbox: outbox.clone(),
            pool,
            transport,
            config: RelayConfig::default(),
            alert: Arc::new(LogOnly),
            stats: Arc::default(),
        }
    }

    /// Replaces the settings.
    pub fn with_config(mut self, config: RelayConfig) -> Self {
        self.config = config;
        self
    }

    /// Calls `alert` for every row parked.
    pub fn with_alert(mut self, alert: Arc<dyn ParkedAlert>) -> Self {
        self.alert = alert;
        self
    }

    /// The settings.
    pub fn config(&self) -> &RelayConfig {
        &self.config
    }

    /// The counts, shared with the running relay.
    pub fn stats(&self) -> Arc<RelayStats> {
        self.stats.clone()
    }

    /// Runs the relay in a task; [`RelayHandle::close`] stops it.
    pub fn spawn(self) -> RelayHandle {
        let (stop, mut stopped) = watch::channel(false);
        let stats = self.stats.clone();
        let task = tokio::spawn(async move {
            self.run(async move {
                let _ = stopped.wait_for(|stop| *stop).await;
            })
            .await
        });
        RelayHandle {
            stop,
            task: Some(task),
            stats,
        }
    }

    /// Runs the relay until `shutdown` resolves (checked between rounds and
    /// during every wait; a publish under way finishes first) or the
    /// transport is closed ([`ErrorKind::Closed`], returned). Outages of the
    /// transport or the database are waited out, never returned.
    pub async fn run(self, shutdown: impl Future<Output = ()> + Send) -> Result<(), Error> {
        let mut shutdown = std::pin::pin!(shutdown);
        let wake = Arc::new(Notify::new());
        // Aborted with the relay, even when the relay itself is aborted
        // (a close past its deadline): it holds a connection of the pool.
        let _listener = if self.config.listen {
            DB::listen(
                &self.pool,
                self.outbox.shared.tables.channel.clone(),
                wake.clone(),
            )
            .map(AbortOnDrop)
        } else {
            None
        };
        let mut lease = Lease::new(self.pool.clone());
        let mut worker = Worker {
            delays: self.delays(),
            next_stats: Instant::now(),
            relay: &self,
        };
        let result = loop {
            // Checked between rounds only: a round under way finishes, so
            // what the transport accepted is deleted (close's deadline
            // bounds a round that hangs).
            if shutdown.as_mut().now_or_never().is_some() {
                break Ok(());
            }
            let pause = match worker.round(&mut lease).await {
                Ok(Round::Full) => {
                    worker.delays = self.delays();
                    continue;
                }
                Ok(Round::Partial) => {
                    worker.delays = self.delays();
                    self.config.poll_interval
                }
                Err(error) if error.kind() == ErrorKind::Closed => break Err(error),
                Err(error) => {
                    self.stats.failures.fetch_add(1, Ordering::Relaxed);
                    let delay = worker.delays.next().unwrap_or(self.config.backoff.1);
                    tracing::warn!(
                        %error,
                        retry_in = ?delay,
                        outbox = %self.outbox.shared.tables.outbox,
                        "outbox relay: round failed; rows stay and are sent again",
                    );
                    // Not woken early: an outage is waited out.
                    tokio::select! {
                        () = &mut shutdown => break Ok(()),
                        () = tokio::time::sleep(delay) => {}
                    }
                    continue;
                }
            };
            tokio::select! {
                () = &mut shutdown => break Ok(()),
                () = wake.notified() => {}
                () = tokio::time::sleep(pause) => {}
            }
        };
        lease.release(&self.outbox.shared.tables).await;
        result
    }

    fn delays(&self) -> backon::ExponentialBackoff {
        ExponentialBuilder::default()
            .with_min_delay(self.config.backoff.0)
            .with_max_delay(self.config.backoff.1)
            .with_jitter()
            .without_max_times()
            .build()
    }

    fn metric_label(&self) -> metrics::Label {
        metrics::Label::Owned(self.outbox.shared.tables.outbox.clone())
    }
}

/// A task that ends when this is dropped.
struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// How a round went.
enum Round {
    /// A full batch: there may be more right away.
    Full,
    /// Fewer rows than a batch: wait for more.
    Partial,
}

struct Worker<'r, DB: OutboxDatabase> {
    relay: &'r Relay<DB>,
    delays: backon::ExponentialBackoff,
    next_stats: Instant,
}

/// Whether the transport refused this row for good (park it) rather than
/// failed to take it now (wait and send again). A transport that is closed,
/// refuses credentials or has an open breaker says nothing about the row.
fn refuses_row(error: &Error) -> bool {
    matches!(
        error.kind(),
        ErrorKind::Rejected | ErrorKind::Encode | ErrorKind::Decode | ErrorKind::NotFound
    )
}

fn to_message(row: &StoredRow) -> Result<RawMessage, Error> {
    let headers: crate::envelope::Headers =
        serde_json::from_str(&row.headers).map_err(|error| {
            Error::new(
                ErrorKind::Decode,
                "outbox row headers are not a JSON object",
            )
            .with_source(error)
        })?;
    let mut message = RawMessage::new(row.body.clone());
    message.headers = headers;
    Ok(message)
}

impl<DB: OutboxDatabase> Worker<'_, DB> {
    async fn round(&mut self, lease: &mut Lease<DB>) -> Result<Round, Error> {
        let relay = self.relay;
        let tables = &relay.outbox.shared.tables;
        let config = &relay.config;
        let (conn, scope) = match lease
            .session(
                tables,
                config.partitions,
                config.rebalance_interval,
                config.synchronous_deletes,
            )
            .await
        {
            Ok(session) => session,
            Err(error) => {
                lease.lost();
                return Err(error);
            }
        };
        let scope = scope.clone();
        let held = match &scope {
            Scope::All => 0,
            Scope::Partitions { held, .. } => held.len() as u64,
        };
        relay.stats.partitions.store(held, Ordering::Relaxed);
        if matches!(&scope, Scope::Partitions { held, .. } if held.is_empty()) {
            // Every partition is another relay's: stand by.
            return Ok(Round::Partial);
        }
        let result = self.send(conn, &scope).await;
        if result.is_err() {
            // The error may have been the session's: start a fresh one (its
            // leases go with the old one).
            lease.lost();
        }
        result
    }

    async fn send(&mut self, conn: &mut DB::Connection, scope: &Scope) -> Result<Round, Error> {
        let relay = self.relay;
        let tables = &relay.outbox.shared.tables;
        let config = &relay.config;
        if Instant::now() >= self.next_stats {
            self.next_stats = Instant::now() + config.stats_interval;
            let (pending, lag) = DB::pending(conn, tables).await?;
            metrics::outbox_pending(relay.metric_label(), pending, lag.unwrap_or(0.0));
        }
        let hold = config.on_refused == OnRefused::HoldKey;
        let rows = DB::fetch(conn, tables, scope, config.batch_size as i64, hold).await?;
        let full = rows.len() >= config.batch_size;
        let mut accepted: Vec<(i64, usize)> = Vec::with_capacity(rows.len());
        let mut held_keys: HashSet<String> = HashSet::new();
        let outcome = self
            .publish_runs(conn, &rows, &mut accepted, &mut held_keys)
            .await;
        // Whatever was accepted goes, even when a later run failed: those
        // rows are not to be sent again.
        if !accepted.is_empty() {
            let ids: Vec<i64> = accepted.iter().map(|(id, _)| *id).collect();
            DB::delete(conn, tables, &ids).await?;
            relay
                .stats
                .sent
                .fetch_add(ids.len() as u64, Ordering::Relaxed);
            let mut counted: Vec<(&str, u64)> = Vec::new();
            for (_, index) in &accepted {
                let topic = rows[*index].topic.as_str();
                match counted.iter_mut().find(|(seen, _)| *seen == topic) {
                    Some((_, count)) => *count += 1,
                    None => counted.push((topic, 1)),
                }
            }
            for (topic, count) in counted {
                metrics::outbox_sent(relay.metric_label(), topic, count);
            }
        }
        outcome?;
        Ok(if full { Round::Full } else { Round::Partial })
    }

    /// Publishes `rows` in order, one `publish_batch` per run of rows with
    /// the same topic; records accepted rows (id, index in `rows`).
    async fn publish_runs(
        &mut self,
        conn: &mut DB::Connection,
        rows: &[StoredRow],
        accepted: &mut Vec<(i64, usize)>,
        held_keys: &mut HashSet<String>,
    ) -> Result<(), Error> {
        let mut start = 0;
        while start < rows.len() {
            let topic = &rows[start].topic;
            let end = rows[start..]
                .iter()
                .position(|row| &row.topic != topic)
                .map_or(rows.len(), |offset| start + offset);
            let mut run = Vec::with_capacity(end - start);
            for (index, row) in rows.iter().enumerate().take(end).skip(start) {
                if held_keys.contains(&row.key) {
                    continue;
                }
                match to_message(row) {
                    Ok(message) => run.push((index, message)),
                    Err(error) => self.park(conn, row, &error, held_keys).await?,
                }
            }
            start = end;
            if run.is_empty() {
                continue;
            }
            let messages = run.iter().map(|(_, message)| message.clone()).collect();
            match self.publish(topic, messages).await {
                Ok(()) => accepted.extend(run.iter().map(|(index, _)| (rows[*index].id, *index))),
                Err(error) if refuses_row(&error) => {
                    // Which one? Send them one by one (a prefix may have been
                    // taken already: those go twice, as at-least-once allows).
                    for (index, message) in run {
                        let row = &rows[index];
                        if held_keys.contains(&row.key) {
                            continue;
                        }
                        match self.publish(topic, vec![message]).await {
                            Ok(()) => accepted.push((row.id, index)),
                            Err(error) if refuses_row(&error) => {
                                self.park(conn, row, &error, held_keys).await?;
                            }
                            Err(error) => return Err(error),
                        }
                    }
                }
                Err(error) => return Err(error),
            }
        }
        Ok(())
    }

    async fn publish(&self, topic: &str, messages: Vec<RawMessage>) -> Result<(), Error> {
        let relay = self.relay;
        let started = std::time::Instant::now();
        let result = match tokio::time::timeout(
            relay.config.publish_timeout,
            relay.transport.publish_batch(topic, messages),
        )
        .await
        {
            Ok(result) => result,
            Err(_) => Err(Error::new(
                ErrorKind::Timeout,
                format!(
                    "outbox relay: publish to {topic} took longer than {:?}",
                    relay.config.publish_timeout
                ),
            )),
        };
        metrics::published(
            relay.transport.name(),
            metrics::Label::Owned(topic.to_owned()),
            result.is_ok(),
            started.elapsed(),
        );
        result
    }

    async fn park(
        &mut self,
        conn: &mut DB::Connection,
        row: &StoredRow,
        error: &Error,
        held_keys: &mut HashSet<String>,
    ) -> Result<(), Error> {
        let relay = self.relay;
        let reason = error.to_string();
        DB::park(conn, &relay.outbox.shared.tables, row.id, &reason).await?;
        let holds_key = relay.config.on_refused == OnRefused::HoldKey;
        if holds_key {
            held_keys.insert(row.key.clone());
        }
        relay.stats.parked.fetch_add(1, Ordering::Relaxed);
        metrics::outbox_parked(relay.metric_label(), &row.topic);
        tracing::error!(
            id = row.id,
            topic = %row.topic,
            key = %row.key,
            %reason,
            holds_key,
            "outbox relay: the transport refused a row for good; parked",
        );
        relay.alert.parked(&ParkedEvent {
            id: row.id,
            topic: row.topic.clone(),
            key: row.key.clone(),
            reason,
            holds_key,
        });
        Ok(())
    }
}

impl RelayHandle {
    /// The counts of the running relay.
    pub fn stats(&self) -> &RelayStats {
        &self.stats
    }

    /// Whether the relay has stopped (closed, or the transport was closed).
    pub fn is_finished(&self) -> bool {
        self.task.as_ref().is_none_or(JoinHandle::is_finished)
    }

    /// Stops the relay: it finishes the round under way (a publish, then the
    /// deletion of what was accepted) and gives its leases back, within
    /// `deadline`. Past the deadline the relay is aborted and
    /// [`ErrorKind::Timeout`] returned: rows it had published but not yet
    /// deleted are sent again by the next relay (the inbox absorbs them).
    /// The relay's own error ([`ErrorKind::Closed`] transport) is returned
    /// as it is.
    pub async fn close(mut self, deadline: Duration) -> Result<(), Error> {
        self.stop.send_replace(true);
        let Some(mut task) = self.task.take() else {
            return Ok(());
        };
        match tokio::time::timeout(deadline, &mut task).await {
            Ok(Ok(result)) => result,
            Ok(Err(join)) => Err(
                Error::new(ErrorKind::Unavailable, "outbox relay task failed").with_source(join),
            ),
            Err(_) => {
                task.abort();
                let _ = task.await;
                Err(Error::new(
                    ErrorKind::Timeout,
                    format!(
                        "outbox relay did not stop within {deadline:?}; aborted (rows in \
                         flight will be sent again)"
                    ),
                ))
            }
        }
    }
}

impl Drop for RelayHandle {
    fn drop(&mut self) {
        self.stop.send_replace(true);
    }
}

impl<DB: OutboxDatabase> fmt::Debug for Relay<DB> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Relay")
            .field("outbox", &self.outbox.shared.tables.outbox)
            .field("transport", &self.transport.name())
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}
