//! The console's routes: the page, its refreshed sections, one dead letter,
//! the JSON API, and the two actions (redrive one, redrive all), which pass
//! the cross-site check, the read-only switch and the operator's token in
//! that order, and are logged with who did them.

use std::sync::Arc;

use axum::Router;
use axum::extract::{OriginalUri, Path, State};
use axum::http::{HeaderMap, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::Serialize;

use super::Sources;
use super::auth::{Refusal, same_origin};
use super::inspect::LetterDetail;
use super::page;
use crate::error::{Error, ErrorKind};

const SCRIPT: &str = include_str!("assets/console.js");
const STYLE: &str = include_str!("assets/console.css");
/// Only the console's own script, style and requests; no framing.
const POLICY: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; form-action 'none'; frame-ancestors 'none'; base-uri 'none'";
/// The longest dead-letter id accepted.
const ID_LIMIT: usize = 256;

type Shared = State<Arc<Sources>>;

pub(super) fn routes(sources: Arc<Sources>) -> Router {
    Router::new()
        .route("/", get(page_route))
        .route("/fragment", get(fragment_route))
        .route(
            "/assets/console.js",
            get(|| async { asset("text/javascript; charset=utf-8", SCRIPT) }),
        )
        .route(
            "/assets/console.css",
            get(|| async { asset("text/css; charset=utf-8", STYLE) }),
        )
        .route("/dead-letters/{topic}/{id}", get(letter_route))
        .route("/api/overview", get(overview_api))
        .route("/api/dead-letters/{topic}", get(list_api))
        .route("/api/dead-letters/{topic}/{id}", get(inspect_api))
        .route("/api/dead-letters/{topic}/{id}/redrive", post(redrive_one))
        .route("/api/dead-letters/{topic}/redrive-all", post(redrive_all))
        .fallback(|| async { refuse(StatusCode::NOT_FOUND, "no such console page") })
        .with_state(sources)
}

/// Where the console is mounted: the request's path before the nest
/// stripped it (`/console` for `/console/fragment`).
fn base(original: &Uri, inner: &Uri) -> String {
    let original = original.path();
    let inner = inner.path();
    let base = if inner == "/" {
        original
    } else {
        original.strip_suffix(inner).unwrap_or("")
    };
    base.trim_end_matches('/').to_owned()
}

fn html(body: String) -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CONTENT_SECURITY_POLICY, POLICY),
            (header::CACHE_CONTROL, "no-store"),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        ],
        body,
    )
        .into_response()
}

fn asset(kind: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, kind),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        ],
        body,
    )
        .into_response()
}

fn json<T: Serialize>(status: StatusCode, value: &T) -> Response {
    match serde_json::to_vec(value) {
        Ok(body) => (
            status,
            [
                (header::CONTENT_TYPE, "application/json"),
                (header::CACHE_CONTROL, "no-store"),
            ],
            body,
        )
            .into_response(),
        Err(error) => refuse(StatusCode::INTERNAL_SERVER_ERROR, &error.to_string()),
    }
}

/// A JSON `{"error": …}` with `status`.
fn refuse(status: StatusCode, message: &str) -> Response {
    json(status, &serde_json::json!({ "error": message }))
}

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        refuse(self.status, &self.message)
    }
}

/// The status a failed dead-letter call answers: the caller's mistake is a
/// 4xx, the broker's trouble a 503 / 504.
fn failed(error: &Error) -> Refusal {
    let status = match error.kind() {
        ErrorKind::NotFound => StatusCode::NOT_FOUND,
        ErrorKind::Config | ErrorKind::Rejected => StatusCode::BAD_REQUEST,
        ErrorKind::Unsupported => StatusCode::NOT_IMPLEMENTED,
        ErrorKind::Timeout => StatusCode::GATEWAY_TIMEOUT,
        _ => StatusCode::SERVICE_UNAVAILABLE,
    };
    Refusal::new(status, error.to_string())
}

impl Sources {
    /// Checks `topic` is one this console shows and `id` (if any) could be
    /// a dead letter's id.
    fn check_names(&self, topic: &str, id: Option<&str>) -> Result<(), Refusal> {
        if !self.dead_letters.contains_key(topic) {
            return Err(Refusal::new(
                StatusCode::NOT_FOUND,
                format!(
                    "unknown topic {topic:?}: this console shows the dead letters of {:?}",
                    self.dead_letters.keys().collect::<Vec<_>>()
                ),
            ));
        }
        if let Some(id) = id
            && (id.is_empty() || id.len() > ID_LIMIT || id.chars().any(char::is_control))
        {
            return Err(Refusal::new(
                StatusCode::BAD_REQUEST,
                format!(
                    "malformed dead-letter id: 1 to {ID_LIMIT} characters, no control characters"
                ),
            ));
        }
        Ok(())
    }

