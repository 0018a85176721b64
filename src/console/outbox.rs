//! An outbox as the console shows it: the relay's counts, and the rows
//! still waiting with the age of the oldest (the relay's lag).

use std::sync::Arc;
use std::time::Duration;

use futures_util::future::BoxFuture;

use super::view::{OutboxView, bounded};
use crate::error::Error;
use crate::outbox::{Outbox, OutboxDatabase, RelayStats};

type Pending =
    Arc<dyn Fn() -> BoxFuture<'static, Result<(u64, Option<Duration>), Error>> + Send + Sync>;

/// One outbox to show: what its relay counted and, when given the outbox
/// and its pool, its pending rows and lag.
///
/// ```
/// use std::sync::Arc;
/// use switchboard::console::OutboxSource;
/// use switchboard::outbox::RelayStats;
///
/// let source = OutboxSource::new("orders", Arc::new(RelayStats::default()));
/// assert_eq!(source.name(), "orders");
/// ```
#[derive(Clone)]
pub struct OutboxSource {
    name: String,
    stats: Arc<RelayStats>,
    pending: Option<Pending>,
}

impl OutboxSource {
    /// The outbox called `name` whose relay counts into `stats`
    /// ([`RelayHandle::shared_stats`](crate::outbox::RelayHandle::shared_stats)).
    pub fn new(name: impl Into<String>, stats: Arc<RelayStats>) -> Self {
        Self {
            name: name.into(),
            stats,
            pending: None,
        }
    }

    /// Also shows the rows waiting in `outbox`'s table and the age of the
    /// oldest ([`Outbox::pending`]), read under the console's time limit.
    pub fn with_pending<DB: OutboxDatabase>(
        mut self,
        outbox: Outbox<DB>,
        pool: sqlx::Pool<DB>,
    ) -> Self {
        self.pending = Some(Arc::new(move || {
            let (outbox, pool) = (outbox.clone(), pool.clone());
            Box::pin(async move { outbox.pending(&pool).await })
        }));
        self
    }

    /// The outbox's name on the page.
    pub fn name(&self) -> &str {
        &self.name
    }

    pub(super) async fn view(&self, limit: Duration) -> OutboxView {
        let mut view = OutboxView {
            name: self.name.clone(),
            sent: self.stats.sent(),
            parked: self.stats.parked(),
            failures: self.stats.failures(),
            pending: None,
            lag_ms: None,
            error: None,
        };
        if let Some(pending) = &self.pending {
            match bounded(limit, pending()).await {
                Ok((count, age)) => {
                    view.pending = Some(count);
                    view.lag_ms = age.map(|age| age.as_millis());
                }
                Err(error) => view.error = Some(error),
            }
        }
        view
    }
}

impl std::fmt::Debug for OutboxSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OutboxSource")
            .field("name", &self.name)
            .field("pending", &self.pending.is_some())
            .finish()
    }
}
