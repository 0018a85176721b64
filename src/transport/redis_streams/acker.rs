//! Settling: what one subscription shares with the deliveries it hands out,
//! and the acker of each delivery.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chrono::Utc;
use redis::RedisResult;
use redis::streams::{StreamId, StreamPendingCountReply};
use tokio::sync::{OwnedSemaphorePermit, mpsc, oneshot};

use super::dlq::{
    DLQ_AT, DLQ_ATTEMPTS, DLQ_GROUP, DLQ_LAST_ERROR, DLQ_REASON, DLQ_SOURCE_ID, DLQ_TOPIC,
};
use super::fields::{append_message_fields, message_from_fields, value_text};
use super::lease::{AckRequest, DEAD_LETTER_SCRIPT, GiveBack, Held, lease_lost};
use super::{Conn, FIELD_REDRIVE_GROUP, RedisStreamsTransport, lock};
use crate::error::{Error, ErrorKind};
use crate::transport::delay::DelayQueue;
use crate::transport::redis_error::redis_error;
use crate::transport::{Acker, DeadLetter, RawMessage};

/// What one subscription shares with its ackers and its keeper.
pub(super) struct Group {
    pub(super) transport: RedisStreamsTransport,
    pub(super) topic: Arc<str>,
    pub(super) group: Arc<str>,
    /// To the keeper, which batches acks (see `lease`). Bounded: each
    /// request comes from a delivery holding a prefetch permit, so at most
    /// `prefetch` wait; the capacity is only a second line.
    pub(super) acks: mpsc::Sender<AckRequest>,
    pub(super) consumer: String,
    pub(super) stream: String,
    pub(super) dlq: String,
    /// Every id the subscription holds; the keeper renews their leases.
    pub(super) held: Held,
    /// Nacked entries waiting out their delay, each with its permit.
    pub(super) delays: DelayQueue<Nacked>,
}

/// A nacked entry waiting to be read again.
pub(super) struct Nacked {
    pub(super) id: String,
    pub(super) attempt: u32,
    pub(super) delivery_count: u32,
    pub(super) permit: OwnedSemaphorePermit,
}

/// An entry read for this subscription, not yet handed out. It holds its
/// prefetch permit from the moment it was asked for.
pub(super) struct Entry {
    pub(super) id: String,
    pub(super) attempt: u32,
    pub(super) delivery_count: u32,
    pub(super) message: RawMessage,
    /// Why it cannot be handed out (it is dead-lettered instead).
    pub(super) problem: Option<String>,
    /// Redriven for another group: acknowledged unseen.
    pub(super) foreign: bool,
    pub(super) permit: OwnedSemaphorePermit,
}

impl Group {
    pub(super) fn entry(
        &self,
        stream_id: StreamId,
        attempt: u32,
        delivery_count: u32,
        permit: OwnedSemaphorePermit,
    ) -> Entry {
        let foreign = stream_id
            .map
            .get(FIELD_REDRIVE_GROUP)
            .and_then(value_text)
            .is_some_and(|group| *group != *self.group);
        let (message, problem) = message_from_fields(stream_id.map);
        lock(&self.held).insert(stream_id.id.clone());
        Entry {
            id: stream_id.id,
            attempt,
            delivery_count,
            message,
            problem,
            foreign,
            permit,
        }
    }

    pub(super) fn conn(&self) -> Conn {
        self.transport.conn()
    }

    pub(super) fn claim_idle_ms(&self) -> u64 {
        self.transport.inner.config.claim_idle.as_millis() as u64
    }

    /// Acks `id` together with whatever other acks of this subscription
    /// are waiting; returns once Redis acknowledged it.
    pub(super) async fn ack(&self, id: String) -> Result<(), Error> {
        let closed = || Error::closed("redis-streams subscription");
        let (reply, replied) = oneshot::channel();
        self.acks.send((id, reply)).await.map_err(|_| closed())?;
        replied.await.map_err(|_| closed())?
    }

