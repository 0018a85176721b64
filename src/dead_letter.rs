//! The facts a message is dead-lettered with: why, after how many attempts,
//! and the last error.

use std::fmt;
use std::sync::Arc;

/// The most characters of a dead letter's reason and last error; longer
/// text is cut there and ends in `…`. Both travel as headers of the
/// dead-lettered message (and into logs), where a handler's error text
/// quoting a whole payload would leak it and grow every header.
///
/// ```
/// use switchboard::{DeadLetter, DEAD_LETTER_TEXT_LIMIT};
///
/// let letter = DeadLetter::new("x".repeat(10_000)).with_last_error("y".repeat(10_000));
/// assert_eq!(letter.reason().chars().count(), DEAD_LETTER_TEXT_LIMIT + 1);
/// assert!(letter.reason().ends_with('…'));
/// assert_eq!(letter.last_error().unwrap().chars().count(), DEAD_LETTER_TEXT_LIMIT + 1);
/// ```
pub const DEAD_LETTER_TEXT_LIMIT: usize = 512;

/// `text` cut to [`DEAD_LETTER_TEXT_LIMIT`] characters.
fn bounded(text: String) -> String {
    match text.char_indices().nth(DEAD_LETTER_TEXT_LIMIT) {
        None => text,
        Some((end, _)) => format!("{}…", &text[..end]),
    }
}

/// Why and after how many attempts a message goes to the dead-letter queue.
///
/// ```
/// use switchboard::DeadLetter;
///
/// let letter = DeadLetter::new("handler gave up")
///     .with_attempts(3)
///     .with_last_error("market: unavailable");
/// assert_eq!(letter.reason(), "handler gave up");
/// assert_eq!(letter.attempts(), Some(3));
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetter {
    reason: String,
    pub(crate) attempts: Option<u32>,
    last_error: Option<String>,
    alert: PendingAlert,
}

/// The alert the dead-letter layer asks for, carried with the letter so the
/// consume loop can raise it once the transport has accepted the letter —
/// an alert raised earlier would send an operator to a queue that does not
/// hold the message yet. Not part of a letter's identity: two letters with
/// the same facts are equal whether or not one still has its alert.
#[derive(Clone, Default)]
pub(crate) struct PendingAlert(
    Option<
        Arc<(
            Arc<dyn crate::middleware::dead_letter::DeadLetterAlert>,
            crate::middleware::dead_letter::DeadLetterFacts,
        )>,
    >,
);

impl PendingAlert {
    /// Tells the hook, once.
    pub(crate) fn raise(self) {
        if let Some(pending) = self.0 {
            pending.0.alert(&pending.1);
        }
    }
}

impl PartialEq for PendingAlert {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl Eq for PendingAlert {}

impl fmt::Debug for PendingAlert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.0.is_some() { "pending" } else { "none" })
    }
}

impl DeadLetter {
    /// A dead letter with a reason; attempts default to the delivery's.
    pub fn new(reason: impl Into<String>) -> Self {
        Self {
            reason: bounded(reason.into()),
            attempts: None,
            last_error: None,
            alert: PendingAlert::default(),
        }
    }

    /// Asks for `alert` to be told `facts` once the transport has accepted
    /// this letter.
    pub(crate) fn with_alert(
        mut self,
        alert: Arc<dyn crate::middleware::dead_letter::DeadLetterAlert>,
        facts: crate::middleware::dead_letter::DeadLetterFacts,
    ) -> Self {
        self.alert = PendingAlert(Some(Arc::new((alert, facts))));
        self
    }

    /// The alert to raise once the letter is stored, taken from the letter.
    pub(crate) fn take_alert(&mut self) -> PendingAlert {
        std::mem::take(&mut self.alert)
    }

    /// Sets how many times the message was tried in all.
    pub fn with_attempts(mut self, attempts: u32) -> Self {
        self.attempts = Some(attempts);
        self
    }

    /// Records the last error the handler returned.
    pub fn with_last_error(mut self, error: impl Into<String>) -> Self {
        self.last_error = Some(bounded(error.into()));
        self
    }

    /// Why the message was given up on.
    pub fn reason(&self) -> &str {
        &self.reason
    }

    /// How many times it was tried, when known. [`Delivery::dead_letter`](crate::Delivery::dead_letter)
    /// always fills it in before the transport sees it.
    pub fn attempts(&self) -> Option<u32> {
        self.attempts
    }

    /// The last error, when there was one.
    pub fn last_error(&self) -> Option<&str> {
        self.last_error.as_deref()
    }
}

impl From<&str> for DeadLetter {
    fn from(reason: &str) -> Self {
        Self::new(reason)
    }
}

impl From<String> for DeadLetter {
    fn from(reason: String) -> Self {
        Self::new(reason)
    }
}
