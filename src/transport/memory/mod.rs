//! The in-memory transport: the whole delivery contract inside one process.
//!
//! It is the embedded default — examples, doctests and unit tests run on it
//! with no broker — and the reference the conformance suite is written
//! against. Each topic keeps one FIFO queue per consumer group; the members
//! of a group compete for its queue. Nothing survives the process.
//!
//! A publish to a topic that no group is declared for and no subscriber has
//! joined is **kept for the first group** the topic gets (by
//! [`Transport::declare`] or a subscribe), as a Redis stream keeps entries
//! for a group that starts at its beginning — never dropped silently. A
//! topic keeps at most [`MemoryTransport::UNROUTED_LIMIT`] such messages;
//! past that a publish is refused with [`ErrorKind::Rejected`] naming the
//! topic, since nobody is coming for them. Declare the [`Topology`] at
//! start-up, as with a broker, so every group gets every message.
//!
//! # Flow control
//!
//! A subscription holds at most `prefetch` messages: in a handler, or nacked
//! and waiting out the delay in the subscription's timer queue (one per
//! subscription, not a task per nack). A nacked message keeps its permit and
//! is handed out again by the same subscription when the delay is over, so
//! a consumer whose dependency is down holds `prefetch` messages instead of
//! walking the backlog; it goes back to its group's queue when the
//! subscription stops. A group's queue holds at most
//! [`MemoryTransport::QUEUE_LIMIT`] messages; past that a publish is refused
//! as retryable. [`MemoryTransport::depth`] is a group's queue depth, also sampled
//! into the `switchboard_consumer_lag` gauge.
//!
//! [`Publisher::publish_at`] keeps a message in one timer queue per
//! transport until its time (at most
//! [`MemoryTransport::SCHEDULED_LIMIT`]), then publishes it like any other;
//! closing or dropping the transport drops what still waits.
//!
//! A message given back ([`Delivery::give_back`]) frees its permit at once
//! and stays out of sight of the whole group for a pause — 10 ms, doubling
//! with each give-back up to 1 s — then joins the back of the group's
//! queue, for whichever member takes it next; so a member that cannot read
//! it never takes it again in a tight loop.

use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::Duration;

use async_trait::async_trait;
use chrono::Utc;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

use super::delay::DelayQueue;
use super::delivery::Prefetch;

use super::{
    Acker, Capabilities, DeadLetter, DeadLetterQueue, DeadLettered, Delivery, DeliveryMode,
    Lifecycle, Publisher, RawMessage, SubscribeOptions, Subscriber, Subscription, Transport,
    TransportHealth, header, validate_name,
};
use crate::error::{Error, ErrorKind};
use crate::observe::metrics;
use crate::topology::Topology;

mod consumer;
mod dlq;
mod schedule;

use consumer::Consumer;

const NAME: &str = "memory";

/// How often a subscription records its group's depth as the lag gauge.
const LAG_EVERY: Duration = Duration::from_secs(1);

/// The in-memory transport. Clones share the same topics.
///
/// ```
/// use switchboard::{MemoryTransport, Publisher, RawMessage, SubscribeOptions, Subscriber};
///
/// # tokio::runtime::Runtime::new().unwrap().block_on(async {
/// let transport = MemoryTransport::new();
/// let mut subscription = transport
///     .subscribe("price.updated", SubscribeOptions::new("game"))
///     .await?;
/// transport.publish("price.updated", RawMessage::new("AAPL 150.00")).await?;
///
/// let delivery = subscription.recv().await.expect("a message");
/// assert_eq!(delivery.body().as_ref(), b"AAPL 150.00");
/// delivery.ack().await?;
/// # Ok::<(), switchboard::Error>(())
/// # }).unwrap();
/// ```
#[derive(Clone, Default)]
pub struct MemoryTransport {
    inner: Arc<Inner>,
}

