//! The HTTP/2 side that uploads and downloads.

use std::fmt;
use std::net::SocketAddr;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use futures_core::Stream;
use futures_util::StreamExt;
use http::header::CONTENT_LENGTH;
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode, Uri};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use tokio::io::AsyncWriteExt;
use tower::ServiceExt;

use super::body::{self, ByteStream, TransferBody};
use super::builder::{BoxedExchange, TransferClientBuilder};
use super::connection::Connector;
use super::{FILES, validate_file_name};
use crate::{BoxError, Error, ErrorKind};

/// The largest error body read from the server; the message is all that is
/// wanted from it.
const MAX_ERROR_BODY: usize = 64 * 1024;

/// Uploads to and downloads from a [`TransferServer`] over one HTTP/2
/// connection, with adaptive flow control.
///
/// Built from a URL ([`builder`](TransferClient::builder), or
/// [`connect`](TransferClient::connect) for a plain `http://` address).
/// Cloning is cheap and clones share the connection; transfers run
/// concurrently as separate HTTP/2 streams.
///
/// **Reconnecting.** The connection is dialled on the first call and again
/// by the first call that finds it dead (the server restarted, the network
/// dropped it), within the [connect
/// timeout](TransferClientBuilder::connect_timeout); a request that had not
/// left on the dead connection is sent on the new one. So after a server
/// restart the next call succeeds, and a retry layer's attempts are not
/// wasted on a connection that is gone.
///
/// **Errors say whether to retry:** no connection (refused, or none within
/// the connect timeout) or a lost one is [`ErrorKind::Connection`]
/// (retryable: the next call dials again), a `5xx`
/// [`ErrorKind::Unavailable`], an unknown file [`ErrorKind::NotFound`], a
/// `401` [`ErrorKind::Unauthorized`], any other refusal
/// [`ErrorKind::Rejected`], and every call after
/// [`close`](TransferClient::close) [`ErrorKind::Closed`] (not retryable).
///
/// **Headers.** [`TransferClientBuilder::header`] sets headers for every
/// request (a bearer token), [`with_header`](TransferClient::with_header)
/// for the calls of one clone (a token per user), and
/// [`TransferClientBuilder::layer`] puts tower layers around each request
/// (trace context, metrics).
///
/// [`TransferServer`]: super::TransferServer
#[derive(Clone)]
pub struct TransferClient {
    connector: Arc<Connector>,
    exchange: BoxedExchange,
    headers: HeaderMap,
}

impl TransferClient {
    /// A builder for a client of the server at `url`: `http://host:port`
    /// (cleartext HTTP/2 with prior knowledge, h2c), or `https://host:port`
    /// with the `file-transfer-tls` feature and a
    /// [`tls_config`](TransferClientBuilder::tls_config).
    pub fn builder(url: impl Into<String>) -> TransferClientBuilder {
        TransferClientBuilder::new(url)
    }

    /// Connects to `http://{address}` with the defaults: a shorthand for
    /// `TransferClient::builder(format!("http://{address}")).connect()`.
    pub async fn connect(address: SocketAddr) -> Result<Self, Error> {
        Self::builder(format!("http://{address}")).connect().await
    }

    pub(super) fn from_parts(
        connector: Arc<Connector>,
        exchange: BoxedExchange,
        headers: HeaderMap,
    ) -> Self {
        Self {
            connector,
            exchange,
            headers,
        }
    }

    pub(super) fn connector(&self) -> &Connector {
        &self.connector
    }

    /// The server's scheme, host and port, as requests name them.
    pub fn url(&self) -> &str {
        self.connector.base()
    }

    /// How long a call waits for a new connection.
    pub fn connect_timeout(&self) -> std::time::Duration {
        self.connector.connect_timeout()
    }

    /// A clone that also sends `name: value` (replacing a header of that
    /// name) with each of its requests; the connection is still shared.
    ///
    /// ```
    /// use http::header::AUTHORIZATION;
    /// use switchboard::transfer::TransferClient;
    ///
    /// let client = TransferClient::builder("http://127.0.0.1:9000").build()?;
    /// let as_alice = client.with_header(AUTHORIZATION, http::HeaderValue::from_static("Bearer alice-token"));
    /// assert_eq!(as_alice.headers()[AUTHORIZATION], "Bearer alice-token");
    /// assert!(client.headers().is_empty());
    /// # Ok::<(), switchboard::Error>(())
    /// ```
    pub fn with_header(&self, name: HeaderName, value: HeaderValue) -> Self {
        let mut client = self.clone();
        client.headers.insert(name, value);
        client
    }

    /// The headers sent with each request of this clone.
    pub fn headers(&self) -> &HeaderMap {
        &self.headers
    }

    /// Closes the client and every clone of it: later calls fail with
    /// [`ErrorKind::Closed`] (not retryable), transfers in flight finish,
    /// and the connection closes after them.
    pub fn close(&self) {
        self.connector.close();
    }

    /// Whether [`close`](TransferClient::close) was called on this client or
    /// a clone.
    pub fn is_closed(&self) -> bool {
        self.connector.is_closed()
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
        let uri: Uri = format!("{}{FILES}{name}", self.url())
            .parse()
            .map_err(|error| {
                Error::new(ErrorKind::Config, format!("bad server address: {error}"))
            })?;
        let mut request = Request::builder()
            .method(method)
            .uri(uri)
            .body(body)
            .map_err(|error| Error::new(ErrorKind::Config, error.to_string()))?;
        request.headers_mut().extend(
            self.headers
                .iter()
                .map(|(name, value)| (name.clone(), value.clone())),
        );
        let response = self.exchange.clone().oneshot(request).await?;
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
            .field("url", &crate::transport::redact::redact_url(self.url()))
            .field("closed", &self.is_closed())
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
