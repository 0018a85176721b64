//! The webhook event-push transport: `publish` POSTs the message to
//! `/events/{topic}` at each of the topic's endpoints; the receiver hands it
//! to a subscriber and answers once the handler has settled it, or at once
//! with 503 when the group's queue is full.

use std::fmt::Write as _;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use async_trait::async_trait;
use axum::Router;
use axum::extract::rejection::PathRejection;
use axum::extract::{Path, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use tokio::net::TcpListener;

use super::client::error_from_reqwest;
use super::server::read_body;
use super::{ErrorResponse, error_from_response};
use crate::envelope::Headers;
use crate::error::{Error, ErrorKind};
use crate::topology::Topology;
use crate::transport::push::{
    self, Inbox, PushConfig, PushRequest, PushSender, QueueFull, SendError,
};
use crate::transport::{
    Capabilities, DeliveryMode, Lifecycle, Publisher, RawMessage, SubscribeOptions, Subscriber,
    Subscription, Transport, TransportHealth,
};

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
/// never got: see [`push`](crate::transport::push).
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
                lifecycle: Lifecycle::new(NAME),
            }),
        })
    }

    /// The inbox the receiver delivers into and subscriptions read from.
    pub fn inbox(&self) -> &Inbox {
        &self.inner.inbox
    }

    /// The receiving routes (`POST /events/{topic}`), to merge into your own
    /// axum app.
    pub fn router(&self) -> Router {
        let receiver = Receiver {
            inbox: self.inner.inbox.clone(),
            max_body: self.inner.config.max_body_bytes,
        };
        Router::new()
            .route("/events/{topic}", post(receive))
            .with_state(receiver)
    }

    /// Serves [`router`](Self::router) on `listener` (HTTP/1.1 and h2c)
    /// until the future is dropped or the listener fails.
    pub fn serve(&self, listener: TcpListener) -> impl Future<Output = Result<(), Error>> + use<> {
        let router = self.router();
        let closed = self.inner.lifecycle.closed();
        async move {
            let serving = axum::serve(listener, router).with_graceful_shutdown(closed);
            serving.await.map_err(|error| {
                Error::new(ErrorKind::Connection, format!("HTTP push server: {error}"))
                    .with_source(error)
            })
        }
    }

    /// Serves [`router`](Self::router) over TLS (HTTP/1.1 and HTTP/2 by
    /// ALPN) on `listener`, with a config from
    /// [`tls_server_config`](super::tls_server_config); see
    /// [`serve_tls`](super::serve_tls).
    #[cfg(feature = "http-tls")]
    pub fn serve_tls(
        &self,
        listener: TcpListener,
        config: Arc<rustls::ServerConfig>,
    ) -> impl Future<Output = Result<(), Error>> + use<> {
        super::serve_tls(listener, self.router(), config)
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
}

#[async_trait]
impl PushSender for HttpTransport {
    async fn send(&self, url: &str, request: PushRequest<'_>) -> Result<(), SendError> {
        let url = format!("{}/events/{}", url.trim_end_matches('/'), request.topic);
        let mut builder = self
            .inner
            .client
            .post(url)
            .header(header::CONTENT_TYPE, "application/octet-stream")
            .header(ATTEMPT, request.attempt)
            .body(request.message.body.clone());
        if !request.message.headers.is_empty() {
            builder = builder.header(HEADERS, ascii_json(&request.message.headers));
        }
        if let Some(group) = request.group {
            builder = builder.header(GROUP, group);
        }
        let response = builder.send().await.map_err(error_from_reqwest)?;
        let status = response.status();
        if status.is_success() {
            return Ok(());
        }
        let headers = response.headers().clone();
        // Error bodies are small; a broken one still leaves the status.
        let body = response.bytes().await.unwrap_or_default();
        let error = error_from_response(status, &headers, &body);
        let refused = status == StatusCode::SERVICE_UNAVAILABLE
            && headers
                .get(REFUSED)
                .is_some_and(|value| value == REFUSED_QUEUE_FULL);
        Err(if refused {
            SendError::Refused(error)
        } else {
            SendError::Failed(error)
        })
    }
}

