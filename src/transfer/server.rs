//! The HTTP/2 side that serves a [`FileStore`].

use std::convert::Infallible;
use std::fmt;
use std::future::Future;
use std::sync::Arc;

use http::header::{CONTENT_LENGTH, CONTENT_TYPE};
use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::server::conn::http2;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;

use super::body::{self, SendBody};

#[cfg(feature = "file-transfer-tls")]
type Acceptor = tokio_rustls::TlsAcceptor;
/// Without TLS compiled in, there is no acceptor to pass.
#[cfg(not(feature = "file-transfer-tls"))]
type Acceptor = std::convert::Infallible;
use super::{FILES, FileStore, validate_file_name};
use crate::{Error, ErrorKind};

/// Serves `PUT /files/{name}` and `GET /files/{name}` from a [`FileStore`]
/// over HTTP/2 with adaptive flow control.
///
/// | request | answer |
/// |---|---|
/// | `PUT /files/{name}` with the content as body | `200` and `{"bytes": n}` once the store has it all |
/// | `GET /files/{name}` | `200` with the content streamed, `content-length` when known |
/// | unknown name | `404` |
/// | bad name | `400` |
/// | store failure | `500` |
///
/// Errors come back as `{"error": "..."}`. See the [module](super) docs for a
/// complete round trip.
#[derive(Clone)]
pub struct TransferServer {
    store: Arc<dyn FileStore>,
    builder: http2::Builder<TokioExecutor>,
}

impl TransferServer {
    /// A server for `store`, with adaptive flow control on.
    pub fn new(store: Arc<dyn FileStore>) -> Self {
        let mut builder = http2::Builder::new(TokioExecutor::new());
        builder.timer(TokioTimer::new()).adaptive_window(true);
        Self { store, builder }
    }

    /// Accepts connections on `listener` until `shutdown` completes, then
    /// stops accepting, lets the transfers in flight finish (HTTP/2 GOAWAY)
    /// and returns once every connection has closed.
    pub async fn serve(
        self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()>,
    ) -> Result<(), Error> {
        self.accept(listener, None, shutdown).await
    }

    /// Like [`serve`](TransferServer::serve), over TLS: each connection does
    /// the TLS handshake first. `config` must offer ALPN `h2`, as
    /// [`tls::server_config`](super::tls::server_config) does.
    #[cfg(feature = "file-transfer-tls")]
    pub async fn serve_tls(
        self,
        listener: TcpListener,
        config: Arc<rustls::ServerConfig>,
        shutdown: impl Future<Output = ()>,
    ) -> Result<(), Error> {
        super::tls::require_h2(&config.alpn_protocols)?;
        let acceptor = tokio_rustls::TlsAcceptor::from(config);
        self.accept(listener, Some(acceptor), shutdown).await
    }

