//! What the consume loop counts for status pages: in flight while the
//! handler runs, handled and failed once it ends (a panic is a failure),
//! and the last error.

use std::sync::Arc;
use std::time::Duration;

use switchboard::{Error, EventBus, Message, SubscribeOptions, handler_fn};
use tokio::sync::Semaphore;

use super::{Ping, bus};

/// Polls `done` until it holds (the counters move as the loop settles).
async fn until(what: &str, mut done: impl FnMut() -> bool) {
    tokio::time::timeout(Duration::from_secs(5), async {
        while !done() {
            tokio::task::yield_now().await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("never: {what}"));
}

async fn publish(bus: &EventBus, n: u64) {
    bus.publish(Ping { n }).await.expect("publish");
}

#[tokio::test]
async fn in_flight_handled_failed_and_the_last_error_are_counted() {
    let (bus, _transport) = bus();
    let gate = Arc::new(Semaphore::new(0));
    let handler = {
        let gate = gate.clone();
        handler_fn(move |message: Message<Ping>| {
            let gate = gate.clone();
            async move {
                let _pass = gate.acquire().await.expect("the gate lives");
                match message.payload().n {
                    2 => Err(Error::permanent("two is refused")),
                    3 => panic!("three breaks the handler"),
                    _ => Ok(()),
                }
            }
        })
    };
    let consumer = bus
        .subscribe(SubscribeOptions::new("g").with_concurrency(3), handler)
        .await
        .expect("subscribe");
    let monitor = consumer.monitor();
    for n in 1..=3 {
        publish(&bus, n).await;
    }
    until("three in flight", || monitor.stats().in_flight == 3).await;
    assert_eq!((monitor.stats().handled, monitor.stats().failed), (0, 0));

    gate.add_permits(3);
    until("all three finished", || monitor.stats().in_flight == 0).await;
    until("all three counted", || {
        let stats = monitor.stats();
        stats.handled + stats.failed == 3
    })
    .await;
    let stats = consumer.stats();
    assert_eq!((stats.in_flight, stats.handled, stats.failed), (0, 1, 2));
    let last = stats.last_error.expect("a last error");
    assert!(
        last.message.contains("two is refused") || last.message.contains("panicked"),
        "{last:?}"
    );
    consumer.shutdown().await.expect("shutdown");
}
