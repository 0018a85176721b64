//! Subscribing: the subscription's stream of deliveries, at most `prefetch`
//! unsettled at a time, and its acker.

use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
use uuid::Uuid;

use super::connection::Listener;
use super::inbox::{Inbox, Incoming};
use super::{Channels, ConnectionState, ConnectionStatus, NAME, RedisPubSubTransport};
use crate::error::{Error, ErrorKind};
use crate::transport::delivery::Prefetch;
use crate::transport::redis_support::redis_error;
use crate::transport::{
    Acker, DeadLetter, Delivery, RawMessage, SubscribeOptions, Subscriber, Subscription,
};

impl RedisPubSubTransport {
    /// Subscribes to a topic or a pattern and returns the subscription with
    /// a view of its connection. Returns once Redis confirmed the
    /// (P)SUBSCRIBE.
    pub async fn subscribe_to(
        &self,
        channels: Channels,
        options: SubscribeOptions,
    ) -> Result<(Subscription, ConnectionStatus), Error> {
        self.inner.lifecycle.check()?;
        channels.validate()?;
        options.validate()?;
        let client_name: Arc<str> = format!(
            "{}-{}",
            self.inner.options.client_name_prefix,
            Uuid::new_v4().simple()
        )
        .into();
        let fixed_topic = match &channels {
            Channels::Topic(topic) => Some(Arc::from(topic.as_str())),
            Channels::Pattern(_) => None,
        };
        let subscription_name: Arc<str> = channels.name().into();
        let dropped = Arc::new(AtomicU64::new(0));
        let inbox = Arc::new(Inbox::new(
            self.inner.options.inbox_capacity,
            self.inner.options.drop_policy,
            subscription_name.clone(),
            dropped.clone(),
        ));
        let (consumer_alive, alive) = watch::channel(());
        let listener = Listener {
            client: self.inner.client.clone(),
            options: self.inner.options.clone(),
            channels,
            client_name: client_name.clone(),
            fixed_topic,
            inbox: inbox.clone(),
            consumer: consumer_alive,
            state: watch::Sender::new(ConnectionState::Subscribed { connection: 1 }),
        };
        // The first connection is made here so its failure reaches the caller.
        let live = listener
            .connect()
            .await
            .map_err(|error| redis_error("subscribe", error))?;
        let status = ConnectionStatus {
            client_name,
            state: listener.state.subscribe(),
            dropped,
        };
        let listening = tokio::spawn(listener.run(live));

        let prefetch = Prefetch::new(options.prefetch);
        let consumer = Consumer {
            inbox,
            _alive: alive,
            permits: prefetch.permits().clone(),
            group: options.group.as_str().into(),
        };
        let group = consumer.group.clone();
        let deliveries = futures_util::stream::unfold(consumer, |mut consumer| async move {
            let delivery = consumer.next().await?;
            Some((delivery, consumer))
        });
        // Draining: every delivery handed out is settled (each holds a
        // permit), and the listener has closed its connection.
        let drain = async move {
            prefetch.drained().await?;
            listening.await.map_err(|error| {
                Error::new(ErrorKind::Closed, "the redis pub/sub listener failed")
                    .with_source(error)
            })
        };
        let subscription = Subscription::new(subscription_name, group, deliveries, drain);
        // Ends with the transport's `close`, which waits for it.
        Ok((self.inner.lifecycle.track(subscription), status))
    }

    /// Subscribes to every channel matching `pattern` (`PSUBSCRIBE`); each
    /// delivery's [`topic`](Delivery::topic) is the channel it came from.
    pub async fn psubscribe(
        &self,
        pattern: &str,
        options: SubscribeOptions,
    ) -> Result<Subscription, Error> {
        let (subscription, _status) = self
            .subscribe_to(Channels::Pattern(pattern.to_owned()), options)
            .await?;
        Ok(subscription)
    }
}

#[async_trait]
impl Subscriber for RedisPubSubTransport {
    async fn subscribe(
        &self,
        topic: &str,
        options: SubscribeOptions,
    ) -> Result<Subscription, Error> {
        let (subscription, _status) = self
            .subscribe_to(Channels::Topic(topic.to_owned()), options)
            .await?;
        Ok(subscription)
    }
}

/// The subscription's side: hands out what the listener received, at most
/// `prefetch` unsettled at a time.
struct Consumer {
    inbox: Arc<Inbox>,
    /// Dropped with the consumer, which tells the listener to stop.
    _alive: watch::Receiver<()>,
    permits: Arc<Semaphore>,
    group: Arc<str>,
}

impl Consumer {
    async fn next(&mut self) -> Option<Delivery> {
        let permit = self.permits.clone().acquire_owned().await.ok()?;
        let Incoming { topic, message } = self.inbox.pop().await?;
        let acker = PubSubAcker { _permit: permit };
        // Pub/Sub never delivers a message twice: every delivery is the first.
        Some(Delivery::new(
            message,
            topic,
            self.group.clone(),
            1,
            Box::new(acker),
        ))
    }
}

impl Drop for Consumer {
    fn drop(&mut self) {
        // Frees the queued messages now rather than when the connection is
        // gone, and refuses what still arrives meanwhile.
        self.inbox.close(true);
    }
}

/// Settles nothing on the server: Pub/Sub forgets a message once sent.
struct PubSubAcker {
    /// Held until the delivery is settled or dropped; counts it as in flight.
    _permit: OwnedSemaphorePermit,
}

#[async_trait]
impl Acker for PubSubAcker {
    async fn ack(&mut self, _message: &RawMessage) -> Result<(), Error> {
        Ok(())
    }

    fn ack_at_once(&mut self, _message: &RawMessage) -> Option<Result<(), Error>> {
        Some(Ok(()))
    }

    async fn nack(&mut self, _message: &RawMessage, _delay: Duration) -> Result<(), Error> {
        Err(Error::unsupported(
            NAME,
            "nack: Pub/Sub keeps no message to deliver again",
        ))
    }

    async fn dead_letter(
        &mut self,
        _message: &RawMessage,
        _letter: &DeadLetter,
    ) -> Result<(), Error> {
        Err(Error::unsupported(
            NAME,
            "dead-letter: Pub/Sub has no dead-letter queue",
        ))
    }
}
