//! The answer to a request that failed authentication, in the caller's own
//! protocol: plain HTTP gets `401` with an RFC 6750 challenge; gRPC gets a
//! trailers-only response with `grpc-status: 16` (UNAUTHENTICATED), because a
//! gRPC client reads the status from the trailers and would report a bare 401
//! as a transport failure instead.

use http::header::{CONTENT_TYPE, WWW_AUTHENTICATE};
use http::{HeaderMap, HeaderValue, Response, StatusCode};

use super::AuthError;

/// gRPC's UNAUTHENTICATED status code.
const GRPC_UNAUTHENTICATED: &str = "16";

pub(super) fn is_grpc(headers: &HeaderMap) -> bool {
    headers
        .get(CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .is_some_and(|value| value.starts_with("application/grpc"))
}

pub(super) fn refusal<B: Default>(grpc: bool, error: &AuthError) -> Response<B> {
    let mut response = Response::new(B::default());
    if !grpc {
        *response.status_mut() = StatusCode::UNAUTHORIZED;
    }
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
