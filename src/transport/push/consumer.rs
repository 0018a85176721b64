//! The receiving side of a push transport: requests come in from the network
//! and wait here until a subscriber's handler settles them.
//!
//! Everything here is bounded. Per group, the queue holds at most the
//! inbox's capacity of requests (a bounded channel; one more is refused at
//! once), and each subscription holds at most its prefetch of them
//! (semaphore permits). Each request carries a oneshot reply, so the replies
//! are bounded by the requests: at most one per queued or held request, and
//! none for a refused one.

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::mpsc::error::TrySendError;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot};

use crate::error::{Error, ErrorKind};
use crate::observe::metrics;
use crate::transport::delivery::Prefetch;
use crate::transport::{
    Acker, DeadLetter, Delivery, RawMessage, SubscribeOptions, Subscription, validate_name,
};

/// Where pushed messages wait for subscribers: the shared state behind a push
/// transport's receiver (the gRPC service or the webhook router).
///
/// [`deliver`](Inbox::deliver) hands a message to each group subscribed to
/// its topic and resolves once every one of them has settled it. Clones share
/// the same subscriptions.
///
/// Each group's queue holds at most [`capacity`](Inbox::capacity) messages
/// that no subscription has taken yet; a message that finds it full is
/// refused at once (a [`QueueFull`] error) instead of waiting.
///
/// ```
/// use switchboard::transport::push::Inbox;
/// use switchboard::{ErrorKind, RawMessage, SubscribeOptions};
///
/// # tokio::runtime::Runtime::new().unwrap().block_on(async {
/// let inbox = Inbox::new("example");
/// let mut subscription = inbox.subscribe("price.updated", SubscribeOptions::new("game"))?;
/// let handler = tokio::spawn(async move {
///     let delivery = subscription.recv().await.expect("a message");
///     delivery.ack().await.map_err(switchboard::Error::from)
/// });
/// // Resolves once the handler above has acked.
/// inbox.deliver("price.updated", None, RawMessage::new("AAPL 150"), 1).await?;
/// handler.await.unwrap()?;
///
/// let error = inbox.deliver("nobody.listens", None, RawMessage::new("x"), 1).await.unwrap_err();
/// assert_eq!(error.kind(), ErrorKind::Unavailable);
/// # Ok::<(), switchboard::Error>(())
/// # }).unwrap();
/// ```
#[derive(Clone)]
pub struct Inbox {
    inner: Arc<Inner>,
}

struct Inner {
    transport: &'static str,
    capacity: usize,
    topics: Mutex<HashMap<String, Groups>>,
}

/// A topic's groups at this receiver.
type Groups = HashMap<Arc<str>, Arc<GroupQueue>>;

/// One group's queue at this receiver; its members take turns on it. The
/// channel is bounded by the inbox's capacity.
struct GroupQueue {
    topic: Arc<str>,
    name: Arc<str>,
    sender: mpsc::Sender<Pending>,
    receiver: tokio::sync::Mutex<mpsc::Receiver<Pending>>,
    members: AtomicUsize,
}

/// A request waiting for a handler.
struct Pending {
    message: RawMessage,
    attempt: u32,
    reply: oneshot::Sender<Answer>,
}

/// How a handler settled a pushed message: what the receiver answers. A
/// dropped reply sender means the delivery was abandoned.
enum Answer {
    Ack,
    Nack(Duration),
    /// This member cannot read it (an unknown major version): the publisher
    /// sends it again, maybe to a newer replica.
    GiveBack(String),
    /// Refused for good: the publisher must not send it again.
    Reject(DeadLetter),
}

impl Inbox {
    /// An inbox with no subscriptions and the default capacity
    /// ([`DEFAULT_QUEUE_CAPACITY`](super::DEFAULT_QUEUE_CAPACITY));
    /// `transport` names the transport in errors and metrics.
    pub fn new(transport: &'static str) -> Self {
        Self::build(transport, super::DEFAULT_QUEUE_CAPACITY)
    }

