//! Manual retry (strategy §6.3): list, inspect and redrive dead letters.
//!
//! AMQP 0-9-1 has no way to peek at a queue, so the dead-letter queue is
//! browsed: on a channel of its own, `basic.get` takes messages one by one
//! without acking them, and closing the channel at the end puts back every
//! message not redriven, in its place. The cost is plain: `list` moves up to
//! `limit` messages per group over the wire and back, `inspect` and a redrive
//! of one id move every message before the one asked for, and while a browse
//! runs those messages are invisible to other browsers. That is fine for an
//! operator's tool on a queue of failures; it is not a monitoring feed.
//!
//! A browse holds at most [`BROWSE_WINDOW`] messages unacked: `inspect` and
//! a redrive of one id look at the first 1 000 dead letters of each group,
//! and fail with [`ErrorKind::NotFound`] naming that limit when the id is
//! further back (redrive or purge the older ones to reach it). A redrive of
//! all holds one message at a time and stops at the first message it has
//! moved already (known by its event id, or else its body), so a message
//! that fails again at once and comes back to the queue's tail waits for
//! the next redrive instead of looping.
//!
//! The groups looked at are those this transport has declared or subscribed
//! for the topic, so an operator's tool declares the topology first.
//!
//! A redrive publishes the message (confirmed, mandatory) straight to the
//! queue of the group that gave up on it, through the default exchange,
//! and acks it in the dead-letter queue. It does not go through the topic
//! exchange with its original routing key, because that would deliver it
//! again to every other group bound to the topic, which handled it already;
//! the original routing key is kept in the dead letter's facts and the
//! redriven message reaches its group under that topic.

use std::collections::HashSet;

use async_trait::async_trait;
use chrono::{DateTime, TimeZone, Utc};
use lapin::message::BasicGetMessage;
use lapin::options::{BasicAckOptions, BasicGetOptions};
use lapin::{BasicProperties, Channel};
use tokio::time::Instant;

use super::connection::Link;
use super::error::amqp_error;
use super::properties::{self, ATTEMPTS};
use super::publisher::publish_direct;
use super::{AmqpTransport, DLQ_SUFFIX, Shared};
use crate::error::{Error, ErrorKind};
use crate::transport::{DeadLetterQueue, DeadLettered, Redrive, header, validate_name};

/// The most messages a browse holds unacked on its channel: what `inspect`
/// and a redrive of one id can reach in each group's dead-letter queue.
pub(super) const BROWSE_WINDOW: usize = 1_000;

/// The headers a redriven message leaves behind.
const DEAD_LETTER_FACTS: &[&str] = &[
    properties::DLQ_REASON,
    properties::DLQ_ATTEMPTS,
    properties::DLQ_TOPIC,
    properties::DLQ_GROUP,
    properties::DLQ_ERROR,
    properties::DLQ_TIME,
    ATTEMPTS,
    "x-death",
    "x-first-death-reason",
    "x-first-death-queue",
    "x-first-death-exchange",
    "x-last-death-reason",
    "x-last-death-queue",
    "x-last-death-exchange",
    "x-delivery-count",
];

#[async_trait]
impl DeadLetterQueue for AmqpTransport {
    /// Up to `limit` dead letters of each group of `topic` this transport
    /// has declared or subscribed, oldest first, `limit` in all.
    async fn list(&self, topic: &str, limit: usize) -> Result<Vec<DeadLettered>, Error> {
        validate_name("topic", topic)?;
        let mut letters = Vec::new();
        for group in self.shared.groups(topic) {
            let mut browser = Browser::open(&self.shared, topic, &group).await?;
            let mut taken = 0;
            while taken < limit {
                let Some((letter, _)) = browser.next().await? else {
                    break;
                };
                letters.push(letter);
                taken += 1;
            }
            browser.close().await;
        }
        letters.sort_by_key(|letter| letter.dead_lettered_at);
        letters.truncate(limit);
        Ok(letters)
    }

