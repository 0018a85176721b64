//! Publishing: payloads into envelopes, onto their topic, retried within the
//! publish deadline.

use std::borrow::Cow;

use tracing::Instrument;
use uuid::Uuid;

use super::EventBus;
use crate::envelope::{Event, EventEnvelope};
use crate::error::Error;
use crate::transport::{RawMessage, header};

impl EventBus {
    /// Publishes `payload` to the topic of [`E::TYPE`](Event::TYPE) in a fresh
    /// envelope; returns its `event_id` once the transport accepted it.
    /// Retryable failures are tried again until the
    /// [publish deadline](Self::with_publish_deadline).
    pub async fn publish<E: Event>(&self, payload: E) -> Result<Uuid, Error> {
        let envelope = EventEnvelope::new(&*self.source, payload);
        self.publish_envelope(&envelope).await?;
        Ok(envelope.event_id())
    }

    /// Publishes `payload` to `topic` (under the bus's namespace) instead of
    /// the topic of [`E::TYPE`](Event::TYPE): to route one event type to
    /// several streams or queues (per tenant, per region, a priority lane).
    /// Consumers read it with [`subscribe_to`](Self::subscribe_to) and the
    /// same topic; the envelope's `event_type` stays `E::TYPE`.
    ///
    /// ```
    /// use std::sync::Arc;
    /// use serde::{Deserialize, Serialize};
    /// use switchboard::{handler_fn, Event, EventBus, MemoryTransport, Message, SubscribeOptions};
    ///
    /// #[derive(Debug, Clone, Serialize, Deserialize)]
    /// struct OrderPlaced { order_id: String }
    /// impl Event for OrderPlaced {
    ///     const TYPE: &'static str = "order.placed";
    ///     const VERSION: &'static str = "1.0";
    /// }
    ///
    /// # tokio::runtime::Runtime::new().unwrap().block_on(async {
    /// let bus = EventBus::new(Arc::new(MemoryTransport::new()), "orders").with_namespace("prod");
    /// let (seen, mut rx) = tokio::sync::mpsc::unbounded_channel();
    /// let consumer = bus
    ///     .subscribe_to("order.placed.priority", SubscribeOptions::new("shipping"),
    ///         handler_fn(move |message: Message<OrderPlaced>| {
    ///             seen.send((message.topic().to_owned(), message.payload().order_id.clone())).ok();
    ///             async { Ok(()) }
    ///         }))
    ///     .await?;
    /// bus.publish_to("order.placed.priority", OrderPlaced { order_id: "A-17".into() }).await?;
    /// let (topic, order) = rx.recv().await.unwrap();
    /// assert_eq!((topic.as_str(), order.as_str()), ("prod.order.placed.priority", "A-17"));
    /// consumer.shutdown().await?;
    /// # Ok::<(), switchboard::Error>(())
    /// # }).unwrap();
    /// ```
    pub async fn publish_to<E: Event>(&self, topic: &str, payload: E) -> Result<Uuid, Error> {
        let envelope = EventEnvelope::new(&*self.source, payload);
        let topic = self.topic_named(topic).into_owned();
        self.publish_envelope_on(topic.into(), &envelope, None)
            .await?;
        Ok(envelope.event_id())
    }

    /// [`publish_envelope`](Self::publish_envelope) to `topic` (under the
    /// bus's namespace): see [`publish_to`](Self::publish_to).
    pub async fn publish_envelope_to<E: Event>(
        &self,
        topic: &str,
        envelope: &EventEnvelope<E>,
    ) -> Result<(), Error> {
        let topic = self.topic_named(topic).into_owned();
        self.publish_envelope_on(topic.into(), envelope, None).await
    }

    /// Publishes an envelope built by the caller (to carry headers or keep
    /// an id).
    pub async fn publish_envelope<E: Event>(
        &self,
        envelope: &EventEnvelope<E>,
    ) -> Result<(), Error> {
        self.publish_envelope_on(self.topic_of::<E>(), envelope, None)
            .await
    }

