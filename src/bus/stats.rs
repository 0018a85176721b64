//! What a consume loop counts as it goes — in flight, handled, failed, the
//! last error — and a cloneable view of a running consumer for status pages.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};

use chrono::{DateTime, Utc};
use tokio::sync::watch;

use super::ConsumerHealth;
use crate::error::Error;
use crate::transport::Transport;

/// The most characters of a last error kept; handlers' errors may quote
/// whole payloads.
const LAST_ERROR_LIMIT: usize = 512;

/// The counters one consume loop updates: a few atomic adds per
/// message, and a lock taken only when a handler fails.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    in_flight: AtomicU64,
    handled: AtomicU64,
    failed: AtomicU64,
    last_error: Mutex<Option<LastError>>,
}

impl Counters {
    /// A message was handed to the handler.
    pub(crate) fn started(&self) {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
    }

    /// The handler's call ended with `result`. The last error is kept
    /// before the counts move, and the counts before `in_flight` drops
    /// (release, read with acquire), so whoever sees a failure counted
    /// finds its error, and whoever sees nothing in flight sees the counts.
    pub(crate) fn finished(&self, result: &Result<(), Error>) {
        match result {
            Ok(()) => {
                self.handled.fetch_add(1, Ordering::Release);
            }
            // Put back behind an earlier message of its key, to be handled
            // later: neither handled nor failed yet.
            Err(error) if error.is_held_back() => {}
            Err(error) => {
                let message: String = error.to_string().chars().take(LAST_ERROR_LIMIT).collect();
                *self
                    .last_error
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner) = Some(LastError {
                    message,
                    at: Utc::now(),
                });
                self.failed.fetch_add(1, Ordering::Release);
            }
        }
        self.in_flight.fetch_sub(1, Ordering::Release);
    }

    pub(super) fn snapshot(&self) -> ConsumerStats {
        ConsumerStats {
            in_flight: self.in_flight.load(Ordering::Acquire),
            handled: self.handled.load(Ordering::Acquire),
            failed: self.failed.load(Ordering::Acquire),
            last_error: self
                .last_error
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .clone(),
        }
    }
}

/// A handler's most recent failure.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct LastError {
    /// The error, cut to 512 characters.
    pub message: String,
    /// When the handler returned it.
    pub at: DateTime<Utc>,
}

/// What a consumer has done since it started, as
/// [`ConsumerHandle::stats`](super::ConsumerHandle::stats) reports it.
///
/// ```
/// use std::sync::Arc;
/// use serde::{Deserialize, Serialize};
/// use switchboard::{Error, Event, EventBus, MemoryTransport, Message, SubscribeOptions, handler_fn};
///
/// #[derive(Debug, Clone, Serialize, Deserialize)]
/// struct Tick(u32);
/// impl Event for Tick {
///     const TYPE: &'static str = "tick";
///     const VERSION: &'static str = "1.0";
/// }
///
/// # tokio::runtime::Runtime::new().unwrap().block_on(async {
/// let bus = EventBus::new(Arc::new(MemoryTransport::new()), "clock");
/// let consumer = bus
///     .subscribe(SubscribeOptions::new("ui"), handler_fn(|m: Message<Tick>| async move {
///         if m.payload().0 == 2 { Err(Error::permanent("two is bad")) } else { Ok(()) }
///     }))
///     .await?;
/// bus.publish(Tick(1)).await?;
/// bus.publish(Tick(2)).await?;
/// while consumer.stats().handled + consumer.stats().failed < 2 {
///     tokio::task::yield_now().await;
/// }
/// let stats = consumer.stats();
/// assert_eq!((stats.handled, stats.failed, stats.in_flight), (1, 1, 0));
/// assert!(stats.last_error.unwrap().message.contains("two is bad"));
/// # Ok::<(), switchboard::Error>(())
/// # }).unwrap();
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ConsumerStats {
    /// Messages handed to the handler and not finished yet.
    pub in_flight: u64,
    /// Messages the handler finished with success.
    pub handled: u64,
    /// Handler calls that returned an error (retried, requeued or
    /// dead-lettered alike).
    pub failed: u64,
    /// The most recent of those errors.
    pub last_error: Option<LastError>,
}

/// A cloneable, read-only view of a running consumer — its names, health,
/// counters and the error it ended on — for status pages such as the
/// operator console. It does not keep the consumer alive: dropping the
/// [`ConsumerHandle`](super::ConsumerHandle) still stops it.
///
/// ```
/// use std::sync::Arc;
/// use serde::{Deserialize, Serialize};
/// use switchboard::{ConsumerHealth, Error, Event, EventBus, MemoryTransport, Message, SubscribeOptions, handler_fn};
///
/// #[derive(Debug, Clone, Serialize, Deserialize)]
/// struct Tick;
/// impl Event for Tick {
///     const TYPE: &'static str = "tick";
///     const VERSION: &'static str = "1.0";
/// }
///
/// # tokio::runtime::Runtime::new().unwrap().block_on(async {
/// let bus = EventBus::new(Arc::new(MemoryTransport::new()), "clock");
/// let handler = handler_fn(|_: Message<Tick>| async { Ok::<_, Error>(()) });
/// let consumer = bus.subscribe(SubscribeOptions::new("ui"), handler).await?;
/// let monitor = consumer.monitor();
/// assert_eq!((monitor.topic(), monitor.group()), ("tick", "ui"));
/// assert_eq!(monitor.health(), ConsumerHealth::Running);
/// assert_eq!(monitor.lag().await?, Some(0));
/// consumer.shutdown().await?;
/// assert_eq!(monitor.health(), ConsumerHealth::Stopped);
/// # Ok::<(), switchboard::Error>(())
/// # }).unwrap();
/// ```
#[derive(Clone)]
pub struct ConsumerMonitor {
    pub(super) topic: String,
    pub(super) group: String,
    pub(super) transport: Arc<dyn Transport>,
    pub(super) health: watch::Receiver<ConsumerHealth>,
    pub(super) failure: Arc<OnceLock<Error>>,
    pub(super) counters: Arc<Counters>,
}

impl ConsumerMonitor {
    /// The topic consumed.
    pub fn topic(&self) -> &str {
        &self.topic
    }

    /// The consumer group.
    pub fn group(&self) -> &str {
        &self.group
    }

    /// The transport's [`name`](crate::Transport::name).
    pub fn transport(&self) -> &'static str {
        self.transport.name()
    }

    /// How many messages the group has not been handed yet, when the
    /// transport can tell ([`Transport::group_lag`]): Redis Streams (7+),
    /// RabbitMQ and the in-memory transport do; `None` otherwise. One query to the
    /// broker: call it under a timeout from a status page.
    pub async fn lag(&self) -> Result<Option<u64>, Error> {
        self.transport.group_lag(&self.topic, &self.group).await
    }

    /// Running, paused or stopped (as
    /// [`ConsumerHandle::health`](super::ConsumerHandle::health)).
    pub fn health(&self) -> ConsumerHealth {
        if self.health.has_changed().is_err() {
            return ConsumerHealth::Stopped;
        }
        *self.health.borrow()
    }

    /// The error the consume loop ended on, once it has ended on one.
    pub fn failure(&self) -> Option<&Error> {
        self.failure.get()
    }

    /// The counters now.
    pub fn stats(&self) -> ConsumerStats {
        self.counters.snapshot()
    }
}

impl fmt::Debug for ConsumerMonitor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConsumerMonitor")
            .field("topic", &self.topic)
            .field("group", &self.group)
            .field("health", &self.health())
            .finish()
    }
}
