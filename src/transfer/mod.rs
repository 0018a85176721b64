//! Streaming file upload and download over HTTP/2, in bounded memory.
//!
//! The strategy sends files over HTTP/2 (strategy §1.1) because it streams: a
//! file moves as a sequence of DATA frames under flow control, so neither
//! side ever needs the whole file in memory, and many transfers share one
//! connection. This module is that path, on hyper directly:
//!
//! * [`TransferService`] answers `PUT /files/{name}` (upload) and
//!   `GET /files/{name}` (download) from a [`FileStore`] — [`DirStore`] keeps
//!   files in a directory, and any other store (object storage, a hash
//!   checker) implements the trait. It is a tower `Service` over
//!   `http::Request`s, so the crate's layers go in front of it like in front
//!   of any HTTP service: [`AuthLayer`](crate::auth::AuthLayer) (only
//!   callers with a valid token transfer), the trace-context layer
//!   (`observe::trace::ExtractTraceContextLayer`, feature `otel`), metrics,
//!   limits.
//!   What it refuses, by default: an upload over [`DEFAULT_MAX_UPLOAD`]
//!   (`413`, [`TransferService::with_max_upload`]), an upload over an
//!   existing name (`409`, [`TransferService::with_overwrite`]) and a name
//!   [`validate_file_name`] refuses (`400`). Its error answers never carry
//!   the store's message, which may name the server's paths.
//! * [`TransferServer`] accepts connections and serves that service, bare
//!   ([`TransferServer::new`]) or wrapped in layers
//!   ([`TransferServer::with_service`]; an example with `AuthLayer` is
//!   there).
//! * [`TransferClient`] uploads any byte stream or file and downloads as a
//!   stream ([`Download`]) or straight into a file. It is built from a URL
//!   ([`TransferClient::builder`]), sends headers of your choice (a bearer
//!   token for every request or per clone, [`TransferClient::with_header`])
//!   and runs each request through the tower layers it was built with
//!   ([`TransferClientBuilder::layer`]: trace context, metrics).
//!
//! **Reconnecting.** The client keeps one HTTP/2 connection and dials it
//! again when a call finds it dead — after a server restart, the next call
//! succeeds through the same client. Dialling is bounded by the connect
//! timeout ([`DEFAULT_CONNECT_TIMEOUT`], 10 s, set with
//! [`TransferClientBuilder::connect_timeout`]); a call that cannot connect
//! fails with a retryable [`ErrorKind::Connection`], because the next call
//! dials again, and every call after [`TransferClient::close`] fails with
//! [`ErrorKind::Closed`], which is not retryable.
//!
//! Memory stays bounded because every stage pulls: the sender reads the next
//! chunk (at most [`CHUNK_SIZE`] from a file) only after the previous one has
//! been handed to HTTP/2 within its flow-control window (small chunks that
//! are ready together are merged into one DATA frame of up to 16 KiB, and a
//! frame under 1 KiB waits for more unless the stream ends, because the
//! receiving HTTP/2 stack closes a connection that sends it too many small
//! frames), and the receiver
//! releases window only as it consumes chunks, so a slow disk slows the
//! sender instead of filling a buffer. Both ends use hyper's
//! adaptive flow control, which sizes the window to the measured
//! bandwidth-delay product instead of the spec's 64 KiB default, so a fast
//! link is not throttled by a window that is too small.
//!
//! [`TransferServer::serve`] and an `http://` client speak cleartext HTTP/2
//! with prior knowledge (h2c); with the `file-transfer-tls` feature,
//! `TransferServer::serve_tls` and an `https://` client (with
//! `TransferClientBuilder::tls_config`) speak it over TLS (rustls on
//! aws-lc-rs, ALPN `h2`), configured by the `tls` module.
//! [`TransferServer::serve_connection`] serves any byte stream, for other
//! setups.
//!
//! Flow control and bounded memory hold through layers that pass the
//! request body on as it is (as `AuthLayer` and the trace layers do): the
//! body is still read only as the store pulls it.
//!
//! ```
//! use std::sync::Arc;
//! use bytes::Bytes;
//! use futures_util::TryStreamExt;
//! use switchboard::transfer::{DirStore, TransferClient, TransferServer};
//!
//! # tokio::runtime::Runtime::new().unwrap().block_on(async {
//! let dir = std::env::temp_dir().join(format!("transfer-doc-{}", uuid::Uuid::new_v4()));
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
//! let address = listener.local_addr()?;
//! let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
//! let server = tokio::spawn(
//!     TransferServer::new(Arc::new(DirStore::new(&dir).await?))
//!         .serve(listener, async { stopped.await.ok(); }),
//! );
//!
//! let client = TransferClient::builder(format!("http://{address}")).connect().await?;
//! let chunks = futures_util::stream::iter([Ok::<_, std::io::Error>(Bytes::from("hello, ")), Ok(Bytes::from("world"))]);
//! assert_eq!(client.upload("greeting.txt", chunks).await?, 12);
//!
//! let received: Vec<Bytes> = client.download("greeting.txt").await?.try_collect().await?;
//! assert_eq!(received.concat(), b"hello, world");
//!
//! stop.send(()).ok();
//! client.close();
//! server.await.unwrap()?;
//! tokio::fs::remove_dir_all(&dir).await?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! # }).unwrap();
//! ```

mod body;
mod builder;
mod client;
mod connection;
mod server;
mod service;
mod store;
#[cfg(feature = "file-transfer-tls")]
pub mod tls;

pub use body::{ByteStream, CHUNK_SIZE, TransferBody, file_chunks};
pub use builder::{BoxedExchange, DEFAULT_CONNECT_TIMEOUT, TransferClientBuilder};
pub use client::{Download, TransferClient};
pub use server::TransferServer;
pub use service::{DEFAULT_MAX_UPLOAD, ResponseFuture, TransferService};
pub use store::{DirStore, FileStore};

use crate::{Error, ErrorKind};

/// The path prefix under which files are served.
const FILES: &str = "/files/";

/// Checks a file name: 1 to 255 ASCII letters, digits or `. _ -`, not
/// starting with a dot. The name is used as a path segment on the server, so
/// this is what keeps `../` and hidden files out.
///
/// ```
/// use switchboard::transfer::validate_file_name;
///
/// assert!(validate_file_name("report-2026.csv").is_ok());
/// assert!(validate_file_name("../etc/passwd").is_err());
/// assert!(validate_file_name(".hidden").is_err());
/// ```
pub fn validate_file_name(name: &str) -> Result<(), Error> {
    let allowed = |b: u8| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-');
    if name.is_empty() || name.len() > 255 || name.starts_with('.') || !name.bytes().all(allowed) {
        return Err(Error::new(
            ErrorKind::Rejected,
            format!(
                "invalid file name {name:?}: use 1 to 255 ASCII letters, digits or . _ -, not starting with a dot"
            ),
        ));
    }
    Ok(())
}
