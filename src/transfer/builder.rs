//! Building a [`TransferClient`] from a URL.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderMap, HeaderName, HeaderValue, Request, Response, Uri};
use hyper::body::Incoming;
use tower::util::BoxCloneSyncService;
use tower::{Layer, Service};

use super::TransferClient;
use super::body::TransferBody;
use super::connection::{Connector, Exchange, Target};
use crate::{Error, ErrorKind};

/// How long a call waits for a new connection (TCP, TLS and the HTTP/2
/// handshake) unless [`TransferClientBuilder::connect_timeout`] says
/// otherwise.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// What the layers of [`TransferClientBuilder::layer`] wrap: the exchange of
/// one request (its head and streaming body) for the response head and a
/// streaming body, on the client's connection, boxed.
pub type BoxedExchange = BoxCloneSyncService<Request<TransferBody>, Response<Incoming>, Error>;

type Wrap = Box<dyn FnOnce(BoxedExchange) -> BoxedExchange + Send>;

/// Configures a [`TransferClient`]; from [`TransferClient::builder`].
///
/// ```
/// use std::time::Duration;
/// use http::header::AUTHORIZATION;
/// use switchboard::transfer::TransferClient;
///
/// let client = TransferClient::builder("http://files.internal:8443")
///     .connect_timeout(Duration::from_secs(3))
///     .header(AUTHORIZATION, http::HeaderValue::from_static("Bearer abc"))
///     .build()?;
/// assert_eq!(client.url(), "http://files.internal:8443");
/// # Ok::<(), switchboard::Error>(())
/// ```
pub struct TransferClientBuilder {
    url: String,
    connect_timeout: Duration,
    headers: HeaderMap,
    wrap: Wrap,
    #[cfg(feature = "file-transfer-tls")]
    tls: Option<Arc<rustls::ClientConfig>>,
    #[cfg(feature = "file-transfer-tls")]
    server_name: Option<String>,
}

