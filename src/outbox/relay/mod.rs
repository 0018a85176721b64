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

use super::{Outbox, OutboxDatabase};
use crate::error::{Error, ErrorKind};
use crate::observe::metrics;
use crate::transport::Transport;

mod config;
mod lease;
mod round;

pub use config::{OnRefused, RelayConfig};
use lease::Lease;
use round::{Round, Worker};

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
    /// Woken whenever a count moves.
    moved: Notify,
}

impl RelayStats {
    fn add(&self, count: &AtomicU64, by: u64) {
        count.fetch_add(by, Ordering::Relaxed);
        self.moved.notify_waiters();
    }

    /// Waits until the relay has sent at least `count` rows in all, for at
    /// most `within`: [`ErrorKind::Timeout`] past it (with the count
    /// reached). Woken by the relay itself, not by polling, so a test or a
    /// health check learns of the row the moment it is deleted.
    pub async fn wait_for_sent(&self, count: u64, within: Duration) -> Result<(), Error> {
        let reached = async {
            loop {
                let moved = self.moved.notified();
                let mut moved = std::pin::pin!(moved);
                // Registered before the count is read: a row sent in
                // between still wakes this waiter.
                moved.as_mut().enable();
                if self.sent() >= count {
                    return;
                }
                moved.await;
            }
        };
        tokio::time::timeout(within, reached).await.map_err(|_| {
            Error::new(
                ErrorKind::Timeout,
                format!(
                    "outbox relay sent {} of {count} rows within {within:?}",
                    self.sent()
                ),
            )
        })
    }

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
                    self.stats.add(&self.stats.failures, 1);
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

impl RelayHandle {
    /// The counts of the running relay.
    pub fn stats(&self) -> &RelayStats {
        &self.stats
    }

    /// The counts of the running relay, shared (for a status page that
    /// outlives this borrow, such as the operator console).
    pub fn shared_stats(&self) -> Arc<RelayStats> {
        self.stats.clone()
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