    /// An inbox whose groups each keep at most `capacity` messages waiting
    /// for a subscription; [`ErrorKind::Config`] when `capacity` is 0.
    ///
    /// ```
    /// use switchboard::transport::push::{Inbox, QueueFull};
    /// use switchboard::{ErrorKind, RawMessage, SubscribeOptions};
    ///
    /// # tokio::runtime::Runtime::new().unwrap().block_on(async {
    /// let inbox = Inbox::with_capacity("example", 1)?;
    /// assert_eq!(inbox.capacity(), 1);
    /// let _subscription = inbox.subscribe("price.updated", SubscribeOptions::new("game"))?;
    /// // Nothing takes messages from the subscription, so the first one
    /// // waits in the group's queue and fills it...
    /// let first = inbox.deliver("price.updated", None, RawMessage::new("1"), 1);
    /// tokio::pin!(first);
    /// assert!(futures_util::poll!(first.as_mut()).is_pending());
    /// // ...and the next is refused at once, asking to be sent again later.
    /// let error = inbox.deliver("price.updated", None, RawMessage::new("2"), 1).await.unwrap_err();
    /// assert_eq!(error.kind(), ErrorKind::Unavailable);
    /// assert_eq!(QueueFull::of(&error).unwrap().group(), "game");
    /// assert!(error.requeue_after().is_some());
    ///
    /// assert_eq!(Inbox::with_capacity("example", 0).unwrap_err().kind(), ErrorKind::Config);
    /// # Ok::<(), switchboard::Error>(())
    /// # }).unwrap();
    /// ```
    pub fn with_capacity(transport: &'static str, capacity: usize) -> Result<Self, Error> {
        validate_capacity(capacity)?;
        Ok(Self::build(transport, capacity))
    }

    fn build(transport: &'static str, capacity: usize) -> Self {
        Self {
            inner: Arc::new(Inner {
                transport,
                // tokio's bounded channel takes at most this many.
                capacity: capacity.min(Semaphore::MAX_PERMITS),
                topics: Mutex::default(),
            }),
        }
    }

    /// How many messages each group's queue keeps waiting at most.
    pub fn capacity(&self) -> usize {
        self.inner.capacity
    }

