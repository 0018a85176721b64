//! The breaker's state machine, shared by every service built from one
//! layer: one breaker stands for the health of one dependency.

use std::fmt;
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

use crate::config::CircuitBreakerConfig;
use crate::error::{Error, ErrorKind};

/// Where a circuit breaker stands, as seen through
/// [`CircuitBreaker::watch`](super::CircuitBreaker::watch).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BreakerState {
    /// Calls go through; consecutive failures are counted.
    Closed,
    /// Calls fail fast with [`ErrorKind::BreakerOpen`] until the reset
    /// timeout has passed.
    Open,
    /// The reset timeout has passed: one trial call is let through; its
    /// success closes the breaker, its failure opens it again.
    HalfOpen,
}

impl BreakerState {
    const fn as_str(self) -> &'static str {
        match self {
            Self::Closed => "closed",
            Self::Open => "open",
            Self::HalfOpen => "half-open",
        }
    }
}

impl fmt::Display for BreakerState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What the breaker allowed a call to do, and in which epoch: the breaker
/// starts a new epoch at every change of state, and only an outcome of the
/// current epoch moves it.
///
/// Without epochs a slow call let through while the breaker was still
/// closed, succeeding after it opened, would close it again: under
/// concurrency a flapping dependency would never stay open. With them, once
/// the breaker is open or half-open only the probe's outcome changes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Permit {
    /// An ordinary call while closed.
    Call { epoch: u64 },
    /// The one trial call while half-open.
    Probe { epoch: u64 },
}

impl Permit {
    fn epoch(self) -> u64 {
        match self {
            Self::Call { epoch } | Self::Probe { epoch } => epoch,
        }
    }
}

/// What recording a call's outcome did, for the caller's sake.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Recorded {
    /// The outcome counted, or said nothing about the dependency.
    Counted,
    /// A failure explained by an outage the breaker already knows of: the
    /// call was let through before the breaker opened, or it was the probe
    /// and opened it again. The duration is the time until the next trial
    /// call (zero if the breaker has closed since).
    Outage(Duration),
}

/// How a call ended, as far as the breaker cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Outcome {
    /// It succeeded: the dependency is healthy.
    Success,
    /// It failed in a way that says the dependency is unhealthy (a
    /// retryable kind).
    Failure,
    /// It failed in a way that says nothing about the dependency (bad input,
    /// 4xx-like, an inner breaker): neither trips nor resets.
    Neutral,
}

impl Outcome {
    pub(super) fn of<T>(result: &Result<T, Error>) -> Self {
        match result {
            Ok(_) => Self::Success,
            Err(error) if error.is_retryable() => Self::Failure,
            Err(_) => Self::Neutral,
        }
    }
}

/// When a service in front of the breaker may go on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Readiness {
    /// Calls may be made.
    Ready,
    /// Open: nothing may pass until this instant.
    OpenUntil(Instant),
    /// Half-open with the trial call in flight: wait for its outcome.
    ProbeInFlight,
}

struct Machine {
    state: BreakerState,
    /// Bumped by every transition; see [`Permit`].
    epoch: u64,
    failures: u32,
    opened_at: Instant,
    probe_in_flight: bool,
    /// Wall-clock time of the last change of state, for status pages.
    changed_at: chrono::DateTime<chrono::Utc>,
    /// How many times it has opened since it was made.
    opened_total: u64,
}

/// A circuit breaker's state with when it last changed and its counts, as
/// [`CircuitBreakerLayer::snapshot`](super::CircuitBreakerLayer::snapshot)
/// reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct BreakerSnapshot {
    /// The breaker's name.
    pub name: String,
    /// Closed, open or half-open.
    pub state: BreakerState,
    /// When it last changed state (when it was made, if it never has).
    pub changed_at: chrono::DateTime<chrono::Utc>,
    /// Consecutive infrastructure failures counted while closed.
    pub consecutive_failures: u32,
    /// The failures that open it.
    pub failure_threshold: u32,
    /// How many times it has opened.
    pub opened_total: u64,
    /// How long it stays open before a trial call.
    pub reset_timeout: Duration,
}

