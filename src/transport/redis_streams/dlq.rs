//! The dead-letter stream `<stream>.dlq`: list, inspect and redrive.

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use redis::Value;
use redis::streams::{StreamId, StreamRangeReply};

use super::fields::{message_from_fields, value_text};
use super::reply::StreamEntry;
use super::{FIELD_REDRIVE_GROUP, RedisStreamsTransport};
use crate::error::{Error, ErrorKind};
use crate::transport::redis_support::redis_error;
use crate::transport::{DeadLetterQueue, DeadLettered, Redrive, header, validate_name};

// Fields of a dead-letter entry besides the message's own.
pub(super) const DLQ_TOPIC: &str = "topic";
pub(super) const DLQ_GROUP: &str = "group";
pub(super) const DLQ_REASON: &str = "reason";
pub(super) const DLQ_ATTEMPTS: &str = "attempts";
pub(super) const DLQ_LAST_ERROR: &str = "last_error";
pub(super) const DLQ_AT: &str = "dead_lettered_at";
pub(super) const DLQ_SOURCE_ID: &str = "source_id";

/// Dead-letter entries read per round trip when searching or redriving.
const DLQ_PAGE: usize = 100;
/// A dead-letter entry with its id in the dead-letter stream.
struct DlqEntry {
    stream_id: String,
    letter: DeadLettered,
}

impl RedisStreamsTransport {
    /// Dead-letter entries of `topic` after `after` (exclusive), oldest first.
    async fn dlq_page(
        &self,
        topic: &str,
        after: Option<&str>,
        count: usize,
    ) -> Result<Vec<DlqEntry>, Error> {
        self.dlq_range(topic, after, "+", count).await
    }

    /// Dead-letter entries of `topic` after `after` (exclusive) up to
    /// `until` (inclusive, or `+` for the end), oldest first.
    async fn dlq_range(
        &self,
        topic: &str,
        after: Option<&str>,
        until: &str,
        count: usize,
    ) -> Result<Vec<DlqEntry>, Error> {
        let start = after.map_or_else(|| "-".to_owned(), |id| format!("({id}"));
        let reply: StreamRangeReply = redis::cmd("XRANGE")
            .arg(self.dead_letter_key(topic))
            .arg(start)
            .arg(until)
            .arg("COUNT")
            .arg(count)
            .query_async(&mut self.conn())
            .await
            .map_err(|error| redis_error("XRANGE dead letters", error))?;
        Ok(reply
            .ids
            .into_iter()
            .map(|entry| DlqEntry {
                letter: dead_lettered_from(topic, &entry),
                stream_id: entry.id,
            })
            .collect())
    }

    /// The id of the newest dead-letter entry of `topic`, if any.
    async fn last_dead_letter_id(&self, topic: &str) -> Result<Option<String>, Error> {
        let reply: StreamRangeReply = redis::cmd("XREVRANGE")
            .arg(self.dead_letter_key(topic))
            .arg("+")
            .arg("-")
            .arg("COUNT")
            .arg(1)
            .query_async(&mut self.conn())
            .await
            .map_err(|error| redis_error("XREVRANGE dead letters", error))?;
        Ok(reply.ids.into_iter().next().map(|entry| entry.id))
    }

    async fn find_dead_letter(&self, topic: &str, id: &str) -> Result<DlqEntry, Error> {
        let mut after: Option<String> = None;
        loop {
            let page = self.dlq_page(topic, after.as_deref(), DLQ_PAGE).await?;
            let full = page.len() == DLQ_PAGE;
            after = page.last().map(|entry| entry.stream_id.clone());
            if let Some(found) = page.into_iter().find(|entry| entry.letter.id == id) {
                return Ok(found);
            }
            if !full {
                return Err(not_found(topic, id));
            }
        }
    }

