use std::fmt;

use chrono::{DateTime, Utc};
use uuid::Uuid;

/// The facts of a message being dead-lettered, as handed to a
/// [`DeadLetterAlert`].
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetterFacts {
    /// The topic the message was published to.
    pub topic: String,
    /// The consumer group that gave up on it.
    pub group: String,
    /// The envelope's `event_id` (the id to inspect or redrive it by).
    pub event_id: Uuid,
    /// The envelope's `event_type`.
    pub event_type: String,
    /// Why it is dead-lettered.
    pub reason: String,
    /// How many times it was tried in all: the broker's deliveries and the
    /// in-process retries.
    pub attempts: u32,
    /// The last error.
    pub last_error: String,
    /// When the handler gave up.
    pub at: DateTime<Utc>,
}

/// Told about every message a handler gives up on, once the transport has
/// accepted it as a dead letter (strategy §6.3: operations are alerted).
///
/// The consume loop calls it after [`Delivery::settle`](crate::Delivery::settle)
/// returned `Ok` for the rejection, so the letter can be listed, inspected
/// and redriven by the time the hook runs. A rejection the transport could
/// not store raises no alert; the message is delivered again instead.
/// Implement it to page someone, post to a chat or count a metric. It is
/// called on the consumer's task: hand slow work to a task of your own.
///
/// ```
/// use switchboard::middleware::dead_letter::{DeadLetterAlert, DeadLetterFacts};
///
/// #[derive(Debug)]
/// struct Pager;
/// impl DeadLetterAlert for Pager {
///     fn alert(&self, facts: &DeadLetterFacts) {
///         eprintln!("dead letter on {}: {} ({})", facts.topic, facts.event_id, facts.last_error);
///     }
/// }
/// ```
pub trait DeadLetterAlert: fmt::Debug + Send + Sync + 'static {
    /// A message has been dead-lettered.
    fn alert(&self, facts: &DeadLetterFacts);
}

/// An alert that does nothing beyond the `tracing` error every dead letter
/// logs.
#[derive(Debug, Clone, Copy, Default)]
pub struct LogOnly;

impl DeadLetterAlert for LogOnly {
    fn alert(&self, _: &DeadLetterFacts) {}
}