    async fn inspect(&self, topic: &str, id: &str) -> Result<DeadLettered, Error> {
        validate_name("topic", topic)?;
        // Another group may hold it within reach; the limit is reported
        // only when none does.
        let mut beyond = None;
        for group in self.shared.groups(topic) {
            let mut browser = Browser::open(&self.shared, topic, &group).await?;
            let found = loop {
                if browser.seen >= BROWSE_WINDOW {
                    beyond = Some(beyond_window(topic, id, &group));
                    break Ok(None);
                }
                match browser.next().await {
                    Ok(Some((letter, _))) if letter.id == id => break Ok(Some(letter)),
                    Ok(Some(_)) => {}
                    Ok(None) => break Ok(None),
                    Err(error) => break Err(error),
                }
            };
            browser.close().await;
            if let Some(letter) = found? {
                return Ok(letter);
            }
        }
        Err(beyond.unwrap_or_else(|| not_found(topic, id)))
    }

    async fn redrive(&self, topic: &str, which: Redrive) -> Result<usize, Error> {
        validate_name("topic", topic)?;
        let mut count = 0;
        let mut beyond = None;
        for group in self.shared.groups(topic) {
            let queue = self.shared.config.queue_name(topic, &group)?;
            let mut browser = Browser::open(&self.shared, topic, &group).await?;
            // A redrive of all stops at the first message it moved already:
            // one that failed again at once and came back to the queue's
            // tail waits for the next redrive. (The queue's message count
            // cannot bound it: a quorum queue reports it late.)
            let mut moved = HashSet::new();
            let redriven = async {
                loop {
                    if matches!(which, Redrive::One(_)) && browser.seen >= BROWSE_WINDOW {
                        if let Redrive::One(id) = &which {
                            beyond = Some(beyond_window(topic, id, &group));
                        }
                        return Ok(false);
                    }
                    let Some((letter, got)) = browser.next().await? else {
                        return Ok(false);
                    };
                    if matches!(which, Redrive::All) && !moved.insert(identity(&letter)) {
                        return Ok(false);
                    }
                    if let Redrive::One(id) = &which
                        && &letter.id != id
                    {
                        continue;
                    }
                    let properties =
                        properties::with_headers(&got.delivery.properties, &[], DEAD_LETTER_FACTS);
                    let body = bytes::Bytes::from(got.delivery.data);
                    publish_direct(&self.shared, &queue, &body, properties).await?;
                    let ack = async {
                        got.delivery
                            .acker
                            .ack(BasicAckOptions::default())
                            .await
                            .map_err(|error| amqp_error("ack a redriven dead letter", error))
                    };
                    let acked = browser.guard(ack).await?;
                    if !acked {
                        return Err(Error::new(
                            ErrorKind::Connection,
                            "amqp: redriven, but the dead letter could not be removed; \
                             it may be redriven twice",
                        ));
                    }
                    count += 1;
                    if matches!(which, Redrive::One(_)) {
                        return Ok(true);
                    }
                }
            }
            .await;
            browser.close().await;
            if redriven? {
                return Ok(count);
            }
        }
        match which {
            Redrive::One(id) => Err(beyond.unwrap_or_else(|| not_found(topic, &id))),
            Redrive::All => Ok(count),
        }
    }
}

/// What recognises a message that comes back: its event id, or else its
/// body (a browse numbers messages without an id afresh each time).
fn identity(letter: &DeadLettered) -> Result<String, u64> {
    match letter.message.headers.get(header::EVENT_ID) {
        Some(id) => Ok(id.clone()),
        None => {
            use std::hash::{BuildHasher, BuildHasherDefault, DefaultHasher};
            Err(BuildHasherDefault::<DefaultHasher>::default().hash_one(&letter.message.body))
        }
    }
}

fn beyond_window(topic: &str, id: &str, group: &str) -> Error {
    Error::new(
        ErrorKind::NotFound,
        format!(
            "no dead letter {id:?} among the first {BROWSE_WINDOW} of group {group:?} on topic \
             {topic:?}; a browse holds no more at once: redrive or purge the older ones to \
             reach it (not retryable as it is)"
        ),
    )
}

fn not_found(topic: &str, id: &str) -> Error {
    Error::new(
        ErrorKind::NotFound,
        format!("no dead letter {id:?} on topic {topic:?}"),
    )
}

