//! The bounded inbox between a subscription's connection and its consumer,
//! and its drop policy (see the module docs, "Back-pressure").

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use tokio::sync::Notify;

use super::{DropPolicy, NAME};
use crate::observe::metrics;
use crate::transport::RawMessage;

/// A received message, on its way from the connection to the subscription.
pub(super) struct Incoming {
    pub(super) topic: Arc<str>,
    pub(super) message: RawMessage,
}

/// A subscription's bounded queue from its connection to its consumer. The
/// connection's read loop fills it without ever waiting (see
/// [Back-pressure](super#back-pressure)); the consumer empties it.
pub(super) struct Inbox {
    queue: Mutex<Queue>,
    capacity: usize,
    policy: DropPolicy,
    /// Wakes the consumer when the queue stops being empty or closes.
    ready: Notify,
    /// The `topic` label of the dropped-messages metric: the subscribed
    /// topic or pattern.
    subscription: Arc<str>,
    dropped: Arc<AtomicU64>,
}

struct Queue {
    messages: VecDeque<Incoming>,
    closed: bool,
}

impl Inbox {
    pub(super) fn new(
        capacity: usize,
        policy: DropPolicy,
        subscription: Arc<str>,
        dropped: Arc<AtomicU64>,
    ) -> Self {
        Self {
            queue: Mutex::new(Queue {
                // Room for the default capacity up front, so filling the
                // queue never reallocates; a larger inbox grows on demand.
                messages: VecDeque::with_capacity(capacity.min(1024)),
                closed: false,
            }),
            capacity,
            policy,
            ready: Notify::new(),
            subscription,
            dropped,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Queue> {
        // Nothing panics while holding the lock; a poisoned queue is intact.
        self.queue.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Called on the connection's read loop: takes the lock for a few
    /// pointer moves and never waits for the consumer.
    pub(super) fn push(&self, incoming: Incoming) {
        let mut queue = self.lock();
        if queue.closed {
            return;
        }
        if queue.messages.len() < self.capacity {
            let was_empty = queue.messages.is_empty();
            queue.messages.push_back(incoming);
            drop(queue);
            if was_empty {
                // Stores a wake-up if the consumer is not waiting yet.
                self.ready.notify_one();
            }
            return;
        }
        // Full, so not empty: the consumer has something to take already.
        let evicted = match self.policy {
            DropPolicy::DropOldest => {
                let oldest = queue.messages.pop_front();
                queue.messages.push_back(incoming);
                oldest
            }
            DropPolicy::DropNewest => Some(incoming),
        };
        // Counted before the lock is released, so whoever takes the next
        // message also sees this drop.
        self.dropped.fetch_add(1, Ordering::Relaxed);
        drop(queue);
        drop(evicted);
        metrics::dropped(NAME, self.subscription.clone(), "inbox_full");
    }

    /// The next message; `None` once the inbox is closed and empty.
    pub(super) async fn pop(&self) -> Option<Incoming> {
        loop {
            {
                let mut queue = self.lock();
                if let Some(incoming) = queue.messages.pop_front() {
                    return Some(incoming);
                }
                if queue.closed {
                    return None;
                }
            }
            // A push between the unlock and here left a stored wake-up.
            self.ready.notified().await;
        }
    }

    /// Refuses further messages; the consumer still takes what is queued
    /// unless `discard`.
    pub(super) fn close(&self, discard: bool) {
        let discarded = {
            let mut queue = self.lock();
            queue.closed = true;
            if discard {
                std::mem::take(&mut queue.messages)
            } else {
                VecDeque::new()
            }
        };
        drop(discarded);
        self.ready.notify_one();
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;

    fn inbox(capacity: usize, policy: DropPolicy) -> Inbox {
        Inbox::new(capacity, policy, "t".into(), Arc::default())
    }

    fn push(inbox: &Inbox, body: &'static str) {
        inbox.push(Incoming {
            topic: "t".into(),
            message: RawMessage::new(body),
        });
    }

    async fn bodies(inbox: &Inbox) -> Vec<Bytes> {
        inbox.close(false);
        let mut bodies = Vec::new();
        while let Some(incoming) = inbox.pop().await {
            bodies.push(incoming.message.body);
        }
        bodies
    }

    #[tokio::test]
    async fn a_full_inbox_drops_the_oldest_by_default_and_counts_it() {
        let inbox = inbox(2, DropPolicy::default());
        for body in ["1", "2", "3", "4"] {
            push(&inbox, body);
        }
        assert_eq!(inbox.dropped.load(Ordering::Relaxed), 2);
        assert_eq!(bodies(&inbox).await, ["3", "4"]);
    }

    #[tokio::test]
    async fn drop_newest_keeps_what_came_first() {
        let inbox = inbox(2, DropPolicy::DropNewest);
        for body in ["1", "2", "3", "4"] {
            push(&inbox, body);
        }
        assert_eq!(inbox.dropped.load(Ordering::Relaxed), 2);
        assert_eq!(bodies(&inbox).await, ["1", "2"]);
    }

    #[tokio::test]
    async fn a_waiting_consumer_is_woken_and_a_closed_inbox_refuses_pushes() {
        let inbox = Arc::new(inbox(1, DropPolicy::DropOldest));
        let waiting = tokio::spawn({
            let inbox = inbox.clone();
            async move { inbox.pop().await.map(|incoming| incoming.message.body) }
        });
        push(&inbox, "1");
        assert_eq!(waiting.await.unwrap().as_deref(), Some(&b"1"[..]));
        inbox.close(true);
        push(&inbox, "2");
        assert!(inbox.pop().await.is_none());
        assert_eq!(
            inbox.dropped.load(Ordering::Relaxed),
            0,
            "refused, not dropped"
        );
    }
}
