//! What the console shows, gathered from the service's own handles into
//! plain serialisable values: the JSON API answers them as they are, the
//! page renders them. Every call that may wait (a broker, a database) runs
//! under the console's time limit and a list limit, so a slow dependency
//! makes the console say "timed out", never hold the service's traffic.

use std::future::Future;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Serialize;

use super::Sources;
use crate::ConsumerHealth;
use crate::transport::{DeadLettered, HealthState};

/// The whole page's data (`GET api/overview`).
#[derive(Debug, Clone, Serialize)]
pub(super) struct Overview {
    pub(super) service: String,
    pub(super) read_only: bool,
    pub(super) actions_enabled: bool,
    pub(super) generated_at: DateTime<Utc>,
    pub(super) transports: Vec<TransportView>,
    pub(super) consumers: Vec<ConsumerView>,
    pub(super) breakers: Vec<BreakerView>,
    pub(super) budgets: Vec<BudgetView>,
    pub(super) dead_letters: Vec<TopicLetters>,
    pub(super) outboxes: Vec<OutboxView>,
}

#[derive(Debug, Clone, Serialize)]
pub(super) struct TransportView {
    pub(super) name: String,
    pub(super) transport: &'static str,
    /// `up`, `degraded`, `down` or `closed`.
    pub(super) state: &'static str,
    pub(super) reason: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub(super) struct ConsumerView {
    pub(super) topic: String,
    pub(super) group: String,
    pub(super) transport: &'static str,
    /// `running`, `paused` (its handler is not ready: a breaker is open),
    /// `dead` (the loop ended on `error`) or `stopped` (shut down).
    pub(super) state: &'static str,
    pub(super) error: Option<String>,
    pub(super) in_flight: u64,
    /// The group's lag, when the transport can tell (Redis Streams 7+,
    /// RabbitMQ, memory) and answered in time.
    pub(super) lag: Option<u64>,
    pub(super) handled: u64,
    pub(super) failed: u64,
    pub(super) last_error: Option<String>,
    pub(super) last_error_at: Option<DateTime<Utc>>,
}

#[derive(Debug, Clone, Serialize)]
pub(super) struct BreakerView {
    pub(super) name: String,
    pub(super) state: String,
    pub(super) changed_at: DateTime<Utc>,
    pub(super) consecutive_failures: u32,
    pub(super) failure_threshold: u32,
    pub(super) opened_total: u64,
    pub(super) reset_timeout_ms: u128,
}

#[derive(Debug, Clone, Serialize)]
pub(super) struct BudgetView {
    pub(super) path: String,
    pub(super) budget_ms: f64,
    pub(super) samples: Vec<SampleView>,
}

#[derive(Debug, Clone, Serialize)]
pub(super) struct SampleView {
    pub(super) at: DateTime<Utc>,
    pub(super) count: u64,
    pub(super) p50_ms: f64,
    pub(super) p99_ms: f64,
}

#[derive(Debug, Clone, Serialize)]
pub(super) struct TopicLetters {
    pub(super) topic: String,
    /// Listed up to the console's limit; `more` says there were more.
    pub(super) letters: Vec<LetterView>,
    pub(super) more: bool,
    /// Why the queue could not be read (a timeout, a lost connection).
    pub(super) error: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub(super) struct LetterView {
    pub(super) id: String,
    pub(super) topic: String,
    pub(super) group: String,
    pub(super) event_type: Option<String>,
    pub(super) reason: String,
    pub(super) attempts: u32,
    pub(super) last_error: Option<String>,
    pub(super) dead_lettered_at: DateTime<Utc>,
}

#[derive(Debug, Clone, Serialize)]
pub(super) struct OutboxView {
    pub(super) name: String,
    pub(super) sent: u64,
    pub(super) parked: u64,
    pub(super) failures: u64,
    pub(super) pending: Option<u64>,
    /// The age of the oldest pending row; none when nothing waits.
    pub(super) lag_ms: Option<u128>,
    pub(super) error: Option<String>,
}

impl From<&DeadLettered> for LetterView {
    fn from(letter: &DeadLettered) -> Self {
        Self {
            id: letter.id.clone(),
            topic: letter.topic.clone(),
            group: letter.group.clone(),
            event_type: letter
                .message
                .headers
                .get(crate::header::EVENT_TYPE)
                .cloned(),
            reason: letter.reason.clone(),
            attempts: letter.attempts,
            last_error: letter.last_error.clone(),
            dead_lettered_at: letter.dead_lettered_at,
        }
    }
}

/// `call` under `limit`: its result, or why there is none.
pub(super) async fn bounded<T>(
    limit: Duration,
    call: impl Future<Output = Result<T, crate::Error>>,
) -> Result<T, String> {
    match tokio::time::timeout(limit, call).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(error)) => Err(error.to_string()),
        Err(_) => Err(format!("no answer within {} ms", limit.as_millis())),
    }
}

fn millis(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1e3
}

