//! A Redis Streams cut: publisher and consumer both reach Redis through a
//! proxy, and every connection is cut twice while events flow. No event is
//! lost, and the consumer resumes by itself each time.
//!
//! `scripts/chaos` runs it (selected by `cut::`): 10 000 events and 5 s
//! cuts in the long run; `--short` (and a plain `cargo test`) 2 000 events
//! and 1 s cuts. `SWITCHBOARD_CUT_EVENTS` and `SWITCHBOARD_CUT_SECS`
//! override both. It prints one line of figures.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use switchboard::testing::proxy::FaultProxy;
use switchboard::transport::redis_streams::{RedisStreamsConfig, RedisStreamsTransport};
use switchboard::{Error, Event, EventBus, Message, SubscribeOptions, Topology, handler_fn};
use tokio::sync::watch;

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Numbered {
    n: u64,
}

impl Event for Numbered {
    const TYPE: &'static str = "cut.numbered";
    const VERSION: &'static str = "1.0";
}

fn setting(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|value| value.parse().ok())
        .unwrap_or(default)
}

/// What the handler has seen: distinct events, and every delivery.
#[derive(Default)]
struct Seen {
    distinct: HashSet<u64>,
    deliveries: u64,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_connection_cut_twice_while_events_flow_loses_none() {
    let events = setting("SWITCHBOARD_CUT_EVENTS", 2_000);
    let outage = Duration::from_secs(setting("SWITCHBOARD_CUT_SECS", 1));
    let patience = outage * 4 + Duration::from_secs(60);

    let target = super::redis_url()
        .trim_start_matches("redis://")
        .trim_end_matches('/')
        .parse()
        .expect("a host:port Redis url");
    let proxy = FaultProxy::start(target).await.expect("start the proxy");
    let config = RedisStreamsConfig::default()
        .with_key_prefix(format!("sb-test-{}:", uuid::Uuid::new_v4().simple()))
        // Entries handed out when a cut made their ack fail come back soon.
        .with_claim_idle(Duration::from_secs(1))
        .with_block(Duration::from_millis(500));
    let transport =
        RedisStreamsTransport::connect_with(&format!("redis://{}", proxy.addr()), config)
            .await
            .expect("connect through the proxy");
    let bus = EventBus::new(Arc::new(transport), "cut-proof")
        // Longer than a cut: a publish caught by one waits it out.
        .with_publish_deadline(outage * 3 + Duration::from_secs(10));
    let group = "cut-consumers";
    bus.declare(&Topology::new().with_event::<Numbered, _>([group]))
        .await
        .expect("declare");

    let seen = Arc::new(Mutex::new(Seen::default()));
    let (received, mut receipts) = watch::channel(0u64);
    let consumer = {
        let (seen, received) = (seen.clone(), received.clone());
        bus.subscribe::<Numbered, _>(
            SubscribeOptions::new(group)
                .with_prefetch(64)
                .with_concurrency(8),
            handler_fn(move |message: Message<Numbered>| {
                let (seen, received) = (seen.clone(), received.clone());
                async move {
                    let distinct = {
                        let mut seen = seen.lock().unwrap();
                        seen.deliveries += 1;
                        seen.distinct.insert(message.payload().n);
                        seen.distinct.len() as u64
                    };
                    received.send_replace(distinct);
                    Ok::<_, Error>(())
                }
            }),
        )
        .await
        .expect("subscribe")
    };

    let (published, mut progress) = watch::channel(0u64);
    let publishing = {
        let bus = bus.clone();
        tokio::spawn(async move {
            for n in 0..events {
                bus.publish(Numbered { n }).await?;
                published.send_replace(n + 1);
            }
            Ok::<_, Error>(())
        })
    };

    let started = Instant::now();
    let mut resumes = Vec::new();
    for cut in 1..=2u64 {
        // Each cut lands mid-stream: a third, then two thirds, published.
        let at = events * cut / 3;
        tokio::time::timeout(patience, progress.wait_for(|&sent| sent >= at))
            .await
            .expect("publishing reaches the cut")
            .expect("the publisher is running");
        proxy.cut();
        // The outage itself: this is how long Redis is out of reach.
        tokio::time::sleep(outage).await;
        let before = *receipts.borrow_and_update();
        proxy.restore();
        let restored = Instant::now();
        tokio::select! {
            resumed = tokio::time::timeout(patience, receipts.wait_for(|&got| got > before)) => {
                resumed
                    .expect("the consumer resumes by itself")
                    .expect("the consumer is running");
            }
            failure = consumer.closed() => panic!("the consumer stopped: {failure:?}"),
        }
        resumes.push(restored.elapsed());
    }

    publishing
        .await
        .expect("publisher task")
        .expect("every publish rides out the cuts");
    tokio::select! {
        all = tokio::time::timeout(patience, receipts.wait_for(|&got| got >= events)) => {
            all.expect("every event arrives").expect("the consumer is running");
        }
        failure = consumer.closed() => panic!("the consumer stopped: {failure:?}"),
    }
    let elapsed = started.elapsed();
    consumer.shutdown().await.expect("shutdown");

    let seen = seen.lock().unwrap();
    let lost = events - seen.distinct.len() as u64;
    assert_eq!(lost, 0, "events lost");
    assert!((0..events).all(|n| seen.distinct.contains(&n)));
    println!(
        "redis streams cut: {events} sent, {} received ({} deliveries, {} again), {lost} lost; \
         2 cuts of {} s; resumed {} ms and {} ms after each; {:.1} s in all",
        seen.distinct.len(),
        seen.deliveries,
        seen.deliveries - seen.distinct.len() as u64,
        outage.as_secs(),
        resumes[0].as_millis(),
        resumes[1].as_millis(),
        elapsed.as_secs_f64(),
    );
}
