//! The gRPC event-push transport: `publish` calls `Push/Deliver` on each of
//! the topic's endpoints; the receiver hands the message to a subscriber and
//! answers once the handler has settled it, or at once with
//! `RESOURCE_EXHAUSTED` when the group's queue is full.

use std::collections::HashMap;
use std::convert::Infallible;
use std::fmt;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};

use async_trait::async_trait;
use tokio::net::TcpListener;
use tonic::codegen::http::{self, HeaderValue};
use tonic::codegen::{Body, BoxFuture, StdError};
use tonic::server::NamedService;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Request, Response, Status};
use tower::Service;

use super::proto::push_client::PushClient;
use super::proto::push_server::{Push, PushServer};
use super::proto::{DeliverReply, DeliverRequest};
use super::{RETRY_PUSHBACK_MS, error_from_status, status_from_error};
use crate::error::{Error, ErrorKind};
use crate::topology::Topology;
use crate::transport::push::{
    self, Inbox, PushConfig, PushRequest, PushSender, QueueFull, SendError,
};
use crate::transport::{
    Capabilities, DeliveryMode, Lifecycle, Publisher, RawMessage, SubscribeOptions, Subscriber,
    Subscription, Transport, TransportHealth,
};

const NAME: &str = "grpc";

/// Room for the topic, group and headers around a body of the largest size.
const ENVELOPE_SLACK: usize = 64 * 1024;

type EndpointConfig = dyn Fn(Endpoint) -> Result<Endpoint, Error> + Send + Sync;

/// Events pushed over gRPC: the publisher calls `switchboard.push.v1.Push/Deliver`
/// on the endpoints [`PushConfig::routes`] names for the topic; the
/// receiver ([`push_service`](Self::push_service), or [`serve`](Self::serve))
/// answers once a subscriber's handler has acked.
///
/// The receiver keeps at most [`PushConfig::queue_capacity`] pushes per
/// group waiting for a subscription; one more is answered at once with
/// `RESOURCE_EXHAUSTED` and `grpc-retry-pushback-ms`
/// ([`QUEUE_FULL_RETRY_AFTER`](push::QUEUE_FULL_RETRY_AFTER)), and the
/// publisher sends it again after that, within the same attempt.
///
/// Not persistent, no dead-letter queue, no redelivery of what a receiver
/// never got: see [`push`](crate::transport::push) for the exact guarantees.
///
/// ```
/// use switchboard::transport::grpc::GrpcTransport;
/// use switchboard::transport::push::{PushConfig, PushEndpoint, PushRoutes};
/// use switchboard::{Publisher, RawMessage, SubscribeOptions, Subscriber};
///
/// # tokio::runtime::Runtime::new().unwrap().block_on(async {
/// let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
/// let url = format!("http://{}", listener.local_addr().unwrap());
/// let routes = PushRoutes::new().route("price.updated", PushEndpoint::new(url).for_group("game"));
/// let transport = GrpcTransport::new(PushConfig::new(routes))?;
/// tokio::spawn(transport.serve(listener));
///
/// let mut subscription = transport
///     .subscribe("price.updated", SubscribeOptions::new("game"))
///     .await?;
/// let handler = tokio::spawn(async move {
///     let delivery = subscription.recv().await.expect("a message");
///     assert_eq!(delivery.body().as_ref(), b"AAPL 150.00");
///     delivery.ack().await.map_err(switchboard::Error::from)
/// });
/// // Returns once the handler above has acked.
/// transport.publish("price.updated", RawMessage::new("AAPL 150.00")).await?;
/// handler.await.unwrap()?;
/// # Ok::<(), switchboard::Error>(())
/// # }).unwrap();
/// ```
#[derive(Clone)]
pub struct GrpcTransport {
    inner: Arc<Inner>,
}

struct Inner {
    config: PushConfig,
    endpoint_config: Option<Arc<EndpointConfig>>,
    clients: Mutex<HashMap<String, PushClient<Channel>>>,
    inbox: Inbox,
    /// Closing: refuses new work, ends the subscriptions and `serve`.
    lifecycle: Lifecycle,
}

