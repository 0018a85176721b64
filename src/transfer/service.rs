//! The file routes as a tower service, so that any layer for
//! `http::Request`s (authentication, trace context, metrics, limits) can be
//! put in front of them.

use std::convert::Infallible;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};

use bytes::Bytes;
use http::header::{CONTENT_LENGTH, CONTENT_TYPE};
use http::{Method, Request, Response, StatusCode};
use http_body::Body;
use tower::Service;

use super::body::{self, ByteStream, TransferBody};
use super::{FILES, FileStore, validate_file_name};
use crate::{BoxError, Error, ErrorKind};

/// Answers `PUT /files/{name}` and `GET /files/{name}` from a
/// [`FileStore`]: a tower [`Service`] over `http::Request`s, which
/// [`TransferServer`](super::TransferServer) serves over HTTP/2.
///
/// | request | answer |
/// |---|---|
/// | `PUT /files/{name}` with the content as body | `200` and `{"bytes": n}` once the store has it all |
/// | `GET /files/{name}` | `200` with the content streamed, `content-length` when known |
/// | unknown name | `404` |
/// | bad name (see [`validate_file_name`]) | `400` |
/// | upload over [`with_max_upload`](Self::with_max_upload) | `413`, nothing stored |
/// | upload of a name that exists, unless [`with_overwrite`](Self::with_overwrite) | `409`, the file unchanged |
/// | store failure | `500` |
///
/// Errors come back as `{"error": "..."}`, in words of the service's own:
/// the store's message (which may name a path on the server) goes to the
/// server's log at DEBUG, never to the caller. The request body is any
/// [`Body`] of [`Bytes`] (hyper's `Incoming` when served by
/// [`TransferServer`](super::TransferServer)); it is read as the store pulls
/// it, so HTTP/2 flow control still paces the sender through any layer that
/// passes the body on unchanged.
///
/// ```
/// use std::sync::Arc;
/// use http_body_util::{BodyExt, Full};
/// use switchboard::transfer::{DirStore, TransferService};
/// use tower::ServiceExt;
///
/// # tokio::runtime::Runtime::new().unwrap().block_on(async {
/// let dir = std::env::temp_dir().join(format!("transfer-service-doc-{}", uuid::Uuid::new_v4()));
/// let service = TransferService::new(Arc::new(DirStore::new(&dir).await?));
///
/// let upload = http::Request::put("/files/note.txt").body(Full::new(bytes::Bytes::from("hi")))?;
/// let answer = service.clone().oneshot(upload).await?;
/// assert_eq!(answer.status(), 200);
/// assert_eq!(answer.into_body().collect().await?.to_bytes(), r#"{"bytes":2}"#);
///
/// let download = http::Request::get("/files/note.txt").body(Full::new(bytes::Bytes::new()))?;
/// let answer = service.oneshot(download).await?;
/// assert_eq!(answer.into_body().collect().await?.to_bytes(), "hi");
/// tokio::fs::remove_dir_all(&dir).await?;
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// # }).unwrap();
/// ```
#[derive(Clone)]
pub struct TransferService {
    store: Arc<dyn FileStore>,
    max_upload: u64,
    overwrite: bool,
}

/// The largest upload a [`TransferService`] takes unless told otherwise:
/// 1 GiB.
pub const DEFAULT_MAX_UPLOAD: u64 = 1 << 30;

impl TransferService {
    /// The routes over `store`: uploads of at most [`DEFAULT_MAX_UPLOAD`]
    /// bytes, an existing file never replaced.
    pub fn new(store: Arc<dyn FileStore>) -> Self {
        Self {
            store,
            max_upload: DEFAULT_MAX_UPLOAD,
            overwrite: false,
        }
    }

    /// Sets the largest upload in bytes. A larger one is answered `413`,
    /// before its body is read when its `content-length` says so, and
    /// otherwise as soon as the bytes received pass the limit; the store's
    /// partial file is removed, so nothing is left of it.
    ///
    /// ```
    /// use std::sync::Arc;
    /// use http_body_util::Full;
    /// use switchboard::transfer::{DirStore, TransferService};
    /// use tower::ServiceExt;
    ///
    /// # tokio::runtime::Runtime::new().unwrap().block_on(async {
    /// let dir = std::env::temp_dir().join(format!("transfer-limit-doc-{}", uuid::Uuid::new_v4()));
    /// let store = Arc::new(DirStore::new(&dir).await?);
    /// let service = TransferService::new(store).with_max_upload(4);
    /// let upload = http::Request::put("/files/big.bin").body(Full::new(bytes::Bytes::from("12345")))?;
    /// assert_eq!(service.oneshot(upload).await?.status(), 413);
    /// assert!(!dir.join("big.bin").exists());
    /// tokio::fs::remove_dir_all(&dir).await?;
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// # }).unwrap();
    /// ```
    pub fn with_max_upload(mut self, bytes: u64) -> Self {
        self.max_upload = bytes;
        self
    }

