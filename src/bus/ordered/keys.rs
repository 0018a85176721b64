//! The ordered loop's bookkeeping of keys: which messages of a key are
//! out as a run, what is known of each, and when the key may go on.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use tokio::time::Instant;

use super::{Handled, Retrying};
use crate::bus::consume::Decoded;
use crate::bus::key_run::{KeyRun, Place};
use crate::bus::keyed_queue::KeyedQueue;

/// A message of a run let out, waiting for the handler's readiness.
pub(super) struct Starting<E> {
    pub(super) key: Arc<str>,
    pub(super) index: usize,
    pub(super) decoded: Decoded<E>,
    pub(super) since: Option<Instant>,
}

/// Where a retried message stands.
pub(super) enum Retry<E> {
    None,
    /// Waiting out its delay in the loop's timer queue.
    Waiting,
    /// Its delay is over; it starts once the rest of its run is back.
    Due(Box<Retrying<E>>),
}

/// A busy key's messages out: its run, and what is known of each member.
pub(super) struct Out<E> {
    pub(super) run: Option<Arc<KeyRun>>,
    /// Each member's handling, once it has ended and until it is settled.
    pub(super) results: Vec<Option<Handled<E>>>,
    /// The first member not yet settled (or put back).
    pub(super) next: usize,
    /// A member failed or went back: the later ones go back too.
    pub(super) blocked: bool,
    /// How many went back to the front of the key's queue.
    pub(super) put_back: usize,
    pub(super) retry: Retry<E>,
    /// Settles of the key on their way.
    pub(super) settling: usize,
}

/// The ordered loop's keys: the queue, the runs out, and the members let
/// out and not yet handed to the handler.
pub(super) struct Keys<E> {
    pub(super) queue: KeyedQueue<Decoded<E>>,
    pub(super) out: HashMap<Arc<str>, Out<E>>,
    pub(super) starting: VecDeque<Starting<E>>,
    /// Whether members get a [`Place`] (a batch subscription).
    pub(super) places: bool,
}

impl<E> Keys<E> {
    /// Lets `members` of `key` out as a run (the key is busy).
    pub(super) fn start_run(
        &mut self,
        key: Arc<str>,
        members: Vec<Decoded<E>>,
        since: Option<Instant>,
    ) {
        let len = members.len();
        let mut places = if self.places {
            KeyRun::places(len).into_iter().map(Some).collect()
        } else {
            vec![None; len]
        };
        let run = places
            .first()
            .and_then(|place: &Option<Place>| place.as_ref())
            .map(|place| place.run.clone());
        for (index, (mut decoded, place)) in members.into_iter().zip(places.drain(..)).enumerate() {
            decoded.message.place = place;
            self.starting.push_back(Starting {
                key: key.clone(),
                index,
                decoded,
                since,
            });
        }
        let out = self.out.entry(key).or_insert_with(|| Out {
            run: None,
            results: Vec::new(),
            next: 0,
            blocked: false,
            put_back: 0,
            retry: Retry::None,
            settling: 0,
        });
        out.run = run;
        out.results = (0..len).map(|_| None).collect();
        out.next = 0;
        out.blocked = false;
        out.put_back = 0;
    }

    /// After a change to `key`: a retry whose delay is over starts once its
    /// run is all back; a key with nothing out any more is released.
    pub(super) fn settle_key(&mut self, key: &Arc<str>) {
        let Some(out) = self.out.get_mut(key) else {
            return;
        };
        if out.next < out.results.len() {
            return;
        }
        match std::mem::replace(&mut out.retry, Retry::None) {
            Retry::Due(retrying) => {
                let Retrying {
                    key,
                    decoded,
                    since,
                } = *retrying;
                self.start_run(key, vec![decoded], Some(since));
            }
            Retry::Waiting => out.retry = Retry::Waiting,
            Retry::None if out.settling == 0 => {
                self.out.remove(key);
                self.queue.release(key);
            }
            Retry::None => {}
        }
    }
}
