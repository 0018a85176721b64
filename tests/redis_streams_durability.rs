//! SPEC §6.1: with AOF (`appendfsync always`), every event whose publish
//! returned `Ok` survives a SIGKILL of Redis and is delivered; only entries
//! not yet acknowledged may come twice.
//!
//! The test runs its own `redis-server` on a free port in a temporary
//! directory (a guard kills it if the test panics) and never touches the
//! shared Redis.

use std::collections::{BTreeMap, BTreeSet};
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use switchboard::transport::redis_streams::{RedisStreamsConfig, RedisStreamsTransport};
use switchboard::{Publisher, RawMessage, SubscribeOptions, Subscriber, Topology, Transport};
use tokio::sync::{Mutex, Notify, mpsc};

const EVENTS: u64 = 10_000;
/// The server is killed once this many publishes have returned `Ok`.
const KILL_AFTER: u64 = 4_000;
const PUBLISHERS: u64 = 4;
const PATIENCE: Duration = Duration::from_secs(120);

/// A private `redis-server` with AOF on; killed (SIGKILL) when dropped.
struct RedisServer {
    port: u16,
    dir: PathBuf,
    child: Option<Child>,
}

impl RedisServer {
    fn start() -> Self {
        let port = free_port();
        let dir = std::env::temp_dir().join(format!("sb-durability-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let mut server = Self {
            port,
            dir,
            child: None,
        };
        server.spawn();
        server
    }

    fn spawn(&mut self) {
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args([
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
                "--save",
                "",
            ])
            .arg("--dir")
            .arg(&self.dir)
            .args(["--logfile", "redis.log"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start redis-server (is it installed?)");
        self.child = Some(child);
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// SIGKILL: no shutdown, no final fsync.
    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().expect("SIGKILL redis-server");
            child.wait().expect("reap redis-server");
        }
    }

    /// Polls PING until it answers, failing after a deadline.
    async fn wait_until_up(&self) {
        let client = redis::Client::open(self.url()).expect("client");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(mut conn) = client.get_multiplexed_async_connection().await {
                let pong: redis::RedisResult<String> =
                    redis::cmd("PING").query_async(&mut conn).await;
                if pong.is_ok_and(|pong| pong == "PONG") {
                    return;
                }
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "redis-server on port {} did not answer PING within 30 s",
                self.port
            );
            // Polling a process we started; nothing to wait on instead.
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("a free port");
    listener.local_addr().expect("address").port()
}

#[derive(Default)]
struct Ledger {
    /// Seqs whose publish returned Ok, and whether it took more than one try
    /// (an earlier try that failed may still have been stored: a duplicate
    /// entry, not a redelivery).
    published: BTreeMap<u64, bool>,
    /// Deliveries per seq.
    delivered: BTreeMap<u64, u32>,
    /// Seqs whose ack returned Ok, and how many deliveries had been seen then.
    acked: BTreeMap<u64, u32>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_acknowledged_publish_survives_a_sigkill() {
    let mut server = RedisServer::start();
    server.wait_until_up().await;
    let config = RedisStreamsConfig::default()
        .with_claim_idle(Duration::from_secs(1))
        .with_block(Duration::from_millis(500))
        .with_response_timeout(Duration::from_secs(2));
    let transport = Arc::new(
        RedisStreamsTransport::connect_with(&server.url(), config)
            .await
            .expect("connect"),
    );
    assert!(
        transport.capabilities().persistent,
        "AOF with appendfsync always is persistent"
    );
    let topic = "durability.checked";
    transport
        .declare(&Topology::new().with_groups(topic, ["reader"]))
        .await
        .expect("declare");

    let ledger = Arc::new(Mutex::new(Ledger::default()));
    let (delivered_tx, mut delivered_rx) = mpsc::unbounded_channel::<u64>();
    let mut subscription = transport
        .subscribe(topic, SubscribeOptions::new("reader").with_prefetch(256))
        .await
        .expect("subscribe");
    let consumer = {
        let ledger = ledger.clone();
        tokio::spawn(async move {
            while let Some(delivery) = subscription.recv().await {
                let seq: u64 = std::str::from_utf8(delivery.body())
                    .expect("utf-8")
                    .parse()
                    .expect("a seq");
                let seen = {
                    let mut ledger = ledger.lock().await;
                    let count = ledger.delivered.entry(seq).or_insert(0);
                    *count += 1;
                    *count
                };
                if delivery.ack().await.is_ok() {
                    ledger.lock().await.acked.entry(seq).or_insert(seen);
                }
                // A failed ack drops the delivery: it stays pending and is
                // reclaimed once the server is back.
                let _ = delivered_tx.send(seq);
            }
        })
    };

    let ok_count = Arc::new(AtomicU64::new(0));
    let kill_now = Arc::new(Notify::new());
    let mut publishers = Vec::new();
    for publisher in 0..PUBLISHERS {
        let (transport, ledger, ok_count, kill_now) = (
            transport.clone(),
            ledger.clone(),
            ok_count.clone(),
            kill_now.clone(),
        );
        publishers.push(tokio::spawn(async move {
            for seq in (0..EVENTS).filter(|seq| seq % PUBLISHERS == publisher) {
                let mut tries = 0;
                loop {
                    tries += 1;
                    match transport
                        .publish(topic, RawMessage::new(seq.to_string()))
                        .await
                    {
                        Ok(()) => break,
                        Err(error) => {
                            assert!(error.is_retryable(), "{error}");
                            // The server is down: try again shortly.
                            tokio::time::sleep(Duration::from_millis(20)).await;
                        }
                    }
                }
                ledger.lock().await.published.insert(seq, tries > 1);
                if ok_count.fetch_add(1, Ordering::SeqCst) + 1 == KILL_AFTER {
                    kill_now.notify_one();
                }
            }
        }));
    }

    kill_now.notified().await;
    let killed_at = std::time::Instant::now();
    server.kill();
    let acked_before_kill = ledger.lock().await.acked.len();
    server.spawn();
    server.wait_until_up().await;
    let restarted_in = killed_at.elapsed();

    for publisher in publishers {
        publisher.await.expect("publisher");
    }
    let published_in = killed_at.elapsed();
    let published: BTreeSet<u64> = ledger.lock().await.published.keys().copied().collect();
    assert_eq!(
        published.len() as u64,
        EVENTS,
        "every publish returned Ok in the end"
    );

    let deadline = tokio::time::Instant::now() + PATIENCE;
    let mut received = BTreeSet::new();
    while received.len() < published.len() {
        match tokio::time::timeout_at(deadline, delivered_rx.recv()).await {
            Ok(Some(seq)) => {
                received.insert(seq);
            }
            _ => {
                let lost: Vec<_> = published.difference(&received).take(20).collect();
                panic!(
                    "{} of {} acknowledged publishes never delivered; first: {lost:?}",
                    published.len() - received.len(),
                    published.len()
                );
            }
        }
    }
    consumer.abort();
    println!(
        "durability: after the kill, up again in {restarted_in:?}, all published in \
         {published_in:?}, all delivered in {:?}",
        killed_at.elapsed()
    );

    let ledger = ledger.lock().await;
    let mut redelivered_after_ack = Vec::new();
    let mut duplicates = 0;
    for (seq, &count) in &ledger.delivered {
        if count > 1 {
            duplicates += 1;
            let retried_publish = ledger.published.get(seq).copied().unwrap_or(true);
            let acked_at = ledger.acked.get(seq).copied();
            // Allowed: the publish was retried (two entries), or no ack had
            // succeeded before the later delivery.
            if !retried_publish && acked_at.is_some_and(|at| at < count) {
                redelivered_after_ack.push(*seq);
            }
        }
    }
    println!(
        "durability: {} published Ok, {} delivered, 0 lost, {duplicates} delivered more than once, \
         {acked_before_kill} acked before the kill",
        published.len(),
        received.len(),
    );
    assert!(
        acked_before_kill > 0,
        "the consumer was reading when the server died"
    );
    assert!(
        redelivered_after_ack.is_empty(),
        "delivered again after a successful ack: {redelivered_after_ack:?}"
    );
}
