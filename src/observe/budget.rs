//! Latency budgets: each strategy §3 path's P99 target, and a periodic check of
//! the latencies recorded since the last check.
//!
//! # Why atomic bucket histograms
//!
//! Recording sits on the hot path of every call and every consumed event,
//! from many tasks at once. Each path gets a fixed array of `AtomicU64`
//! buckets on a log-linear scale (8 buckets per power of two of
//! microseconds, so a bucket's bounds are within 12.5 % of each other, from
//! 1 µs to about six days). Recording is one relaxed `fetch_add` — no lock,
//! no allocation, no channel hop — and tasks recording the same path only
//! share cache lines, never wait on each other. The check swaps every bucket
//! back to zero and reads the P99 of the window since the previous check;
//! a value recorded during the sweep lands in this window or the next, never
//! nowhere. The P99 reported is the upper bound of the bucket it falls in:
//! it errs towards reporting a breach, never towards hiding one.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Deserialize;
use tokio::task::JoinHandle;

use super::budget_history::{BudgetSample, History, PathHistory};
use super::metrics as names;
use crate::error::{Error, ErrorKind};

/// P99 targets per path, in milliseconds, read from YAML.
///
/// ```yaml
/// budgets:
///   gateway_service: 50   # Gateway → Service, HTTP
///   trading_market: 20    # Trading → Market, gRPC
///   trading_game: 10      # Trading → Game, Redis Streams (publish → handler)
///   game_market: 50       # Game → Market, HTTP
/// check_interval_ms: 10000
/// ```
///
/// Path names are free (`[a-z0-9_]`); [`BudgetConfig::spec`] gives the four
/// of strategy §3. Unknown top-level keys, zero budgets and bad names are
/// refused.
///
/// ```
/// use std::time::Duration;
/// use switchboard::observe::BudgetConfig;
///
/// let config = BudgetConfig::from_yaml("budgets: { trading_market: 20 }")?;
/// assert_eq!(config.budget("trading_market"), Some(Duration::from_millis(20)));
/// assert!(BudgetConfig::from_yaml("budget: { trading_market: 20 }").is_err());
/// # Ok::<(), switchboard::Error>(())
/// ```
///
/// Or in code:
///
/// ```
/// use std::time::Duration;
/// use switchboard::observe::BudgetConfig;
///
/// let config = BudgetConfig::default()
///     .with_budget("trading_market", Duration::from_millis(20))
///     .with_check_interval(Duration::from_secs(30));
/// assert_eq!(config.budget("trading_market"), Some(Duration::from_millis(20)));
/// assert!(config.validate().is_ok());
/// ```
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BudgetConfig {
    /// P99 target in milliseconds per path name.
    pub budgets: BTreeMap<String, u64>,
    /// How often [`LatencyBudgets::spawn_checks`] checks, in milliseconds
    /// (default 10 000).
    #[serde(default = "default_interval_ms")]
    pub check_interval_ms: u64,
}

fn default_interval_ms() -> u64 {
    10_000
}

impl Default for BudgetConfig {
    /// No budgets, checked every 10 s.
    fn default() -> Self {
        Self {
            budgets: BTreeMap::new(),
            check_interval_ms: default_interval_ms(),
        }
    }
}

impl BudgetConfig {
    /// Adds (or replaces) the P99 budget of `path`, in whole milliseconds.
    pub fn with_budget(mut self, path: impl Into<String>, p99: Duration) -> Self {
        let ms = p99.as_millis().try_into().unwrap_or(u64::MAX);
        self.budgets.insert(path.into(), ms);
        self
    }

    /// Sets how often [`LatencyBudgets::spawn_checks`] checks.
    pub fn with_check_interval(mut self, every: Duration) -> Self {
        self.check_interval_ms = every.as_millis().try_into().unwrap_or(u64::MAX);
        self
    }

    /// The four paths of strategy §3 with their P99 targets.
    pub fn spec() -> Self {
        let budgets = [
            ("gateway_service", 50),
            ("trading_market", 20),
            ("trading_game", 10),
            ("game_market", 50),
        ];
        Self {
            budgets: budgets
                .into_iter()
                .map(|(path, ms)| (path.to_owned(), ms))
                .collect(),
            check_interval_ms: default_interval_ms(),
        }
    }

    /// Parses and [validates](Self::validate) a YAML document.
    ///
    /// # Errors
    ///
    /// [`ErrorKind::Config`] naming the bad key or value.
    pub fn from_yaml(text: &str) -> Result<Self, Error> {
        let config: Self = serde_norway::from_str(text).map_err(|error| {
            Error::new(ErrorKind::Config, format!("budgets: {error}")).with_source(error)
        })?;
        config.validate()?;
        Ok(config)
    }

