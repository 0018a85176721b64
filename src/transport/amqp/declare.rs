//! Declaring the topology: the exchange, and per group its queue, binding
//! and dead-letter queue.

use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{Channel, ExchangeKind};

use super::connection::{CLOSE_TIMEOUT, Link, Role, Supervisor};
use super::error::amqp_error;
use super::{AmqpConfig, DLQ_SUFFIX, QueueType, Shared};
use crate::error::{Error, ErrorKind};
use crate::topology::Topology;

/// On a new connection: the exchange, and on the publishing connection
/// every known queue, each on a channel of its own. A declaration the
/// broker refuses (say `PRECONDITION_FAILED`: the queue exists with other
/// arguments) fails only what needs it — the subscription declares its
/// queue again when it resumes and reports the reason — never the
/// connection of everything else; only a connection failure does.
pub(super) async fn redeclare(
    shared: &Shared,
    supervisor: &Supervisor,
    link: &Link,
) -> Result<(), Error> {
    let config = &shared.config;
    let mut parts = vec![Topology::new()];
    if supervisor.role == Role::Publishing {
        let known = shared.known_topology();
        parts.extend(
            known
                .subscriptions()
                .map(|(topic, group)| Topology::new().with_groups(topic, [group])),
        );
    }
    for part in &parts {
        if let Err(error) = declare_on(config, link, part).await {
            if matches!(error.kind(), ErrorKind::Connection | ErrorKind::Timeout) {
                return Err(error);
            }
            tracing::warn!(%error, "amqp: a declaration failed on a new connection; going on without it");
        }
    }
    Ok(())
}

/// Declares the exchange, and each group's queue, binding and dead-letter
/// queue, on one short-lived channel.
pub(crate) async fn declare_on(
    config: &AmqpConfig,
    link: &Link,
    topology: &Topology,
) -> Result<(), Error> {
    let channel = link
        .connection
        .create_channel()
        .await
        .map_err(|error| amqp_error("open a channel", error))?;
    let declared = async {
        channel
            .exchange_declare(
                config.exchange.as_str().into(),
                ExchangeKind::Topic,
                ExchangeDeclareOptions {
                    durable: true,
                    auto_delete: config.exchange_auto_delete,
                    ..ExchangeDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .map_err(|error| amqp_error("declare the exchange", error))?;
        for (topic, group) in topology.subscriptions() {
            declare_queue(config, &channel, topic, group).await?;
        }
        Ok(())
    }
    .await;
    // Closing waits for the broker; a dead connection never answers.
    let _ = tokio::time::timeout(CLOSE_TIMEOUT, channel.close(200, "declared".into())).await;
    declared
}

pub(crate) async fn declare_queue(
    config: &AmqpConfig,
    channel: &Channel,
    topic: &str,
    group: &str,
) -> Result<String, Error> {
    let queue = config.queue_name(topic, group)?;
    let dlq = format!("{queue}{DLQ_SUFFIX}");
    let durable = QueueDeclareOptions {
        durable: true,
        ..QueueDeclareOptions::default()
    };
    channel
        .queue_declare(dlq.as_str().into(), durable, queue_arguments(config, None))
        .await
        .map_err(|error| amqp_error("declare the dead-letter queue", error))?;
    channel
        .queue_declare(
            queue.as_str().into(),
            durable,
            queue_arguments(config, Some(&dlq)),
        )
        .await
        .map_err(|error| amqp_error("declare the queue", error))?;
    channel
        .queue_bind(
            queue.as_str().into(),
            config.exchange.as_str().into(),
            topic.into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(|error| amqp_error("bind the queue", error))?;
    Ok(queue)
}

fn queue_arguments(config: &AmqpConfig, dead_letters_to: Option<&str>) -> FieldTable {
    let mut arguments = FieldTable::default();
    let mut set = |name: &str, value: AMQPValue| {
        arguments.insert(ShortString::from(name), value);
    };
    if let Some(expires) = config.queue_expires {
        set(
            "x-expires",
            AMQPValue::LongLongInt(expires.as_millis().clamp(1, i64::MAX as u128) as i64),
        );
    }
    if config.single_active_consumer && dead_letters_to.is_some() {
        // The group queue only: its dead letters are read by operators.
        set("x-single-active-consumer", AMQPValue::Boolean(true));
    }
    if config.queue_type == QueueType::Quorum {
        set("x-queue-type", long_string("quorum"));
        if let Some(dlq) = dead_letters_to {
            // Broker-side dead-lettering (a delivery limit, a reject without
            // requeue) lands in the same queue, at least once.
            set("x-dead-letter-exchange", long_string(""));
            set("x-dead-letter-routing-key", long_string(dlq));
            set("x-dead-letter-strategy", long_string("at-least-once"));
            set("x-overflow", long_string("reject-publish"));
        }
    }
    arguments
}

pub(crate) fn long_string(value: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(value))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn quorum_queues_dead_letter_at_least_once() {
        let config = AmqpConfig::default()
            .with_queue_type(QueueType::Quorum)
            .with_queue_expires(Duration::from_secs(60));
        let arguments = queue_arguments(&config, Some("q.dlq"));
        let inner = arguments.inner();
        assert_eq!(
            inner["x-dead-letter-strategy"],
            long_string("at-least-once")
        );
        assert_eq!(inner["x-overflow"], long_string("reject-publish"));
        assert_eq!(inner["x-expires"], AMQPValue::LongLongInt(60_000));
        let classic = queue_arguments(&AmqpConfig::default(), Some("q.dlq"));
        assert!(classic.inner().is_empty());
        let single = AmqpConfig::default().with_single_active_consumer(true);
        let arguments = queue_arguments(&single, Some("q.dlq"));
        assert_eq!(
            arguments.inner()["x-single-active-consumer"],
            AMQPValue::Boolean(true)
        );
        assert!(queue_arguments(&single, None).inner().is_empty());
    }
}
