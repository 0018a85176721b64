//! Every metric of `switchboard::observe::metrics` is emitted with its
//! labels (captured with metrics-util's DebuggingRecorder, installed for the
//! test's thread; each test runs on its own current-thread runtime).

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use common::{TradeExecuted, spec_trade};
use metrics_util::debugging::{DebugValue, DebuggingRecorder, Snapshotter};
use switchboard::config::{CircuitBreakerConfig, RetryConfig};
use switchboard::middleware::Resilience;
use switchboard::middleware::circuit_breaker::CircuitBreakerLayer;
use switchboard::middleware::dead_letter::DeadLetterAdmin;
use switchboard::middleware::retry::RetryLayer;
use switchboard::observe::metrics::*;
use switchboard::observe::{BudgetConfig, CallMetricsLayer, LatencyBudgets};
use switchboard::{
    Error, ErrorKind, EventBus, EventEnvelope, MemoryTransport, Message, SubscribeOptions,
    handler_fn,
};
use tokio::sync::mpsc;
use tower::{Service, ServiceBuilder, ServiceExt, service_fn};

struct Recorder {
    snapshotter: Snapshotter,
    _guard: metrics::LocalRecorderGuard<'static>,
}

impl Recorder {
    fn install() -> Self {
        let recorder: &'static DebuggingRecorder = Box::leak(Box::new(DebuggingRecorder::new()));
        let snapshotter = recorder.snapshotter();
        let guard = metrics::set_default_local_recorder(recorder);
        Self {
            snapshotter,
            _guard: guard,
        }
    }

    /// Every metric recorded since the last snapshot (the recorder drains
    /// counters and histograms on each one): name, sorted labels, value.
    fn take(&self) -> Snapshot {
        let metrics = self
            .snapshotter
            .snapshot()
            .into_vec()
            .into_iter()
            .map(|(key, _, _, value)| {
                let mut labels: Vec<_> = key
                    .key()
                    .labels()
                    .map(|label| (label.key().to_owned(), label.value().to_owned()))
                    .collect();
                labels.sort();
                (key.key().name().to_owned(), labels, value)
            })
            .collect();
        Snapshot(metrics)
    }
}

/// Sorted `(label, value)` pairs.
type Labels = Vec<(String, String)>;

#[derive(Debug)]
struct Snapshot(Vec<(String, Labels, DebugValue)>);

impl Snapshot {
    fn find(&self, name: &str, pairs: &[(&str, &str)]) -> &DebugValue {
        let wanted = labels(pairs);
        self.0
            .iter()
            .find(|(found, labels, _)| found == name && *labels == wanted)
            .map(|(.., value)| value)
            .unwrap_or_else(|| panic!("no {name} {wanted:?} in {self:#?}"))
    }

    #[cfg(feature = "redis-streams")]
    fn has(&self, name: &str, pairs: &[(&str, &str)]) -> bool {
        let wanted = labels(pairs);
        self.0
            .iter()
            .any(|(found, labels, _)| found == name && *labels == wanted)
    }

    fn counter(&self, name: &str, pairs: &[(&str, &str)]) -> u64 {
        match self.find(name, pairs) {
            DebugValue::Counter(count) => *count,
            other => panic!("{name} is {other:?}"),
        }
    }

    fn gauge(&self, name: &str, pairs: &[(&str, &str)]) -> f64 {
        match self.find(name, pairs) {
            DebugValue::Gauge(value) => value.0,
            other => panic!("{name} is {other:?}"),
        }
    }

    fn samples(&self, name: &str, pairs: &[(&str, &str)]) -> usize {
        match self.find(name, pairs) {
            DebugValue::Histogram(values) => values.len(),
            other => panic!("{name} is {other:?}"),
        }
    }
}

fn labels(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    let mut labels: Vec<_> = pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    labels.sort();
    labels
}

fn memory_bus() -> EventBus {
    EventBus::new(Arc::new(MemoryTransport::new()), "trading-service")
}

