//! How a publish rides out a short outage: retryable failures are tried
//! again, with backoff, until a deadline.

use std::future::Future;
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};
use tokio::time::Instant;

use crate::config::RetryConfig;
use crate::error::{Effect, Error, ErrorKind};

/// See [`EventBus::DEFAULT_PUBLISH_DEADLINE`](super::EventBus::DEFAULT_PUBLISH_DEADLINE).
pub(super) const DEFAULT_PUBLISH_DEADLINE: Duration = Duration::from_secs(10);

/// The deadline and the waits between attempts.
#[derive(Debug, Clone, Copy)]
pub(super) struct PublishRetry {
    pub(super) deadline: Duration,
    backoff: ExponentialBuilder,
    jitter: bool,
    max_backoff: Duration,
}

impl Default for PublishRetry {
    fn default() -> Self {
        Self::new(DEFAULT_PUBLISH_DEADLINE, &RetryConfig::default())
    }
}

impl PublishRetry {
    pub(super) fn new(deadline: Duration, config: &RetryConfig) -> Self {
        // The deadline bounds the attempts, not `max_attempts`: an outage
        // lasts as long as it lasts, not a number of tries.
        let backoff = ExponentialBuilder::new()
            .with_min_delay(config.backoff())
            .with_max_delay(config.max_backoff())
            .with_factor(config.backoff_multiplier as f32)
            .without_max_times();
        Self {
            deadline,
            backoff,
            jitter: config.jitter,
            max_backoff: config.max_backoff(),
        }
    }

    pub(super) fn with_deadline(mut self, deadline: Duration) -> Self {
        self.deadline = deadline;
        self
    }

    /// Runs `attempt` until it succeeds, fails for good, or the next try
    /// would start past the deadline. An attempt still running at the
    /// deadline is cut short with a [`ErrorKind::Timeout`].
    pub(super) async fn run<F, Fut>(&self, topic: &str, mut attempt: F) -> Result<(), Error>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<(), Error>>,
    {
        if self.deadline.is_zero() {
            return attempt().await;
        }
        let started = Instant::now();
        let deadline = started + self.deadline;
        let backoff = if self.jitter {
            self.backoff.with_jitter()
        } else {
            self.backoff
        };
        let mut waits = backoff.build();
        let mut attempts = 0u32;
        let mut last: Option<Error> = None;
        loop {
            attempts += 1;
            let error = match bounded(deadline, attempt()).await {
                Ok(Ok(())) => return Ok(()),
                // An error that already counts its attempts comes from a
                // transport that retries by itself (the push publisher):
                // one retry owner per path, so it is not tried again here.
                Ok(Err(error)) if error.attempts().is_some() => return Err(error),
                Ok(Err(error)) if !error.is_retryable() || attempts == u32::MAX => {
                    return Err(self.gave_up(topic, error, attempts, started));
                }
                Ok(Err(error)) => error,
                Err(_elapsed) => {
                    let last = last.map_or_else(String::new, |error| format!("; last: {error}"));
                    return Err(Error::new(
                        ErrorKind::Timeout,
                        format!(
                            "publish to {topic}: no answer within the publish deadline of \
                             {:?} ({attempts} attempts{last}); retryable, but it may have \
                             been published",
                            self.deadline
                        ),
                    )
                    .with_attempts(attempts));
                }
            };
            // backon multiplies in f32; whole milliseconds are the unit of
            // the configuration.
            let wait = waits
                .next()
                .map_or(self.max_backoff, |wait| {
                    Duration::from_millis(wait.as_millis() as u64)
                })
                .min(self.max_backoff.max(Duration::from_millis(1)));
            if Instant::now() + wait >= deadline {
                return Err(self.gave_up(topic, error, attempts, started));
            }
            tracing::warn!(
                topic,
                attempt = attempts,
                ?wait,
                %error,
                "publish failed; trying again"
            );
            last = Some(error);
            tokio::time::sleep(wait).await;
        }
    }

    /// The last error, saying how many attempts were made and over how long
    /// (a first attempt's error is returned as it is).
    fn gave_up(&self, topic: &str, error: Error, attempts: u32, started: Instant) -> Error {
        if attempts == 1 {
            return error.with_attempts(1);
        }
        let retry = if error.is_retryable() {
            "retryable: try again later"
        } else {
            "not retryable"
        };
        let message = format!(
            "{}; publish to {topic} gave up after {attempts} attempts over {:.1?} \
             (publish deadline {:?}; {retry})",
            error.message(),
            started.elapsed(),
            self.deadline,
        );
        let effect: Effect = error.effect();
        Error::new(error.kind(), message)
            .with_effect(effect)
            .with_attempts(attempts)
            .with_source(error)
    }
}

/// `attempt` under `deadline`; the timer is armed only when the attempt
/// does not finish at its first poll, so a transport that accepts at once
/// (in memory) pays for no timer and needs none on its runtime.
async fn bounded<Fut>(
    deadline: Instant,
    attempt: Fut,
) -> Result<Result<(), Error>, tokio::time::error::Elapsed>
where
    Fut: Future<Output = Result<(), Error>>,
{
    let mut attempt = std::pin::pin!(attempt);
    let first = std::future::poll_fn(|cx| std::task::Poll::Ready(attempt.as_mut().poll(cx))).await;
    match first {
        std::task::Poll::Ready(result) => Ok(result),
        std::task::Poll::Pending => tokio::time::timeout_at(deadline, attempt).await,
    }
}
