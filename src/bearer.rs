//! `Authorization: Bearer <token>` (RFC 6750), read the same way by the
//! token verifier and the operator console.

/// The token of an `Authorization` header value, when its scheme is
/// `Bearer` (case-insensitive, RFC 7235) and the token is not empty.
pub(crate) fn token(value: &str) -> Option<&str> {
    let (scheme, token) = value.split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

#[cfg(test)]
mod tests {
    #[test]
    fn only_a_non_empty_bearer_token_is_read() {
        assert_eq!(super::token("Bearer abc"), Some("abc"));
        assert_eq!(super::token("bearer  abc "), Some("abc"));
        assert_eq!(super::token("Basic abc"), None);
        assert_eq!(super::token("Bearer "), None);
        assert_eq!(super::token("Bearer"), None);
    }
}
