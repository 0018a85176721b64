//! One error type for the whole crate, and whether to try again.
//!
//! Every failure is an [`Error`] with an [`ErrorKind`]. The kind answers the
//! question a caller has to answer first — *does trying again help?* — through
//! [`Error::is_retryable`], in the spirit of redis-rs's `retry_method()`:
//! a lost connection, a timeout or an overloaded peer is worth another try;
//! bad input, a refused request, an open circuit breaker or an unsupported
//! operation is not.
//!
//! A retryable failure answers only half of it. Sending a request again is
//! harmless only if the first one certainly did not take effect, or if the
//! request is idempotent: a `PlaceOrder` whose answer was lost may have
//! placed the order. [`Error::effect`] records which of the two a failure
//! is ([`Effect`]), and the retry layer sends a request that is not
//! idempotent again only after an [`Effect::NotApplied`] failure.

use std::borrow::Cow;
use std::fmt;
use std::time::Duration;

use crate::codec::DecodeError;
use crate::dead_letter::DeadLetter;

/// A boxed error from a lower layer (a client library, a handler).
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// What went wrong, coarsely enough that callers can decide what to do.
///
/// New kinds may be added in minor releases, so matches need a wildcard arm.
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// The connection to a broker or peer was refused or lost. Retryable.
    Connection,
    /// An operation did not finish within its deadline. Retryable.
    Timeout,
    /// The peer cannot serve right now (5xx, gRPC `UNAVAILABLE` or
    /// `RESOURCE_EXHAUSTED`, a broker's negative confirm) or a handler failed
    /// for a reason that may pass. Retryable.
    Unavailable,
    /// The request or message was refused as invalid (4xx, gRPC
    /// `INVALID_ARGUMENT`, a bad topic name, a handler's permanent failure).
    /// Repeating it will not help.
    Rejected,
    /// The caller is not authenticated or not allowed. Not retryable.
    Unauthorized,
    /// Bytes did not decode into an event envelope; [`Error::decode_error`]
    /// says exactly why. Not retryable.
    Decode,
    /// A value could not be encoded, or its encoding is over the size limit.
    /// Not retryable.
    Encode,
    /// A configuration value is missing or impossible. Not retryable.
    Config,
    /// The thing asked for (a dead-lettered message, a topic) does not exist.
    /// Not retryable.
    NotFound,
    /// A circuit breaker is open and failed the call without trying it.
    /// Not retryable: the breaker decides when to try again.
    BreakerOpen,
    /// The transport cannot do this operation (for example `nack` on an
    /// at-most-once broadcast). Not retryable.
    Unsupported,
    /// The transport, subscription or bus has been shut down. Not retryable.
    Closed,
}

impl ErrorKind {
    /// Whether an operation that failed with this kind may succeed if tried
    /// again unchanged.
    pub const fn is_retryable(self) -> bool {
        matches!(self, Self::Connection | Self::Timeout | Self::Unavailable)
    }

