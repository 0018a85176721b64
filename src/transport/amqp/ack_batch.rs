//! The acks of one consuming channel, sent together.
//!
//! Every `basic.ack` is a frame through lapin's I/O loop. Acks asked for
//! while one is on its way wait and go out together: the longest run of
//! deliveries at the head of the channel that are all to be acked as one
//! `basic.ack` with `multiple`, the rest one by one. A delivery still held
//! (in a handler, waiting out a nack's delay, about to be rejected) stops
//! the run, so `multiple` never covers a delivery that is not to be acked.
//! With one ack at a time (concurrency 1, in order) nothing waits: each goes
//! out at once, as before. Every delivery of the channel must be registered
//! ([`AckBatch::delivered`]) before any ack of a later one is asked for, or
//! a `multiple` could cover it.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Mutex;

use lapin::options::BasicAckOptions;
use tokio::sync::oneshot;

use super::error::amqp_error;
use crate::error::{Error, ErrorKind};

/// What an ack's waiter is told: whether its frame went out (`false`: the
/// channel had closed), or why it failed (the error's kind and text: one
/// failure answers every ack a `multiple` frame carried).
type Sent = Result<bool, (ErrorKind, String)>;

/// The acks of one channel; see the module docs.
#[derive(Default)]
pub(super) struct AckBatch {
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// Delivery tags handed out on the channel and not yet settled with
    /// the broker, in order.
    unsettled: BTreeSet<u64>,
    /// Acks asked for and not yet sent.
    asked: BTreeMap<u64, Asked>,
    /// A task is sending acks: the others leave theirs to it.
    sending: bool,
}

struct Asked {
    acker: lapin::Acker,
    done: oneshot::Sender<Sent>,
}

/// What one round sends.
#[derive(Debug, PartialEq, Eq)]
struct Plan {
    /// The last tag of the run at the head of the channel, acked with
    /// `multiple`, and every tag it covers.
    run: Option<(u64, Vec<u64>)>,
    /// Tags acked one by one.
    singles: Vec<u64>,
}

/// Takes the acks `asked` for into a plan, and forgets their tags in
/// `unsettled`.
fn plan(unsettled: &mut BTreeSet<u64>, asked: &BTreeSet<u64>) -> Plan {
    let run: Vec<u64> = unsettled
        .iter()
        .copied()
        .take_while(|tag| asked.contains(tag))
        .collect();
    // A run of one is an ordinary ack.
    let run = (run.len() > 1).then(|| (*run.last().expect("two or more"), run));
    let covered = run.as_ref().map_or(&[][..], |(_, tags)| tags.as_slice());
    let singles = asked
        .iter()
        .copied()
        .filter(|tag| !covered.contains(tag))
        .collect();
    for tag in asked {
        unsettled.remove(tag);
    }
    Plan { run, singles }
}

impl AckBatch {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The broker handed out `tag` on this channel.
    pub(super) fn delivered(&self, tag: u64) {
        self.lock().unsettled.insert(tag);
    }

    /// `tag` was settled otherwise (rejected): it no longer stops a run.
    pub(super) fn settled(&self, tag: u64) {
        self.lock().unsettled.remove(&tag);
    }

    /// Acks `tag` (with `acker`, or within a `multiple` ack of a later
    /// tag); `Ok(false)` when the channel had closed.
    pub(super) async fn ack(&self, tag: u64, acker: lapin::Acker) -> Result<bool, Error> {
        // Nothing on its way and nothing waiting (one ack at a time): send
        // at once, without a waiter, then whatever was asked meanwhile.
        let alone = {
            let mut state = self.lock();
            let alone = !state.sending && state.asked.is_empty();
            if alone {
                state.sending = true;
                state.unsettled.remove(&tag);
            }
            alone
        };
        if alone {
            let sent = {
                let mut stop = StopSending {
                    batch: self,
                    finished: false,
                };
                let sent = send(&acker, BasicAckOptions::default()).await;
                stop.finished = true;
                sent
            };
            self.send_all().await;
            return sent.map_err(|(kind, text)| Error::new(kind, text));
        }
        let (done, sent) = oneshot::channel();
        let send_now = {
            let mut state = self.lock();
            state.asked.insert(tag, Asked { acker, done });
            !std::mem::replace(&mut state.sending, true)
        };
        if send_now {
            self.send_all().await;
        }
        sent.await
            .unwrap_or(Ok(false))
            .map_err(|(kind, text)| Error::new(kind, text))
    }

