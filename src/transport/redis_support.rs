//! What every Redis user in the crate (both transports and the dedupe
//! store) shares: how redis-rs errors map onto [`ErrorKind`], so a caller's
//! retry decision does not depend on which of them failed, and how a
//! connection is opened within a deadline.

use std::future::Future;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{RedisError, RetryMethod};

use crate::error::{Error, ErrorKind};
use crate::transport::{Lifecycle, TransportHealth};

/// The connect timeout every Redis user gets unless configured otherwise.
pub(crate) const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// A redis-rs error as a crate error naming the `operation` that failed.
pub(crate) fn redis_error(operation: &str, error: RedisError) -> Error {
    let kind = if is_tls_refusal(&error) {
        // An untrusted certificate or a failed handshake stays so on the
        // next try: the configuration (CA, host name) must change.
        ErrorKind::Rejected
    } else if error.is_timeout() {
        ErrorKind::Timeout
    } else if error.is_io_error() || error.is_connection_dropped() || error.is_connection_refusal()
    {
        ErrorKind::Connection
    } else if error.kind() == redis::ErrorKind::AuthenticationFailed
        // An ACL user's wrong password is a server reply, not redis-rs' own kind.
        || matches!(error.code(), Some("WRONGPASS" | "NOAUTH"))
    {
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

/// Whether rustls refused the handshake (tokio-rustls hands its error over
/// inside an `io::Error`, which redis-rs keeps as the source).
#[cfg(feature = "redis-tls")]
fn is_tls_refusal(error: &RedisError) -> bool {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(current) = cause {
        let inner = current
            .downcast_ref::<std::io::Error>()
            .and_then(std::io::Error::get_ref)
            .map(|inner| inner as &(dyn std::error::Error + 'static));
        if current.is::<rustls::Error>() || inner.is_some_and(|inner| inner.is::<rustls::Error>()) {
            return true;
        }
        cause = current.source();
    }
    // redis-rs' synchronous path keeps only the text.
    error.to_string().contains("invalid peer certificate")
}

#[cfg(not(feature = "redis-tls"))]
fn is_tls_refusal(_: &RedisError) -> bool {
    false
}

/// A client for `url`; a URL redis-rs cannot read is a configuration error
/// that names it (without its password).
///
/// A `rediss://` URL is TLS on the crate's one crypto provider (feature
/// `redis-tls`), trusting `tls_ca_pem` when given and the system's roots
/// otherwise. An ACL user and password come from the URL
/// (`rediss://user:password@host:6380`).
pub(crate) fn open_client(url: &str, tls_ca_pem: Option<&[u8]>) -> Result<redis::Client, Error> {
    use redis::IntoConnectionInfo as _;
    let bad_url = |error: RedisError| {
        // redis-rs' own message never quotes the URL; the URL is quoted
        // here without its password.
        let url = crate::transport::redact::redact_url(url);
        Error::new(ErrorKind::Config, format!("redis url {url:?}: {error}")).with_source(error)
    };
    let info = url.into_connection_info().map_err(bad_url)?;
    client_for(info, tls_ca_pem).map_err(bad_url)
}

/// A client for `info`, over TLS with `tls_ca_pem` as the trusted CA when
/// given (see [`open_client`]).
pub(crate) fn client_for(
    info: redis::ConnectionInfo,
    tls_ca_pem: Option<&[u8]>,
) -> Result<redis::Client, RedisError> {
    #[cfg(feature = "redis-tls")]
    {
        if matches!(info.addr(), redis::ConnectionAddr::TcpTls { .. }) {
            // redis-rs builds its rustls config on the process default.
            crate::tls::install_default_provider();
        }
        if let Some(ca) = tls_ca_pem {
            return redis::Client::build_with_tls(
                info,
                redis::TlsCertificates {
                    client_tls: None,
                    root_cert: Some(ca.to_vec()),
                },
            );
        }
    }
    #[cfg(not(feature = "redis-tls"))]
    if tls_ca_pem.is_some() {
        return Err(RedisError::from((
            redis::ErrorKind::InvalidClientConfig,
            "a TLS CA needs the `redis-tls` feature",
        )));
    }
    redis::Client::open(info)
}

/// Refuses a connect timeout under 1 ms, which no connection could meet.
pub(crate) fn validate_connect_timeout(who: &str, timeout: Duration) -> Result<(), Error> {
    if timeout < Duration::from_millis(1) {
        return Err(Error::new(
            ErrorKind::Config,
            format!("{who}: connect_timeout must be at least 1 ms"),
        ));
    }
    Ok(())
}

/// `connecting`, failed with a retryable [`ErrorKind::Connection`] (nothing
/// was sent) once `timeout` passes. `who` names the caller in the message.
pub(crate) async fn within_connect_timeout<T>(
    who: &str,
    timeout: Duration,
    connecting: impl Future<Output = T>,
) -> Result<T, Error> {
    tokio::time::timeout(timeout, connecting)
        .await
        .map_err(|_| connect_timed_out(who, timeout))
}

fn connect_timed_out(who: &str, timeout: Duration) -> Error {
    Error::new(
        ErrorKind::Connection,
        format!(
            "{who}: cannot connect within the connect timeout ({timeout:?}); \
             is Redis up and reachable?"
        ),
    )
}

/// A reconnecting command connection, opened within `connect_timeout`.
///
/// redis-rs tries a refused connection again six times with backoff (about
/// 11 s) before it says so; the whole of it is bounded here, and each later
/// reconnection attempt by `connect_timeout` as well.
pub(crate) async fn connection_manager(
    who: &str,
    client: &redis::Client,
    config: ConnectionManagerConfig,
    connect_timeout: Duration,
) -> Result<ConnectionManager, Error> {
    let config = config.set_connection_timeout(Some(connect_timeout));
    // The manager tries a failed connect again whatever the cause; one
    // plain connection first tells a wrong password or an untrusted
    // certificate (not worth a retry) from a Redis that is down.
    let started = tokio::time::Instant::now();
    let probe = within_connect_timeout(
        who,
        connect_timeout,
        client.get_multiplexed_async_connection_with_config(
            &redis::AsyncConnectionConfig::new()
                .set_connection_timeout(Some(connect_timeout))
                .set_response_timeout(Some(connect_timeout)),
        ),
    )
    .await?;
    if let Err(error) = probe {
        let error = redis_error("connect", error);
        if !error.is_retryable() {
            return Err(error);
        }
    }
    // The whole connect stays within one connect timeout.
    let left = connect_timeout.saturating_sub(started.elapsed());
    if left.is_zero() {
        return Err(connect_timed_out(who, connect_timeout));
    }
    within_connect_timeout(who, left, client.get_connection_manager_with_config(config))
        .await?
        .map_err(|error| redis_error("connect", error))
}

/// What the last command on a transport's connections said about Redis:
/// reachable, or not and why. A transport's `health()` reads it, so a
/// readiness probe sees Redis go away without sending a command of its own.
#[derive(Debug, Default)]
pub(crate) struct LastOutcome {
    /// The fast path: a success while up touches nothing else.
    down: AtomicBool,
    reason: Mutex<String>,
}

impl LastOutcome {
    /// Notes `result`: a success is up, a connection failure or timeout is
    /// down; any other error (a script's, a wrong type) says nothing about
    /// the connection.
    pub(crate) fn record<T>(&self, result: &redis::RedisResult<T>) {
        match result {
            Ok(_) => {
                if self.down.load(Ordering::Relaxed) {
                    self.down.store(false, Ordering::Relaxed);
                }
            }
            Err(error)
                if error.is_io_error()
                    || error.is_connection_dropped()
                    || error.is_connection_refusal()
                    || error.is_timeout() =>
            {
                *self
                    .reason
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner) = error.to_string();
                self.down.store(true, Ordering::Relaxed);
            }
            Err(_) => {}
        }
    }

    /// Closed, down with the last failure's reason, or up.
    pub(crate) fn health(&self, lifecycle: &Lifecycle) -> TransportHealth {
        let health = lifecycle.health();
        if !health.is_up() || !self.down.load(Ordering::Relaxed) {
            return health;
        }
        let reason = self
            .reason
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        TransportHealth::down(
            health.transport,
            format!("the last command failed: {reason}"),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_connection_failure_is_down_until_a_command_succeeds() {
        let lifecycle = Lifecycle::new("redis-test");
        let outcome = LastOutcome::default();
        assert!(outcome.health(&lifecycle).is_up());
        let refused: redis::RedisResult<()> = Err(redis::RedisError::from(std::io::Error::from(
            std::io::ErrorKind::ConnectionRefused,
        )));
        outcome.record(&refused);
        let health = outcome.health(&lifecycle);
        assert!(!health.is_serving(), "{health}");
        assert!(health.reason().unwrap().contains("refused"), "{health}");
        let script_error: redis::RedisResult<()> = Err(redis::RedisError::from((
            redis::ErrorKind::Client,
            "a wrong type",
        )));
        outcome.record(&script_error);
        assert!(
            !outcome.health(&lifecycle).is_serving(),
            "says nothing of the link"
        );
        outcome.record(&Ok(()));
        assert!(outcome.health(&lifecycle).is_up());
    }
}
