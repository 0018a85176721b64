//! gRPC (feature `grpc`, tonic 0.14): tonic clients as tower services, the
//! status ↔ [`Error`] mapping, and the event-push transport.
//!
//! * [`GrpcService`] (built with [`unary`]) turns one method of any tonic
//!   client into a `tower::Service` whose error is this crate's [`Error`], so
//!   the resilience layers (retry, circuit breaker, timeout) wrap it and see
//!   whether a failure is worth retrying.
//! * [`error_from_status`] / [`status_from_error`] map gRPC status codes to
//!   [`ErrorKind`]s and back: `UNAVAILABLE`, `DEADLINE_EXCEEDED` and
//!   `RESOURCE_EXHAUSTED` are retryable; `INVALID_ARGUMENT`, `NOT_FOUND`,
//!   `UNAUTHENTICATED` and `PERMISSION_DENIED` are not.
//! * [`GrpcTransport`] pushes events with the `switchboard.push.v1.Push`
//!   service (`proto/switchboard/push/v1/push.proto`); see
//!   [`push`] for what push guarantees.
//!
//! The protobuf code is generated ahead of time and checked in
//! ([`proto`]), so building this crate runs no build script and needs no
//! `protoc`.
//!
//! Without the `grpc-tls` feature connections are plain HTTP/2 (h2c). With
//! it (tonic's rustls on aws-lc-rs, see [`crate::tls`]),
//! `GrpcTransport::with_client_tls` publishes to `https://` endpoints and
//! `GrpcTransport::serve_tls` serves with a `tonic::transport::ServerTlsConfig`;
//! for your own tonic clients, set `Endpoint::tls_config` as usual. You can
//! also mount [`GrpcTransport::push_service`] in your own
//! `tonic::transport::Server` and configure each client connection with
//! [`GrpcTransport::with_endpoint_config`].

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex};

use tonic::transport::{Channel, Endpoint};

use crate::error::Error;
#[cfg(feature = "grpc-tls")]
use crate::error::ErrorKind;
use crate::transport::Lifecycle;
use crate::transport::push::{self, Inbox, PushConfig};

mod consumer;
mod error;
mod publisher;
mod service;

pub use consumer::{PushReceiver, PushService};
pub use error::{error_from_status, status_from_error};
use proto::push_client::PushClient;
use publisher::bad_url;
pub use service::{GrpcService, ResponseFuture, unary};

/// The generated protobuf types, client and server of
/// `switchboard.push.v1.Push`, checked in and kept equal to the `.proto` by
/// the `proto_codegen` test.
#[allow(
    missing_docs,
    unreachable_pub,
    missing_debug_implementations,
    clippy::all
)]
pub mod proto {
    include!("proto/switchboard.push.v1.rs");
}

/// The metadata key gRPC uses for "retry after this many milliseconds".
pub const RETRY_PUSHBACK_MS: &str = "grpc-retry-pushback-ms";

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
/// never got: see [`push`] for the exact guarantees.
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
}

impl fmt::Debug for GrpcTransport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GrpcTransport")
            .field("config", &self.inner.config)
            .field("inbox", &self.inner.inbox)
            .finish_non_exhaustive()
    }
}

push::push_transport_impls!(GrpcTransport);
