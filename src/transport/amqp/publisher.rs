//! Confirmed, mandatory, persistent publishing.
//!
//! Each publish takes a channel of its own from the link's pool for as long
//! as it waits for its confirm. lapin hands a `basic.return` to whichever
//! confirm of the channel completes next, so on a shared channel an
//! unroutable message could be blamed on another caller's message and its own
//! publish report success; with one caller per channel the return always
//! lands on the right publish. The window semaphore bounds how many
//! publishes (so channels and outstanding confirms) are in flight at once.
//!
//! Every publish has one deadline, [`publish_timeout`](super::AmqpConfig::publish_timeout),
//! over everything it waits for: a place in the window, a connection, the
//! broker unblocking the connection, the confirms. While the broker blocks
//! the connection no new message is sent (it would only sit in lapin's
//! buffer); one already sent when the block began fails at the deadline
//! with [`Effect::Unknown`], since the broker may still take it.
//!
//! A batch keeps up to `publish_window` confirms outstanding on its one
//! channel and checks them in order, so it knows exactly which prefix the
//! broker has confirmed; after a lost connection it goes on from there on the
//! next connection.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use bytes::Bytes;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::{BasicProperties, Channel, Confirmation, PublisherConfirm};
use tokio::time::Instant;

use super::config::Unroutable;
use super::connection::Link;
use super::error::{amqp_error, blocked_timeout, not_connected};
use super::properties::publish_properties;
use super::{NAME, Shared};
use crate::error::{Effect, Error, ErrorKind};
use crate::observe::metrics;
use crate::transport::{RawMessage, validate_name};

/// How often one publish is tried on connections that fail under it.
const TRIES: u32 = 10;

pub(crate) async fn publish(
    shared: &Shared,
    topic: &str,
    message: RawMessage,
) -> Result<(), Error> {
    validate_name("topic", topic)?;
    let properties = [publish_properties(&message, &shared.config.content_type)];
    let message = [message];
    let done = AtomicUsize::new(0);
    with_retries(shared, |link| {
        publish_on(
            shared,
            link,
            &shared.config.exchange,
            topic,
            &message,
            &properties,
            &done,
        )
    })
    .await
}

pub(crate) async fn publish_batch(
    shared: &Shared,
    topic: &str,
    messages: Vec<RawMessage>,
) -> Result<(), Error> {
    validate_name("topic", topic)?;
    if messages.is_empty() {
        return Ok(());
    }
    let properties: Vec<BasicProperties> = messages
        .iter()
        .map(|message| publish_properties(message, &shared.config.content_type))
        .collect();
    let done = AtomicUsize::new(0);
    with_retries(shared, |link| {
        publish_on(
            shared,
            link,
            &shared.config.exchange,
            topic,
            &messages,
            &properties,
            &done,
        )
    })
    .await
}

/// Publishes one message straight to `queue` through the default exchange
/// (a nacked message going to the back of its queue, a dead letter going to
/// `<queue>.dlq`, a redrive going home), confirmed and mandatory like any
/// other publish.
pub(crate) async fn publish_direct(
    shared: &Shared,
    queue: &str,
    body: &Bytes,
    properties: BasicProperties,
) -> Result<(), Error> {
    let message = [RawMessage::new(body.clone())];
    let properties = [properties];
    let done = AtomicUsize::new(0);
    with_retries(shared, |link| {
        publish_on(shared, link, "", queue, &message, &properties, &done)
    })
    .await
}

/// Runs `attempt` on the current connection; when the connection fails under
/// it, waits for the next one and runs it again — all of it, the wait for a
/// place in the window included, within the publish timeout.
async fn with_retries<F, Fut>(shared: &Shared, attempt: F) -> Result<(), Error>
where
    F: Fn(Link) -> Fut,
    Fut: Future<Output = Result<(), Error>>,
{
    let deadline = Instant::now() + shared.config.publish_timeout;
    let sent = AtomicBool::new(false);
    let tries = tries(shared, deadline, &sent, attempt);
    match tokio::time::timeout_at(deadline, tries).await {
        Ok(Ok(())) => Ok(()),
        // Once a try has begun, a lost connection may have lost only the
        // confirm: the broker may have the message.
        Ok(Err(error))
            if sent.load(Ordering::Relaxed)
                && matches!(error.kind(), ErrorKind::Connection | ErrorKind::Timeout) =>
        {
            Err(error.with_effect(Effect::Unknown))
        }
        Ok(Err(error)) => Err(error),
        Err(_) => Err(deadline_passed(shared, sent.load(Ordering::Relaxed))),
    }
}

/// The error of a publish whose deadline passed: a timeout, which says why
/// when the broker blocks the connection, and whether the message may
/// still arrive.
fn deadline_passed(shared: &Shared, sent: bool) -> Error {
    let blocked = shared.supervisor.blocked();
    let error = match (blocked, sent) {
        (Some(reason), false) => blocked_timeout(Some(reason)),
        (None, false) if !shared.supervisor.is_linked() => not_connected(),
        (None, false) => Error::new(
            ErrorKind::Timeout,
            "amqp: no place in the publish window within the publish timeout",
        )
        .with_effect(Effect::NotApplied),
        (Some(reason), true) => Error::new(
            ErrorKind::Timeout,
            format!(
                "amqp: the broker blocked publishing ({reason}) before it confirmed the \
                 message; it may still take it once unblocked"
            ),
        ),
        (None, true) if !shared.supervisor.is_linked() => Error::new(
            ErrorKind::Connection,
            "amqp: the connection was lost and no new one came within the publish timeout; \
             the broker may have taken the message",
        ),
        (None, true) => Error::new(
            ErrorKind::Timeout,
            "amqp: no confirm from the broker within the publish timeout",
        ),
    };
    if sent {
        error.with_effect(Effect::Unknown)
    } else {
        error
    }
}

