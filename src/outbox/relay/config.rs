//! How a relay runs.

use std::time::Duration;

/// What the relay does with a row the transport refuses for good (a
/// non-retryable error: unroutable, too large, refused as invalid).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OnRefused {
    /// Park the row and hold back every later row of its key until an
    /// operator [unparks](crate::outbox::Outbox::unpark) or
    /// [discards](crate::outbox::Outbox::discard) it. The default: a
    /// consumer never sees a key's event 12 without its event 11.
    #[default]
    HoldKey,
    /// Park the row and go on with the key's later rows: the key's order
    /// has a hole where the parked row was.
    ParkAndContinue,
}

/// A relay's settings. `Default` suits a service that writes a few hundred
/// events a second.
///
/// ```
/// use std::time::Duration;
/// use switchboard::outbox::{OnRefused, RelayConfig};
///
/// let config = RelayConfig::default()
///     .with_batch_size(50)
///     .with_poll_interval(Duration::from_millis(200))
///     .with_listen(true)
///     .with_on_refused(OnRefused::ParkAndContinue);
/// assert_eq!(config.batch_size, 50);
/// ```
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq)]
pub struct RelayConfig {
    /// Most rows read and published per round (default 100).
    pub batch_size: usize,
    /// How long the relay waits for new rows when it found none (default
    /// 500 ms). With [`listen`](Self::listen) a notification ends the wait
    /// sooner; polling stays, as notifications are only a hint.
    pub poll_interval: Duration,
    /// Listen for the writers' `NOTIFY` (PostgreSQL, and only useful with
    /// [`Outbox::with_notify`](crate::outbox::Outbox::with_notify) on the
    /// writers). Default off.
    pub listen: bool,
    /// Key partitions the relays share out (PostgreSQL; default 32). Every
    /// relay of one outbox must use the same number.
    pub partitions: u32,
    /// How often a relay checks its share of partitions (default 5 s): how
    /// soon a new relay gets work and a dead one's partitions are taken over.
    /// On SQLite, how often the sending relay renews its lease (it lapses
    /// after three intervals, at least 1 s).
    pub rebalance_interval: Duration,
    /// First and longest wait between tries while the transport or the
    /// database is down (default 100 ms, 10 s; exponential with jitter).
    pub backoff: (Duration, Duration),
    /// The longest one `publish_batch` may take before it counts as failed
    /// (default 10 s); the rows are then sent again.
    pub publish_timeout: Duration,
    /// How often the pending count and the lag are sampled (default 10 s).
    pub stats_interval: Duration,
    /// What a refused row does to its key (default [`OnRefused::HoldKey`]).
    pub on_refused: OnRefused,
    /// Let the relay's deletes wait for the WAL flush (PostgreSQL's
    /// `synchronous_commit`). Default off: a delete lost to a database
    /// crash only means a row sent again, which the inbox absorbs, and the
    /// flush costs milliseconds per batch on a real disk. On keeps the
    /// duplicates after a crash down to the two batches in flight (the one
    /// being deleted while the next is published).
    pub synchronous_deletes: bool,
}

impl Default for RelayConfig {
    fn default() -> Self {
        Self {
            batch_size: 100,
            poll_interval: Duration::from_millis(500),
            listen: false,
            partitions: 32,
            rebalance_interval: Duration::from_secs(5),
            backoff: (Duration::from_millis(100), Duration::from_secs(10)),
            publish_timeout: Duration::from_secs(10),
            stats_interval: Duration::from_secs(10),
            on_refused: OnRefused::HoldKey,
            synchronous_deletes: false,
        }
    }
}

impl RelayConfig {
    /// Sets [`batch_size`](Self::batch_size) (at least 1).
    pub fn with_batch_size(mut self, rows: usize) -> Self {
        self.batch_size = rows.max(1);
        self
    }

    /// Sets [`poll_interval`](Self::poll_interval).
    pub fn with_poll_interval(mut self, interval: Duration) -> Self {
        self.poll_interval = interval;
        self
    }

    /// Sets [`listen`](Self::listen).
    pub fn with_listen(mut self, yes: bool) -> Self {
        self.listen = yes;
        self
    }

    /// Sets [`partitions`](Self::partitions) (at least 1).
    pub fn with_partitions(mut self, partitions: u32) -> Self {
        self.partitions = partitions.max(1);
        self
    }

    /// Sets [`rebalance_interval`](Self::rebalance_interval).
    pub fn with_rebalance_interval(mut self, interval: Duration) -> Self {
        self.rebalance_interval = interval;
        self
    }

    /// Sets [`backoff`](Self::backoff): the first and the longest wait.
    pub fn with_backoff(mut self, first: Duration, longest: Duration) -> Self {
        self.backoff = (first, longest.max(first));
        self
    }

    /// Sets [`publish_timeout`](Self::publish_timeout).
    pub fn with_publish_timeout(mut self, timeout: Duration) -> Self {
        self.publish_timeout = timeout;
        self
    }

    /// Sets [`stats_interval`](Self::stats_interval).
    pub fn with_stats_interval(mut self, interval: Duration) -> Self {
        self.stats_interval = interval;
        self
    }

    /// Sets [`synchronous_deletes`](Self::synchronous_deletes).
    pub fn with_synchronous_deletes(mut self, yes: bool) -> Self {
        self.synchronous_deletes = yes;
        self
    }

    /// Sets [`on_refused`](Self::on_refused).
    pub fn with_on_refused(mut self, on_refused: OnRefused) -> Self {
        self.on_refused = on_refused;
        self
    }
}
