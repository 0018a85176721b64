//! Scheduled publishing: an event delivered at a time, or after a delay.

use std::time::Duration;

use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::EventBus;
use crate::envelope::{Event, EventEnvelope};
use crate::error::Error;
use crate::transport::due_after;

impl EventBus {
    /// Publishes `payload` to the topic of [`E::TYPE`](Event::TYPE) to be
    /// delivered `delay` from now — not before, and late by at most the
    /// transport's stated tolerance; returns its `event_id` once the
    /// transport holds it (on a persistent transport, through a restart).
    /// Every group of the topic gets it, as with [`publish`](Self::publish).
    ///
    /// Transports that cannot schedule (see
    /// [`Capabilities::scheduled`](crate::Capabilities::scheduled): the push
    /// transports and Redis Pub/Sub) fail with
    /// [`ErrorKind::Unsupported`](crate::ErrorKind::Unsupported) — never a
    /// silent immediate publish. Retryable failures are tried again until
    /// the [publish deadline](Self::with_publish_deadline); the due time is
    /// fixed before the first try, so a retry does not push it back.
    ///
    /// ```
    /// use std::sync::Arc;
    /// use std::time::{Duration, Instant};
    /// use serde::{Deserialize, Serialize};
    /// use switchboard::{handler_fn, Event, EventBus, MemoryTransport, Message, SubscribeOptions};
    ///
    /// #[derive(Debug, Clone, Serialize, Deserialize)]
    /// struct PaymentDue { invoice: String }
    /// impl Event for PaymentDue {
    ///     const TYPE: &'static str = "payment.due";
    ///     const VERSION: &'static str = "1.0";
    /// }
    ///
    /// # tokio::runtime::Runtime::new().unwrap().block_on(async {
    /// let bus = EventBus::new(Arc::new(MemoryTransport::new()), "billing");
    /// let (seen, mut rx) = tokio::sync::mpsc::unbounded_channel();
    /// let consumer = bus
    ///     .subscribe(SubscribeOptions::new("reminders"),
    ///         handler_fn(move |message: Message<PaymentDue>| {
    ///             seen.send((Instant::now(), message.payload().invoice.clone())).ok();
    ///             async { Ok(()) }
    ///         }))
    ///     .await?;
    /// let sent = Instant::now();
    /// bus.publish_after(Duration::from_millis(100), PaymentDue { invoice: "INV-7".into() }).await?;
    /// let (arrived, invoice) = rx.recv().await.unwrap();
    /// assert_eq!(invoice, "INV-7");
    /// assert!(arrived - sent >= Duration::from_millis(100), "never early");
    /// consumer.shutdown().await?;
    /// # Ok::<(), switchboard::Error>(())
    /// # }).unwrap();
    /// ```
    pub async fn publish_after<E: Event>(
        &self,
        delay: Duration,
        payload: E,
    ) -> Result<Uuid, Error> {
        let at = due_after(delay)?;
        self.publish_at(at, payload).await
    }

    /// Publishes `payload` to the topic of [`E::TYPE`](Event::TYPE) to be
    /// delivered at `at` (a time already past delivers at once); see
    /// [`publish_after`](Self::publish_after) for the guarantees and the
    /// transports that refuse.
    ///
    /// ```
    /// use std::sync::Arc;
    /// use serde::{Deserialize, Serialize};
    /// use switchboard::{Event, EventBus, MemoryTransport};
    ///
    /// #[derive(Debug, Clone, Serialize, Deserialize)]
    /// struct MarketOpened { market: String }
    /// impl Event for MarketOpened {
    ///     const TYPE: &'static str = "market.opened";
    ///     const VERSION: &'static str = "1.0";
    /// }
    ///
    /// # tokio::runtime::Runtime::new().unwrap().block_on(async {
    /// let bus = EventBus::new(Arc::new(MemoryTransport::new()), "market");
    /// let opens = chrono::Utc::now() + chrono::Duration::hours(1);
    /// let id = bus.publish_at(opens, MarketOpened { market: "XNYS".into() }).await?;
    /// println!("event {id} waits for {opens}");
    /// # Ok::<(), switchboard::Error>(())
    /// # }).unwrap();
    /// ```
    pub async fn publish_at<E: Event>(&self, at: DateTime<Utc>, payload: E) -> Result<Uuid, Error> {
        let envelope = EventEnvelope::new(&*self.source, payload);
        self.publish_envelope_on(self.topic_of::<E>(), &envelope, Some(at))
            .await?;
        Ok(envelope.event_id())
    }
}
