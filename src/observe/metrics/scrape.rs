//! The `/metrics` endpoint (feature `http`): an axum handler answering a
//! scrape with whatever the application's exporter renders.
//!
//! The crate records through the `metrics` facade and picks no exporter, so
//! the handler takes the render function: with
//! `metrics-exporter-prometheus` it is `move || handle.render()`.

use axum::http::{HeaderValue, header};
use axum::response::IntoResponse;
use axum::routing::{MethodRouter, get};

/// The content type of the Prometheus text exposition format.
pub const PROMETHEUS_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// A `GET` handler answering each scrape with `render()` as the Prometheus
/// text format, to mount in your own router at the path you choose.
///
/// ```
/// use axum::body::Body;
/// use axum::http::Request;
/// use metrics_exporter_prometheus::PrometheusBuilder;
/// use switchboard::observe::metrics;
/// use tower::ServiceExt;
///
/// # tokio::runtime::Runtime::new().unwrap().block_on(async {
/// // In an application: `PrometheusBuilder::new().install_recorder()?`.
/// let recorder = PrometheusBuilder::new().build_recorder();
/// let prometheus = recorder.handle();
/// ::metrics::with_local_recorder(&recorder, || {
///     ::metrics::counter!(metrics::RETRIES_TOTAL, "kind" => "timeout").increment(1);
/// });
///
/// let app: axum::Router = axum::Router::new()
///     .route("/metrics", metrics::handler(move || prometheus.render()));
/// let scrape = Request::get("/metrics").body(Body::empty()).unwrap();
/// let response = app.oneshot(scrape).await.unwrap();
/// assert_eq!(response.headers()["content-type"], metrics::PROMETHEUS_CONTENT_TYPE);
/// let text = axum::body::to_bytes(response.into_body(), 1 << 20).await.unwrap();
/// let text = String::from_utf8(text.to_vec()).unwrap();
/// assert!(text.contains(r#"switchboard_retries_total{kind="timeout"} 1"#), "{text}");
/// # });
/// ```
pub fn handler<F, S>(render: F) -> MethodRouter<S>
where
    F: Fn() -> String + Clone + Send + Sync + 'static,
    S: Clone + Send + Sync + 'static,
{
    get(move || {
        let text = render();
        async move {
            let content_type = [(
                header::CONTENT_TYPE,
                HeaderValue::from_static(PROMETHEUS_CONTENT_TYPE),
            )];
            (content_type, text).into_response()
        }
    })
}

/// A router serving [`handler`] at `GET /metrics`, to merge into an
/// application's router (`app.merge(metrics::router(...))`) or serve on a
/// port of its own.
///
/// ```
/// use switchboard::observe::metrics;
///
/// let prometheus = metrics_exporter_prometheus::PrometheusBuilder::new()
///     .build_recorder()
///     .handle();
/// let app: axum::Router = axum::Router::new()
///     .route("/health", axum::routing::get(|| async { "ok" }))
///     .merge(metrics::router(move || prometheus.render()));
/// # let _ = app;
/// ```
pub fn router<F>(render: F) -> axum::Router
where
    F: Fn() -> String + Clone + Send + Sync + 'static,
{
    axum::Router::new().route("/metrics", handler(render))
}
