//! `JsonService` beyond one fixed POST: requests with a method, path
//! parameters, a query and no body; empty answers; its own content type;
//! layers of the caller's under it — all against a real local axum server.

use std::collections::BTreeMap;

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Path, Query};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::{get, post};
use reqwest::header::HeaderValue;
use serde::{Deserialize, Serialize};
use switchboard::transport::http::{JsonRequest, JsonService, error_from_reqwest};
use switchboard::{Effect, Error, ErrorKind};
use tower::{Service, ServiceBuilder, ServiceExt};

/// What the server saw of a request.
#[derive(Debug, Serialize, Deserialize, PartialEq)]
struct Seen {
    method: String,
    id: String,
    query: BTreeMap<String, String>,
    content_type: Option<String>,
    api_key: Option<String>,
    body: String,
}

fn seen(
    method: &str,
    id: String,
    query: BTreeMap<String, String>,
    headers: &HeaderMap,
    body: &Bytes,
) -> Seen {
    let header = |name: &str| {
        headers
            .get(name)
            .map(|value| value.to_str().unwrap().to_owned())
    };
    Seen {
        method: method.into(),
        id,
        query,
        content_type: header("content-type"),
        api_key: header("x-api-key"),
        body: String::from_utf8(body.to_vec()).unwrap(),
    }
}

async fn api() -> String {
    let app = axum::Router::new()
        .route(
            "/orders/{id}",
            get(
                |Path(id): Path<String>,
                 Query(query): Query<BTreeMap<String, String>>,
                 headers: HeaderMap,
                 body: Bytes| async move {
                    Json(seen("GET", id, query, &headers, &body))
                },
            )
            .put(
                |Path(id): Path<String>,
                 Query(query): Query<BTreeMap<String, String>>,
                 headers: HeaderMap,
                 body: Bytes| async move {
                    Json(seen("PUT", id, query, &headers, &body))
                },
            )
            // 204 only for a DELETE that came without body or content type.
            .delete(|headers: HeaderMap, body: Bytes| async move {
                if headers.contains_key("content-type") || !body.is_empty() {
                    StatusCode::BAD_REQUEST
                } else {
                    StatusCode::NO_CONTENT
                }
            }),
        )
        .route(
            "/hooks/echo",
            post(|headers: HeaderMap, body: Bytes| async move {
                Json(seen(
                    "POST",
                    String::new(),
                    BTreeMap::new(),
                    &headers,
                    &body,
                ))
            }),
        )
        .route(
            "/hooks/no-content",
            post(|| async { StatusCode::NO_CONTENT }),
        )
        .route("/hooks/empty", post(|| async { StatusCode::OK }))
        .route("/hooks/text", post(|| async { "ok" }))
        .route("/slow", get(std::future::pending::<()>));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    url
}

async fn call<S, R>(service: &mut S, request: R) -> Result<S::Response, Error>
where
    S: Service<R, Error = Error>,
{
    service.ready().await?.call(request).await
}

#[tokio::test]
async fn a_get_carries_path_and_query_and_no_body() {
    let url = api().await;
    let mut orders = JsonService::<JsonRequest, Seen>::at(reqwest::Client::new(), &url);
    let request = JsonRequest::get("/orders/{id}")
        .with_param("id", "A/7 x")
        .with_query("verbose", true)
        .with_query("note", "a&b");
    let seen = call(&mut orders, request).await.unwrap();
    assert_eq!(seen.method, "GET");
    assert_eq!(seen.id, "A/7 x", "the parameter stays one segment");
    assert_eq!(
        seen.query,
        BTreeMap::from([
            ("note".into(), "a&b".into()),
            ("verbose".into(), "true".into())
        ])
    );
    assert_eq!(seen.content_type, None, "a GET sends no content type");
    assert_eq!(seen.body, "");
}

