//! Publishing rides out a short outage, and a consume loop that ends is
//! visible at once. Timers run on paused time.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use async_trait::async_trait;
use switchboard::config::RetryConfig;
use switchboard::{
    Capabilities, ConsumerHandle, ConsumerHealth, Error, ErrorKind, EventBus, MemoryTransport,
    Message, Publisher, RawMessage, SubscribeOptions, Subscriber, Subscription, Topology,
    Transport,
};
use tokio::sync::mpsc;
use uuid::Uuid;

use super::Ping;

/// How each publish of a [`Flaky`] goes.
#[derive(Clone, Copy)]
enum Fault {
    /// The first `n` publishes fail with a lost connection.
    LoseFirst(u32),
    /// Every publish fails with a refusal (not retryable).
    Refuse,
    /// Every publish hangs.
    Hang,
}

/// The memory transport behind a connection that fails as told.
struct Flaky {
    inner: MemoryTransport,
    fault: Fault,
    calls: AtomicU32,
}

#[async_trait]
impl Publisher for Flaky {
    async fn publish(&self, topic: &str, message: RawMessage) -> Result<(), Error> {
        let call = self.calls.fetch_add(1, Ordering::SeqCst) + 1;
        match self.fault {
            Fault::LoseFirst(n) if call <= n => {
                Err(Error::new(ErrorKind::Connection, "redis XADD: broken pipe"))
            }
            Fault::LoseFirst(_) => self.inner.publish(topic, message).await,
            Fault::Refuse => Err(Error::permanent("topic name refused")),
            Fault::Hang => std::future::pending().await,
        }
    }
}

#[async_trait]
impl Subscriber for Flaky {
    async fn subscribe(
        &self,
        topic: &str,
        options: SubscribeOptions,
    ) -> Result<Subscription, Error> {
        self.inner.subscribe(topic, options).await
    }
}

#[async_trait]
impl Transport for Flaky {
    fn name(&self) -> &'static str {
        "flaky"
    }
    fn capabilities(&self) -> Capabilities {
        self.inner.capabilities()
    }
    async fn declare(&self, topology: &Topology) -> Result<(), Error> {
        self.inner.declare(topology).await
    }
}

/// A bus over a [`Flaky`] transport, waiting 100 ms, 200 ms, … at most 1 s
/// between attempts, without jitter so the count of attempts is exact.
fn flaky_bus(fault: Fault, deadline: Duration) -> (EventBus, Arc<Flaky>) {
    let flaky = Arc::new(Flaky {
        inner: MemoryTransport::new(),
        fault,
        calls: AtomicU32::new(0),
    });
    let retry = RetryConfig::default().with_jitter(false);
    let bus = EventBus::new(flaky.clone(), "orders")
        .with_publish_deadline(deadline)
        .with_publish_backoff(&retry);
    (bus, flaky)
}

/// A consumer of group `g` that sends on each `Ping` it handles, as its
/// event id and number.
async fn pings_seen(bus: &EventBus) -> (ConsumerHandle, mpsc::UnboundedReceiver<(Uuid, u64)>) {
    let (seen, received) = mpsc::unbounded_channel();
    let consumer = bus
        .subscribe::<Ping, _>(
            SubscribeOptions::new("g"),
            switchboard::handler_fn(move |message: Message<Ping>| {
                let seen = seen.clone();
                async move {
                    seen.send((message.event_id(), message.payload().n)).ok();
                    Ok::<_, Error>(())
                }
            }),
        )
        .await
        .unwrap();
    (consumer, received)
}

#[tokio::test(start_paused = true)]
async fn a_publish_rides_out_lost_connections_within_its_deadline() {
    let (bus, flaky) = flaky_bus(Fault::LoseFirst(4), Duration::from_secs(10));
    let (consumer, mut received) = pings_seen(&bus).await;
    let started = tokio::time::Instant::now();
    let id = bus.publish(Ping { n: 7 }).await.unwrap();
    // Waits of 100 + 200 + 400 + 800 ms before the fifth attempt.
    assert_eq!(started.elapsed(), Duration::from_millis(1_500));
    assert_eq!(flaky.calls.load(Ordering::SeqCst), 5);
    assert_eq!(received.recv().await, Some((id, 7)));
    consumer.shutdown().await.unwrap();
    assert!(received.try_recv().is_err(), "delivered once");
}

/// A batch is tried again as a whole: every attempt carries every message
/// (the first takes them as encoded, a retry encodes them again), so all
/// arrive, in order, under the ids the call returned.
#[tokio::test(start_paused = true)]
async fn a_batch_rides_out_lost_connections_whole_and_in_order() {
    let (bus, flaky) = flaky_bus(Fault::LoseFirst(2), Duration::from_secs(10));
    let (consumer, mut received) = pings_seen(&bus).await;
    let ids = bus
        .publish_batch([Ping { n: 1 }, Ping { n: 2 }, Ping { n: 3 }])
        .await
        .unwrap();
    // Two attempts failed on their first message; the third sent all three.
    assert_eq!(flaky.calls.load(Ordering::SeqCst), 5);
    for (id, n) in ids.iter().zip(1..) {
        assert_eq!(received.recv().await, Some((*id, n)));
    }
    consumer.shutdown().await.unwrap();
    assert!(received.try_recv().is_err(), "each delivered once");
}

