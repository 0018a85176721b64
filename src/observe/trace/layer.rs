//! The tower layers that carry trace context in HTTP headers and gRPC
//! metadata: [`InjectTraceContextLayer`] for clients,
//! [`ExtractTraceContextLayer`] for servers.

use std::task::{Context, Poll};

use http::{HeaderMap, HeaderValue, Method};
use opentelemetry::context::{FutureExt as _, WithContext};
use tower::{Layer, Service};
use tracing::Instrument;
use tracing::instrument::Instrumented;

use super::{
    SERVER_FILTERED, TRACEPARENT, TRACESTATE, handler_context, headers_of_span_or_current,
    parse_traceparent,
};

/// A request whose headers trace context can be written to and read from.
pub trait HttpRequest {
    /// The headers.
    fn headers(&self) -> &HeaderMap;
    /// The headers, mutably.
    fn headers_mut(&mut self) -> &mut HeaderMap;
    /// The method, for the span.
    fn method(&self) -> &Method;
    /// The path (servers) or URL (clients), for the span.
    fn target(&self) -> String;
}

impl<B> HttpRequest for http::Request<B> {
    fn headers(&self) -> &HeaderMap {
        self.headers()
    }
    fn headers_mut(&mut self) -> &mut HeaderMap {
        self.headers_mut()
    }
    fn method(&self) -> &Method {
        self.method()
    }
    fn target(&self) -> String {
        self.uri().to_string()
    }
}

#[cfg(feature = "http")]
impl HttpRequest for reqwest::Request {
    fn headers(&self) -> &HeaderMap {
        self.headers()
    }
    fn headers_mut(&mut self) -> &mut HeaderMap {
        self.headers_mut()
    }
    fn method(&self) -> &Method {
        self.method()
    }
    fn target(&self) -> String {
        self.url().to_string()
    }
}

/// Opens an `http.client` span around each call and writes its context into
/// the request's `traceparent` / `tracestate` headers; see the
/// [module docs](super).
///
/// ```
/// use switchboard::observe::trace::InjectTraceContextLayer;
/// use tower::ServiceBuilder;
///
/// // reqwest::Client is a tower Service<reqwest::Request>.
/// let client = ServiceBuilder::new()
///     .layer(InjectTraceContextLayer::new())
///     .service(reqwest::Client::new());
/// # let _ = client;
/// ```
#[derive(Debug, Clone)]
pub struct InjectTraceContext<S> {
    inner: S,
}

impl<S> InjectTraceContext<S> {
    /// Wraps `inner`.
    pub fn new(inner: S) -> Self {
        Self { inner }
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

impl<S, R> Service<R> for InjectTraceContext<S>
where
    S: Service<R>,
    R: HttpRequest,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Instrumented<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: R) -> Self::Future {
        let span = tracing::info_span!(
            "http.client",
            otel.kind = "client",
            http.method = %request.method(),
            url = %request.target(),
        );
        if let Some((parent, state)) = headers_of_span_or_current(&span) {
            let headers = request.headers_mut();
            if let Ok(value) = HeaderValue::from_str(&parent) {
                headers.insert(TRACEPARENT, value);
            }
            match state.map(|state| HeaderValue::from_str(&state)) {
                Some(Ok(value)) => {
                    headers.insert(TRACESTATE, value);
                }
                _ => {
                    headers.remove(TRACESTATE);
                }
            }
        }
        let future = span.in_scope(|| self.inner.call(request));
        future.instrument(span)
    }
}

/// Builds [`InjectTraceContext`].
#[derive(Debug, Clone, Copy, Default)]
pub struct InjectTraceContextLayer;

impl InjectTraceContextLayer {
    /// The layer.
    pub fn new() -> Self {
        Self
    }
}

impl<S> Layer<S> for InjectTraceContextLayer {
    type Service = InjectTraceContext<S>;

    fn layer(&self, inner: S) -> InjectTraceContext<S> {
        InjectTraceContext::new(inner)
    }
}

/// Opens an `http.server` span around each request, continuing the trace
/// of its `traceparent` / `tracestate` headers; see the
/// [module docs](super). The handler runs inside that span, so what it
/// publishes continues the caller's trace.
///
/// ```
/// use switchboard::observe::trace::ExtractTraceContextLayer;
///
/// let app: axum::Router = axum::Router::new()
///     .route("/orders", axum::routing::post(|| async { "ok" }))
///     .layer(ExtractTraceContextLayer::new());
/// # let _ = app;
/// ```
#[derive(Debug, Clone)]
pub struct ExtractTraceContext<S> {
    inner: S,
}

impl<S> ExtractTraceContext<S> {
    /// Wraps `inner`.
    pub fn new(inner: S) -> Self {
        Self { inner }
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

impl<S, R> Service<R> for ExtractTraceContext<S>
where
    S: Service<R>,
    R: HttpRequest,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Instrumented<WithContext<S::Future>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: R) -> Self::Future {
        let span = tracing::info_span!(
            "http.server",
            otel.kind = "server",
            http.method = %request.method(),
            path = %request.target(),
        );
        let headers = request.headers();
        let header = |name| {
            headers
                .get(name)
                .and_then(|value: &HeaderValue| value.to_str().ok())
        };
        let remote =
            header(TRACEPARENT).and_then(|parent| parse_traceparent(parent, header(TRACESTATE)));
        let context = handler_context(
            &span,
            remote,
            &SERVER_FILTERED,
            "http.server",
            "switchboard::observe::trace",
        );
        let future = span.in_scope(|| {
            let _attached = context.clone().attach();
            self.inner.call(request)
        });
        future.with_context(context).instrument(span)
    }
}

/// Builds [`ExtractTraceContext`].
#[derive(Debug, Clone, Copy, Default)]
pub struct ExtractTraceContextLayer;

impl ExtractTraceContextLayer {
    /// The layer.
    pub fn new() -> Self {
        Self
    }
}

impl<S> Layer<S> for ExtractTraceContextLayer {
    type Service = ExtractTraceContext<S>;

    fn layer(&self, inner: S) -> ExtractTraceContext<S> {
        ExtractTraceContext::new(inner)
    }
}