    /// Re-adds dead letters to their stream, marked for the group that gave
    /// up on them, and deletes them from the dead-letter stream, atomically.
    async fn redrive_entries(&self, topic: &str, entries: &[DlqEntry]) -> Result<(), Error> {
        if entries.is_empty() {
            return Ok(());
        }
        let mut pipe = redis::pipe();
        pipe.atomic();
        for entry in entries {
            // A new id at the end of the stream: above every group's
            // last-delivered id, so a `KeepNeeded` trim keeps it until the
            // group it is marked for has acknowledged it.
            let mut xadd = self.xadd(topic, &entry.letter.message);
            xadd.arg(FIELD_REDRIVE_GROUP).arg(&entry.letter.group);
            pipe.add_command(xadd).ignore();
            pipe.cmd("XDEL")
                .arg(self.dead_letter_key(topic))
                .arg(&entry.stream_id)
                .ignore();
        }
        let _: Value = pipe
            .query_async(&mut self.conn())
            .await
            .map_err(|error| redis_error("redrive", error))?;
        Ok(())
    }
}

/// Redrive re-adds the message to the topic's stream under a new id, with a
/// [`FIELD_REDRIVE_GROUP`] field naming the group that gave up on it. That
/// group handles it again (attempts start over at 1, and it lands behind
/// what is already in the stream); the topic's other groups, which handled
/// it the first time, acknowledge it without handing it out. The trade-off:
/// Redis cannot make an acknowledged entry pending again, so re-adding is
/// the only way back, and other groups pay one read and `XACK` per redriven
/// message.
#[async_trait]
impl DeadLetterQueue for RedisStreamsTransport {
    async fn list(&self, topic: &str, limit: usize) -> Result<Vec<DeadLettered>, Error> {
        validate_name("topic", topic)?;
        if limit == 0 {
            return Ok(Vec::new());
        }
        let page = self.dlq_page(topic, None, limit).await?;
        Ok(page.into_iter().map(|entry| entry.letter).collect())
    }

    async fn inspect(&self, topic: &str, id: &str) -> Result<DeadLettered, Error> {
        validate_name("topic", topic)?;
        Ok(self.find_dead_letter(topic, id).await?.letter)
    }

    async fn redrive(&self, topic: &str, which: Redrive) -> Result<usize, Error> {
        validate_name("topic", topic)?;
        match which {
            Redrive::One(id) => {
                let entry = self.find_dead_letter(topic, &id).await?;
                self.redrive_entries(topic, std::slice::from_ref(&entry))
                    .await?;
                Ok(1)
            }
            Redrive::All => {
                // Only what is in the queue now: a redriven message that
                // fails again at once comes back under a newer id, and
                // chasing it would loop for ever.
                let Some(last) = self.last_dead_letter_id(topic).await? else {
                    return Ok(0);
                };
                // Redriven entries are deleted, so each page starts at the front.
                let mut count = 0;
                loop {
                    let page = self.dlq_range(topic, None, &last, DLQ_PAGE).await?;
                    if page.is_empty() {
                        return Ok(count);
                    }
                    self.redrive_entries(topic, &page).await?;
                    count += page.len();
                }
            }
        }
    }
}

fn not_found(topic: &str, id: &str) -> Error {
    Error::new(
        ErrorKind::NotFound,
        format!("no dead letter {id:?} on topic {topic:?}"),
    )
}

fn dead_lettered_from(topic: &str, entry: &StreamId) -> DeadLettered {
    let text = |field: &str| entry.map.get(field).and_then(value_text);
    let (message, _) = message_from_fields(StreamEntry::from(entry.clone()).fields);
    let id = message
        .headers
        .get(header::EVENT_ID)
        .cloned()
        .unwrap_or_else(|| entry.id.clone());
    DeadLettered {
        id,
        topic: text(DLQ_TOPIC).unwrap_or_else(|| topic.to_owned()),
        group: text(DLQ_GROUP).unwrap_or_default(),
        message,
        reason: text(DLQ_REASON).unwrap_or_default(),
        attempts: text(DLQ_ATTEMPTS).and_then(|n| n.parse().ok()).unwrap_or(0),
        last_error: text(DLQ_LAST_ERROR),
        dead_lettered_at: text(DLQ_AT)
            .and_then(|at| DateTime::parse_from_rfc3339(&at).ok())
            .map_or_else(Utc::now, |at| at.with_timezone(&Utc)),
    }
}
