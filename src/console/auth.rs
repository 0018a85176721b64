//! Who may act from the console, and the cross-site check: an action must
//! carry an operator's bearer token and come from the console's own origin.

use std::fmt;
#[cfg(feature = "auth")]
use std::sync::Arc;

use axum::http::{HeaderMap, StatusCode, header};

/// How the console authenticates the operator behind an action
/// (`Authorization: Bearer <token>`).
///
/// With neither an operator token nor a verifier, every action is refused
/// with 401: a console mounted without credentials can only be looked at.
#[derive(Clone, Default)]
pub(super) struct Operators {
    /// A shared operator token, compared in constant time.
    pub(super) token: Option<String>,
    /// Tokens signed by the Auth service, verified locally.
    #[cfg(feature = "auth")]
    pub(super) verifier: Option<Arc<crate::auth::TokenVerifier>>,
}

/// Why an action was refused, with its HTTP status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Refusal {
    pub(super) status: StatusCode,
    pub(super) message: String,
}

impl Refusal {
    pub(super) fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
        }
    }
}

impl Operators {
    /// Who the request's bearer token speaks for, or a 401.
    pub(super) fn authenticate(&self, headers: &HeaderMap) -> Result<String, Refusal> {
        let unauthorized = |why: &str| {
            Refusal::new(
                StatusCode::UNAUTHORIZED,
                format!("{why}: console actions need an operator's bearer token"),
            )
        };
        let Some(value) = headers.get(header::AUTHORIZATION) else {
            return Err(unauthorized("no Authorization header"));
        };
        let value = value
            .to_str()
            .map_err(|_| unauthorized("unreadable Authorization header"))?;
        let token = crate::bearer::token(value)
            .ok_or_else(|| unauthorized("not a bearer token, or an empty one"))?;
        if let Some(expected) = &self.token
            && constant_time_eq(expected.as_bytes(), token.as_bytes())
        {
            return Ok("operator-token".to_owned());
        }
        #[cfg(feature = "auth")]
        if let Some(verifier) = &self.verifier {
            return match verifier.verify::<crate::auth::Claims>(token) {
                Ok(claims) => Ok(claims.sub),
                Err(error) => Err(unauthorized(&format!("token refused ({error})"))),
            };
        }
        if self.token.is_none() {
            return Err(unauthorized("no operator credentials are configured"));
        }
        Err(unauthorized("wrong operator token"))
    }

    /// Whether any credential is configured at all.
    pub(super) fn configured(&self) -> bool {
        #[cfg(feature = "auth")]
        if self.verifier.is_some() {
            return true;
        }
        self.token.is_some()
    }
}

impl fmt::Debug for Operators {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never the token itself.
        f.debug_struct("Operators")
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("configured", &self.configured())
            .finish()
    }
}

/// Refuses (403) a request a browser sent from another site: its `Origin`
/// is not this host, or its `Sec-Fetch-Site` says cross-site. Requests
/// without either (scripts, curl) pass on to the token check.
pub(super) fn same_origin(headers: &HeaderMap) -> Result<(), Refusal> {
    let forbidden = |why: String| Refusal::new(StatusCode::FORBIDDEN, why);
    if let Some(origin) = headers.get(header::ORIGIN) {
        let origin = origin.to_str().unwrap_or("");
        let host = headers
            .get(header::HOST)
            .and_then(|host| host.to_str().ok())
            .unwrap_or("");
        let authority = origin
            .strip_prefix("http://")
            .or_else(|| origin.strip_prefix("https://"));
        if host.is_empty() || authority != Some(host) {
            return Err(forbidden(format!(
                "cross-site request refused: Origin {origin:?} is not this console's host"
            )));
        }
    }
    if let Some(site) = headers.get("sec-fetch-site") {
        let site = site.to_str().unwrap_or("");
        if !matches!(site, "same-origin" | "none") {
            return Err(forbidden(format!(
                "cross-site request refused: Sec-Fetch-Site is {site:?}"
            )));
        }
    }
    Ok(())
}

/// Compares in time that depends only on the lengths.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0_u8, |diff, (x, y)| diff | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.insert(*name, HeaderValue::from_static(value));
        }
        map
    }

    #[test]
    fn a_foreign_origin_is_forbidden_and_the_own_one_passes() {
        let own = headers(&[("host", "127.0.0.1:9"), ("origin", "http://127.0.0.1:9")]);
        assert!(same_origin(&own).is_ok());
        let foreign = headers(&[("host", "127.0.0.1:9"), ("origin", "http://evil.example")]);
        assert_eq!(
            same_origin(&foreign).unwrap_err().status,
            StatusCode::FORBIDDEN
        );
        let cross = headers(&[("host", "127.0.0.1:9"), ("sec-fetch-site", "cross-site")]);
        assert_eq!(
            same_origin(&cross).unwrap_err().status,
            StatusCode::FORBIDDEN
        );
        assert!(same_origin(&headers(&[("host", "127.0.0.1:9")])).is_ok());
    }

    #[test]
    fn only_the_operator_token_authenticates() {
        let operators = Operators {
            token: Some("s3cret".into()),
            ..Operators::default()
        };
        let ok = headers(&[("authorization", "Bearer s3cret")]);
        assert_eq!(operators.authenticate(&ok).unwrap(), "operator-token");
        for bad in [
            headers(&[]),
            headers(&[("authorization", "Bearer nope")]),
            headers(&[("authorization", "Basic s3cret")]),
        ] {
            let refusal = operators.authenticate(&bad).unwrap_err();
            assert_eq!(refusal.status, StatusCode::UNAUTHORIZED);
            assert!(!refusal.message.contains("s3cret"), "{refusal:?}");
        }
        let none = Operators::default();
        assert_eq!(
            none.authenticate(&ok).unwrap_err().status,
            StatusCode::UNAUTHORIZED
        );
    }
}
