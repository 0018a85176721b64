//! Closing the transport, summing up its health, and deleting a
//! namespace's queues (for tests).

use std::sync::Arc;

use lapin::options::QueueDeleteOptions;
use tokio::time::Instant;

use super::connection::{CLOSE_TIMEOUT, ConnectionState};
use super::error::amqp_error;
use super::{AmqpHealth, DLQ_SUFFIX, NAME, Shared, lock};
use crate::error::Error;
use crate::transport::{TransportHealth, validate_name};

/// Stops both supervisors and closes both connections politely, each
/// within `deadline`. Runs once the subscriptions ended (their channels are
/// closed by then), so lapin has no channel left in use to complain about.
pub(super) async fn close_connections(shared: Arc<Shared>, deadline: Instant) {
    // The consuming connection first: nothing publishes through it, and
    // the consumers' last dead letters went out through the other.
    for supervisor in [&shared.consuming, &shared.supervisor] {
        supervisor.close(deadline).await;
    }
}

/// One state for every transport: up when both connections are, down when
/// neither is, degraded otherwise (one reconnecting, or publishing blocked).
pub(super) fn summarise(health: &AmqpHealth) -> TransportHealth {
    use ConnectionState::{Blocked, Closed, Connected};
    match (health.publishing, health.consuming) {
        (Connected, Connected) => TransportHealth::up(NAME),
        (Closed, _) | (_, Closed) => TransportHealth::closed(NAME),
        (Blocked, Connected) => TransportHealth::degraded(
            NAME,
            format!(
                "the broker blocks publishing: {}",
                health.blocked.as_deref().unwrap_or("no reason given")
            ),
        ),
        (Connected | Blocked, _) => {
            TransportHealth::degraded(NAME, "the consuming connection is reconnecting")
        }
        (_, Connected) => {
            TransportHealth::degraded(NAME, "the publishing connection is reconnecting")
        }
        _ => TransportHealth::down(NAME, "both connections are reconnecting"),
    }
}

/// Deletes every queue (and its dead-letter queue) this transport declared
/// or subscribed under `<namespace>.`; returns how many queues went.
pub(super) async fn purge_namespace(shared: &Shared, namespace: &str) -> Result<usize, Error> {
    validate_name("namespace", namespace)?;
    let prefix = format!("{namespace}.");
    let doomed: Vec<(String, Vec<String>)> = lock(&shared.known)
        .iter()
        .filter(|(topic, _)| topic.starts_with(&prefix))
        .map(|(topic, groups)| (topic.clone(), groups.iter().cloned().collect()))
        .collect();
    if doomed.is_empty() {
        return Ok(0);
    }
    let deadline = Instant::now() + shared.config.publish_timeout;
    let link = shared.supervisor.wait_link(deadline).await?;
    let channel = link
        .connection
        .create_channel()
        .await
        .map_err(|error| amqp_error("open a channel", error))?;
    let mut deleted = 0;
    let result = async {
        for (topic, groups) in &doomed {
            for group in groups {
                let queue = shared.config.queue_name(topic, group)?;
                for name in [format!("{queue}{DLQ_SUFFIX}"), queue] {
                    channel
                        .queue_delete(name.as_str().into(), QueueDeleteOptions::default())
                        .await
                        .map_err(|error| amqp_error("delete a queue", error))?;
                    deleted += 1;
                }
            }
            lock(&shared.known).remove(topic);
        }
        Ok::<(), Error>(())
    };
    let result = shared.supervisor.guard(link.generation, result).await;
    let _ = tokio::time::timeout(CLOSE_TIMEOUT, channel.close(200, "purged".into())).await;
    result.map(|()| deleted)
}
