//! Consuming: one reader per subscription, which asks Redis for no more
//! entries than it has prefetch permits for (see the module docs, "Flow
//! control").

use std::collections::VecDeque;
use std::future::pending;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use futures_core::future::BoxFuture;
use redis::streams::StreamAutoClaimReply;
use redis::{RedisError, RedisResult, Value};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::acker::{Entry, Group, Nacked, RedisAcker};
use super::ids::stream_id_order;
use super::lease::{Claim, GiveBack, SCRIPT_BATCH, spawn_keeper};
use super::reply::{ReadEntries, StreamEntry};
use super::{Conn, DLQ_SUFFIX, RedisStreamsTransport, ensure_group, lock};
use crate::error::Error;
use crate::transport::delay::DelayQueue;
use crate::transport::delivery::Prefetch;
use crate::transport::{
    DeadLetter, Delivery, SubscribeOptions, Subscriber, Subscription, validate_name,
};

/// Own pending entries re-read per round trip when a subscription starts
/// (fewer when fewer permits are free).
const RECOVER_PAGE: usize = 500;

/// After the stream key: the hash of a stream's given-back entries. `#` is
/// in no topic name, so it never names another topic's stream.
const GIVEN_BACK_SUFFIX: &str = "#given-back";

/// The TTL of the given-back hash: twice the give-back age limit, at least
/// an hour — a record outlives every entry it can still matter for.
fn given_back_ttl(max_age: Duration) -> u64 {
    max_age.saturating_mul(2).as_secs().max(3600)
}

#[async_trait]
impl Subscriber for RedisStreamsTransport {
    async fn subscribe(
        &self,
        topic: &str,
        options: SubscribeOptions,
    ) -> Result<Subscription, Error> {
        self.inner.lifecycle.check()?;
        validate_name("topic", topic)?;
        options.validate()?;
        let stream = self.stream_key(topic);
        self.ensure_group(&stream, &options.group).await?;
        self.ensure_trimmer(topic);
        let blocking = self.blocking_connection().await?;
        let prefetch = Prefetch::new(options.prefetch);
        let prefetch_size = prefetch.size();
        let (acks, ack_requests) = mpsc::channel(prefetch.size().clamp(1, SCRIPT_BATCH));
        let group = Arc::new(Group {
            transport: self.clone(),
            topic: topic.into(),
            acks,
            group: options.group.as_str().into(),
            consumer: self.consumer_name(topic, &options.group),
            dlq: format!("{stream}{DLQ_SUFFIX}"),
            given_back: format!("{stream}{GIVEN_BACK_SUFFIX}"),
            given_back_ttl: given_back_ttl(options.give_back_limit.max_age),
            stream,
            held: Arc::default(),
            delays: DelayQueue::default(),
        });
        spawn_keeper(Arc::downgrade(&group), ack_requests);
        let permits = prefetch.permits().clone();
        let stopping: Arc<Mutex<Option<JoinHandle<()>>>> = Arc::default();
        let mut reader = Reader {
            group: group.clone(),
            blocking,
            client_id: None,
            permits,
            buffer: VecDeque::new(),
            read: None,
            recovery: Some("-".to_owned()),
            next_claim: Instant::now(),
            claim_cursor: "0-0".to_owned(),
            backoff: None,
            stopping: stopping.clone(),
        };
        reader.refresh_client_id().await;
        let deliveries = futures_util::stream::unfold(reader, |mut reader| async move {
            let delivery = reader.next().await?;
            Some((delivery, reader))
        });
        let drain = async move {
            // First what was read but not handed out goes back...
            let task = lock(&stopping).take();
            if let Some(task) = task {
                let _ = task.await;
            }
            // ...then every delivery handed out is settled or dropped.
            prefetch.drained().await
        };
        // Settles are bounded by the prefetch already (each delivery holds
        // its permit until settled), and the keeper sends all acks waiting
        // as one XACK: the consume loop need not hold them back.
        let subscription =
            Subscription::new(group.topic.clone(), group.group.clone(), deliveries, drain)
                .with_settles_in_flight(prefetch_size);
        Ok(self.inner.lifecycle.track(subscription))
    }
}

