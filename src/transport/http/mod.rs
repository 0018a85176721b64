//! HTTP (feature `http`, axum 0.8 server + reqwest 0.13 client): JSON
//! request/response as a tower service, the status ↔ [`Error`] mapping, and
//! the webhook event-push transport.
//!
//! * [`JsonService`] sends a serializable request — a body to one URL, or
//!   a [`JsonRequest`] with its own method, path parameters and query — and
//!   decodes the JSON answer (an empty one as `()`), as a `tower::Service`
//!   whose error is this crate's [`Error`], so the resilience layers wrap it
//!   and see whether to retry. It runs over `reqwest::Client` or any
//!   `Service<reqwest::Request>` wrapping one (trace context, your layers);
//!   [`error_from_reqwest`] is its mapping of reqwest's failures.
//! * [`JsonBody`] is its server half, an axum extractor that refuses
//!   malformed JSON with 400 and an oversize body with 413;
//!   [`JsonResponse`] answers a value as JSON with a status, and
//!   [`ErrorResponse`] answers any [`Error`] with the matching status and a
//!   JSON body (`{"error":{"kind":"rejected","message":"..."}}`).
//! * [`HttpTransport`] pushes events as webhooks, `POST /events/{topic}`;
//!   see [`push`] for what push guarantees and
//!   [`HttpTransport`] for the wire format.
//!
//! # Statuses and errors
//!
//! | status | kind | retryable | [effect](crate::Effect) |
//! |---|---|---|---|
//! | 503, 429 | [`Unavailable`](crate::ErrorKind::Unavailable) | yes | `NotApplied` |
//! | 408 | [`Timeout`](crate::ErrorKind::Timeout) | yes | `NotApplied` |
//! | other 5xx (500, 502, ...; but 501, 504) | [`Unavailable`](crate::ErrorKind::Unavailable) | yes | `Unknown` |
//! | 504 | [`Timeout`](crate::ErrorKind::Timeout) | yes | `Unknown` |
//! | 401, 403 | [`Unauthorized`](crate::ErrorKind::Unauthorized) | no | `NotApplied` |
//! | 404 | [`NotFound`](crate::ErrorKind::NotFound) | no | `NotApplied` |
//! | 501 | [`Unsupported`](crate::ErrorKind::Unsupported) | no | `NotApplied` |
//! | other 4xx (400, 413, 422, ...) | [`Rejected`](crate::ErrorKind::Rejected) | no | `NotApplied` |
//! | no answer: TLS handshake refused (untrusted certificate) | [`Rejected`](crate::ErrorKind::Rejected) | no | `NotApplied` |
//! | no answer: connect failure | [`Connection`](crate::ErrorKind::Connection) | yes | `NotApplied` |
//! | no answer: connect timeout | [`Timeout`](crate::ErrorKind::Timeout) | yes | `NotApplied` |
//! | no answer: the connection broke after the request was sent, or the body broke | [`Connection`](crate::ErrorKind::Connection) | yes | `Unknown` |
//! | no answer: timeout | [`Timeout`](crate::ErrorKind::Timeout) | yes | `Unknown` |
//!
//! 408 and 429 are the two 4xx codes that say "try again" by definition;
//! 501 is the 5xx that says "never". 503, 429 and 408 also say the server
//! did not act on the request, so even a request that is not idempotent
//! may be sent again; after any other 5xx or a lost answer it may have
//! taken effect (see [`Effect`](crate::Effect)). A
//! `switchboard-retry-after-ms` or `Retry-After` (seconds) header becomes
//! [`Error::retry_after`], which the retry layer caps at `max_backoff_ms`.
//!
//! # TLS
//!
//! Without the `http-tls` feature connections are plain HTTP/1.1 or h2c.
//! With it (rustls on aws-lc-rs, see [`crate::tls`]): `tls_client` builds
//! a `reqwest::Client` trusting the roots you give, for
//! [`HttpTransport::with_client`] and [`JsonService::new`];
//! `HttpTransport::serve_tls` and `serve_tls` (any axum `Router`) serve
//! HTTPS with a config from `tls_server_config`. You can equally pass your
//! own `reqwest::Client` and mount [`HttpTransport::router`] in your own
//! server.

use std::sync::Arc;

use crate::error::Error;
use crate::transport::Lifecycle;
use crate::transport::push::{self, Inbox, PushConfig};

mod client;
mod consumer;
mod error;
mod publisher;
mod server;
mod signing;
#[cfg(feature = "http-tls")]
mod tls;

pub use client::{JsonRequest, JsonService, ResponseFuture, error_from_reqwest};
pub use error::{ErrorResponse, error_from_response, kind_name, status_from_error};
pub use server::{JsonBody, JsonResponse, MaxBodyBytes};
pub use signing::{
    DEFAULT_REPLAY_WINDOW, DEFAULT_SEEN_IDS, WEBHOOK_ID, WEBHOOK_SIGNATURE, WEBHOOK_TIMESTAMP,
    WebhookSigning,
};
#[cfg(feature = "http-tls")]
pub use tls::{SHUTDOWN_GRACE, serve_tls, serve_tls_with_shutdown, tls_client, tls_server_config};

const NAME: &str = "http";