#[tokio::test]
async fn a_put_sends_its_body_as_json_to_its_path() {
    let url = api().await;
    let mut orders = JsonService::<JsonRequest<BTreeMap<&str, u32>>, Seen>::at(
        reqwest::Client::new(),
        format!("{url}/"),
    );
    let request =
        JsonRequest::put("orders/{id}", BTreeMap::from([("quantity", 3)])).with_param("id", 9);
    let seen = call(&mut orders, request).await.unwrap();
    assert_eq!((seen.method.as_str(), seen.id.as_str()), ("PUT", "9"));
    assert_eq!(seen.content_type.as_deref(), Some("application/json"));
    assert_eq!(seen.body, r#"{"quantity":3}"#);
}

#[tokio::test]
async fn empty_answers_are_unit_and_an_error_for_a_type_that_needs_a_value() {
    let url = api().await;
    let client = reqwest::Client::new();

    let mut orders = JsonService::<JsonRequest, ()>::at(client.clone(), &url);
    let delete = JsonRequest::delete("/orders/{id}").with_param("id", 1);
    call(&mut orders, delete)
        .await
        .expect("204 is Ok(()) for ()");
    let head = JsonRequest::head("/orders/{id}").with_param("id", 1);
    call(&mut orders, head)
        .await
        .expect("a HEAD answer is Ok(())");

    for path in ["/hooks/no-content", "/hooks/empty"] {
        let mut hook = JsonService::<Seen, ()>::post(client.clone(), format!("{url}{path}"));
        let event = seen(
            "POST",
            "e".into(),
            BTreeMap::new(),
            &HeaderMap::new(),
            &Bytes::new(),
        );
        call(&mut hook, event)
            .await
            .unwrap_or_else(|e| panic!("{path}: {e}"));

        let mut optional =
            JsonService::<(), Option<Seen>>::post(client.clone(), format!("{url}{path}"));
        assert_eq!(call(&mut optional, ()).await.unwrap(), None, "{path}");

        let mut needs_value = JsonService::<(), Seen>::post(client.clone(), format!("{url}{path}"));
        let error = call(&mut needs_value, ()).await.unwrap_err();
        assert_eq!(error.kind(), ErrorKind::Decode, "{path}: {error}");
        assert!(error.message().contains("empty"), "{error}");
    }

    // A body that is there but not JSON is still a decode error for ().
    let mut text = JsonService::<(), ()>::post(client, format!("{url}/hooks/text"));
    assert_eq!(
        call(&mut text, ()).await.unwrap_err().kind(),
        ErrorKind::Decode
    );
}

#[tokio::test]
async fn the_content_type_is_settable() {
    let url = api().await;
    let mut hook = JsonService::<BTreeMap<&str, &str>, Seen>::post(
        reqwest::Client::new(),
        format!("{url}/hooks/echo"),
    )
    .with_content_type(HeaderValue::from_static("application/cloudevents+json"));
    let seen = call(&mut hook, BTreeMap::from([("type", "order.placed")]))
        .await
        .unwrap();
    assert_eq!(
        seen.content_type.as_deref(),
        Some("application/cloudevents+json")
    );
    assert_eq!(seen.body, r#"{"type":"order.placed"}"#);
}

#[tokio::test]
async fn a_body_only_get_refuses_a_body_it_cannot_send() {
    let url = api().await;
    let mut get = JsonService::<&str, Seen>::new(
        reqwest::Client::new(),
        reqwest::Method::GET,
        format!("{url}/orders/1"),
    );
    let error = call(&mut get, "a body").await.unwrap_err();
    assert_eq!(error.kind(), ErrorKind::Config, "{error}");

    let mut unit = JsonService::<(), Seen>::new(
        reqwest::Client::new(),
        reqwest::Method::GET,
        format!("{url}/orders/1"),
    );
    let seen = call(&mut unit, ()).await.unwrap();
    assert_eq!((seen.id.as_str(), seen.content_type), ("1", None));
}

#[tokio::test]
async fn layers_of_the_callers_fit_under_the_service() {
    let url = api().await;
    let keyed = ServiceBuilder::new()
        .map_request(|mut request: reqwest::Request| {
            request
                .headers_mut()
                .insert("x-api-key", HeaderValue::from_static("k-1"));
            request
        })
        .service(reqwest::Client::new());
    let mut orders = JsonService::<JsonRequest, Seen, _>::at(keyed, &url);
    let seen = call(&mut orders, JsonRequest::get("/orders/2"))
        .await
        .unwrap();
    assert_eq!(seen.api_key.as_deref(), Some("k-1"));

    // A layer's own error: this crate's Error keeps its kind, any other is
    // transient and may have taken effect.
    let refusing = tower::service_fn(|_: reqwest::Request| async {
        Err::<reqwest::Response, _>(Error::new(ErrorKind::Unauthorized, "no key"))
    });
    let mut orders = JsonService::<JsonRequest, Seen, _>::at(refusing, &url);
    let error = call(&mut orders, JsonRequest::get("/orders/2"))
        .await
        .unwrap_err();
    assert_eq!(
        (error.kind(), error.message()),
        (ErrorKind::Unauthorized, "no key")
    );

    let failing = tower::service_fn(|_: reqwest::Request| async {
        Err::<reqwest::Response, _>(std::io::Error::other("proxy gone"))
    });
    let mut orders = JsonService::<JsonRequest, Seen, _>::at(failing, &url);
    let error = call(&mut orders, JsonRequest::get("/orders/2"))
        .await
        .unwrap_err();
    assert_eq!(error.kind(), ErrorKind::Unavailable);
    assert_eq!(error.effect(), Effect::Unknown);
    assert!(error.message().contains("proxy gone"), "{error}");
}

#[cfg(feature = "otel")]
#[tokio::test]
async fn the_trace_context_layer_fits_under_the_service() {
    use switchboard::observe::trace::InjectTraceContextLayer;

    let url = api().await;
    let traced = ServiceBuilder::new()
        .layer(InjectTraceContextLayer::new())
        .service(reqwest::Client::new());
    let mut orders = JsonService::<JsonRequest, Seen, _>::at(traced, &url)
        .with_timeout(std::time::Duration::from_secs(10));
    let seen = call(&mut orders, JsonRequest::get("/orders/3"))
        .await
        .unwrap();
    assert_eq!(seen.id, "3");
}

#[tokio::test]
async fn a_json_request_answer_over_the_limit_is_refused() {
    let url = api().await;
    let mut orders = JsonService::<JsonRequest, Seen>::at(reqwest::Client::new(), &url)
        .with_max_response_bytes(16);
    let error = call(&mut orders, JsonRequest::get("/orders/4"))
        .await
        .unwrap_err();
    assert_eq!(error.kind(), ErrorKind::Rejected, "{error}");
}

#[tokio::test]
async fn reqwest_failures_map_to_kinds_and_effects_for_callers_of_reqwest() {
    let url = api().await;
    let client = reqwest::Client::new();
    // The request was sent and no answer came: it may have been applied.
    let slow = client
        .get(format!("{url}/slow"))
        .timeout(std::time::Duration::from_millis(100))
        .send()
        .await
        .unwrap_err();
    let error = error_from_reqwest(slow);
    assert_eq!(error.kind(), ErrorKind::Timeout, "{error}");
    assert_eq!(error.effect(), Effect::Unknown);
    assert!(error.is_retryable());

    // Nothing listens any more: never sent.
    let closed = {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        format!("http://{}", listener.local_addr().unwrap())
    };
    let refused = client.get(closed).send().await.unwrap_err();
    let error = error_from_reqwest(refused);
    assert_eq!(
        (error.kind(), error.effect()),
        (ErrorKind::Connection, Effect::NotApplied)
    );
}
