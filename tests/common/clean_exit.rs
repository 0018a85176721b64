//! A clean exit logs nothing alarming: connect, publish, consume,
//! `close().await`, with every tracing event of the process captured (all
//! targets, TRACE and up: switchboard's, lapin's io loop thread, redis').
//!
//! A tracing subscriber for the whole process is the only way to hear
//! lapin's io loop, which runs on a thread of its own; other tests running
//! in parallel would be heard too. So the test runs itself again as a child
//! process that runs only this one test, and asserts there.

use std::fmt::Write as _;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use switchboard::{
    ConsumerHealth, ErrorKind, Event, EventBus, HealthState, Message, SubscribeOptions, Topology,
    Transport,
};
use tokio::sync::mpsc;
use tracing::field::{Field, Visit};
use tracing::{Event as TracingEvent, Level, Subscriber};
use tracing_subscriber::layer::{Context, Layer, SubscriberExt};

/// Set in the child process, which runs the scenario.
const CHILD: &str = "SWITCHBOARD_CLEAN_EXIT_CHILD";

/// How long the child may take before the parent gives up on it (a guard
/// against a hang, not a speed target).
const CHILD_DEADLINE: Duration = Duration::from_secs(120);

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Tick {
    pub n: u32,
}

impl Event for Tick {
    const TYPE: &'static str = "clean.tick";
    const VERSION: &'static str = "1.0";
}

/// One captured event: its level, target, and fields as `name=value `
/// (the message under `message`).
#[derive(Debug, Clone)]
pub struct Captured {
    pub level: Level,
    pub target: String,
    pub text: String,
}

impl std::fmt::Display for Captured {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}: {}", self.level, self.target, self.text)
    }
}

#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Vec<Captured>>>);

struct Text<'a>(&'a mut String);

impl Visit for Text<'_> {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        let _ = write!(self.0, "{}={value:?} ", field.name());
    }
}

impl<S: Subscriber> Layer<S> for Capture {
    fn on_event(&self, event: &TracingEvent<'_>, _: Context<'_, S>) {
        let mut text = String::new();
        event.record(&mut Text(&mut text));
        self.0.lock().unwrap().push(Captured {
            level: *event.metadata().level(),
            target: event.metadata().target().to_owned(),
            text,
        });
    }
}

/// Runs `scenario` in a child process that runs only the test
/// `test_name` (its path inside the test binary), under a subscriber that
/// captures every event, then asserts that no ERROR (any target) and no
/// switchboard WARN was logged — also while the runtime shut down, as at
/// the end of a process. Call it from a plain `#[test]`.
#[allow(dead_code)]
pub fn assert_clean_exit<F, Fut>(test_name: &str, scenario: F)
where
    F: FnOnce() -> Fut,
    Fut: Future<Output = ()>,
{
    assert_logs(test_name, scenario, |events| {
        let alarming: Vec<String> = events
            .iter()
            .filter(|event| {
                event.level == Level::ERROR
                    || (event.level == Level::WARN && event.target.starts_with("switchboard"))
            })
            .map(ToString::to_string)
            .collect();
        assert!(alarming.is_empty(), "a clean exit logged: {alarming:#?}");
    });
}

/// Runs `scenario` like [`assert_clean_exit`] and hands every event the
/// child process logged (the scenario and the runtime's shutdown) to
/// `check`, which asserts in the child.
#[allow(dead_code)]
pub fn assert_logs<F, Fut>(test_name: &str, scenario: F, check: impl FnOnce(&[Captured]))
where
    F: FnOnce() -> Fut,
    Fut: Future<Output = ()>,
{
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    if std::env::var_os(CHILD).is_some() {
        let capture = Capture::default();
        let subscriber = tracing_subscriber::registry().with(capture.clone());
        tracing::subscriber::set_global_default(subscriber).expect("the only subscriber");
        // Proves the capture hears TRACE; lapin logs there too, redis-rs
        // logs nothing through tracing.
        tracing::trace!(target: "clean_exit", "capturing");
        runtime.block_on(scenario());
        runtime.shutdown_timeout(Duration::from_secs(5));
        let events = capture.0.lock().unwrap().clone();
        assert!(
            events
                .iter()
                .any(|event| event.level == Level::TRACE && event.target == "clean_exit"),
            "the capture hears TRACE events"
        );
        check(&events);
        return;
    }
    let output = runtime.block_on(async {
        let child = tokio::process::Command::new(std::env::current_exe().unwrap())
            .args([test_name, "--exact", "--nocapture", "--test-threads=1"])
            .env(CHILD, "1")
            .kill_on_drop(true)
            .output();
        tokio::time::timeout(CHILD_DEADLINE, child)
            .await
            .expect("the child test finishes")
            .expect("the child test starts")
    });
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "the child test failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        stdout.contains("1 passed"),
        "the child ran the test: {stdout}"
    );
}

/// Connects nothing itself: over `transport`, declares, consumes
/// `count` ticks, closes, and checks what close promises.
#[allow(dead_code)]
pub async fn publish_consume_close(transport: Arc<dyn Transport>, count: u32) {
    let namespace = format!("clean-{}", uuid::Uuid::new_v4().simple());
    let bus = EventBus::new(transport.clone(), "clean-exit").with_namespace(namespace);
    bus.declare(&Topology::new().with_event::<Tick, _>(["readers"]))
        .await
        .unwrap();
    assert!(bus.health().is_up(), "{}", bus.health());
    let (seen, mut received) = mpsc::channel(count as usize);
    let consumer = bus
        .subscribe::<Tick, _>(
            SubscribeOptions::new("readers"),
            switchboard::handler_fn(move |message: Message<Tick>| {
                let seen = seen.clone();
                async move {
                    let _ = seen.send(message.payload().n).await;
                    Ok::<(), switchboard::Error>(())
                }
            }),
        )
        .await
        .unwrap();
    for n in 0..count {
        bus.publish(Tick { n }).await.unwrap();
    }
    let mut got = Vec::new();
    while got.len() < count as usize {
        got.push(received.recv().await.expect("a tick"));
    }
    got.sort_unstable();
    assert_eq!(got, (0..count).collect::<Vec<_>>());

    bus.close().await.unwrap();
    // The consumer ended with the subscription, on no error.
    assert!(consumer.closed().await.is_none());
    assert_eq!(consumer.health(), ConsumerHealth::Stopped);
    consumer.shutdown().await.unwrap();
    assert_eq!(bus.health().state, HealthState::Closed);
    let refused = bus.publish(Tick { n: 99 }).await.unwrap_err();
    assert_eq!(refused.kind(), ErrorKind::Closed);
    assert!(!refused.is_retryable());
    bus.close().await.expect("close is idempotent");
}
