//! The typed view of one event type's dead letters, in the bus's namespace.

use std::fmt;
use std::marker::PhantomData;

use chrono::{DateTime, Utc};

use super::EventBus;
use crate::codec::Codec;
use crate::envelope::{Event, EventEnvelope};
use crate::error::Error;
use crate::transport::{DeadLetterQueue, DeadLettered, Redrive};

/// The dead letters of `E`'s topic in the bus's namespace: list, inspect,
/// read and redrive them; see [`EventBus::dead_letters`].
///
/// The groups looked at are those of the topic the transport knows. Redis
/// Streams and the in-memory transport keep one dead-letter queue per topic
/// and know every group. RabbitMQ keeps one per group (`<queue>.dlq`) and
/// AMQP 0-9-1 cannot list queues, so it looks at the groups this process
/// has declared or subscribed: an operator's tool calls
/// [`EventBus::declare`] with the service's [`Topology`](crate::Topology)
/// (the same one, so the queues' arguments match) before it looks.
pub struct DeadLetters<'a, E> {
    bus: &'a EventBus,
    queue: &'a dyn DeadLetterQueue,
    topic: String,
    _event: PhantomData<fn() -> E>,
}

impl<'a, E: Event> DeadLetters<'a, E> {
    /// How many dead letters [`redrive_where`](Self::redrive_where) looks
    /// at: as many as a RabbitMQ browse reaches in one group.
    pub const SCAN_LIMIT: usize = 1_000;

    pub(super) fn new(bus: &'a EventBus) -> Result<Self, Error> {
        Ok(Self {
            queue: bus.transport.dead_letters()?,
            topic: bus.topic_of::<E>().into_owned(),
            bus,
            _event: PhantomData,
        })
    }

    /// The topic looked at: [`E::TYPE`](Event::TYPE) under the bus's
    /// namespace.
    pub fn topic(&self) -> &str {
        &self.topic
    }

    /// Up to `limit` dead letters, oldest first.
    ///
    /// A list shorter than `limit` is the whole queue: its length is
    /// recorded as the gauge `switchboard_dead_letter_depth`.
    pub async fn list(&self, limit: usize) -> Result<Vec<DeadLetterOf<E>>, Error> {
        let letters = self.queue.list(&self.topic, limit).await?;
        if letters.len() < limit {
            crate::observe::metrics::dead_letter_depth(
                self.bus.transport.name(),
                &self.topic,
                letters.len(),
            );
        }
        Ok(letters.into_iter().map(|raw| self.typed(raw)).collect())
    }

    /// The dead letter with this id (the event id, as a [`uuid::Uuid`] or
    /// text); [`ErrorKind::NotFound`](crate::ErrorKind::NotFound) when
    /// absent.
    pub async fn inspect(&self, id: impl fmt::Display) -> Result<DeadLetterOf<E>, Error> {
        let raw = self.queue.inspect(&self.topic, &id.to_string()).await?;
        Ok(self.typed(raw))
    }

    /// Sends dead letters back to the group that gave up on them; returns
    /// how many. [`Redrive::One`] takes the event id and fails with
    /// [`ErrorKind::NotFound`](crate::ErrorKind::NotFound) when absent;
    /// [`Redrive::All`] moves at most what the queue held when it started.
    pub async fn redrive(&self, which: Redrive) -> Result<usize, Error> {
        let sent = self.queue.redrive(&self.topic, which.clone()).await?;
        if which == Redrive::All {
            crate::observe::metrics::dead_letter_depth(self.bus.transport.name(), &self.topic, 0);
        }
        tracing::info!(topic = &*self.topic, ?which, sent, "dead letters redriven");
        Ok(sent)
    }