#[tokio::test]
async fn publish_and_consume_are_counted_and_timed_per_transport_topic_and_group() {
    let recorder = Recorder::install();
    let bus = memory_bus();
    let attempts = Arc::new(AtomicU32::new(0));
    let (done, mut handled) = mpsc::unbounded_channel();
    let consumer = bus
        .subscribe(
            SubscribeOptions::new("game"),
            handler_fn(move |_: Message<TradeExecuted>| {
                let (done, attempts) = (done.clone(), attempts.clone());
                async move {
                    let attempt = attempts.fetch_add(1, Ordering::SeqCst);
                    done.send(()).ok();
                    match attempt {
                        0 => Err(Error::transient("busy").with_requeue(Duration::from_millis(1))),
                        1 => Ok(()),
                        _ => Err(Error::permanent("bad trade")),
                    }
                }
            }),
        )
        .await
        .unwrap();
    bus.publish(spec_trade()).await.unwrap(); // nacked, then acked
    bus.publish(spec_trade()).await.unwrap(); // dead-lettered
    for _ in 0..3 {
        handled.recv().await.unwrap();
    }
    consumer.shutdown().await.unwrap();

    let topic = ("topic", "trade.executed");
    let transport = ("transport", "memory");
    let seen = recorder.take();
    let ok = ("outcome", "ok");
    assert_eq!(seen.counter(PUBLISH_TOTAL, &[transport, topic, ok]), 2);
    assert_eq!(seen.samples(PUBLISH_DURATION, &[transport, topic, ok]), 2);
    let group = ("group", "game");
    for outcome in ["nack", "ack", "dead_letter"] {
        let labels = [transport, topic, group, ("outcome", outcome)];
        assert_eq!(seen.counter(CONSUME_TOTAL, &labels), 1, "{outcome}");
        assert_eq!(seen.samples(CONSUME_DURATION, &labels), 1, "{outcome}");
    }
    assert_eq!(
        seen.counter(DEAD_LETTERS_TOTAL, &[transport, topic, group]),
        1
    );

    // The admin's listing of the whole queue sets its depth; redrive empties it.
    let admin = DeadLetterAdmin::new(bus.transport().clone());
    assert_eq!(admin.list("trade.executed", 100).await.unwrap().len(), 1);
    assert_eq!(
        recorder
            .take()
            .gauge(DEAD_LETTER_DEPTH, &[transport, topic]),
        1.0
    );
    admin.redrive_all("trade.executed").await.unwrap();
    assert_eq!(
        recorder
            .take()
            .gauge(DEAD_LETTER_DEPTH, &[transport, topic]),
        0.0
    );
}

#[tokio::test]
async fn a_failed_publish_is_counted_as_an_error() {
    let recorder = Recorder::install();
    let bus = memory_bus().with_codec(switchboard::Codec::default().with_max_size(10));
    bus.publish(spec_trade()).await.unwrap_err();
    assert_eq!(
        recorder.take().counter(
            PUBLISH_TOTAL,
            &[
                ("transport", "memory"),
                ("topic", "trade.executed"),
                ("outcome", "error")
            ]
        ),
        1
    );
}

#[tokio::test]
async fn calls_are_counted_and_timed_per_path_transport_and_outcome() {
    let recorder = Recorder::install();
    let budgets = LatencyBudgets::new(&BudgetConfig::spec());
    let market = ServiceBuilder::new()
        .layer(
            CallMetricsLayer::new("trading_market", "grpc")
                .with_budget(budgets.recorder("trading_market").unwrap()),
        )
        .service(service_fn(|symbol: &'static str| async move {
            match symbol {
                "AAPL" => Ok(150.0),
                _ => Err(Error::new(ErrorKind::Timeout, "slow")),
            }
        }));
    market.clone().oneshot("AAPL").await.unwrap();
    market.clone().oneshot("AAPL").await.unwrap();
    market.oneshot("XXX").await.unwrap_err();
    let path = [("path", "trading_market"), ("transport", "grpc")];
    let seen = recorder.take();
    let ok = [path[0], path[1], ("outcome", "ok")];
    let timeout = [path[0], path[1], ("outcome", "timeout")];
    assert_eq!(seen.counter(CALL_TOTAL, &ok), 2);
    assert_eq!(seen.counter(CALL_TOTAL, &timeout), 1);
    assert_eq!(seen.samples(CALL_DURATION, &ok), 2);
    assert_eq!(seen.samples(CALL_DURATION, &timeout), 1);
    // The budget's histogram saw all three calls.
    let reports = budgets.check_now();
    assert_eq!(reports.len(), 1);
    assert_eq!(reports[0].count, 3);
    let seen = recorder.take();
    let p99 = seen.gauge(LATENCY_P99, &[("path", "trading_market")]);
    assert!(p99 < 0.05, "{p99}");
    // Beside it, the budget the alert rules compare it with.
    let budget = BudgetConfig::spec()
        .budget("trading_market")
        .unwrap()
        .as_secs_f64();
    assert_eq!(
        seen.gauge(LATENCY_BUDGET, &[("path", "trading_market")]),
        budget
    );
}