    async fn accept(
        self,
        listener: TcpListener,
        tls: Option<Acceptor>,
        shutdown: impl Future<Output = ()>,
    ) -> Result<(), Error> {
        let (stop, stopping) = watch::channel(false);
        let mut connections = JoinSet::new();
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                () = &mut shutdown => break,
                accepted = listener.accept() => {
                    let (stream, peer) = match accepted {
                        Ok(accepted) => accepted,
                        // A failed accept (a peer that reset, too many open
                        // files) concerns one connection, not the server.
                        Err(error) => {
                            tracing::warn!(%error, "accepting a transfer connection failed");
                            continue;
                        }
                    };
                    let _ = stream.set_nodelay(true);
                    let server = self.clone();
                    let tls = tls.clone();
                    let mut stopping = stopping.clone();
                    connections.spawn(async move {
                        let stop = async move { stopping.wait_for(|stop| *stop).await.map(drop).ok(); };
                        if let Err(error) = server.serve_stream(stream, tls, stop).await {
                            tracing::debug!(%error, %peer, "transfer connection ended with an error");
                        }
                    });
                }
                Some(_) = connections.join_next(), if !connections.is_empty() => {}
            }
        }
        let _ = stop.send(true);
        while connections.join_next().await.is_some() {}
        Ok(())
    }

    async fn serve_stream(
        &self,
        stream: tokio::net::TcpStream,
        tls: Option<Acceptor>,
        stop: impl Future<Output = ()>,
    ) -> Result<(), Error> {
        match tls {
            None => self.serve_connection_until(stream, stop).await,
            #[cfg(feature = "file-transfer-tls")]
            Some(acceptor) => {
                let stream = acceptor.accept(stream).await.map_err(|error| {
                    Error::new(ErrorKind::Connection, format!("TLS handshake: {error}"))
                        .with_source(error)
                })?;
                self.serve_connection_until(stream, stop).await
            }
            #[cfg(not(feature = "file-transfer-tls"))]
            Some(never) => match never {},
        }
    }

    /// Serves one connection already accepted (for example a TLS stream)
    /// until the peer closes it.
    pub async fn serve_connection<I>(&self, io: I) -> Result<(), Error>
    where
        I: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    {
        self.serve_connection_until(io, std::future::pending())
            .await
    }

    async fn serve_connection_until<I>(
        &self,
        io: I,
        stop: impl Future<Output = ()>,
    ) -> Result<(), Error>
    where
        I: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    {
        let store = self.store.clone();
        let service = hyper::service::service_fn(move |request| {
            let store = store.clone();
            async move { Ok::<_, Infallible>(handle(store.as_ref(), request).await) }
        });
        let connection = self.builder.serve_connection(TokioIo::new(io), service);
        tokio::pin!(connection, stop);
        let ended = tokio::select! {
            ended = connection.as_mut() => ended,
            () = &mut stop => {
                connection.as_mut().graceful_shutdown();
                connection.await
            }
        };
        ended.map_err(|error| {
            Error::new(
                ErrorKind::Connection,
                format!("transfer connection: {error}"),
            )
            .with_source(error)
        })
    }
}

impl fmt::Debug for TransferServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TransferServer").finish_non_exhaustive()
    }
}

async fn handle(store: &dyn FileStore, request: Request<Incoming>) -> Response<SendBody> {
    let Some(name) = request.uri().path().strip_prefix(FILES).map(str::to_owned) else {
        return error_response(StatusCode::NOT_FOUND, "no such route; use /files/{name}");
    };
    if let Err(error) = validate_file_name(&name) {
        return error_response(StatusCode::BAD_REQUEST, error.message());
    }
    let outcome = match *request.method() {
        Method::PUT => {
            let chunks = body::received(request.into_body());
            store.put(&name, chunks).await.map(|bytes| {
                let mut response = Response::new(body::full(
                    serde_json::json!({ "bytes": bytes }).to_string(),
                ));
                response.headers_mut().insert(
                    CONTENT_TYPE,
                    http::HeaderValue::from_static("application/json"),
                );
                response
            })
        }
        Method::GET => store.get(&name).await.map(|(chunks, len)| {
            let mut response = Response::new(body::streaming(chunks));
            if let Some(len) = len {
                response.headers_mut().insert(CONTENT_LENGTH, len.into());
            }
            response
        }),
        _ => return error_response(StatusCode::METHOD_NOT_ALLOWED, "use PUT or GET"),
    };
    outcome.unwrap_or_else(|error| {
        let status = match error.kind() {
            ErrorKind::NotFound => StatusCode::NOT_FOUND,
            ErrorKind::Rejected => StatusCode::BAD_REQUEST,
            // The client went away mid-upload; it will not read this.
            ErrorKind::Connection => StatusCode::BAD_REQUEST,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        tracing::debug!(%error, %name, "transfer failed");
        error_response(status, error.message())
    })
}

fn error_response(status: StatusCode, message: &str) -> Response<SendBody> {
    let mut response = Response::new(body::full(
        serde_json::json!({ "error": message }).to_string(),
    ));
    *response.status_mut() = status;
    response.headers_mut().insert(
        CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    response
}
