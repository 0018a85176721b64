//! What settling a consumed message does: the one table of outcomes.
//!
//! The table is on [`Outcome`].

use std::time::Duration;

use crate::codec::DecodeError;
use crate::dead_letter::DeadLetter;
use crate::error::{Error, ErrorKind};

/// What settling a message does: the one table.
///
/// | outcome | what it does | the permit | chosen when |
/// |---|---|---|---|
/// | [`Ack`](Outcome::Ack) | forgets the message | freed | the handler returned `Ok` |
/// | [`Retry`](Outcome::Retry) | delivers it again after `after` (a nack) | kept through the delay | the error carries [`Error::requeue_after`] (an open breaker, a duplicate in progress, a retry layer's capped `Retry-After`), or is [`ErrorKind::BreakerOpen`] |
/// | [`GiveBack`](Outcome::GiveBack) | hands it back to the group for another member | freed at once, the lease no longer renewed | this consumer cannot read it: an envelope of a major version it does not know ([`DecodeError::UnsupportedVersion`]) |
/// | [`Reject`](Outcome::Reject) | dead-letters it with a reason | freed | any other error: what is left once the handler's retry layer gave up, a permanent failure, a panic, bytes that are not an envelope, the poison guard, a give-back past its [limit](crate::GiveBackLimit) |
///
/// [`Outcome::of`] is that table for a handler's `Result<(), Error>`, and
/// [`Delivery::settle`](crate::Delivery::settle) carries an outcome out on
/// any transport, with one rule for what a transport cannot do
/// ([`Settled`](crate::Settled) says what happened in the end):
///
/// * a **retry** the transport cannot nack is a rejection;
/// * a **give-back** the transport cannot do is a rejection saying so;
/// * a **rejection** the transport keeps no dead letters for is reported to
///   whoever can hear it — a push receiver answers its publisher with a
///   non-retryable error naming the reason — and only where nobody can
///   (Redis Pub/Sub) acked and logged as lost. Never a silent success.
///
/// An open circuit breaker never sends a message to the dead-letter queue:
/// the consume loop stops pulling while the breaker says it is not ready,
/// and a message that meets it anyway is retried after the breaker's delay.
///
/// ```
/// use std::time::Duration;
/// use switchboard::{Error, ErrorKind, Outcome};
///
/// assert_eq!(Outcome::of(&Ok(())), Outcome::Ack);
///
/// // "Not now": an open breaker asks for the message again later.
/// let open = Error::new(ErrorKind::BreakerOpen, "market is down").with_requeue(Duration::from_secs(5));
/// assert_eq!(Outcome::of(&Err(open)), Outcome::Retry { after: Duration::from_secs(5) });
///
/// // What the handler (and its retry layer) gave up on is rejected, with a reason.
/// let Outcome::Reject(letter) = Outcome::of(&Err(Error::permanent("quantity must be positive"))) else {
///     unreachable!()
/// };
/// assert_eq!(letter.reason(), "handler failed");
/// assert_eq!(letter.last_error(), Some("rejected: quantity must be positive"));
/// ```
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Handled: the message is forgotten.
    Ack,
    /// Not now: the message is delivered again after `after`, to the same
    /// subscription where the transport can (it keeps its prefetch permit
    /// through the delay); a push publisher sends it again.
    Retry {
        /// How long to wait before delivering it again.
        after: Duration,
    },
    /// Not for this consumer: the message goes back to its group for
    /// another member to take — its permit freed at once, its lease no
    /// longer renewed — until the subscription's
    /// [`GiveBackLimit`](crate::GiveBackLimit) turns it into a rejection.
    GiveBack {
        /// Why this consumer cannot take it (logged; part of the rejection
        /// once the limit is reached).
        reason: String,
    },
    /// Refused for good: to the dead-letter queue with these facts (or, on
    /// a transport without one, reported to the publisher).
    Reject(DeadLetter),
}

impl Outcome {
    /// How long a message that met an open breaker waits when the error does
    /// not say ([`Error::requeue_after`] unset): the breaker's own errors
    /// always do, but a handler may have wrapped one.
    pub const BREAKER_RETRY: Duration = Duration::from_secs(1);

