//! JSON request/response over reqwest as a `tower::Service`.

use std::fmt;
use std::future::Future;
use std::marker::PhantomData;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures_core::future::BoxFuture;
use reqwest::{Method, header};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tower::Service;

use super::error_from_response;
use crate::error::{Effect, Error, ErrorKind};

/// Sends each request as a JSON body to one URL and decodes the JSON answer,
/// as a `tower::Service<Req, Response = Resp, Error = Error>`.
///
/// Failures are typed (see the [module table](super#statuses-and-errors)):
/// a 5xx, a timeout or a refused connection is retryable; a 4xx is not, and
/// its message is the server's. Each also says whether the request may have
/// taken effect ([`Effect`](crate::Effect)): only a refused connection and
/// a 503, 429 or 408 prove it did not, so a retry layer sends a request
/// that is not idempotent again only after those. An answer that is not the expected JSON is
/// [`ErrorKind::Decode`]; one over the size limit (default 1 MiB) is
/// [`ErrorKind::Rejected`].
///
/// ```
/// use serde::{Deserialize, Serialize};
/// use switchboard::ErrorKind;
/// use switchboard::transport::http::JsonService;
/// use tower::{Service, ServiceExt};
///
/// #[derive(Serialize)]
/// struct Quote { symbol: String }
/// #[derive(Deserialize)]
/// struct Price { cents: u64 }
///
/// # tokio::runtime::Runtime::new().unwrap().block_on(async {
/// // Nothing listens on port 9: the call fails with a retryable error.
/// let mut quote = JsonService::<Quote, Price>::post(reqwest::Client::new(), "http://127.0.0.1:9/quote");
/// let error = quote.ready().await?.call(Quote { symbol: "AAPL".into() }).await.err().unwrap();
/// assert_eq!(error.kind(), ErrorKind::Connection);
/// assert!(error.is_retryable());
/// # Ok::<(), switchboard::Error>(())
/// # }).unwrap();
/// ```
///
/// Behind the resilience stack it stays `Clone + Send + Sync`, so one
/// client (one breaker, one retry budget) can sit in axum's state and be
/// cloned for each request:
///
/// ```
/// use axum::extract::State;
/// use axum::routing::post;
/// use axum::Router;
/// use serde::{Deserialize, Serialize};
/// use switchboard::middleware::{Client, Resilience};
/// use switchboard::transport::http::{ErrorResponse, JsonService};
/// use switchboard::Error;
/// use tower::ServiceExt;
///
/// #[derive(Clone, Serialize, Deserialize)]
/// struct Quote { symbol: String }
/// #[derive(Serialize, Deserialize)]
/// struct Price { cents: u64 }
///
/// type Market = Client<JsonService<Quote, Price>>;
///
/// async fn price(State(market): State<Market>) -> Result<axum::Json<Price>, ErrorResponse> {
///     let quote = Quote { symbol: "AAPL".into() };
///     Ok(axum::Json(market.oneshot(quote).await?))
/// }
///
/// let resilience = Resilience::from_yaml("timeouts:\n  market: 50\n")?;
/// let market: Market = resilience.client(
///     "market",
///     JsonService::post(reqwest::Client::new(), "http://127.0.0.1:9/quote"),
/// );
/// let app: Router = Router::new().route("/price", post(price)).with_state(market);
/// # let _ = app;
/// # Ok::<(), Error>(())
/// ```
pub struct JsonService<Req, Resp> {
    client: reqwest::Client,
    method: Method,
    url: String,
    timeout: Option<Duration>,
    max_response_bytes: usize,
    _types: PhantomData<fn(Req) -> Resp>,
}

impl<Req, Resp> JsonService<Req, Resp> {
    /// Sends requests to `url` with `method` on `client` (where timeouts,
    /// pools and, later, TLS are configured).
    pub fn new(client: reqwest::Client, method: Method, url: impl Into<String>) -> Self {
        Self {
            client,
            method,
            url: url.into(),
            timeout: None,
            max_response_bytes: crate::DEFAULT_MAX_SIZE,
            _types: PhantomData,
        }
    }

    /// `POST`s requests to `url`.
    pub fn post(client: reqwest::Client, url: impl Into<String>) -> Self {
        Self::new(client, Method::POST, url)
    }

    /// Fails a call with [`ErrorKind::Timeout`] when it takes longer.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }

    /// The largest answer read (default 1 MiB, like the codec).
    pub fn with_max_response_bytes(mut self, limit: usize) -> Self {
        self.max_response_bytes = limit;
        self
    }

    /// The client.
    pub fn get_ref(&self) -> &reqwest::Client {
        &self.client
    }

    /// The client, mutably.
    pub fn get_mut(&mut self) -> &mut reqwest::Client {
        &mut self.client
    }

    /// Gives back the client.
    pub fn into_inner(self) -> reqwest::Client {
        self.client
    }
}