type ReadFuture = BoxFuture<'static, RedisResult<Option<ReadEntries>>>;

/// A blocking read in flight, with the permits for every entry it may
/// return. Kept across polls: dropping it could lose the entries its reply
/// carries.
struct PendingRead {
    reply: ReadFuture,
    permits: OwnedSemaphorePermit,
}

/// One subscription's reading side: what the [`Subscription`] stream polls.
struct Reader {
    group: Arc<Group>,
    blocking: Conn,
    /// `CLIENT ID` of the blocking connection, to interrupt a read on stop.
    client_id: Option<i64>,
    permits: Arc<Semaphore>,
    /// Read, each with its permit, not yet handed out.
    buffer: VecDeque<Entry>,
    read: Option<PendingRead>,
    /// Where re-reading this consumer's own pending entries goes on;
    /// `None` once done.
    recovery: Option<String>,
    next_claim: Instant,
    claim_cursor: String,
    /// Delays between failed commands in a row; `None` after a success.
    backoff: Option<backon::ExponentialBackoff>,
    /// Set on drop: the task handing back what was held but not handed out.
    stopping: Arc<Mutex<Option<JoinHandle<()>>>>,
}

/// What woke a waiting reader.
enum Woke {
    Read(RedisResult<Option<ReadEntries>>),
    Due(Nacked),
    Nothing,
}

impl Reader {
    async fn next(&mut self) -> Option<Delivery> {
        loop {
            if let Some(entry) = self.buffer.pop_front() {
                if let Some(delivery) = self.hand_out(entry).await {
                    return Some(delivery);
                }
                continue;
            }
            if let Some(nacked) = self.group.delays.try_due() {
                self.reread(nacked).await;
                continue;
            }
            if let Some(after) = self.recovery.clone() {
                match self.take_permits(RECOVER_PAGE) {
                    Some(permits) => match self.recover_own(&after, permits).await {
                        Ok(()) => self.backoff = None,
                        Err(error) => self.failed("re-read own pending entries", error).await,
                    },
                    None => self.wait().await,
                }
                continue;
            }
            let batch = self.group.transport.inner.config.batch;
            if self.read.is_none()
                && Instant::now() >= self.next_claim
                && let Some(permits) = self.take_permits(batch)
            {
                if let Err(error) = self.claim_idle(permits).await {
                    self.failed("XAUTOCLAIM", error).await;
                }
                continue;
            }
            self.wait().await;
        }
    }

    /// Up to `max` free permits at once, or `None` when none is free.
    fn take_permits(&self, max: usize) -> Option<OwnedSemaphorePermit> {
        let free = self.permits.available_permits().min(max);
        if free == 0 {
            return None;
        }
        self.permits
            .clone()
            .try_acquire_many_owned(free as u32)
            .ok()
    }

    /// Starts a blocking read if there are permits for it, then waits for
    /// its reply, a nacked entry coming due, a permit coming free (when no
    /// read could start) or the time to look for idle entries.
    async fn wait(&mut self) {
        if self.read.is_none()
            && self.recovery.is_none()
            && let Some(permits) = self.take_permits(self.group.transport.inner.config.batch)
        {
            self.read = Some(self.start_read(permits));
        }
        // Only a claim still to come is worth a timer: one already due
        // waits for a permit or for the read in flight to end.
        let claim_later = Instant::now() < self.next_claim;
        let (read, group, permits) = (&mut self.read, &self.group, &self.permits);
        let no_read = read.is_none();
        let woke = tokio::select! {
            reply = async {
                match read.as_mut() {
                    Some(read) => (&mut read.reply).await,
                    None => pending().await,
                }
            } => Woke::Read(reply),
            nacked = group.delays.next_due() => Woke::Due(nacked),
            _ = permits.acquire(), if no_read => Woke::Nothing,
            () = tokio::time::sleep_until(self.next_claim), if claim_later => Woke::Nothing,
        };
        match woke {
            Woke::Read(reply) => {
                let read = self.read.take().expect("a read was in flight");
                self.read_done(reply, read.permits).await;
            }
            Woke::Due(nacked) => self.reread(nacked).await,
            Woke::Nothing => {}
        }
    }

