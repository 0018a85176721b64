//! The typed bus and its consume loop: what happens to each delivery by the
//! handler's outcome, concurrency, readiness, shutdown and tracing.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use switchboard::{
    ConsumerHandle, Error, ErrorKind, Event, EventBus, EventEnvelope, MemoryTransport, Message,
    Publisher, RawMessage, SubscribeOptions, Subscriber, Transport, handler_fn, header,
};
use tokio::sync::{Semaphore, mpsc};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Ping {
    n: u64,
}

impl Event for Ping {
    const TYPE: &'static str = "test.ping";
    const VERSION: &'static str = "1.0";
}

fn bus() -> (EventBus, MemoryTransport) {
    let transport = MemoryTransport::new();
    (
        EventBus::new(Arc::new(transport.clone()), "test-service"),
        transport,
    )
}

/// Subscribes a handler that reports each `n` (and attempt) and then answers
/// with `outcome(n, attempt)`.
async fn subscribe_reporting<F>(
    bus: &EventBus,
    options: SubscribeOptions,
    outcome: F,
) -> (ConsumerHandle, mpsc::UnboundedReceiver<(u64, u32)>)
where
    F: Fn(u64, u32) -> Result<(), Error> + Clone + Send + Sync + 'static,
{
    let (seen, inbox) = mpsc::unbounded_channel();
    let handler = handler_fn(move |message: Message<Ping>| {
        let (seen, outcome) = (seen.clone(), outcome.clone());
        async move {
            let n = message.payload().n;
            seen.send((n, message.attempt())).ok();
            outcome(n, message.attempt())
        }
    });
    let consumer = bus
        .subscribe::<Ping, _>(options, handler)
        .await
        .expect("subscribe");
    (consumer, inbox)
}

async fn dead_letters(transport: &MemoryTransport) -> Vec<switchboard::DeadLettered> {
    transport
        .dead_letters()
        .expect("memory keeps dead letters")
        .list(Ping::TYPE, 100)
        .await
        .expect("list")
}

#[tokio::test]
async fn handled_messages_are_acked_and_not_delivered_again() {
    let (bus, transport) = bus();
    let (consumer, mut inbox) =
        subscribe_reporting(&bus, SubscribeOptions::new("g"), |_, _| Ok(())).await;
    bus.publish(Ping { n: 1 }).await.unwrap();
    assert_eq!(inbox.recv().await, Some((1, 1)));
    consumer.shutdown().await.unwrap();

    // Had the message not been acked, shutdown would have put it back.
    let mut again = transport
        .subscribe(Ping::TYPE, SubscribeOptions::new("g"))
        .await
        .unwrap();
    bus.publish(Ping { n: 2 }).await.unwrap();
    let next = again.recv().await.unwrap();
    let envelope = bus.codec().decode::<Ping>(next.body()).unwrap();
    assert_eq!(envelope.payload(), &Ping { n: 2 });
    assert!(dead_letters(&transport).await.is_empty());
}

#[tokio::test]
async fn a_failing_handler_dead_letters_with_reason_attempts_and_error_and_the_next_message_flows()
{
    let (bus, transport) = bus();
    let (_consumer, mut inbox) = subscribe_reporting(&bus, SubscribeOptions::new("g"), |n, _| {
        if n == 1 {
            Err(Error::permanent("order 1 is invalid"))
        } else {
            Ok(())
        }
    })
    .await;
    let poison = bus.publish(Ping { n: 1 }).await.unwrap();
    bus.publish(Ping { n: 2 }).await.unwrap();
    assert_eq!(inbox.recv().await, Some((1, 1)));
    // Concurrency 1: the second message is pulled only after the first was handled.
    assert_eq!(inbox.recv().await, Some((2, 1)));

    let letters = dead_letters(&transport).await;
    assert_eq!(letters.len(), 1, "{letters:?}");
    assert_eq!(letters[0].id, poison.to_string());
    assert_eq!(letters[0].reason, "handler failed");
    assert_eq!(letters[0].attempts, 1);
    assert_eq!(letters[0].group, "g");
    let last_error = letters[0].last_error.as_deref().unwrap();
    assert!(last_error.contains("order 1 is invalid"), "{last_error}");
}

