//! Per-key order through the typed bus, shared by the test binaries of the
//! transports: 100 keys × 100 messages at concurrency 16, some first
//! messages of a key retried after a delay.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use switchboard::{
    Error, Event, EventBus, EventEnvelope, Message, OrderingKey, SubscribeOptions, Topology,
    Transport, handler_fn,
};
use tokio::sync::mpsc;

/// A message of `key`, the `seq`-th of its key.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Keyed {
    pub key: String,
    pub seq: u32,
}

impl Event for Keyed {
    const TYPE: &'static str = "test.keyed";
    const VERSION: &'static str = "1.0";
}

/// Orders by the payload's `key`.
pub fn by_key() -> OrderingKey {
    OrderingKey::of(|envelope: &EventEnvelope<Keyed>| envelope.payload().key.clone())
}

/// A bus in a namespace of its own, with `group` declared for [`Keyed`].
pub async fn keyed_bus(transport: Arc<dyn Transport>, group: &str) -> EventBus {
    let namespace = format!("ordering-{}", uuid::Uuid::new_v4().simple());
    let bus = EventBus::new(transport, "ordering-test").with_namespace(namespace);
    bus.declare(&Topology::new().with_event::<Keyed, _>([group.to_owned()]))
        .await
        .expect("declare");
    bus
}

/// 100 keys × 100 messages, published round-robin over the keys, consumed
/// at concurrency 16 ordered by key; every 25th message of a key fails its
/// first attempt with a retry after 5 ms. Each key's messages are handled
/// in publish order, and more than one handler ran at once.
pub async fn hundred_keys_keep_their_order(transport: Arc<dyn Transport>) {
    const KEYS: u32 = 100;
    const PER_KEY: u32 = 100;
    let group = "ordered";
    let bus = keyed_bus(transport, group).await;
    let handled: Arc<Mutex<HashMap<String, Vec<u32>>>> = Arc::default();
    let (running, peak) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let (done, mut dones) = mpsc::unbounded_channel();
    let handler = {
        let (handled, running, peak) = (handled.clone(), running.clone(), peak.clone());
        handler_fn(move |message: Message<Keyed>| {
            let (handled, running, peak, done) =
                (handled.clone(), running.clone(), peak.clone(), done.clone());
            async move {
                let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                peak.fetch_max(now, Ordering::SeqCst);
                // Lets the other handlers in flight run meanwhile.
                tokio::task::yield_now().await;
                let Keyed { key, seq } = message.payload().clone();
                running.fetch_sub(1, Ordering::SeqCst);
                if seq % 25 == 0 && message.attempt() == 1 {
                    return Err(Error::transient("not yet").with_requeue(Duration::from_millis(5)));
                }
                handled.lock().unwrap().entry(key).or_default().push(seq);
                done.send(()).ok();
                Ok(())
            }
        })
    };
    let options = SubscribeOptions::new(group)
        .with_concurrency(16)
        .with_prefetch(64)
        .with_ordering_key(by_key());
    let consumer = bus.subscribe(options, handler).await.expect("subscribe");
    for seq in 0..PER_KEY {
        let round = (0..KEYS).map(|key| Keyed {
            key: format!("key-{key}"),
            seq,
        });
        bus.publish_batch(round).await.expect("publish");
    }
    let all = (KEYS * PER_KEY) as usize;
    tokio::time::timeout(Duration::from_secs(120), async {
        for _ in 0..all {
            dones.recv().await.expect("the consumer runs");
        }
    })
    .await
    .unwrap_or_else(|_| {
        let handled: usize = handled.lock().unwrap().values().map(Vec::len).sum();
        panic!("only {handled} of {all} handled in time")
    });
    consumer.shutdown().await.expect("shutdown");
    let handled = handled.lock().unwrap();
    assert_eq!(handled.len(), KEYS as usize);
    let in_order: Vec<u32> = (0..PER_KEY).collect();
    for (key, seqs) in handled.iter() {
        assert_eq!(seqs, &in_order, "key {key} out of order");
    }
    let peak = peak.load(Ordering::SeqCst);
    assert!(peak > 1, "handlers never ran side by side (peak {peak})");
    assert!(
        peak <= 16,
        "more handlers at once than the concurrency: {peak}"
    );
}
