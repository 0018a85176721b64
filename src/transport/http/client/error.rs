//! What a failed HTTP exchange means for a retry: the mapping of reqwest's
//! failures (no answer, or a broken one) into the crate's [`Error`].

use crate::error::{BoxError, Effect, Error, ErrorKind};

/// Maps a reqwest failure — no answer, or a broken one — into an [`Error`]
/// saying whether to retry and whether the request may have taken effect;
/// see the [module table](crate::transport::http#statuses-and-errors). An answer that did
/// arrive with an error status is [`error_from_response`](crate::transport::http::error_from_response)'s.
///
/// Use it when you call reqwest yourself and want the same errors as
/// [`JsonService`](crate::transport::http::JsonService):
///
/// ```
/// use switchboard::ErrorKind;
/// use switchboard::transport::http::error_from_reqwest;
///
/// # tokio::runtime::Runtime::new().unwrap().block_on(async {
/// // Nothing listens on port 9: the request was never sent.
/// let failure = reqwest::get("http://127.0.0.1:9/").await.unwrap_err();
/// let error = error_from_reqwest(failure);
/// assert_eq!(error.kind(), ErrorKind::Connection);
/// assert!(error.is_retryable());
/// assert_eq!(error.effect(), switchboard::Effect::NotApplied);
/// # });
/// ```
pub fn error_from_reqwest(error: reqwest::Error) -> Error {
    #[cfg(feature = "http-tls")]
    if let Some(failure) = crate::tls::tls_failure(&error) {
        // An untrusted certificate stays untrusted: retrying cannot help.
        return Error::new(
            ErrorKind::Rejected,
            format!("HTTP: the TLS handshake failed: {failure}"),
        )
        .with_source(error);
    }
    // Only a failed connect proves the request was never sent; a timeout or
    // a connection that broke afterwards may have left it applied.
    let (kind, effect) = if error.is_connect() {
        let kind = if error.is_timeout() {
            ErrorKind::Timeout
        } else {
            ErrorKind::Connection
        };
        (kind, Effect::NotApplied)
    } else if error.is_timeout() {
        (ErrorKind::Timeout, Effect::Unknown)
    } else if error.is_request() || error.is_body() {
        (ErrorKind::Connection, Effect::Unknown)
    } else if error.is_builder() {
        (ErrorKind::Config, Effect::NotApplied)
    } else {
        (ErrorKind::Unavailable, Effect::Unknown)
    };
    Error::new(kind, format!("HTTP: {error}"))
        .with_effect(effect)
        .with_source(error)
}

/// The error of the service under a [`JsonService`](crate::transport::http::JsonService):
/// reqwest's own is mapped as above, this crate's [`Error`] (from a layer
/// of yours) is kept, anything else is a transient failure after which the
/// request may have taken effect (nothing says it was not sent).
pub(super) fn error_from_service(error: impl Into<BoxError>) -> Error {
    let other = match error.into().downcast::<reqwest::Error>() {
        Ok(error) => return error_from_reqwest(*error),
        Err(other) => other,
    };
    match other.downcast::<Error>() {
        Ok(error) => *error,
        Err(other) => Error::new(ErrorKind::Unavailable, format!("HTTP: {other}"))
            .with_effect(Effect::Unknown)
            .with_source(other),
    }
}
