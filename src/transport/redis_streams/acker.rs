//! Settling: what one subscription shares with the deliveries it hands out,
//! and the acker of each delivery.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chrono::Utc;
use redis::RedisResult;
use redis::streams::StreamPendingCountReply;
use tokio::sync::{OwnedSemaphorePermit, mpsc, oneshot};

use super::dlq::{
    DLQ_AT, DLQ_ATTEMPTS, DLQ_GROUP, DLQ_LAST_ERROR, DLQ_REASON, DLQ_SOURCE_ID, DLQ_TOPIC,
};
use super::fields::{append_message_fields, message_from_fields, value_text};
use super::ids::EntryId;
use super::lease::{AckRequest, GiveBack, Held, lease_lost};
use super::reply::StreamEntry;
use super::scripts::{DEAD_LETTER_SCRIPT, GIVE_BACK_TO_GROUP_SCRIPT};
use super::{Conn, FIELD_REDRIVE_GROUP, RedisStreamsTransport, lock};
use crate::error::{Error, ErrorKind};
use crate::observe::metrics;
use crate::transport::delay::DelayQueue;
use crate::transport::redis_support::redis_error;
use crate::transport::{Acker, DeadLetter, RawMessage, header};

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
    /// How often and since when entries were given back to the group
    /// (field `<group> <id>`, value `<times> <first time>`); see
    /// [`Group::give_back_to_group`].
    pub(super) given_back: String,
    /// The TTL each give-back renews on `given_back`, in seconds: what is
    /// left there of entries settled elsewhere goes once nobody gives back.
    pub(super) given_back_ttl: u64,
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
    /// Its give-back headers, put back on the entry read again.
    pub(super) given_back: Option<GivenBack>,
    pub(super) permit: OwnedSemaphorePermit,
}

/// How often and since when an entry was given back to the group: the
/// values of [`header::GIVEN_BACK`] and [`header::GIVEN_BACK_AT`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct GivenBack {
    pub(super) times: String,
    pub(super) at: String,
}

impl GivenBack {
    /// The headers of `message`, if it was given back.
    pub(super) fn of(message: &RawMessage) -> Option<Self> {
        Some(Self {
            times: message.headers.get(header::GIVEN_BACK)?.clone(),
            at: message.headers.get(header::GIVEN_BACK_AT)?.clone(),
        })
    }

    /// Sets the headers on `message`.
    pub(super) fn apply(self, message: &mut RawMessage) {
        message
            .headers
            .insert(header::GIVEN_BACK.to_owned(), self.times);
        message
            .headers
            .insert(header::GIVEN_BACK_AT.to_owned(), self.at);
    }

    /// The hash value: `<times> <at>` (the time has no space).
    fn value(&self) -> String {
        format!("{} {}", self.times, self.at)
    }

    fn parse(value: &str) -> Option<Self> {
        let (times, at) = value.split_once(' ')?;
        Some(Self {
            times: times.to_owned(),
            at: at.to_owned(),
        })
    }
}