struct Inner {
    topics: RwLock<HashMap<String, Arc<Topic>>>,
    next_id: AtomicU64,
    lifecycle: Lifecycle,
    /// Messages published with `publish_at`, waiting for their time.
    scheduled: schedule::Scheduled,
}

impl Default for Inner {
    fn default() -> Self {
        Self {
            topics: RwLock::default(),
            next_id: AtomicU64::new(0),
            lifecycle: Lifecycle::new(NAME),
            scheduled: schedule::Scheduled::default(),
        }
    }
}

struct Topic {
    name: Arc<str>,
    groups: RwLock<HashMap<Arc<str>, Arc<GroupQueue>>>,
    /// Published while the topic had no group: for the first group it gets.
    unrouted: Mutex<VecDeque<Entry>>,
    dead_letters: Mutex<VecDeque<DeadLettered>>,
    /// The newest message accepted, for [`Transport::read_latest`].
    latest: Mutex<Option<RawMessage>>,
}

/// One group's queue: what the broker holds for the group. Its members
/// take turns popping, so each message goes to exactly one of them. It
/// holds at most [`MemoryTransport::QUEUE_LIMIT`] published messages.
struct GroupQueue {
    name: Arc<str>,
    entries: Mutex<VecDeque<Entry>>,
    /// Given back by a member that cannot read them, each back in
    /// `entries` at its time (see [`give_back_pause`]).
    parked: Mutex<BinaryHeap<Parked>>,
    /// Woken on every push; a waiting member looks again.
    arrived: Notify,
}

/// A given-back message waiting to be visible to the group again.
struct Parked {
    at: Instant,
    entry: Entry,
}

// `BinaryHeap` is a max-heap: the earliest time (then the oldest id)
// compares greatest.
impl Ord for Parked {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (other.at, other.entry.id).cmp(&(self.at, self.entry.id))
    }
}

impl PartialOrd for Parked {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl PartialEq for Parked {
    fn eq(&self, other: &Self) -> bool {
        (self.at, self.entry.id) == (other.at, other.entry.id)
    }
}

impl Eq for Parked {}

/// How long a message given back for the `times`-th time stays out of
/// sight: 10 ms, doubling, at most 1 s — so a member that cannot read it
/// does not take it again at once, in a loop, while the member that can is
/// busy.
fn give_back_pause(times: u32) -> Duration {
    let doubled = 10u64 << times.saturating_sub(1).min(7);
    Duration::from_millis(doubled.min(1000))
}

struct Entry {
    id: u64,
    message: RawMessage,
    /// How many times it has been handed out so far.
    deliveries: u32,
    /// How many of those ended without an outcome (dropped unsettled).
    unsettled: u32,
}

impl MemoryTransport {
    /// The most messages a topic with no group keeps for the first group
    /// it gets (see the module docs).
    pub const UNROUTED_LIMIT: usize = 10_000;

    /// The most published messages a group's queue holds; a publish that
    /// finds one of the topic's groups full is refused with the retryable
    /// [`ErrorKind::Unavailable`] (its consumers are behind), as a broker
    /// at its length limit refuses one.
    pub const QUEUE_LIMIT: usize = 100_000;

    /// An empty transport.
    pub fn new() -> Self {
        Self::default()
    }

    fn topic(&self, name: &str) -> Option<Arc<Topic>> {
        read(&self.inner.topics).get(name).cloned()
    }

    /// The topic to publish to, created if new. Only a new name is
    /// validated: every topic in the map got there through a checked name
    /// (publish, subscribe, a validated topology), so a known one is valid.
    fn publish_topic(&self, name: &str) -> Result<Arc<Topic>, Error> {
        if let Some(topic) = self.topic(name) {
            return Ok(topic);
        }
        validate_name("topic", name)?;
        Ok(self.topic_or_create(name))
    }

    fn topic_or_create(&self, name: &str) -> Arc<Topic> {
        if let Some(topic) = self.topic(name) {
            return topic;
        }
        write(&self.inner.topics)
            .entry(name.to_owned())
            .or_insert_with(|| {
                Arc::new(Topic {
                    name: name.into(),
                    groups: RwLock::default(),
                    unrouted: Mutex::default(),
                    dead_letters: Mutex::default(),
                    latest: Mutex::default(),
                })
            })
            .clone()
    }

