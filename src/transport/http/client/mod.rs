//! JSON request/response over any reqwest-shaped service, as a
//! `tower::Service`.

use std::fmt;
use std::marker::PhantomData;
use std::task::{Context, Poll};
use std::time::Duration;

use reqwest::header::{self, HeaderMap, HeaderValue};
use reqwest::{Method, Url};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tower::Service;

use crate::error::{BoxError, Error, ErrorKind};

mod error;
mod future;
mod request;

pub use error::error_from_reqwest;
pub use future::ResponseFuture;
pub use request::JsonRequest;

use error::error_from_service;

/// Sends each request as JSON and decodes the JSON answer, as a
/// `tower::Service<Req, Response = Resp, Error = Error>`, over `S` — a
/// [`reqwest::Client`] by default, or any
/// `Service<reqwest::Request, Response = reqwest::Response>` (a client under
/// [`InjectTraceContextLayer`](crate::observe::trace), under your own
/// layers) whose error is a `reqwest::Error`, this crate's [`Error`] or
/// any other error (taken as transient).
///
/// # Two kinds of request
///
/// * **A [`JsonRequest`]** (build the service with [`at`](Self::at) and a
///   base URL): each call says its method, a path with `{name}`
///   parameters, a query and an optional body — `GET /orders/{id}?verbose=true`
///   is `JsonRequest::get("/orders/{id}").with_param("id", id).with_query("verbose", true)`.
///   To call with your own request type, map it:
///   `service.map_request(|id: OrderId| JsonRequest::get("/orders/{id}").with_param("id", id))`
///   (`tower::ServiceExt`), then put the resilience stack around that.
/// * **Any other `Serialize` value** (build with [`post`](Self::post) or
///   [`new`](Self::new)): it is the body, sent to the service's one URL with
///   its one method. With `GET`, `DELETE` or `HEAD` only `()` can be sent
///   (no body); anything else fails with [`ErrorKind::Config`].
///
/// A request with a body is sent with `Content-Type: application/json`
/// (or the type set with [`with_content_type`](Self::with_content_type));
/// one without sends no body and no `Content-Type`. Every request says
/// `Accept: application/json`.
///
/// # Answers
///
/// A success is decoded as `Resp`. An answer without a body (`204 No
/// Content`, a `HEAD`'s, an empty body) decodes as JSON `null`: `Ok(())`
/// for `Resp = ()`, `Ok(None)` for an `Option`, a [`ErrorKind::Decode`]
/// error for a type that needs a value. `serde::de::IgnoredAny` takes any
/// JSON answer (a webhook receiver's `{"ok":true}`).
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
/// A REST API, over a client under a layer of your own (an API key here;
/// [`InjectTraceContextLayer`](crate::observe::trace) with feature `otel`
/// fits the same way):
///
/// ```
/// use reqwest::header::HeaderValue;
/// use serde::Deserialize;
/// use switchboard::transport::http::{JsonRequest, JsonService};
/// use tower::{Service, ServiceBuilder, ServiceExt};
///
/// #[derive(Deserialize)]
/// struct Order { id: u64 }
///
/// # tokio::runtime::Runtime::new().unwrap().block_on(async {
/// let client = ServiceBuilder::new()
///     .map_request(|mut request: reqwest::Request| {
///         request.headers_mut().insert("x-api-key", HeaderValue::from_static("secret"));
///         request
///     })
///     .service(reqwest::Client::new());
/// let mut orders = JsonService::<JsonRequest, Order, _>::at(client, "http://127.0.0.1:9/api");
/// let get = JsonRequest::get("/orders/{id}").with_param("id", 7).with_query("verbose", true);
/// // Nothing listens on port 9.
/// let error = orders.ready().await?.call(get).await.err().unwrap();
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
pub struct JsonService<Req, Resp, S = reqwest::Client> {
    inner: S,
    method: Method,
    url: String,
    content_type: HeaderValue,
    timeout: Option<Duration>,
    max_response_bytes: usize,
    _types: PhantomData<fn(Req) -> Resp>,
}

impl<Req, Resp> JsonService<Req, Resp> {
    /// `POST`s requests to `url` on `client`.
    pub fn post(client: reqwest::Client, url: impl Into<String>) -> Self {
        Self::new(client, Method::POST, url)
    }
}

impl<Req, Resp, S> JsonService<Req, Resp, S> {
    /// Sends requests to `url` with `method` on `inner` (a
    /// `reqwest::Client`, where timeouts, pools and TLS are configured, or
    /// a service wrapping one). For a [`JsonRequest`], `url` is the base
    /// its path is appended to and `method` is not used.
    pub fn new(inner: S, method: Method, url: impl Into<String>) -> Self {
        Self {
            inner,
            method,
            url: url.into(),
            content_type: HeaderValue::from_static("application/json"),
            timeout: None,
            max_response_bytes: crate::DEFAULT_MAX_SIZE,
            _types: PhantomData,
        }
    }

    /// Sends [`JsonRequest`]s below `base_url` (`http://orders:8080/api`)
    /// on `inner`.
    pub fn at(inner: S, base_url: impl Into<String>) -> Self {
        Self::new(inner, Method::POST, base_url)
    }

