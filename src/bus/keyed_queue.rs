//! The per-key queue of an ordered subscription: which messages may start,
//! so that each key has at most one message — or one run of messages, for a
//! batch subscription — in a handler (or waiting out a retry's delay) and
//! its others wait behind it in arrival order.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

/// Keys with a message out, and what waits behind each.
///
/// A key is *busy* from the moment one of its messages starts until the
/// loop [`release`](Self::release)s it (the message is settled for good); a
/// message retried after a delay keeps its key busy. A key that is not busy
/// and has messages waiting is *ready*: ready keys are served first come,
/// first served, so a hot key cannot starve the others.
pub(super) struct KeyedQueue<T> {
    keys: HashMap<Arc<str>, Key<T>>,
    ready: VecDeque<Arc<str>>,
    /// How many messages wait behind a busy key or in a ready one.
    waiting: usize,
}

struct Key<T> {
    busy: bool,
    waiting: VecDeque<T>,
}

impl<T> Default for KeyedQueue<T> {
    fn default() -> Self {
        Self {
            keys: HashMap::new(),
            ready: VecDeque::new(),
            waiting: 0,
        }
    }
}

impl<T> KeyedQueue<T> {
    /// A message of `key` arrived: handed back to start now (the key is
    /// marked busy) when nothing of its key is out or waiting, else kept.
    pub(super) fn arrive(&mut self, key: Arc<str>, item: T) -> Option<T> {
        match self.keys.get_mut(&key) {
            None => {
                self.keys.insert(
                    key,
                    Key {
                        busy: true,
                        waiting: VecDeque::new(),
                    },
                );
                Some(item)
            }
            Some(state) => {
                // Not busy with something waiting means it is already in
                // `ready`: it stays there, behind its own older messages.
                state.waiting.push_back(item);
                self.waiting += 1;
                None
            }
        }
    }

    /// The oldest waiting messages of the key ready longest, up to `most`
    /// (at least one), in arrival order; its key marked busy.
    pub(super) fn next_run(&mut self, most: usize) -> Option<(Arc<str>, Vec<T>)> {
        let key = self.ready.pop_front()?;
        let state = self.keys.get_mut(&key).expect("a ready key is known");
        let take = most.clamp(1, state.waiting.len());
        let run: Vec<T> = state.waiting.drain(..take).collect();
        debug_assert!(!run.is_empty(), "a ready key has a message");
        state.busy = true;
        self.waiting -= run.len();
        Some((key, run))
    }

    /// Puts a message of the busy `key` back into its queue at `at` (0 is
    /// the front): it was let out and must wait for an earlier one.
    pub(super) fn put_back(&mut self, key: &Arc<str>, at: usize, item: T) {
        let state = self.keys.entry(key.clone()).or_insert_with(|| Key {
            busy: true,
            waiting: VecDeque::new(),
        });
        let at = at.min(state.waiting.len());
        state.waiting.insert(at, item);
        self.waiting += 1;
    }

    /// The message out for `key` is settled for good: the next of its key
    /// may start.
    pub(super) fn release(&mut self, key: &Arc<str>) {
        let Some(state) = self.keys.get_mut(key) else {
            return;
        };
        state.busy = false;
        if state.waiting.is_empty() {
            self.keys.remove(key);
        } else {
            self.ready.push_back(key.clone());
        }
    }

    /// Takes every waiting message out (the subscription is stopping).
    pub(super) fn drain(&mut self) -> Vec<T> {
        self.ready.clear();
        self.waiting = 0;
        self.keys
            .drain()
            .flat_map(|(_, state)| state.waiting)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(name: &str) -> Arc<str> {
        name.into()
    }

    #[test]
    fn one_message_per_key_out_and_the_rest_in_order() {
        let mut queue = KeyedQueue::default();
        assert_eq!(queue.arrive(key("a"), 1), Some(1));
        assert_eq!(queue.arrive(key("b"), 2), Some(2));
        assert_eq!(queue.arrive(key("a"), 3), None);
        assert_eq!(queue.arrive(key("a"), 4), None);
        assert_eq!(queue.waiting, 2);
        assert!(queue.ready.is_empty());
        queue.release(&key("b"));
        assert!(queue.next_run(1).is_none());
        queue.release(&key("a"));
        assert_eq!(queue.next_run(1), Some((key("a"), vec![3])));
        // Busy again: a newcomer of the key waits behind 4.
        assert_eq!(queue.arrive(key("a"), 5), None);
        assert!(queue.next_run(1).is_none());
        queue.release(&key("a"));
        assert_eq!(queue.next_run(1), Some((key("a"), vec![4])));
        queue.release(&key("a"));
        assert_eq!(queue.next_run(1), Some((key("a"), vec![5])));
        queue.release(&key("a"));
        assert_eq!(queue.waiting, 0);
        assert!(queue.keys.is_empty());
    }

    #[test]
    fn ready_keys_take_turns_and_drain_empties() {
        let mut queue = KeyedQueue::default();
        for (name, n) in [("a", 1), ("b", 2), ("a", 3), ("b", 4), ("a", 5)] {
            queue.arrive(key(name), n);
        }
        queue.release(&key("a"));
        queue.release(&key("b"));
        assert_eq!(queue.next_run(1), Some((key("a"), vec![3])));
        queue.release(&key("a"));
        // b became ready before a did again.
        assert_eq!(queue.next_run(1), Some((key("b"), vec![4])));
        let mut left = queue.drain();
        left.sort();
        assert_eq!(left, vec![5]);
        assert_eq!(queue.waiting, 0);
    }

    #[test]
    fn a_run_takes_the_oldest_of_a_key_and_what_goes_back_waits_in_front() {
        let mut queue = KeyedQueue::default();
        assert_eq!(queue.arrive(key("a"), 0), Some(0));
        for n in 1..=5 {
            assert_eq!(queue.arrive(key("a"), n), None);
        }
        queue.release(&key("a"));
        assert_eq!(queue.next_run(3), Some((key("a"), vec![1, 2, 3])));
        assert!(queue.next_run(3).is_none(), "busy while its run is out");
        // 2 and 3 go back behind 1, in front of the newer 4 and 5.
        queue.put_back(&key("a"), 0, 2);
        queue.put_back(&key("a"), 1, 3);
        assert_eq!(queue.waiting, 4);
        queue.release(&key("a"));
        assert_eq!(queue.next_run(10), Some((key("a"), vec![2, 3, 4, 5])));
        queue.release(&key("a"));
        assert_eq!(queue.waiting, 0);
        assert!(queue.keys.is_empty());
    }
}
