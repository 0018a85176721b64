//! Observability: trace context across services, metrics, latency budgets.
//!
//! Operators of a four-service system need to follow one trade from the
//! gateway to Game's holdings, and to see each path's latency against its
//! strategy §3 budget before users notice. Three pieces:
//!
//! * [`trace`] (feature `otel`): the W3C `traceparent` / `tracestate` of
//!   the current span travels in the envelope headers (so across every
//!   transport) and in HTTP / gRPC headers, and consumers continue the
//!   publisher's trace. Without the feature the crate writes and reads no
//!   trace headers (see [`trace`]'s docs for what is still carried).
//! * Metrics through the [`metrics`] facade: the application installs the
//!   recorder (exporter) it wants — `examples/metrics.rs` shows Prometheus.
//!   Install it before building buses and clients, then call
//!   [`metrics::describe`] for descriptions and units. Nothing here takes a lock
//!   shared across tasks: each recording is a `metrics` macro call into the
//!   recorder the application chose.
//! * [`LatencyBudgets`]: each path's P99 target from [`BudgetConfig`], a
//!   lock-free histogram per path, and a periodic (or manual) check that
//!   warns and counts when a path's P99 is over its budget.
//!
//! # Metrics
//!
//! | name | type | labels | recorded by |
//! |---|---|---|---|
//! | `switchboard_publish_total` | counter | `transport`, `topic`, `outcome` (`ok`/`error`) | [`EventBus`](crate::EventBus) publish |
//! | `switchboard_publish_duration_seconds` | histogram | `transport`, `topic`, `outcome` | [`EventBus`](crate::EventBus) publish |
//! | `switchboard_consume_total` | counter | `transport`, `topic`, `group`, `outcome` (`ack`/`nack`/`dead_letter`/`dropped`/`unsettled`) | the consume loop, once per delivery |
//! | `switchboard_consume_duration_seconds` | histogram | `transport`, `topic`, `group`, `outcome` | the consume loop: decode to settled |
//! | `switchboard_call_total` | counter | `path`, `transport`, `outcome` (`ok` or the error kind) | [`CallMetrics`] |
//! | `switchboard_call_duration_seconds` | histogram | `path`, `transport`, `outcome` | [`CallMetrics`] |
//! | `switchboard_retries_total` | counter | `kind` (error kind retried) | [`Retry`](crate::middleware::retry::Retry) |
//! | `switchboard_retries_refused_total` | counter | `reason` (`budget`/`may_have_applied`) | [`Retry`](crate::middleware::retry::Retry): attempts were left but it gave up |
//! | `switchboard_breaker_transitions_total` | counter | `breaker`, `to` (`closed`/`open`/`half_open`) | [`CircuitBreaker`](crate::middleware::circuit_breaker::CircuitBreaker) |
//! | `switchboard_breaker_state` | gauge | `breaker` (0 closed, 1 half open, 2 open) | [`CircuitBreaker`](crate::middleware::circuit_breaker::CircuitBreaker) |
//! | `switchboard_dead_letters_total` | counter | `transport`, `topic`, `group` | the consume loop |
//! | `switchboard_dead_letter_depth` | gauge | `transport`, `topic` | [`DeadLetterAdmin`](crate::middleware::dead_letter::DeadLetterAdmin): `list` that saw the whole queue; `redrive_all` sets 0 |
//! | `switchboard_dedupe_hits_total` | counter | `topic`, `group`, `state` (`done`/`in_progress`) | [`Dedupe`](crate::middleware::dedupe::Dedupe); the outbox's `Inbox` handler (`done`) |
//! | `switchboard_latency_p99_seconds` | gauge | `path` | [`LatencyBudgets`] check |
//! | `switchboard_budget_breaches_total` | counter | `path` | [`LatencyBudgets`] check |
//! | `switchboard_dropped_total` | counter | `transport`, `topic`, `reason` (`inbox_full`) | Redis Pub/Sub's bounded inbox |
//! | `switchboard_push_refused_total` | counter | `transport`, `topic` | gRPC / HTTP push receivers whose queue was full |
//! | `switchboard_consumer_lag` | gauge | `transport`, `topic`, `group` | each subscription, on an interval (memory, Redis Streams, RabbitMQ) |
//! | `switchboard_dedupe_evictions_total` | counter | `store` | [`MemoryDedupeStore`](crate::middleware::dedupe::MemoryDedupeStore) |
//! | `switchboard_outbox_pending` | gauge | `outbox` (table) | the outbox relay, every `stats_interval`: rows waiting, parked ones not counted |
//! | `switchboard_outbox_lag_seconds` | gauge | `outbox` | the outbox relay: age of the oldest row waiting |
//! | `switchboard_outbox_sent_total` | counter | `outbox`, `topic` | the outbox relay: rows the transport accepted |
//! | `switchboard_outbox_parked_total` | counter | `outbox`, `topic` | the outbox relay: rows refused for good and parked |
//!
//! Durations are recorded in seconds. `outcome` error kinds are
//! `connection`, `timeout`, `unavailable`, `rejected`, `unauthorized`,
//! `decode`, `encode`, `config`, `not_found`, `breaker_open`,
//! `unsupported`, `closed`.

mod budget;
mod budget_history;
mod call;
pub mod metrics;
#[cfg(feature = "otel")]
#[cfg_attr(docsrs, doc(cfg(feature = "otel")))]
pub mod trace;

pub use budget::{BudgetChecks, BudgetConfig, BudgetReport, LatencyBudgets, LatencyRecorder};
pub use budget_history::{BudgetSample, HISTORY_LEN, PathHistory};
pub use call::{CallMetrics, CallMetricsLayer, ResponseFuture};