    /// Hands `message` to `group` (or, with `None`, to every group subscribed
    /// to `topic`) and waits until each has settled it.
    ///
    /// `Ok` once all acked. [`ErrorKind::Rejected`] (not retryable) when
    /// one rejected it for good, naming its reason and last error — even if
    /// others acked. [`ErrorKind::Unavailable`] when none subscribes,
    /// when one nacked (with [`Error::requeue_after`] set to the nack's
    /// delay), when one gave it back or dropped it unsettled, or at once when a group's
    /// queue is full (with [`QueueFull`] as the source, checked with
    /// [`QueueFull::of`], and [`QUEUE_FULL_RETRY_AFTER`] as
    /// `requeue_after`; no group gets the message then);
    /// [`ErrorKind::Rejected`] for an invalid topic or group name.
    pub async fn deliver(
        &self,
        topic: &str,
        group: Option<&str>,
        message: RawMessage,
        attempt: u32,
    ) -> Result<(), Error> {
        validate_name("topic", topic)?;
        if let Some(group) = group {
            validate_name("group", group)?;
        }
        let queues = self.queues(topic, group);
        if queues.is_empty() {
            let whom = group.map_or_else(
                || "no group".to_owned(),
                |g| format!("group {g:?} does not"),
            );
            return Err(Error::new(
                ErrorKind::Unavailable,
                format!("{whom} subscribes to topic {topic:?} at this receiver"),
            ));
        }
        let attempt = attempt.max(1);
        // A place in every group's queue first, so that either all of them
        // get the message or none does.
        let mut places = Vec::with_capacity(queues.len());
        for queue in &queues {
            match queue.sender.try_reserve() {
                Ok(place) => places.push((queue, place)),
                Err(TrySendError::Full(())) => return Err(self.refuse(queue)),
                // The queue owns its receiver, so it cannot close while we
                // hold it; were it closed, the group has gone.
                Err(TrySendError::Closed(())) => {
                    return Err(Error::new(
                        ErrorKind::Unavailable,
                        format!("group {:?} stopped subscribing", queue.name),
                    ));
                }
            }
        }
        let mut replies = Vec::with_capacity(places.len());
        let mut message = Some(message);
        let last = places.len() - 1;
        for (index, (queue, place)) in places.into_iter().enumerate() {
            // Every group but the last gets a copy; the last takes the message.
            let message = if index == last {
                message.take().unwrap_or_default()
            } else {
                message.clone().unwrap_or_default()
            };
            let (reply, answer) = oneshot::channel();
            place.send(Pending {
                message,
                attempt,
                reply,
            });
            replies.push((queue.name.clone(), answer));
        }
        drop(queues);
        // Every group answers; a rejection wins (nothing would change it),
        // then a drop, a give-back, and the longest nack.
        let mut longest_nack = None;
        let mut again = None;
        let mut rejected = None;
        for (group, answer) in replies {
            match answer.await {
                Ok(Answer::Ack) => {}
                Ok(Answer::Nack(delay)) => {
                    longest_nack = Some(longest_nack.unwrap_or(Duration::ZERO).max(delay));
                }
                Ok(Answer::GiveBack(reason)) => {
                    again.get_or_insert(format!(
                        "group {group:?} gave the message back: {reason}; send it again"
                    ));
                }
                Ok(Answer::Reject(letter)) => {
                    rejected.get_or_insert((group, letter));
                }
                Err(_) => {
                    again = Some(format!(
                        "group {group:?} dropped the message without settling it"
                    ));
                }
            }
        }
        if let Some((group, letter)) = rejected {
            return Err(rejection(&group, &letter));
        }
        if let Some(message) = again {
            return Err(Error::new(ErrorKind::Unavailable, message));
        }
        match longest_nack {
            None => Ok(()),
            Some(delay) => Err(Error::new(
                ErrorKind::Unavailable,
                format!("the subscriber nacked the message; send it again after {delay:?}"),
            )
            .with_requeue(delay)),
        }
    }

    /// Counts and explains a refusal because `queue` is full.
    fn refuse(&self, queue: &GroupQueue) -> Error {
        let capacity = self.inner.capacity;
        metrics::push_refused(self.inner.transport, queue.topic.clone());
        tracing::debug!(
            topic = %queue.topic,
            group = %queue.name,
            capacity,
            "push refused: the group's queue is full"
        );
        Error::new(
            ErrorKind::Unavailable,
            format!(
                "group {:?} already has {capacity} messages of topic {:?} waiting at this \
                 receiver; send it again after {QUEUE_FULL_RETRY_AFTER:?}",
                queue.name, queue.topic
            ),
        )
        .with_requeue(QUEUE_FULL_RETRY_AFTER)
        .with_source(QueueFull {
            topic: queue.topic.clone(),
            group: queue.name.clone(),
            capacity,
        })
    }

    /// Starts receiving `topic` for `options.group`. Live at once: a message
    /// delivered after this returns reaches it.
    pub fn subscribe(&self, topic: &str, options: SubscribeOptions) -> Result<Subscription, Error> {
        validate_name("topic", topic)?;
        options.validate()?;
        let queue = self.join(topic, &options.group);
        let prefetch = Prefetch::new(options.prefetch);
        let member = Member {
            inbox: self.clone(),
            queue: queue.clone(),
            permits: prefetch.permits().clone(),
        };
        let deliveries = futures_util::stream::unfold(member, |member| async move {
            let delivery = member.next().await?;
            Some((delivery, member))
        });
        let drain = async move { prefetch.drained().await };
        Ok(Subscription::new(
            queue.topic.clone(),
            queue.name.clone(),
            deliveries,
            drain,
        ))
    }

