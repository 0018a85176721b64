//! The mover of scheduled messages: every transport consumes
//! `<exchange>.delay.due` on its consuming connection and sends each message
//! on — into the next bucket while its time has not come, through the topic
//! exchange once it has — acking it only after the broker confirmed the
//! copy. Several movers (one per transport, in as many processes) share the
//! queue as competing consumers; a mover that dies leaves its unacked
//! messages to the broker, which hands them to another: at least once.

use std::sync::Weak;
use std::time::Duration;

use futures_util::TryStreamExt;
use lapin::message::Delivery as AmqpDelivery;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions};
use lapin::types::FieldTable;
use tokio::time::Instant;

use super::properties::{self, header_value, number_value, string_value};
use super::schedule::{self, BROKER_HEADERS, DUE_AT, SCHEDULED_QUEUE, SCHEDULED_TOPIC};
use super::{NAME, Shared};
use crate::error::{Error, ErrorKind};
use crate::observe::metrics;

/// Unacked messages a mover holds, and sends on at once.
const PREFETCH: u16 = 64;
/// How long a mover waits before it hands back a message it could not send
/// on (the broker then delivers it again), so a failure is not a busy loop.
const PAUSE_AFTER_FAILURE: Duration = Duration::from_secs(1);
/// How long the mover waits for a connection before it looks again whether
/// the transport is still there.
const RECHECK: Duration = Duration::from_secs(5);

/// Consumes the due queue for as long as the transport lives, resuming on
/// every new consuming connection.
pub(crate) async fn run(shared: Weak<Shared>) {
    let mut after = 0;
    loop {
        let link = {
            let Some(strong) = shared.upgrade() else {
                return;
            };
            match strong
                .consuming
                .wait_link_after(Instant::now() + RECHECK, after)
                .await
            {
                Ok(link) => link,
                Err(error) if error.kind() == ErrorKind::Closed => return,
                Err(_) => continue,
            }
        };
        after = link.generation;
        let Err(error) = consume(&shared, &link).await else {
            continue;
        };
        let Some(strong) = shared.upgrade() else {
            return;
        };
        strong.consuming.failed(&link, &error);
        if error.kind() != ErrorKind::Connection {
            tracing::warn!(%error, "amqp: the mover of scheduled messages stopped; resuming on the next connection");
            // Not a lost connection: look again on this one later.
            after = link.generation - 1;
            drop(strong);
            tokio::time::sleep(PAUSE_AFTER_FAILURE).await;
        }
    }
}

async fn consume(shared: &Weak<Shared>, link: &super::connection::Link) -> Result<(), Error> {
    let (channel, deliveries) = {
        let Some(strong) = shared.upgrade() else {
            return Ok(());
        };
        let opened = async {
            let channel = link
                .connection
                .create_channel()
                .await
                .map_err(|error| amqp_error("open the mover's channel", error))?;
            *super::lock(&strong.scheduled.mover_channel) = Some(channel.clone());
            channel
                .basic_qos(PREFETCH, BasicQosOptions::default())
                .await
                .map_err(|error| amqp_error("set the mover's prefetch", error))?;
            schedule::declare_due_queue(&strong.config, &channel).await?;
            let consumer = channel
                .basic_consume(
                    strong.config.due_queue().as_str().into(),
                    "switchboard-mover".into(),
                    BasicConsumeOptions::default(),
                    FieldTable::default(),
                )
                .await
                .map_err(|error| amqp_error("consume the due queue", error))?;
            Ok::<_, Error>((channel, consumer))
        };
        strong.consuming.guard(link.generation, opened).await?
    };
    // Up to the prefetch at once: a burst of messages due together is sent
    // on in parallel, not one confirm after another.
    let moved = deliveries
        .map_err(|error| amqp_error("receive from the due queue", error))
        .try_for_each_concurrent(usize::from(PREFETCH), |delivery| async move {
            // The transport is gone: stop, the broker takes the rest back.
            let strong = shared.upgrade().ok_or_else(|| Error::closed("amqp transport"))?;
            let sent = send_on(&strong, &delivery).await;
            let settled = async {
                match &sent {
                    Ok(()) => delivery.acker.ack(BasicAckOptions::default()).await,
                    Err(error) => {
                        tracing::warn!(%error, "amqp: cannot send a scheduled message on; the broker will hand it out again");
                        tokio::time::sleep(PAUSE_AFTER_FAILURE).await;
                        let requeue = BasicNackOptions {
                            requeue: true,
                            ..BasicNackOptions::default()
                        };
                        delivery.acker.nack(requeue).await
                    }
                }
                .map_err(|error| amqp_error("settle a scheduled message", error))
            };
            strong.consuming.guard(link.generation, settled).await.map(drop)
        })
        .await;
    moved?;
    drop(channel);
    Err(Error::new(
        ErrorKind::Connection,
        "amqp: the mover's consumer ended",
    ))
}

/// Sends one message from the due queue on: into the next bucket, or, when
/// due, through the topic exchange (a scheduled publish: every group) or to
/// its one queue (a nack's delay: its group). A message with no due time
/// or destination is dropped with an error: nothing can send it on.
async fn send_on(shared: &Shared, delivery: &AmqpDelivery) -> Result<(), Error> {
    let properties = &delivery.properties;
    let due_at = header_value(properties, DUE_AT).and_then(number_value);
    let topic = header_value(properties, SCHEDULED_TOPIC).and_then(string_value);
    let queue = header_value(properties, SCHEDULED_QUEUE).and_then(string_value);
    let Some(due_at) = due_at.filter(|_| topic.is_some() || queue.is_some()) else {
        tracing::error!(
            queue = %shared.config.due_queue(),
            "amqp: a message in the due queue has no due time or destination; dropped"
        );
        return Ok(());
    };
    let body = bytes::Bytes::copy_from_slice(&delivery.data);
    if let Some(level) = schedule::bucket_for(schedule::left_until(due_at)) {
        let next = properties::with_headers(properties, &[], BROKER_HEADERS);
        return schedule::into_bucket(shared, level, &body, next).await;
    }
    if let Some(queue) = queue {
        // A nack's delay: back to the one group's queue, with its counts.
        let mut removed = BROKER_HEADERS.to_vec();
        removed.extend([DUE_AT, SCHEDULED_QUEUE]);
        let home = properties::with_headers(properties, &[], &removed);
        return super::publisher::publish_direct(shared, &queue, &body, home).await;
    }
    let Some(topic) = topic else {
        return Ok(());
    };
    let mut message = properties::raw_message(delivery.data.clone(), properties);
    message
        .headers
        .retain(|name, _| !name.starts_with("x-first-death") && !name.starts_with("x-last-death"));
    match super::publisher::publish(shared, &topic, message).await {
        // Nobody is bound for the topic any more (and the transport does not
        // discard such publishes by choice): no one will ever read it, so
        // holding it would only loop.
        Err(error) if error.kind() == ErrorKind::NotFound => {
            tracing::error!(%error, topic, "amqp: a scheduled message came due for a topic no queue is bound to; dropped");
            metrics::dropped(NAME, topic.into(), "unroutable");
            Ok(())
        }
        other => other,
    }
}

fn amqp_error(what: &str, error: lapin::Error) -> Error {
    super::error::amqp_error(what, error)
}