pub(super) struct Shared {
    name: String,
    config: CircuitBreakerConfig,
    machine: Mutex<Machine>,
    state_tx: watch::Sender<BreakerState>,
}

impl Shared {
    pub(super) fn new(name: String, config: CircuitBreakerConfig) -> Self {
        Self {
            name,
            config,
            machine: Mutex::new(Machine {
                state: BreakerState::Closed,
                epoch: 0,
                failures: 0,
                opened_at: Instant::now(),
                probe_in_flight: false,
                changed_at: chrono::Utc::now(),
                opened_total: 0,
            }),
            state_tx: watch::Sender::new(BreakerState::Closed),
        }
    }

    pub(super) fn name(&self) -> &str {
        &self.name
    }

    pub(super) fn config(&self) -> &CircuitBreakerConfig {
        &self.config
    }

    pub(super) fn watch(&self) -> watch::Receiver<BreakerState> {
        self.state_tx.subscribe()
    }

    pub(super) fn state(&self) -> BreakerState {
        self.lock().state
    }

    pub(super) fn snapshot(&self) -> BreakerSnapshot {
        let machine = self.lock();
        BreakerSnapshot {
            name: self.name.clone(),
            state: machine.state,
            changed_at: machine.changed_at,
            consecutive_failures: machine.failures,
            failure_threshold: self.config.failure_threshold,
            opened_total: machine.opened_total,
            reset_timeout: self.config.reset_timeout(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Machine> {
        // The machine is a few plain fields updated together; a panic
        // elsewhere cannot leave them half-written.
        self.machine.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Whether a call may go through now, moving an open breaker whose reset
    /// timeout has passed to half-open.
    pub(super) fn readiness(&self) -> Readiness {
        let mut machine = self.lock();
        self.readiness_locked(&mut machine, Instant::now())
    }

    fn readiness_locked(&self, machine: &mut Machine, now: Instant) -> Readiness {
        match machine.state {
            BreakerState::Closed => Readiness::Ready,
            BreakerState::Open => {
                let due = machine.opened_at + self.config.reset_timeout();
                if now < due {
                    return Readiness::OpenUntil(due);
                }
                self.transition(machine, BreakerState::HalfOpen);
                Readiness::Ready
            }
            BreakerState::HalfOpen if machine.probe_in_flight => Readiness::ProbeInFlight,
            BreakerState::HalfOpen => Readiness::Ready,
        }
    }

    /// Lets a call through, or says why not with the error to fail it with.
    pub(super) fn acquire(&self) -> Result<Permit, Error> {
        let mut machine = self.lock();
        let now = Instant::now();
        match self.readiness_locked(&mut machine, now) {
            Readiness::Ready if machine.state == BreakerState::HalfOpen => {
                machine.probe_in_flight = true;
                Ok(Permit::Probe {
                    epoch: machine.epoch,
                })
            }
            Readiness::Ready => Ok(Permit::Call {
                epoch: machine.epoch,
            }),
            Readiness::OpenUntil(due) => Err(self.open_error(due - now)),
            // The trial call decides within one call timeout.
            Readiness::ProbeInFlight => Err(self.open_error(self.config.timeout())),
        }
    }

    /// The error an open breaker fails a call with. It asks a consume loop
    /// to requeue the message for when the breaker will try again rather
    /// than dead-letter it: the message did nothing wrong.
    pub(super) fn open_error(&self, remaining: Duration) -> Error {
        Error::new(
            ErrorKind::BreakerOpen,
            format!(
                "circuit breaker {:?} is open; next trial call in {} ms",
                self.name,
                remaining.as_millis()
            ),
        )
        .with_requeue(remaining)
    }

    /// Records how a permitted call ended.
    pub(super) fn record(&self, permit: Permit, outcome: Outcome) -> Recorded {
        let mut machine = self.lock();
        if permit.epoch() != machine.epoch {
            // Let through before the last change of state: what it says about
            // the dependency is out of date. A failure is the outage's.
            return match outcome {
                Outcome::Failure => Recorded::Outage(self.time_to_probe(&machine)),
                Outcome::Success | Outcome::Neutral => Recorded::Counted,
            };
        }
        // The epoch is current, so a call's breaker is still closed and a
        // probe's still half-open with this probe in flight.
        let recorded = match (outcome, permit) {
            (Outcome::Neutral, _) => Recorded::Counted,
            (Outcome::Success, Permit::Call { .. }) => {
                machine.failures = 0;
                Recorded::Counted
            }
            (Outcome::Success, Permit::Probe { .. }) => {
                machine.probe_in_flight = false;
                self.transition(&mut machine, BreakerState::Closed);
                Recorded::Counted
            }
            (Outcome::Failure, Permit::Call { .. }) => {
                machine.failures += 1;
                if machine.failures >= self.config.failure_threshold {
                    self.open(&mut machine);
                }
                Recorded::Counted
            }
            (Outcome::Failure, Permit::Probe { .. }) => {
                machine.probe_in_flight = false;
                self.open(&mut machine);
                Recorded::Outage(self.config.reset_timeout())
            }
        };
        if let (Outcome::Neutral, Permit::Probe { .. }) = (outcome, permit) {
            // A neutral trial call changed nothing, yet those waiting for its
            // outcome must wake so one of them tries next.
            machine.probe_in_flight = false;
            self.state_tx.send_replace(BreakerState::HalfOpen);
        }
        recorded
    }

    /// How long until the breaker lets a trial call through.
    fn time_to_probe(&self, machine: &Machine) -> Duration {
        match machine.state {
            BreakerState::Closed => Duration::ZERO,
            BreakerState::Open => (machine.opened_at + self.config.reset_timeout())
                .saturating_duration_since(Instant::now()),
            // The trial call decides within one call timeout.
            BreakerState::HalfOpen if machine.probe_in_flight => self.config.timeout(),
            BreakerState::HalfOpen => Duration::ZERO,
        }
    }

    /// A permitted call was dropped before it finished: it says nothing
    /// about the dependency, but a trial call must free its slot.
    pub(super) fn abandon(&self, permit: Permit) {
        let mut machine = self.lock();
        if let Permit::Probe { epoch } = permit
            && epoch == machine.epoch
        {
            machine.probe_in_flight = false;
            // Wake those waiting for the probe's outcome so one of them probes.
            self.state_tx.send_replace(BreakerState::HalfOpen);
        }
    }

    fn open(&self, machine: &mut Machine) {
        machine.opened_at = Instant::now();
        machine.failures = 0;
        machine.opened_total += 1;
        self.transition(machine, BreakerState::Open);
    }

    fn transition(&self, machine: &mut Machine, to: BreakerState) {
        let from = machine.state;
        machine.state = to;
        machine.epoch += 1;
        machine.changed_at = chrono::Utc::now();
        match to {
            BreakerState::Open => tracing::warn!(
                breaker = %self.name,
                %from,
                %to,
                reset_timeout_ms = self.config.reset_timeout_ms,
                "circuit breaker opened",
            ),
            BreakerState::HalfOpen => tracing::info!(
                breaker = %self.name,
                %from,
                %to,
                "circuit breaker half-open; letting one trial call through",
            ),
            BreakerState::Closed => {
                tracing::info!(breaker = %self.name, %from, %to, "circuit breaker closed")
            }
        }
        let (label, level) = match to {
            BreakerState::Closed => ("closed", 0.0),
            BreakerState::HalfOpen => ("half_open", 1.0),
            BreakerState::Open => ("open", 2.0),
        };
        crate::observe::metrics::breaker_changed(
            &self.name,
            label,
            level,
            from == BreakerState::Closed,
            Duration::from_millis(self.config.reset_timeout_ms),
        );
        self.state_tx.send_replace(to);
    }
}

impl fmt::Debug for Shared {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Breaker")
            .field("name", &self.name)
            .field("state", &self.state())
            .field("config", &self.config)
            .finish()
    }
}