    const fn as_str(self) -> &'static str {
        match self {
            Self::Connection => "connection failed",
            Self::Timeout => "timed out",
            Self::Unavailable => "unavailable",
            Self::Rejected => "rejected",
            Self::Unauthorized => "unauthorized",
            Self::Decode => "cannot decode",
            Self::Encode => "cannot encode",
            Self::Config => "invalid configuration",
            Self::NotFound => "not found",
            Self::BreakerOpen => "circuit breaker open",
            Self::Unsupported => "unsupported",
            Self::Closed => "closed",
        }
    }
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Whether a failed request may have taken effect at the peer: decides
/// whether a request that is not idempotent may be sent again.
///
/// # By origin
///
/// | failure | kind | effect |
/// |---|---|---|
/// | connection refused or not made (HTTP connect error, tonic `ConnectError`) | `Connection` | `NotApplied` |
/// | HTTP 503, 429, 408; gRPC `RESOURCE_EXHAUSTED`, `ABORTED` (the peer refused it unprocessed) | `Unavailable` / `Timeout` | `NotApplied` |
/// | connection lost after the request was sent, a broken answer | `Connection` | `Unknown` |
/// | a deadline passed ([`Timeout`](crate::middleware::timeout::Timeout), HTTP 504, gRPC `DEADLINE_EXCEEDED`, a client-side timeout) | `Timeout` | `Unknown` |
/// | other HTTP 5xx; gRPC `UNAVAILABLE` without a failed connect, `UNKNOWN`, `INTERNAL`, `DATA_LOSS`, `CANCELLED` | `Unavailable` | `Unknown` |
/// | any other [`Error::new`], [`Error::transient`], [`Error::permanent`] | as given | `NotApplied`, except kind `Timeout`: `Unknown` |
///
/// The last row is what a handler says of itself: an error it returns means
/// it did not complete (a timeout means nobody knows), so its own transient
/// failures are retried. Code that wraps a call it cannot see into marks
/// the error with [`Error::with_effect`].
///
/// ```
/// use switchboard::{Effect, Error, ErrorKind};
///
/// // Nothing was sent: safe to send again, idempotent or not.
/// let refused = Error::new(ErrorKind::Connection, "connection refused");
/// assert_eq!(refused.effect(), Effect::NotApplied);
/// assert!(refused.is_safe_to_retry(false));
///
/// // The answer was lost: only an idempotent request may be sent again.
/// let lost = Error::new(ErrorKind::Connection, "reset after sending").with_effect(Effect::Unknown);
/// assert!(lost.is_retryable());
/// assert!(!lost.is_safe_to_retry(false));
/// assert!(lost.is_safe_to_retry(true));
/// ```
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Effect {
    /// Certainly not applied: the request never reached the peer (the
    /// connection was refused), or the peer refused it before acting on it
    /// (HTTP 503 or 429). Sending it again cannot apply it twice.
    NotApplied,
    /// It may have been applied: it reached the peer and then timed out, its
    /// answer was lost, or the peer failed while handling it. Sending it
    /// again may apply it twice, which only an idempotent request allows.
    Unknown,
}

/// The crate's error: a [`kind`](Error::kind), a message, and the underlying
/// cause when there is one.
///
/// ```
/// use switchboard::{Error, ErrorKind};
///
/// let lost = Error::new(ErrorKind::Connection, "redis: connection reset");
/// assert!(lost.is_retryable());
///
/// let bad = Error::permanent("quantity must be positive");
/// assert_eq!(bad.kind(), ErrorKind::Rejected);
/// assert!(!bad.is_retryable());
/// ```
#[derive(thiserror::Error)]
#[error("{kind}: {message}")]
pub struct Error {
    kind: ErrorKind,
    message: Cow<'static, str>,
    effect: Effect,
    requeue_after: Option<Duration>,
    retry_after: Option<Duration>,
    attempts: Option<u32>,
    dead_letter: Option<Box<DeadLetter>>,
    /// Set only by a batch consumer with an ordering key (see
    /// [`held_back`](Self::held_back)); never by user code.
    held_back: bool,
    #[source]
    source: Option<BoxError>,
}

impl Error {
    /// An error of `kind` with a message saying what failed.
    ///
    /// Its [`effect`](Self::effect) is [`Effect::Unknown`] for
    /// [`ErrorKind::Timeout`] (nobody knows how far a call that ran out of
    /// time got) and [`Effect::NotApplied`] for every other kind; set it with
    /// [`with_effect`](Self::with_effect).
    pub fn new(kind: ErrorKind, message: impl Into<Cow<'static, str>>) -> Self {
        let effect = match kind {
            ErrorKind::Timeout => Effect::Unknown,
            _ => Effect::NotApplied,
        };
        Self {
            kind,
            message: message.into(),
            effect,
            requeue_after: None,
            retry_after: None,
            attempts: None,
            dead_letter: None,
            held_back: false,
            source: None,
        }
    }

    /// A failure that may pass (kind [`ErrorKind::Unavailable`]): the retry
    /// layer tries again, and only when it gives up is the message
    /// dead-lettered.
    pub fn transient(message: impl Into<Cow<'static, str>>) -> Self {
        Self::new(ErrorKind::Unavailable, message)
    }

    /// A failure that will not pass (kind [`ErrorKind::Rejected`]): not
    /// retried; a consumed message goes straight to the dead-letter queue.
    pub fn permanent(message: impl Into<Cow<'static, str>>) -> Self {
        Self::new(ErrorKind::Rejected, message)
    }

    /// An [`ErrorKind::Unsupported`] error naming the transport and operation.
    pub fn unsupported(transport: &str, operation: &str) -> Self {
        Self::new(
            ErrorKind::Unsupported,
            format!("the {transport} transport cannot {operation}"),
        )
    }

