//! Byte streams in and out of hyper bodies, one bounded chunk at a time.

use std::path::Path;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use futures_core::Stream;
use futures_util::{StreamExt, TryStreamExt};
use http_body::{Body, Frame};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyDataStream, BodyExt, Empty, Full, StreamBody};
use pin_project_lite::pin_project;
use tokio::io::{AsyncRead, AsyncReadExt};

use crate::{BoxError, Error, ErrorKind};

/// The size of the chunks read from a file: big enough that per-chunk
/// overhead is small, small enough that a few in flight cost little memory.
pub const CHUNK_SIZE: usize = 64 * 1024;

/// The size up to which chunks that are ready together are merged into one
/// DATA frame: the HTTP/2 default `SETTINGS_MAX_FRAME_SIZE`, so a merged
/// chunk still fits one frame and a big chunk is not copied for nothing.
const FRAME_TARGET: usize = 16 * 1024;

/// The smallest DATA frame sent while the source is not ready, except the
/// last one. The receiving h2 (0.4.20 and later) charges every non-final
/// DATA frame under 256 bytes still buffered unread against a
/// connection-wide budget of about 32 KiB, and closes the connection with
/// `GOAWAY ENHANCE_YOUR_CALM` ("too_many_data_frames") once it is spent: at
/// 40 bytes a frame, some 150 frames the reader has not taken yet, far less
/// than one flow-control window. Frames at or above 256 bytes cost nothing;
/// 1 KiB leaves a margin for frames that HTTP/2 splits at the edge of a
/// window.
const MIN_FRAME: usize = 1024;

/// A stream of file chunks, as uploads arrive at a [`FileStore`] and
/// downloads leave it.
///
/// [`FileStore`]: super::FileStore
pub type ByteStream = Pin<Box<dyn Stream<Item = Result<Bytes, Error>> + Send + 'static>>;

/// The body both ends send: a boxed stream of data frames. It is the
/// response body of [`TransferService`](super::TransferService) and the
/// request body a [`TransferClient`](super::TransferClient) hands to the
/// layers it was built with. `Default` is an empty body, which is what
/// [`Auth`](crate::auth::Auth) answers a refused request with.
pub type TransferBody = UnsyncBoxBody<Bytes, Error>;

pub(super) fn empty() -> TransferBody {
    Empty::new().map_err(|never| match never {}).boxed_unsync()
}

pub(super) fn full(bytes: impl Into<Bytes>) -> TransferBody {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed_unsync()
}

/// A body sending `chunks`, small ones merged into bigger frames (see
/// [`Coalesce`]): one DATA frame per chunk would let a source of many small
/// chunks exhaust the receiver's small-frame budget.
pub(super) fn streaming<S, E>(chunks: S) -> TransferBody
where
    S: Stream<Item = Result<Bytes, E>> + Send + 'static,
    E: Into<BoxError>,
{
    StreamBody::new(
        Coalesce::new(chunks)
            .map_ok(Frame::data)
            .map_err(|error| Error::from(error.into())),
    )
    .boxed_unsync()
}

pin_project! {
    /// Merges small chunks into frames: chunks that are ready one after the
    /// other are gathered up to [`FRAME_TARGET`]; when the source has to
    /// wait, what is gathered goes out only if it is at least [`MIN_FRAME`]
    /// (the end of the stream sends whatever is left). Empty chunks are
    /// dropped: each would be an empty DATA frame, and h2 closes a
    /// connection after 100 of those. A chunk of [`FRAME_TARGET`] or more
    /// is passed on as it is, without a copy.
    ///
    /// At most about two [`FRAME_TARGET`]s are held, so memory stays
    /// bounded; the source is still only polled when HTTP/2 asks for the
    /// next frame.
    struct Coalesce<S> {
        #[pin]
        chunks: S,
        gathered: BytesMut,
        // A big chunk that arrived after small ones: it goes out as the next
        // frame, after the gathered ones.
        held: Option<Bytes>,
        done: bool,
    }
}

impl<S> Coalesce<S> {
    fn new(chunks: S) -> Self {
        Self {
            chunks,
            gathered: BytesMut::new(),
            held: None,
            done: false,
        }
    }
}

impl<S, E> Stream for Coalesce<S>
where
    S: Stream<Item = Result<Bytes, E>>,
{
    type Item = Result<Bytes, E>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let mut this = self.project();
        if let Some(held) = this.held.take() {
            return Poll::Ready(Some(Ok(held)));
        }
        while !*this.done {
            match this.chunks.as_mut().poll_next(cx) {
                Poll::Ready(Some(Ok(chunk))) => {
                    if chunk.is_empty() {
                        continue;
                    }
                    if chunk.len() >= FRAME_TARGET {
                        if this.gathered.is_empty() {
                            return Poll::Ready(Some(Ok(chunk)));
                        }
                        // The gathered bytes go first, however few: the big
                        // chunk right behind them gives back more budget
                        // than a small frame takes.
                        *this.held = Some(chunk);
                        return Poll::Ready(Some(Ok(this.gathered.split().freeze())));
                    }
                    this.gathered.extend_from_slice(&chunk);
                    if this.gathered.len() >= FRAME_TARGET {
                        return Poll::Ready(Some(Ok(this.gathered.split().freeze())));
                    }
                }
                // The transfer is broken off either way; the gathered bytes
                // would only be thrown away by the receiver.
                Poll::Ready(Some(Err(error))) => {
                    *this.done = true;
                    this.gathered.clear();
                    return Poll::Ready(Some(Err(error)));
                }
                Poll::Ready(None) => *this.done = true,
                Poll::Pending if this.gathered.len() >= MIN_FRAME => {
                    return Poll::Ready(Some(Ok(this.gathered.split().freeze())));
                }
                Poll::Pending => return Poll::Pending,
            }
        }
        Poll::Ready((!this.gathered.is_empty()).then(|| Ok(this.gathered.split().freeze())))
    }
}