#[tokio::test]
async fn undecodable_input_goes_to_the_dead_letter_queue_without_reaching_the_handler() {
    let (bus, transport) = bus();
    let (_consumer, mut inbox) =
        subscribe_reporting(&bus, SubscribeOptions::new("g"), |_, _| Ok(())).await;
    transport
        .publish(
            Ping::TYPE,
            RawMessage::new("\u{0}garbage").with_header(header::EVENT_ID, "bad-1"),
        )
        .await
        .unwrap();
    bus.publish(Ping { n: 2 }).await.unwrap();
    assert_eq!(
        inbox.recv().await,
        Some((2, 1)),
        "the handler sees only the valid event"
    );

    let letters = dead_letters(&transport).await;
    assert_eq!(letters.len(), 1);
    assert_eq!(letters[0].id, "bad-1");
    assert!(
        letters[0].reason.contains("not JSON"),
        "{}",
        letters[0].reason
    );
}

#[tokio::test]
async fn another_major_version_is_given_back_and_dead_lettered_once_no_member_took_it() {
    let (bus, transport) = bus();
    let options = SubscribeOptions::new("g")
        .with_give_back_limit(switchboard::GiveBackLimit::default().with_max_times(2));
    let (_consumer, mut inbox) = subscribe_reporting(&bus, options, |_, _| Ok(())).await;
    let future_version = EventEnvelope::untyped(
        Ping::TYPE,
        "2.0",
        "newer-service",
        serde_json::json!({ "n": 1 }),
    );
    let body = bus.codec().encode(&future_version).unwrap();
    transport
        .publish(Ping::TYPE, RawMessage::new(body))
        .await
        .unwrap();
    bus.publish(Ping { n: 2 }).await.unwrap();
    // The message behind it is not held up.
    assert_eq!(inbox.recv().await, Some((2, 1)));
    assert!(
        dead_letters(&transport).await.is_empty(),
        "given back for another member first, not dead-lettered at once"
    );

    // No member of the group knows 2.0: past the limit it is dead-lettered.
    let letters = loop {
        let letters = dead_letters(&transport).await;
        if !letters.is_empty() {
            break letters;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    assert_eq!(letters.len(), 1);
    assert!(
        letters[0].reason.starts_with(
            "no member of group \"g\" knows version 2.0 of test.ping: given back 2 times over "
        ),
        "{}",
        letters[0].reason
    );
    assert_eq!(letters[0].message.headers[header::GIVEN_BACK], "2");
    assert!(inbox.try_recv().is_err(), "the handler never saw it");
}

#[tokio::test]
async fn a_panicking_handler_dead_letters_the_message_and_the_loop_goes_on() {
    let (bus, transport) = bus();
    let (_consumer, mut inbox) = subscribe_reporting(&bus, SubscribeOptions::new("g"), |n, _| {
        if n == 1 {
            panic!("handler bug");
        }
        Ok(())
    })
    .await;
    bus.publish(Ping { n: 1 }).await.unwrap();
    bus.publish(Ping { n: 2 }).await.unwrap();
    assert_eq!(inbox.recv().await, Some((1, 1)));
    assert_eq!(inbox.recv().await, Some((2, 1)));
    let letters = dead_letters(&transport).await;
    assert_eq!(letters.len(), 1);
    assert_eq!(
        letters[0].last_error.as_deref(),
        Some("rejected: handler panicked")
    );
}

#[tokio::test]
async fn an_error_asking_for_requeue_is_nacked_and_delivered_again() {
    let (bus, transport) = bus();
    let (_consumer, mut inbox) =
        subscribe_reporting(&bus, SubscribeOptions::new("g"), |_, attempt| {
            if attempt == 1 {
                Err(Error::new(ErrorKind::BreakerOpen, "market breaker open")
                    .with_requeue(Duration::from_millis(5)))
            } else {
                Ok(())
            }
        })
        .await;
    bus.publish(Ping { n: 1 }).await.unwrap();
    assert_eq!(inbox.recv().await, Some((1, 1)));
    assert_eq!(
        inbox.recv().await,
        Some((1, 2)),
        "redelivered with a raised attempt"
    );
    assert!(
        dead_letters(&transport).await.is_empty(),
        "a requeue is not a dead letter"
    );
}

/// A handler that reports when it starts and finishes only when a permit is
/// released, so a test controls how many are in flight.
fn gated_handler(
    started: mpsc::UnboundedSender<u64>,
    gate: Arc<Semaphore>,
    in_flight: Arc<AtomicUsize>,
    most: Arc<AtomicUsize>,
) -> impl tower::Service<
    Message<Ping>,
    Response = (),
    Error = Error,
    Future = impl Future<Output = Result<(), Error>> + Send,
> + Send
+ 'static {
    handler_fn(move |message: Message<Ping>| {
        let (started, gate, in_flight, most) = (
            started.clone(),
            gate.clone(),
            in_flight.clone(),
            most.clone(),
        );
        async move {
            let now = in_flight.fetch_add(1, Ordering::SeqCst) + 1;
            most.fetch_max(now, Ordering::SeqCst);
            started.send(message.payload().n).ok();
            gate.acquire().await.expect("gate open").forget();
            in_flight.fetch_sub(1, Ordering::SeqCst);
            Ok(())
        }
    })
}

async fn let_other_tasks_run() {
    for _ in 0..100 {
        tokio::task::yield_now().await;
    }
}

#[tokio::test]
async fn concurrency_bounds_the_handlers_in_flight() {
    let (bus, _transport) = bus();
    let (started, mut starts) = mpsc::unbounded_channel();
    let gate = Arc::new(Semaphore::new(0));
    let (in_flight, most) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let handler = gated_handler(started, gate.clone(), in_flight, most.clone());
    let consumer = bus
        .subscribe::<Ping, _>(SubscribeOptions::new("g").with_concurrency(3), handler)
        .await
        .unwrap();
    bus.publish_batch((0..10).map(|n| Ping { n }))
        .await
        .unwrap();
    for _ in 0..3 {
        starts.recv().await.unwrap();
    }
    // On this single-threaded runtime the loop runs whenever the test yields;
    // had it room for a fourth handler, it would have started it by now.
    let_other_tasks_run().await;
    assert!(starts.try_recv().is_err(), "a fourth handler started");
    gate.add_permits(10);
    for _ in 3..10 {
        starts.recv().await.unwrap();
    }
    consumer.shutdown().await.unwrap();
    assert_eq!(most.load(Ordering::SeqCst), 3);
}

#[tokio::test]
async fn concurrency_one_handles_messages_in_publish_order() {
    let (bus, _transport) = bus();
    let (_consumer, mut inbox) =
        subscribe_reporting(&bus, SubscribeOptions::new("g"), |_, _| Ok(())).await;
    bus.publish_batch((0..200).map(|n| Ping { n }))
        .await
        .unwrap();
    for expected in 0..200 {
        assert_eq!(inbox.recv().await.map(|(n, _)| n), Some(expected));
    }
}

#[tokio::test]
async fn shutdown_waits_for_the_handlers_in_flight() {
    let (bus, transport) = bus();
    let (started, mut starts) = mpsc::unbounded_channel();
    let gate = Arc::new(Semaphore::new(0));
    let (in_flight, most) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let handler = gated_handler(started, gate.clone(), in_flight.clone(), most);
    let consumer = bus
        .subscribe::<Ping, _>(SubscribeOptions::new("g").with_concurrency(2), handler)
        .await
        .unwrap();
    bus.publish_batch([Ping { n: 1 }, Ping { n: 2 }])
        .await
        .unwrap();
    starts.recv().await.unwrap();
    starts.recv().await.unwrap();

    let shutdown = tokio::spawn(consumer.shutdown());
    let_other_tasks_run().await;
    assert!(
        !shutdown.is_finished(),
        "shutdown returned with handlers in flight"
    );
    gate.add_permits(2);
    shutdown.await.unwrap().unwrap();
    assert_eq!(in_flight.load(Ordering::SeqCst), 0);

    // Both were acked on the way out: nothing comes back to the group.
    let mut again = transport
        .subscribe(Ping::TYPE, SubscribeOptions::new("g"))
        .await
        .unwrap();
    bus.publish(Ping { n: 3 }).await.unwrap();
    let next = bus
        .codec()
        .decode::<Ping>(again.recv().await.unwrap().body())
        .unwrap();
    assert_eq!(next.payload().n, 3);
}

#[tokio::test]
async fn dropping_the_handle_stops_the_consumer_and_leaves_messages_queued() {
    let (bus, transport) = bus();
    let (consumer, mut inbox) =
        subscribe_reporting(&bus, SubscribeOptions::new("g"), |_, _| Ok(())).await;
    drop(consumer);
    bus.publish(Ping { n: 1 }).await.unwrap();
    let_other_tasks_run().await;
    assert!(
        inbox.try_recv().is_err(),
        "a dropped consumer handled a message"
    );
    let mut again = transport
        .subscribe(Ping::TYPE, SubscribeOptions::new("g"))
        .await
        .unwrap();
    let next = bus
        .codec()
        .decode::<Ping>(again.recv().await.unwrap().body())
        .unwrap();
    assert_eq!(next.payload().n, 1);
}

/// A handler whose readiness a test switches, like a breaker that opens.
#[derive(Clone)]
struct Switchable {
    ready: Arc<AtomicBool>,
    waker: Arc<Mutex<Option<Waker>>>,
    seen: mpsc::UnboundedSender<u64>,
}

impl Switchable {
    fn open(&self) {
        self.ready.store(true, Ordering::SeqCst);
        if let Some(waker) = self.waker.lock().unwrap().take() {
            waker.wake();
        }
    }
}

impl tower::Service<Message<Ping>> for Switchable {
    type Response = ();
    type Error = Error;
    type Future = Pin<Box<dyn Future<Output = Result<(), Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        if self.ready.load(Ordering::SeqCst) {
            Poll::Ready(Ok(()))
        } else {
            *self.waker.lock().unwrap() = Some(cx.waker().clone());
            Poll::Pending
        }
    }

    fn call(&mut self, message: Message<Ping>) -> Self::Future {
        self.seen.send(message.payload().n).ok();
        Box::pin(async { Ok(()) })
    }
}