    /// Attaches the lower-level cause.
    pub fn with_source(mut self, source: impl Into<BoxError>) -> Self {
        self.source = Some(source.into());
        self
    }

    /// Says whether the failed request may have taken effect (see
    /// [`Effect`]).
    pub fn with_effect(mut self, effect: Effect) -> Self {
        self.effect = effect;
        self
    }

    /// Asks the consume loop to put the message back and deliver it again
    /// after `delay`, instead of dead-lettering it.
    ///
    /// This is for "not now" rather than "failed", decided by this process:
    /// an open circuit breaker in the handler's path, or a duplicate whose
    /// first copy is still being handled. The loop waits exactly `delay`.
    /// Nothing bounds how often a message comes back this way. A delay a
    /// *peer* asked for is [`with_retry_after`](Self::with_retry_after).
    pub fn with_requeue(mut self, delay: Duration) -> Self {
        self.requeue_after = Some(delay);
        self
    }

    /// Records the delay a peer asked for before trying again: HTTP
    /// `Retry-After` (or `switchboard-retry-after-ms`), gRPC
    /// `grpc-retry-pushback-ms`.
    ///
    /// It is a hint from outside, so nothing obeys it as it is: the
    /// [retry layer](crate::middleware::retry) waits for it at most
    /// `max_backoff_ms`, and when it gives up it turns it into a
    /// [`requeue_after`](Self::requeue_after) of at most `max_backoff_ms`,
    /// so a consume loop puts the message back for no longer than that. A
    /// consume loop ignores a `retry_after` no retry layer capped.
    pub fn with_retry_after(mut self, delay: Duration) -> Self {
        self.retry_after = Some(delay);
        self
    }

    /// Records how many times the operation was tried before this error
    /// (set by the retry layer when it gives up).
    pub fn with_attempts(mut self, attempts: u32) -> Self {
        self.attempts = Some(attempts);
        self
    }

    /// Attaches the facts a consumed message is to be dead-lettered with.
    ///
    /// The consume loop dead-letters a message whose handler failed; when the
    /// error carries a letter (the dead-letter layer sets one, with the
    /// attempts counted by the retry layer) the loop uses it instead of its
    /// own generic one.
    pub fn with_dead_letter(mut self, letter: DeadLetter) -> Self {
        self.dead_letter = Some(Box::new(letter));
        self
    }

    /// What went wrong.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// The message, without the kind.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// Whether trying the same operation again may succeed: the failure
    /// may pass. Whether it is *safe* to send the request again is
    /// [`is_safe_to_retry`](Self::is_safe_to_retry).
    pub fn is_retryable(&self) -> bool {
        self.kind.is_retryable()
    }

    /// Whether the failed request may have taken effect.
    pub fn effect(&self) -> Effect {
        self.effect
    }

    /// Whether sending the request again may succeed and cannot apply it
    /// twice: the failure [is retryable](Self::is_retryable), and the request
    /// certainly [did not take effect](Effect::NotApplied) or is
    /// `idempotent`.
    pub fn is_safe_to_retry(&self, idempotent: bool) -> bool {
        self.is_retryable() && (idempotent || self.effect == Effect::NotApplied)
    }

    /// The delay set by [`with_requeue`](Error::with_requeue), if any.
    pub fn requeue_after(&self) -> Option<Duration> {
        self.requeue_after
    }

    /// The delay a peer asked for, set by
    /// [`with_retry_after`](Error::with_retry_after), if any.
    pub fn retry_after(&self) -> Option<Duration> {
        self.retry_after
    }

    /// How many times the operation was tried, when a retry layer said so.
    pub fn attempts(&self) -> Option<u32> {
        self.attempts
    }

    /// The dead-letter facts set by
    /// [`with_dead_letter`](Error::with_dead_letter), if any.
    pub fn dead_letter(&self) -> Option<&DeadLetter> {
        self.dead_letter.as_deref()
    }

    /// The exact decoding problem, when this error came from decoding.
    pub fn decode_error(&self) -> Option<&DecodeError> {
        self.source.as_deref()?.downcast_ref::<DecodeError>()
    }