#[tokio::test(start_paused = true)]
async fn retries_are_counted_by_the_kind_that_caused_them() {
    let recorder = Recorder::install();
    let flaky = |retry: RetryLayer| {
        let tries = Arc::new(AtomicU32::new(0));
        let counted = tries.clone();
        let service = ServiceBuilder::new()
            .layer(retry)
            .service(service_fn(move |_: ()| {
                let tries = counted.clone();
                async move {
                    match tries.fetch_add(1, Ordering::SeqCst) {
                        0 => Err(Error::new(ErrorKind::Unavailable, "503")),
                        1 => Err(Error::new(ErrorKind::Timeout, "slow")),
                        _ => Ok(()),
                    }
                }
            }));
        (service, tries)
    };
    // A timeout may have taken effect: retried only for an idempotent call.
    let (idempotent, tries) = flaky(RetryLayer::new(RetryConfig::default()).idempotent());
    idempotent.oneshot(()).await.unwrap();
    assert_eq!(tries.load(Ordering::SeqCst), 3);
    let seen = recorder.take();
    assert_eq!(seen.counter(RETRIES_TOTAL, &[("kind", "unavailable")]), 1);
    assert_eq!(seen.counter(RETRIES_TOTAL, &[("kind", "timeout")]), 1);

    let (not_idempotent, tries) = flaky(RetryLayer::new(RetryConfig::default()));
    not_idempotent.oneshot(()).await.unwrap_err();
    assert_eq!(tries.load(Ordering::SeqCst), 2);
    let seen = recorder.take();
    assert_eq!(seen.counter(RETRIES_TOTAL, &[("kind", "unavailable")]), 1);
    assert_eq!(
        seen.counter(RETRIES_REFUSED_TOTAL, &[("reason", "may_have_applied")]),
        1
    );
}

#[tokio::test(start_paused = true)]
async fn breaker_state_changes_are_counted_and_the_state_is_a_gauge() {
    let recorder = Recorder::install();
    let config = CircuitBreakerConfig::default().with_failure_threshold(2);
    let mut market = ServiceBuilder::new()
        .layer(CircuitBreakerLayer::named("market", config))
        .service(service_fn(|fail: bool| async move {
            if fail {
                Err(Error::new(ErrorKind::Unavailable, "down"))
            } else {
                Ok(())
            }
        }));
    for _ in 0..2 {
        market.ready().await.unwrap().call(true).await.unwrap_err();
    }
    let breaker = ("breaker", "market");
    let seen = recorder.take();
    assert_eq!(seen.gauge(BREAKER_STATE, &[breaker]), 2.0);
    // What the "open too long" alert compares: since when, and the timeout.
    let opened = seen.gauge(BREAKER_OPEN_SINCE, &[breaker]);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    assert!(
        (now - 60.0..=now + 1.0).contains(&opened),
        "{opened} vs {now}"
    );
    assert_eq!(
        seen.gauge(BREAKER_RESET_TIMEOUT, &[breaker]),
        config.reset_timeout_ms as f64 / 1e3
    );
    assert_eq!(
        seen.counter(BREAKER_TRANSITIONS_TOTAL, &[breaker, ("to", "open")]),
        1
    );
    tokio::time::advance(Duration::from_millis(config.reset_timeout_ms + 1)).await;
    market.ready().await.unwrap().call(false).await.unwrap();
    let seen = recorder.take();
    assert_eq!(
        seen.counter(BREAKER_TRANSITIONS_TOTAL, &[breaker, ("to", "half_open")]),
        1
    );
    assert_eq!(
        seen.counter(BREAKER_TRANSITIONS_TOTAL, &[breaker, ("to", "closed")]),
        1
    );
    assert_eq!(seen.gauge(BREAKER_STATE, &[breaker]), 0.0);
    assert_eq!(seen.gauge(BREAKER_OPEN_SINCE, &[breaker]), 0.0);
}

