//! Reading request bodies on the server: a size limit that answers 413, and
//! JSON that answers 400 saying what is wrong.

use axum::body::Body;
use axum::extract::{FromRequest, Request};
use axum::http::{StatusCode, header};
use bytes::Bytes;
use http_body_util::{BodyExt, LengthLimitError, Limited};
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
