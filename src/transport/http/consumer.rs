//! The receiving side: `POST /events/{topic}` delivering into the
//! transport's inbox, and serving it.

use std::future::Future;
use std::net::SocketAddr;
#[cfg(feature = "http-tls")]
use std::sync::Arc;

use axum::Router;
use axum::extract::rejection::PathRejection;
use axum::extract::{Path, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{Route, post};
use std::convert::Infallible;
use tokio::net::TcpListener;
use tower::{Layer, Service};

use super::server::read_body;
use super::{ATTEMPT, ErrorResponse, GROUP, HEADERS, HttpTransport, REFUSED, REFUSED_QUEUE_FULL};
use crate::envelope::Headers;
use crate::error::{Error, ErrorKind};
use crate::transport::RawMessage;
use crate::transport::push::{self, Inbox, QueueFull};

impl HttpTransport {
    /// The receiving routes (`POST /events/{topic}`), to merge into your own
    /// axum app.
    pub fn router(&self) -> Router {
        let receiver = Receiver {
            inbox: self.inner.inbox.clone(),
            max_body: self.inner.config.max_body_bytes,
            signing: self.inner.signing.clone(),
        };
        Router::new()
            .route("/events/{topic}", post(receive))
            .with_state(receiver)
    }

    /// Serves [`router`](Self::router) on `listener` (HTTP/1.1 and h2c)
    /// until the future is dropped or the listener fails.
    pub fn serve(&self, listener: TcpListener) -> impl Future<Output = Result<(), Error>> + use<> {
        self.serve_router(listener, self.router())
    }

    /// Like [`serve`](Self::serve), with `layer` around the push route:
    /// authentication ([`AuthLayer`](crate::auth::AuthLayer), feature
    /// `auth`, or your own), limits, tracing. A request the layer answers
    /// itself (a `401` without a valid token) never reaches the inbox, so no
    /// handler runs. For TLS, layer [`router`](Self::router) yourself and
    /// pass it to `serve_tls_with_shutdown`.
    ///
    /// ```no_run
    /// # #[cfg(feature = "auth")]
    /// # async fn run(transport: switchboard::transport::http::HttpTransport, verifier: std::sync::Arc<switchboard::auth::TokenVerifier>) -> Result<(), switchboard::Error> {
    /// let listener = tokio::net::TcpListener::bind("0.0.0.0:8080").await.unwrap();
    /// transport.serve_with_layer(listener, switchboard::auth::AuthLayer::new(verifier)).await
    /// # }
    /// ```
    pub fn serve_with_layer<L>(
        &self,
        listener: TcpListener,
        layer: L,
    ) -> impl Future<Output = Result<(), Error>> + use<L>
    where
        L: Layer<Route> + Clone + Send + Sync + 'static,
        L::Service: Service<Request> + Clone + Send + Sync + 'static,
        <L::Service as Service<Request>>::Response: IntoResponse + 'static,
        <L::Service as Service<Request>>::Error: Into<Infallible> + 'static,
        <L::Service as Service<Request>>::Future: Send + 'static,
    {
        self.serve_router(listener, self.router().layer(layer))
    }

    fn serve_router(
        &self,
        listener: TcpListener,
        router: Router,
    ) -> impl Future<Output = Result<(), Error>> + use<> {
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
    /// [`tls_server_config`](super::tls_server_config), until the transport
    /// is closed (then gracefully, see
    /// [`serve_tls_with_shutdown`](super::serve_tls_with_shutdown)).
    #[cfg(feature = "http-tls")]
    pub fn serve_tls(
        &self,
        listener: TcpListener,
        config: Arc<rustls::ServerConfig>,
    ) -> impl Future<Output = Result<(), Error>> + use<> {
        super::serve_tls_with_shutdown(
            listener,
            self.router(),
            config,
            self.inner.lifecycle.closed(),
        )
    }

    /// Binds `address` and [`serve`](Self::serve)s on it.
    pub async fn serve_on(&self, address: SocketAddr) -> Result<(), Error> {
        self.serve(push::listen(address).await?).await
    }
}

#[derive(Clone)]
struct Receiver {
    inbox: Inbox,
    max_body: usize,
    signing: Option<super::WebhookSigning>,
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
    let signature_headers = receiver.signing.as_ref().map(|_| request.headers().clone());
    let body = read_body(request, receiver.max_body).await?;
    if let (Some(signing), Some(headers)) = (&receiver.signing, signature_headers) {
        // Before the inbox: a refused push never reaches a handler.
        signing
            .verify(&headers, &body)
            .map_err(ErrorResponse::from)?;
    }
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