#[tokio::test(start_paused = true)]
async fn a_publish_that_outlives_its_deadline_says_how_many_attempts_it_made() {
    let (bus, flaky) = flaky_bus(Fault::LoseFirst(u32::MAX), Duration::from_secs(3));
    let started = tokio::time::Instant::now();
    let error = bus.publish(Ping { n: 1 }).await.unwrap_err();
    // Attempts at 0, 0.1, 0.3, 0.7, 1.5 and 2.5 s; the next would start
    // at 3.5 s, past the deadline.
    assert_eq!(error.attempts(), Some(6));
    assert_eq!(flaky.calls.load(Ordering::SeqCst), 6);
    assert_eq!(started.elapsed(), Duration::from_millis(2_500));
    assert_eq!(error.kind(), ErrorKind::Connection);
    assert!(error.is_retryable());
    let text = error.to_string();
    assert!(
        text.contains("redis XADD: broken pipe") && text.contains("gave up after 6 attempts"),
        "{text}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_refused_publish_is_not_tried_again() {
    let (bus, flaky) = flaky_bus(Fault::Refuse, Duration::from_secs(10));
    let error = bus.publish(Ping { n: 1 }).await.unwrap_err();
    assert_eq!(error.kind(), ErrorKind::Rejected);
    assert_eq!(error.attempts(), Some(1));
    assert_eq!(flaky.calls.load(Ordering::SeqCst), 1);
}

#[tokio::test(start_paused = true)]
async fn a_publish_that_hangs_ends_at_its_deadline_as_a_timeout() {
    let (bus, _flaky) = flaky_bus(Fault::Hang, Duration::from_secs(2));
    let started = tokio::time::Instant::now();
    let error = bus
        .publish_batch([Ping { n: 1 }, Ping { n: 2 }])
        .await
        .unwrap_err();
    assert_eq!(started.elapsed(), Duration::from_secs(2));
    assert_eq!(error.kind(), ErrorKind::Timeout);
    assert_eq!(error.attempts(), Some(1));
    assert!(error.to_string().contains("publish deadline"), "{error}");
}

#[tokio::test(start_paused = true)]
async fn a_zero_deadline_makes_one_attempt() {
    let (bus, flaky) = flaky_bus(Fault::LoseFirst(1), Duration::ZERO);
    assert!(bus.publish(Ping { n: 1 }).await.is_err());
    assert_eq!(flaky.calls.load(Ordering::SeqCst), 1);
}

/// Handles messages until `n` reaches `fail_at`; then its dependency is
/// gone for good and `poll_ready` fails.
#[derive(Clone)]
struct Breaks {
    fail_at: u64,
    broken: Arc<std::sync::atomic::AtomicBool>,
}

impl tower::Service<Message<Ping>> for Breaks {
    type Response = ();
    type Error = Error;
    type Future = std::future::Ready<Result<(), Error>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Error>> {
        if self.broken.load(Ordering::SeqCst) {
            return Poll::Ready(Err(Error::permanent("ledger connection revoked")));
        }
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, message: Message<Ping>) -> Self::Future {
        if message.payload().n >= self.fail_at {
            self.broken.store(true, Ordering::SeqCst);
        }
        std::future::ready(Ok(()))
    }
}

#[tokio::test]
async fn a_consume_loop_that_ends_on_an_error_is_visible_before_shutdown() {
    let (bus, _transport) = super::bus();
    let handler = Breaks {
        fail_at: 2,
        broken: Arc::default(),
    };
    let consumer = bus
        .subscribe::<Ping, _>(SubscribeOptions::new("g"), handler)
        .await
        .unwrap();
    assert!(consumer.failure().is_none());
    for n in 1..=3 {
        bus.publish(Ping { n }).await.unwrap();
    }
    let error = consumer.closed().await.expect("ended on an error");
    assert!(
        error.message().contains("ledger connection revoked"),
        "{error}"
    );
    assert_eq!(consumer.health(), ConsumerHealth::Stopped);
    assert!(consumer.is_finished());
    assert!(consumer.failure().is_some());
    let error = consumer.shutdown().await.unwrap_err();
    assert_eq!(error.kind(), ErrorKind::Rejected);
}

#[tokio::test]
async fn closed_stays_pending_while_the_loop_runs_and_no_failure_is_reported() {
    let (bus, _transport) = super::bus();
    let consumer = bus
        .subscribe::<Ping, _>(
            SubscribeOptions::new("g"),
            switchboard::handler_fn(|_: Message<Ping>| async { Ok::<_, Error>(()) }),
        )
        .await
        .unwrap();
    {
        let closed = consumer.closed();
        tokio::pin!(closed);
        assert!(
            futures_util::poll!(closed.as_mut()).is_pending(),
            "running: not closed"
        );
    }
    assert!(
        consumer.failure().is_none(),
        "a running loop has no failure"
    );
    assert!(!consumer.is_finished());
    consumer.shutdown().await.unwrap();
}
