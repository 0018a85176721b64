//! The receiving side of a push transport: requests come in from the network
//! and wait here until a subscriber's handler settles them.

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot};

use crate::error::{Error, ErrorKind};
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
/// ```
/// use switchboard::transport::push::Inbox;
/// use switchboard::{ErrorKind, RawMessage, SubscribeOptions};
///
/// # tokio::runtime::Runtime::new().unwrap().block_on(async {
/// let inbox = Inbox::new("example");
/// let mut subscription = inbox.subscribe("price.updated", SubscribeOptions::new("game"))?;
/// let handler = tokio::spawn(async move {
///     let delivery = subscription.recv().await.expect("a message");
///     delivery.ack().await.map_err(|(error, _)| error)
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
    topics: Mutex<HashMap<String, Groups>>,
}

/// A topic's groups at this receiver.
type Groups = HashMap<Arc<str>, Arc<GroupQueue>>;

/// One group's queue at this receiver; its members take turns on it.
struct GroupQueue {
    topic: Arc<str>,
    name: Arc<str>,
    sender: mpsc::UnboundedSender<Pending>,
    receiver: tokio::sync::Mutex<mpsc::UnboundedReceiver<Pending>>,
    members: AtomicUsize,
}

/// A request waiting for a handler.
struct Pending {
    message: RawMessage,
    attempt: u32,
    reply: oneshot::Sender<Outcome>,
}

/// How a handler settled a pushed message. A dropped reply sender means the
/// delivery was abandoned.
enum Outcome {
    Ack,
    Nack(Duration),
}

impl Inbox {
    /// An inbox with no subscriptions; `transport` names the transport in
    /// errors.
    pub fn new(transport: &'static str) -> Self {
        Self {
            inner: Arc::new(Inner {
                transport,
                topics: Mutex::default(),
            }),
        }
    }