    fn start_read(&self, permits: OwnedSemaphorePermit) -> PendingRead {
        let config = &self.group.transport.inner.config;
        let mut cmd = redis::cmd("XREADGROUP");
        cmd.arg("GROUP")
            .arg(&*self.group.group)
            .arg(&self.group.consumer)
            .arg("COUNT")
            .arg(permits.num_permits())
            .arg("BLOCK")
            .arg(config.block.as_millis() as u64)
            .arg("STREAMS")
            .arg(&self.group.stream)
            .arg(">");
        let mut conn = self.blocking.clone();
        PendingRead {
            reply: Box::pin(async move { cmd.query_async(&mut conn).await }),
            permits,
        }
    }

    async fn read_done(
        &mut self,
        reply: RedisResult<Option<ReadEntries>>,
        mut permits: OwnedSemaphorePermit,
    ) {
        match reply {
            Ok(reply) => {
                self.backoff = None;
                let ReadEntries(read) = reply.unwrap_or_default();
                for read in read {
                    // Redis returns at most COUNT entries, one per permit.
                    let Some(permit) = permits.split(1) else {
                        break;
                    };
                    let entry = self.group.entry(read, 1, 1, permit);
                    self.buffer.push_back(entry);
                }
            }
            Err(error) => {
                drop(permits);
                self.failed("XREADGROUP", error).await;
                self.refresh_client_id().await;
            }
        }
    }

    /// Reads a nacked entry again once its delay is over, with its permit
    /// and without raising its delivery counter.
    async fn reread(&mut self, nacked: Nacked) {
        let ids = [nacked.id.clone()];
        match self.group.claim_entries(Claim::Reread, &ids).await {
            Ok(mut found) => match found.pop() {
                Some(id) => {
                    let attempt = nacked.attempt.saturating_add(1);
                    let mut entry =
                        self.group
                            .entry(id, attempt, nacked.delivery_count, nacked.permit);
                    if let Some(given_back) = nacked.given_back {
                        given_back.apply(&mut entry.message);
                    }
                    self.buffer.push_back(entry);
                }
                None => {
                    // Taken over by another member, or deleted: not ours.
                    lock(&self.group.held).remove(&nacked.id);
                }
            },
            Err(error) => {
                tracing::warn!(
                    %error,
                    id = nacked.id,
                    "cannot re-read a nacked entry; it is reclaimed after claim_idle",
                );
                self.group.give_back_nacked(nacked, Duration::ZERO).await;
            }
        }
    }

    /// Re-reads one page of what is still pending for this consumer name:
    /// left by an earlier run under the same name (the `0` read of the Redis
    /// docs, done with XPENDING + XCLAIM so the delivery counters are
    /// known). As many as there are permits, then the next page later.
    async fn recover_own(
        &mut self,
        after: &str,
        mut permits: OwnedSemaphorePermit,
    ) -> RedisResult<()> {
        let page = permits.num_permits();
        let mut counts = self.group.delivery_counts(after, "+", page).await?;
        counts.sort_by_key(|(id, _)| stream_id_order(id));
        self.recovery = match counts.last() {
            Some((last, _)) if counts.len() == page => Some(format!("({last}")),
            _ => None,
        };
        let ids: Vec<String> = counts.iter().map(|(id, _)| id.clone()).collect();
        if ids.is_empty() {
            return Ok(());
        }
        let entries = self.group.claim_entries(Claim::Recover, &ids).await?;
        // The counts were read before the claim raised them.
        self.buffer_claimed(entries, &counts, &mut permits, |before| {
            before.unwrap_or(0).saturating_add(1)
        })
        .await;
        Ok(())
    }