    fn next_id(&self) -> u64 {
        self.inner.next_id.fetch_add(1, Ordering::Relaxed)
    }

    /// A group's queue depth: messages published to `topic` that no member
    /// of `group` has been handed yet (0 for an unknown topic or group).
    ///
    /// ```
    /// use switchboard::{MemoryTransport, Publisher, RawMessage, Topology, Transport};
    ///
    /// # tokio::runtime::Runtime::new().unwrap().block_on(async {
    /// let transport = MemoryTransport::new();
    /// transport.declare(&Topology::new().with_groups("price.updated", ["game"])).await?;
    /// transport.publish("price.updated", RawMessage::new("AAPL 150.00")).await?;
    /// assert_eq!(transport.depth("price.updated", "game"), 1);
    /// # Ok::<(), switchboard::Error>(())
    /// # }).unwrap();
    /// ```
    pub fn depth(&self, topic: &str, group: &str) -> usize {
        self.topic(topic)
            .and_then(|topic| read(&topic.groups).get(group).cloned())
            .map_or(0, |queue| queue.depth())
    }

    /// Hands `messages` to every group of `topic`, or keeps them for the
    /// first group it gets (see the module docs).
    /// Takes an iterator rather than a `Vec` so that a single publish
    /// (`iter::once`) allocates no list for its one message.
    fn enqueue<I>(&self, topic: &Topic, messages: I) -> Result<(), Error>
    where
        I: IntoIterator<Item = RawMessage>,
        I::IntoIter: ExactSizeIterator,
    {
        let messages = messages.into_iter();
        // The read lock is held throughout, so a group created meanwhile
        // (under the write lock) finds every kept message.
        let groups = read(&topic.groups);
        if groups.is_empty() {
            let mut unrouted = lock(&topic.unrouted);
            if unrouted.len() + messages.len() > Self::UNROUTED_LIMIT {
                return Err(Error::new(
                    ErrorKind::Rejected,
                    format!(
                        "memory: topic {:?} has no group and already keeps {} messages for \
                         the first one; declare the topology (or subscribe) first",
                        topic.name,
                        unrouted.len()
                    ),
                ));
            }
            for message in messages {
                unrouted.push_back(Entry::new(self.next_id(), message));
            }
            return Ok(());
        }
        if let Some(full) = groups
            .values()
            .find(|queue| queue.depth() + messages.len() > Self::QUEUE_LIMIT)
        {
            return Err(Error::new(
                ErrorKind::Unavailable,
                format!(
                    "memory: group {:?} of topic {:?} already holds {} messages; \
                     its consumers are behind",
                    full.name,
                    topic.name,
                    full.depth()
                ),
            ));
        }
        for message in messages {
            let id = self.next_id();
            // Every group but the last gets a copy; the last takes the message.
            let mut remaining = groups.len();
            let mut message = Some(message);
            for queue in groups.values() {
                remaining -= 1;
                let message = if remaining == 0 {
                    message.take()
                } else {
                    message.clone()
                };
                if let Some(message) = message {
                    queue.push(Entry::new(id, message));
                }
            }
        }
        Ok(())
    }
}

impl Entry {
    fn new(id: u64, message: RawMessage) -> Self {
        Self {
            id,
            message,
            deliveries: 0,
            unsettled: 0,
        }
    }
}

impl Topic {
    fn group(&self, name: &str) -> Arc<GroupQueue> {
        if let Some(queue) = read(&self.groups).get(name) {
            return queue.clone();
        }
        let mut groups = write(&self.groups);
        let first = groups.is_empty();
        let queue = groups
            .entry(name.into())
            .or_insert_with(|| {
                Arc::new(GroupQueue {
                    name: name.into(),
                    entries: Mutex::default(),
                    parked: Mutex::default(),
                    arrived: Notify::new(),
                })
            })
            .clone();
        if first {
            for entry in lock(&self.unrouted).drain(..) {
                queue.push(entry);
            }
        }
        queue
    }
}

impl GroupQueue {
    /// Puts a message back or in (a nack, a hand-back, a redrive, a
    /// publish already checked against the limit).
    fn push(&self, entry: Entry) {
        lock(&self.entries).push_back(entry);
        // Every waiter looks again: a waiter cancelled after being woken
        // then cannot swallow the wake-up another one needed.
        self.arrived.notify_waiters();
    }