#[tokio::test]
async fn dedupe_hits_are_counted_per_topic_and_group() {
    let recorder = Recorder::install();
    let bus = memory_bus();
    let (done, mut handled) = mpsc::unbounded_channel();
    let resilience = Resilience::default(); // one dedupe store for both consumers
    let handler = |done: mpsc::UnboundedSender<()>| {
        resilience.consumer(
            "ledger",
            handler_fn(move |_: Message<TradeExecuted>| {
                let done = done.clone();
                async move {
                    done.send(()).ok();
                    Ok::<_, Error>(())
                }
            }),
        )
    };
    let envelope = EventEnvelope::new("trading-service", spec_trade());
    let consumer = bus
        .subscribe(SubscribeOptions::new("game"), handler(done.clone()))
        .await
        .unwrap();
    bus.publish_envelope(&envelope).await.unwrap();
    handled.recv().await.unwrap();
    consumer.shutdown().await.unwrap(); // settled: the mark is done

    let consumer = bus
        .subscribe(SubscribeOptions::new("game"), handler(done))
        .await
        .unwrap();
    bus.publish_envelope(&envelope).await.unwrap(); // the duplicate: skipped
    bus.publish(spec_trade()).await.unwrap(); // a new event: handled
    handled.recv().await.unwrap();
    consumer.shutdown().await.unwrap(); // the duplicate is settled too
    assert!(
        handled.try_recv().is_err(),
        "the duplicate never reached the handler"
    );
    assert_eq!(
        recorder.take().counter(
            DEDUPE_HITS_TOTAL,
            &[
                ("topic", "trade.executed"),
                ("group", "game"),
                ("state", "done")
            ]
        ),
        1
    );
}

/// A subscription samples its group's lag: on the memory bus, the queue
/// depth when it takes a message (at most once a second).
#[tokio::test]
async fn each_subscription_reports_its_groups_lag() {
    let recorder = Recorder::install();
    let transport = Arc::new(MemoryTransport::new());
    let bus = EventBus::new(transport.clone(), "trading-service");
    bus.declare(
        &switchboard::Topology::new()
            .with_groups(<TradeExecuted as switchboard::Event>::TYPE, ["game"]),
    )
    .await
    .unwrap();
    for _ in 0..5 {
        bus.publish(spec_trade()).await.unwrap();
    }
    assert_eq!(
        transport.depth(<TradeExecuted as switchboard::Event>::TYPE, "game"),
        5
    );
    let (done, mut handled) = mpsc::unbounded_channel();
    let consumer = bus
        .subscribe(
            SubscribeOptions::new("game"),
            handler_fn(move |_: Message<TradeExecuted>| {
                let done = done.clone();
                async move {
                    done.send(()).ok();
                    Ok::<_, Error>(())
                }
            }),
        )
        .await
        .unwrap();
    for _ in 0..5 {
        handled.recv().await.unwrap();
    }
    consumer.shutdown().await.unwrap();
    let lag = recorder.take().gauge(
        switchboard::observe::metrics::CONSUMER_LAG,
        &[
            ("transport", "memory"),
            ("topic", <TradeExecuted as switchboard::Event>::TYPE),
            ("group", "game"),
        ],
    );
    // Sampled as the first message was taken: the other four still queued.
    assert_eq!(lag, 4.0);
}