async fn tries<F, Fut>(
    shared: &Shared,
    deadline: Instant,
    sent: &AtomicBool,
    attempt: F,
) -> Result<(), Error>
where
    F: Fn(Link) -> Fut,
    Fut: Future<Output = Result<(), Error>>,
{
    let _permit = shared
        .window
        .acquire()
        .await
        .map_err(|_| Error::closed("amqp transport"))?;
    let mut after = 0;
    let mut tries = 0;
    loop {
        tries += 1;
        let link = shared.supervisor.wait_link_after(deadline, after).await?;
        // Sent into a blocked connection, a message only waits in lapin's
        // buffer, past its deadline: wait here, where it is not sent yet.
        shared.supervisor.wait_unblocked(deadline).await?;
        sent.store(true, Ordering::Relaxed);
        let Err(error) = attempt(link.clone()).await else {
            return Ok(());
        };
        shared.supervisor.failed(&link, &error);
        if error.kind() != ErrorKind::Connection || tries >= TRIES || Instant::now() >= deadline {
            return Err(error);
        }
        tracing::debug!(%error, "amqp: publish failed with its connection; trying again");
        // A connection that is gone is replaced by a newer generation; a
        // failure that left the connection up is tried again on it.
        after = if link.connection.status().connected() {
            link.generation - 1
        } else {
            link.generation
        };
    }
}

/// Publishes `messages[done..]` on a channel of its own with up to
/// `publish_window` confirms outstanding, checking them in order and
/// advancing `done` past each confirmed message.
async fn publish_on(
    shared: &Shared,
    link: Link,
    exchange: &str,
    topic: &str,
    messages: &[RawMessage],
    properties: &[BasicProperties],
    done: &AtomicUsize,
) -> Result<(), Error> {
    let generation = link.generation;
    shared
        .supervisor
        .guard(
            generation,
            publish_on_link(shared, link, exchange, topic, messages, properties, done),
        )
        .await
}

#[allow(clippy::too_many_arguments)]
async fn publish_on_link(
    shared: &Shared,
    link: Link,
    exchange: &str,
    topic: &str,
    messages: &[RawMessage],
    properties: &[BasicProperties],
    done: &AtomicUsize,
) -> Result<(), Error> {
    let channel = take_channel(&link).await?;
    let window = shared.config.publish_window;
    let mut pending: VecDeque<PublisherConfirm> =
        VecDeque::with_capacity(window.min(messages.len()));
    let start = done.load(Ordering::Relaxed);
    // Only a topic's publish may go unrouted by choice: a dead letter or a
    // redrive goes straight to a queue that must exist.
    let discard = !exchange.is_empty() && shared.config.unroutable == Unroutable::Discard;
    let check = |confirmation| check(confirmation, topic, discard);
    let sent = async {
        for (message, properties) in messages[start..].iter().zip(&properties[start..]) {
            if pending.len() >= window {
                let confirm = pending.pop_front().expect("window is full");
                check(confirm.await)?;
                done.fetch_add(1, Ordering::Relaxed);
            }
            let confirm = channel
                .basic_publish(
                    exchange.into(),
                    topic.into(),
                    BasicPublishOptions {
                        mandatory: true,
                        immediate: false,
                    },
                    &message.body,
                    properties.clone(),
                )
                .await
                .map_err(|error| amqp_error("publish", error))?;
            pending.push_back(confirm);
        }
        while let Some(confirm) = pending.pop_front() {
            check(confirm.await)?;
            done.fetch_add(1, Ordering::Relaxed);
        }
        Ok(())
    }
    .await;
    if sent.is_ok() {
        give_back(&link, channel);
    }
    sent
}

fn check(
    confirmation: lapin::Result<Confirmation>,
    topic: &str,
    discard_unroutable: bool,
) -> Result<(), Error> {
    match confirmation.map_err(|error| amqp_error("publisher confirm", error))? {
        Confirmation::Ack(None) => Ok(()),
        Confirmation::Ack(Some(returned)) if discard_unroutable => {
            tracing::debug!(
                topic,
                reply = %returned.reply_text,
                "amqp: no queue is bound for the topic; message discarded as configured"
            );
            metrics::dropped(NAME, topic.into(), "unroutable");
            Ok(())
        }
        Confirmation::Ack(Some(returned)) => Err(Error::new(
            ErrorKind::NotFound,
            format!(
                "amqp: message to topic {topic:?} returned as unroutable ({} {}): \
                 no queue is bound for it; declare the topology first",
                returned.reply_code, returned.reply_text
            ),
        )),
        Confirmation::Nack(_) => Err(Error::new(
            ErrorKind::Unavailable,
            format!("amqp: the broker refused (nacked) a message to topic {topic:?}"),
        )),
        Confirmation::NotRequested => Err(Error::new(
            ErrorKind::Unavailable,
            "amqp: publisher confirms are off on this channel",
        )),
    }
}

async fn take_channel(link: &Link) -> Result<Channel, Error> {
    loop {
        let idle = super::lock(&link.pool).pop();
        match idle {
            Some(channel) if channel.status().connected() => return Ok(channel),
            Some(_closed) => continue,
            None => break,
        }
    }
    let channel = link
        .connection
        .create_channel()
        .await
        .map_err(|error| amqp_error("open a channel", error))?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .map_err(|error| amqp_error("enable publisher confirms", error))?;
    Ok(channel)
}

fn give_back(link: &Link, channel: Channel) {
    if channel.status().connected() {
        super::lock(&link.pool).push(channel);
    }
}
