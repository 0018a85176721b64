//! Checking a token against the issuer's public key, locally.
//!
//! The algorithm comes from the verifier, never from the token: a token picks
//! its own `alg`, and trusting that choice is how `alg: none` and "HS256 keyed
//! with the public key" forgeries get through. So the header's `alg` is read
//! first and anything but the pinned algorithm is refused by name, before any
//! signature is computed.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use http::HeaderMap;
use http::header::AUTHORIZATION;
use jsonwebtoken::errors::ErrorKind as JwtErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer, Serialize};

use super::AuthError;
use crate::{Error, ErrorKind};

/// The clock skew allowed on `exp` and `nbf` unless
/// [`with_leeway`](TokenVerifier::with_leeway) says otherwise.
pub const DEFAULT_LEEWAY: Duration = Duration::from_secs(30);

/// The claims of a token from Auth: the registered ones the verifier checks,
/// and everything else (roles, scopes) in [`extra`](Claims::extra).
///
/// It is what [`AuthLayer`](super::AuthLayer) puts in the request extensions
/// unless it is told to use another type.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Claims {
    /// The subject: the user (or service) the token speaks for.
    pub sub: String,
    /// The issuer; always the trusted one once verified.
    pub iss: String,
    /// Expiry, seconds since the Unix epoch.
    pub exp: u64,
    /// Not before, seconds since the Unix epoch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbf: Option<u64>,
    /// Issued at, seconds since the Unix epoch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iat: Option<u64>,
    /// The audiences; a single string in the token becomes one entry.
    #[serde(
        default,
        deserialize_with = "one_or_many",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub aud: Vec<String>,
    /// Every other claim, as JSON.
    #[serde(flatten)]
    pub extra: BTreeMap<String, serde_json::Value>,
}

fn one_or_many<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(String),
        Many(Vec<String>),
    }
    Ok(match OneOrMany::deserialize(deserializer)? {
        OneOrMany::One(one) => vec![one],
        OneOrMany::Many(many) => many,
    })
}

/// The issuer's signature algorithm, fixed when the verifier is built.
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyAlgorithm {
    /// Ed25519 signatures (`alg: EdDSA`).
    EdDsa,
    /// RSA PKCS#1 v1.5 with SHA-256 (`alg: RS256`).
    Rs256,
}

impl KeyAlgorithm {
    /// The `alg` header value of this algorithm.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::EdDsa => "EdDSA",
            Self::Rs256 => "RS256",
        }
    }

    fn jwt(self) -> Algorithm {
        match self {
            Self::EdDsa => Algorithm::EdDSA,
            Self::Rs256 => Algorithm::RS256,
        }
    }
}

/// Verifies Auth's tokens with the issuer's public key, without calling Auth.
///
/// Built for one algorithm ([`KeyAlgorithm`]) and one issuer; checks the
/// signature, `exp`, `nbf` (when present), `iss`, and `aud` when an audience
/// is set. Cheap to clone behind an `Arc`, and safe to share.
///
/// ```
/// use switchboard::auth::{AuthError, Claims, TokenVerifier};
///
/// // Auth's public key, as Auth publishes it.
/// const PUBLIC: &str = "-----BEGIN PUBLIC KEY-----
/// MCowBQYDK2VwAyEAg3ve/6wyVumFUmirqzhJiySYX2y+VV27M1Vz7CIlmNg=
/// -----END PUBLIC KEY-----";
/// // Signing is Auth's job; here it is done inline to have a token.
/// const PRIVATE: &str = "-----BEGIN PRIVATE KEY-----
/// MC4CAQAwBQYDK2VwBCIEIOXxmvdLnI8RpIxpNPNUunpuDSoPjob7FXc5IaBRJydL
/// -----END PRIVATE KEY-----";
/// let exp = jsonwebtoken::get_current_timestamp() + 600;
/// let token = jsonwebtoken::encode(
///     &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::EdDSA),
///     &serde_json::json!({ "sub": "user-42", "iss": "auth", "exp": exp }),
///     &jsonwebtoken::EncodingKey::from_ed_pem(PRIVATE.as_bytes()).unwrap(),
/// )
/// .unwrap();
///
/// let verifier = TokenVerifier::ed25519_pem(PUBLIC.as_bytes(), "auth")?;
/// let claims: Claims = verifier.verify(&token)?;
/// assert_eq!(claims.sub, "user-42");
///
/// let other = TokenVerifier::ed25519_pem(PUBLIC.as_bytes(), "someone-else")?;
/// assert!(matches!(other.verify::<Claims>(&token), Err(AuthError::WrongIssuer { .. })));
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Clone)]
pub struct TokenVerifier {
    algorithm: KeyAlgorithm,
    key: DecodingKey,
    validation: Validation,
    issuer: String,
}

