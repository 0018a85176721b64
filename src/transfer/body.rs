//! Byte streams in and out of hyper bodies, one bounded chunk at a time.

use std::path::Path;
use std::pin::Pin;

use bytes::{Bytes, BytesMut};
use futures_core::Stream;
use futures_util::{StreamExt, TryStreamExt};
use http_body::Frame;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyDataStream, BodyExt, Empty, Full, StreamBody};
use hyper::body::Incoming;
use tokio::io::{AsyncRead, AsyncReadExt};

use crate::{BoxError, Error, ErrorKind};

/// The size of the chunks read from a file: big enough that per-chunk
/// overhead is small, small enough that a few in flight cost little memory.
pub const CHUNK_SIZE: usize = 64 * 1024;

/// A stream of file chunks, as uploads arrive at a [`FileStore`] and
/// downloads leave it.
///
/// [`FileStore`]: super::FileStore
pub type ByteStream = Pin<Box<dyn Stream<Item = Result<Bytes, Error>> + Send + 'static>>;

/// The body type both ends send: a boxed stream of data frames.
pub(super) type SendBody = UnsyncBoxBody<Bytes, Error>;

pub(super) fn empty() -> SendBody {
    Empty::new().map_err(|never| match never {}).boxed_unsync()
}

pub(super) fn full(bytes: impl Into<Bytes>) -> SendBody {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed_unsync()
}

pub(super) fn streaming<S, E>(chunks: S) -> SendBody
where
    S: Stream<Item = Result<Bytes, E>> + Send + 'static,
    E: Into<BoxError>,
{
    StreamBody::new(
        chunks
            .map_ok(Frame::data)
            .map_err(|error| Error::from(error.into())),
    )
    .boxed_unsync()
}

/// A received body as chunks, in the order and sizes the frames arrived.
/// A body that breaks off midway ends with a [`ErrorKind::Connection`] error.
pub(super) fn received(body: Incoming) -> ByteStream {
    BodyDataStream::new(body)
        .map_err(|error| {
            Error::new(
                ErrorKind::Connection,
                format!("the transfer broke off: {error}"),
            )
            .with_source(error)
        })
        .boxed()
}

/// Reads `reader` in chunks of at most [`CHUNK_SIZE`], one chunk at a time:
/// the next read happens only when the consumer asks for the next chunk.
pub fn file_chunks<R>(reader: R) -> ByteStream
where
    R: AsyncRead + Send + Unpin + 'static,
{
    futures_util::stream::try_unfold(reader, |mut reader| async move {
        let mut chunk = BytesMut::with_capacity(CHUNK_SIZE);
        while chunk.len() < CHUNK_SIZE {
            if reader.read_buf(&mut chunk).await.map_err(read_error)? == 0 {
                break;
            }
        }
        Ok(if chunk.is_empty() {
            None
        } else {
            Some((chunk.freeze(), reader))
        })
    })
    .boxed()
}

fn read_error(error: std::io::Error) -> Error {
    Error::new(ErrorKind::Unavailable, format!("reading the file: {error}")).with_source(error)
}

pub(super) async fn open(path: &Path) -> Result<(tokio::fs::File, u64), Error> {
    let file = tokio::fs::File::open(path).await.map_err(|error| {
        let kind = if error.kind() == std::io::ErrorKind::NotFound {
            ErrorKind::NotFound
        } else {
            ErrorKind::Unavailable
        };
        Error::new(kind, format!("opening {}: {error}", path.display())).with_source(error)
    })?;
    let len = file.metadata().await.map_err(read_error)?.len();
    Ok((file, len))
}
