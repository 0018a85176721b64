//! With `concurrency` 1 the next message is handed out while the previous
//! one's ack is on its way — handlers still one at a time, in order — and a
//! consumer that dies with acks in flight leaves those messages to be
//! delivered again.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use futures_util::StreamExt;
use switchboard::{
    Acker, Capabilities, DeadLetter, Delivery, Error, EventBus, MemoryTransport, Message,
    Publisher, RawMessage, SubscribeOptions, Subscriber, Subscription, Topology, Transport,
    handler_fn,
};
use tokio::sync::{Semaphore, mpsc};

use super::Ping;

/// The memory transport, each ack held until `acks` has a permit for it.
struct HeldAcks {
    inner: MemoryTransport,
    acks: Arc<Semaphore>,
    /// Acks asked for so far (held or not).
    asked: Arc<AtomicUsize>,
}

/// Settles the memory transport's delivery once the gate lets the ack go.
struct GatedAcker {
    inner: Option<Delivery>,
    acks: Arc<Semaphore>,
    asked: Arc<AtomicUsize>,
}

#[async_trait]
impl Acker for GatedAcker {
    async fn ack(&mut self, _message: &RawMessage) -> Result<(), Error> {
        self.asked.fetch_add(1, Ordering::SeqCst);
        let permit = self.acks.acquire().await.expect("gate open");
        permit.forget();
        let delivery = self.inner.take().expect("settled once");
        delivery.ack().await.map_err(|failed| failed.into_parts().0)
    }

    async fn nack(&mut self, _message: &RawMessage, delay: Duration) -> Result<(), Error> {
        let delivery = self.inner.take().expect("settled once");
        delivery
            .nack(delay)
            .await
            .map_err(|failed| failed.into_parts().0)
    }

    async fn dead_letter(
        &mut self,
        _message: &RawMessage,
        letter: &DeadLetter,
    ) -> Result<(), Error> {
        let delivery = self.inner.take().expect("settled once");
        delivery
            .dead_letter(letter.clone())
            .await
            .map_err(|failed| failed.into_parts().0)
    }

    /// The consumer went away mid-ack: the memory transport's delivery is
    /// dropped unsettled, so it is delivered again.
    fn abandoned(&mut self, _message: RawMessage) {
        self.inner.take();
    }
}

#[async_trait]
impl Publisher for HeldAcks {
    async fn publish(&self, topic: &str, message: RawMessage) -> Result<(), Error> {
        self.inner.publish(topic, message).await
    }
}

#[async_trait]
impl Subscriber for HeldAcks {
    async fn subscribe(
        &self,
        topic: &str,
        options: SubscribeOptions,
    ) -> Result<Subscription, Error> {
        let inner = self.inner.subscribe(topic, options).await?;
        let (topic, group): (Arc<str>, Arc<str>) = (inner.topic().into(), inner.group().into());
        let (acks, asked) = (self.acks.clone(), self.asked.clone());
        let names = (topic.clone(), group.clone());
        let deliveries = inner.map(move |delivery| {
            let (message, attempt, count) = (
                delivery.message().clone(),
                delivery.attempt(),
                delivery.delivery_count(),
            );
            let acker = GatedAcker {
                inner: Some(delivery),
                acks: acks.clone(),
                asked: asked.clone(),
            };
            Delivery::new(
                message,
                names.0.clone(),
                names.1.clone(),
                attempt,
                Box::new(acker),
            )
            .with_delivery_count(count)
        });
        Ok(Subscription::new(topic, group, deliveries, async {
            Ok(())
        }))
    }
}

#[async_trait]
impl Transport for HeldAcks {
    fn name(&self) -> &'static str {
        "held-acks"
    }
    fn capabilities(&self) -> Capabilities {
        self.inner.capabilities()
    }
    async fn declare(&self, topology: &Topology) -> Result<(), Error> {
        self.inner.declare(topology).await
    }
}

/// A consumer of `bus` with `concurrency` 1 that reports each message's
/// `n`, and checks no two handlers ever overlap.
async fn consume(bus: &EventBus) -> (switchboard::ConsumerHandle, mpsc::UnboundedReceiver<u64>) {
    let (seen, inbox) = mpsc::unbounded_channel();
    let running = Arc::new(AtomicUsize::new(0));
    let handler = handler_fn(move |message: Message<Ping>| {
        let (seen, running) = (seen.clone(), running.clone());
        async move {
            assert_eq!(
                running.fetch_add(1, Ordering::SeqCst),
                0,
                "handlers overlap"
            );
            // A handler that gives way, so an overlap would show.
            tokio::task::yield_now().await;
            seen.send(message.payload().n).ok();
            running.fetch_sub(1, Ordering::SeqCst);
            Ok::<_, Error>(())
        }
    });
    let consumer = bus
        .subscribe::<Ping, _>(SubscribeOptions::new("g"), handler)
        .await
        .expect("subscribe");
    (consumer, inbox)
}

#[tokio::test(start_paused = true)]
async fn the_next_message_is_handled_while_the_previous_ack_is_on_its_way() {
    let transport = Arc::new(HeldAcks {
        inner: MemoryTransport::new(),
        acks: Arc::new(Semaphore::new(0)),
        asked: Arc::default(),
    });
    let bus = EventBus::new(transport.clone(), "test-service");
    let (consumer, mut inbox) = consume(&bus).await;
    for n in 1..=3 {
        bus.publish(Ping { n }).await.unwrap();
    }
    // No ack has landed, yet all three were handled, in order. (On paused
    // time the deadline passes at once if the loop waits for an ack.)
    for n in 1..=3 {
        let seen = tokio::time::timeout(Duration::from_secs(5), inbox.recv())
            .await
            .expect("handed out while earlier acks are held");
        assert_eq!(seen, Some(n));
    }
    assert_eq!(
        transport.asked.load(Ordering::SeqCst),
        3,
        "every ack is on its way"
    );

    // The acks land; a clean shutdown waits for them, and nothing comes back.
    transport.acks.add_permits(3);
    consumer.shutdown().await.unwrap();
    let (again, mut inbox) = consume(&bus).await;
    bus.publish(Ping { n: 4 }).await.unwrap();
    assert_eq!(inbox.recv().await, Some(4), "1–3 were acked for good");
    transport.acks.add_permits(1);
    again.shutdown().await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_consumer_that_dies_with_acks_in_flight_has_those_messages_delivered_again() {
    let transport = Arc::new(HeldAcks {
        inner: MemoryTransport::new(),
        acks: Arc::new(Semaphore::new(0)),
        asked: Arc::default(),
    });
    let bus = EventBus::new(transport.clone(), "test-service");
    let (consumer, mut inbox) = consume(&bus).await;
    for n in 1..=2 {
        bus.publish(Ping { n }).await.unwrap();
    }
    for n in 1..=2 {
        let seen = tokio::time::timeout(Duration::from_secs(5), inbox.recv())
            .await
            .expect("handed out while the first ack is held");
        assert_eq!(seen, Some(n));
    }
    while transport.asked.load(Ordering::SeqCst) < 2 {
        tokio::task::yield_now().await;
    }
    // Killed with both acks in flight.
    let mut health = consumer.watch_health();
    consumer.abort();
    while health.changed().await.is_ok() {}

    // Another member of the group gets both again.
    transport.acks.add_permits(Semaphore::MAX_PERMITS / 2);
    let (again, mut inbox) = consume(&bus).await;
    let mut redelivered = vec![inbox.recv().await.unwrap(), inbox.recv().await.unwrap()];
    redelivered.sort_unstable();
    assert_eq!(redelivered, vec![1, 2]);
    again.shutdown().await.unwrap();
}