/// The message's headers as a JSON object of strings, every non-ASCII
/// character written as a `\u` escape so the value is a valid HTTP header
/// whatever the headers hold.
pub const HEADERS: &str = "switchboard-headers";
/// The consumer group the message is for; absent means every group.
pub const GROUP: &str = "switchboard-group";
/// Which delivery of the message this is (1 the first time).
pub const ATTEMPT: &str = "switchboard-attempt";
/// On a 503: why the receiver did not take the message. `queue-full` (the
/// only value) means the group's queue was full and no handler saw the
/// message; the publisher sends it again after `Retry-After` without
/// counting an attempt.
pub const REFUSED: &str = "switchboard-refused";
/// The value of [`REFUSED`] when the group's queue was full.
pub const REFUSED_QUEUE_FULL: &str = "queue-full";

/// Events pushed as webhooks.
///
/// # Wire format
///
/// `POST {endpoint}/events/{topic}` with
///
/// * the body: the message body, byte for byte
///   (`content-type: application/octet-stream`);
/// * `switchboard-headers`: the message headers as a JSON object, ASCII-only
///   (`\uXXXX` escapes), so names keep their case and values keep spaces,
///   quotes, `;:,=/` and any Unicode exactly;
/// * `switchboard-group` (optional) and `switchboard-attempt`.
///
/// The receiver answers **204** once the handler acked; **503** with
/// `Retry-After` and `switchboard-retry-after-ms` when it nacked, dropped
/// the message, or no subscriber is there; **503** at once, with
/// `Retry-After`, `switchboard-retry-after-ms` and `switchboard-refused:
/// queue-full`, when the group already has
/// [`PushConfig::queue_capacity`] pushes waiting (the publisher sends it
/// again after [`QUEUE_FULL_RETRY_AFTER`](push::QUEUE_FULL_RETRY_AFTER),
/// within the same attempt); **400** for a bad topic, group, attempt or
/// header JSON; **413** for a body over [`PushConfig::max_body_bytes`].
/// Error bodies are `{"error":{"kind":"...","message":"..."}}`.
///
/// Not persistent, no dead-letter queue, no redelivery of what a receiver
/// never got: see [`push`].
///
/// ```
/// use switchboard::transport::http::HttpTransport;
/// use switchboard::transport::push::{PushConfig, PushEndpoint, PushRoutes};
/// use switchboard::{Publisher, RawMessage, SubscribeOptions, Subscriber};
///
/// # tokio::runtime::Runtime::new().unwrap().block_on(async {
/// let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
/// let url = format!("http://{}", listener.local_addr().unwrap());
/// let routes = PushRoutes::new().route("price.updated", PushEndpoint::new(url).for_group("game"));
/// let transport = HttpTransport::new(PushConfig::new(routes))?;
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
#[derive(Clone, Debug)]
pub struct HttpTransport {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    config: PushConfig,
    client: reqwest::Client,
    inbox: Inbox,
    /// Signs each push and checks each received one, when set.
    signing: Option<WebhookSigning>,
    /// Closing: refuses new work, ends the subscriptions and `serve`.
    lifecycle: Lifecycle,
}

impl HttpTransport {
    /// A transport that publishes by `config` with a default
    /// `reqwest::Client` (with [`PushConfig::connect_timeout`]) and receives into its own inbox of
    /// [`PushConfig::queue_capacity`].
    pub fn new(config: PushConfig) -> Result<Self, Error> {
        let client = reqwest::Client::builder()
            .tcp_nodelay(true)
            .connect_timeout(config.connect_timeout())
            .build()
            .map_err(error_from_reqwest)?;
        Self::with_client(config, client)
    }

    /// Like [`new`](Self::new) with your own client: proxies, pools,
    /// timeouts, TLS roots (see `tls_client` with the `http-tls` feature).
    pub fn with_client(config: PushConfig, client: reqwest::Client) -> Result<Self, Error> {
        config.validate()?;
        let inbox = Inbox::with_capacity(NAME, config.queue_capacity)?;
        Ok(Self {
            inner: Arc::new(Inner {
                config,
                client,
                inbox,
                signing: None,
                lifecycle: Lifecycle::new(NAME),
            }),
        })
    }

    /// Signs every push this transport sends and refuses every received
    /// push that is not signed with the same key, too old or a replay
    /// (`401`, the handler never runs); see [`WebhookSigning`]. Call it on
    /// the new transport, before it is cloned or subscribed to: a
    /// transport already shared is a [`ErrorKind::Config`](crate::ErrorKind::Config) error.
    ///
    /// ```
    /// use switchboard::transport::http::{HttpTransport, WebhookSigning};
    /// use switchboard::transport::push::PushConfig;
    ///
    /// let signing = WebhookSigning::new(std::env::var("WEBHOOK_KEY").unwrap_or("a test key of 16+ bytes".into()))?;
    /// let transport = HttpTransport::new(PushConfig::default())?.with_signing(signing)?;
    /// # let _ = transport;
    /// # Ok::<(), switchboard::Error>(())
    /// ```
    pub fn with_signing(mut self, signing: WebhookSigning) -> Result<Self, Error> {
        let inner = Arc::get_mut(&mut self.inner).ok_or_else(|| {
            Error::new(
                crate::ErrorKind::Config,
                "http: with_signing on a transport already shared",
            )
        })?;
        inner.signing = Some(signing);
        Ok(self)
    }

    /// The inbox the receiver delivers into and subscriptions read from.
    pub fn inbox(&self) -> &Inbox {
        &self.inner.inbox
    }
}

push::push_transport_impls!(HttpTransport);
