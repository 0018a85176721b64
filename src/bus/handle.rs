//! A running consumer: its handle, and the health it reports.

use std::fmt;

use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;

use crate::error::{Error, ErrorKind};

/// A running consumer. Dropping it stops the consumer in the background.
#[must_use = "dropping the handle stops the consumer"]
pub struct ConsumerHandle {
    pub(super) topic: String,
    pub(super) group: String,
    pub(super) stop: Option<oneshot::Sender<()>>,
    pub(super) task: Option<JoinHandle<Result<(), Error>>>,
    pub(super) health: watch::Receiver<ConsumerHealth>,
}

/// Where a consumer stands, as [`ConsumerHandle::health`] reports it.
///
/// ```
/// use switchboard::ConsumerHealth;
///
/// assert_eq!(ConsumerHealth::Paused.to_string(), "paused");
/// ```
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ConsumerHealth {
    /// Pulling and handling messages.
    Running,
    /// Not pulling: the handler is not ready (a circuit breaker in the
    /// handler's stack is open and waits). Nothing is dead-lettered
    /// meanwhile; messages stay with the broker.
    Paused,
    /// The consume loop has ended: shut down, aborted, the subscription
    /// closed, or the handler failed for good.
    Stopped,
}

impl fmt::Display for ConsumerHealth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Running => "running",
            Self::Paused => "paused",
            Self::Stopped => "stopped",
        })
    }
}

impl ConsumerHandle {
    /// The topic consumed.
    pub fn topic(&self) -> &str {
        &self.topic
    }

    /// The consumer group.
    pub fn group(&self) -> &str {
        &self.group
    }

    /// Where the consumer stands right now: running, paused (its handler is
    /// not ready, such as an open breaker), or stopped.
    pub fn health(&self) -> ConsumerHealth {
        // The loop drops its sender when it ends, however it ends.
        if self.health.has_changed().is_err() {
            return ConsumerHealth::Stopped;
        }
        *self.health.borrow()
    }

    /// The consumer's health as a watch, to follow its changes
    /// (`changed()` fails once the consume loop has ended).
    pub fn watch_health(&self) -> watch::Receiver<ConsumerHealth> {
        self.health.clone()
    }

    /// Whether the consume loop has ended (shut down, or the transport
    /// closed the subscription).
    pub fn is_finished(&self) -> bool {
        self.task.as_ref().is_none_or(JoinHandle::is_finished)
    }

    /// Stops the consumer at once, the way a crash would: the handlers in
    /// flight are dropped and their deliveries left unsettled, so the
    /// transport delivers them again (to this group's other members, or to
    /// the next subscriber) with their
    /// [`delivery_count`](crate::Delivery::delivery_count) raised. For tests
    /// of crash recovery and for emergencies; [`shutdown`](Self::shutdown)
    /// is the orderly way.
    pub fn abort(mut self) {
        // Aborted before the stop signal goes, so the loop never gets to
        // stop in order.
        if let Some(task) = self.task.take() {
            task.abort();
        }
        self.stop.take();
    }

    /// Stops pulling messages, waits for the handlers in flight to finish and
    /// their deliveries to be settled, then shuts the subscription down.
    pub async fn shutdown(mut self) -> Result<(), Error> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        match self.task.take() {
            Some(task) => task.await.map_err(|error| {
                Error::new(ErrorKind::Closed, "consumer task failed").with_source(error)
            })?,
            None => Ok(()),
        }
    }
}

impl Drop for ConsumerHandle {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

impl fmt::Debug for ConsumerHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConsumerHandle")
            .field("topic", &self.topic)
            .field("group", &self.group)
            .field("finished", &self.is_finished())
            .finish()
    }
}
