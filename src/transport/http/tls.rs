//! HTTPS for the HTTP transport (feature `http-tls`): a reqwest client that
//! trusts given roots, and an axum server behind a tokio-rustls acceptor.
//!
//! axum has no TLS of its own, so [`serve_tls`] accepts TCP connections,
//! completes the TLS handshake per connection (a slow client never holds up
//! the others) and serves each with hyper-util's HTTP/1.1 + HTTP/2 server.
//! Both ends use configs from [`crate::tls`], so the aws-lc-rs provider is
//! passed explicitly and no process default is consulted.

use std::future::Future;
use std::io;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use rustls::{RootCertStore, ServerConfig};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;

use super::client::error_from_reqwest;
use crate::error::{Error, ErrorKind};

/// How long a client may take over the TLS handshake before its connection
/// is dropped, so half-open connections cannot pile up.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// How long [`serve_tls_with_shutdown`] lets connections finish their
/// requests after the shutdown signal before it closes them.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// The ALPN protocols the server offers and the client asks for. The client
/// is built without reqwest's `http2` feature, so it speaks HTTP/1.1.
const SERVER_ALPN: &[&[u8]] = &[b"h2", b"http/1.1"];
const CLIENT_ALPN: &[&[u8]] = &[b"http/1.1"];

/// A `reqwest::Client` for `https://` URLs that trusts exactly `roots`, on
/// the aws-lc-rs provider, with `TCP_NODELAY`; hand it to
/// [`HttpTransport::with_client`](super::HttpTransport::with_client) or
/// [`JsonService::new`](super::JsonService::new). A server whose
/// certificate does not chain to `roots` is refused with
/// [`ErrorKind::Rejected`] (not retryable).
///
/// ```
/// let roots = rustls::RootCertStore::empty(); // e.g. tls::root_store_from_pem(ca_pem)?
/// let client = switchboard::transport::http::tls_client(roots)?;
/// # Ok::<(), switchboard::Error>(())
/// ```
pub fn tls_client(roots: RootCertStore) -> Result<reqwest::Client, Error> {
    let config = crate::tls::client_config(roots, CLIENT_ALPN)?;
    reqwest::Client::builder()
        .tcp_nodelay(true)
        .tls_backend_preconfigured(Arc::unwrap_or_clone(config))
        .build()
        .map_err(error_from_reqwest)
}

/// A server config for [`serve_tls`] from a certificate chain and its key:
/// aws-lc-rs, TLS 1.2 and 1.3, ALPN `h2` and `http/1.1`.
pub fn tls_server_config(
    cert_chain: Vec<rustls::pki_types::CertificateDer<'static>>,
    key: rustls::pki_types::PrivateKeyDer<'static>,
) -> Result<Arc<ServerConfig>, Error> {
    crate::tls::server_config(cert_chain, key, SERVER_ALPN)
}

/// Serves any axum `router` over TLS (HTTP/1.1 and HTTP/2, chosen by ALPN)
/// on `listener`, until the future is dropped — which also closes every
/// connection it accepted — or the listener fails. To stop gracefully on a
/// signal, use [`serve_tls_with_shutdown`].
///
/// A failed handshake (an untrusted client, a plain-HTTP request on the TLS
/// port) ends that connection only.
pub fn serve_tls(
    listener: TcpListener,
    router: Router,
    config: Arc<ServerConfig>,
) -> impl Future<Output = Result<(), Error>> {
    serve_tls_with_shutdown(listener, router, config, std::future::pending())
}

/// [`serve_tls`] until `shutdown` resolves, then gracefully: it stops
/// accepting, lets each connection finish the requests it is serving
/// (idle keep-alive connections close at once), and returns `Ok` once they
/// are done — or after [`SHUTDOWN_GRACE`], closing what is left.
///
/// ```
/// # tokio::runtime::Runtime::new().unwrap().block_on(async {
/// let key = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
/// let config = switchboard::transport::http::tls_server_config(
///     vec![key.cert.der().clone()],
///     rustls::pki_types::PrivateKeyDer::Pkcs8(key.signing_key.serialize_der().into()),
/// )?;
/// let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
/// let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
/// let serving = tokio::spawn(switchboard::transport::http::serve_tls_with_shutdown(
///     listener,
///     axum::Router::new(),
///     config,
///     async move { let _ = stopped.await; },
/// ));
/// stop.send(()).unwrap();
/// serving.await.unwrap()?;
/// # Ok::<(), switchboard::Error>(())
/// # }).unwrap();
/// ```
pub fn serve_tls_with_shutdown(
    listener: TcpListener,
    router: Router,
    config: Arc<ServerConfig>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> impl Future<Output = Result<(), Error>> {
    let acceptor = TlsAcceptor::from(config);
    async move {
        // Dropping `stop` tells every connection to finish gracefully.
        let (stop, stopping) = watch::channel(());
        let mut connections = JoinSet::new();
        tokio::pin!(shutdown);
        loop {
            let accepted = tokio::select! {
                accepted = listener.accept() => accepted,
                // Reap finished connections so the set does not grow.
                Some(_) = connections.join_next(), if !connections.is_empty() => continue,
                () = &mut shutdown => break,
            };
            let (stream, peer) = match accepted {
                Ok(accepted) => accepted,
                // The peer gave up before we accepted: not the listener's fault.
                Err(error) if is_per_connection(&error) => continue,
                Err(error) => {
                    return Err(Error::new(
                        ErrorKind::Connection,
                        format!("HTTPS server: accept failed: {error}"),
                    )
                    .with_source(error));
                }
            };
            let _ = stream.set_nodelay(true);
            let acceptor = acceptor.clone();
            let service = TowerToHyperService::new(router.clone());
            let mut stopping = stopping.clone();
            connections.spawn(async move {
                let stream =
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                        Ok(Ok(stream)) => stream,
                        Ok(Err(error)) => {
                            tracing::debug!(%peer, %error, "TLS handshake failed");
                            return;
                        }
                        Err(_) => {
                            tracing::debug!(%peer, "TLS handshake timed out");
                            return;
                        }
                    };
                let builder = auto::Builder::new(TokioExecutor::new());
                let connection =
                    builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
                tokio::pin!(connection);
                let result = tokio::select! {
                    result = connection.as_mut() => result,
                    _ = stopping.changed() => {
                        connection.as_mut().graceful_shutdown();
                        connection.await
                    }
                };
                if let Err(error) = result {
                    tracing::debug!(%peer, %error, "HTTPS connection ended with an error");
                }
            });
        }
        drop(stop);
        let drained = tokio::time::timeout(SHUTDOWN_GRACE, async {
            while connections.join_next().await.is_some() {}
        })
        .await;
        if drained.is_err() {
            tracing::debug!(
                left = connections.len(),
                "HTTPS server: closing connections past the grace"
            );
        }
        Ok(())
    }
}

fn is_per_connection(error: &io::Error) -> bool {
    matches!(
        error.kind(),
        io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::Interrupted
    )
}