#[tokio::test]
async fn a_handler_that_is_not_ready_stops_the_pulling() {
    let (bus, _transport) = bus();
    let (seen, mut inbox) = mpsc::unbounded_channel();
    let handler = Switchable {
        ready: Arc::default(),
        waker: Arc::default(),
        seen,
    };
    let _consumer = bus
        .subscribe::<Ping, _>(SubscribeOptions::new("g"), handler.clone())
        .await
        .unwrap();
    bus.publish(Ping { n: 1 }).await.unwrap();
    let_other_tasks_run().await;
    assert!(inbox.try_recv().is_err(), "called while not ready");
    handler.open();
    assert_eq!(inbox.recv().await, Some(1));
}

#[tokio::test]
async fn invalid_subscribe_options_are_refused_before_anything_runs() {
    let (bus, _transport) = bus();
    let handler = handler_fn(|_: Message<Ping>| async { Ok::<_, Error>(()) });
    let error = bus
        .subscribe::<Ping, _>(SubscribeOptions::new("g").with_concurrency(0), handler)
        .await
        .unwrap_err();
    assert_eq!(error.kind(), ErrorKind::Rejected);
    assert!(error.message().contains("concurrency"), "{error}");
}

#[tokio::test]
async fn a_namespace_separates_buses_on_one_transport() {
    let transport = Arc::new(MemoryTransport::new());
    let staging = EventBus::new(transport.clone(), "svc").with_namespace("staging");
    let production = EventBus::new(transport.clone(), "svc");
    assert_eq!(staging.topic_of::<Ping>(), "staging.test.ping");
    let (_consumer, mut inbox) =
        subscribe_reporting(&staging, SubscribeOptions::new("g"), |_, _| Ok(())).await;
    production.publish(Ping { n: 1 }).await.unwrap();
    staging.publish(Ping { n: 2 }).await.unwrap();
    assert_eq!(
        inbox.recv().await,
        Some((2, 1)),
        "only the staging event arrives"
    );
}

