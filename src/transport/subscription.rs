//! The live stream of deliveries ([`Subscription`]) and the prefetch
//! permits every subscription holds its messages by.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures_core::Stream;
use futures_core::future::BoxFuture;
use futures_core::stream::BoxStream;

use super::delivery::Delivery;
use crate::error::Error;

/// A live subscription: a [`Stream`] of [`Delivery`] for one topic and group.
///
/// It is returned only once the transport is receiving. Dropping it stops
/// receiving; [`shutdown`](Subscription::shutdown) also waits until every
/// delivery it handed out has been settled or dropped.
pub struct Subscription {
    topic: Arc<str>,
    group: Arc<str>,
    deliveries: BoxStream<'static, Delivery>,
    drain: BoxFuture<'static, Result<(), Error>>,
    /// How many settles the consume loop may keep on their way beyond its
    /// running handlers; `None`: the loop's own bound.
    settles_in_flight: Option<usize>,
}

/// What a [`Subscription`] is made of: topic, group, deliveries, drain.
pub(crate) type SubscriptionParts = (
    Arc<str>,
    Arc<str>,
    BoxStream<'static, Delivery>,
    BoxFuture<'static, Result<(), Error>>,
);

impl Subscription {
    /// Used by transports: `deliveries` yields messages until it is dropped;
    /// `drain` runs after that and resolves once every delivery handed out has
    /// been settled or dropped (and anything received but not handed out has
    /// been given back to the broker).
    pub fn new(
        topic: Arc<str>,
        group: Arc<str>,
        deliveries: impl Stream<Item = Delivery> + Send + 'static,
        drain: impl Future<Output = Result<(), Error>> + Send + 'static,
    ) -> Self {
        Self {
            topic,
            group,
            deliveries: Box::pin(deliveries),
            drain: Box::pin(drain),
            settles_in_flight: None,
        }
    }

    /// Lets the consume loop keep up to `most` settles on their way beyond
    /// its running handlers, for a transport that sends the settles waiting
    /// together (Redis Streams: one `XACK` of every id settled meanwhile)
    /// and whose deliveries are bounded on their own (each holds a prefetch
    /// permit until settled): the more may wait, the fewer commands a
    /// batch of them costs.
    pub(crate) fn with_settles_in_flight(mut self, most: usize) -> Self {
        self.settles_in_flight = Some(most);
        self
    }

    /// See [`with_settles_in_flight`](Self::with_settles_in_flight).
    pub(crate) fn settles_in_flight(&self) -> Option<usize> {
        self.settles_in_flight
    }

    /// The parts [`new`](Self::new) took, for a wrapper (the transport's
    /// close) to put together again.
    pub(crate) fn into_parts(self) -> SubscriptionParts {
        (self.topic, self.group, self.deliveries, self.drain)
    }

    /// The topic.
    pub fn topic(&self) -> &str {
        &self.topic
    }

    /// The consumer group.
    pub fn group(&self) -> &str {
        &self.group
    }

    /// The next delivery, or `None` when the transport has closed the
    /// subscription.
    pub async fn recv(&mut self) -> Option<Delivery> {
        std::future::poll_fn(|cx| self.deliveries.as_mut().poll_next(cx)).await
    }

    /// Stops receiving and waits until every delivery handed out has been
    /// settled or dropped. Wrap it in a timeout if a holder may never let go.
    pub async fn shutdown(self) -> Result<(), Error> {
        drop(self.deliveries);
        self.drain.await
    }
}

impl Stream for Subscription {
    type Item = Delivery;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Delivery>> {
        self.deliveries.as_mut().poll_next(cx)
    }
}

impl fmt::Debug for Subscription {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Subscription")
            .field("topic", &self.topic)
            .field("group", &self.group)
            .finish_non_exhaustive()
    }
}

/// A subscription's prefetch as permits: each message the subscription
/// holds (read ahead, in a handler, waiting out a nack) holds one, so
/// draining is waiting until all are back. Clones share the permits.
#[derive(Clone)]
pub(crate) struct Prefetch {
    permits: Arc<tokio::sync::Semaphore>,
    size: u32,
}

impl Prefetch {
    /// `prefetch` permits, capped at what a semaphore can count.
    pub(crate) fn new(prefetch: usize) -> Self {
        let size = prefetch
            .min(u32::MAX as usize)
            .min(tokio::sync::Semaphore::MAX_PERMITS);
        Self {
            permits: Arc::new(tokio::sync::Semaphore::new(size)),
            size: size as u32,
        }
    }

    /// The permits, to take one per message held.
    pub(crate) fn permits(&self) -> &Arc<tokio::sync::Semaphore> {
        &self.permits
    }

    /// How many messages the subscription may hold.
    #[cfg_attr(
        not(any(feature = "redis-streams", feature = "amqp")),
        allow(dead_code)
    )]
    pub(crate) fn size(&self) -> usize {
        self.size as usize
    }

    /// Resolves once every permit is back: nothing the subscription handed
    /// out is still unsettled.
    pub(crate) async fn drained(&self) -> Result<(), Error> {
        let _all = self
            .permits
            .acquire_many(self.size)
            .await
            .map_err(|_| Error::closed("subscription"))?;
        Ok(())
    }
}
