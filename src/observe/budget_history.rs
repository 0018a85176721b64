//! The last checks of each latency budget, kept in a bounded ring so a
//! status page can draw P50 / P99 over the last minutes without a time
//! series database.

use std::collections::VecDeque;
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use chrono::{DateTime, Utc};

/// How many checks each path keeps: 120 windows, 20 minutes at the
/// default 10 s interval.
pub const HISTORY_LEN: usize = 120;

/// What one check measured on one path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct BudgetSample {
    /// When the check ran (the end of its window).
    pub at: DateTime<Utc>,
    /// Latencies recorded in the window.
    pub count: u64,
    /// Their median (the upper bound of its histogram bucket).
    pub p50: Duration,
    /// Their P99 (the upper bound of its histogram bucket).
    pub p99: Duration,
}

/// One path's budget and its recent checks, oldest first, as
/// [`LatencyBudgets::history`](super::LatencyBudgets::history) returns them.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct PathHistory {
    /// The path.
    pub path: String,
    /// Its P99 target.
    pub budget: Duration,
    /// The last [`HISTORY_LEN`] checks that saw any latency, oldest first.
    pub samples: Vec<BudgetSample>,
}

/// A bounded ring of samples; one lock taken once per check and per read.
#[derive(Debug, Default)]
pub(super) struct History {
    samples: Mutex<VecDeque<BudgetSample>>,
}

impl History {
    pub(super) fn push(&self, sample: BudgetSample) {
        let mut samples = self.samples.lock().unwrap_or_else(PoisonError::into_inner);
        if samples.len() == HISTORY_LEN {
            samples.pop_front();
        }
        samples.push_back(sample);
    }

    pub(super) fn samples(&self) -> Vec<BudgetSample> {
        let samples = self.samples.lock().unwrap_or_else(PoisonError::into_inner);
        samples.iter().copied().collect()
    }
}