/// An entry read for this subscription, not yet handed out. It holds its
/// prefetch permit from the moment it was asked for.
pub(super) struct Entry {
    pub(super) id: String,
    /// `id` as numbers, parsed once: what is held and acked.
    pub(super) key: EntryId,
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
        stream_entry: StreamEntry,
        attempt: u32,
        delivery_count: u32,
        permit: OwnedSemaphorePermit,
    ) -> Entry {
        let foreign = stream_entry
            .field(FIELD_REDRIVE_GROUP)
            .and_then(value_text)
            .is_some_and(|group| *group != *self.group);
        let StreamEntry { id, fields } = stream_entry;
        let (message, problem) = message_from_fields(fields);
        let key = EntryId::of(&id);
        lock(&self.held).insert(key.clone());
        Entry {
            id,
            key,
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
    pub(super) async fn ack(&self, id: EntryId) -> Result<(), Error> {
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
            .arg(id)
            .arg(self.transport.inner.config.dlq_max_len.unwrap_or(0));
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
        if moved == 2 {
            // Evicting is the price of the bound; say so every time, as a
            // dead letter gone is a message gone.
            tracing::warn!(
                dlq = %self.dlq,
                bound = ?self.transport.inner.config.dlq_max_len,
                "dead-letter stream is at its bound (dlq_max_len): the oldest dead letter was evicted",
            );
            metrics::dead_letter_evicted(super::NAME, self.topic.clone());
        }
        if moved >= 1 {
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

    fn given_back_field(&self, id: &str) -> String {
        format!("{} {id}", self.group)
    }

    /// Gives `id` back to the group (see `GIVE_BACK_TO_GROUP`): pending,
    /// idle for `claim_idle` so the next `XAUTOCLAIM` of any member takes it,
    /// no longer renewed here, its give-back headers kept in the group's
    /// hash for whoever takes it. Returns whether it was still this
    /// consumer's.
    pub(super) async fn give_back_to_group(
        &self,
        id: &str,
        delivery_count: u32,
        given_back: &GivenBack,
    ) -> Result<bool, Error> {
        lock(&self.held).remove(id);
        let given: i64 = GIVE_BACK_TO_GROUP_SCRIPT
            .key(&self.stream)
            .key(&self.given_back)
            .arg(&*self.group)
            .arg(&self.consumer)
            .arg(self.claim_idle_ms())
            .arg(id)
            .arg(delivery_count.saturating_sub(1))
            .arg(self.given_back_field(id))
            .arg(given_back.value())
            .arg(self.given_back_ttl)
            .invoke_async(&mut self.conn())
            .await
            .map_err(|error| redis_error("give back (XCLAIM IDLE)", error))?;
        Ok(given == 1)
    }

    /// The give-back headers recorded for `ids` (those never given back are
    /// missing). A failed look-up only costs the counts: logged, empty.
    pub(super) async fn given_back_of(&self, ids: &[&str]) -> HashMap<String, GivenBack> {
        if ids.is_empty() {
            return HashMap::new();
        }
        let fields: Vec<String> = ids.iter().map(|id| self.given_back_field(id)).collect();
        let reply: RedisResult<Vec<Option<String>>> = redis::cmd("HMGET")
            .arg(&self.given_back)
            .arg(&fields)
            .query_async(&mut self.conn())
            .await;
        match reply {
            Ok(values) => ids
                .iter()
                .zip(values)
                .filter_map(|(id, value)| Some(((*id).to_owned(), GivenBack::parse(&value?)?)))
                .collect(),
            Err(error) => {
                tracing::warn!(stream = %self.stream, %error, "cannot read give-back counts");
                HashMap::new()
            }
        }
    }

    /// Forgets the give-back record of `id`, settled for good.
    async fn forget_given_back(&self, id: &str) {
        let removed: RedisResult<i64> = redis::cmd("HDEL")
            .arg(&self.given_back)
            .arg(self.given_back_field(id))
            .query_async(&mut self.conn())
            .await;
        if let Err(error) = removed {
            tracing::debug!(%error, id, "cannot remove a give-back record; it expires");
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
    pub(super) key: EntryId,
    pub(super) attempt: u32,
    pub(super) delivery_count: u32,
    /// Held until the delivery is settled for good or handed back; counts
    /// it against the prefetch (through a nack's delay too).
    pub(super) permit: Option<OwnedSemaphorePermit>,
}

#[async_trait]
impl Acker for RedisAcker {
    async fn ack(&mut self, message: &RawMessage) -> Result<(), Error> {
        let acked = self.group.ack(self.key.clone()).await;
        if done_with(&acked) {
            // Ours no more either way.
            self.permit = None;
            if acked.is_ok() && GivenBack::of(message).is_some() {
                self.group.forget_given_back(&self.id).await;
            }
        }
        acked
    }

    /// No command at all: the entry stays pending for this consumer, its
    /// lease renewed by the keeper, and waits in the subscription's timer
    /// queue with its permit.
    async fn nack(&mut self, message: &RawMessage, delay: Duration) -> Result<(), Error> {
        let Some(permit) = self.permit.take() else {
            return Err(Error::closed("redis-streams delivery"));
        };
        let nacked = Nacked {
            id: self.id.clone(),
            attempt: self.attempt,
            delivery_count: self.delivery_count,
            given_back: GivenBack::of(message),
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
            if moved.is_ok() && GivenBack::of(message).is_some() {
                self.group.forget_given_back(&self.id).await;
            }
        }
        moved
    }

    /// Left pending, idle for `claim_idle`, so the next `XAUTOCLAIM` of any
    /// member (at most every `claim_every`) takes it; no longer renewed, its
    /// permit freed now. Its delivery counter stays as it was.
    async fn give_back(&mut self, message: &RawMessage, reason: &str) -> Result<(), Error> {
        let Some(given_back) = GivenBack::of(message) else {
            return Err(Error::new(
                ErrorKind::Rejected,
                "redis-streams: give back through Delivery::give_back",
            ));
        };
        // Freed once the entry is handed back, so a drained subscription
        // has handed back everything.
        let Some(_permit) = self.permit.take() else {
            return Err(Error::closed("redis-streams delivery"));
        };
        match self
            .group
            .give_back_to_group(&self.id, self.delivery_count, &given_back)
            .await
        {
            Ok(true) => {
                tracing::debug!(stream = %self.group.stream, id = self.id, reason, "entry given back to the group");
                Ok(())
            }
            // Another member took it over meanwhile: in the group's hands.
            Ok(false) => Ok(()),
            Err(error) => {
                // Not renewed any more, so any member takes it after
                // claim_idle anyway; only this give-back goes uncounted.
                tracing::warn!(%error, id = self.id, "cannot record a give-back; the entry is reclaimed after claim_idle");
                Ok(())
            }
        }
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
