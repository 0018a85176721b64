//! The transport's errors: lapin's mapped to the crate's, keeping whether a
//! retry can help, and the ones the transport raises itself.

use lapin::protocol::{AMQPErrorKind, AMQPHardError, AMQPSoftError};

use crate::error::{Error, ErrorKind};

/// The error of a wait for a connection that did not come in time.
pub(crate) fn not_connected() -> Error {
    Error::new(
        ErrorKind::Connection,
        "amqp: not connected to the broker (still reconnecting)",
    )
    .with_effect(crate::error::Effect::NotApplied)
}

/// The error of a publish that waited for the broker to unblock its
/// connection until its deadline: never sent, so safe to send again.
pub(crate) fn blocked_timeout(reason: Option<String>) -> Error {
    let reason = reason.unwrap_or_else(|| "no reason given".to_owned());
    Error::new(
        ErrorKind::Timeout,
        format!(
            "amqp: the broker blocks publishing ({reason}); not sent within the publish timeout"
        ),
    )
    .with_effect(crate::error::Effect::NotApplied)
}

/// Maps a lapin error to the crate's, keeping whether a retry can help.
pub(crate) fn amqp_error(what: &str, error: lapin::Error) -> Error {
    use lapin::ErrorKind as Lapin;
    #[cfg(feature = "amqp-tls")]
    if let Some(failure) = crate::tls::tls_failure(&error) {
        // An untrusted certificate stays untrusted: retrying cannot help.
        return Error::new(
            ErrorKind::Rejected,
            format!("amqp: {what}: the TLS handshake failed: {failure}"),
        )
        .with_source(error);
    }
    let kind = match error.kind() {
        Lapin::ProtocolError(amqp) => match amqp.kind() {
            AMQPErrorKind::Soft(AMQPSoftError::NOTFOUND) => ErrorKind::NotFound,
            AMQPErrorKind::Soft(AMQPSoftError::ACCESSREFUSED) => ErrorKind::Unauthorized,
            AMQPErrorKind::Soft(AMQPSoftError::RESOURCELOCKED) => ErrorKind::Unavailable,
            AMQPErrorKind::Soft(_) => ErrorKind::Rejected,
            AMQPErrorKind::Hard(AMQPHardError::NOTALLOWED) => ErrorKind::Unauthorized,
            AMQPErrorKind::Hard(_) => ErrorKind::Connection,
        },
        Lapin::AuthProviderError(_) => ErrorKind::Unauthorized,
        Lapin::ChannelsLimitReached => ErrorKind::Unavailable,
        _ => ErrorKind::Connection,
    };
    Error::new(kind, format!("amqp: {what}: {error}")).with_source(error)
}

/// The URI without its password, for error messages.
pub(crate) use crate::transport::redact::redact_url as redact;