impl TransferClientBuilder {
    pub(super) fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            headers: HeaderMap::new(),
            wrap: Box::new(|exchange| exchange),
            #[cfg(feature = "file-transfer-tls")]
            tls: None,
            #[cfg(feature = "file-transfer-tls")]
            server_name: None,
        }
    }

    /// How long a call may wait for a new connection when there is none or
    /// the old one died: TCP connect, TLS and the HTTP/2 handshake together
    /// ([`DEFAULT_CONNECT_TIMEOUT`] unless set). Past it the call fails with
    /// a retryable [`ErrorKind::Connection`].
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// A header sent with every request, such as `authorization`;
    /// [`TransferClient::with_header`] adds or replaces headers for some
    /// calls only.
    pub fn header(mut self, name: HeaderName, value: HeaderValue) -> Self {
        self.headers.insert(name, value);
        self
    }

    /// Wraps the exchange of every request (the `http::Request` with its
    /// streaming body, and the response head) in `layer`, for example
    /// [`InjectTraceContextLayer`](crate::observe::trace::InjectTraceContextLayer)
    /// (feature `otel`) or a metrics layer. The first layer given is the
    /// outermost, as with `tower::ServiceBuilder`.
    pub fn layer<L>(mut self, layer: L) -> Self
    where
        L: Layer<BoxedExchange> + Send + 'static,
        L::Service: Service<Request<TransferBody>, Response = Response<Incoming>, Error = Error>
            + Clone
            + Send
            + Sync
            + 'static,
        <L::Service as Service<Request<TransferBody>>>::Future: Send + 'static,
    {
        let outer = self.wrap;
        self.wrap = Box::new(move |inner| outer(BoxCloneSyncService::new(layer.layer(inner))));
        self
    }

    /// The TLS config for an `https://` URL; it must offer ALPN `h2`, as
    /// [`tls::client_config`](super::tls::client_config) does.
    #[cfg(feature = "file-transfer-tls")]
    pub fn tls_config(mut self, config: Arc<rustls::ClientConfig>) -> Self {
        self.tls = Some(config);
        self
    }

    /// The name the server's certificate must be valid for, when it is not
    /// the URL's host (for example a URL with an IP address).
    #[cfg(feature = "file-transfer-tls")]
    pub fn tls_server_name(mut self, name: impl Into<String>) -> Self {
        self.server_name = Some(name.into());
        self
    }

    /// The client, which dials on its first call. Fails with
    /// [`ErrorKind::Config`] for a URL that is not `http://host[:port]`
    /// (or `https://` with the `file-transfer-tls` feature and a
    /// [`tls_config`](Self::tls_config)).
    pub fn build(self) -> Result<TransferClient, Error> {
        let target = self.target()?;
        let connector = Arc::new(Connector::new(target, self.connect_timeout));
        let exchange = (self.wrap)(BoxCloneSyncService::new(Exchange::new(connector.clone())));
        Ok(TransferClient::from_parts(
            connector,
            exchange,
            self.headers,
        ))
    }

    /// The client, connected: like [`build`](Self::build), and dials once so
    /// that an unreachable server shows now (retryable
    /// [`ErrorKind::Connection`]) rather than on the first call.
    pub async fn connect(self) -> Result<TransferClient, Error> {
        let client = self.build()?;
        client.connector().sender().await?;
        Ok(client)
    }

    fn target(&self) -> Result<Target, Error> {
        let bad = |why: &str| {
            Error::new(
                ErrorKind::Config,
                format!(
                    "bad transfer URL {:?}: {why}",
                    crate::transport::redact::redact_url(&self.url)
                ),
            )
        };
        let uri: Uri = self.url.parse().map_err(|error| bad(&format!("{error}")))?;
        if uri
            .path_and_query()
            .is_some_and(|path| path.as_str() != "/")
        {
            return Err(bad("give only the scheme, host and port"));
        }
        let authority = uri.authority().ok_or_else(|| bad("no host"))?;
        if authority.as_str().contains('@') {
            return Err(bad("user info is not supported"));
        }
        let host = authority.host();
        let https = match uri.scheme_str() {
            Some("http") => false,
            Some("https") => true,
            _ => return Err(bad("use http:// or https://")),
        };
        let port = authority.port_u16().unwrap_or(if https { 443 } else { 80 });
        // `[::1]` in a URL, `::1` to connect.
        let dial_host = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        let base = format!("{}://{host}:{port}", if https { "https" } else { "http" });
        if !https {
            return Ok(Target {
                base,
                host: dial_host,
                port,
                #[cfg(feature = "file-transfer-tls")]
                tls: None,
            });
        }
        #[cfg(feature = "file-transfer-tls")]
        {
            let config = self.tls.clone().ok_or_else(|| {
                bad("https:// needs a TLS config (TransferClientBuilder::tls_config)")
            })?;
            super::tls::require_h2(&config.alpn_protocols)?;
            let name = self
                .server_name
                .clone()
                .unwrap_or_else(|| dial_host.clone());
            let server_name =
                rustls::pki_types::ServerName::try_from(name.clone()).map_err(|error| {
                    Error::new(
                        ErrorKind::Config,
                        format!("invalid server name {name:?}: {error}"),
                    )
                })?;
            Ok(Target {
                base,
                host: dial_host,
                port,
                tls: Some(super::connection::Tls {
                    name: server_name,
                    config,
                }),
            })
        }
        #[cfg(not(feature = "file-transfer-tls"))]
        {
            let _ = (base, dial_host);
            Err(bad("https:// needs the file-transfer-tls feature"))
        }
    }
}

impl fmt::Debug for TransferClientBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TransferClientBuilder")
            .field("url", &crate::transport::redact::redact_url(&self.url))
            .field("connect_timeout", &self.connect_timeout)
            .finish_non_exhaustive()
    }
}