/// A Redis Streams subscription samples its group's lag (`XINFO GROUPS`)
/// every `lag_every`: entries of the stream not yet delivered to the group.
#[cfg(feature = "redis-streams")]
#[tokio::test]
async fn a_redis_streams_subscription_reports_its_groups_lag() {
    use switchboard::transport::redis_streams::{RedisStreamsConfig, RedisStreamsTransport};
    use switchboard::{Publisher, RawMessage, Subscriber, Topology, Transport};

    let recorder = Recorder::install();
    let config = RedisStreamsConfig::default()
        .with_key_prefix(format!("sb-test-{}:", uuid::Uuid::new_v4().simple()))
        .with_lag_every(Duration::from_millis(20));
    let url =
        std::env::var("SWITCHBOARD_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    let transport = RedisStreamsTransport::connect_with(&url, config)
        .await
        .expect("connect to Redis");
    let topic = format!("lag-{}", uuid::Uuid::new_v4().simple());
    transport
        .declare(&Topology::new().with_groups(topic.clone(), ["game"]))
        .await
        .unwrap();
    for n in 0..5 {
        transport
            .publish(&topic, RawMessage::new(n.to_string()))
            .await
            .unwrap();
    }
    // Prefetch 1: one entry delivered to the group, four still to come.
    let mut subscription = transport
        .subscribe(&topic, SubscribeOptions::new("game").with_prefetch(1))
        .await
        .unwrap();
    let held = subscription.recv().await.expect("one delivery");
    let labels = [
        ("transport", "redis-streams"),
        ("topic", topic.as_str()),
        ("group", "game"),
    ];
    // The keeper samples on its own timer: look until a sample shows the
    // delivery (the first may predate it), within a deadline.
    let lag = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let snapshot = recorder.take();
            if snapshot.has(CONSUMER_LAG, &labels) {
                let lag = snapshot.gauge(CONSUMER_LAG, &labels);
                if lag < 5.0 {
                    return lag;
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("a lag sample after the first delivery");
    // Redis's own count; 4 when it can tell exactly (prefetch 1 keeps the
    // subscription from reading more), which Redis 7.0 does not promise
    // under every interleaving of reads and claims.
    assert!((0.0..=4.0).contains(&lag), "lag {lag}");
    held.ack().await.unwrap();
    subscription.shutdown().await.unwrap();
}

// ------------------------------------------------------ the /metrics route

#[cfg(feature = "http")]
mod scrape {
    use metrics_exporter_prometheus::PrometheusBuilder;
    use switchboard::observe::metrics;

    /// A scrape over a real connection returns what the exporter renders,
    /// in the Prometheus text format, and only at `GET /metrics`.
    #[tokio::test]
    async fn the_metrics_route_serves_the_exporters_text() {
        let recorder = PrometheusBuilder::new().build_recorder();
        let prometheus = recorder.handle();
        ::metrics::with_local_recorder(&recorder, || {
            metrics::describe();
            ::metrics::counter!(metrics::DEAD_LETTERS_TOTAL, "topic" => "trades").increment(3);
        });
        let app = axum::Router::new()
            .route("/health", axum::routing::get(|| async { "ok" }))
            .merge(metrics::router(move || prometheus.render()));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await });

        let client = reqwest::Client::new();
        let response = client.get(format!("{url}/metrics")).send().await.unwrap();
        assert_eq!(response.status(), 200);
        assert_eq!(
            response.headers()["content-type"],
            metrics::PROMETHEUS_CONTENT_TYPE
        );
        let text = response.text().await.unwrap();
        assert!(
            text.contains(r#"switchboard_dead_letters_total{topic="trades"} 3"#),
            "{text}"
        );
        assert!(
            text.contains("# HELP switchboard_dead_letters_total"),
            "{text}"
        );

        let post = client.post(format!("{url}/metrics")).send().await.unwrap();
        assert_eq!(post.status(), 405, "a scrape is a GET");
        let health = client.get(format!("{url}/health")).send().await.unwrap();
        assert_eq!(
            health.text().await.unwrap(),
            "ok",
            "the rest of the app is untouched"
        );
    }
}

#[path = "observe_metrics/alerting.rs"]
mod alerting;
