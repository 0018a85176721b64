//! The file routes as a tower service, so that any layer for
//! `http::Request`s (authentication, trace context, metrics, limits) can be
//! put in front of them.

use std::convert::Infallible;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::header::{CONTENT_LENGTH, CONTENT_TYPE};
use http::{Method, Request, Response, StatusCode};
use http_body::Body;
use tower::Service;

use super::body::{self, TransferBody};
use super::{FILES, FileStore, validate_file_name};
use crate::{BoxError, ErrorKind};

/// Answers `PUT /files/{name}` and `GET /files/{name}` from a
/// [`FileStore`]: a tower [`Service`] over `http::Request`s, which
/// [`TransferServer`](super::TransferServer) serves over HTTP/2.
///
/// | request | answer |
/// |---|---|
/// | `PUT /files/{name}` with the content as body | `200` and `{"bytes": n}` once the store has it all |
/// | `GET /files/{name}` | `200` with the content streamed, `content-length` when known |
/// | unknown name | `404` |
/// | bad name | `400` |
/// | store failure | `500` |
///
/// Errors come back as `{"error": "..."}`. The request body is any
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
}

impl TransferService {
    /// The routes over `store`.
    pub fn new(store: Arc<dyn FileStore>) -> Self {
        Self { store }
    }

    /// The store the routes read and write.
    pub fn store(&self) -> &Arc<dyn FileStore> {
        &self.store
    }
}

impl fmt::Debug for TransferService {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TransferService").finish_non_exhaustive()
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
        let store = self.store.clone();
        ResponseFuture(Box::pin(async move {
            Ok(handle(store.as_ref(), request).await)
        }))
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

async fn handle<B>(store: &dyn FileStore, request: Request<B>) -> Response<TransferBody>
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

fn error_response(status: StatusCode, message: &str) -> Response<TransferBody> {
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
