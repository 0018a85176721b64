//! Circuit-breaker and retry settings, read from YAML.
//!
//! A service's resilience is configured in one YAML file, so operators can
//! tune it without a rebuild. The file has up to two top-level blocks:
//!
//! ```yaml
//! circuit_breaker:
//!   failure_threshold: 5
//!   timeout_ms: 5000
//!   reset_timeout_ms: 30000
//!
//! retry:
//!   max_attempts: 3
//!   backoff_ms: 100
//!   backoff_multiplier: 2
//!   max_backoff_ms: 1000
//!   jitter: true
//!   budget_percent: 20
//!   budget_min_per_second: 10
//!   budget_window_ms: 10000
//! ```
//!
//! The values shown are the defaults. A block, or any key inside one, may be
//! left out to keep its default, so a file only has to say what it changes.
//!
//! [`ResilienceConfig::from_yaml`] parses and validates the whole file;
//! [`CircuitBreakerConfig::from_yaml`] and [`RetryConfig::from_yaml`] take a
//! document holding just their own block. A misspelt key, a value of the
//! wrong type and an impossible value (a zero threshold, a multiplier below
//! one, ...) are all refused with an [`ErrorKind::Config`] error naming the
//! key, because a typo that silently fell back to a default would only
//! surface during an outage.

use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::{Error, ErrorKind};

/// When a circuit breaker opens, and how long it stays open.
///
/// The YAML block is `circuit_breaker:`; see the [module docs](self).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct CircuitBreakerConfig {
    /// Consecutive failures that open the breaker. At least 1.
    pub failure_threshold: u32,
    /// Deadline for one call through the breaker, in milliseconds; a call
    /// that misses it counts as a failure. At least 1.
    pub timeout_ms: u64,
    /// How long an open breaker fails calls without trying them before it
    /// lets a trial call through, in milliseconds. At least 1.
    pub reset_timeout_ms: u64,
}

impl CircuitBreakerConfig {
    /// Sets [`failure_threshold`](Self::failure_threshold).
    ///
    /// The defaults with some settings changed, one `with_*` per field:
    ///
    /// ```
    /// use switchboard::config::CircuitBreakerConfig;
    ///
    /// let config = CircuitBreakerConfig::default().with_failure_threshold(2).with_reset_timeout_ms(1_000);
    /// assert_eq!(config.failure_threshold, 2);
    /// assert_eq!(config.timeout_ms, CircuitBreakerConfig::default().timeout_ms);
    /// ```
    pub fn with_failure_threshold(mut self, failure_threshold: u32) -> Self {
        self.failure_threshold = failure_threshold;
        self
    }
    /// Sets [`timeout_ms`](Self::timeout_ms).
    pub fn with_timeout_ms(mut self, timeout_ms: u64) -> Self {
        self.timeout_ms = timeout_ms;
        self
    }
    /// Sets [`reset_timeout_ms`](Self::reset_timeout_ms).
    pub fn with_reset_timeout_ms(mut self, reset_timeout_ms: u64) -> Self {
        self.reset_timeout_ms = reset_timeout_ms;
        self
    }
}

impl Default for CircuitBreakerConfig {
    /// Five failures to open, a 5 s call timeout, 30 s before a trial call.
    fn default() -> Self {
        Self {
            failure_threshold: 5,
            timeout_ms: 5_000,
            reset_timeout_ms: 30_000,
        }
    }
}

impl CircuitBreakerConfig {
    /// Parses and validates a YAML document holding only the
    /// `circuit_breaker:` block.
    ///
    /// Keys left out take their defaults, as does the whole block if the
    /// document is empty.
    ///
    /// # Errors
    ///
    /// An [`ErrorKind::Config`] error if the text is not YAML, has a key
    /// other than `circuit_breaker` or one of its fields, has a value of the
    /// wrong type, or fails [`validate`](Self::validate).
    pub fn from_yaml(text: &str) -> Result<Self, Error> {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Document {
            #[serde(default)]
            circuit_breaker: CircuitBreakerConfig,
        }

        let config = parse::<Document>(text)?.circuit_breaker;
        config.validate()?;
        Ok(config)
    }

    /// Checks that every value is usable.
    ///
    /// # Errors
    ///
    /// An [`ErrorKind::Config`] error naming the key (for example
    /// `circuit_breaker.timeout_ms`) if any value is zero.
    pub fn validate(&self) -> Result<(), Error> {
        at_least_one(
            "circuit_breaker.failure_threshold",
            self.failure_threshold.into(),
        )?;
        at_least_one("circuit_breaker.timeout_ms", self.timeout_ms)?;
        at_least_one("circuit_breaker.reset_timeout_ms", self.reset_timeout_ms)
    }

