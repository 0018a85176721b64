//! The bucket histogram behind the latency budgets.

use super::*;
use crate::observe::HISTORY_LEN;

#[test]
fn every_value_lands_in_a_bucket_whose_bound_is_within_an_eighth() {
    let mut previous = 0;
    for micros in (0..100_000).chain([1 << 30, 1 << 38, u64::MAX]) {
        let index = AtomicHistogram::index(micros);
        assert!(index >= previous || micros > 100_000, "{micros}");
        previous = index;
        let bound = AtomicHistogram::upper_bound(index);
        if index < BUCKETS - 1 {
            assert!(bound >= micros, "{micros} ≤ {bound}");
            assert!(bound - micros <= micros / 8 + 1, "{micros} vs {bound}");
        }
    }
}

#[test]
fn the_p99_is_the_bucket_of_the_99th_percentile() {
    let histogram = AtomicHistogram::new();
    for _ in 0..990 {
        histogram.record(1_000);
    }
    for _ in 0..10 {
        histogram.record(50_000);
    }
    let (count, p99) = histogram.take_p99();
    assert_eq!(count, 1000);
    assert!(p99 >= Duration::from_millis(1) && p99 < Duration::from_micros(1_130));
    histogram.record(50_000);
    histogram.record(50_000);
    let (_, p99) = histogram.take_p99();
    assert!(p99 >= Duration::from_millis(50), "{p99:?}");
    assert_eq!(histogram.take_p99().0, 0);
}

#[test]
fn the_median_and_the_p99_come_from_one_sweep() {
    let histogram = AtomicHistogram::new();
    for _ in 0..60 {
        histogram.record(1_000);
    }
    for _ in 0..40 {
        histogram.record(20_000);
    }
    let (count, p50, p99) = histogram.take_quantiles();
    assert_eq!(count, 100);
    assert!(
        p50 >= Duration::from_millis(1) && p50 < Duration::from_micros(1_130),
        "{p50:?}"
    );
    assert!(p99 >= Duration::from_millis(20), "{p99:?}");
}

#[test]
fn each_check_that_saw_latencies_is_kept_in_a_bounded_history() {
    let budgets = LatencyBudgets::new(
        &BudgetConfig::default().with_budget("trading_market", Duration::from_millis(20)),
    );
    let recorder = budgets.recorder("trading_market").expect("configured");
    for _ in 0..HISTORY_LEN + 5 {
        recorder.record(Duration::from_millis(2));
        budgets.check_now();
    }
    budgets.check_now();
    let history = budgets.history();
    assert_eq!(history[0].samples.len(), HISTORY_LEN);
    assert!(history[0].samples.iter().all(|sample| sample.count == 1));
}