    /// Puts a given-back message out of sight for `pause`; it then joins
    /// the back of the queue.
    fn park(&self, pause: Duration, entry: Entry) {
        let at = Instant::now() + pause;
        lock(&self.parked).push(Parked { at, entry });
        // A waiting member sets its timer for the new one.
        self.arrived.notify_waiters();
    }

    /// Moves the given-back messages whose pause is over to the back of the
    /// queue; returns when the next one is due.
    fn unpark(&self) -> Option<Instant> {
        let mut parked = lock(&self.parked);
        let now = Instant::now();
        let mut due = Vec::new();
        while parked.peek().is_some_and(|next| next.at <= now) {
            due.extend(parked.pop());
        }
        let next = parked.peek().map(|next| next.at);
        drop(parked);
        if !due.is_empty() {
            let mut entries = lock(&self.entries);
            entries.extend(due.into_iter().map(|parked| parked.entry));
        }
        next
    }

    fn depth(&self) -> usize {
        lock(&self.entries).len() + lock(&self.parked).len()
    }

    /// The next message. Cancel-safe: a message is taken out only when
    /// this returns it.
    async fn pop(&self) -> Entry {
        loop {
            let arrived = self.arrived.notified();
            tokio::pin!(arrived);
            // Registered before looking, so a push in between still wakes us.
            arrived.as_mut().enable();
            let next_parked = self.unpark();
            if let Some(entry) = lock(&self.entries).pop_front() {
                return entry;
            }
            match next_parked {
                Some(at) => {
                    tokio::select! {
                        () = arrived => {}
                        () = tokio::time::sleep_until(at) => {}
                    }
                }
                None => arrived.await,
            }
        }
    }
}

#[async_trait]
impl Publisher for MemoryTransport {
    async fn publish(&self, topic: &str, message: RawMessage) -> Result<(), Error> {
        self.inner.lifecycle.check()?;
        let topic = self.publish_topic(topic)?;
        let latest = message.clone();
        self.enqueue(&topic, std::iter::once(message))?;
        *lock(&topic.latest) = Some(latest);
        Ok(())
    }

    async fn publish_batch(&self, topic: &str, messages: Vec<RawMessage>) -> Result<(), Error> {
        self.inner.lifecycle.check()?;
        validate_name("topic", topic)?;
        if messages.is_empty() {
            return Ok(());
        }
        let topic = self.topic_or_create(topic);
        let latest = messages.last().cloned();
        self.enqueue(&topic, messages)?;
        *lock(&topic.latest) = latest;
        Ok(())
    }

