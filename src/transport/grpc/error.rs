//! The gRPC status ↔ [`Error`] mapping, one table both ways.

use std::time::Duration;

use tonic::{Code, Status};

use super::RETRY_PUSHBACK_MS;

use crate::error::{Effect, Error, ErrorKind};

/// Maps a gRPC status into an [`Error`] whose kind says whether to retry
/// and whose [effect](Effect) says whether the call may have taken effect.
///
/// A `grpc-retry-pushback-ms` value becomes [`Error::retry_after`], which
/// the retry layer caps at `max_backoff_ms`.
///
/// | status | kind | retryable | effect |
/// |---|---|---|---|
/// | `UNAVAILABLE` from a TLS handshake rustls refused (feature `grpc-tls`) | [`Rejected`](ErrorKind::Rejected) | no | `NotApplied` |
/// | `UNAVAILABLE` from a failed connect (the request was never sent) | [`Connection`](ErrorKind::Connection) | yes | `NotApplied` |
/// | `RESOURCE_EXHAUSTED`, `ABORTED` (the server refused or rolled it back) | [`Unavailable`](ErrorKind::Unavailable) | yes | `NotApplied` |
/// | `UNAVAILABLE` otherwise (a server draining, a connection lost mid-call) | [`Unavailable`](ErrorKind::Unavailable) | yes | `Unknown` |
/// | `CANCELLED`, `INTERNAL`, `UNKNOWN`, `DATA_LOSS` | [`Unavailable`](ErrorKind::Unavailable) | yes | `Unknown` |
/// | `CANCELLED` from tonic's own request timeout | [`Timeout`](ErrorKind::Timeout) | yes | `Unknown` |
/// | `DEADLINE_EXCEEDED` | [`Timeout`](ErrorKind::Timeout) | yes | `Unknown` |
/// | `INVALID_ARGUMENT`, `FAILED_PRECONDITION`, `OUT_OF_RANGE`, `ALREADY_EXISTS` | [`Rejected`](ErrorKind::Rejected) | no | `NotApplied` |
/// | `NOT_FOUND` | [`NotFound`](ErrorKind::NotFound) | no | `NotApplied` |
/// | `UNAUTHENTICATED`, `PERMISSION_DENIED` | [`Unauthorized`](ErrorKind::Unauthorized) | no | `NotApplied` |
/// | `UNIMPLEMENTED` | [`Unsupported`](ErrorKind::Unsupported) | no | `NotApplied` |
///
/// gRPC says of `UNAVAILABLE` that retrying a call that is not idempotent
/// is not always safe; only a failed connect proves the server never saw
/// it.
///
/// ```
/// use switchboard::ErrorKind;
/// use switchboard::transport::grpc::error_from_status;
///
/// let error = error_from_status(tonic::Status::unavailable("draining"));
/// assert_eq!(error.kind(), ErrorKind::Unavailable);
/// assert!(error.is_retryable());
/// assert_eq!(error.message(), "gRPC UNAVAILABLE: draining");
/// ```
pub fn error_from_status(status: Status) -> Error {
    #[cfg(feature = "grpc-tls")]
    if status.code() == Code::Unavailable
        && let Some(failure) = crate::tls::tls_failure(&status)
    {
        // An untrusted certificate stays untrusted: retrying cannot help.
        return Error::new(
            ErrorKind::Rejected,
            format!("gRPC: the TLS handshake failed: {failure}"),
        )
        .with_source(status);
    }
    use Effect::{NotApplied, Unknown};
    let (kind, effect) = match status.code() {
        // Tonic reports a failed connect as UNAVAILABLE and its own request
        // timeout as CANCELLED; the cause it keeps says which it was.
        Code::Unavailable if caused_by::<tonic::ConnectError>(&status) => {
            (ErrorKind::Connection, NotApplied)
        }
        Code::Cancelled if caused_by::<tonic::TimeoutExpired>(&status) => {
            (ErrorKind::Timeout, Unknown)
        }
        Code::Ok => (ErrorKind::Unavailable, Unknown), // never an error; defensive
        Code::ResourceExhausted | Code::Aborted => (ErrorKind::Unavailable, NotApplied),
        Code::Unavailable | Code::Cancelled | Code::Internal | Code::Unknown | Code::DataLoss => {
            (ErrorKind::Unavailable, Unknown)
        }
        Code::DeadlineExceeded => (ErrorKind::Timeout, Unknown),
        Code::InvalidArgument
        | Code::FailedPrecondition
        | Code::OutOfRange
        | Code::AlreadyExists => (ErrorKind::Rejected, NotApplied),
        Code::NotFound => (ErrorKind::NotFound, NotApplied),
        Code::Unauthenticated | Code::PermissionDenied => (ErrorKind::Unauthorized, NotApplied),
        Code::Unimplemented => (ErrorKind::Unsupported, NotApplied),
    };
    let pushback = status
        .metadata()
        .get(RETRY_PUSHBACK_MS)
        .and_then(|value| value.to_str().ok()?.parse::<u64>().ok())
        .map(Duration::from_millis);
    let mut error = Error::new(
        kind,
        format!("gRPC {}: {}", code_name(status.code()), status.message()),
    )
    .with_effect(effect);
    if let Some(delay) = pushback {
        error = error.with_retry_after(delay);
    }
    error.with_source(status)
}