    /// The answer a batch consumer with an ordering key gives a message it
    /// did not hand to the handler, or whose result it dropped, because an
    /// earlier message of its key in the same run failed: it goes back to
    /// the front of its key's queue, unsettled, to be handled again after
    /// that one. Not retryable, so no retry layer sends it again; the retry
    /// and dead-letter layers pass it through untouched, the consume loop
    /// counts it neither as handled nor as failed.
    pub(crate) fn held_back() -> Self {
        let mut error = Self::new(
            ErrorKind::Rejected,
            "held back behind an earlier message of its key",
        );
        error.held_back = true;
        error
    }

    /// Whether this is [`held_back`](Self::held_back)'s answer.
    pub(crate) fn is_held_back(&self) -> bool {
        self.held_back
    }

    pub(crate) fn closed(what: &str) -> Self {
        Self::new(ErrorKind::Closed, format!("{what} has been shut down"))
    }
}

impl fmt::Debug for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut debug = f.debug_struct("Error");
        debug
            .field("kind", &self.kind)
            .field("message", &self.message);
        if self.effect != Effect::NotApplied {
            debug.field("effect", &self.effect);
        }
        if let Some(delay) = self.requeue_after {
            debug.field("requeue_after", &delay);
        }
        if let Some(delay) = self.retry_after {
            debug.field("retry_after", &delay);
        }
        if let Some(attempts) = self.attempts {
            debug.field("attempts", &attempts);
        }
        if let Some(letter) = &self.dead_letter {
            debug.field("dead_letter", letter);
        }
        if self.held_back {
            debug.field("held_back", &true);
        }
        if let Some(source) = &self.source {
            debug.field("source", source);
        }
        debug.finish()
    }
}

impl From<DecodeError> for Error {
    fn from(error: DecodeError) -> Self {
        Self::new(ErrorKind::Decode, error.to_string()).with_source(error)
    }
}

/// Errors from tower layers, handlers and other libraries arrive boxed. An
/// [`Error`] keeps its kind; an error that carries an [`Error`] somewhere in
/// its source chain (an `anyhow` context, a `thiserror` variant with
/// `#[source]`) takes that error's kind, effect and delays, with its own
/// message; anything else is taken as a transient failure, the way a
/// handler's unexpected error is usually best treated (retried, then
/// dead-lettered).
///
/// ```
/// use switchboard::{BoxError, Error, ErrorKind};
///
/// #[derive(Debug, thiserror::Error)]
/// #[error("cannot ship order A-17")]
/// struct CannotShip(#[source] Error);
///
/// let boxed: BoxError = Box::new(CannotShip(Error::permanent("no address")));
/// let error = Error::from(boxed);
/// assert_eq!(error.kind(), ErrorKind::Rejected);
/// assert_eq!(error.message(), "cannot ship order A-17");
///
/// let boxed: BoxError = "socket closed".into();
/// assert_eq!(Error::from(boxed).kind(), ErrorKind::Unavailable);
/// ```
impl From<BoxError> for Error {
    fn from(error: BoxError) -> Self {
        let other = match error.downcast::<Error>() {
            Ok(error) => return *error,
            Err(other) => other,
        };
        let mut cause = other.source();
        let mut inner = None;
        while let Some(error) = cause {
            if let Some(found) = error.downcast_ref::<Error>() {
                inner = Some(found);
                break;
            }
            cause = error.source();
        }
        let Some(inner) = inner else {
            return Self::new(ErrorKind::Unavailable, other.to_string()).with_source(other);
        };
        let mut error = Self::new(inner.kind, other.to_string());
        error.effect = inner.effect;
        error.requeue_after = inner.requeue_after;
        error.retry_after = inner.retry_after;
        error.with_source(other)
    }
}

/// A stable snake_case name for an error kind, as sent in JSON error bodies
/// (`transport::http::kind_name`).
pub(crate) const fn kind_name(kind: ErrorKind) -> &'static str {
    match kind {
        ErrorKind::Connection => "connection",
        ErrorKind::Timeout => "timeout",
        ErrorKind::Unavailable => "unavailable",
        ErrorKind::Rejected => "rejected",
        ErrorKind::Unauthorized => "unauthorized",
        ErrorKind::Decode => "decode",
        ErrorKind::Encode => "encode",
        ErrorKind::Config => "config",
        ErrorKind::NotFound => "not_found",
        ErrorKind::BreakerOpen => "breaker_open",
        ErrorKind::Unsupported => "unsupported",
        ErrorKind::Closed => "closed",
    }
}

