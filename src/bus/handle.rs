//! A running consumer: its handle, and the health it reports.

use std::fmt;
use std::sync::{Arc, OnceLock};

use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;

use super::stats::{ConsumerMonitor, ConsumerStats, Counters};
use crate::error::{Error, ErrorKind};

/// A running consumer. Dropping it stops the consumer in the background.
#[must_use = "dropping the handle stops the consumer"]
pub struct ConsumerHandle {
    pub(super) topic: String,
    pub(super) group: String,
    pub(super) stop: Option<oneshot::Sender<()>>,
    pub(super) task: Option<JoinHandle<()>>,
    pub(super) health: watch::Receiver<ConsumerHealth>,
    /// Becomes true once the consume loop has ended and settled what it had
    /// in flight.
    pub(super) ended: watch::Receiver<bool>,
    /// Why the loop ended, when it ended on an error.
    pub(super) failure: Arc<OnceLock<Error>>,
    /// What the loop counts as it goes.
    pub(super) counters: Arc<Counters>,
    /// The transport consumed from, to ask for the group's lag.
    pub(super) transport: Arc<dyn crate::transport::Transport>,
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

    /// In flight, handled and failed counts and the last error, since the
    /// consumer started (see [`ConsumerStats`]).
    pub fn stats(&self) -> ConsumerStats {
        self.counters.snapshot()
    }

    /// A cloneable read-only view of this consumer, for status pages (see
    /// [`ConsumerMonitor`]).
    pub fn monitor(&self) -> ConsumerMonitor {
        ConsumerMonitor {
            topic: self.topic.clone(),
            group: self.group.clone(),
            transport: self.transport.clone(),
            health: self.health.clone(),
            failure: self.failure.clone(),
            counters: self.counters.clone(),
        }
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

    /// Resolves once the consume loop has ended, however it ended, and has
    /// settled the deliveries it had in flight; returns the error it ended
    /// on, if any (the same as [`failure`](Self::failure)).
    ///
    /// A loop ends on its own when its handler fails for good (its
    /// `poll_ready` returns an error) or the transport closes the
    /// subscription; [`health`](Self::health) says
    /// [`Stopped`](ConsumerHealth::Stopped) from that moment. Await this
    /// next to the rest of a service (in a `select!`) to stop or restart
    /// at once instead of finding out at [`shutdown`](Self::shutdown).
    ///
    /// ```
    /// use std::sync::Arc;
    /// use std::task::{Context, Poll};
    /// use serde::{Deserialize, Serialize};
    /// use switchboard::{ConsumerHealth, Error, Event, EventBus, MemoryTransport, Message, SubscribeOptions};
    ///
    /// #[derive(Debug, Clone, Serialize, Deserialize)]
    /// struct Tick;
    /// impl Event for Tick {
    ///     const TYPE: &'static str = "tick";
    ///     const VERSION: &'static str = "1.0";
    /// }
    ///
    /// /// A handler whose dependency is gone for good.
    /// struct Broken;
    /// impl tower::Service<Message<Tick>> for Broken {
    ///     type Response = ();
    ///     type Error = Error;
    ///     type Future = std::future::Ready<Result<(), Error>>;
    ///     fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Error>> {
    ///         Poll::Ready(Err(Error::permanent("the ledger is gone")))
    ///     }
    ///     fn call(&mut self, _: Message<Tick>) -> Self::Future {
    ///         std::future::ready(Ok(()))
    ///     }
    /// }
    ///
    /// # tokio::runtime::Runtime::new().unwrap().block_on(async {
    /// let bus = EventBus::new(Arc::new(MemoryTransport::new()), "clock");
    /// let consumer = bus.subscribe::<Tick, _>(SubscribeOptions::new("ui"), Broken).await?;
    /// let error = consumer.closed().await.expect("it ended on an error");
    /// assert!(error.message().contains("the ledger is gone"));
    /// assert_eq!(consumer.health(), ConsumerHealth::Stopped);
    /// assert!(consumer.shutdown().await.is_err(), "shutdown reports it too");
    /// # Ok::<(), switchboard::Error>(())
    /// # }).unwrap();
    /// ```
    pub async fn closed(&self) -> Option<&Error> {
        let mut ended = self.ended.clone();
        // Fails only when the task is gone without saying so (it panicked
        // or was aborted): ended all the same.
        let _ = ended.wait_for(|ended| *ended).await;
        self.failure.get()
    }

    /// The error the consume loop ended on, once it has ended on one.
    pub fn failure(&self) -> Option<&Error> {
        self.failure.get()
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
        if let Some(task) = self.task.take() {
            task.await.map_err(|error| {
                Error::new(ErrorKind::Closed, "consumer task failed").with_source(error)
            })?;
        }
        // The task has finished and dropped its share of the failure.
        let failure = std::mem::take(&mut self.failure);
        match Arc::try_unwrap(failure) {
            Ok(failure) => failure.into_inner().map_or(Ok(()), Err),
            Err(shared) => shared.get().map_or(Ok(()), |error| {
                Err(Error::new(error.kind(), error.message().to_owned()))
            }),
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
