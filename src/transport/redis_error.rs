//! How redis-rs errors map onto [`ErrorKind`], for every Redis user in the
//! crate (both transports and the dedupe store), so a caller's retry decision
//! does not depend on which of them failed.

use redis::{RedisError, RetryMethod};

use crate::error::{Error, ErrorKind};

/// A redis-rs error as a crate error naming the `operation` that failed.
pub(crate) fn redis_error(operation: &str, error: RedisError) -> Error {
    let kind = if error.is_timeout() {
        ErrorKind::Timeout
    } else if error.is_io_error() || error.is_connection_dropped() || error.is_connection_refusal()
    {
        ErrorKind::Connection
    } else if error.kind() == redis::ErrorKind::AuthenticationFailed {
        ErrorKind::Unauthorized
    } else {
        // redis-rs knows which server replies are worth another try
        // (TRYAGAIN, MOVED, LOADING…) and which are the command's fault.
        match error.retry_method() {
            RetryMethod::NoRetry => ErrorKind::Rejected,
            _ => ErrorKind::Unavailable,
        }
    };
    Error::new(kind, format!("redis {operation}: {error}")).with_source(error)
}