    /// [`timeout_ms`](Self::timeout_ms) as a [`Duration`].
    pub const fn timeout(&self) -> Duration {
        Duration::from_millis(self.timeout_ms)
    }

    /// [`reset_timeout_ms`](Self::reset_timeout_ms) as a [`Duration`].
    pub const fn reset_timeout(&self) -> Duration {
        Duration::from_millis(self.reset_timeout_ms)
    }
}

/// How often a failed operation is tried again, and how long to wait between
/// tries.
///
/// The wait before the second attempt is [`backoff`](Self::backoff); each
/// later wait is the previous one times
/// [`backoff_multiplier`](Self::backoff_multiplier), never more than
/// [`max_backoff`](Self::max_backoff) (with [`jitter`](Self::jitter), up to
/// twice that). A delay the peer asks for (`Retry-After`, gRPC pushback) is
/// waited for, but never longer than `max_backoff`.
///
/// The retry budget bounds the retries of one stack to
/// [`budget_percent`](Self::budget_percent) of its calls over the last
/// [`budget_window_ms`](Self::budget_window_ms), plus
/// [`budget_min_per_second`](Self::budget_min_per_second): when a
/// dependency browns out, the retries do not multiply its load by
/// `max_attempts`.
///
/// The YAML block is `retry:`; see the [module docs](self).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct RetryConfig {
    /// The most times an operation is attempted, the first attempt included,
    /// so 1 means no retries. At least 1.
    pub max_attempts: u32,
    /// The first wait, in milliseconds. At least 1 and at most
    /// [`max_backoff_ms`](Self::max_backoff_ms).
    pub backoff_ms: u64,
    /// What each wait is multiplied by to get the next. A finite number, at
    /// least 1 (1 keeps the wait constant). YAML may write it as an integer.
    pub backoff_multiplier: f64,
    /// The longest wait, in milliseconds, and the longest a peer's
    /// `Retry-After` is obeyed. At least 1.
    pub max_backoff_ms: u64,
    /// Adds a random part of up to the wait again to each wait, so that many
    /// callers failing at once do not retry in lockstep.
    pub jitter: bool,
    /// Retries allowed, as a percentage of the calls made within
    /// [`budget_window_ms`](Self::budget_window_ms): 20 allows one retry per
    /// five calls. From 0 to 1000.
    pub budget_percent: f64,
    /// Retries allowed per second on top of the percentage, so a caller that
    /// makes few calls can still retry.
    pub budget_min_per_second: u32,
    /// How long a call counts towards the budget, in milliseconds. From
    /// 1000 to 60000.
    pub budget_window_ms: u64,
}

impl RetryConfig {
    /// Sets [`max_attempts`](Self::max_attempts).
    ///
    /// The defaults with some settings changed, one `with_*` per field:
    ///
    /// ```
    /// use switchboard::config::RetryConfig;
    ///
    /// let config = RetryConfig::default().with_max_attempts(5).with_backoff_ms(20).with_jitter(false);
    /// assert_eq!((config.max_attempts, config.backoff_ms, config.jitter), (5, 20, false));
    /// ```
    pub fn with_max_attempts(mut self, max_attempts: u32) -> Self {
        self.max_attempts = max_attempts;
        self
    }
    /// Sets [`backoff_ms`](Self::backoff_ms).
    pub fn with_backoff_ms(mut self, backoff_ms: u64) -> Self {
        self.backoff_ms = backoff_ms;
        self
    }
    /// Sets [`backoff_multiplier`](Self::backoff_multiplier).
    pub fn with_backoff_multiplier(mut self, backoff_multiplier: f64) -> Self {
        self.backoff_multiplier = backoff_multiplier;
        self
    }
    /// Sets [`max_backoff_ms`](Self::max_backoff_ms).
    pub fn with_max_backoff_ms(mut self, max_backoff_ms: u64) -> Self {
        self.max_backoff_ms = max_backoff_ms;
        self
    }
    /// Sets [`jitter`](Self::jitter).
    pub fn with_jitter(mut self, jitter: bool) -> Self {
        self.jitter = jitter;
        self
    }
    /// Sets [`budget_percent`](Self::budget_percent).
    pub fn with_budget_percent(mut self, budget_percent: f64) -> Self {
        self.budget_percent = budget_percent;
        self
    }
    /// Sets [`budget_min_per_second`](Self::budget_min_per_second).
    pub fn with_budget_min_per_second(mut self, budget_min_per_second: u32) -> Self {
        self.budget_min_per_second = budget_min_per_second;
        self
    }
    /// Sets [`budget_window_ms`](Self::budget_window_ms).
    pub fn with_budget_window_ms(mut self, budget_window_ms: u64) -> Self {
        self.budget_window_ms = budget_window_ms;
        self
    }
}

