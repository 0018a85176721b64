//! The future of a call, and reading the answer within the size limit.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use futures_core::future::BoxFuture;
use reqwest::StatusCode;
use serde::de::DeserializeOwned;

use super::error::error_from_reqwest;
use crate::error::{Error, ErrorKind};
use crate::transport::http::error_from_response;

/// The future of a [`JsonService`](crate::transport::http::JsonService) call.
pub struct ResponseFuture<Resp> {
    inner: BoxFuture<'static, Result<Resp, Error>>,
}

impl<Resp> ResponseFuture<Resp> {
    pub(super) fn new(inner: BoxFuture<'static, Result<Resp, Error>>) -> Self {
        Self { inner }
    }
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

/// Decodes an answer: an error status into its [`Error`], a success into
/// `Resp`. An answer without a body (204, 205, a `HEAD`'s, or an empty
/// body) decodes as JSON `null`, which `()` and `Option<T>` accept.
pub(super) async fn decode<Resp: DeserializeOwned>(
    response: reqwest::Response,
    limit: usize,
    head: bool,
) -> Result<Resp, Error> {
    let status = response.status();
    if !status.is_success() {
        // Only a failure needs the headers (Retry-After).
        let headers = response.headers().clone();
        let bytes = read_limited(response, limit).await?;
        return Err(error_from_response(status, &headers, &bytes));
    }
    let no_body = head || matches!(status, StatusCode::NO_CONTENT | StatusCode::RESET_CONTENT);
    let bytes = if no_body {
        Bytes::new()
    } else {
        read_limited(response, limit).await?
    };
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return serde_json::from_slice(b"null").map_err(|error| {
            Error::new(
                ErrorKind::Decode,
                format!("the answer ({status}) is empty, and JSON was expected: {error}"),
            )
            .with_source(error)
        });
    }
    serde_json::from_slice(&bytes).map_err(|error| {
        Error::new(
            ErrorKind::Decode,
            format!("the answer is not the expected JSON: {error}"),
        )
        .with_source(error)
    })
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
    let Some(first) = response.chunk().await.map_err(error_from_reqwest)? else {
        return Ok(Bytes::new());
    };
    if first.len() > limit {
        return Err(too_large(first.len() as u64));
    }
    let Some(second) = response.chunk().await.map_err(error_from_reqwest)? else {
        return Ok(first);
    };
    let mut body = BytesMut::from(first);
    let mut next = Some(second);
    while let Some(chunk) = next {
        if body.len() + chunk.len() > limit {
            return Err(too_large((body.len() + chunk.len()) as u64));
        }
        body.extend_from_slice(&chunk);
        next = response.chunk().await.map_err(error_from_reqwest)?;
    }
    Ok(body.freeze())
}
