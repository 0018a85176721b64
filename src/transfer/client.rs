//! The HTTP/2 side that uploads and downloads.

use std::fmt;
use std::net::SocketAddr;
use std::path::Path;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use futures_core::Stream;
use futures_util::StreamExt;
use http::header::CONTENT_LENGTH;
use http::{Method, Request, Response, StatusCode, Uri};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::client::conn::http2;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

use super::body::{self, ByteStream, TransferBody};
use super::{FILES, validate_file_name};
use crate::{BoxError, Error, ErrorKind};

/// The largest error body read from the server; the message is all that is
/// wanted from it.
const MAX_ERROR_BODY: usize = 64 * 1024;

/// Uploads to and downloads from a [`TransferServer`] over one HTTP/2
/// connection, with adaptive flow control.
///
/// Cloning is cheap and clones share the connection; transfers run
/// concurrently as separate HTTP/2 streams. Errors say whether to retry: a
/// lost connection is [`ErrorKind::Connection`], a `5xx`
/// [`ErrorKind::Unavailable`], an unknown file [`ErrorKind::NotFound`], a
/// `401` [`ErrorKind::Unauthorized`], any other refusal
/// [`ErrorKind::Rejected`].
///
/// [`TransferServer`]: super::TransferServer
#[derive(Clone)]
pub struct TransferClient {
    sender: http2::SendRequest<TransferBody>,
    base: String,
}

impl TransferClient {
    /// Connects to `address` with cleartext HTTP/2 (h2c, prior knowledge).
    pub async fn connect(address: SocketAddr) -> Result<Self, Error> {
        let stream = tokio::net::TcpStream::connect(address)
            .await
            .map_err(|error| {
                Error::new(
                    ErrorKind::Connection,
                    format!("cannot connect to {address}: {error}"),
                )
                .with_source(error)
            })?;
        let _ = stream.set_nodelay(true);
        Self::handshake(stream, format!("http://{address}")).await
    }

    /// Connects to `address` over TLS, checking the server's certificate for
    /// `server_name`, and speaks HTTP/2 once ALPN has agreed on `h2`.
    /// `config` must offer ALPN `h2`, as
    /// [`tls::client_config`](super::tls::client_config) does.
    #[cfg(feature = "file-transfer-tls")]
    pub async fn connect_tls(
        address: SocketAddr,
        server_name: &str,
        config: std::sync::Arc<rustls::ClientConfig>,
    ) -> Result<Self, Error> {
        super::tls::require_h2(&config.alpn_protocols)?;
        let name =
            rustls::pki_types::ServerName::try_from(server_name.to_owned()).map_err(|error| {
                Error::new(
                    ErrorKind::Config,
                    format!("invalid server name {server_name:?}: {error}"),
                )
            })?;
        let stream = tokio::net::TcpStream::connect(address)
            .await
            .map_err(|error| {
                Error::new(
                    ErrorKind::Connection,
                    format!("cannot connect to {address}: {error}"),
                )
                .with_source(error)
            })?;
        let _ = stream.set_nodelay(true);
        let stream = tokio_rustls::TlsConnector::from(config)
            .connect(name, stream)
            .await
            .map_err(|error| {
                // A certificate the client does not trust will not become
                // trusted by trying again; a reset handshake might.
                let kind = if error
                    .get_ref()
                    .is_some_and(|inner| inner.is::<rustls::Error>())
                {
                    ErrorKind::Rejected
                } else {
                    ErrorKind::Connection
                };
                Error::new(kind, format!("TLS handshake with {server_name}: {error}"))
                    .with_source(error)
            })?;
        if stream.get_ref().1.alpn_protocol() != Some(super::tls::H2) {
            return Err(Error::new(
                ErrorKind::Rejected,
                format!("{server_name} did not agree to HTTP/2 (ALPN h2)"),
            ));
        }
        Self::handshake(stream, format!("https://{server_name}")).await
    }

