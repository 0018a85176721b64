//! The receiving side: the generated `Push` service delivering into the
//! transport's inbox, and serving it.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::task::{Context, Poll};

use async_trait::async_trait;
use tokio::net::TcpListener;
use tonic::codegen::http::{self, HeaderValue};
use tonic::codegen::{Body, BoxFuture, StdError};
use tonic::server::NamedService;
use tonic::{Code, Request, Response, Status};
use tower::Service;

use super::proto::push_server::{Push, PushServer};
use super::proto::{DeliverReply, DeliverRequest};
use super::{ENVELOPE_SLACK, GrpcTransport, status_from_error};
use tonic::service::Routes;
use tower::Layer;

use crate::BoxError;
use crate::error::{Error, ErrorKind};
use crate::transport::RawMessage;
use crate::transport::push::{self, Inbox, QueueFull};

impl GrpcTransport {
    /// The receiving gRPC service, to add to a `tonic::transport::Server`
    /// (with your own TLS, interceptors and other services).
    pub fn push_service(&self) -> PushService {
        let max_body = self.inner.config.max_body_bytes;
        let receiver = PushReceiver {
            inbox: self.inner.inbox.clone(),
            max_body,
        };
        PushService {
            inner: PushServer::new(receiver)
                .max_decoding_message_size(max_body.saturating_add(ENVELOPE_SLACK)),
        }
    }

    /// Serves [`push_service`](Self::push_service) on `listener` (plain
    /// HTTP/2) until the transport is closed (requests in flight finish),
    /// the future is dropped or the listener fails.
    pub fn serve(&self, listener: TcpListener) -> impl Future<Output = Result<(), Error>> + use<> {
        self.serve_with(tonic::transport::Server::builder(), listener)
    }

    /// Serves [`push_service`](Self::push_service) on `listener` over TLS
    /// (HTTP/2, ALPN `h2`) until the transport is closed (requests in
    /// flight finish), the future is dropped or the listener fails;
    /// publishers reach it with `https://` URLs.
    ///
    /// tonic builds the rustls server config from the process-default crypto
    /// provider; this installs aws-lc-rs as that default unless one is
    /// installed ([`tls::install_default_provider`](crate::tls::install_default_provider)).
    #[cfg(feature = "grpc-tls")]
    pub fn serve_tls(
        &self,
        listener: TcpListener,
        tls: tonic::transport::ServerTlsConfig,
    ) -> impl Future<Output = Result<(), Error>> + use<> {
        crate::tls::install_default_provider();
        let serving = tonic::transport::Server::builder()
            .tls_config(tls)
            .map(|server| self.serve_with(server, listener))
            .map_err(|error| {
                Error::new(ErrorKind::Config, format!("gRPC TLS config: {error}"))
                    .with_source(error)
            });
        async move { serving?.await }
    }

    /// Like [`serve`](Self::serve), with `layer` around every request
    /// before the push service sees it: authentication
    /// ([`AuthLayer`](crate::auth::AuthLayer), feature `auth`, or your
    /// own), limits, tracing. A request the layer answers itself (a `401`
    /// without a valid token) never reaches the inbox, so no handler runs.
    ///
    /// ```no_run
    /// # #[cfg(feature = "auth")]
    /// # async fn run(transport: switchboard::transport::grpc::GrpcTransport, verifier: std::sync::Arc<switchboard::auth::TokenVerifier>) -> Result<(), switchboard::Error> {
    /// let listener = tokio::net::TcpListener::bind("0.0.0.0:50051").await.unwrap();
    /// transport.serve_with_layer(listener, switchboard::auth::AuthLayer::new(verifier)).await
    /// # }
    /// ```
    pub fn serve_with_layer<L, ResBody>(
        &self,
        listener: TcpListener,
        layer: L,
    ) -> impl Future<Output = Result<(), Error>> + use<L, ResBody>
    where
        L: Layer<Routes> + Clone + Send + 'static,
        L::Service: Service<
                tonic::codegen::http::Request<tonic::body::Body>,
                Response = tonic::codegen::http::Response<ResBody>,
            > + Clone
            + Send
            + 'static,
        <L::Service as Service<tonic::codegen::http::Request<tonic::body::Body>>>::Future: Send,
        <L::Service as Service<tonic::codegen::http::Request<tonic::body::Body>>>::Error:
            Into<BoxError> + Send,
        ResBody: tonic::codegen::Body<Data = bytes::Bytes> + Send + 'static,
        ResBody::Error: Into<BoxError>,
    {
        self.serve_with(tonic::transport::Server::builder().layer(layer), listener)
    }

    /// Binds `address` and [`serve`](Self::serve)s on it.
    pub async fn serve_on(&self, address: SocketAddr) -> Result<(), Error> {
        self.serve(push::listen(address).await?).await
    }