    /// Hands `message` to `group` (or, with `None`, to every group subscribed
    /// to `topic`) and waits until each has settled it.
    ///
    /// `Ok` once all acked. [`ErrorKind::Unavailable`] when none subscribes,
    /// when one nacked (with [`Error::requeue_after`] set to the nack's
    /// delay), or when one dropped it unsettled; [`ErrorKind::Rejected`] for
    /// an invalid topic or group name.
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
        let mut replies = Vec::with_capacity(queues.len());
        let mut message = Some(message);
        for (index, queue) in queues.iter().enumerate() {
            // Every group but the last gets a copy; the last takes the message.
            let message = if index + 1 == queues.len() {
                message.take().unwrap_or_default()
            } else {
                message.clone().unwrap_or_default()
            };
            let (reply, answer) = oneshot::channel();
            // A closed queue drops `reply`, which reads as "abandoned" below.
            let _ = queue.sender.send(Pending {
                message,
                attempt,
                reply,
            });
            replies.push((queue.name.clone(), answer));
        }
        drop(queues);
        let mut longest_nack = None;
        for (group, answer) in replies {
            match answer.await {
                Ok(Outcome::Ack) => {}
                Ok(Outcome::Nack(delay)) => {
                    longest_nack = Some(longest_nack.unwrap_or(Duration::ZERO).max(delay));
                }
                Err(_) => {
                    return Err(Error::new(
                        ErrorKind::Unavailable,
                        format!("group {group:?} dropped the message without settling it"),
                    ));
                }
            }
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

    /// Starts receiving `topic` for `options.group`. Live at once: a message
    /// delivered after this returns reaches it.
    pub fn subscribe(&self, topic: &str, options: SubscribeOptions) -> Result<Subscription, Error> {
        validate_name("topic", topic)?;
        options.validate()?;
        let queue = self.join(topic, &options.group);
        let prefetch = options
            .prefetch
            .min(Semaphore::MAX_PERMITS)
            .min(u32::MAX as usize);
        let permits = Arc::new(Semaphore::new(prefetch));
        let member = Member {
            inbox: self.clone(),
            queue: queue.clone(),
            permits: permits.clone(),
        };
        let deliveries = futures_util::stream::unfold(member, |member| async move {
            let delivery = member.next().await?;
            Some((delivery, member))
        });
        let drain = async move {
            let _all = permits
                .acquire_many(prefetch as u32)
                .await
                .map_err(|_| Error::closed("subscription"))?;
            Ok(())
        };
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
                let (sender, receiver) = mpsc::unbounded_channel();
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
            .field("topics", &topics.len())
            .finish()
    }
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

/// Settles a pushed message by answering the waiting request.
struct PushAcker {
    transport: &'static str,
    reply: Option<oneshot::Sender<Outcome>>,
    /// Held until the delivery is settled or dropped; counts it as in flight.
    _permit: OwnedSemaphorePermit,
}

impl PushAcker {
    fn answer(&mut self, outcome: Outcome) -> Result<(), Error> {
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
        self.answer(Outcome::Ack)
    }

    async fn nack(&mut self, _message: &RawMessage, delay: Duration) -> Result<(), Error> {
        self.answer(Outcome::Nack(delay))
    }

    async fn dead_letter(
        &mut self,
        _message: &RawMessage,
        _letter: &DeadLetter,
    ) -> Result<(), Error> {
        Err(Error::unsupported(self.transport, "keep dead letters"))
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
mod tests {
    use futures_util::FutureExt;

    use super::*;

    #[tokio::test]
    async fn a_request_waiting_when_the_last_member_leaves_is_answered_unavailable() {
        let inbox = Inbox::new("test");
        let subscription = inbox.subscribe("t", SubscribeOptions::new("g")).unwrap();
        let waiting = {
            let inbox = inbox.clone();
            tokio::spawn(async move { inbox.deliver("t", None, RawMessage::new("x"), 1).await })
        };
        // Let the request reach the queue, then leave without pulling it.
        tokio::task::yield_now().await;
        drop(subscription);
        let error = waiting.await.unwrap().unwrap_err();
        assert_eq!(error.kind(), ErrorKind::Unavailable, "{error}");
        assert!(error.message().contains("without settling"), "{error}");
        // The group is gone: the next request is refused at once.
        let error = inbox
            .deliver("t", Some("g"), RawMessage::new("x"), 1)
            .await
            .unwrap_err();
        assert!(error.message().contains("does not subscribe"), "{error}");
    }

    #[tokio::test]
    async fn a_named_group_gets_the_message_and_the_others_do_not() {
        let inbox = Inbox::new("test");
        let mut a = inbox.subscribe("t", SubscribeOptions::new("a")).unwrap();
        let mut b = inbox.subscribe("t", SubscribeOptions::new("b")).unwrap();
        let delivering = {
            let inbox = inbox.clone();
            tokio::spawn(
                async move { inbox.deliver("t", Some("a"), RawMessage::new("x"), 3).await },
            )
        };
        let delivery = a.recv().await.unwrap();
        assert_eq!(delivery.attempt(), 3);
        delivery.ack().await.map_err(|(error, _)| error).unwrap();
        delivering.await.unwrap().unwrap();
        assert!(b.recv().now_or_never().is_none(), "group b was not asked");
    }

    #[tokio::test]
    async fn every_group_must_ack_and_the_longest_nack_delay_wins() {
        let inbox = Inbox::new("test");
        let mut a = inbox.subscribe("t", SubscribeOptions::new("a")).unwrap();
        let mut b = inbox.subscribe("t", SubscribeOptions::new("b")).unwrap();
        let delivering = {
            let inbox = inbox.clone();
            tokio::spawn(async move { inbox.deliver("t", None, RawMessage::new("x"), 1).await })
        };
        let from_a = a.recv().await.unwrap();
        let from_b = b.recv().await.unwrap();
        from_a.ack().await.map_err(|(error, _)| error).unwrap();
        from_b
            .nack(Duration::from_millis(40))
            .await
            .map_err(|(error, _)| error)
            .unwrap();
        let error = delivering.await.unwrap().unwrap_err();
        assert_eq!(error.requeue_after(), Some(Duration::from_millis(40)));
    }

    #[tokio::test]
    async fn dead_letter_is_unsupported_and_leaves_the_delivery_to_settle() {
        let inbox = Inbox::new("test");
        let mut a = inbox.subscribe("t", SubscribeOptions::new("a")).unwrap();
        let delivering = {
            let inbox = inbox.clone();
            tokio::spawn(async move { inbox.deliver("t", None, RawMessage::new("x"), 1).await })
        };
        let delivery = a.recv().await.unwrap();
        let (error, delivery) = delivery.dead_letter("poison").await.unwrap_err();
        assert_eq!(error.kind(), ErrorKind::Unsupported);
        delivery.ack().await.map_err(|(error, _)| error).unwrap();
        delivering.await.unwrap().unwrap();
    }
}