    /// Kept in the transport's timer queue (at most
    /// [`SCHEDULED_LIMIT`](MemoryTransport::SCHEDULED_LIMIT)) and published
    /// by one task when due: a few milliseconds late at most, never early.
    async fn publish_at(
        &self,
        topic: &str,
        message: RawMessage,
        at: chrono::DateTime<Utc>,
    ) -> Result<(), Error> {
        self.inner.lifecycle.check()?;
        validate_name("topic", topic)?;
        self.schedule(topic, message, at)
    }
}

#[async_trait]
impl Subscriber for MemoryTransport {
    async fn subscribe(
        &self,
        topic: &str,
        options: SubscribeOptions,
    ) -> Result<Subscription, Error> {
        self.inner.lifecycle.check()?;
        validate_name("topic", topic)?;
        options.validate()?;
        let topic = self.topic_or_create(topic);
        let queue = topic.group(&options.group);
        let prefetch = Prefetch::new(options.prefetch);
        let (topic_name, group_name) = (topic.name.clone(), queue.name.clone());
        let consumer = Consumer::new(topic, queue, prefetch.permits().clone());
        let deliveries = futures_util::stream::unfold(consumer, |consumer| async move {
            let delivery = consumer.next().await?;
            Some((delivery, consumer))
        });
        // Draining means every permit is back: each delivery handed out holds one.
        let drain = async move { prefetch.drained().await };
        let subscription = Subscription::new(topic_name, group_name, deliveries, drain);
        Ok(self.inner.lifecycle.track(subscription))
    }
}

#[async_trait]
impl Transport for MemoryTransport {
    fn name(&self) -> &'static str {
        NAME
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities::new(DeliveryMode::Competing)
            .with_ordered(true)
            .with_redelivers_unacked(true)
            .with_nack(true)
            .with_dead_letter(true)
            .with_scheduled(true)
    }

    async fn declare(&self, topology: &Topology) -> Result<(), Error> {
        self.inner.lifecycle.check()?;
        topology.validate()?;
        for topic in topology.topics() {
            let state = self.topic_or_create(topic);
            for group in topology.groups(topic) {
                state.group(group);
            }
        }
        Ok(())
    }

    fn dead_letters(&self) -> Result<&dyn DeadLetterQueue, Error> {
        Ok(self)
    }

    /// The last message published to the topic (each topic keeps one).
    async fn read_latest(&self, topic: &str) -> Result<Option<RawMessage>, Error> {
        self.inner.lifecycle.check()?;
        validate_name("topic", topic)?;
        Ok(self
            .topic(topic)
            .and_then(|topic| lock(&topic.latest).clone()))
    }

    /// Ends the subscriptions and waits for them; the topics stay readable
    /// through [`depth`](MemoryTransport::depth) and the dead letters.
    async fn close(&self) -> Result<(), Error> {
        self.inner.scheduled.stop();
        self.inner.lifecycle.close(|_| async {}).await
    }

    fn health(&self) -> TransportHealth {
        self.inner.lifecycle.health()
    }

    /// The group's [`depth`](MemoryTransport::depth).
    async fn group_lag(&self, topic: &str, group: &str) -> Result<Option<u64>, Error> {
        Ok(Some(self.depth(topic, group) as u64))
    }

    /// Drops the topics `<namespace>.*` with their queues and dead letters
    /// (subscriptions to them keep their own queue until they end).
    async fn purge_namespace(&self, namespace: &str) -> Result<usize, Error> {
        validate_name("namespace", namespace)?;
        let prefix = format!("{namespace}.");
        let mut topics = write(&self.inner.topics);
        let before = topics.len();
        topics.retain(|name, _| !name.starts_with(&prefix));
        Ok(before - topics.len())
    }
}

impl fmt::Debug for MemoryTransport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let topics = read(&self.inner.topics);
        f.debug_struct("MemoryTransport")
            .field("topics", &topics.keys().collect::<Vec<_>>())
            .finish()
    }
}

// A poisoned lock only means another thread panicked mid-update of plain
// collections; the data is still consistent enough to keep serving.
fn read<T>(lock: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    lock.read().unwrap_or_else(PoisonError::into_inner)
}

fn write<T>(lock: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    lock.write().unwrap_or_else(PoisonError::into_inner)
}

fn lock<T>(lock: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    lock.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_given_back_message_pauses_longer_each_time_up_to_a_second() {
        let pauses: Vec<u64> = (1..=10)
            .map(|times| give_back_pause(times).as_millis() as u64)
            .collect();
        assert_eq!(pauses, [10, 20, 40, 80, 160, 320, 640, 1000, 1000, 1000]);
        assert_eq!(give_back_pause(u32::MAX), Duration::from_secs(1));
    }
}