impl<Req, Resp> Clone for JsonService<Req, Resp> {
    fn clone(&self) -> Self {
        Self {
            client: self.client.clone(),
            method: self.method.clone(),
            url: self.url.clone(),
            timeout: self.timeout,
            max_response_bytes: self.max_response_bytes,
            _types: PhantomData,
        }
    }
}

impl<Req, Resp> fmt::Debug for JsonService<Req, Resp> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JsonService")
            .field("method", &self.method)
            .field("url", &self.url)
            .field("timeout", &self.timeout)
            .field("max_response_bytes", &self.max_response_bytes)
            .finish_non_exhaustive()
    }
}

impl<Req, Resp> Service<Req> for JsonService<Req, Resp>
where
    Req: Serialize,
    Resp: DeserializeOwned + Send + 'static,
{
    type Response = Resp;
    type Error = Error;
    type Future = ResponseFuture<Resp>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        // reqwest's pool waits for a connection inside each call.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Req) -> Self::Future {
        let body = serde_json::to_vec(&request).map_err(|error| {
            Error::new(ErrorKind::Encode, format!("request is not JSON: {error}"))
                .with_source(error)
        });
        let mut builder = self
            .client
            .request(self.method.clone(), &self.url)
            .header(header::CONTENT_TYPE, "application/json")
            .header(header::ACCEPT, "application/json");
        if let Some(timeout) = self.timeout {
            builder = builder.timeout(timeout);
        }
        let limit = self.max_response_bytes;
        ResponseFuture {
            inner: Box::pin(async move {
                let response = builder.body(body?).send().await.map_err(from_reqwest)?;
                let status = response.status();
                if !status.is_success() {
                    // Only a failure needs the headers (Retry-After).
                    let headers = response.headers().clone();
                    let bytes = read_limited(response, limit).await?;
                    return Err(error_from_response(status, &headers, &bytes));
                }
                let bytes = read_limited(response, limit).await?;
                serde_json::from_slice(&bytes).map_err(|error| {
                    Error::new(
                        ErrorKind::Decode,
                        format!("the answer is not the expected JSON: {error}"),
                    )
                    .with_source(error)
                })
            }),
        }
    }
}

/// Reads a response body, refusing it once it passes `limit` bytes.
async fn read_limited(mut response: reqwest::Response, limit: usize) -> Result<Bytes, Error> {
    let too_large = |size: u64| {
        Error::new(
            ErrorKind::Rejected,
            format!("the answer of {size} bytes or more is over the limit of {limit} bytes"),
        )
    };
    if let Some(length) = response.content_length()
        && length > limit as u64
    {
        return Err(too_large(length));
    }
    // A small answer usually arrives as one chunk: kept as it is, not copied.
    let Some(first) = response.chunk().await.map_err(from_reqwest)? else {
        return Ok(Bytes::new());
    };
    if first.len() > limit {
        return Err(too_large(first.len() as u64));
    }
    let Some(second) = response.chunk().await.map_err(from_reqwest)? else {
        return Ok(first);
    };
    let mut body = BytesMut::from(first);
    let mut next = Some(second);
    while let Some(chunk) = next {
        if body.len() + chunk.len() > limit {
            return Err(too_large((body.len() + chunk.len()) as u64));
        }
        body.extend_from_slice(&chunk);
        next = response.chunk().await.map_err(from_reqwest)?;
    }
    Ok(body.freeze())
}

/// Maps a reqwest failure (no answer, or a broken one) into an [`Error`].
pub(super) fn from_reqwest(error: reqwest::Error) -> Error {
    #[cfg(feature = "http-tls")]
    if let Some(failure) = crate::tls::tls_failure(&error) {
        // An untrusted certificate stays untrusted: retrying cannot help.
        return Error::new(
            ErrorKind::Rejected,
            format!("HTTP: the TLS handshake failed: {failure}"),
        )
        .with_source(error);
    }
    // Only a failed connect proves the request was never sent; a timeout or
    // a connection that broke afterwards may have left it applied.
    let (kind, effect) = if error.is_connect() {
        let kind = if error.is_timeout() {
            ErrorKind::Timeout
        } else {
            ErrorKind::Connection
        };
        (kind, Effect::NotApplied)
    } else if error.is_timeout() {
        (ErrorKind::Timeout, Effect::Unknown)
    } else if error.is_request() || error.is_body() {
        (ErrorKind::Connection, Effect::Unknown)
    } else if error.is_builder() {
        (ErrorKind::Config, Effect::NotApplied)
    } else {
        (ErrorKind::Unavailable, Effect::Unknown)
    };
    Error::new(kind, format!("HTTP: {error}"))
        .with_effect(effect)
        .with_source(error)
}

/// The future of a [`JsonService`] call.
pub struct ResponseFuture<Resp> {
    inner: BoxFuture<'static, Result<Resp, Error>>,
}

impl<Resp> fmt::Debug for ResponseFuture<Resp> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}

impl<Resp> Future for ResponseFuture<Resp> {
    type Output = Result<Resp, Error>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        self.inner.as_mut().poll(cx)
    }
}