impl Default for RetryConfig {
    /// Three attempts, waiting 100 ms and then doubling, up to 1 s, with
    /// jitter; retries within 20 % of the last 10 s of calls plus 10 a
    /// second (tower's `TpsBudget` defaults).
    fn default() -> Self {
        Self {
            max_attempts: 3,
            backoff_ms: 100,
            backoff_multiplier: 2.0,
            max_backoff_ms: 1_000,
            jitter: true,
            budget_percent: 20.0,
            budget_min_per_second: 10,
            budget_window_ms: 10_000,
        }
    }
}

impl RetryConfig {
    /// Parses and validates a YAML document holding only the `retry:` block.
    ///
    /// Keys left out take their defaults, as does the whole block if the
    /// document is empty.
    ///
    /// # Errors
    ///
    /// An [`ErrorKind::Config`] error if the text is not YAML, has a key
    /// other than `retry` or one of its fields, has a value of the wrong
    /// type, or fails [`validate`](Self::validate).
    pub fn from_yaml(text: &str) -> Result<Self, Error> {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Document {
            #[serde(default)]
            retry: RetryConfig,
        }

        let config = parse::<Document>(text)?.retry;
        config.validate()?;
        Ok(config)
    }

    /// Checks that every value is usable.
    ///
    /// # Errors
    ///
    /// An [`ErrorKind::Config`] error naming the key (for example
    /// `retry.max_attempts`) if a count or duration is zero, if
    /// `backoff_multiplier` is below 1 or not finite, if `backoff_ms` is
    /// above `max_backoff_ms`, or if a budget value is out of its range.
    pub fn validate(&self) -> Result<(), Error> {
        at_least_one("retry.max_attempts", self.max_attempts.into())?;
        at_least_one("retry.backoff_ms", self.backoff_ms)?;
        at_least_one("retry.max_backoff_ms", self.max_backoff_ms)?;
        // Written so that NaN fails too: every comparison with NaN is false.
        if !(self.backoff_multiplier.is_finite() && self.backoff_multiplier >= 1.0) {
            return Err(invalid(format!(
                "retry.backoff_multiplier must be a finite number of at least 1, got {}",
                self.backoff_multiplier
            )));
        }
        if self.backoff_ms > self.max_backoff_ms {
            return Err(invalid(format!(
                "retry.backoff_ms ({}) must not be above retry.max_backoff_ms ({})",
                self.backoff_ms, self.max_backoff_ms
            )));
        }
        // The ranges tower's `TpsBudget` accepts (it panics outside them).
        if !(0.0..=1000.0).contains(&self.budget_percent) {
            return Err(invalid(format!(
                "retry.budget_percent must be from 0 to 1000, got {}",
                self.budget_percent
            )));
        }
        if !(1_000..=60_000).contains(&self.budget_window_ms) {
            return Err(invalid(format!(
                "retry.budget_window_ms must be from 1000 to 60000, got {}",
                self.budget_window_ms
            )));
        }
        if self.budget_min_per_second >= i32::MAX as u32 {
            return Err(invalid(format!(
                "retry.budget_min_per_second must be below {}, got {}",
                i32::MAX,
                self.budget_min_per_second
            )));
        }
        Ok(())
    }

    /// [`budget_window_ms`](Self::budget_window_ms) as a [`Duration`].
    pub const fn budget_window(&self) -> Duration {
        Duration::from_millis(self.budget_window_ms)
    }

    /// The first wait, [`backoff_ms`](Self::backoff_ms), as a [`Duration`].
    pub const fn backoff(&self) -> Duration {
        Duration::from_millis(self.backoff_ms)
    }

    /// The cap on every wait, [`max_backoff_ms`](Self::max_backoff_ms), as a
    /// [`Duration`].
    pub const fn max_backoff(&self) -> Duration {
        Duration::from_millis(self.max_backoff_ms)
    }
}

