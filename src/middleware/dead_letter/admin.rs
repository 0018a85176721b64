use std::fmt;
use std::sync::Arc;

use crate::error::Error;
use crate::transport::{DeadLetterQueue, DeadLettered, Redrive, Transport};

/// Manual retry of dead letters (strategy §6.3): list, inspect, redrive one,
/// redrive all — the same calls on every transport that keeps dead letters.
///
/// A redriven message goes back to the group that gave up on it and is
/// delivered afresh; a dedupe layer released its mark when it failed, so its
/// handler runs again. Transports without a dead-letter queue fail every call
/// with [`ErrorKind::Unsupported`](crate::ErrorKind::Unsupported).
///
/// ```
/// use std::sync::Arc;
/// use switchboard::middleware::dead_letter::DeadLetterAdmin;
/// use switchboard::MemoryTransport;
///
/// # tokio::runtime::Runtime::new().unwrap().block_on(async {
/// let admin = DeadLetterAdmin::new(Arc::new(MemoryTransport::new()));
/// assert!(admin.list("trade.executed", 10).await?.is_empty());
/// assert_eq!(admin.redrive_all("trade.executed").await?, 0);
/// # Ok::<(), switchboard::Error>(())
/// # }).unwrap();
/// ```
#[derive(Clone)]
pub struct DeadLetterAdmin {
    transport: Arc<dyn Transport>,
}

impl DeadLetterAdmin {
    /// Administers `transport`'s dead-letter queues.
    pub fn new(transport: Arc<dyn Transport>) -> Self {
        Self { transport }
    }

    fn queue(&self) -> Result<&dyn DeadLetterQueue, Error> {
        self.transport.dead_letters()
    }

    /// Up to `limit` dead letters of `topic`, oldest first.
    ///
    /// A list shorter than `limit` is the whole queue: its length is
    /// recorded as the gauge `switchboard_dead_letter_depth`.
    pub async fn list(&self, topic: &str, limit: usize) -> Result<Vec<DeadLettered>, Error> {
        let letters = self.queue()?.list(topic, limit).await?;
        if letters.len() < limit {
            crate::observe::metrics::dead_letter_depth(self.transport.name(), topic, letters.len());
        }
        Ok(letters)
    }

    /// One dead letter by id;
    /// [`ErrorKind::NotFound`](crate::ErrorKind::NotFound) when absent.
    pub async fn inspect(&self, topic: &str, id: &str) -> Result<DeadLettered, Error> {
        self.queue()?.inspect(topic, id).await
    }

    /// Sends the dead letter `id` back to its group;
    /// [`ErrorKind::NotFound`](crate::ErrorKind::NotFound) when absent.
    pub async fn redrive(&self, topic: &str, id: &str) -> Result<(), Error> {
        let sent = self
            .queue()?
            .redrive(topic, Redrive::One(id.to_owned()))
            .await?;
        tracing::info!(topic, id, sent, "dead letter redriven");
        Ok(())
    }

    /// Sends every dead letter of `topic` back; returns how many.
    ///
    /// It moves at most the letters that were in the queue when it started:
    /// one that fails again at once and comes back meanwhile waits for the
    /// next redrive, so the call always ends. The depth gauge is set to 0
    /// for what it moved; a later [`list`](Self::list) measures again.
    pub async fn redrive_all(&self, topic: &str) -> Result<usize, Error> {
        let sent = self.queue()?.redrive(topic, Redrive::All).await?;
        crate::observe::metrics::dead_letter_depth(self.transport.name(), topic, 0);
        tracing::info!(topic, sent, "dead letters redriven");
        Ok(sent)
    }
}

impl fmt::Debug for DeadLetterAdmin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DeadLetterAdmin")
            .field("transport", &self.transport.name())
            .finish()
    }
}