    /// Sends rounds until no ack is asked for. Dropped midway (its caller's
    /// connection is gone), the acks not sent answer as on a closed
    /// channel; a frame already handed to lapin still goes out first, for
    /// lapin sends in the order asked.
    async fn send_all(&self) {
        let mut stop = StopSending {
            batch: self,
            finished: false,
        };
        loop {
            let (plan, mut asked) = {
                let mut state = self.lock();
                if state.asked.is_empty() {
                    state.sending = false;
                    stop.finished = true;
                    return;
                }
                let state = &mut *state;
                let tags = state.asked.keys().copied().collect();
                let plan = plan(&mut state.unsettled, &tags);
                (plan, std::mem::take(&mut state.asked))
            };
            if let Some((last, tags)) = plan.run {
                let multiple = BasicAckOptions { multiple: true };
                let sent = send(&asked[&last].acker, multiple).await;
                for tag in tags {
                    if let Some(waiter) = asked.remove(&tag) {
                        let _ = waiter.done.send(sent.clone());
                    }
                }
            }
            for tag in plan.singles {
                if let Some(waiter) = asked.remove(&tag) {
                    let sent = send(&waiter.acker, BasicAckOptions::default()).await;
                    let _ = waiter.done.send(sent);
                }
            }
        }
    }
}

async fn send(acker: &lapin::Acker, options: BasicAckOptions) -> Sent {
    acker.ack(options).await.map_err(|error| {
        let error = amqp_error("ack", error);
        (error.kind(), error.to_string())
    })
}

/// Leaves the sending state when [`AckBatch::send_all`] is dropped midway,
/// answering the acks still asked for as on a closed channel (the broker
/// redelivers them when it closes), so none waits for a sender that is gone.
struct StopSending<'a> {
    batch: &'a AckBatch,
    finished: bool,
}

impl Drop for StopSending<'_> {
    fn drop(&mut self) {
        if self.finished {
            return;
        }
        let mut state = self.batch.lock();
        state.sending = false;
        state.asked.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn planned(unsettled: &[u64], asked: &[u64]) -> (Plan, BTreeSet<u64>) {
        let mut unsettled = unsettled.iter().copied().collect();
        let asked = asked.iter().copied().collect();
        (plan(&mut unsettled, &asked), unsettled)
    }

    #[test]
    fn the_run_at_the_head_goes_as_one_multiple_ack() {
        let (plan, left) = planned(&[1, 2, 3, 4, 5], &[1, 2, 3, 5]);
        assert_eq!(plan.run, Some((3, vec![1, 2, 3])));
        assert_eq!(plan.singles, vec![5], "4 is held: 5 goes alone");
        assert_eq!(left, BTreeSet::from([4]));
    }

    #[test]
    fn a_held_head_stops_every_run() {
        let (plan, left) = planned(&[1, 2, 3], &[2, 3]);
        assert_eq!(plan.run, None, "a multiple ack of 3 would ack 1");
        assert_eq!(plan.singles, vec![2, 3]);
        assert_eq!(left, BTreeSet::from([1]));
    }

    #[test]
    fn one_ack_alone_is_a_single() {
        let (plan, left) = planned(&[7, 8], &[7]);
        assert_eq!(plan.run, None);
        assert_eq!(plan.singles, vec![7]);
        assert_eq!(left, BTreeSet::from([8]));
    }

    #[test]
    fn a_tag_not_seen_goes_alone_beside_a_run() {
        let (plan, _) = planned(&[4, 5], &[1, 4, 5]);
        assert_eq!(plan.run, Some((5, vec![4, 5])));
        assert_eq!(plan.singles, vec![1]);
    }
}
