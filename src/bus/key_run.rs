//! A run: messages of one key that a batch subscription with an
//! [`OrderingKey`](crate::OrderingKey) lets out at once, in arrival order,
//! so that several of them can share a batch.
//!
//! The ordered consume loop makes a run of up to `max_messages` waiting
//! messages of a key once nothing of the key is out, and gives each message
//! its [`Place`] in it. The messages then go through their per-message
//! stacks, which may bring them to the batcher in any order; the batcher
//! uses the run's shared state to keep the key's order:
//!
//! * a member joins the batch being gathered only once every earlier member
//!   is done (acked) or already in that batch, so a batch holds a key's
//!   messages in arrival order, and no two batches running at once hold the
//!   same key;
//! * once a member fails, every later member is **held back**: answered
//!   [`Error::held_back`](crate::Error) instead of being handed to the
//!   handler (or instead of its result, when it ran in the same batch), and
//!   the loop puts it back at the front of its key's queue. The failed
//!   member alone may come back (its retry layer sends it again) and go on.
//!
//! The loop settles a run's members in their order, and marks here what
//! settled without the batcher's knowing: a duplicate acked by the dedupe
//! layer, a message failed before it reached the batcher (an open breaker,
//! a timeout). Either side wakes the batcher when it changes something.

use std::sync::{Arc, Mutex, PoisonError};

use tokio::sync::Notify;

/// Where a message stands in its run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Member {
    /// Not in a batch: on its way through its stack, or back from a failure.
    Out,
    /// In batch number `n` of the batcher (gathered or running).
    Batched(u64),
    /// Handled and acked (or acked as a duplicate).
    Done,
    /// Answered held back: it goes back to its key's queue.
    HeldBack,
}

/// The state one run's messages share with the batcher and the loop.
#[derive(Debug)]
pub(crate) struct KeyRun {
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    members: Vec<Member>,
    /// The first member that failed: every later one is held back.
    broken: Option<usize>,
    /// The batcher's wake-up, once a member has reached it.
    batcher: Option<Arc<Notify>>,
}

/// A message's place in its run.
#[derive(Debug, Clone)]
pub(crate) struct Place {
    pub(crate) run: Arc<KeyRun>,
    pub(crate) index: usize,
}

/// What the batcher may do with a member now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Admission {
    /// Into the batch being gathered.
    Join,
    /// Not yet: an earlier member is still out or in a running batch.
    Wait,
    /// Answer it held back: an earlier member failed.
    HoldBack,
}

impl KeyRun {
    /// A run of `len` messages; the places of its members.
    pub(crate) fn places(len: usize) -> Vec<Place> {
        let run = Arc::new(Self {
            state: Mutex::new(State {
                members: vec![Member::Out; len],
                broken: None,
                batcher: None,
            }),
        });
        (0..len)
            .map(|index| Place {
                run: run.clone(),
                index,
            })
            .collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The batcher asks whether member `index` may join batch `gathering`
    /// (`room`: whether that batch has room). `batcher` is woken when the
    /// loop changes the run.
    pub(crate) fn admit(
        &self,
        index: usize,
        gathering: u64,
        room: bool,
        batcher: &Arc<Notify>,
    ) -> Admission {
        let mut state = self.lock();
        if state.batcher.is_none() {
            state.batcher = Some(batcher.clone());
        }
        if state.broken.is_some_and(|failed| failed < index) {
            state.members[index] = Member::HeldBack;
            return Admission::HoldBack;
        }
        // A copy of it still in a running batch (its stack gave up on it
        // and sent it again) must come back from there first.
        if matches!(state.members[index], Member::Batched(_)) {
            return Admission::Wait;
        }
        let earlier_ready = state.members[..index]
            .iter()
            .all(|member| matches!(member, Member::Done) || *member == Member::Batched(gathering));
        if !room || !earlier_ready {
            return Admission::Wait;
        }
        state.members[index] = Member::Batched(gathering);
        Admission::Join
    }

    /// The batcher has member `index`'s result from the handler: whether to
    /// answer it held back (an earlier member failed). Otherwise `answer`
    /// sends the result and says whether it was `Ok` and delivered; a member
    /// whose result was not, breaks the run.
    pub(crate) fn answer(&self, index: usize, answer: impl FnOnce(bool) -> bool) {
        let mut state = self.lock();
        let held = state.broken.is_some_and(|failed| failed < index);
        let acked = answer(held);
        state.members[index] = match (held, acked) {
            (true, _) => Member::HeldBack,
            (false, true) => Member::Done,
            (false, false) => {
                state.broken = Some(state.broken.map_or(index, |failed| failed.min(index)));
                Member::Out
            }
        };
    }

    /// Whether the batcher answered member `index` held back.
    pub(crate) fn was_held_back(&self, index: usize) -> bool {
        self.lock().members[index] == Member::HeldBack
    }

    /// The loop acked member `index` (it may never have reached a batch).
    pub(crate) fn done(&self, index: usize) {
        let mut state = self.lock();
        // Mostly the batcher has marked it already: nothing to wake it for.
        if !matches!(state.members[index], Member::HeldBack | Member::Done) {
            state.members[index] = Member::Done;
            Self::wake(&state);
        }
    }

    /// The loop settled member `index` otherwise than by an ack, or put it
    /// back: nothing after it may go on in this run.
    pub(crate) fn broken_at(&self, index: usize) {
        let mut state = self.lock();
        if state.broken.is_none_or(|failed| failed > index) {
            state.broken = Some(index);
            Self::wake(&state);
        }
    }

    fn wake(state: &State) {
        if let Some(batcher) = &state.batcher {
            batcher.notify_one();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn members_join_in_order_and_a_failure_holds_back_the_rest() {
        let notify = Arc::new(Notify::new());
        let places = KeyRun::places(4);
        let run = &places[0].run;
        // 1 arrived first: it waits for 0.
        assert_eq!(run.admit(1, 0, true, &notify), Admission::Wait);
        assert_eq!(run.admit(0, 0, true, &notify), Admission::Join);
        assert_eq!(run.admit(1, 0, true, &notify), Admission::Join);
        // Batch 0 is running: 2 may not go into batch 1 beside it.
        assert_eq!(run.admit(2, 1, true, &notify), Admission::Wait);
        run.answer(0, |held| !held);
        run.answer(1, |held| {
            assert!(!held);
            false
        });
        // 1 failed: 2 and 3 go back, 1 itself may come again.
        assert_eq!(run.admit(2, 1, true, &notify), Admission::HoldBack);
        assert!(run.was_held_back(2));
        assert_eq!(run.admit(1, 1, true, &notify), Admission::Join);
        run.answer(1, |held| !held);
        assert_eq!(run.admit(3, 2, true, &notify), Admission::HoldBack);
    }

    #[test]
    fn the_loop_marks_what_never_reached_the_batcher() {
        let notify = Arc::new(Notify::new());
        let places = KeyRun::places(3);
        let run = &places[0].run;
        assert_eq!(run.admit(1, 0, true, &notify), Admission::Wait);
        // 0 was a duplicate, acked by the dedupe layer.
        run.done(0);
        assert_eq!(run.admit(1, 0, false, &notify), Admission::Wait, "no room");
        assert_eq!(run.admit(1, 0, true, &notify), Admission::Join);
        // 1 failed before the batcher's answer mattered (a timeout).
        run.broken_at(1);
        run.answer(1, |held| !held);
        assert_eq!(run.admit(2, 1, true, &notify), Admission::HoldBack);
    }
}