    /// The outcome of a handler's result: `Ok` acks; an error says by its
    /// kind and fields which outcome it is (see [the table](Outcome)).
    pub fn of(result: &Result<(), Error>) -> Self {
        match result {
            Ok(()) => Self::Ack,
            Err(error) => Self::of_error(error),
        }
    }

    /// The outcome of a failed handling, checked in this order:
    ///
    /// 1. [`Error::requeue_after`] set → [`Retry`](Self::Retry) after it;
    /// 2. kind [`ErrorKind::BreakerOpen`] → [`Retry`](Self::Retry) after
    ///    [`Outcome::BREAKER_RETRY`];
    /// 3. [`Error::decode_error`] is [`DecodeError::UnsupportedVersion`] →
    ///    [`GiveBack`](Self::GiveBack);
    /// 4. anything else → [`Reject`](Self::Reject) with the letter the
    ///    dead-letter layer attached ([`Error::dead_letter`]), or reason
    ///    "handler failed" and the error as the last error.
    ///
    /// Whether the error [is retryable](Error::is_retryable) does not
    /// matter here: retrying is the handler's retry layer's job, and what
    /// reaches the loop is what it gave up on.
    pub fn of_error(error: &Error) -> Self {
        if let Some(after) = error.requeue_after() {
            return Self::Retry { after };
        }
        if error.kind() == ErrorKind::BreakerOpen {
            return Self::Retry {
                after: Self::BREAKER_RETRY,
            };
        }
        if let Some(DecodeError::UnsupportedVersion { .. }) = error.decode_error() {
            return Self::GiveBack {
                reason: error.message().to_owned(),
            };
        }
        Self::Reject(match error.dead_letter() {
            Some(letter) => letter.clone(),
            None => DeadLetter::new("handler failed").with_last_error(error.to_string()),
        })
    }

    /// A rejection with `reason`.
    pub fn reject(reason: impl Into<String>) -> Self {
        Self::Reject(DeadLetter::new(reason))
    }

    /// The outcome's name, as the `outcome` label of
    /// `switchboard_consume_total` spells what was asked for.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Ack => "ack",
            Self::Retry { .. } => "retry",
            Self::GiveBack { .. } => "give_back",
            Self::Reject(_) => "reject",
        }
    }
}

impl From<DeadLetter> for Outcome {
    fn from(letter: DeadLetter) -> Self {
        Self::Reject(letter)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_in_order() {
        assert_eq!(Outcome::of(&Ok(())), Outcome::Ack);
        let requeue = Error::transient("in progress").with_requeue(Duration::from_millis(250));
        assert_eq!(
            Outcome::of_error(&requeue),
            Outcome::Retry {
                after: Duration::from_millis(250)
            }
        );
        // An open breaker never dead-letters, whatever was attached.
        let open = Error::new(ErrorKind::BreakerOpen, "open")
            .with_dead_letter(DeadLetter::new("would be wrong"));
        assert_eq!(
            Outcome::of_error(&open),
            Outcome::Retry {
                after: Outcome::BREAKER_RETRY
            }
        );
        let newer = Error::from(DecodeError::UnsupportedVersion {
            found: "2.0".into(),
            supported: "1.0",
        });
        assert!(matches!(
            Outcome::of_error(&newer),
            Outcome::GiveBack { reason } if reason.contains("2.0")
        ));
        // Malformed input is refused at once.
        let garbage = Error::from(DecodeError::NotAnObject);
        assert!(matches!(Outcome::of_error(&garbage), Outcome::Reject(_)));
        // A retryable error the retry layer gave up on is a rejection too.
        let Outcome::Reject(letter) = Outcome::of_error(&Error::transient("still down")) else {
            panic!("rejected")
        };
        assert_eq!(letter.reason(), "handler failed");
        assert_eq!(letter.last_error(), Some("unavailable: still down"));
        let attached =
            Error::transient("x").with_dead_letter(DeadLetter::new("gave up").with_attempts(3));
        assert_eq!(
            Outcome::of_error(&attached),
            Outcome::Reject(DeadLetter::new("gave up").with_attempts(3))
        );
    }
}