impl GrpcTransport {
    /// A transport that publishes by `config` and receives into its own
    /// inbox of [`PushConfig::queue_capacity`]. Connections open on first
    /// use.
    pub fn new(config: PushConfig) -> Result<Self, Error> {
        config.validate()?;
        for url in config.routes.urls() {
            Endpoint::from_shared(url.to_owned()).map_err(|error| bad_url(url, error))?;
        }
        let inbox = Inbox::with_capacity(NAME, config.queue_capacity)?;
        Ok(Self {
            inner: Arc::new(Inner {
                config,
                endpoint_config: None,
                clients: Mutex::default(),
                inbox,
                lifecycle: Lifecycle::new(NAME),
            }),
        })
    }

    /// Adjusts every client connection before it opens: timeouts, keep-alive,
    /// window sizes, `tls_config` (or use [`with_client_tls`](Self::with_client_tls)).
    ///
    /// ```
    /// use std::time::Duration;
    /// use switchboard::transport::grpc::GrpcTransport;
    /// use switchboard::transport::push::PushConfig;
    ///
    /// let transport = GrpcTransport::new(PushConfig::default())?
    ///     .with_endpoint_config(|endpoint| Ok(endpoint.keep_alive_while_idle(true)));
    /// # Ok::<(), switchboard::Error>(())
    /// ```
    pub fn with_endpoint_config(
        self,
        configure: impl Fn(Endpoint) -> Result<Endpoint, Error> + Send + Sync + 'static,
    ) -> Self {
        let inner = Inner {
            config: self.inner.config.clone(),
            endpoint_config: Some(Arc::new(configure)),
            clients: Mutex::default(),
            inbox: self.inner.inbox.clone(),
            lifecycle: self.inner.lifecycle.clone(),
        };
        Self {
            inner: Arc::new(inner),
        }
    }

    /// Publishes over TLS to `https://` endpoints, verifying them with
    /// `tls` (for example `ClientTlsConfig::new().ca_certificate(ca)` for a
    /// private CA). An earlier [`with_endpoint_config`](Self::with_endpoint_config)
    /// adjustment still applies; a later one replaces this, so call this last.
    ///
    /// tonic builds the rustls config from the process-default crypto
    /// provider; this installs aws-lc-rs as that default unless one is
    /// installed ([`tls::install_default_provider`](crate::tls::install_default_provider)).
    ///
    /// ```
    /// use switchboard::transport::grpc::GrpcTransport;
    /// use switchboard::transport::push::PushConfig;
    /// use tonic::transport::ClientTlsConfig;
    ///
    /// let transport = GrpcTransport::new(PushConfig::default())?
    ///     .with_client_tls(ClientTlsConfig::new().domain_name("events.internal"));
    /// # Ok::<(), switchboard::Error>(())
    /// ```
    #[cfg(feature = "grpc-tls")]
    pub fn with_client_tls(self, tls: tonic::transport::ClientTlsConfig) -> Self {
        crate::tls::install_default_provider();
        let earlier = self.inner.endpoint_config.clone();
        self.with_endpoint_config(move |endpoint| {
            let endpoint = match &earlier {
                Some(configure) => configure(endpoint)?,
                None => endpoint,
            };
            endpoint.tls_config(tls.clone()).map_err(|error| {
                Error::new(ErrorKind::Config, format!("gRPC TLS config: {error}"))
                    .with_source(error)
            })
        })
    }