    /// Sends back every dead letter whose header `name` is `value` — a
    /// business key such as an order id — and returns how many. The header
    /// is looked for among the envelope's headers
    /// ([`EventEnvelope::with_header`]) and then the transport's.
    ///
    /// It looks at the first [`SCAN_LIMIT`](Self::SCAN_LIMIT) letters and
    /// redrives each match by its id; a match that another redrive took
    /// meanwhile is skipped.
    pub async fn redrive_where(&self, name: &str, value: &str) -> Result<usize, Error> {
        let letters = self.queue.list(&self.topic, Self::SCAN_LIMIT).await?;
        let mut sent = 0;
        for letter in letters {
            let typed = self.typed(letter);
            if typed.header(name).as_deref() != Some(value) {
                continue;
            }
            match self
                .queue
                .redrive(&self.topic, Redrive::One(typed.id().to_owned()))
                .await
            {
                Ok(count) => sent += count,
                Err(error) if error.kind() == crate::ErrorKind::NotFound => {}
                Err(error) => return Err(error),
            }
        }
        tracing::info!(
            topic = &*self.topic,
            name,
            value,
            sent,
            "dead letters redriven"
        );
        Ok(sent)
    }

    fn typed(&self, raw: DeadLettered) -> DeadLetterOf<E> {
        DeadLetterOf {
            raw,
            codec: self.bus.codec().clone(),
            _event: PhantomData,
        }
    }
}

impl<E> fmt::Debug for DeadLetters<'_, E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DeadLetters")
            .field("transport", &self.bus.transport.name())
            .field("topic", &self.topic)
            .finish()
    }
}

/// One dead letter of `E`: its facts, and its payload decoded on demand
/// (a letter may be there because it does not decode).
pub struct DeadLetterOf<E> {
    raw: DeadLettered,
    codec: Codec,
    _event: PhantomData<fn() -> E>,
}

impl<E: Event> DeadLetterOf<E> {
    /// The envelope, decoded with the bus's codec.
    pub fn envelope(&self) -> Result<EventEnvelope<E>, Error> {
        Ok(self.codec.decode::<E>(&self.raw.message.body)?)
    }

    /// The payload, decoded with the bus's codec.
    pub fn payload(&self) -> Result<E, Error> {
        Ok(self.envelope()?.into_payload())
    }

    /// The id to inspect or redrive it by: its event id when the message
    /// carried one, otherwise the transport's own id.
    pub fn id(&self) -> &str {
        &self.raw.id
    }

    /// Header `name`: the envelope's, or else the transport message's.
    pub fn header(&self, name: &str) -> Option<String> {
        // Only the headers are read: a payload that no longer decodes as
        // `E` still has its business key.
        self.codec
            .decode_value(&self.raw.message.body)
            .ok()
            .and_then(|envelope| envelope.headers().get(name).cloned())
            .or_else(|| self.raw.message.headers.get(name).cloned())
    }

    /// The topic it was published to.
    pub fn topic(&self) -> &str {
        &self.raw.topic
    }

    /// The consumer group that gave up on it.
    pub fn group(&self) -> &str {
        &self.raw.group
    }

    /// Why it was dead-lettered.
    pub fn reason(&self) -> &str {
        &self.raw.reason
    }

    /// How many times it was tried.
    pub fn attempts(&self) -> u32 {
        self.raw.attempts
    }

    /// The last error, when there was one.
    pub fn last_error(&self) -> Option<&str> {
        self.raw.last_error.as_deref()
    }

    /// When it was dead-lettered.
    pub fn dead_lettered_at(&self) -> DateTime<Utc> {
        self.raw.dead_lettered_at
    }

    /// The untyped letter, as the transport keeps it.
    pub fn raw(&self) -> &DeadLettered {
        &self.raw
    }

    /// The untyped letter, unwrapped.
    pub fn into_raw(self) -> DeadLettered {
        self.raw
    }
}

impl<E> fmt::Debug for DeadLetterOf<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DeadLetterOf")
            .field("letter", &self.raw)
            .finish()
    }
}

impl<E> Clone for DeadLetterOf<E> {
    fn clone(&self) -> Self {
        Self {
            raw: self.raw.clone(),
            codec: self.codec.clone(),
            _event: PhantomData,
        }
    }
}

impl DeadLettered {
    /// The payload as `E`, decoded with `codec` (the bus's
    /// [`codec`](EventBus::codec)).
    pub fn payload<E: Event>(&self, codec: &Codec) -> Result<E, Error> {
        Ok(codec.decode::<E>(&self.message.body)?.into_payload())
    }
}