    fn queues(&self, topic: &str, group: Option<&str>) -> Vec<Arc<GroupQueue>> {
        let topics = lock(&self.inner.topics);
        let Some(groups) = topics.get(topic) else {
            return Vec::new();
        };
        match group {
            Some(group) => groups.get(group).cloned().into_iter().collect(),
            None => groups.values().cloned().collect(),
        }
    }

    fn join(&self, topic: &str, group: &str) -> Arc<GroupQueue> {
        let mut topics = lock(&self.inner.topics);
        let queue = topics
            .entry(topic.to_owned())
            .or_default()
            .entry(group.into())
            .or_insert_with(|| {
                let (sender, receiver) = mpsc::channel(self.inner.capacity);
                Arc::new(GroupQueue {
                    topic: topic.into(),
                    name: group.into(),
                    sender,
                    receiver: tokio::sync::Mutex::new(receiver),
                    members: AtomicUsize::new(0),
                })
            })
            .clone();
        queue.members.fetch_add(1, Ordering::SeqCst);
        queue
    }

    /// The last member of a group leaving takes the group out of the table,
    /// so later requests are answered UNAVAILABLE at once instead of waiting
    /// for a member that may never come; requests already queued are
    /// dropped with the queue, which answers them UNAVAILABLE too.
    fn leave(&self, queue: &Arc<GroupQueue>) {
        let mut topics = lock(&self.inner.topics);
        if queue.members.fetch_sub(1, Ordering::SeqCst) != 1 {
            return;
        }
        if let Some(groups) = topics.get_mut(&*queue.topic) {
            if groups
                .get(&queue.name)
                .is_some_and(|current| Arc::ptr_eq(current, queue))
            {
                groups.remove(&queue.name);
            }
            if groups.is_empty() {
                topics.remove(&*queue.topic);
            }
        }
    }
}

impl fmt::Debug for Inbox {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let topics = lock(&self.inner.topics);
        f.debug_struct("Inbox")
            .field("transport", &self.inner.transport)
            .field("capacity", &self.inner.capacity)
            .field("topics", &topics.len())
            .finish()
    }
}

/// How long a receiver whose queue is full asks the publisher to wait before
/// it sends the message again (`grpc-retry-pushback-ms`, or `Retry-After`
/// and `switchboard-retry-after-ms`).
pub const QUEUE_FULL_RETRY_AFTER: Duration = Duration::from_millis(100);

/// Why [`Inbox::deliver`] refused a message at once: the group's queue
/// already held [`Inbox::capacity`] messages. It is the refusal's
/// [`source`](std::error::Error::source); the handlers never saw the
/// message, so sending it again later is safe.
///
/// ```
/// use switchboard::Error;
/// use switchboard::transport::push::QueueFull;
///
/// assert!(QueueFull::of(&Error::transient("nacked")).is_none());
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueFull {
    topic: Arc<str>,
    group: Arc<str>,
    capacity: usize,
}

impl QueueFull {
    /// The refusal behind `error`, when it is one.
    pub fn of(error: &Error) -> Option<&QueueFull> {
        std::error::Error::source(error)?.downcast_ref()
    }

    /// The topic of the refused message.
    pub fn topic(&self) -> &str {
        &self.topic
    }

    /// The group whose queue was full.
    pub fn group(&self) -> &str {
        &self.group
    }

    /// How many messages the queue holds at most.
    pub fn capacity(&self) -> usize {
        self.capacity
    }
}

impl fmt::Display for QueueFull {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "the queue of group {:?} for topic {:?} is full ({} waiting)",
            self.group, self.topic, self.capacity
        )
    }
}

impl std::error::Error for QueueFull {}

/// Refuses a queue capacity of 0 with an [`ErrorKind::Config`] error.
pub(super) fn validate_capacity(capacity: usize) -> Result<(), Error> {
    if capacity == 0 {
        return Err(Error::new(
            ErrorKind::Config,
            "push config: queue_capacity must be at least 1",
        ));
    }
    Ok(())
}