    /// Publishes `envelope` on `topic` now, or for delivery at `at`
    /// ([`publish_at`](Self::publish_at)): one span, the retries until the
    /// deadline, and the `published` metric, for both.
    pub(super) async fn publish_envelope_on<E: Event>(
        &self,
        topic: Cow<'static, str>,
        envelope: &EventEnvelope<E>,
        at: Option<chrono::DateTime<chrono::Utc>>,
    ) -> Result<(), Error> {
        let span = match at {
            None => tracing::info_span!(
                "publish",
                event_id = %envelope.event_id(),
                event_type = E::TYPE,
                topic = &*topic,
                transport = self.transport.name(),
            ),
            Some(at) => tracing::info_span!(
                "publish_at",
                event_id = %envelope.event_id(),
                event_type = E::TYPE,
                topic = &*topic,
                at = %at,
                transport = self.transport.name(),
            ),
        };
        let started = std::time::Instant::now();
        let result = async {
            // The first attempt takes the message itself; a retry (rare)
            // encodes it again, rather than every publish copying it (its
            // headers are a map of owned strings) for a retry that seldom
            // comes.
            let mut first = Some(self.traced_message(envelope)?);
            let (transport, topic) = (&self.transport, &topic);
            self.retry
                .run(topic, || {
                    let message = first
                        .take()
                        .map_or_else(|| self.traced_message(envelope), Ok);
                    async move {
                        match at {
                            None => transport.publish(topic, message?).await,
                            Some(at) => transport.publish_at(topic, message?, at).await,
                        }
                    }
                })
                .await
        }
        .instrument(span)
        .await;
        self.publish_metrics.record(
            self.transport.name(),
            topic,
            result.is_ok(),
            started.elapsed(),
        );
        result
    }

    /// Publishes several payloads in as few round trips as the transport
    /// allows; returns their ids in order. Retried as a whole within the
    /// [publish deadline](Self::with_publish_deadline): after a failure that
    /// may have taken effect, some of them may reach the broker twice.
    pub async fn publish_batch<E: Event>(
        &self,
        payloads: impl IntoIterator<Item = E>,
    ) -> Result<Vec<Uuid>, Error> {
        let topic = self.topic_of::<E>();
        let span = tracing::info_span!(
            "publish_batch",
            event_type = E::TYPE,
            topic = &*topic,
            count = tracing::field::Empty,
            transport = self.transport.name(),
        );
        let envelopes: Vec<EventEnvelope<E>> = payloads
            .into_iter()
            .map(|payload| EventEnvelope::new(&*self.source, payload))
            .collect();
        let encode = || -> Result<Vec<RawMessage>, Error> {
            span.in_scope(|| {
                envelopes
                    .iter()
                    .map(|envelope| self.traced_message(envelope))
                    .collect()
            })
        };
        // As for one message: the first attempt takes the messages
        // themselves, a retry (rare) encodes them again, rather than every
        // batch copying each message's headers for a retry seldom needed.
        let mut first = Some(encode()?);
        span.record("count", envelopes.len());
        let started = std::time::Instant::now();
        let (transport, topic_name) = (&self.transport, &*topic);
        let result = self
            .retry
            .run(&topic, || {
                let messages = first.take().map_or_else(encode, Ok);
                async move { transport.publish_batch(topic_name, messages?).await }
            })
            .instrument(span.clone())
            .await;
        self.publish_metrics.record(
            self.transport.name(),
            topic,
            result.is_ok(),
            started.elapsed(),
        );
        result.map(|()| envelopes.iter().map(EventEnvelope::event_id).collect())
    }

    fn raw_message<T: serde::Serialize>(
        &self,
        envelope: &EventEnvelope<T>,
        event_type: &'static str,
    ) -> Result<RawMessage, Error> {
        Ok(RawMessage::new(self.codec.encode(envelope)?)
            // Encoded straight into a buffer: `to_string` would go through
            // the formatting machinery for the same 36 characters.
            .with_header(
                header::EVENT_ID,
                &*envelope
                    .event_id()
                    .hyphenated()
                    .encode_lower(&mut Uuid::encode_buffer()),
            )
            .with_header(header::EVENT_TYPE, event_type))
    }

    /// Encodes `envelope`, with the current span's trace context added to
    /// its headers when feature `otel` is on (see [`crate::observe::trace`]).
    pub(super) fn traced_message<E: Event>(
        &self,
        envelope: &EventEnvelope<E>,
    ) -> Result<RawMessage, Error> {
        #[cfg(feature = "otel")]
        if let Some(headers) = crate::observe::trace::with_current(envelope.headers()) {
            // A view that borrows the payload: the caller keeps its envelope.
            let traced = EventEnvelope::from_parts(
                envelope.event_id(),
                std::borrow::Cow::Borrowed(E::TYPE),
                envelope.timestamp(),
                envelope.source().to_owned(),
                std::borrow::Cow::Owned(envelope.version().to_owned()),
                envelope.payload(),
                headers,
            );
            return self.raw_message(&traced, E::TYPE);
        }
        self.raw_message(envelope, E::TYPE)
    }
}