    /// Lets an upload replace a file of the same name (default `false`: it
    /// is answered `409` and the file stays as it was).
    pub fn with_overwrite(mut self, overwrite: bool) -> Self {
        self.overwrite = overwrite;
        self
    }

    /// The store the routes read and write.
    pub fn store(&self) -> &Arc<dyn FileStore> {
        &self.store
    }
}

impl fmt::Debug for TransferService {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TransferService")
            .field("max_upload", &self.max_upload)
            .field("overwrite", &self.overwrite)
            .finish_non_exhaustive()
    }
}

impl<B> Service<Request<B>> for TransferService
where
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    type Response = Response<TransferBody>;
    type Error = Infallible;
    type Future = ResponseFuture;

    /// Always ready: the store is shared, and each request pulls its body
    /// at the pace the store takes it.
    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<B>) -> ResponseFuture {
        let service = self.clone();
        ResponseFuture(Box::pin(async move { Ok(handle(&service, request).await) }))
    }
}

/// The answer of a [`TransferService`] in progress. It never fails: every
/// failure is an HTTP status (see the table there).
pub struct ResponseFuture(
    Pin<Box<dyn Future<Output = Result<Response<TransferBody>, Infallible>> + Send>>,
);

impl Future for ResponseFuture {
    type Output = Result<Response<TransferBody>, Infallible>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        self.0.as_mut().poll(cx)
    }
}

impl fmt::Debug for ResponseFuture {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}

async fn handle<B>(service: &TransferService, request: Request<B>) -> Response<TransferBody>
where
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    let Some(name) = request.uri().path().strip_prefix(FILES).map(str::to_owned) else {
        return error_response(StatusCode::NOT_FOUND, "no such route; use /files/{name}");
    };
    if let Err(error) = validate_file_name(&name) {
        return error_response(StatusCode::BAD_REQUEST, error.message());
    }
    let store = service.store.as_ref();
    let outcome = match *request.method() {
        Method::PUT => {
            let limit = service.max_upload;
            if declared_length(&request).is_some_and(|length| length > limit) {
                return too_large(limit);
            }
            let (chunks, over) = limited(body::received(request.into_body()), limit);
            let stored = if service.overwrite {
                store.put(&name, chunks).await.map(Some)
            } else {
                store.put_new(&name, chunks).await
            };
            if over.load(Ordering::Relaxed) {
                return too_large(limit);
            }
            match stored {
                Ok(None) => {
                    return error_response(
                        StatusCode::CONFLICT,
                        &format!("a file named {name:?} exists; it is not replaced"),
                    );
                }
                Ok(Some(bytes)) => Ok(json_response(
                    serde_json::json!({ "bytes": bytes }).to_string(),
                )),
                Err(error) => Err(error),
            }
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
        // The store's own message stays in the server's log: it may name
        // paths, hosts or buckets the caller has no business knowing.
        tracing::debug!(%error, %name, "transfer failed");
        let (status, public) = match error.kind() {
            ErrorKind::NotFound => (StatusCode::NOT_FOUND, format!("no file named {name:?}")),
            ErrorKind::Rejected => (StatusCode::BAD_REQUEST, "the store refused the file".into()),
            // The client went away mid-upload; it will not read this.
            ErrorKind::Connection => (StatusCode::BAD_REQUEST, "the transfer broke off".into()),
            _ => (
                StatusCode::INTERNAL_SERVER_ERROR,
                "the store failed; see the server's log".into(),
            ),
        };
        error_response(status, &public)
    })
}

/// The request's `content-length`, when it has a readable one.
fn declared_length<B>(request: &Request<B>) -> Option<u64> {
    request
        .headers()
        .get(CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .parse()
        .ok()
}

/// `chunks` failing once more than `limit` bytes have passed, and the flag
/// that says it did (the store sees only an error, and answers with it).
fn limited(mut chunks: ByteStream, limit: u64) -> (ByteStream, Arc<AtomicBool>) {
    let over = Arc::new(AtomicBool::new(false));
    let flag = over.clone();
    let mut seen = 0_u64;
    let stream = futures_util::stream::poll_fn(move |cx| {
        let next = futures_util::ready!(chunks.as_mut().poll_next(cx));
        if let Some(Ok(chunk)) = &next {
            seen += chunk.len() as u64;
            if seen > limit {
                flag.store(true, Ordering::Relaxed);
                return Poll::Ready(Some(Err(Error::new(
                    ErrorKind::Rejected,
                    format!("the upload is over the {limit}-byte limit"),
                ))));
            }
        }
        Poll::Ready(next)
    });
    (Box::pin(stream), over)
}

fn too_large(limit: u64) -> Response<TransferBody> {
    error_response(
        StatusCode::PAYLOAD_TOO_LARGE,
        &format!("the upload is over the {limit}-byte limit"),
    )
}

fn json_response(text: String) -> Response<TransferBody> {
    let mut response = Response::new(body::full(text));
    response.headers_mut().insert(
        CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    response
}

fn error_response(status: StatusCode, message: &str) -> Response<TransferBody> {
    let mut response = json_response(serde_json::json!({ "error": message }).to_string());
    *response.status_mut() = status;
    response
}
