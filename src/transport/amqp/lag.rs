//! A group's lag on RabbitMQ: the ready messages in its queue, read with a
//! passive declare on a channel of its own (a failed passive declare closes
//! its channel).

use lapin::options::QueueDeclareOptions;
use lapin::types::FieldTable;

use super::Shared;
use super::connection::Link;
use super::error::amqp_error;
use crate::error::Error;
use crate::transport::validate_name;

/// The messages `group`'s queue of `topic` holds ready (not yet handed to
/// a consumer).
pub(super) async fn group_lag(
    shared: &Shared,
    topic: &str,
    group: &str,
) -> Result<Option<u64>, Error> {
    shared.lifecycle.check()?;
    validate_name("topic", topic)?;
    let queue = shared.config.queue_name(topic, group)?;
    let deadline = tokio::time::Instant::now() + shared.config.publish_timeout;
    let link = shared.supervisor.wait_link(deadline).await?;
    let depth = queue_depth(&link, &queue)
        .await
        .map_err(|error| amqp_error("read the queue depth", error))?;
    Ok(Some(u64::from(depth)))
}

/// The ready messages of `queue`, by a passive declare on a channel of its
/// own on `link` (a failed passive declare closes its channel). Shared by
/// [`group_lag`] and the subscriptions' lag sampler.
pub(super) async fn queue_depth(link: &Link, queue: &str) -> Result<u32, lapin::Error> {
    let channel = link.connection.create_channel().await?;
    let declared = channel
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                passive: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await;
    let _ = channel.close(200, "queue depth read".into()).await;
    declared.map(|queue| queue.message_count())
}