mod spans {
    use std::collections::BTreeMap;
    use std::fmt::Debug;

    use tracing::field::{Field, Visit};
    use tracing::span::{Attributes, Id};
    use tracing_subscriber::Layer;
    use tracing_subscriber::layer::{Context, SubscriberExt};

    use super::*;

    type Recorded = Arc<Mutex<Vec<(String, BTreeMap<String, String>)>>>;

    struct Recorder(Recorded);

    struct Fields<'a>(&'a mut BTreeMap<String, String>);

    impl Visit for Fields<'_> {
        fn record_debug(&mut self, field: &Field, value: &dyn Debug) {
            self.0.insert(
                field.name().to_owned(),
                format!("{value:?}").trim_matches('"').to_owned(),
            );
        }
    }

    impl<S: tracing::Subscriber> Layer<S> for Recorder {
        fn on_new_span(&self, attributes: &Attributes<'_>, _: &Id, _: Context<'_, S>) {
            let mut fields = BTreeMap::new();
            attributes.record(&mut Fields(&mut fields));
            self.0
                .lock()
                .unwrap()
                .push((attributes.metadata().name().to_owned(), fields));
        }
    }

    /// The recorder is the binary's global subscriber, not a scoped one:
    /// tracing caches each callsite's interest process-wide, and a callsite
    /// first hit on another test's thread while a scoped subscriber is being
    /// set up can be cached as uninterested, losing the span here. Every
    /// test's spans are recorded; this one looks for its own event id.
    fn recorded() -> &'static Recorded {
        static RECORDED: std::sync::OnceLock<Recorded> = std::sync::OnceLock::new();
        RECORDED.get_or_init(|| {
            let recorded = Recorded::default();
            let subscriber = tracing_subscriber::registry().with(Recorder(recorded.clone()));
            tracing::subscriber::set_global_default(subscriber)
                .expect("no other global subscriber in this binary");
            recorded
        })
    }

    #[test]
    fn publish_and_consume_open_spans_naming_event_topic_and_group() {
        let recorded = recorded();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let event_id = runtime.block_on(async {
            let (bus, _transport) = bus();
            let (_consumer, mut inbox) =
                subscribe_reporting(&bus, SubscribeOptions::new("game"), |_, _| Ok(())).await;
            let id = bus.publish(Ping { n: 1 }).await.unwrap();
            inbox.recv().await.unwrap();
            id.to_string()
        });
        let spans = recorded.lock().unwrap();
        let find = |name: &str| {
            spans
                .iter()
                .find(|(span, fields)| span == name && fields.get("event_id") == Some(&event_id))
                .map(|(_, fields)| fields.clone())
                .unwrap_or_else(|| panic!("no {name} span in {spans:?}"))
        };
        let publish = find("publish");
        assert_eq!(publish["event_id"], event_id);
        assert_eq!(publish["event_type"], "test.ping");
        assert_eq!(publish["topic"], "test.ping");
        let consume = find("consume");
        assert_eq!(consume["event_id"], event_id);
        assert_eq!(consume["event_type"], "test.ping");
        assert_eq!(consume["topic"], "test.ping");
        assert_eq!(consume["group"], "game");
        assert_eq!(consume["attempt"], "1");
    }
}