/// One subscription's side of a group queue; leaves the group when dropped.
struct Member {
    inbox: Inbox,
    queue: Arc<GroupQueue>,
    permits: Arc<Semaphore>,
}

impl Member {
    async fn next(&self) -> Option<Delivery> {
        loop {
            let permit = self.permits.clone().acquire_owned().await.ok()?;
            let pending = self.queue.receiver.lock().await.recv().await?;
            // A publisher that gave up (timed out) no longer waits: skip it,
            // it will send the message again.
            if pending.reply.is_closed() {
                continue;
            }
            let acker = PushAcker {
                transport: self.inbox.inner.transport,
                reply: Some(pending.reply),
                _permit: permit,
            };
            return Some(Delivery::new(
                pending.message,
                self.queue.topic.clone(),
                self.queue.name.clone(),
                pending.attempt,
                Box::new(acker),
            ));
        }
    }
}

impl Drop for Member {
    fn drop(&mut self) {
        self.inbox.leave(&self.queue);
    }
}

/// The error a receiver answers when `group`'s handler refused the message
/// for good: not retryable, naming the reason (and the last error).
fn rejection(group: &str, letter: &DeadLetter) -> Error {
    let mut message = format!(
        "group {group:?} rejected the message for good: {}",
        letter.reason()
    );
    if let Some(last_error) = letter.last_error() {
        message.push_str(&format!(" (last error: {last_error})"));
    }
    if let Some(attempts) = letter.attempts() {
        message.push_str(&format!(" after {attempts} attempt(s)"));
    }
    Error::new(ErrorKind::Rejected, message)
}

/// Settles a pushed message by answering the waiting request.
struct PushAcker {
    transport: &'static str,
    reply: Option<oneshot::Sender<Answer>>,
    /// Held until the delivery is settled or dropped; counts it as in flight.
    _permit: OwnedSemaphorePermit,
}

impl PushAcker {
    fn answer(&mut self, outcome: Answer) -> Result<(), Error> {
        let reply = self
            .reply
            .take()
            .ok_or_else(|| Error::new(ErrorKind::Rejected, "the delivery is already settled"))?;
        if reply.send(outcome).is_err() {
            // The publisher stopped waiting (its timeout) and will send the
            // message again; there is no one left to tell.
            tracing::debug!("push publisher no longer waits for this answer");
        }
        Ok(())
    }
}

#[async_trait]
impl Acker for PushAcker {
    async fn ack(&mut self, _message: &RawMessage) -> Result<(), Error> {
        self.answer(Answer::Ack)
    }

    async fn nack(&mut self, _message: &RawMessage, delay: Duration) -> Result<(), Error> {
        self.answer(Answer::Nack(delay))
    }

    async fn dead_letter(
        &mut self,
        _message: &RawMessage,
        _letter: &DeadLetter,
    ) -> Result<(), Error> {
        Err(Error::unsupported(self.transport, "keep dead letters"))
    }

    /// Answers the publisher UNAVAILABLE / 503: it sends the message again
    /// (its retry loop is the one retry owner), maybe to a newer replica.
    async fn give_back(&mut self, _message: &RawMessage, reason: &str) -> Result<(), Error> {
        self.answer(Answer::GiveBack(reason.to_owned()))
    }

    /// Answers the publisher with a non-retryable error naming the reason:
    /// there is no queue to keep the message in, and no one may think it
    /// was handled.
    async fn reject(&mut self, _message: &RawMessage, letter: &DeadLetter) -> Result<(), Error> {
        self.answer(Answer::Reject(letter.clone()))
    }

    fn abandoned(&mut self, _message: RawMessage) {
        // Dropping the reply sender answers the request UNAVAILABLE.
        self.reply.take();
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
#[path = "consumer_tests.rs"]
mod tests;
