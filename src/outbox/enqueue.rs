//! Writing events into the caller's transaction.

use serde::Serialize;
use uuid::Uuid;

use super::backend::NewRow;
use super::schema::key_hash;
use super::{Outbox, OutboxDatabase};
use crate::envelope::{Event, EventEnvelope};
use crate::error::{Error, ErrorKind};
use crate::transport::header;

impl<DB: OutboxDatabase> Outbox<DB> {
    /// Writes `envelope` for `topic` (under the outbox's namespace) into
    /// `tx`, ordered under the key `topic`; returns the row's id.
    ///
    /// Nothing is sent now: the row becomes visible to the relay when `tx`
    /// commits, and disappears with it when `tx` rolls back. With feature
    /// `otel`, the current span's trace context is added to the envelope
    /// headers (unless they carry one), so the consumer continues this
    /// request's trace.
    ///
    /// On PostgreSQL this takes the key's write lock until `tx` ends (see
    /// [ordering](super#ordering)): enqueue late in the transaction.
    pub async fn enqueue<T: Serialize + Sync>(
        &self,
        tx: &mut sqlx::Transaction<'_, DB>,
        topic: &str,
        envelope: &EventEnvelope<T>,
    ) -> Result<i64, Error> {
        self.enqueue_keyed(tx, topic, topic, envelope).await
    }

    /// [`enqueue`](Self::enqueue) under the ordering key `key` (an order id,
    /// an account): rows of one key are sent in commit order, rows of
    /// different keys in any order and in parallel.
    pub async fn enqueue_keyed<T: Serialize + Sync>(
        &self,
        tx: &mut sqlx::Transaction<'_, DB>,
        topic: &str,
        key: &str,
        envelope: &EventEnvelope<T>,
    ) -> Result<i64, Error> {
        crate::transport::validate_name("topic", topic)?;
        if key.is_empty() {
            return Err(Error::new(
                ErrorKind::Rejected,
                "outbox: the ordering key is empty",
            ));
        }
        let topic = self.topic_named(topic);
        let body = self.encode(envelope)?;
        let headers: crate::envelope::Headers = [
            (header::EVENT_ID.to_owned(), envelope.event_id().to_string()),
            (
                header::EVENT_TYPE.to_owned(),
                envelope.event_type().to_owned(),
            ),
        ]
        .into();
        let headers = serde_json::to_string(&headers)
            .map_err(|error| Error::new(ErrorKind::Encode, "outbox headers").with_source(error))?;
        let row = NewRow {
            topic: &topic,
            key,
            key_hash: key_hash(key),
            event_id: envelope.event_id().to_string(),
            headers,
            body: &body,
        };
        DB::insert(&mut **tx, &self.shared.tables, row, self.shared.notify).await
    }

    /// Takes `key`'s write lock now, until `tx` ends — the lock
    /// [`enqueue_keyed`](Self::enqueue_keyed) takes anyway — so the
    /// transaction can read per-key state (a sequence number, an aggregate's
    /// version) in the order its events will be sent: two transactions of
    /// one key pass this point one after the other, in commit order.
    ///
    /// On SQLite it takes the database's write lock (every key); call it
    /// first in the transaction, before any read.
    pub async fn lock_key(
        &self,
        tx: &mut sqlx::Transaction<'_, DB>,
        key: &str,
    ) -> Result<(), Error> {
        DB::lock_key(&mut **tx, &self.shared.tables, key_hash(key)).await
    }

    /// Writes `payload` in a fresh envelope (the outbox's source, a new
    /// `event_id`) for the topic of [`E::TYPE`](Event::TYPE) into `tx`;
    /// returns the `event_id`. The typed counterpart of
    /// [`EventBus::publish`](crate::EventBus::publish).
    pub async fn enqueue_event<E: Event>(
        &self,
        tx: &mut sqlx::Transaction<'_, DB>,
        payload: E,
    ) -> Result<Uuid, Error> {
        let envelope = EventEnvelope::new(&*self.shared.source, payload);
        self.enqueue(tx, E::TYPE, &envelope).await?;
        Ok(envelope.event_id())
    }

    /// [`enqueue_event`](Self::enqueue_event) under the ordering key `key`.
    pub async fn enqueue_event_keyed<E: Event>(
        &self,
        tx: &mut sqlx::Transaction<'_, DB>,
        key: &str,
        payload: E,
    ) -> Result<Uuid, Error> {
        let envelope = EventEnvelope::new(&*self.shared.source, payload);
        self.enqueue_keyed(tx, E::TYPE, key, &envelope).await?;
        Ok(envelope.event_id())
    }

    /// The envelope's bytes as the relay will publish them, with the
    /// current trace context added when feature `otel` is on.
    fn encode<T: Serialize>(&self, envelope: &EventEnvelope<T>) -> Result<bytes::Bytes, Error> {
        #[cfg(feature = "otel")]
        if let Some(headers) = crate::observe::trace::with_current(envelope.headers()) {
            let traced = EventEnvelope::from_parts(
                envelope.event_id(),
                std::borrow::Cow::Owned(envelope.event_type().to_owned()),
                envelope.timestamp(),
                envelope.source().to_owned(),
                std::borrow::Cow::Owned(envelope.version().to_owned()),
                envelope.payload(),
                headers,
            );
            return self.shared.codec.encode(&traced);
        }
        self.shared.codec.encode(envelope)
    }
}