    /// Checks every budget is at least 1 ms, every name is `[a-z0-9_]+` and
    /// the interval is at least 1 ms.
    ///
    /// # Errors
    ///
    /// [`ErrorKind::Config`] naming the bad entry.
    pub fn validate(&self) -> Result<(), Error> {
        let bad = |message: String| Err(Error::new(ErrorKind::Config, message));
        for (path, ms) in &self.budgets {
            let name_ok = !path.is_empty()
                && path
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
            if !name_ok {
                return bad(format!("budgets: path name {path:?} is not [a-z0-9_]+"));
            }
            if *ms == 0 {
                return bad(format!("budgets.{path} must be at least 1, got 0"));
            }
        }
        if self.check_interval_ms == 0 {
            return bad("check_interval_ms must be at least 1, got 0".to_owned());
        }
        Ok(())
    }

    /// The budget of `path`, if it has one.
    pub fn budget(&self, path: &str) -> Option<Duration> {
        self.budgets.get(path).map(|ms| Duration::from_millis(*ms))
    }
}

const SUB_BUCKETS: u64 = 8;
/// 8 linear buckets below 8 µs, then 8 per power of two up to 2^39 µs.
const BUCKETS: usize = 8 * 38;

/// A lock-free histogram of microseconds (see the [module docs](self)).
struct AtomicHistogram {
    buckets: Box<[AtomicU64]>,
}

impl AtomicHistogram {
    fn new() -> Self {
        Self {
            buckets: (0..BUCKETS).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    fn index(micros: u64) -> usize {
        if micros < SUB_BUCKETS {
            return micros as usize;
        }
        let exponent = 63 - u64::from(micros.leading_zeros()); // ≥ 3
        let mantissa = micros >> (exponent - 3); // 8..16
        let index = (exponent - 2) * SUB_BUCKETS + (mantissa - SUB_BUCKETS);
        (index as usize).min(BUCKETS - 1)
    }

    /// The largest value bucket `index` holds, in microseconds.
    fn upper_bound(index: usize) -> u64 {
        let index = index as u64;
        if index < SUB_BUCKETS {
            return index;
        }
        let exponent = index / SUB_BUCKETS + 2;
        let mantissa = index % SUB_BUCKETS + SUB_BUCKETS;
        ((mantissa + 1) << (exponent - 3)) - 1
    }

    fn record(&self, micros: u64) {
        self.buckets[Self::index(micros)].fetch_add(1, Ordering::Relaxed);
    }

    /// Empties the histogram; returns the count, P50 and P99 of what it
    /// held.
    fn take_quantiles(&self) -> (u64, Duration, Duration) {
        let counts: Vec<u64> = self
            .buckets
            .iter()
            .map(|bucket| bucket.swap(0, Ordering::Relaxed))
            .collect();
        let total: u64 = counts.iter().sum();
        if total == 0 {
            return (0, Duration::ZERO, Duration::ZERO);
        }
        // The smallest value with at least 50 % / 99 % of the samples at or
        // below it.
        let at_rank = |rank: u64| {
            let mut seen = 0;
            for (index, count) in counts.iter().enumerate() {
                seen += count;
                if seen >= rank {
                    return Duration::from_micros(Self::upper_bound(index));
                }
            }
            Duration::from_micros(Self::upper_bound(BUCKETS - 1))
        };
        let median = at_rank(total.div_ceil(2));
        (total, median, at_rank(total - total / 100))
    }

    #[cfg(test)]
    fn take_p99(&self) -> (u64, Duration) {
        let (count, _, p99) = self.take_quantiles();
        (count, p99)
    }
}

/// Records latencies of one path: cheap to clone, one atomic add per value.
#[derive(Clone)]
pub struct LatencyRecorder {
    path: Arc<str>,
    histogram: Arc<AtomicHistogram>,
}

impl LatencyRecorder {
    /// Records one latency.
    pub fn record(&self, latency: Duration) {
        let micros = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
        self.histogram.record(micros);
    }

    /// Records the time since `since` (such as an event's
    /// [`timestamp`](crate::EventEnvelope::timestamp), for an asynchronous
    /// path measured publish → handler); a time in the future (clock skew)
    /// counts as zero.
    pub fn record_since(&self, since: DateTime<Utc>) {
        let latency = (Utc::now() - since).to_std().unwrap_or_default();
        self.record(latency);
    }

    /// The path recorded.
    pub fn path(&self) -> &str {
        &self.path
    }
}

impl fmt::Debug for LatencyRecorder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LatencyRecorder")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

/// What one check found for one path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BudgetReport {
    /// The path.
    pub path: String,
    /// Latencies recorded since the previous check.
    pub count: u64,
    /// Their P99 (the upper bound of its histogram bucket).
    pub p99: Duration,
    /// The path's P99 target.
    pub budget: Duration,
}

impl BudgetReport {
    /// Whether the P99 is over the budget.
    pub fn breached(&self) -> bool {
        self.p99 > self.budget
    }
}

/// The paths with a latency budget, their histograms, and the check.
///
/// Each [`check_now`](Self::check_now) (or each tick of
/// [`spawn_checks`](Self::spawn_checks)) reads the P99 of the latencies
/// recorded since the previous check, sets the gauge
/// `switchboard_latency_p99_seconds{path}`, and for a path over its budget
/// logs a `warn!` and increments `switchboard_budget_breaches_total{path}`.
/// A path with nothing recorded in the window reports nothing.
///
/// ```
/// use std::time::Duration;
/// use switchboard::observe::{BudgetConfig, LatencyBudgets};
///
/// let budgets = LatencyBudgets::new(&BudgetConfig::from_yaml("budgets: { trading_market: 20 }")?);
/// let market = budgets.recorder("trading_market").expect("configured");
/// for _ in 0..1000 { market.record(Duration::from_millis(3)); }
/// let reports = budgets.check_now();
/// assert_eq!(reports.len(), 1);
/// assert!(!reports[0].breached());
///
/// for _ in 0..1000 { market.record(Duration::from_millis(45)); }
/// assert!(budgets.check_now()[0].breached());
/// # Ok::<(), switchboard::Error>(())
/// ```
#[derive(Clone)]
pub struct LatencyBudgets {
    paths: Arc<BTreeMap<Arc<str>, (Duration, LatencyRecorder, History)>>,
    interval: Duration,
}

impl LatencyBudgets {
    /// One histogram per path of `config`.
    pub fn new(config: &BudgetConfig) -> Self {
        let paths = config
            .budgets
            .iter()
            .map(|(path, ms)| {
                let path: Arc<str> = path.as_str().into();
                let recorder = LatencyRecorder {
                    path: path.clone(),
                    histogram: Arc::new(AtomicHistogram::new()),
                };
                (
                    path,
                    (Duration::from_millis(*ms), recorder, History::default()),
                )
            })
            .collect();
        Self {
            paths: Arc::new(paths),
            interval: Duration::from_millis(config.check_interval_ms),
        }
    }

