//! What a handler receives.

use std::fmt;
use std::sync::Arc;

use uuid::Uuid;

use crate::envelope::EventEnvelope;

/// What a handler receives: the typed envelope (shared, not copied), where it
/// came from, and which attempt this is.
pub struct Message<E> {
    pub(super) envelope: Arc<EventEnvelope<E>>,
    pub(super) topic: Arc<str>,
    pub(super) group: Arc<str>,
    pub(super) attempt: u32,
    /// Its place in a run of its key, in a batch subscription with an
    /// ordering key (see `key_run`).
    pub(super) place: Option<super::key_run::Place>,
}

impl<E> Message<E> {
    /// A message for a handler, as the consume loop builds it. Useful to call
    /// a handler directly in its own tests.
    pub fn new(
        envelope: EventEnvelope<E>,
        topic: impl Into<Arc<str>>,
        group: impl Into<Arc<str>>,
        attempt: u32,
    ) -> Self {
        Self {
            envelope: Arc::new(envelope),
            topic: topic.into(),
            group: group.into(),
            attempt,
            place: None,
        }
    }

    /// The whole envelope.
    pub fn envelope(&self) -> &EventEnvelope<E> {
        &self.envelope
    }

    /// The envelope as a shared pointer, to keep beyond the handler.
    pub fn shared_envelope(&self) -> Arc<EventEnvelope<E>> {
        self.envelope.clone()
    }

    /// The payload.
    pub fn payload(&self) -> &E {
        self.envelope.payload()
    }

    /// The event's unique id.
    pub fn event_id(&self) -> Uuid {
        self.envelope.event_id()
    }

    /// The topic it arrived on.
    pub fn topic(&self) -> &str {
        &self.topic
    }

    /// The consumer group handling it.
    pub fn group(&self) -> &str {
        &self.group
    }

    /// The topic as a shared string (for metric labels).
    pub(crate) fn shared_topic(&self) -> Arc<str> {
        self.topic.clone()
    }

    /// The group as a shared string (for metric labels).
    pub(crate) fn shared_group(&self) -> Arc<str> {
        self.group.clone()
    }

    /// Which attempt this is: the transport's delivery count, raised by each
    /// in-process retry.
    pub fn attempt(&self) -> u32 {
        self.attempt
    }

    /// The same message, marked as attempt `attempt` (used by retry layers).
    pub fn with_attempt(mut self, attempt: u32) -> Self {
        self.attempt = attempt;
        self
    }
}

impl<E> Clone for Message<E> {
    fn clone(&self) -> Self {
        Self {
            envelope: self.envelope.clone(),
            topic: self.topic.clone(),
            group: self.group.clone(),
            attempt: self.attempt,
            place: self.place.clone(),
        }
    }
}

impl<E: fmt::Debug> fmt::Debug for Message<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Message")
            .field("envelope", &self.envelope)
            .field("topic", &self.topic)
            .field("group", &self.group)
            .field("attempt", &self.attempt)
            .finish()
    }
}