    /// Takes over entries idle for `claim_idle` in any consumer's pending
    /// list (a dead consumer's, or ones handed back) — no more than there
    /// are permits for.
    async fn claim_idle(&mut self, mut permits: OwnedSemaphorePermit) -> RedisResult<()> {
        let config = &self.group.transport.inner.config;
        let reply: StreamAutoClaimReply = redis::cmd("XAUTOCLAIM")
            .arg(&self.group.stream)
            .arg(&*self.group.group)
            .arg(&self.group.consumer)
            .arg(self.group.claim_idle_ms())
            .arg(&self.claim_cursor)
            .arg("COUNT")
            .arg(permits.num_permits())
            .query_async(&mut self.group.conn())
            .await?;
        let more = reply.next_stream_id != "0-0";
        self.claim_cursor = reply.next_stream_id;
        // A full scan is done: wait; more to scan: continue at once.
        self.next_claim = if more {
            Instant::now()
        } else {
            Instant::now() + config.claim_interval()
        };
        let (Some(first), Some(last)) = (reply.claimed.first(), reply.claimed.last()) else {
            return Ok(());
        };
        let held = lock(&self.group.held).len();
        let counts = self
            .group
            .delivery_counts(&first.id, &last.id, reply.claimed.len() + held + 16)
            .await?;
        tracing::info!(
            stream = %self.group.stream,
            group = %self.group.group,
            claimed = reply.claimed.len(),
            "took over idle pending entries",
        );
        let claimed = reply.claimed.into_iter().map(StreamEntry::from).collect();
        self.buffer_claimed(claimed, &counts, &mut permits, |after| after.unwrap_or(1))
            .await;
        Ok(())
    }

    /// Buffers claimed entries, one permit each, with the delivery counter
    /// `count` makes of what `XPENDING` listed for the entry.
    async fn buffer_claimed(
        &mut self,
        claimed: Vec<StreamEntry>,
        pending: &[(String, u32)],
        permits: &mut OwnedSemaphorePermit,
        count: impl Fn(Option<u32>) -> u32,
    ) {
        // Claimed entries may have been given back by a member that could
        // not read them: how often and since when travels with them.
        let ids: Vec<&str> = claimed.iter().map(|id| id.id.as_str()).collect();
        let mut given_back = self.group.given_back_of(&ids).await;
        for id in claimed {
            // Redis returned at most as many as asked for, one per permit.
            let Some(permit) = permits.split(1) else {
                break;
            };
            let listed = pending
                .iter()
                .find(|(pending, _)| *pending == id.id)
                .map(|(_, count)| *count);
            let count = count(listed);
            let given_back = given_back.remove(&id.id);
            let mut entry = self.group.entry(id, count, count, permit);
            if let Some(given_back) = given_back {
                given_back.apply(&mut entry.message);
            }
            self.buffer.push_back(entry);
        }
    }