    /// Adds the entry to the dead-letter stream and acknowledges it, in one
    /// script, if it is still pending for this consumer.
    pub(super) async fn dead_letter(
        &self,
        id: &str,
        message: &RawMessage,
        letter: &DeadLetter,
        attempt: u32,
    ) -> Result<(), Error> {
        let mut fields = redis::cmd("XADD");
        append_message_fields(&mut fields, message);
        fields
            .arg(DLQ_TOPIC)
            .arg(&*self.topic)
            .arg(DLQ_GROUP)
            .arg(&*self.group)
            .arg(DLQ_REASON)
            .arg(letter.reason())
            .arg(DLQ_ATTEMPTS)
            .arg(letter.attempts().unwrap_or(attempt))
            .arg(DLQ_AT)
            .arg(Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
            .arg(DLQ_SOURCE_ID)
            .arg(id);
        if let Some(last_error) = letter.last_error() {
            fields.arg(DLQ_LAST_ERROR).arg(last_error);
        }
        let mut invocation = DEAD_LETTER_SCRIPT.key(&self.stream);
        invocation
            .key(&self.dlq)
            .arg(&*self.group)
            .arg(&self.consumer)
            .arg(id);
        // The first argument is the command's own name.
        for arg in fields.args_iter().skip(1) {
            if let redis::Arg::Simple(bytes) = arg {
                invocation.arg(bytes);
            }
        }
        let moved: i64 = invocation
            .invoke_async(&mut self.conn())
            .await
            .map_err(|error| redis_error("dead-letter (XADD + XACK)", error))?;
        lock(&self.held).remove(id);
        if moved == 1 {
            Ok(())
        } else {
            Err(lease_lost(id))
        }
    }

    /// Keeps `entries` pending but marks them idle for `idle_ms`, so any
    /// member's next `XAUTOCLAIM` with `claim_idle` takes them once
    /// `claim_idle - idle_ms` has passed; forgets them here.
    pub(super) async fn give_back(&self, entries: &[GiveBack], idle_ms: u64) {
        if entries.is_empty() {
            return;
        }
        {
            let mut held = lock(&self.held);
            for entry in entries {
                held.remove(&entry.id);
            }
        }
        if let Err(error) = self.give_back_owned(entries, idle_ms).await {
            tracing::warn!(
                stream = %self.stream,
                group = %self.group,
                %error,
                "cannot hand entries back; they are reclaimed after claim_idle",
            );
        }
    }

    /// Delivery counters of this consumer's pending entries between `first`
    /// and `last`.
    pub(super) async fn delivery_counts(
        &self,
        first: &str,
        last: &str,
        count: usize,
    ) -> RedisResult<Vec<(String, u32)>> {
        let reply: StreamPendingCountReply = redis::cmd("XPENDING")
            .arg(&self.stream)
            .arg(&*self.group)
            .arg(first)
            .arg(last)
            .arg(count)
            .arg(&self.consumer)
            .query_async(&mut self.conn())
            .await?;
        Ok(reply
            .ids
            .into_iter()
            .map(|pending| (pending.id, pending.times_delivered as u32))
            .collect())
    }

    /// Hands a nacked entry back for good: the subscription stopped during
    /// its delay. Any member may take it once the rest of the delay passed.
    pub(super) async fn give_back_nacked(&self, nacked: Nacked, left: Duration) {
        let idle = self.claim_idle_ms().saturating_sub(left.as_millis() as u64);
        // A nack is an outcome: the delivery counter must not count it.
        let entry = GiveBack::settled(nacked.id, nacked.delivery_count);
        self.give_back(&[entry], idle).await;
        drop(nacked.permit);
    }
}

/// Whether a settle leaves the entry no longer this consumer's: it worked,
/// or another member had taken the entry over (`Rejected`).
fn done_with(settled: &Result<(), Error>) -> bool {
    settled
        .as_ref()
        .map_or_else(|error| error.kind() == ErrorKind::Rejected, |()| true)
}

pub(super) struct RedisAcker {
    pub(super) group: Arc<Group>,
    pub(super) id: String,
    pub(super) attempt: u32,
    pub(super) delivery_count: u32,
    /// Held until the delivery is settled for good or handed back; counts
    /// it against the prefetch (through a nack's delay too).
    pub(super) permit: Option<OwnedSemaphorePermit>,
}

#[async_trait]
impl Acker for RedisAcker {
    async fn ack(&mut self, _message: &RawMessage) -> Result<(), Error> {
        let acked = self.group.ack(self.id.clone()).await;
        if done_with(&acked) {
            // Ours no more either way.
            self.permit = None;
        }
        acked
    }

    /// No command at all: the entry stays pending for this consumer, its
    /// lease renewed by the keeper, and waits in the subscription's timer
    /// queue with its permit.
    async fn nack(&mut self, _message: &RawMessage, delay: Duration) -> Result<(), Error> {
        let Some(permit) = self.permit.take() else {
            return Err(Error::closed("redis-streams delivery"));
        };
        let nacked = Nacked {
            id: self.id.clone(),
            attempt: self.attempt,
            delivery_count: self.delivery_count,
            permit,
        };
        if let Err(nacked) = self.group.delays.push(delay, nacked) {
            // The subscription is stopping: hand it back instead.
            self.group.give_back_nacked(nacked, delay).await;
        }
        Ok(())
    }

    async fn dead_letter(
        &mut self,
        message: &RawMessage,
        letter: &DeadLetter,
    ) -> Result<(), Error> {
        let moved = self
            .group
            .dead_letter(&self.id, message, letter, self.attempt)
            .await;
        if done_with(&moved) {
            self.permit = None;
        }
        moved
    }

    fn abandoned(&mut self, _message: RawMessage) {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let Some(permit) = self.permit.take() else {
            return;
        };
        let group = self.group.clone();
        // Handed out and dropped unsettled: the next delivery counts one more.
        let entry = [GiveBack::abandoned(std::mem::take(&mut self.id))];
        // The permit is released only once the entry is handed back, so a
        // drained subscription has handed back everything.
        runtime.spawn(async move {
            group.give_back(&entry, group.claim_idle_ms()).await;
            drop(permit);
        });
    }
}