impl TokenVerifier {
    /// A verifier for Ed25519 (`EdDSA`) tokens from `issuer`, with the
    /// issuer's public key as PEM (`-----BEGIN PUBLIC KEY-----`).
    ///
    /// Fails with [`ErrorKind::Config`] when the PEM is not an Ed25519 public
    /// key.
    pub fn ed25519_pem(public_key_pem: &[u8], issuer: impl Into<String>) -> Result<Self, Error> {
        let key =
            DecodingKey::from_ed_pem(public_key_pem).map_err(|e| invalid_key("Ed25519", e))?;
        Ok(Self::new(KeyAlgorithm::EdDsa, key, issuer.into()))
    }

    /// A verifier for `RS256` tokens from `issuer`, with the issuer's RSA
    /// public key as PEM (PKCS#1 or SPKI).
    ///
    /// Fails with [`ErrorKind::Config`] when the PEM is not an RSA public key.
    pub fn rs256_pem(public_key_pem: &[u8], issuer: impl Into<String>) -> Result<Self, Error> {
        let key = DecodingKey::from_rsa_pem(public_key_pem).map_err(|e| invalid_key("RSA", e))?;
        Ok(Self::new(KeyAlgorithm::Rs256, key, issuer.into()))
    }

    fn new(algorithm: KeyAlgorithm, key: DecodingKey, issuer: String) -> Self {
        install_crypto_provider();
        let mut validation = Validation::new(algorithm.jwt());
        validation.validate_exp = true;
        validation.validate_nbf = true;
        validation.validate_aud = false;
        validation.leeway = DEFAULT_LEEWAY.as_secs();
        validation.set_issuer(&[&issuer]);
        validation.set_required_spec_claims(&["exp", "iss"]);
        Self {
            algorithm,
            key,
            validation,
            issuer,
        }
    }

    /// Also requires `aud` to name `audience` (this service).
    pub fn with_audience(mut self, audience: impl Into<String>) -> Self {
        self.validation.set_audience(&[audience.into()]);
        self.validation.validate_aud = true;
        self.validation
            .set_required_spec_claims(&["exp", "iss", "aud"]);
        self
    }

    /// The clock skew tolerated on `exp` and `nbf`
    /// ([`DEFAULT_LEEWAY`] unless set), in whole seconds.
    pub fn with_leeway(mut self, leeway: Duration) -> Self {
        self.validation.leeway = leeway.as_secs();
        self
    }

    /// The algorithm this verifier accepts.
    pub fn algorithm(&self) -> KeyAlgorithm {
        self.algorithm
    }

    /// The issuer this verifier trusts.
    pub fn issuer(&self) -> &str {
        &self.issuer
    }

    /// Verifies `token` and returns its claims as `C` (usually [`Claims`]).
    pub fn verify<C: DeserializeOwned>(&self, token: &str) -> Result<C, AuthError> {
        let found = header_algorithm(token)?;
        if found != self.algorithm.as_str() {
            return Err(AuthError::AlgorithmNotAllowed {
                found,
                expected: self.algorithm.as_str(),
            });
        }
        // Validation first, the claim type second: decoding straight into
        // `C` would report a missing `exp` as a shape error, not as the
        // missing claim it is.
        let claims = jsonwebtoken::decode::<serde_json::Value>(token, &self.key, &self.validation)
            .map_err(|error| self.refusal(error))?
            .claims;
        serde_json::from_value(claims).map_err(|error| AuthError::InvalidClaims(error.to_string()))
    }

