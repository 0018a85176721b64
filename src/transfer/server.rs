//! The HTTP/2 serving loop: accepts connections and serves a tower service
//! (by default a [`TransferService`]) on each.

use std::fmt;
use std::future::Future;
use std::sync::Arc;

use http::{Request, Response};
use http_body::Body;
use hyper::body::Incoming;
use hyper::server::conn::http2;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tower::{Service, ServiceExt};

use super::{FileStore, TransferService};

#[cfg(feature = "file-transfer-tls")]
type Acceptor = tokio_rustls::TlsAcceptor;
/// Without TLS compiled in, there is no acceptor to pass.
#[cfg(not(feature = "file-transfer-tls"))]
#[derive(Clone)]
enum Acceptor {}
use crate::{BoxError, Error, ErrorKind};

/// Accepts HTTP/2 connections and serves a tower [`Service`] on each, with
/// adaptive flow control: by default a [`TransferService`] over a
/// [`FileStore`] ([`new`](TransferServer::new)), or that service wrapped in
/// any layers ([`with_service`](TransferServer::with_service)) — for example
/// [`AuthLayer`](crate::auth::AuthLayer) so that only callers with a valid
/// token can upload or download, the trace-context layer, or a metrics
/// layer.
///
/// ```
/// # #[cfg(feature = "auth")]
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// use std::sync::Arc;
/// use http::header::AUTHORIZATION;
/// use switchboard::auth::{AuthLayer, TokenVerifier};
/// use switchboard::transfer::{DirStore, TransferClient, TransferServer, TransferService};
/// use switchboard::ErrorKind;
/// use tower::ServiceBuilder;
///
/// # tokio::runtime::Runtime::new().unwrap().block_on(async {
/// # // The Auth service's key pair and one of its tokens, made here.
/// # let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519)?;
/// # let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_secs();
/// # let token = jsonwebtoken::encode(
/// #     &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::EdDSA),
/// #     &serde_json::json!({ "sub": "reporter", "iss": "auth", "aud": "files", "exp": now + 600 }),
/// #     &jsonwebtoken::EncodingKey::from_ed_pem(key.serialize_pem().as_bytes())?,
/// # )?;
/// let verifier = Arc::new(
///     TokenVerifier::ed25519_pem(key.public_key_pem().as_bytes(), "auth")?.with_audience("files"),
/// );
/// let dir = std::env::temp_dir().join(format!("transfer-auth-doc-{}", uuid::Uuid::new_v4()));
/// let files = TransferService::new(Arc::new(DirStore::new(&dir).await?));
/// let service = ServiceBuilder::new().layer(AuthLayer::new(verifier)).service(files);
///
/// let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
/// let url = format!("http://{}", listener.local_addr()?);
/// let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
/// let server = tokio::spawn(
///     TransferServer::with_service(service).serve(listener, async { stopped.await.ok(); }),
/// );
///
/// // No token: `401`, before the store is touched.
/// let client = TransferClient::builder(&url).connect().await?;
/// let chunks = futures_util::stream::iter([Ok::<_, std::io::Error>(bytes::Bytes::from("q3"))]);
/// let refused = client.upload("report.csv", chunks).await.unwrap_err();
/// assert_eq!(refused.kind(), ErrorKind::Unauthorized);
/// assert!(refused.message().starts_with("401"));
///
/// // With the bearer token: stored.
/// let authorized = client.with_header(AUTHORIZATION, format!("Bearer {token}").parse()?);
/// let chunks = futures_util::stream::iter([Ok::<_, std::io::Error>(bytes::Bytes::from("q3"))]);
/// assert_eq!(authorized.upload("report.csv", chunks).await?, 2);
///
/// stop.send(()).ok();
/// client.close();
/// server.await.unwrap()?;
/// tokio::fs::remove_dir_all(&dir).await?;
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// # })
/// # }
/// # #[cfg(not(feature = "auth"))]
/// # fn main() {}
/// ```
#[derive(Clone)]
pub struct TransferServer<S = TransferService> {
    service: S,
    builder: http2::Builder<TokioExecutor>,
}

impl TransferServer {
    /// A server for `store`, with adaptive flow control on.
    pub fn new(store: Arc<dyn FileStore>) -> Self {
        Self::with_service(TransferService::new(store))
    }
}

impl<S, B> TransferServer<S>
where
    S: Service<Request<Incoming>, Response = Response<B>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    /// A server for any tower service over `http::Request<Incoming>`,
    /// typically a [`TransferService`] wrapped in layers; adaptive flow
    /// control on. Each request gets its own clone of `service`, which is
    /// asked to be ready before it is called.
    pub fn with_service(service: S) -> Self {
        let mut builder = http2::Builder::new(TokioExecutor::new());
        builder.timer(TokioTimer::new()).adaptive_window(true);
        Self { service, builder }
    }

    /// The service each request goes to.
    pub fn service(&self) -> &S {
        &self.service
    }

    /// Accepts connections on `listener` until `shutdown` completes, then
    /// stops accepting (and closes `listener`, so a new server may bind its
    /// port), lets the transfers in flight finish (HTTP/2 GOAWAY) and
    /// returns once every connection has closed.
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
        // The port is free as soon as accepting stops, not once the last
        // transfer has drained: a new server can bind it meanwhile.
        drop(listener);
        let _ = stop.send(true);
        while connections.join_next().await.is_some() {}
        Ok(())
    }

    // `self` by value here and below: a spawned connection owns its server,
    // so the service need not be `Sync`.
    async fn serve_stream(
        self,
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
    pub fn serve_connection<I>(&self, io: I) -> impl Future<Output = Result<(), Error>> + Send
    where
        I: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    {
        self.clone()
            .serve_connection_until(io, std::future::pending())
    }

    async fn serve_connection_until<I>(
        self,
        io: I,
        stop: impl Future<Output = ()>,
    ) -> Result<(), Error>
    where
        I: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    {
        let service = self.service;
        // tower's `poll_ready` before every `call`, in hyper's `&self` style.
        let service = hyper::service::service_fn(move |request: Request<Incoming>| {
            let mut service = service.clone();
            async move {
                service.ready().await?;
                service.call(request).await
            }
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

impl<S: fmt::Debug> fmt::Debug for TransferServer<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TransferServer")
            .field("service", &self.service)
            .finish_non_exhaustive()
    }
}