    /// Turns an entry into a delivery, or settles it here when it must not
    /// reach the handler.
    async fn hand_out(&mut self, entry: Entry) -> Option<Delivery> {
        if entry.foreign {
            if let Err(error) = self.group.ack(entry.key.clone()).await {
                tracing::warn!(%error, id = entry.id, "cannot skip another group's redrive");
                let back = GiveBack::settled(entry.id, entry.delivery_count);
                self.group.give_back(&[back], 0).await;
            }
            return None;
        }
        if let Some(problem) = &entry.problem {
            let letter = DeadLetter::new(problem.clone()).with_attempts(entry.attempt);
            tracing::warn!(
                stream = %self.group.stream,
                id = entry.id,
                reason = problem,
                "dead-lettering an entry that carries no message",
            );
            if let Err(error) = self
                .group
                .dead_letter(&entry.id, &entry.message, &letter, entry.attempt)
                .await
            {
                tracing::warn!(%error, id = entry.id, "dead-letter failed; entry stays pending");
                let back = GiveBack::settled(entry.id, entry.delivery_count);
                self.group.give_back(&[back], 0).await;
            }
            return None;
        }
        let acker = RedisAcker {
            group: self.group.clone(),
            id: entry.id,
            key: entry.key,
            attempt: entry.attempt,
            delivery_count: entry.delivery_count,
            permit: Some(entry.permit),
        };
        Some(
            Delivery::new(
                entry.message,
                self.group.topic.clone(),
                self.group.group.clone(),
                entry.attempt,
                Box::new(acker),
            )
            .with_delivery_count(entry.delivery_count),
        )
    }

    async fn refresh_client_id(&mut self) {
        if self.blocking.is_cluster() {
            return;
        }
        self.client_id = redis::cmd("CLIENT")
            .arg("ID")
            .query_async(&mut self.blocking)
            .await
            .ok();
    }

    /// Logs a failed command and waits a little longer each time in a row
    /// (up to 2 s); a missing group (the stream was deleted, or a server
    /// without persistence restarted) is created again.
    async fn failed(&mut self, what: &str, error: RedisError) {
        if error.code() == Some("NOGROUP") {
            let group = &self.group;
            let start = group.transport.inner.config.group_start;
            if let Err(error) = ensure_group(group.conn(), &group.stream, &group.group, start).await
            {
                tracing::warn!(%error, "cannot create the consumer group again");
            }
        }
        let delay = self
            .backoff
            .get_or_insert_with(read_backoff)
            .next()
            .unwrap_or(Duration::from_secs(2));
        tracing::warn!(
            stream = %self.group.stream,
            group = %self.group.group,
            %error,
            retry_in = ?delay,
            "redis-streams: {what} failed",
        );
        tokio::time::sleep(delay).await;
    }
}

/// 50 ms doubling to 2 s with jitter, for as long as the server is away.
fn read_backoff() -> backon::ExponentialBackoff {
    use backon::BackoffBuilder;
    backon::ExponentialBuilder::new()
        .with_min_delay(Duration::from_millis(50))
        .with_max_delay(Duration::from_secs(2))
        .with_jitter()
        .without_max_times()
        .build()
}

impl Drop for Reader {
    fn drop(&mut self) {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        // Entries and their permits go back together, once handed back.
        let buffered: Vec<Entry> = self.buffer.drain(..).collect();
        let nacked = self.group.delays.close();
        let read = self.read.take();
        let group = self.group.clone();
        let client_id = self.client_id;
        let task = runtime.spawn(async move {
            // None of these reached a handler: their counters are set back.
            let mut unhandled: Vec<GiveBack> = buffered
                .iter()
                .map(|entry| GiveBack::settled(entry.id.clone(), entry.delivery_count))
                .collect();
            if let Some(read) = read {
                if let Some(client_id) = client_id {
                    // Ends the BLOCK now; a reply already on its way still
                    // arrives and is handed back below.
                    let _: RedisResult<Value> = redis::cmd("CLIENT")
                        .arg("UNBLOCK")
                        .arg(client_id)
                        .query_async(&mut group.conn())
                        .await;
                }
                if let Ok(Some(ReadEntries(read))) = read.reply.await {
                    unhandled.extend(read.into_iter().map(|entry| GiveBack::settled(entry.id, 1)));
                }
                drop(read.permits);
            }
            group.give_back(&unhandled, group.claim_idle_ms()).await;
            drop(buffered);
            for (nacked, left) in nacked {
                group.give_back_nacked(nacked, left).await;
            }
        });
        *lock(&self.stopping) = Some(task);
    }
}