    /// Reads `Authorization: Bearer <token>` from `headers` and verifies it.
    pub fn authenticate<C: DeserializeOwned>(&self, headers: &HeaderMap) -> Result<C, AuthError> {
        let value = headers
            .get(AUTHORIZATION)
            .ok_or(AuthError::MissingCredentials)?;
        let value = value.to_str().map_err(|_| AuthError::NotBearer)?;
        let (scheme, token) = value.split_once(' ').ok_or(AuthError::NotBearer)?;
        // RFC 7235: the scheme is case-insensitive.
        if !scheme.eq_ignore_ascii_case("bearer") || token.trim().is_empty() {
            return Err(AuthError::NotBearer);
        }
        self.verify(token.trim())
    }

    fn refusal(&self, error: jsonwebtoken::errors::Error) -> AuthError {
        match error.into_kind() {
            JwtErrorKind::InvalidSignature => AuthError::BadSignature,
            JwtErrorKind::ExpiredSignature => AuthError::Expired,
            JwtErrorKind::ImmatureSignature => AuthError::NotYetValid,
            JwtErrorKind::InvalidIssuer => AuthError::WrongIssuer {
                expected: self.issuer.clone(),
            },
            JwtErrorKind::InvalidAudience => AuthError::WrongAudience,
            JwtErrorKind::MissingRequiredClaim(claim) => AuthError::MissingClaim(claim),
            JwtErrorKind::InvalidClaimFormat(claim) => {
                AuthError::InvalidClaims(format!("`{claim}` has the wrong type"))
            }
            JwtErrorKind::Json(error) => AuthError::InvalidClaims(error.to_string()),
            JwtErrorKind::InvalidAlgorithm => AuthError::AlgorithmNotAllowed {
                found: "a key of another family".into(),
                expected: self.algorithm.as_str(),
            },
            other => AuthError::Malformed(format!("{other:?}")),
        }
    }
}

impl fmt::Debug for TokenVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenVerifier")
            .field("algorithm", &self.algorithm)
            .field("issuer", &self.issuer)
            .field("audience", &self.validation.aud)
            .field("leeway_secs", &self.validation.leeway)
            .finish_non_exhaustive()
    }
}

/// The `alg` of a token's header as written, so that a refused algorithm is
/// named even when jsonwebtoken has no variant for it (`none`).
fn header_algorithm(token: &str) -> Result<String, AuthError> {
    #[derive(Deserialize)]
    struct Header {
        alg: String,
    }
    let mut parts = token.split('.');
    let (Some(header), Some(_), Some(_), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(AuthError::Malformed(
            "expected three dot-separated parts".into(),
        ));
    };
    let header = URL_SAFE_NO_PAD
        .decode(header)
        .map_err(|e| AuthError::Malformed(format!("header is not base64url: {e}")))?;
    let header: Header = serde_json::from_slice(&header)
        .map_err(|e| AuthError::Malformed(format!("header is not a JOSE header: {e}")))?;
    Ok(header.alg)
}

fn invalid_key(what: &str, error: jsonwebtoken::errors::Error) -> Error {
    Error::new(
        ErrorKind::Config,
        format!("the issuer's key is not an {what} public key in PEM: {error}"),
    )
    .with_source(error)
}

/// jsonwebtoken picks its crypto backend from a process-wide provider; with
/// both of its backend features on in one build (Cargo unifies features) it
/// cannot infer one and panics on first use. This crate uses aws-lc-rs
/// everywhere, so it installs that one explicitly. When the application has
/// already installed a provider, that choice stands.
fn install_crypto_provider() {
    let _already_chosen = jsonwebtoken::crypto::CryptoProvider::install_default(
        &jsonwebtoken::crypto::aws_lc::DEFAULT_PROVIDER,
    );
}