/// Reads one group's dead-letter queue without removing anything.
struct Browser<'a> {
    shared: &'a Shared,
    link: Link,
    channel: Channel,
    dlq: String,
    topic: String,
    group: String,
    seen: usize,
}

impl<'a> Browser<'a> {
    /// On the consuming connection: browsing only reads and acks, so it
    /// works while the broker blocks the publishing one.
    async fn open(shared: &'a Shared, topic: &str, group: &str) -> Result<Self, Error> {
        let dlq = format!("{}{DLQ_SUFFIX}", shared.config.queue_name(topic, group)?);
        let deadline = Instant::now() + shared.config.publish_timeout;
        let link = shared.consuming.wait_link(deadline).await?;
        let channel = link
            .connection
            .create_channel()
            .await
            .map_err(|error| amqp_error("open a channel", error))
            .inspect_err(|error| shared.consuming.failed(&link, error))?;
        Ok(Self {
            shared,
            link,
            channel,
            dlq,
            topic: topic.to_owned(),
            group: group.to_owned(),
            seen: 0,
        })
    }

    /// Runs `operation` unless the browser's connection goes first.
    async fn guard<T>(
        &self,
        operation: impl Future<Output = Result<T, Error>>,
    ) -> Result<T, Error> {
        self.shared
            .consuming
            .guard(self.link.generation, operation)
            .await
    }

    async fn next(&mut self) -> Result<Option<(DeadLettered, BasicGetMessage)>, Error> {
        let get = async {
            self.channel
                .basic_get(self.dlq.as_str().into(), BasicGetOptions { no_ack: false })
                .await
                .map_err(|error| amqp_error("read the dead-letter queue", error))
        };
        let got = self
            .shared
            .consuming
            .guard(self.link.generation, get)
            .await
            .inspect_err(|error| self.shared.consuming.failed(&self.link, error));
        let got = match got {
            Ok(got) => got,
            // A group that never dead-lettered anything may have no queue yet.
            Err(error) if error.kind() == ErrorKind::NotFound => return Ok(None),
            Err(error) => return Err(error),
        };
        let Some(got) = got else {
            return Ok(None);
        };
        self.seen += 1;
        let letter = self.letter(&got.delivery.properties, &got.delivery.data);
        Ok(Some((letter, got)))
    }

    fn letter(&self, properties: &BasicProperties, body: &[u8]) -> DeadLettered {
        let text = |name: &str| {
            properties::header_value(properties, name).and_then(properties::string_value)
        };
        let message = properties::raw_message(body.to_vec(), properties);
        let id = message
            .headers
            .get(header::EVENT_ID)
            .cloned()
            .unwrap_or_else(|| format!("{}#{}", self.dlq, self.seen));
        let dead_lettered_at = text(properties::DLQ_TIME)
            .and_then(|time| DateTime::parse_from_rfc3339(&time).ok())
            .map(|time| time.with_timezone(&Utc))
            .or_else(|| {
                let seconds = (*properties.timestamp())?;
                Utc.timestamp_opt(i64::try_from(seconds).ok()?, 0).single()
            })
            .unwrap_or_else(Utc::now);
        DeadLettered {
            id,
            topic: text(properties::DLQ_TOPIC).unwrap_or_else(|| self.topic.clone()),
            group: self.group.clone(),
            message,
            // A message the broker dead-lettered by itself carries its reason
            // in `x-first-death-reason` (`rejected`, `delivery_limit`, ...).
            reason: text(properties::DLQ_REASON)
                .or_else(|| text("x-first-death-reason").map(|reason| format!("broker: {reason}")))
                .unwrap_or_else(|| "unknown".to_owned()),
            attempts: text(properties::DLQ_ATTEMPTS)
                .and_then(|attempts| attempts.parse().ok())
                .unwrap_or(1),
            last_error: text(properties::DLQ_ERROR),
            dead_lettered_at,
        }
    }

    /// Closes the channel, which puts back every message not acked.
    async fn close(self) {
        let close = async {
            self.channel
                .close(200, "browsed".into())
                .await
                .map_err(|error| amqp_error("close", error))
        };
        let _ = self
            .shared
            .consuming
            .guard(self.link.generation, close)
            .await;
    }
}