/// The JSON body every HTTP answer of an error carries — `ErrorResponse`'s
/// and the auth layer's refusals alike:
/// `{"error":{"kind":"<kind_name>","message":"..."}}`.
#[cfg_attr(not(any(feature = "http", feature = "auth")), allow(dead_code))]
pub(crate) fn json_error_body(error: &Error) -> Vec<u8> {
    #[derive(serde::Serialize)]
    struct Body<'a> {
        error: Detail<'a>,
    }
    #[derive(serde::Serialize)]
    struct Detail<'a> {
        kind: &'a str,
        message: &'a str,
    }
    let body = Body {
        error: Detail {
            kind: kind_name(error.kind()),
            message: error.message(),
        },
    };
    // Two strings always serialize.
    serde_json::to_vec(&body).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_infrastructure_failures_are_retryable() {
        let retryable: Vec<_> = [
            ErrorKind::Connection,
            ErrorKind::Timeout,
            ErrorKind::Unavailable,
            ErrorKind::Rejected,
            ErrorKind::Unauthorized,
            ErrorKind::Decode,
            ErrorKind::Encode,
            ErrorKind::Config,
            ErrorKind::NotFound,
            ErrorKind::BreakerOpen,
            ErrorKind::Unsupported,
            ErrorKind::Closed,
        ]
        .into_iter()
        .filter(|kind| kind.is_retryable())
        .collect();
        assert_eq!(
            retryable,
            [
                ErrorKind::Connection,
                ErrorKind::Timeout,
                ErrorKind::Unavailable
            ]
        );
    }

    #[test]
    fn a_timeout_may_have_taken_effect_and_everything_else_did_not_unless_marked() {
        let timeout = Error::new(ErrorKind::Timeout, "no answer");
        assert_eq!(timeout.effect(), Effect::Unknown);
        assert!(!timeout.is_safe_to_retry(false));
        assert!(timeout.is_safe_to_retry(true));
        let transient = Error::transient("database busy");
        assert_eq!(transient.effect(), Effect::NotApplied);
        assert!(transient.is_safe_to_retry(false));
        let lost = transient.with_effect(Effect::Unknown);
        assert!(!lost.is_safe_to_retry(false));
        // A refusal is never worth sending again, idempotent or not.
        assert!(!Error::permanent("bad").is_safe_to_retry(true));
    }

    #[test]
    fn display_names_kind_and_message_and_keeps_the_source() {
        let io = std::io::Error::new(std::io::ErrorKind::ConnectionReset, "reset by peer");
        let error = Error::new(ErrorKind::Connection, "redis publish").with_source(io);
        assert_eq!(error.to_string(), "connection failed: redis publish");
        let source = std::error::Error::source(&error).expect("source kept");
        assert_eq!(source.to_string(), "reset by peer");
    }

    #[test]
    fn boxed_errors_keep_their_kind_or_become_transient() {
        let boxed: BoxError = Box::new(Error::permanent("bad order"));
        assert_eq!(Error::from(boxed).kind(), ErrorKind::Rejected);
        let boxed: BoxError = "socket closed".into();
        let error = Error::from(boxed);
        assert_eq!(error.kind(), ErrorKind::Unavailable);
        assert_eq!(error.message(), "socket closed");
    }

    #[test]
    fn a_boxed_error_takes_the_kind_of_the_crate_error_in_its_source_chain() {
        #[derive(Debug, thiserror::Error)]
        #[error("outer")]
        struct Outer(#[source] Middle);
        #[derive(Debug, thiserror::Error)]
        #[error("middle")]
        struct Middle(#[source] Error);
        let inner = Error::new(ErrorKind::Timeout, "slow").with_requeue(Duration::from_secs(2));
        let error = Error::from(Box::new(Outer(Middle(inner))) as BoxError);
        assert_eq!(error.kind(), ErrorKind::Timeout);
        assert_eq!(error.effect(), Effect::Unknown);
        assert_eq!(error.requeue_after(), Some(Duration::from_secs(2)));
        assert_eq!(error.message(), "outer");
        assert_eq!(
            std::error::Error::source(&error).unwrap().to_string(),
            "outer"
        );
    }

    #[test]
    fn decode_errors_are_reachable_from_the_error() {
        let error = Error::from(DecodeError::TooLarge { size: 10, limit: 5 });
        assert_eq!(error.kind(), ErrorKind::Decode);
        assert_eq!(
            error.decode_error(),
            Some(&DecodeError::TooLarge { size: 10, limit: 5 })
        );
    }
}
