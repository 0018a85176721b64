//! Latency budgets: configuration, the manual check and the periodic one.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use metrics_util::debugging::{DebugValue, DebuggingRecorder, Snapshotter};
use switchboard::ErrorKind;
use switchboard::observe::metrics::{BUDGET_BREACHES_TOTAL, LATENCY_P99};
use switchboard::observe::{BudgetConfig, LatencyBudgets};
use tokio::sync::Notify;
use tracing::field::{Field, Visit};
use tracing_subscriber::layer::{Context, SubscriberExt};

/// Collects the `path` field of every warning, and wakes whoever waits.
#[derive(Clone, Default)]
struct Warnings {
    paths: Arc<Mutex<Vec<String>>>,
    notify: Arc<Notify>,
}

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for Warnings {
    fn on_event(&self, event: &tracing::Event<'_>, _: Context<'_, S>) {
        if *event.metadata().level() != tracing::Level::WARN {
            return;
        }
        struct Path(Option<String>);
        impl Visit for Path {
            fn record_str(&mut self, field: &Field, value: &str) {
                if field.name() == "path" {
                    self.0 = Some(value.to_owned());
                }
            }
            fn record_debug(&mut self, _: &Field, _: &dyn std::fmt::Debug) {}
        }
        let mut path = Path(None);
        event.record(&mut path);
        self.paths.lock().unwrap().push(path.0.unwrap_or_default());
        self.notify.notify_one();
    }
}

impl Warnings {
    fn install(&self) -> tracing::subscriber::DefaultGuard {
        tracing::subscriber::set_default(tracing_subscriber::registry().with(self.clone()))
    }

    fn paths(&self) -> Vec<String> {
        self.paths.lock().unwrap().clone()
    }
}

fn recorder() -> (Snapshotter, metrics::LocalRecorderGuard<'static>) {
    let recorder: &'static DebuggingRecorder = Box::leak(Box::new(DebuggingRecorder::new()));
    (
        recorder.snapshotter(),
        metrics::set_default_local_recorder(recorder),
    )
}

#[derive(Debug, PartialEq)]
enum Value {
    Counter(u64),
    Gauge(f64),
    Histogram(usize),
}

/// The value of `name{path}` in a snapshot, if recorded.
fn value(snapshot: &[(String, String, DebugValue)], name: &str, path: &str) -> Option<Value> {
    snapshot
        .iter()
        .find(|(found, label, _)| found == name && label == path)
        .map(|(.., value)| match value {
            DebugValue::Counter(count) => Value::Counter(*count),
            DebugValue::Gauge(value) => Value::Gauge(value.0),
            DebugValue::Histogram(values) => Value::Histogram(values.len()),
        })
}

fn snapshot(snapshotter: &Snapshotter) -> Vec<(String, String, DebugValue)> {
    snapshotter
        .snapshot()
        .into_vec()
        .into_iter()
        .map(|(key, _, _, value)| {
            let path = key
                .key()
                .labels()
                .find(|label| label.key() == "path")
                .map(|label| label.value().to_owned())
                .unwrap_or_default();
            (key.key().name().to_owned(), path, value)
        })
        .collect()
}

#[test]
fn the_config_takes_a_budget_per_path_and_refuses_mistakes() {
    let config = BudgetConfig::from_yaml(
        "budgets:\n  gateway_service: 50\n  trading_market: 20\n  trading_game: 10\n  game_market: 50\n",
    )
    .unwrap();
    assert_eq!(config, BudgetConfig::spec());
    assert_eq!(
        config.budget("trading_game"),
        Some(Duration::from_millis(10))
    );
    assert_eq!(config.check_interval_ms, 10_000);
    let inline =
        BudgetConfig::from_yaml("budgets: { trading_market: 20 }\ncheck_interval_ms: 500").unwrap();
    assert_eq!(
        inline.budget("trading_market"),
        Some(Duration::from_millis(20))
    );
    assert_eq!(inline.check_interval_ms, 500);
    for (text, needle) in [
        ("budget: { trading_market: 20 }", "budget"),
        ("budgets: { trading_market: 0 }", "budgets.trading_market"),
        ("budgets: { Trading-Market: 20 }", "Trading-Market"),
        ("budgets: { trading_market: fast }", "budgets"),
        ("budgets: {}\ncheck_interval_ms: 0", "check_interval_ms"),
        ("budgets: {}\ninterval: 5", "interval"),
    ] {
        let error = BudgetConfig::from_yaml(text).unwrap_err();
        assert_eq!(error.kind(), ErrorKind::Config, "{text}");
        assert!(error.message().contains(needle), "{text}: {error}");
    }
}

