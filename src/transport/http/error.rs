//! The HTTP status ↔ [`Error`] mapping and the JSON error body, one table
//! both ways.

use std::time::Duration;

use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;

use crate::error::{Effect, Error, ErrorKind};
use crate::transport::push::RETRY_AFTER_MS;

/// Maps an HTTP error status (and its headers and body) into an [`Error`];
/// see the [module docs](super) for the table. The message is the body's
/// `error.message` when it is this crate's JSON error, else the body text.
///
/// ```
/// use switchboard::ErrorKind;
/// use switchboard::transport::http::error_from_response;
///
/// let body = br#"{"error":{"kind":"rejected","message":"quantity must be positive"}}"#;
/// let error = error_from_response(axum::http::StatusCode::BAD_REQUEST, &Default::default(), body);
/// assert_eq!(error.kind(), ErrorKind::Rejected);
/// assert_eq!(error.message(), "HTTP 400: quantity must be positive");
/// ```
pub fn error_from_response(status: StatusCode, headers: &HeaderMap, body: &[u8]) -> Error {
    let kind = kind_of_status(status);
    let message = match serde_json::from_slice::<ErrorBody>(body) {
        Ok(parsed) => parsed.error.message,
        Err(_) => String::from_utf8_lossy(&body[..body.len().min(1024)]).into_owned(),
    };
    let mut error = Error::new(
        kind,
        format!("HTTP {}: {}", status.as_u16(), message.trim()),
    )
    .with_effect(effect_of_status(status));
    if let Some(delay) = retry_after(headers) {
        error = error.with_retry_after(delay);
    }
    error
}

/// Whether the server may have acted on a request it answered with
/// `status`: 503, 429, 408 and 501 say it did not; any other 5xx may come
/// after the work was done.
fn effect_of_status(status: StatusCode) -> Effect {
    match status.as_u16() {
        408 | 429 | 501 | 503 => Effect::NotApplied,
        500..=599 => Effect::Unknown,
        _ => Effect::NotApplied,
    }
}

fn kind_of_status(status: StatusCode) -> ErrorKind {
    match status.as_u16() {
        401 | 403 => ErrorKind::Unauthorized,
        404 => ErrorKind::NotFound,
        408 | 504 => ErrorKind::Timeout,
        429 => ErrorKind::Unavailable,
        501 => ErrorKind::Unsupported,
        500..=599 => ErrorKind::Unavailable,
        _ => ErrorKind::Rejected,
    }
}

fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let number = |name: &str| headers.get(name)?.to_str().ok()?.trim().parse::<u64>().ok();
    number(RETRY_AFTER_MS)
        .map(Duration::from_millis)
        .or_else(|| number(header::RETRY_AFTER.as_str()).map(Duration::from_secs))
}

/// The status a server answers an [`Error`] with.
///
/// ```
/// use switchboard::{Error, ErrorKind};
/// use switchboard::transport::http::status_from_error;
///
/// assert_eq!(status_from_error(&Error::permanent("bad")), axum::http::StatusCode::BAD_REQUEST);
/// assert_eq!(status_from_error(&Error::transient("busy")), axum::http::StatusCode::SERVICE_UNAVAILABLE);
/// ```
pub fn status_from_error(error: &Error) -> StatusCode {
    match error.kind() {
        ErrorKind::Connection
        | ErrorKind::Unavailable
        | ErrorKind::Closed
        | ErrorKind::BreakerOpen => StatusCode::SERVICE_UNAVAILABLE,
        ErrorKind::Timeout => StatusCode::GATEWAY_TIMEOUT,
        ErrorKind::Rejected | ErrorKind::Decode | ErrorKind::Encode => StatusCode::BAD_REQUEST,
        ErrorKind::Unauthorized => StatusCode::UNAUTHORIZED,
        ErrorKind::Config => StatusCode::INTERNAL_SERVER_ERROR,
        ErrorKind::NotFound => StatusCode::NOT_FOUND,
        ErrorKind::Unsupported => StatusCode::NOT_IMPLEMENTED,
    }
}

/// A stable snake_case name for an error kind, as sent in JSON error bodies.
pub fn kind_name(kind: ErrorKind) -> &'static str {
    crate::error::kind_name(kind)
}

#[derive(Debug, Deserialize)]
struct ErrorBody {
    error: ErrorDetail,
}

#[derive(Debug, Deserialize)]
struct ErrorDetail {
    // The kind comes back from the status, which the table maps.
    message: String,
}

