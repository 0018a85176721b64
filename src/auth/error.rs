//! Why a token was refused, one variant per reason, so a caller (or a log
//! line) can tell an expired session from a forged token.

use crate::{Error, ErrorKind};

/// Why a request's credentials were refused.
///
/// Every variant converts into an [`Error`] of kind
/// [`ErrorKind::Unauthorized`], which is not retryable: the same token will be
/// refused again, so the caller has to fetch a new one from Auth instead.
///
/// ```
/// use switchboard::auth::AuthError;
/// use switchboard::{Error, ErrorKind};
///
/// let error = Error::from(AuthError::Expired);
/// assert_eq!(error.kind(), ErrorKind::Unauthorized);
/// assert!(!error.is_retryable());
/// assert_eq!(error.message(), "the token has expired");
/// ```
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// The request carries no `Authorization` header.
    #[error("the request has no `Authorization` header")]
    MissingCredentials,
    /// The `Authorization` header is not `Bearer <token>`.
    #[error("the `Authorization` header is not `Bearer <token>`")]
    NotBearer,
    /// The token is not a well-formed JWT (three base64url parts, JSON header
    /// and claims).
    #[error("the token is not a well-formed JWT: {0}")]
    Malformed(String),
    /// The token's header names another algorithm than the one this verifier
    /// is pinned to — `none`, an HMAC algorithm keyed with the public key, or
    /// simply the other asymmetric one.
    #[error("the token is signed with `{found}`, but only `{expected}` is accepted")]
    AlgorithmNotAllowed {
        /// The `alg` in the token's header.
        found: String,
        /// The algorithm the verifier accepts.
        expected: &'static str,
    },
    /// The signature does not verify with the issuer's public key: the token
    /// was signed by someone else or changed after signing.
    #[error("the token's signature does not verify with the issuer's key")]
    BadSignature,
    /// `exp` is in the past (beyond the allowed clock skew).
    #[error("the token has expired")]
    Expired,
    /// `nbf` is in the future (beyond the allowed clock skew).
    #[error("the token is not valid yet (`nbf` is in the future)")]
    NotYetValid,
    /// `iss` is not the trusted issuer.
    #[error("the token was not issued by `{expected}`")]
    WrongIssuer {
        /// The issuer this verifier trusts.
        expected: String,
    },
    /// The verifier was given neither an audience
    /// ([`with_audience`](super::TokenVerifier::with_audience)) nor the
    /// explicit opt-out ([`with_any_audience`](super::TokenVerifier::with_any_audience)),
    /// so it refuses every token rather than accept tokens meant for
    /// another service. A configuration mistake: fix the verifier.
    #[error(
        "the verifier has no audience configured (set `with_audience`, or opt out with `with_any_audience`)"
    )]
    AudienceNotConfigured,
    /// The token's `kid` names no key of the issuer's current key set (a
    /// key never announced, or a token without `kid` where every key has
    /// one).
    #[error("{}", unknown_key(kid.as_deref()))]
    UnknownKey {
        /// The `kid` in the token's header, if any.
        kid: Option<String>,
    },
    /// The token's key was rotated out and its overlap (the announced
    /// `not_after`) has passed.
    #[error("the token's key `{kid}` was rotated out and is no longer accepted")]
    KeyRetired {
        /// The retired key's id.
        kid: String,
    },
    /// `aud` does not name this service.
    #[error("the token is not meant for this audience")]
    WrongAudience,
    /// A claim the verifier requires (`exp`, `iss`, and `aud` when an
    /// audience is set) is absent, or not of its type (an `exp` that is not
    /// a number).
    #[error("the required claim `{0}` is missing or not of its type")]
    MissingClaim(String),
    /// The claims do not have the expected shape (a time that is not a
    /// number, a missing `sub`, a field of the wrong type).
    #[error("the token's claims are invalid: {0}")]
    InvalidClaims(String),
}

fn unknown_key(kid: Option<&str>) -> String {
    match kid {
        Some(kid) => format!("the token's key `{kid}` is not in the issuer's key set"),
        None => "the token names no key (`kid`) and every key of the issuer's set has one".into(),
    }
}

impl From<AuthError> for Error {
    fn from(error: AuthError) -> Self {
        Error::new(ErrorKind::Unauthorized, error.to_string()).with_source(error)
    }
}