/// A service's whole resilience configuration: the YAML file with its
/// `circuit_breaker:` and `retry:` blocks.
///
/// Deserializing through serde directly does not validate; use
/// [`from_yaml`](Self::from_yaml), or call [`validate`](Self::validate)
/// afterwards.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct ResilienceConfig {
    /// The `circuit_breaker:` block.
    pub circuit_breaker: CircuitBreakerConfig,
    /// The `retry:` block.
    pub retry: RetryConfig,
}

impl ResilienceConfig {
    /// Sets [`circuit_breaker`](Self::circuit_breaker).
    ///
    /// The defaults with a block replaced:
    ///
    /// ```
    /// use switchboard::config::{ResilienceConfig, RetryConfig};
    ///
    /// let config = ResilienceConfig::default().with_retry(RetryConfig::default().with_max_attempts(1));
    /// assert_eq!(config.retry.max_attempts, 1);
    /// ```
    pub fn with_circuit_breaker(mut self, circuit_breaker: CircuitBreakerConfig) -> Self {
        self.circuit_breaker = circuit_breaker;
        self
    }
    /// Sets [`retry`](Self::retry).
    pub fn with_retry(mut self, retry: RetryConfig) -> Self {
        self.retry = retry;
        self
    }
}

impl ResilienceConfig {
    /// Parses and validates a resilience configuration file.
    ///
    /// Blocks and keys left out take their defaults; an empty document gives
    /// [`ResilienceConfig::default`].
    ///
    /// ```
    /// use std::time::Duration;
    /// use switchboard::ErrorKind;
    /// use switchboard::config::ResilienceConfig;
    ///
    /// let config = ResilienceConfig::from_yaml(
    ///     "\
    /// circuit_breaker:
    ///   failure_threshold: 5
    ///   timeout_ms: 5000
    ///   reset_timeout_ms: 30000
    ///
    /// retry:
    ///   max_attempts: 3
    ///   backoff_ms: 100
    ///   backoff_multiplier: 2
    ///   max_backoff_ms: 1000
    /// ",
    /// )?;
    /// assert_eq!(config.circuit_breaker.failure_threshold, 5);
    /// assert_eq!(config.circuit_breaker.timeout(), Duration::from_secs(5));
    /// assert_eq!(config.circuit_breaker.reset_timeout(), Duration::from_secs(30));
    /// assert_eq!(config.retry.max_attempts, 3);
    /// assert_eq!(config.retry.backoff(), Duration::from_millis(100));
    /// assert_eq!(config.retry.backoff_multiplier, 2.0);
    /// assert_eq!(config.retry.max_backoff(), Duration::from_secs(1));
    /// assert_eq!(config, ResilienceConfig::default());
    ///
    /// let typo = ResilienceConfig::from_yaml("retry:\n  max_attempt: 5\n").unwrap_err();
    /// assert_eq!(typo.kind(), ErrorKind::Config);
    /// assert!(typo.message().contains("max_attempt"));
    /// # Ok::<(), switchboard::Error>(())
    /// ```
    ///
    /// # Errors
    ///
    /// An [`ErrorKind::Config`] error if the text is not YAML, has an unknown
    /// key at any level, has a value of the wrong type, or fails
    /// [`validate`](Self::validate). The message names the offending key and,
    /// for problems found while parsing, the line.
    pub fn from_yaml(text: &str) -> Result<Self, Error> {
        let config = parse::<Self>(text)?;
        config.validate()?;
        Ok(config)
    }

    /// Validates both blocks.
    ///
    /// # Errors
    ///
    /// The first error from [`CircuitBreakerConfig::validate`] or
    /// [`RetryConfig::validate`].
    pub fn validate(&self) -> Result<(), Error> {
        self.circuit_breaker.validate()?;
        self.retry.validate()
    }
}

fn parse<T: DeserializeOwned>(text: &str) -> Result<T, Error> {
    serde_norway::from_str(text).map_err(|error| {
        let mut message = error.to_string();
        // serde_norway leaves the position out of its message when it is the
        // very start of the document, which is where it reports unknown
        // top-level keys on the first line.
        if let Some(location) = error.location() {
            let at = format!("at line {} column {}", location.line(), location.column());
            if !message.contains(&at) {
                message.push(' ');
                message.push_str(&at);
            }
        }
        Error::new(ErrorKind::Config, message).with_source(error)
    })
}

fn at_least_one(key: &str, value: u64) -> Result<(), Error> {
    if value == 0 {
        return Err(invalid(format!("{key} must be at least 1, got 0")));
    }
    Ok(())
}

fn invalid(message: String) -> Error {
    Error::new(ErrorKind::Config, message)
}

#[cfg(test)]
mod tests;