impl Sources {
    /// Everything the page shows, now.
    pub(super) async fn overview(&self) -> Overview {
        Overview {
            service: self.service.clone(),
            read_only: self.read_only,
            actions_enabled: !self.read_only && self.operators.configured(),
            generated_at: Utc::now(),
            transports: self.transports(),
            consumers: self.consumers().await,
            breakers: self.breakers(),
            budgets: self.budgets(),
            dead_letters: self.all_dead_letters().await,
            outboxes: self.outboxes().await,
        }
    }

    fn transports(&self) -> Vec<TransportView> {
        self.buses
            .iter()
            .map(|(name, bus)| {
                let health = bus.health();
                let (state, reason) = match health.state {
                    HealthState::Up => ("up", None),
                    HealthState::Degraded { reason } => ("degraded", Some(reason)),
                    HealthState::Down { reason } => ("down", Some(reason)),
                    HealthState::Closed => ("closed", None),
                };
                TransportView {
                    name: name.clone(),
                    transport: health.transport,
                    state,
                    reason,
                }
            })
            .collect()
    }

    /// Every consumer, their lags asked at once, each under the time limit.
    async fn consumers(&self) -> Vec<ConsumerView> {
        let lags = futures_util::future::join_all(
            self.consumers
                .iter()
                .map(|consumer| bounded(self.limits.timeout, consumer.lag())),
        )
        .await;
        self.consumers
            .iter()
            .zip(lags)
            .map(|(consumer, lag)| {
                let stats = consumer.stats();
                let state = match consumer.health() {
                    ConsumerHealth::Running => "running",
                    ConsumerHealth::Paused => "paused",
                    _ if consumer.failure().is_some() => "dead",
                    _ => "stopped",
                };
                ConsumerView {
                    topic: consumer.topic().to_owned(),
                    group: consumer.group().to_owned(),
                    transport: consumer.transport(),
                    state,
                    error: consumer.failure().map(ToString::to_string),
                    in_flight: stats.in_flight,
                    lag: lag.ok().flatten(),
                    handled: stats.handled,
                    failed: stats.failed,
                    last_error_at: stats.last_error.as_ref().map(|error| error.at),
                    last_error: stats.last_error.map(|error| error.message),
                }
            })
            .collect()
    }

    fn breakers(&self) -> Vec<BreakerView> {
        self.breakers
            .iter()
            .map(|breaker| {
                let snapshot = breaker.snapshot();
                BreakerView {
                    name: snapshot.name,
                    state: snapshot.state.to_string(),
                    changed_at: snapshot.changed_at,
                    consecutive_failures: snapshot.consecutive_failures,
                    failure_threshold: snapshot.failure_threshold,
                    opened_total: snapshot.opened_total,
                    reset_timeout_ms: snapshot.reset_timeout.as_millis(),
                }
            })
            .collect()
    }

    fn budgets(&self) -> Vec<BudgetView> {
        let Some(budgets) = &self.budgets else {
            return Vec::new();
        };
        budgets
            .history()
            .into_iter()
            .map(|path| BudgetView {
                path: path.path,
                budget_ms: millis(path.budget),
                samples: path
                    .samples
                    .into_iter()
                    .map(|sample| SampleView {
                        at: sample.at,
                        count: sample.count,
                        p50_ms: millis(sample.p50),
                        p99_ms: millis(sample.p99),
                    })
                    .collect(),
            })
            .collect()
    }

    /// The dead letters of every configured topic, the topics read at once.
    async fn all_dead_letters(&self) -> Vec<TopicLetters> {
        let reads = self
            .dead_letters
            .keys()
            .map(|topic| self.topic_letters(topic, self.limits.list));
        futures_util::future::join_all(reads).await
    }

    /// Up to `limit` of `topic`'s dead letters.
    pub(super) async fn topic_letters(&self, topic: &str, limit: usize) -> TopicLetters {
        let mut view = TopicLetters {
            topic: topic.to_owned(),
            letters: Vec::new(),
            more: false,
            error: None,
        };
        let Some(admin) = self.dead_letters.get(topic) else {
            view.error = Some("not a topic this console shows".to_owned());
            return view;
        };
        // One more than shown, to know whether there are more.
        match bounded(self.limits.timeout, admin.list(topic, limit + 1)).await {
            Ok(letters) => {
                view.more = letters.len() > limit;
                view.letters = letters.iter().take(limit).map(LetterView::from).collect();
            }
            Err(error) => view.error = Some(error),
        }
        view
    }

    #[cfg(feature = "outbox")]
    async fn outboxes(&self) -> Vec<OutboxView> {
        let mut views = Vec::with_capacity(self.outboxes.len());
        for outbox in &self.outboxes {
            views.push(outbox.view(self.limits.timeout).await);
        }
        views
    }

    #[cfg(not(feature = "outbox"))]
    async fn outboxes(&self) -> Vec<OutboxView> {
        Vec::new()
    }
}