#[tokio::test]
async fn a_consumer_says_when_it_has_stopped() {
    let (bus, _transport) = bus();
    let handler = handler_fn(|_: Message<Ping>| async { Ok::<_, Error>(()) });
    let consumer = bus
        .subscribe::<Ping, _>(SubscribeOptions::new("g"), handler)
        .await
        .unwrap();
    let mut health = consumer.watch_health();
    assert_eq!(consumer.health(), switchboard::ConsumerHealth::Running);
    let aborted = bus
        .subscribe::<Ping, _>(
            SubscribeOptions::new("g"),
            handler_fn(|_: Message<Ping>| async { Ok::<_, Error>(()) }),
        )
        .await
        .unwrap();
    let mut aborted_health = aborted.watch_health();
    aborted.abort();
    // The loop's end closes the watch, however it ends.
    while aborted_health.changed().await.is_ok() {}
    consumer.shutdown().await.unwrap();
    assert_eq!(
        *health.borrow_and_update(),
        switchboard::ConsumerHealth::Stopped
    );
}

#[path = "bus/liveness.rs"]
mod liveness;

#[path = "bus/handlers.rs"]
mod handlers;

#[path = "bus/clean_exit.rs"]
mod clean_exit;

#[path = "common/ordering.rs"]
mod ordering_scenario;

#[path = "bus/ordering.rs"]
mod ordering;

#[path = "bus/batch.rs"]
mod batch;

#[path = "bus/batch_keyed.rs"]
mod batch_keyed;

#[path = "bus/stats.rs"]
mod stats;

#[path = "bus/ack_in_flight.rs"]
mod ack_in_flight;
