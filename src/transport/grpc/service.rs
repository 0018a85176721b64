//! One method of a tonic client as a `tower::Service`.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use tonic::{Response, Status};
use tower::Service;

use super::error_from_status;
use crate::error::Error;

/// Wraps one method of a tonic client as a `tower::Service` from the request
/// message to the response message, with [`Error`] as its error.
///
/// `call` gets a clone of `client` (tonic clients are cheap handles on one
/// channel) and the request message; it may add metadata before calling the
/// method. Requests are plain messages, so a retry layer can clone them.
///
/// ```
/// use std::time::Duration;
/// use switchboard::transport::grpc::{proto, unary};
/// use tower::{Service, ServiceExt};
///
/// # tokio::runtime::Runtime::new().unwrap().block_on(async {
/// // Nothing listens on port 9: the call fails with a retryable error.
/// let channel = tonic::transport::Endpoint::from_static("http://127.0.0.1:9").connect_lazy();
/// let client = proto::push_client::PushClient::new(channel);
/// let mut deliver = unary(client, |mut client, request: proto::DeliverRequest| async move {
///     client.deliver(request).await
/// });
/// let error = deliver.ready().await?.call(proto::DeliverRequest::default()).await.unwrap_err();
/// assert_eq!(error.kind(), switchboard::ErrorKind::Connection, "{error}");
/// assert!(error.is_retryable());
/// # Ok::<(), switchboard::Error>(())
/// # }).unwrap();
/// ```
pub fn unary<C, F, Fut, Req, Resp>(client: C, call: F) -> GrpcService<C, F>
where
    C: Clone,
    F: FnMut(C, Req) -> Fut,
    Fut: Future<Output = Result<Response<Resp>, Status>>,
{
    GrpcService::new(client, call)
}

/// A tonic client method as a `tower::Service`; see [`unary`].
#[derive(Clone)]
pub struct GrpcService<C, F> {
    client: C,
    call: F,
}

impl<C, F> GrpcService<C, F> {
    /// Wraps `client`, calling it through `call`.
    pub fn new(client: C, call: F) -> Self {
        Self { client, call }
    }

    /// The client.
    pub fn get_ref(&self) -> &C {
        &self.client
    }

    /// The client, mutably.
    pub fn get_mut(&mut self) -> &mut C {
        &mut self.client
    }

    /// Gives back the client.
    pub fn into_inner(self) -> C {
        self.client
    }
}

impl<C: fmt::Debug, F> fmt::Debug for GrpcService<C, F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GrpcService")
            .field("client", &self.client)
            .finish_non_exhaustive()
    }
}

impl<C, F, Fut, Req, Resp> Service<Req> for GrpcService<C, F>
where
    C: Clone,
    F: FnMut(C, Req) -> Fut,
    Fut: Future<Output = Result<Response<Resp>, Status>>,
{
    type Response = Resp;
    type Error = Error;
    type Future = ResponseFuture<Fut>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        // Tonic clients wait for their channel inside each call.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Req) -> Self::Future {
        ResponseFuture {
            inner: Box::pin((self.call)(self.client.clone(), request)),
        }
    }
}

/// The future of a [`GrpcService`] call: the response message, or the status
/// mapped by [`error_from_status`](super::error_from_status).
pub struct ResponseFuture<Fut> {
    inner: Pin<Box<Fut>>,
}

impl<Fut> fmt::Debug for ResponseFuture<Fut> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}

impl<Fut, Resp> Future for ResponseFuture<Fut>
where
    Fut: Future<Output = Result<Response<Resp>, Status>>,
{
    type Output = Result<Resp, Error>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        self.inner
            .as_mut()
            .poll(cx)
            .map(|result| result.map(Response::into_inner).map_err(error_from_status))
    }
}
