//! The newest event of a type, read without a group: how a late starter
//! learns state that is announced whole each time.

use super::EventBus;
use crate::envelope::{Event, EventEnvelope};
use crate::error::Error;

impl EventBus {
    /// The newest `E` the transport still holds on this bus's topic for
    /// `E`, decoded; `None` when there is none. Nothing is acknowledged and
    /// no consumer group sees the read.
    ///
    /// Use it for events that carry a whole state (a key set, a
    /// configuration): subscribe first, then read the latest, so nothing
    /// published in between is missed and nothing older needs replaying.
    /// Transports that keep no history fail with
    /// [`ErrorKind::Unsupported`](crate::ErrorKind::Unsupported); see
    /// [`Transport::read_latest`](crate::Transport::read_latest).
    ///
    /// ```
    /// use std::sync::Arc;
    /// use serde::{Deserialize, Serialize};
    /// use switchboard::{Event, EventBus, MemoryTransport};
    ///
    /// #[derive(Debug, Serialize, Deserialize)]
    /// struct LimitsChanged { max_order: u32 }
    /// impl Event for LimitsChanged {
    ///     const TYPE: &'static str = "limits.changed";
    ///     const VERSION: &'static str = "1.0";
    /// }
    ///
    /// # tokio::runtime::Runtime::new().unwrap().block_on(async {
    /// let bus = EventBus::new(Arc::new(MemoryTransport::new()), "risk-service");
    /// bus.publish(LimitsChanged { max_order: 100 }).await?;
    /// bus.publish(LimitsChanged { max_order: 250 }).await?;
    /// let latest = bus.read_latest::<LimitsChanged>().await?.expect("published");
    /// assert_eq!(latest.payload().max_order, 250);
    /// # Ok::<(), switchboard::Error>(())
    /// # }).unwrap();
    /// ```
    pub async fn read_latest<E: Event>(&self) -> Result<Option<EventEnvelope<E>>, Error> {
        let topic = self.topic_of::<E>();
        let Some(message) = self.transport.read_latest(&topic).await? else {
            return Ok(None);
        };
        Ok(Some(self.codec.decode::<E>(&message.body)?))
    }
}