/// A received body as chunks, in the order and sizes the frames arrived.
/// A body that breaks off midway ends with a [`ErrorKind::Connection`] error.
pub(super) fn received<B>(body: B) -> ByteStream
where
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    BodyDataStream::new(body)
        .map_err(|error| {
            let error = error.into();
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

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;
    use std::convert::Infallible;
    use std::fmt;

    use super::*;

    /// A source that answers each poll with the next scripted step, so that
    /// where it is not ready is exact.
    fn scripted(
        steps: impl IntoIterator<Item = Poll<Option<Result<Bytes, &'static str>>>>,
    ) -> impl Stream<Item = Result<Bytes, &'static str>> {
        let mut steps: VecDeque<_> = steps.into_iter().collect();
        futures_util::stream::poll_fn(move |_| steps.pop_front().unwrap_or(Poll::Ready(None)))
    }

    fn ready(len: usize) -> Poll<Option<Result<Bytes, &'static str>>> {
        Poll::Ready(Some(Ok(Bytes::from(vec![b'x'; len]))))
    }

    /// Polls `stream` once with a waker that does nothing.
    fn poll_once<S: Stream + Unpin>(stream: &mut S) -> Poll<Option<S::Item>> {
        Pin::new(stream).poll_next(&mut Context::from_waker(std::task::Waker::noop()))
    }

    fn frame<E: fmt::Debug>(poll: Poll<Option<Result<Bytes, E>>>) -> usize {
        match poll {
            Poll::Ready(Some(Ok(frame))) => frame.len(),
            other => panic!("expected a frame, got {other:?}"),
        }
    }

    #[test]
    fn ready_small_chunks_become_full_frames_and_empty_ones_vanish() {
        let chunks =
            (0..5_000).map(|i| Ok::<_, Infallible>(Bytes::from(vec![i as u8; 40 * (i % 2)])));
        let mut frames = Coalesce::new(futures_util::stream::iter(chunks));
        let mut lens = Vec::new();
        while let Poll::Ready(Some(frame)) = poll_once(&mut frames) {
            lens.push(frame.unwrap().len());
        }
        // 2 500 chunks of 40 bytes: frames of the first 410 chunks past
        // 16 KiB (16 400 bytes), and the rest at the end.
        let mut expected = vec![16_400; 6];
        expected.push(100_000 - 6 * 16_400);
        assert_eq!(lens, expected);
    }

    #[test]
    fn a_source_that_waits_sends_nothing_under_the_minimum_frame() {
        let mut frames = Coalesce::new(scripted([
            ready(40),
            Poll::Pending,
            ready(MIN_FRAME - 41),
            Poll::Pending,
            ready(1),
            Poll::Pending,
            ready(40),
            Poll::Pending,
        ]));
        assert!(poll_once(&mut frames).is_pending());
        assert!(poll_once(&mut frames).is_pending());
        assert_eq!(frame(poll_once(&mut frames)), MIN_FRAME);
        assert!(poll_once(&mut frames).is_pending());
        // The end sends what is left, however little.
        assert_eq!(frame(poll_once(&mut frames)), 40);
        assert!(matches!(poll_once(&mut frames), Poll::Ready(None)));
    }

    #[test]
    fn a_big_chunk_goes_out_whole_after_the_gathered_ones() {
        let big = Bytes::from(vec![7_u8; CHUNK_SIZE]);
        let mut frames = Coalesce::new(scripted([
            ready(100),
            Poll::Ready(Some(Ok(big.clone()))),
            Poll::Ready(Some(Ok(big.clone()))),
        ]));
        assert_eq!(frame(poll_once(&mut frames)), 100);
        for _ in 0..2 {
            match poll_once(&mut frames) {
                // The same allocation: passed on, not copied.
                Poll::Ready(Some(Ok(frame))) => assert_eq!(frame.as_ptr(), big.as_ptr()),
                other => panic!("expected the big chunk, got {other:?}"),
            }
        }
        assert!(matches!(poll_once(&mut frames), Poll::Ready(None)));
    }

    #[test]
    fn an_error_ends_the_stream() {
        let mut frames = Coalesce::new(scripted([
            ready(100),
            Poll::Ready(Some(Err("the disk failed"))),
            ready(100),
        ]));
        assert!(matches!(
            poll_once(&mut frames),
            Poll::Ready(Some(Err("the disk failed")))
        ));
        assert!(matches!(poll_once(&mut frames), Poll::Ready(None)));
    }
}