/// Maps an [`Error`] into the gRPC status a server answers with; a
/// [`requeue_after`](Error::requeue_after) delay (or, passing a peer's hint
/// on, [`retry_after`](Error::retry_after)) is sent as
/// `grpc-retry-pushback-ms`.
///
/// ```
/// use switchboard::{Error, ErrorKind};
/// use switchboard::transport::grpc::status_from_error;
///
/// let status = status_from_error(&Error::permanent("quantity must be positive"));
/// assert_eq!(status.code(), tonic::Code::InvalidArgument);
/// assert_eq!(status.message(), "quantity must be positive");
/// ```
pub fn status_from_error(error: &Error) -> Status {
    let code = match error.kind() {
        ErrorKind::Connection | ErrorKind::Unavailable | ErrorKind::Closed => Code::Unavailable,
        ErrorKind::BreakerOpen => Code::Unavailable,
        ErrorKind::Timeout => Code::DeadlineExceeded,
        ErrorKind::Rejected | ErrorKind::Decode | ErrorKind::Encode => Code::InvalidArgument,
        ErrorKind::Unauthorized => Code::Unauthenticated,
        ErrorKind::Config => Code::FailedPrecondition,
        ErrorKind::NotFound => Code::NotFound,
        ErrorKind::Unsupported => Code::Unimplemented,
    };
    let mut status = Status::new(code, error.message().to_owned());
    if let Some(delay) = error.requeue_after().or(error.retry_after()) {
        let millis = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX);
        status
            .metadata_mut()
            .insert(RETRY_PUSHBACK_MS, millis.into());
    }
    status
}

fn caused_by<E: std::error::Error + 'static>(status: &Status) -> bool {
    let mut cause = std::error::Error::source(status);
    while let Some(error) = cause {
        if error.is::<E>() {
            return true;
        }
        cause = error.source();
    }
    false
}

fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_status_code_maps_to_the_documented_kind() {
        use Effect::{NotApplied, Unknown};
        use ErrorKind::*;
        let table = [
            (Code::Unavailable, Unavailable, true, Unknown),
            (Code::DeadlineExceeded, Timeout, true, Unknown),
            (Code::ResourceExhausted, Unavailable, true, NotApplied),
            (Code::Aborted, Unavailable, true, NotApplied),
            (Code::Cancelled, Unavailable, true, Unknown),
            (Code::Internal, Unavailable, true, Unknown),
            (Code::Unknown, Unavailable, true, Unknown),
            (Code::DataLoss, Unavailable, true, Unknown),
            (Code::InvalidArgument, Rejected, false, NotApplied),
            (Code::FailedPrecondition, Rejected, false, NotApplied),
            (Code::OutOfRange, Rejected, false, NotApplied),
            (Code::AlreadyExists, Rejected, false, NotApplied),
            (Code::NotFound, NotFound, false, NotApplied),
            (Code::Unauthenticated, Unauthorized, false, NotApplied),
            (Code::PermissionDenied, Unauthorized, false, NotApplied),
            (Code::Unimplemented, Unsupported, false, NotApplied),
        ];
        for (code, kind, retryable, effect) in table {
            let error = error_from_status(Status::new(code, "why"));
            assert_eq!(error.kind(), kind, "{code:?}");
            assert_eq!(error.is_retryable(), retryable, "{code:?}");
            assert_eq!(error.effect(), effect, "{code:?}");
            assert_eq!(
                error.message(),
                format!("gRPC {}: why", code_name(code)),
                "{code:?}"
            );
        }
    }

    #[test]
    fn errors_map_to_statuses_and_back_to_the_same_retryability() {
        use ErrorKind::*;
        let table = [
            (Connection, Code::Unavailable),
            (Timeout, Code::DeadlineExceeded),
            (Unavailable, Code::Unavailable),
            (Rejected, Code::InvalidArgument),
            (Unauthorized, Code::Unauthenticated),
            (Decode, Code::InvalidArgument),
            (Encode, Code::InvalidArgument),
            (Config, Code::FailedPrecondition),
            (NotFound, Code::NotFound),
            (BreakerOpen, Code::Unavailable),
            (Unsupported, Code::Unimplemented),
            (Closed, Code::Unavailable),
        ];
        for (kind, code) in table {
            let status = status_from_error(&Error::new(kind, "why"));
            assert_eq!(status.code(), code, "{kind:?}");
            assert_eq!(status.message(), "why");
            let back = error_from_status(status);
            if kind != BreakerOpen && kind != Closed {
                assert_eq!(back.is_retryable(), kind.is_retryable(), "{kind:?}");
            }
        }
    }

    #[test]
    fn connect_failures_and_client_timeouts_are_told_apart_by_their_cause() {
        let refused = Status::from_error(Box::new(tonic::ConnectError("refused".into())));
        assert_eq!(refused.code(), Code::Unavailable);
        let refused = error_from_status(refused);
        assert_eq!(refused.kind(), ErrorKind::Connection);
        assert_eq!(refused.effect(), Effect::NotApplied, "never sent");
        let timed_out = Status::from_error(Box::new(tonic::TimeoutExpired(())));
        assert_eq!(timed_out.code(), Code::Cancelled);
        let timed_out = error_from_status(timed_out);
        assert_eq!(timed_out.kind(), ErrorKind::Timeout);
        assert_eq!(timed_out.effect(), Effect::Unknown);
    }

    #[test]
    fn a_requeue_delay_travels_as_retry_pushback() {
        let error = Error::transient("nacked").with_requeue(Duration::from_millis(250));
        let status = status_from_error(&error);
        assert_eq!(status.metadata().get(RETRY_PUSHBACK_MS).unwrap(), "250");
        let back = error_from_status(status);
        // The peer's delay is a hint for a retry layer to cap, not a requeue.
        assert_eq!(back.retry_after(), Some(Duration::from_millis(250)));
        assert_eq!(back.requeue_after(), None);
    }
}
