//! The answer to a request that failed authentication, in the caller's own
//! protocol: plain HTTP gets `401` with an RFC 6750 challenge; gRPC gets a
//! trailers-only response with `grpc-status: 16` (UNAUTHENTICATED), because a
//! gRPC client reads the status from the trailers and would report a bare 401
//! as a transport failure instead. The 401 carries the same JSON body as
//! every other HTTP error of the crate (`ErrorResponse`'s), so a client
//! reads one shape of error whichever layer refused.

use http::header::{CONTENT_TYPE, WWW_AUTHENTICATE};
use http::{HeaderMap, HeaderValue, Response, StatusCode};

use super::AuthError;
use crate::error::{Error, ErrorKind, json_error_body};

/// gRPC's UNAUTHENTICATED status code.
const GRPC_UNAUTHENTICATED: &str = "16";

pub(super) fn is_grpc(headers: &HeaderMap) -> bool {
    headers
        .get(CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .is_some_and(|value| value.starts_with("application/grpc"))
}

/// A response body an [`Auth`](super::Auth) refusal can be written into:
/// the JSON error body of a plain HTTP 401, or nothing for gRPC (which
/// reads the refusal from its headers).
///
/// Implemented for axum's body, http-body-util's `Full`, `String`,
/// `Vec<u8>` and `Bytes`, and for tonic's body (which stays empty: a tonic
/// server answers gRPC); for a body of your own, implement
/// [`from_json`](Self::from_json) (or return `Self::default()` to answer
/// with an empty body).
///
/// ```
/// use switchboard::auth::RefusalBody;
///
/// assert_eq!(String::from_json(br#"{"error":{}}"#.to_vec()), r#"{"error":{}}"#);
/// ```
pub trait RefusalBody: Default {
    /// A body holding `json`, the serialized error.
    fn from_json(json: Vec<u8>) -> Self;
}

impl RefusalBody for String {
    fn from_json(json: Vec<u8>) -> Self {
        // serde_json writes UTF-8.
        String::from_utf8(json).unwrap_or_default()
    }
}

impl RefusalBody for Vec<u8> {
    fn from_json(json: Vec<u8>) -> Self {
        json
    }
}

impl RefusalBody for bytes::Bytes {
    fn from_json(json: Vec<u8>) -> Self {
        json.into()
    }
}

#[cfg(feature = "http")]
impl RefusalBody for axum::body::Body {
    fn from_json(json: Vec<u8>) -> Self {
        json.into()
    }
}

#[cfg(any(feature = "http", feature = "file-transfer"))]
impl RefusalBody for http_body_util::Full<bytes::Bytes> {
    fn from_json(json: Vec<u8>) -> Self {
        Self::new(json.into())
    }
}

/// The file-transfer server's body ([`TransferBody`](crate::transfer::TransferBody)),
/// so `AuthLayer` can stand in front of it.
#[cfg(any(feature = "http", feature = "file-transfer"))]
impl<E> RefusalBody for http_body_util::combinators::UnsyncBoxBody<bytes::Bytes, E> {
    fn from_json(json: Vec<u8>) -> Self {
        use http_body_util::BodyExt;
        http_body_util::Full::new(bytes::Bytes::from(json))
            .map_err(|never| match never {})
            .boxed_unsync()
    }
}

#[cfg(feature = "grpc")]
impl RefusalBody for tonic::body::Body {
    fn from_json(_json: Vec<u8>) -> Self {
        // A tonic server answers gRPC, whose refusal is in the headers; a
        // plain HTTP request reaching it gets the 401 without a body.
        Self::default()
    }
}

pub(super) fn refusal<B: RefusalBody>(grpc: bool, error: &AuthError) -> Response<B> {
    let mut response = if grpc {
        Response::new(B::default())
    } else {
        let error = Error::new(ErrorKind::Unauthorized, error.to_string());
        let mut response = Response::new(B::from_json(json_error_body(&error)));
        *response.status_mut() = StatusCode::UNAUTHORIZED;
        response
            .headers_mut()
            .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        response
    };
    let headers = response.headers_mut();
    if grpc {
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
        headers.insert(
            "grpc-status",
            HeaderValue::from_static(GRPC_UNAUTHENTICATED),
        );
        if let Ok(message) = HeaderValue::from_str(&grpc_percent_encode(&error.to_string())) {
            headers.insert("grpc-message", message);
        }
    } else {
        headers.insert(WWW_AUTHENTICATE, challenge(error));
    }
    response
}

/// `Bearer` alone when no credentials were sent (RFC 6750 §3.1), otherwise
/// with `error="invalid_token"` and the reason.
fn challenge(error: &AuthError) -> HeaderValue {
    if matches!(error, AuthError::MissingCredentials) {
        return HeaderValue::from_static("Bearer");
    }
    let description: String = error
        .to_string()
        .chars()
        .map(|c| match c {
            '"' | '\\' => '\'',
            c if c.is_ascii_graphic() || c == ' ' => c,
            _ => '?',
        })
        .collect();
    HeaderValue::from_str(&format!(
        "Bearer error=\"invalid_token\", error_description=\"{description}\""
    ))
    .unwrap_or_else(|_| HeaderValue::from_static("Bearer error=\"invalid_token\""))
}

/// grpc-message is percent-encoded: bytes outside printable ASCII, and `%`.
fn grpc_percent_encode(message: &str) -> String {
    let mut encoded = String::with_capacity(message.len());
    for byte in message.bytes() {
        if (0x20..=0x7e).contains(&byte) && byte != b'%' {
            encoded.push(byte as char);
        } else {
            encoded.push_str(&format!("%{byte:02X}"));
        }
    }
    encoded
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(feature = "http")]
    #[tokio::test]
    async fn an_http_refusal_carries_the_body_error_response_answers() {
        use axum::response::IntoResponse;

        let refused: Response<String> = refusal(false, &AuthError::MissingCredentials);
        assert_eq!(refused.headers()[CONTENT_TYPE], "application/json");
        let same = Error::new(
            ErrorKind::Unauthorized,
            AuthError::MissingCredentials.to_string(),
        );
        let answered = crate::transport::http::ErrorResponse::from(same).into_response();
        assert_eq!(answered.status(), refused.status());
        let body = axum::body::to_bytes(answered.into_body(), 1024)
            .await
            .unwrap();
        assert_eq!(refused.body().as_bytes(), &body[..]);
    }

    #[test]
    fn a_grpc_refusal_has_no_body() {
        let refused: Response<String> = refusal(true, &AuthError::MissingCredentials);
        assert_eq!(refused.body(), "");
        assert_eq!(refused.headers()[CONTENT_TYPE], "application/grpc");
    }

    #[test]
    fn grpc_messages_are_percent_encoded() {
        assert_eq!(grpc_percent_encode("100% sûr"), "100%25 s%C3%BBr");
    }

    #[test]
    fn the_challenge_names_the_reason_and_stays_a_valid_header() {
        let value = challenge(&AuthError::Malformed("bad \"header\"\n".into()));
        assert_eq!(
            value.to_str().unwrap(),
            "Bearer error=\"invalid_token\", error_description=\"the token is not a well-formed JWT: bad 'header'?\""
        );
        assert_eq!(challenge(&AuthError::MissingCredentials), "Bearer");
    }
}
