//! What the retry layer decides with: the schedule of waits, the budget,
//! and which requests may be sent again after a failure that may have
//! taken effect.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};
use tower::retry::budget::TpsBudget;

use crate::config::RetryConfig;
use crate::error::Error;

/// Says whether a request is idempotent: whether sending it again after a
/// failure that [may have taken effect](crate::Effect::Unknown) — a timeout,
/// a lost answer, a peer's internal error — is harmless.
///
/// A request that is not idempotent is sent again only after a failure that
/// certainly did not take effect (a refused connection, HTTP 503 or 429).
/// [`Uniform`] gives one answer for a whole stack; any
/// `Fn(&Request) -> bool` (through [`IdempotentIf`]) decides per call.
pub trait Idempotency<Request>: Clone + Send + Sync + 'static {
    /// Whether `request` may be applied twice without harm.
    fn is_idempotent(&self, request: &Request) -> bool;
}

/// One answer for every request of a stack: not idempotent unless set with
/// [`RetryLayer::idempotent`](super::RetryLayer::idempotent) or
/// [`Resilience::idempotent`](crate::middleware::Resilience::idempotent).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct Uniform {
    idempotent: bool,
}

impl Uniform {
    /// No request is idempotent (the default).
    pub const NONE: Self = Self { idempotent: false };
    /// Every request is idempotent.
    pub const ALL: Self = Self { idempotent: true };

    /// Whether every request is idempotent.
    pub const fn idempotent(self) -> bool {
        self.idempotent
    }
}

impl<Request> Idempotency<Request> for Uniform {
    fn is_idempotent(&self, _: &Request) -> bool {
        self.idempotent
    }
}

/// Decides per call with a function of the request, such as "a `GET`".
#[derive(Clone, Copy)]
pub struct IdempotentIf<F>(pub F);

impl<F, Request> Idempotency<Request> for IdempotentIf<F>
where
    F: Fn(&Request) -> bool + Clone + Send + Sync + 'static,
{
    fn is_idempotent(&self, request: &Request) -> bool {
        (self.0)(request)
    }
}

impl<F> fmt::Debug for IdempotentIf<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("IdempotentIf").finish_non_exhaustive()
    }
}

/// The schedule: how many attempts, the waits between them, and the cap on
/// every wait, the peer's included.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Policy {
    pub(super) max_attempts: u32,
    /// The schedule without jitter; jitter is added when the waits are made.
    backoff: ExponentialBuilder,
    jitter: bool,
    max_backoff: Duration,
}

impl Policy {
    pub(crate) fn new(config: &RetryConfig) -> Self {
        let backoff = ExponentialBuilder::new()
            .with_min_delay(config.backoff())
            .with_max_delay(config.max_backoff())
            .with_factor(config.backoff_multiplier as f32)
            .with_max_times(config.max_attempts.saturating_sub(1) as usize);
        Self {
            max_attempts: config.max_attempts.max(1),
            backoff,
            jitter: config.jitter,
            max_backoff: config.max_backoff(),
        }
    }

    pub(super) fn with_jitter(mut self) -> Self {
        self.jitter = true;
        self
    }

    /// The waits before the second, third, … attempt, as scheduled (without
    /// jitter's random part).
    pub(crate) fn delays(&self) -> impl Iterator<Item = Duration> + Send + use<> {
        // backon multiplies in f32 (100 ms × 2 comes out as 200.000003 ms);
        // the configuration is in whole milliseconds, and so are the waits.
        self.backoff.build().map(whole_millis)
    }

    /// The waits to make: the schedule, with jitter's random part if on.
    pub(super) fn waits(&self) -> impl Iterator<Item = Duration> + Send + use<> {
        let backoff = if self.jitter {
            self.backoff.with_jitter()
        } else {
            self.backoff
        };
        backoff.build().map(whole_millis)
    }

    /// The wait before the next attempt: the schedule's, or longer if the
    /// peer asked for longer, but never more than `max_backoff` for the
    /// peer's sake — `Retry-After: 86400` must not stall a caller for a day.
    pub(super) fn wait(&self, scheduled: Duration, error: &Error) -> Duration {
        let asked = error.retry_after().unwrap_or_default();
        scheduled.max(asked.min(self.max_backoff))
    }

    /// The error a call ends with: the attempts made, and a peer's delay
    /// capped and turned into a requeue, so a consume loop puts the message
    /// back for at most `max_backoff` instead of dead-lettering it.
    pub(super) fn give_up(&self, error: Error, attempts: u32) -> Error {
        let error = error.with_attempts(attempts);
        match error.retry_after() {
            Some(asked) if error.is_retryable() && error.requeue_after().is_none() => {
                let delay = asked.min(self.max_backoff);
                error.with_retry_after(delay).with_requeue(delay)
            }
            _ => error,
        }
    }
}

fn whole_millis(delay: Duration) -> Duration {
    Duration::from_millis((delay.as_secs_f64() * 1000.0).round() as u64)
}

/// A new retry budget as `config` says: tower's [`TpsBudget`], shared by
/// every clone of one stack. The values are clamped into the ranges
/// `TpsBudget` accepts (which [`RetryConfig::validate`] checks), so a
/// configuration built in code cannot make it panic.
pub(crate) fn budget(config: &RetryConfig) -> Arc<TpsBudget> {
    let window = config
        .budget_window()
        .clamp(Duration::from_secs(1), Duration::from_secs(60));
    let ratio = (config.budget_percent / 100.0).clamp(0.0, 10.0) as f32;
    let ratio = if ratio.is_nan() { 0.0 } else { ratio };
    let min_per_second = config.budget_min_per_second.min(i32::MAX as u32 - 1);
    Arc::new(TpsBudget::new(window, min_per_second, ratio))
}
