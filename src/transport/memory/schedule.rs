//! Scheduled publishing in memory: one timer queue per transport and one
//! task that publishes each message when its time comes.
//!
//! Why one task and not one per message: a burst of scheduled messages
//! costs heap entries, not tasks. The queue holds at most
//! [`MemoryTransport::SCHEDULED_LIMIT`] messages, so memory stays bounded.

use std::sync::{Mutex, Weak};
use std::time::Duration;

use chrono::{DateTime, Utc};

use super::{Inner, MemoryTransport, lock};
use crate::error::{Error, ErrorKind};
use crate::transport::RawMessage;
use crate::transport::delay::DelayQueue;

/// How long a due message that its topic refused for now (a full group
/// queue) waits before it is tried again.
const RETRY_FULL_AFTER: Duration = Duration::from_millis(100);

/// A message waiting for its time.
pub(super) struct Due {
    topic: String,
    message: RawMessage,
}

/// The transport's scheduled messages and the task that publishes them.
#[derive(Default)]
pub(super) struct Scheduled {
    queue: DelayQueue<Due>,
    task: Mutex<Option<tokio::task::AbortHandle>>,
}

impl Scheduled {
    /// Stops publishing; what still waits is dropped with the transport
    /// (nothing in memory survives it).
    pub(super) fn stop(&self) {
        if let Some(task) = lock(&self.task).take() {
            task.abort();
        }
    }
}

impl Drop for Scheduled {
    fn drop(&mut self) {
        self.stop();
    }
}

impl MemoryTransport {
    /// Most scheduled messages a transport holds; past it `publish_at` is
    /// refused as retryable.
    pub const SCHEDULED_LIMIT: usize = 100_000;

    pub(super) fn schedule(
        &self,
        topic: &str,
        message: RawMessage,
        at: DateTime<Utc>,
    ) -> Result<(), Error> {
        let scheduled = &self.inner.scheduled;
        if scheduled.queue.len() >= Self::SCHEDULED_LIMIT {
            return Err(Error::new(
                ErrorKind::Unavailable,
                format!(
                    "memory: {} scheduled messages wait already; try again later",
                    Self::SCHEDULED_LIMIT
                ),
            ));
        }
        // The tokio clock, not the wall clock, waits; a time already past is
        // due at once.
        let delay = (at - Utc::now()).to_std().unwrap_or(Duration::ZERO);
        self.ensure_publisher_task();
        let due = Due {
            topic: topic.to_owned(),
            message,
        };
        scheduled.queue.push(delay, due).map_err(|_| {
            Error::new(
                ErrorKind::Closed,
                "memory: the transport is closed".to_owned(),
            )
        })
    }

    fn ensure_publisher_task(&self) {
        let mut task = lock(&self.inner.scheduled.task);
        if task.is_some() {
            return;
        }
        let queue = self.inner.scheduled.queue.clone();
        // The task holds the transport weakly: dropping the last clone drops
        // `Scheduled`, which aborts it.
        let weak = std::sync::Arc::downgrade(&self.inner);
        *task = Some(tokio::spawn(publish_when_due(queue, weak)).abort_handle());
    }
}

async fn publish_when_due(queue: DelayQueue<Due>, transport: Weak<Inner>) {
    loop {
        let due = queue.next_due().await;
        let Some(inner) = transport.upgrade() else {
            return;
        };
        let transport = MemoryTransport { inner };
        let topic = transport.topic_or_create(&due.topic);
        match transport.enqueue(&topic, std::iter::once(due.message.clone())) {
            Ok(()) => {}
            Err(error) if error.is_retryable() => {
                // A full group queue: the message stays scheduled, a little
                // later, rather than being lost.
                if queue.push(RETRY_FULL_AFTER, due).is_err() {
                    return;
                }
            }
            Err(error) => {
                tracing::error!(
                    topic = %due.topic,
                    %error,
                    "memory: a scheduled message was refused by its topic and is dropped",
                );
            }
        }
    }
}
