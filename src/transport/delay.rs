//! One timer queue per subscription for deliveries waiting out a nack's
//! delay.
//!
//! Why not a task per nack: while a dependency is down, every message a
//! subscription touches is nacked, so a task per nack grows with the
//! backlog instead of with the prefetch. Here each waiting item is one heap
//! entry (it also holds its prefetch permit, so the heap can never hold more
//! than the prefetch), and whoever owns the queue waits for the earliest one
//! with a single timer.

use std::cmp::Ordering;
use std::collections::BinaryHeap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

/// A queue of items, each due at its own time. Clones share the queue.
pub(crate) struct DelayQueue<T> {
    shared: Arc<Shared<T>>,
}

impl<T> Clone for DelayQueue<T> {
    fn clone(&self) -> Self {
        Self {
            shared: self.shared.clone(),
        }
    }
}

struct Shared<T> {
    state: Mutex<State<T>>,
    /// Woken when an item is pushed (it may be due sooner than the earliest).
    pushed: Notify,
}

struct State<T> {
    heap: BinaryHeap<Due<T>>,
    next_seq: u64,
    closed: bool,
}

struct Due<T> {
    at: Instant,
    /// Keeps items due at the same instant in push order.
    seq: u64,
    item: T,
}

// `BinaryHeap` is a max-heap: the earliest (smallest) time compares greatest.
impl<T> Ord for Due<T> {
    fn cmp(&self, other: &Self) -> Ordering {
        (other.at, other.seq).cmp(&(self.at, self.seq))
    }
}

impl<T> PartialOrd for Due<T> {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl<T> PartialEq for Due<T> {
    fn eq(&self, other: &Self) -> bool {
        (self.at, self.seq) == (other.at, other.seq)
    }
}

impl<T> Eq for Due<T> {}

impl<T> Default for DelayQueue<T> {
    fn default() -> Self {
        Self {
            shared: Arc::new(Shared {
                state: Mutex::new(State {
                    heap: BinaryHeap::new(),
                    next_seq: 0,
                    closed: false,
                }),
                pushed: Notify::new(),
            }),
        }
    }
}

impl<T> DelayQueue<T> {
    /// Adds `item`, due after `delay`. A closed queue hands the item back.
    pub(crate) fn push(&self, delay: Duration, item: T) -> Result<(), T> {
        {
            let mut state = self.lock();
            if state.closed {
                return Err(item);
            }
            let seq = state.next_seq;
            state.next_seq += 1;
            let at = Instant::now() + delay;
            state.heap.push(Due { at, seq, item });
        }
        self.shared.pushed.notify_one();
        Ok(())
    }

    /// How many items wait.
    #[cfg_attr(not(test), allow(dead_code))]
    pub(crate) fn len(&self) -> usize {
        self.lock().heap.len()
    }

    /// Whether [`close`](Self::close) was called: the subscription stops.
    #[cfg_attr(not(feature = "amqp"), allow(dead_code))]
    pub(crate) fn is_closed(&self) -> bool {
        self.lock().closed
    }

    /// The earliest item whose time has come, if any.
    #[cfg_attr(not(feature = "redis-streams"), allow(dead_code))]
    pub(crate) fn try_due(&self) -> Option<T> {
        let mut state = self.lock();
        let due = state
            .heap
            .peek()
            .is_some_and(|top| top.at <= Instant::now());
        if due {
            state.heap.pop().map(|due| due.item)
        } else {
            None
        }
    }

    /// Waits for the earliest item whose time has come. Cancel-safe: an item
    /// is taken out only when this returns it.
    pub(crate) async fn next_due(&self) -> T {
        loop {
            let pushed = self.shared.pushed.notified();
            tokio::pin!(pushed);
            // Registered before looking, so a push in between still wakes us.
            pushed.as_mut().enable();
            let earliest = {
                let mut state = self.lock();
                match state.heap.peek() {
                    Some(top) if top.at <= Instant::now() => {
                        return state.heap.pop().expect("peeked").item;
                    }
                    Some(top) => Some(top.at),
                    None => None,
                }
            };
            match earliest {
                Some(at) => {
                    tokio::select! {
                        () = &mut pushed => {}
                        () = tokio::time::sleep_until(at) => {}
                    }
                }
                None => pushed.await,
            }
        }
    }

    /// Closes the queue and returns what still waits, each with the time it
    /// had left. Later pushes are handed back.
    pub(crate) fn close(&self) -> Vec<(T, Duration)> {
        let mut state = self.lock();
        state.closed = true;
        let now = Instant::now();
        let mut items: Vec<Due<T>> = std::mem::take(&mut state.heap).into_vec();
        items.sort_by(|a, b| b.cmp(a));
        items
            .into_iter()
            .map(|due| (due.item, due.at.saturating_duration_since(now)))
            .collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State<T>> {
        // A poisoned lock only means a panic elsewhere mid-push; the heap is
        // still a valid heap.
        self.shared
            .state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn items_come_out_in_time_order_not_push_order() {
        let queue = DelayQueue::default();
        queue.push(Duration::from_millis(300), "c").unwrap();
        queue.push(Duration::from_millis(100), "a").unwrap();
        queue.push(Duration::from_millis(200), "b").unwrap();
        let started = Instant::now();
        assert_eq!(queue.next_due().await, "a");
        assert_eq!(started.elapsed(), Duration::from_millis(100));
        assert_eq!(queue.next_due().await, "b");
        assert_eq!(queue.next_due().await, "c");
        assert_eq!(started.elapsed(), Duration::from_millis(300));
        assert_eq!(queue.len(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_sooner_push_wakes_a_waiter() {
        let queue = DelayQueue::default();
        queue.push(Duration::from_secs(60), "late").unwrap();
        let waiter = {
            let queue = queue.clone();
            tokio::spawn(async move { queue.next_due().await })
        };
        tokio::task::yield_now().await;
        queue.push(Duration::from_millis(5), "soon").unwrap();
        assert_eq!(waiter.await.unwrap(), "soon");
        assert!(queue.try_due().is_none(), "the late one is not due");
    }

    #[tokio::test(start_paused = true)]
    async fn close_returns_what_waits_with_time_left_and_refuses_more() {
        let queue = DelayQueue::default();
        queue.push(Duration::from_millis(500), 2).unwrap();
        queue.push(Duration::from_millis(100), 1).unwrap();
        tokio::time::advance(Duration::from_millis(50)).await;
        let left = queue.close();
        assert_eq!(
            left,
            vec![
                (1, Duration::from_millis(50)),
                (2, Duration::from_millis(450))
            ]
        );
        assert_eq!(queue.push(Duration::ZERO, 3), Err(3));
    }
}
