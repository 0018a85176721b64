//! Each service's operator console, mounted under `/console` beside its
//! API: its consumers, breakers, latency budgets, the dead letters of the
//! topics it consumes, and its outbox relays.
//!
//! Actions need the console's operator token: `CONSOLE_TOKEN` when set,
//! otherwise a random one made at start and printed with the console's URL
//! (the way a notebook server does).

use std::sync::Arc;
use std::time::Duration;

use switchboard::console::{Console, OutboxSource};
use switchboard::middleware::circuit_breaker::CircuitBreakerLayer;
use switchboard::middleware::dead_letter::DeadLetterAdmin;
use switchboard::observe::{BudgetChecks, BudgetConfig, LatencyBudgets};
use switchboard::{ConsumerHandle, Transport};

use super::brokers::Brokers;

/// Where the console is mounted in every service.
pub const MOUNT: &str = "/console";

/// A service's console and the token its actions need.
#[derive(Debug, Clone)]
pub struct ServiceConsole {
    pub console: Console,
    pub token: Arc<str>,
}

/// The operator token: `CONSOLE_TOKEN`, or a fresh random one.
pub fn operator_token() -> Arc<str> {
    std::env::var("CONSOLE_TOKEN")
        .ok()
        .filter(|token| !token.is_empty())
        .unwrap_or_else(|| uuid::Uuid::new_v4().simple().to_string())
        .into()
}

/// The strategy §3 budgets of `paths` (the ones the service times),
/// checked every 5 s so the console's charts move within a demo.
pub fn budgets(paths: &[&str]) -> (LatencyBudgets, BudgetChecks) {
    let spec = BudgetConfig::spec();
    let config = paths
        .iter()
        .filter_map(|path| Some((*path, spec.budget(path)?)))
        .fold(BudgetConfig::default(), |config, (path, budget)| {
            config.with_budget(path, budget)
        })
        .with_check_interval(Duration::from_secs(5));
    let budgets = LatencyBudgets::new(&config);
    let checks = budgets.spawn_checks();
    (budgets, checks)
}

/// The console of `service`: its buses, `consumers`, `breakers`,
/// `budgets`, the dead letters of the topics of `dead_letters`' consumers
/// on their transports (those that keep dead letters), and its outboxes
/// (`database::outbox_sources`).
pub fn service_console(
    service: &str,
    brokers: &Brokers,
    consumers: &[&ConsumerHandle],
    breakers: &[&CircuitBreakerLayer],
    budgets: Option<&LatencyBudgets>,
    dead_letters: &[(&Arc<dyn Transport>, &[&ConsumerHandle])],
    outboxes: Vec<OutboxSource>,
) -> ServiceConsole {
    let token = operator_token();
    let events = brokers.events(service);
    let mut builder = Console::builder(service)
        .bus("events", &events)
        .bus("broadcast", &brokers.broadcast(service))
        .bus("tasks", &brokers.tasks(service))
        .operator_token(token.to_string());
    for consumer in consumers {
        builder = builder.consumer(consumer);
    }
    for breaker in breakers {
        builder = builder.breaker(breaker);
    }
    if let Some(budgets) = budgets {
        builder = builder.budgets(budgets);
    }
    for (transport, consumers) in dead_letters {
        if transport.dead_letters().is_err() {
            continue;
        }
        let topics = consumers.iter().map(|consumer| consumer.topic().to_owned());
        builder = builder.dead_letters(DeadLetterAdmin::new(Arc::clone(transport)), topics);
    }
    for outbox in outboxes {
        builder = builder.outbox(outbox);
    }
    ServiceConsole {
        console: builder.build(),
        token,
    }
}