    async fn detail(&self, topic: &str, id: &str) -> Result<LetterDetail, Refusal> {
        self.check_names(topic, Some(id))?;
        let admin = &self.dead_letters[topic];
        let letter = tokio::time::timeout(self.limits.timeout, admin.inspect(topic, id))
            .await
            .map_err(|_| timed_out(self.limits.timeout))?
            .map_err(|error| failed(&error))?;
        Ok(LetterDetail::from(&letter))
    }

    /// The cross-site check, the read-only switch and the token, in that
    /// order; who the token speaks for.
    fn authorize(&self, headers: &HeaderMap) -> Result<String, Refusal> {
        same_origin(headers)?;
        if self.read_only {
            return Err(Refusal::new(
                StatusCode::FORBIDDEN,
                "this console is read-only: actions are off",
            ));
        }
        self.operators.authenticate(headers)
    }
}

impl Sources {
    /// A turn among the console's concurrent reads, or a 503 when none
    /// frees up within the read time limit.
    async fn turn(&self) -> Result<tokio::sync::SemaphorePermit<'_>, Refusal> {
        match tokio::time::timeout(self.limits.timeout, self.reads.acquire()).await {
            Ok(Ok(permit)) => Ok(permit),
            _ => Err(Refusal::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "the console is busy answering other requests; try again",
            )),
        }
    }
}

fn timed_out(limit: std::time::Duration) -> Refusal {
    Refusal::new(
        StatusCode::GATEWAY_TIMEOUT,
        format!(
            "the dead-letter queue did not answer within {} ms",
            limit.as_millis()
        ),
    )
}

async fn page_route(
    State(sources): Shared,
    OriginalUri(original): OriginalUri,
    uri: Uri,
) -> Response {
    let _turn = match sources.turn().await {
        Ok(turn) => turn,
        Err(refusal) => return refusal.into_response(),
    };
    let overview = sources.overview().await;
    html(page::page(&base(&original, &uri), &overview))
}

async fn fragment_route(
    State(sources): Shared,
    OriginalUri(original): OriginalUri,
    uri: Uri,
) -> Response {
    let _turn = match sources.turn().await {
        Ok(turn) => turn,
        Err(refusal) => return refusal.into_response(),
    };
    let overview = sources.overview().await;
    html(page::fragment(
        &page::escape(&base(&original, &uri)),
        &overview,
    ))
}

async fn letter_route(
    State(sources): Shared,
    OriginalUri(original): OriginalUri,
    uri: Uri,
    Path((topic, id)): Path<(String, String)>,
) -> Response {
    let _turn = match sources.turn().await {
        Ok(turn) => turn,
        Err(refusal) => return refusal.into_response(),
    };
    match sources.detail(&topic, &id).await {
        Ok(detail) => html(page::letter_page(
            &base(&original, &uri),
            &sources.service,
            &detail,
        )),
        Err(refusal) => refusal.into_response(),
    }
}

async fn overview_api(State(sources): Shared) -> Response {
    let _turn = match sources.turn().await {
        Ok(turn) => turn,
        Err(refusal) => return refusal.into_response(),
    };
    json(StatusCode::OK, &sources.overview().await)
}

async fn list_api(State(sources): Shared, Path(topic): Path<String>, uri: Uri) -> Response {
    let _turn = match sources.turn().await {
        Ok(turn) => turn,
        Err(refusal) => return refusal.into_response(),
    };
    if let Err(refusal) = sources.check_names(&topic, None) {
        return refusal.into_response();
    }
    let limit = match list_limit(uri.query(), sources.limits.list) {
        Ok(limit) => limit,
        Err(refusal) => return refusal.into_response(),
    };
    let letters = sources.topic_letters(&topic, limit).await;
    match &letters.error {
        Some(error) => refuse(StatusCode::SERVICE_UNAVAILABLE, error),
        None => json(StatusCode::OK, &letters),
    }
}

async fn inspect_api(
    State(sources): Shared,
    Path((topic, id)): Path<(String, String)>,
) -> Response {
    let _turn = match sources.turn().await {
        Ok(turn) => turn,
        Err(refusal) => return refusal.into_response(),
    };
    match sources.detail(&topic, &id).await {
        Ok(detail) => json(StatusCode::OK, &detail),
        Err(refusal) => refusal.into_response(),
    }
}