#[test]
fn a_path_under_budget_reports_nothing_and_one_over_warns_and_counts() {
    let warnings = Warnings::default();
    let _tracing = warnings.install();
    let (snapshotter, _metrics) = recorder();
    let budgets = LatencyBudgets::new(&BudgetConfig::spec());
    let market = budgets.recorder("trading_market").unwrap();
    let game = budgets.recorder("trading_game").unwrap();
    assert!(budgets.recorder("nowhere").is_none());

    // Market: 2 % of calls at 30 ms breaks its 20 ms P99; Game: 0.5 % at
    // 30 ms stays under its 10 ms P99.
    for i in 0..1000 {
        market.record(Duration::from_millis(if i % 50 == 0 { 30 } else { 4 }));
        game.record(Duration::from_millis(if i % 200 == 0 { 30 } else { 2 }));
    }
    let reports = budgets.check_now();
    assert_eq!(
        reports.len(),
        2,
        "paths with nothing recorded report nothing"
    );
    let market_report = reports.iter().find(|r| r.path == "trading_market").unwrap();
    assert!(market_report.breached());
    assert!(market_report.p99 >= Duration::from_millis(30));
    assert_eq!(market_report.count, 1000);
    let game_report = reports.iter().find(|r| r.path == "trading_game").unwrap();
    assert!(!game_report.breached(), "{game_report:?}");
    assert!(game_report.p99 <= Duration::from_millis(3));

    assert_eq!(warnings.paths(), ["trading_market"]);
    let seen = snapshot(&snapshotter);
    assert_eq!(
        value(&seen, BUDGET_BREACHES_TOTAL, "trading_market"),
        Some(Value::Counter(1))
    );
    assert_eq!(value(&seen, BUDGET_BREACHES_TOTAL, "trading_game"), None);
    match value(&seen, LATENCY_P99, "trading_game") {
        Some(Value::Gauge(p99)) => assert!(p99 > 0.001 && p99 <= 0.003, "{p99}"),
        other => panic!("{other:?}"),
    }

    // Each check reads the window since the previous one.
    assert!(budgets.check_now().is_empty());
    game.record(Duration::from_millis(1));
    let reports = budgets.check_now();
    assert_eq!(reports.len(), 1);
    assert!(!reports[0].breached());
    assert_eq!(warnings.paths().len(), 1);
}

#[tokio::test(start_paused = true)]
async fn the_periodic_check_runs_on_its_interval() {
    let warnings = Warnings::default();
    let _tracing = warnings.install();
    let (snapshotter, _metrics) = recorder();
    let budgets = LatencyBudgets::new(
        &BudgetConfig::from_yaml("budgets: { trading_game: 10 }\ncheck_interval_ms: 1000").unwrap(),
    );
    let game = budgets.recorder("trading_game").unwrap();
    let started = tokio::time::Instant::now();
    let checks = budgets.spawn_checks();

    game.record(Duration::from_millis(2));
    // The first tick finds the path under budget: no warning. The clock
    // (paused) jumps to each tick while this test waits.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(warnings.paths().is_empty());
    assert!(matches!(
        value(&snapshot(&snapshotter), LATENCY_P99, "trading_game"),
        Some(Value::Gauge(_))
    ));

    game.record(Duration::from_millis(25));
    warnings.notify.notified().await;
    assert_eq!(warnings.paths(), ["trading_game"]);
    assert_eq!(
        started.elapsed(),
        Duration::from_millis(2000),
        "found at the second tick"
    );
    assert_eq!(
        value(
            &snapshot(&snapshotter),
            BUDGET_BREACHES_TOTAL,
            "trading_game"
        ),
        Some(Value::Counter(1))
    );

    drop(checks);
    game.record(Duration::from_millis(25));
    tokio::time::sleep(Duration::from_secs(10)).await;
    assert_eq!(
        warnings.paths().len(),
        1,
        "a dropped handle stops the checks"
    );
}