/// JSON with every character outside printable ASCII escaped, which JSON
/// allows inside strings (and nowhere else is there any).
fn ascii_json(headers: &Headers) -> String {
    let json = serde_json::to_string(headers).unwrap_or_default();
    let mut out = String::with_capacity(json.len());
    for ch in json.chars() {
        if (' '..='~').contains(&ch) {
            out.push(ch);
        } else {
            let mut units = [0u16; 2];
            for unit in ch.encode_utf16(&mut units) {
                let _ = write!(out, "\\u{unit:04x}");
            }
        }
    }
    out
}

#[async_trait]
impl Publisher for HttpTransport {
    async fn publish(&self, topic: &str, message: RawMessage) -> Result<(), Error> {
        self.inner.lifecycle.check()?;
        push::publish(self, &self.inner.config, topic, &message).await
    }
}

#[async_trait]
impl Subscriber for HttpTransport {
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
impl Transport for HttpTransport {
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

#[derive(Clone)]
struct Receiver {
    inbox: Inbox,
    max_body: usize,
}

async fn receive(
    State(receiver): State<Receiver>,
    topic: Result<Path<String>, PathRejection>,
    request: Request,
) -> Response {
    let topic = match topic {
        Ok(Path(topic)) => topic,
        Err(rejection) => {
            return bad_request(format!("bad topic in the path: {rejection}")).into_response();
        }
    };
    match deliver(&receiver, &topic, request).await {
        Ok(()) => StatusCode::NO_CONTENT.into_response(),
        Err(refusal) => {
            let full = QueueFull::of(refusal.error()).is_some();
            let mut response = refusal.into_response();
            if full {
                response
                    .headers_mut()
                    .insert(REFUSED, HeaderValue::from_static(REFUSED_QUEUE_FULL));
            }
            response
        }
    }
}

async fn deliver(receiver: &Receiver, topic: &str, request: Request) -> Result<(), ErrorResponse> {
    let headers = parse_headers(request.headers())?;
    let group = text_header(request.headers(), GROUP)?;
    let attempt = match text_header(request.headers(), ATTEMPT)? {
        None => 1,
        Some(text) => text.parse::<u32>().map_err(|_| {
            bad_request(format!(
                "header {ATTEMPT} must be a whole number, got {text:?}"
            ))
        })?,
    };
    let body = read_body(request, receiver.max_body).await?;
    let message = RawMessage { headers, body };
    receiver
        .inbox
        .deliver(topic, group.as_deref(), message, attempt)
        .await
        .map_err(ErrorResponse::from)
}

fn parse_headers(headers: &HeaderMap) -> Result<Headers, ErrorResponse> {
    let Some(text) = text_header(headers, HEADERS)? else {
        return Ok(Headers::new());
    };
    serde_json::from_str(&text).map_err(|error| {
        bad_request(format!(
            "header {HEADERS} must be a JSON object of strings: {error}"
        ))
    })
}

fn text_header(headers: &HeaderMap, name: &str) -> Result<Option<String>, ErrorResponse> {
    headers
        .get(name)
        .map(|value: &HeaderValue| {
            value
                .to_str()
                .map(str::to_owned)
                .map_err(|_| bad_request(format!("header {name} must be ASCII")))
        })
        .transpose()
}

fn bad_request(message: String) -> ErrorResponse {
    ErrorResponse::from(Error::new(ErrorKind::Rejected, message))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_json_is_ascii_and_round_trips_anything() {
        let headers: Headers = [
            (
                "Cf-Note".to_owned(),
                "spaces ;:,=/ \"quotes\" \\ ü✓ 😀 \t\n\u{7f}".to_owned(),
            ),
            ("lower".to_owned(), String::new()),
        ]
        .into_iter()
        .collect();
        let text = ascii_json(&headers);
        assert!(HeaderValue::from_str(&text).is_ok(), "{text}");
        assert!(text.bytes().all(|b| (b' '..=b'~').contains(&b)), "{text}");
        let back: Headers = serde_json::from_str(&text).unwrap();
        assert_eq!(back, headers);
    }
}