    /// The recorder of `path`, or `None` when the configuration gives it no
    /// budget.
    pub fn recorder(&self, path: &str) -> Option<LatencyRecorder> {
        self.paths
            .get(path)
            .map(|(_, recorder, _)| recorder.clone())
    }

    /// Checks every path now (see the [type docs](Self)); returns a report
    /// per path that recorded anything since the previous check.
    pub fn check_now(&self) -> Vec<BudgetReport> {
        let mut reports = Vec::new();
        for (path, (budget, recorder, history)) in self.paths.iter() {
            let (count, p50, p99) = recorder.histogram.take_quantiles();
            if count == 0 {
                continue;
            }
            history.push(BudgetSample {
                at: Utc::now(),
                count,
                p50,
                p99,
            });
            let report = BudgetReport {
                path: path.to_string(),
                count,
                p99,
                budget: *budget,
            };
            names::budget_checked(path, p99, *budget, report.breached());
            if report.breached() {
                tracing::warn!(
                    path = &**path,
                    p99_ms = p99.as_secs_f64() * 1e3,
                    budget_ms = budget.as_secs_f64() * 1e3,
                    samples = count,
                    "latency budget broken: P99 over target",
                );
            }
            reports.push(report);
        }
        reports
    }

    /// Every path's budget and its last [`HISTORY_LEN`](super::HISTORY_LEN) checks that saw any
    /// latency, oldest first — P50 and P99 over the last minutes, for a
    /// status page (the operator console draws them).
    ///
    /// ```
    /// use std::time::Duration;
    /// use switchboard::observe::{BudgetConfig, LatencyBudgets};
    ///
    /// let budgets = LatencyBudgets::new(&BudgetConfig::default()
    ///     .with_budget("trading_market", Duration::from_millis(20)));
    /// let market = budgets.recorder("trading_market").expect("configured");
    /// market.record(Duration::from_millis(3));
    /// budgets.check_now();
    /// budgets.check_now(); // nothing recorded: no sample
    /// let history = budgets.history();
    /// assert_eq!(history[0].samples.len(), 1);
    /// assert!(history[0].samples[0].p99 >= Duration::from_millis(3));
    /// ```
    pub fn history(&self) -> Vec<PathHistory> {
        self.paths
            .iter()
            .map(|(path, (budget, _, history))| PathHistory {
                path: path.to_string(),
                budget: *budget,
                samples: history.samples(),
            })
            .collect()
    }

    /// Runs [`check_now`](Self::check_now) every `check_interval_ms` in a
    /// task (the first check one interval from now); dropping the returned
    /// handle stops it.
    pub fn spawn_checks(&self) -> BudgetChecks {
        let budgets = self.clone();
        let interval = self.interval;
        let task = tokio::spawn(async move {
            let mut ticks =
                tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                ticks.tick().await;
                budgets.check_now();
            }
        });
        BudgetChecks { task }
    }
}

impl fmt::Debug for LatencyBudgets {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LatencyBudgets")
            .field(
                "paths",
                &self
                    .paths
                    .iter()
                    .map(|(p, (b, _, _))| (p, b))
                    .collect::<Vec<_>>(),
            )
            .field("interval", &self.interval)
            .finish()
    }
}

/// The running periodic check; dropping it stops the check.
#[derive(Debug)]
#[must_use = "dropping the handle stops the checks"]
pub struct BudgetChecks {
    task: JoinHandle<()>,
}

impl Drop for BudgetChecks {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[cfg(test)]
#[path = "budget_tests.rs"]
mod tests;