    /// The inbox the receiver delivers into and subscriptions read from.
    pub fn inbox(&self) -> &Inbox {
        &self.inner.inbox
    }

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
    /// HTTP/2) until the future is dropped or the listener fails.
    pub fn serve(&self, listener: TcpListener) -> impl Future<Output = Result<(), Error>> + use<> {
        let service = self.push_service();
        let closed = self.inner.lifecycle.closed();
        async move {
            tonic::transport::Server::builder()
                .add_service(service)
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

    /// Serves [`push_service`](Self::push_service) on `listener` over TLS
    /// (HTTP/2, ALPN `h2`) until the future is dropped or the listener
    /// fails; publishers reach it with `https://` URLs.
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
        let service = self.push_service();
        async move {
            tonic::transport::Server::builder()
                .tls_config(tls)
                .map_err(|error| {
                    Error::new(ErrorKind::Config, format!("gRPC TLS config: {error}"))
                        .with_source(error)
                })?
                .add_service(service)
                .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener))
                .await
                .map_err(|error| {
                    Error::new(ErrorKind::Connection, format!("gRPC push server: {error}"))
                        .with_source(error)
                })
        }
    }

    /// Binds `address` and [`serve`](Self::serve)s on it.
    pub async fn serve_on(&self, address: SocketAddr) -> Result<(), Error> {
        let listener = TcpListener::bind(address).await.map_err(|error| {
            Error::new(
                ErrorKind::Connection,
                format!("cannot listen on {address}: {error}"),
            )
            .with_source(error)
        })?;
        self.serve(listener).await
    }

    fn client(&self, url: &str) -> Result<PushClient<Channel>, Error> {
        let mut clients = self
            .inner
            .clients
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(client) = clients.get(url) {
            return Ok(client.clone());
        }
        let mut endpoint = Endpoint::from_shared(url.to_owned())
            .map_err(|error| bad_url(url, error))?
            .connect_timeout(self.inner.config.connect_timeout());
        if let Some(configure) = &self.inner.endpoint_config {
            endpoint = configure(endpoint)?;
        }
        let client = PushClient::new(endpoint.connect_lazy()).max_encoding_message_size(
            self.inner
                .config
                .max_body_bytes
                .saturating_add(ENVELOPE_SLACK),
        );
        clients.insert(url.to_owned(), client.clone());
        Ok(client)
    }
}

fn bad_url(url: &str, error: impl std::error::Error + Send + Sync + 'static) -> Error {
    Error::new(
        ErrorKind::Config,
        format!("push endpoint {url:?} is not a valid URI: {error}"),
    )
    .with_source(error)
}

impl fmt::Debug for GrpcTransport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GrpcTransport")
            .field("config", &self.inner.config)
            .field("inbox", &self.inner.inbox)
            .finish_non_exhaustive()
    }
}

#[async_trait]
impl PushSender for GrpcTransport {
    async fn send(&self, url: &str, request: PushRequest<'_>) -> Result<(), SendError> {
        let mut client = self.client(url)?;
        let message = DeliverRequest {
            topic: request.topic.to_owned(),
            group: request.group.map(str::to_owned),
            headers: request.message.headers.clone(),
            body: request.message.body.clone(),
            attempt: request.attempt,
        };
        let status = match client.deliver(message).await {
            Ok(_) => return Ok(()),
            Err(status) => status,
        };
        // A full queue answers RESOURCE_EXHAUSTED with a pushback; an
        // oversize body answers it without one.
        let refused = status.code() == Code::ResourceExhausted
            && status.metadata().contains_key(RETRY_PUSHBACK_MS);
        let error = error_from_status(status);
        Err(if refused {
            SendError::Refused(error)
        } else {
            SendError::Failed(error)
        })
    }
}

#[async_trait]
impl Publisher for GrpcTransport {
    async fn publish(&self, topic: &str, message: RawMessage) -> Result<(), Error> {
        self.inner.lifecycle.check()?;
        push::publish(self, &self.inner.config, topic, &message).await
    }
}

#[async_trait]
impl Subscriber for GrpcTransport {
    async fn subscribe(
        &self,
        topic: &str,
        options: SubscribeOptions,
    ) -> Result<Subscription, Error> {
        self.inner.lifecycle.check()?;
        let subscription = self.inner.inbox.subscribe(topic, options)?;
        Ok(self.inner.lifecycle.track(subscription))
    }
}

#[async_trait]
impl Transport for GrpcTransport {
    fn name(&self) -> &'static str {
        NAME
    }

    /// Competing groups (by the route table), nack by the publisher's retry;
    /// nothing persistent, no dead letters, no redelivery of what was never
    /// received, no ordering promise across retries.
    fn capabilities(&self) -> Capabilities {
        Capabilities::new(DeliveryMode::Competing).with_nack(true)
    }

    /// Checks the topology's names; a push transport has nothing to create.
    async fn declare(&self, topology: &Topology) -> Result<(), Error> {
        self.inner.lifecycle.check()?;
        topology.validate()
    }

    /// Ends the subscriptions and waits for them, and stops
    /// [`serve`](Self::serve) gracefully (requests in flight finish).
    async fn close(&self) -> Result<(), Error> {
        self.inner.lifecycle.close(|_| async {}).await
    }

    fn health(&self) -> TransportHealth {
        if self.inner.lifecycle.is_closed() {
            TransportHealth::closed(NAME)
        } else {
            TransportHealth::up(NAME)
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
