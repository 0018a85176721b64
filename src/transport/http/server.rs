//! Reading request bodies on the server: a size limit that answers 413, and
//! JSON that answers 400 saying what is wrong.

use axum::body::Body;
use axum::extract::{FromRequest, Request};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use http_body_util::{BodyExt, LengthLimitError, Limited};
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::ErrorResponse;
use crate::error::{Error, ErrorKind};

/// The largest request body [`JsonBody`] reads, as a request extension
/// (add it with `axum::Extension(MaxBodyBytes(n))`); without one the limit is
/// 1 MiB, like the codec's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MaxBodyBytes(pub usize);

/// An axum extractor for a JSON request body that refuses bad input with a
/// typed [`ErrorResponse`]: 413 when the body is over the limit
/// ([`MaxBodyBytes`]), 400 when it is not JSON or not the expected shape —
/// naming the field, as `serde_path_to_error` reports it.
///
/// ```
/// use axum::routing::post;
/// use serde::Deserialize;
/// use switchboard::transport::http::JsonBody;
///
/// #[derive(Deserialize)]
/// struct Order { quantity: u32 }
///
/// let app: axum::Router = axum::Router::new().route(
///     "/orders",
///     post(|JsonBody(order): JsonBody<Order>| async move { order.quantity.to_string() }),
/// );
/// ```
#[derive(Debug, Clone, Copy, Default)]
pub struct JsonBody<T>(pub T);

impl<T, S> FromRequest<S> for JsonBody<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ErrorResponse;

    async fn from_request(request: Request, _state: &S) -> Result<Self, ErrorResponse> {
        let limit = request
            .extensions()
            .get::<MaxBodyBytes>()
            .map_or(crate::DEFAULT_MAX_SIZE, |limit| limit.0);
        let bytes = read_body(request, limit).await?;
        // Plain serde_json first: tracking the path costs on every field, and
        // it is only needed to explain a body that does not decode.
        if let Ok(value) = serde_json::from_slice(&bytes) {
            return Ok(JsonBody(value));
        }
        let deserializer = &mut serde_json::Deserializer::from_slice(&bytes);
        serde_path_to_error::deserialize(deserializer)
            .map(JsonBody)
            .map_err(|error| {
                ErrorResponse::from(Error::new(
                    ErrorKind::Rejected,
                    format!("the request body is not the expected JSON: {error}"),
                ))
            })
    }
}

/// The answer half of [`JsonBody`]: `T` as a JSON body with a status (200
/// unless set) and `Content-Type: application/json`, as an axum
/// `IntoResponse`. The error half is [`ErrorResponse`]; a value that fails
/// to serialize (a map with non-string keys) is answered as a 500
/// [`ErrorResponse`] of kind `encode`.
///
/// ```
/// use axum::http::StatusCode;
/// use axum::response::IntoResponse;
/// use axum::routing::post;
/// use serde::{Deserialize, Serialize};
/// use switchboard::Error;
/// use switchboard::transport::http::{ErrorResponse, JsonBody, JsonResponse};
///
/// #[derive(Deserialize)]
/// struct Order { quantity: u32 }
/// #[derive(Serialize)]
/// struct Placed { id: u64 }
///
/// async fn place(JsonBody(order): JsonBody<Order>) -> Result<JsonResponse<Placed>, ErrorResponse> {
///     if order.quantity == 0 {
///         return Err(Error::permanent("quantity must be positive").into());
///     }
///     Ok(JsonResponse::created(Placed { id: 7 }))
/// }
/// let app: axum::Router = axum::Router::new().route("/orders", post(place));
/// # let _ = app;
///
/// # tokio::runtime::Runtime::new().unwrap().block_on(async {
/// let response = JsonResponse::created(Placed { id: 7 }).into_response();
/// assert_eq!(response.status(), StatusCode::CREATED);
/// assert_eq!(response.headers()["content-type"], "application/json");
/// let body = axum::body::to_bytes(response.into_body(), 1024).await.unwrap();
/// assert_eq!(&body[..], br#"{"id":7}"#);
/// # });
/// ```
#[derive(Debug, Clone, Copy, Default)]
pub struct JsonResponse<T> {
    status: StatusCode,
    body: T,
}

impl<T> JsonResponse<T> {
    /// `body` with `status`.
    pub fn new(status: StatusCode, body: T) -> Self {
        Self { status, body }
    }

    /// `body` with `200 OK`.
    pub fn ok(body: T) -> Self {
        Self::new(StatusCode::OK, body)
    }

    /// `body` with `201 Created`.
    pub fn created(body: T) -> Self {
        Self::new(StatusCode::CREATED, body)
    }

    /// `body` with `202 Accepted`.
    pub fn accepted(body: T) -> Self {
        Self::new(StatusCode::ACCEPTED, body)
    }

    /// The status it is answered with.
    pub fn status(&self) -> StatusCode {
        self.status
    }

    /// The body.
    pub fn body(&self) -> &T {
        &self.body
    }

    /// Gives back the body.
    pub fn into_body(self) -> T {
        self.body
    }
}

impl<T> From<T> for JsonResponse<T> {
    fn from(body: T) -> Self {
        Self::ok(body)
    }
}

impl<T: Serialize> IntoResponse for JsonResponse<T> {
    fn into_response(self) -> Response {
        match serde_json::to_vec(&self.body) {
            Ok(json) => {
                let content_type = [(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("application/json"),
                )];
                (self.status, content_type, json).into_response()
            }
            Err(error) => ErrorResponse::from(
                Error::new(
                    ErrorKind::Encode,
                    format!("the answer is not JSON: {error}"),
                )
                .with_source(error),
            )
            .with_status(StatusCode::INTERNAL_SERVER_ERROR)
            .into_response(),
        }
    }
}

/// Reads a request body of at most `limit` bytes: 413 when it is larger
/// (known from `Content-Length` before reading, or found while reading),
/// 400 when the body breaks off.
pub(super) async fn read_body(request: Request, limit: usize) -> Result<Bytes, ErrorResponse> {
    let declared = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|value| value.to_str().ok()?.parse::<u64>().ok());
    if let Some(length) = declared
        && length > limit as u64
    {
        return Err(too_large(limit));
    }
    let body: Body = request.into_body();
    match Limited::new(body, limit).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(error) if error.downcast_ref::<LengthLimitError>().is_some() => Err(too_large(limit)),
        Err(error) => Err(ErrorResponse::from(Error::new(
            ErrorKind::Rejected,
            format!("the request body could not be read: {error}"),
        ))),
    }
}

fn too_large(limit: usize) -> ErrorResponse {
    ErrorResponse::from(Error::new(
        ErrorKind::Rejected,
        format!("the request body is over the limit of {limit} bytes"),
    ))
    .with_status(StatusCode::PAYLOAD_TOO_LARGE)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    #[tokio::test]
    async fn an_answer_that_is_not_json_is_a_500_saying_so() {
        // JSON object keys must be strings.
        let body = BTreeMap::from([((1, 2), "x")]);
        let response = JsonResponse::ok(body).into_response();
        assert_eq!(response.status(), StatusCode::INTERNAL_SERVER_ERROR);
        let body = axum::body::to_bytes(response.into_body(), 1024)
            .await
            .unwrap();
        let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(json["error"]["kind"], "encode");
    }
}