/// Answers an [`Error`] with [`status_from_error`]'s status (or one set
/// with [`with_status`](Self::with_status)), a JSON body
/// `{"error":{"kind":"...","message":"..."}}`, and, for an error with
/// [`requeue_after`](Error::requeue_after) (or, passing a peer's hint on,
/// [`retry_after`](Error::retry_after)), `Retry-After` and
/// `switchboard-retry-after-ms`.
///
/// ```
/// use axum::response::IntoResponse;
/// use switchboard::Error;
/// use switchboard::transport::http::ErrorResponse;
///
/// let response = ErrorResponse::from(Error::permanent("bad quantity")).into_response();
/// assert_eq!(response.status(), axum::http::StatusCode::BAD_REQUEST);
/// ```
#[derive(Debug)]
pub struct ErrorResponse {
    status: StatusCode,
    error: Error,
}

impl ErrorResponse {
    /// Overrides the status (413 for an oversize body, say).
    pub fn with_status(mut self, status: StatusCode) -> Self {
        self.status = status;
        self
    }

    /// The error.
    pub fn error(&self) -> &Error {
        &self.error
    }

    /// The status it is answered with.
    pub fn status(&self) -> StatusCode {
        self.status
    }
}

impl From<Error> for ErrorResponse {
    fn from(error: Error) -> Self {
        Self {
            status: status_from_error(&error),
            error,
        }
    }
}

impl IntoResponse for ErrorResponse {
    fn into_response(self) -> Response {
        let json = crate::error::json_error_body(&self.error);
        let content_type = [(header::CONTENT_TYPE, "application/json")];
        let mut response = (self.status, content_type, json).into_response();
        if let Some(delay) = self.error.requeue_after().or(self.error.retry_after()) {
            let millis = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX);
            let seconds = millis.div_ceil(1000);
            let headers = response.headers_mut();
            headers.insert(RETRY_AFTER_MS, HeaderValue::from(millis));
            headers.insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_status_class_maps_to_the_documented_kind() {
        use Effect::{NotApplied, Unknown};
        use ErrorKind::*;
        let table = [
            (400, Rejected, false, NotApplied),
            (401, Unauthorized, false, NotApplied),
            (403, Unauthorized, false, NotApplied),
            (404, NotFound, false, NotApplied),
            (405, Rejected, false, NotApplied),
            (408, Timeout, true, NotApplied),
            (409, Rejected, false, NotApplied),
            (413, Rejected, false, NotApplied),
            (422, Rejected, false, NotApplied),
            (429, Unavailable, true, NotApplied),
            (500, Unavailable, true, Unknown),
            (501, Unsupported, false, NotApplied),
            (502, Unavailable, true, Unknown),
            (503, Unavailable, true, NotApplied),
            (504, Timeout, true, Unknown),
            (599, Unavailable, true, Unknown),
        ];
        for (code, kind, retryable, effect) in table {
            let status = StatusCode::from_u16(code).unwrap();
            let error = error_from_response(status, &HeaderMap::new(), b"why");
            assert_eq!(error.kind(), kind, "{code}");
            assert_eq!(error.is_retryable(), retryable, "{code}");
            assert_eq!(error.effect(), effect, "{code}");
            assert_eq!(error.message(), format!("HTTP {code}: why"));
        }
    }

    #[test]
    fn errors_answer_with_a_status_of_the_same_retryability() {
        use ErrorKind::*;
        for kind in [
            Connection,
            Timeout,
            Unavailable,
            Rejected,
            Unauthorized,
            Decode,
            Encode,
            NotFound,
            Unsupported,
        ] {
            let status = status_from_error(&Error::new(kind, "why"));
            let back = error_from_response(status, &HeaderMap::new(), b"");
            assert_eq!(
                back.is_retryable(),
                kind.is_retryable(),
                "{kind:?} → {status}"
            );
        }
    }

    #[tokio::test]
    async fn error_responses_carry_kind_message_and_retry_delay() {
        let error = Error::transient("nacked").with_requeue(Duration::from_millis(1500));
        let response = ErrorResponse::from(error).into_response();
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(response.headers()[RETRY_AFTER_MS], "1500");
        assert_eq!(response.headers()[header::RETRY_AFTER], "2");
        let headers = response.headers().clone();
        let body = axum::body::to_bytes(response.into_body(), 1024)
            .await
            .unwrap();
        assert_eq!(
            &body[..],
            br#"{"error":{"kind":"unavailable","message":"nacked"}}"#
        );
        let back = error_from_response(StatusCode::SERVICE_UNAVAILABLE, &headers, &body);
        assert_eq!(back.message(), "HTTP 503: nacked");
        // The peer's delay is a hint for a retry layer to cap, not a requeue.
        assert_eq!(back.retry_after(), Some(Duration::from_millis(1500)));
        assert_eq!(back.requeue_after(), None);

        let mut seconds_only = HeaderMap::new();
        seconds_only.insert(header::RETRY_AFTER, HeaderValue::from(3));
        let back = error_from_response(StatusCode::TOO_MANY_REQUESTS, &seconds_only, b"");
        assert_eq!(back.retry_after(), Some(Duration::from_secs(3)));
    }
}