    /// `server` with the push service on `listener`, until closed.
    fn serve_with<L, ResBody>(
        &self,
        mut server: tonic::transport::Server<L>,
        listener: TcpListener,
    ) -> impl Future<Output = Result<(), Error>> + use<L, ResBody>
    where
        L: Layer<Routes> + Clone + Send + 'static,
        L::Service: Service<
                tonic::codegen::http::Request<tonic::body::Body>,
                Response = tonic::codegen::http::Response<ResBody>,
            > + Clone
            + Send
            + 'static,
        <L::Service as Service<tonic::codegen::http::Request<tonic::body::Body>>>::Future: Send,
        <L::Service as Service<tonic::codegen::http::Request<tonic::body::Body>>>::Error:
            Into<BoxError> + Send,
        ResBody: tonic::codegen::Body<Data = bytes::Bytes> + Send + 'static,
        ResBody::Error: Into<BoxError>,
    {
        let router = server.add_service(self.push_service());
        let closed = self.inner.lifecycle.closed();
        async move {
            router
                .serve_with_incoming_shutdown(
                    tonic::transport::server::TcpIncoming::from(listener),
                    closed,
                )
                .await
                .map_err(|error| {
                    Error::new(ErrorKind::Connection, format!("gRPC push server: {error}"))
                        .with_source(error)
                })
        }
    }
}

/// The receiving side: implements the generated `Push` service by handing
/// each request to the [`Inbox`]. A request the inbox refuses because the
/// group's queue is full ([`QueueFull`]) is answered `RESOURCE_EXHAUSTED`
/// with `grpc-retry-pushback-ms`; the inbox's other errors as
/// [`status_from_error`] maps them.
#[derive(Debug, Clone)]
pub struct PushReceiver {
    inbox: Inbox,
    max_body: usize,
}

impl PushReceiver {
    /// A receiver delivering into `inbox`, refusing bodies over `max_body`
    /// bytes with `RESOURCE_EXHAUSTED`.
    pub fn new(inbox: Inbox, max_body: usize) -> Self {
        Self { inbox, max_body }
    }
}

#[async_trait]
impl Push for PushReceiver {
    async fn deliver(
        &self,
        request: Request<DeliverRequest>,
    ) -> Result<Response<DeliverReply>, Status> {
        let request = request.into_inner();
        if request.body.len() > self.max_body {
            return Err(Status::resource_exhausted(format!(
                "message body of {} bytes is over the limit of {} bytes",
                request.body.len(),
                self.max_body
            )));
        }
        let message = RawMessage {
            headers: request.headers,
            body: request.body,
        };
        self.inbox
            .deliver(
                &request.topic,
                request.group.as_deref(),
                message,
                request.attempt,
            )
            .await
            .map(|()| Response::new(DeliverReply {}))
            .map_err(|error| receiver_status(&error))
    }
}

/// [`status_from_error`], but `RESOURCE_EXHAUSTED` (keeping the pushback)
/// for a refusal because the queue is full.
fn receiver_status(error: &Error) -> Status {
    let status = status_from_error(error);
    if QueueFull::of(error).is_none() {
        return status;
    }
    Status::with_metadata(
        Code::ResourceExhausted,
        status.message(),
        status.metadata().clone(),
    )
}

/// The generated `PushServer` with tonic's answers to bad input made precise:
/// an undecodable request is `INVALID_ARGUMENT` (tonic says `INTERNAL`) and
/// one over the size limit is `RESOURCE_EXHAUSTED` (tonic says
/// `OUT_OF_RANGE`). The receiver itself answers neither code, so every such
/// status comes from decoding the request. (The receiver's own
/// `RESOURCE_EXHAUSTED` answers, for a body over the limit or a full queue,
/// pass through unchanged.)
#[derive(Debug, Clone)]
pub struct PushService {
    inner: PushServer<PushReceiver>,
}

impl PushService {
    /// Wraps a generated server.
    pub fn new(inner: PushServer<PushReceiver>) -> Self {
        Self { inner }
    }

    /// The generated server.
    pub fn get_ref(&self) -> &PushServer<PushReceiver> {
        &self.inner
    }

    /// The generated server, mutably.
    pub fn get_mut(&mut self) -> &mut PushServer<PushReceiver> {
        &mut self.inner
    }

    /// Gives back the generated server.
    pub fn into_inner(self) -> PushServer<PushReceiver> {
        self.inner
    }
}

impl NamedService for PushService {
    const NAME: &'static str = <PushServer<PushReceiver> as NamedService>::NAME;
}

impl<B> Service<http::Request<B>> for PushService
where
    B: Body + Send + 'static,
    B::Error: Into<StdError> + Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Service::<http::Request<B>>::poll_ready(&mut self.inner, cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let response = self.inner.call(request);
        Box::pin(async move {
            let mut response = response.await?;
            // A decode failure ends the call before any message, so its
            // status is in the response headers (trailers-only).
            let headers = response.headers_mut();
            let code = headers
                .get("grpc-status")
                .and_then(|value| value.to_str().ok()?.parse::<i32>().ok())
                .map(Code::from_i32);
            let precise = match code {
                Some(Code::Internal) => Some(Code::InvalidArgument),
                Some(Code::OutOfRange) => Some(Code::ResourceExhausted),
                _ => None,
            };
            if let Some(code) = precise {
                headers.insert("grpc-status", HeaderValue::from(code as i32));
            }
            Ok(response)
        })
    }
}