async fn redrive_one(
    State(sources): Shared,
    headers: HeaderMap,
    Path((topic, id)): Path<(String, String)>,
) -> Response {
    let who = match sources.authorize(&headers) {
        Ok(who) => who,
        Err(refusal) => {
            tracing::warn!(target: "switchboard::console", %topic, %id, reason = %refusal.message, "console redrive refused");
            return refusal.into_response();
        }
    };
    if let Err(refusal) = sources.check_names(&topic, Some(&id)) {
        return refusal.into_response();
    }
    let admin = &sources.dead_letters[&topic];
    let limit = sources.limits.action_timeout;
    match tokio::time::timeout(limit, admin.redrive(&topic, &id)).await {
        Ok(Ok(())) => {
            tracing::info!(target: "switchboard::console", %who, %topic, %id, "console: dead letter redriven");
            json(StatusCode::OK, &serde_json::json!({ "redriven": 1 }))
        }
        Ok(Err(error)) => {
            tracing::warn!(target: "switchboard::console", %who, %topic, %id, %error, "console: redrive failed");
            failed(&error).into_response()
        }
        Err(_) => timed_out(limit).into_response(),
    }
}

async fn redrive_all(
    State(sources): Shared,
    headers: HeaderMap,
    Path(topic): Path<String>,
) -> Response {
    let who = match sources.authorize(&headers) {
        Ok(who) => who,
        Err(refusal) => {
            tracing::warn!(target: "switchboard::console", %topic, reason = %refusal.message, "console redrive-all refused");
            return refusal.into_response();
        }
    };
    if let Err(refusal) = sources.check_names(&topic, None) {
        return refusal.into_response();
    }
    let admin = &sources.dead_letters[&topic];
    let limit = sources.limits.action_timeout;
    match tokio::time::timeout(limit, admin.redrive_all(&topic)).await {
        Ok(Ok(sent)) => {
            tracing::info!(target: "switchboard::console", %who, %topic, sent, "console: dead letters of a topic redriven");
            json(StatusCode::OK, &serde_json::json!({ "redriven": sent }))
        }
        Ok(Err(error)) => {
            tracing::warn!(target: "switchboard::console", %who, %topic, %error, "console: redrive-all failed");
            failed(&error).into_response()
        }
        Err(_) => timed_out(limit).into_response(),
    }
}

/// `?limit=N` (1 to the console's list limit; the limit when absent).
fn list_limit(query: Option<&str>, most: usize) -> Result<usize, Refusal> {
    let bad = |why: String| Refusal::new(StatusCode::BAD_REQUEST, why);
    let mut limit = most;
    for pair in query
        .unwrap_or("")
        .split('&')
        .filter(|pair| !pair.is_empty())
    {
        match pair.split_once('=') {
            Some(("limit", value)) => {
                limit = value
                    .parse()
                    .ok()
                    .filter(|limit| (1..=most).contains(limit))
                    .ok_or_else(|| {
                        bad(format!(
                            "limit wants a number from 1 to {most}, got {value:?}"
                        ))
                    })?;
            }
            _ => {
                return Err(bad(format!(
                    "unknown query parameter {pair:?}; only limit=N"
                )));
            }
        }
    }
    Ok(limit)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn past_its_concurrent_reads_the_console_answers_busy() {
        use tower::ServiceExt;
        let console = super::super::Console::builder("game").build();
        let sources = console.sources.clone();
        let held = sources
            .reads
            .acquire_many(super::super::CONCURRENT_READS as u32)
            .await
            .unwrap();
        let request = || {
            axum::http::Request::get("/api/overview")
                .body(axum::body::Body::empty())
                .unwrap()
        };
        let busy = console.router().oneshot(request()).await.unwrap();
        assert_eq!(busy.status(), StatusCode::SERVICE_UNAVAILABLE);
        drop(held);
        let answered = console.router().oneshot(request()).await.unwrap();
        assert_eq!(answered.status(), StatusCode::OK);
    }

    #[test]
    fn the_base_is_the_mount_point() {
        let uri = |text: &str| text.parse::<Uri>().unwrap();
        assert_eq!(base(&uri("/console"), &uri("/")), "/console");
        assert_eq!(base(&uri("/console/"), &uri("/")), "/console");
        assert_eq!(
            base(&uri("/console/fragment"), &uri("/fragment")),
            "/console"
        );
        assert_eq!(base(&uri("/fragment"), &uri("/fragment")), "");
    }

    #[test]
    fn a_list_limit_is_a_number_within_the_consoles() {
        assert_eq!(list_limit(None, 50).unwrap(), 50);
        assert_eq!(list_limit(Some("limit=7"), 50).unwrap(), 7);
        for bad in ["limit=0", "limit=51", "limit=x", "limit", "offset=3"] {
            assert_eq!(
                list_limit(Some(bad), 50).unwrap_err().status,
                StatusCode::BAD_REQUEST,
                "{bad}"
            );
        }
    }
}