    /// Speaks HTTP/2 over an established byte stream (for example a TLS
    /// stream that negotiated `h2`); `base` is the scheme and authority the
    /// requests name, such as `https://files.internal`.
    pub async fn handshake<I>(io: I, base: impl Into<String>) -> Result<Self, Error>
    where
        I: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    {
        let (sender, connection) = http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .adaptive_window(true)
            .handshake(TokioIo::new(io))
            .await
            .map_err(connection_error)?;
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                tracing::debug!(%error, "transfer connection closed with an error");
            }
        });
        Ok(Self {
            sender,
            base: base.into(),
        })
    }

    /// Uploads `chunks` as `name` and returns the number of bytes the server
    /// stored. The next chunk is pulled only when flow control lets the
    /// previous one go, so a stream that reads lazily holds little memory.
    /// Chunks of any size, even empty ones, are fine: small ones are merged
    /// into frames of at least 1 KiB before they are sent.
    pub async fn upload<S, E>(&self, name: &str, chunks: S) -> Result<u64, Error>
    where
        S: Stream<Item = Result<Bytes, E>> + Send + 'static,
        E: Into<BoxError>,
    {
        #[derive(serde::Deserialize)]
        struct Stored {
            bytes: u64,
        }
        let response = self
            .send(Method::PUT, name, body::streaming(chunks))
            .await?;
        let answer = read_small(response.into_body()).await?;
        let stored: Stored = serde_json::from_slice(&answer).map_err(|error| {
            Error::new(
                ErrorKind::Unavailable,
                format!("unexpected upload answer: {error}"),
            )
        })?;
        Ok(stored.bytes)
    }

    /// Uploads the file at `path` as `name`, reading it a chunk at a time.
    pub async fn upload_file(&self, name: &str, path: impl AsRef<Path>) -> Result<u64, Error> {
        let (file, _) = body::open(path.as_ref()).await?;
        self.upload(name, body::file_chunks(file)).await
    }

    /// Downloads `name` as a stream of chunks.
    pub async fn download(&self, name: &str) -> Result<Download, Error> {
        let response = self.send(Method::GET, name, body::empty()).await?;
        let len = response
            .headers()
            .get(CONTENT_LENGTH)
            .and_then(|value| value.to_str().ok()?.parse().ok());
        Ok(Download {
            len,
            chunks: body::received(response.into_body()),
        })
    }

    /// Downloads `name` into the file at `path` (created or truncated) and
    /// returns the number of bytes written.
    pub async fn download_to_file(&self, name: &str, path: impl AsRef<Path>) -> Result<u64, Error> {
        let path = path.as_ref();
        let io = |error: std::io::Error| {
            Error::new(
                ErrorKind::Unavailable,
                format!("writing {}: {error}", path.display()),
            )
            .with_source(error)
        };
        let mut download = self.download(name).await?;
        let mut file = tokio::fs::File::create(path).await.map_err(io)?;
        let mut written = 0_u64;
        while let Some(chunk) = download.next().await {
            let chunk = chunk?;
            file.write_all(&chunk).await.map_err(io)?;
            written += chunk.len() as u64;
        }
        file.flush().await.map_err(io)?;
        Ok(written)
    }

    async fn send(
        &self,
        method: Method,
        name: &str,
        body: TransferBody,
    ) -> Result<Response<Incoming>, Error> {
        validate_file_name(name)?;
        let uri: Uri = format!("{}{FILES}{name}", self.base)
            .parse()
            .map_err(|error| {
                Error::new(ErrorKind::Config, format!("bad server address: {error}"))
            })?;
        let request = Request::builder()
            .method(method)
            .uri(uri)
            .body(body)
            .map_err(|error| Error::new(ErrorKind::Config, error.to_string()))?;
        let mut sender = self.sender.clone();
        sender.ready().await.map_err(connection_error)?;
        let response = sender
            .send_request(request)
            .await
            .map_err(connection_error)?;
        if response.status() == StatusCode::OK {
            return Ok(response);
        }
        let status = response.status();
        let kind = match status {
            StatusCode::NOT_FOUND => ErrorKind::NotFound,
            StatusCode::UNAUTHORIZED => ErrorKind::Unauthorized,
            status if status.is_server_error() => ErrorKind::Unavailable,
            _ => ErrorKind::Rejected,
        };
        let answer = read_small(response.into_body()).await.unwrap_or_default();
        let message = serde_json::from_slice::<serde_json::Value>(&answer)
            .ok()
            .and_then(|answer| Some(answer.get("error")?.as_str()?.to_owned()))
            .unwrap_or_else(|| String::from_utf8_lossy(&answer).into_owned());
        Err(Error::new(kind, format!("{status}: {message}")))
    }
}

impl fmt::Debug for TransferClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TransferClient")
            .field("base", &self.base)
            .finish_non_exhaustive()
    }
}

/// A download in progress: a [`Stream`] of chunks as they arrive.
///
/// Dropping it cancels the transfer (the HTTP/2 stream is reset).
pub struct Download {
    len: Option<u64>,
    chunks: ByteStream,
}

impl Download {
    /// The size the server announced (`content-length`), if it did.
    pub fn content_length(&self) -> Option<u64> {
        self.len
    }
}

impl Stream for Download {
    type Item = Result<Bytes, Error>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.chunks.as_mut().poll_next(cx)
    }
}

impl fmt::Debug for Download {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Download")
            .field("content_length", &self.len)
            .finish_non_exhaustive()
    }
}

async fn read_small(body: Incoming) -> Result<Bytes, Error> {
    let limited = http_body_util::Limited::new(body, MAX_ERROR_BODY);
    limited
        .collect()
        .await
        .map(|collected| collected.to_bytes())
        .map_err(|error| {
            Error::new(
                ErrorKind::Connection,
                format!("reading the answer: {error}"),
            )
        })
}

fn connection_error(error: hyper::Error) -> Error {
    Error::new(
        ErrorKind::Connection,
        format!("transfer connection: {error}"),
    )
    .with_source(error)
}