    /// Fails a call with [`ErrorKind::Timeout`] when it takes longer (the
    /// reqwest request's own timeout, which `reqwest::Client` enforces).
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }

    /// The largest answer read (default 1 MiB, like the codec).
    pub fn with_max_response_bytes(mut self, limit: usize) -> Self {
        self.max_response_bytes = limit;
        self
    }

    /// The `Content-Type` of request bodies (default `application/json`;
    /// `application/cloudevents+json` for a CloudEvents webhook, say). The
    /// body is still serialized as JSON.
    pub fn with_content_type(mut self, content_type: HeaderValue) -> Self {
        self.content_type = content_type;
        self
    }

    /// The inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The inner service, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// Gives back the inner service.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<Req, Resp, S> JsonService<Req, Resp, S>
where
    Resp: DeserializeOwned + Send + 'static,
    S: Service<reqwest::Request, Response = reqwest::Response>,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
{
    /// Sends one request: `body` is the serialized JSON, if any.
    fn send(
        &mut self,
        method: Method,
        url: Result<Url, Error>,
        extra: HeaderMap,
        body: Option<Result<Vec<u8>, Error>>,
    ) -> ResponseFuture<Resp> {
        let prepared = (|| {
            let mut request = reqwest::Request::new(method, url?);
            let headers = request.headers_mut();
            headers.insert(header::ACCEPT, HeaderValue::from_static("application/json"));
            if let Some(body) = body {
                headers.insert(header::CONTENT_TYPE, self.content_type.clone());
                *request.body_mut() = Some(body?.into());
            }
            for (name, value) in extra {
                if let Some(name) = name {
                    request.headers_mut().insert(name, value);
                }
            }
            *request.timeout_mut() = self.timeout;
            Ok::<_, Error>(request)
        })();
        let limit = self.max_response_bytes;
        match prepared {
            Ok(request) => {
                let head = request.method() == Method::HEAD;
                let answer = self.inner.call(request);
                ResponseFuture::new(Box::pin(async move {
                    let response = answer.await.map_err(error_from_service)?;
                    future::decode(response, limit, head).await
                }))
            }
            Err(error) => ResponseFuture::new(Box::pin(async move { Err(error) })),
        }
    }
}

fn to_json(body: &impl Serialize) -> Result<Vec<u8>, Error> {
    serde_json::to_vec(body).map_err(|error| {
        Error::new(ErrorKind::Encode, format!("request is not JSON: {error}")).with_source(error)
    })
}

/// Methods whose requests carry no body here.
fn is_bodiless(method: &Method) -> bool {
    matches!(*method, Method::GET | Method::HEAD | Method::DELETE)
}

fn poll_inner<S>(inner: &mut S, cx: &mut Context<'_>) -> Poll<Result<(), Error>>
where
    S: Service<reqwest::Request>,
    S::Error: Into<BoxError>,
{
    inner.poll_ready(cx).map_err(error_from_service)
}

/// A body-only request: `request` is the body, the method and URL are the
/// service's.
impl<Req, Resp, S> Service<Req> for JsonService<Req, Resp, S>
where
    Req: Serialize,
    Resp: DeserializeOwned + Send + 'static,
    S: Service<reqwest::Request, Response = reqwest::Response>,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
{
    type Response = Resp;
    type Error = Error;
    type Future = ResponseFuture<Resp>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        poll_inner(&mut self.inner, cx)
    }

    fn call(&mut self, request: Req) -> Self::Future {
        let url = Url::parse(&self.url).map_err(|error| {
            Error::new(
                ErrorKind::Config,
                format!("HTTP: `{}` is not a URL: {error}", self.url),
            )
            .with_source(error)
        });
        let body = to_json(&request);
        let body = if !is_bodiless(&self.method) {
            Some(body)
        } else if matches!(body.as_deref(), Ok(b"null")) {
            None
        } else {
            Some(Err(Error::new(
                ErrorKind::Config,
                format!(
                    "HTTP: a {} sends no body; call with a JsonRequest to give a path and query",
                    self.method
                ),
            )))
        };
        let method = self.method.clone();
        self.send(method, url, HeaderMap::new(), body)
    }
}

/// A [`JsonRequest`]: its method, path, query, headers and body.
impl<B, Resp, S> Service<JsonRequest<B>> for JsonService<JsonRequest<B>, Resp, S>
where
    B: Serialize,
    Resp: DeserializeOwned + Send + 'static,
    S: Service<reqwest::Request, Response = reqwest::Response>,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
{
    type Response = Resp;
    type Error = Error;
    type Future = ResponseFuture<Resp>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        poll_inner(&mut self.inner, cx)
    }

    fn call(&mut self, request: JsonRequest<B>) -> Self::Future {
        let url = request.url(&self.url);
        let (method, headers, body) = request.into_parts();
        let body = body.map(|body| to_json(&body));
        self.send(method, url, headers, body)
    }
}

impl<Req, Resp, S: Clone> Clone for JsonService<Req, Resp, S> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            method: self.method.clone(),
            url: self.url.clone(),
            content_type: self.content_type.clone(),
            timeout: self.timeout,
            max_response_bytes: self.max_response_bytes,
            _types: PhantomData,
        }
    }
}

impl<Req, Resp, S> fmt::Debug for JsonService<Req, Resp, S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JsonService")
            .field("method", &self.method)
            .field("url", &self.url)
            .field("content_type", &self.content_type)
            .field("timeout", &self.timeout)
            .field("max_response_bytes", &self.max_response_bytes)
            .finish_non_exhaustive()
    }
}
