//! The error of a settle operation, which hands the delivery back.

use std::fmt;

use super::Delivery;
use crate::error::{Error, ErrorKind};

/// A settle operation ([`Delivery::ack`], [`nack`](Delivery::nack),
/// [`dead_letter`](Delivery::dead_letter), [`give_back`](Delivery::give_back),
/// [`settle`](Delivery::settle)) that failed: the error, and the delivery,
/// to settle another way or to drop (a delivery dropped unsettled is
/// delivered again).
///
/// It converts into the crate's [`Error`] (so `?` works in a function that
/// returns one), and says whether trying again may help, like the error it
/// carries.
///
/// ```
/// use switchboard::{Error, MemoryTransport, Publisher, RawMessage, SubscribeOptions, Subscriber};
///
/// # tokio::runtime::Runtime::new().unwrap().block_on(async {
/// let transport = MemoryTransport::new();
/// let mut subscription = transport.subscribe("price.updated", SubscribeOptions::new("game")).await?;
/// transport.publish("price.updated", RawMessage::new("{}")).await?;
/// let delivery = subscription.recv().await.expect("a message");
/// match delivery.ack().await {
///     Ok(()) => {}
///     // Try once more, then leave it to be delivered again.
///     Err(failed) if failed.is_retryable() => failed.into_delivery().ack().await?,
///     Err(failed) => return Err(Error::from(failed)),
/// }
/// # Ok::<(), Error>(())
/// # }).unwrap();
/// ```
pub struct SettleError {
    error: Error,
    delivery: Box<Delivery>,
}

impl SettleError {
    pub(crate) fn new(error: Error, delivery: Delivery) -> Self {
        Self {
            error,
            delivery: Box::new(delivery),
        }
    }

    /// What went wrong.
    pub fn error(&self) -> &Error {
        &self.error
    }

    /// The error's kind.
    pub fn kind(&self) -> ErrorKind {
        self.error.kind()
    }

    /// Whether settling the delivery again may succeed.
    pub fn is_retryable(&self) -> bool {
        self.error.is_retryable()
    }

    /// The delivery, still unsettled.
    pub fn delivery(&self) -> &Delivery {
        &self.delivery
    }

    /// The delivery, still unsettled, to settle another way.
    pub fn into_delivery(self) -> Delivery {
        *self.delivery
    }

    /// The error and the delivery.
    pub fn into_parts(self) -> (Error, Delivery) {
        (self.error, *self.delivery)
    }
}

impl fmt::Display for SettleError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "could not settle a message of {} for group {}: {}",
            self.delivery.topic(),
            self.delivery.group(),
            self.error
        )
    }
}

// The message body stays out of logs: it may carry personal data.
impl fmt::Debug for SettleError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SettleError")
            .field("error", &self.error)
            .field("topic", &self.delivery.topic())
            .field("group", &self.delivery.group())
            .field("attempt", &self.delivery.attempt())
            .finish_non_exhaustive()
    }
}

impl std::error::Error for SettleError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.error)
    }
}

/// The error alone; the delivery is dropped, so it will be delivered again.
impl From<SettleError> for Error {
    fn from(failed: SettleError) -> Self {
        failed.error
    }
}
