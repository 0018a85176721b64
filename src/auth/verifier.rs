//! Checking a token against the issuer's public key, locally.
//!
//! The algorithm comes from the verifier, never from the token: a token picks
//! its own `alg`, and trusting that choice is how `alg: none` and "HS256 keyed
//! with the public key" forgeries get through. So the header's `alg` is read
//! first and anything but the pinned algorithm is refused by name, before any
//! signature is computed.

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use http::HeaderMap;
use http::header::AUTHORIZATION;
use jsonwebtoken::errors::ErrorKind as JwtErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;
use serde::de::DeserializeOwned;

use super::AuthError;
use super::announcement::{AnnouncementError, KeysRotated, TrustAnchor};
use super::keys::{Clock, KeyRing, KeySet, VerificationKey};
use crate::{Error, ErrorKind};

/// The clock skew allowed on `exp` and `nbf` unless
/// [`with_leeway`](TokenVerifier::with_leeway) says otherwise.
pub const DEFAULT_LEEWAY: Duration = Duration::from_secs(30);

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

    fn decoding_key(
        self,
        public_key_pem: &[u8],
    ) -> Result<DecodingKey, jsonwebtoken::errors::Error> {
        match self {
            Self::EdDsa => DecodingKey::from_ed_pem(public_key_pem),
            Self::Rs256 => DecodingKey::from_rsa_pem(public_key_pem),
        }
    }
}

/// Which audiences a verifier accepts. Required unless opted out.
#[derive(Debug, Clone, PartialEq, Eq)]
enum AudiencePolicy {
    /// Neither [`TokenVerifier::with_audience`] nor
    /// [`TokenVerifier::with_any_audience`] was called: every token is
    /// refused, so a forgotten audience fails closed.
    Unset,
    /// `aud` must name one of these.
    Required,
    /// `aud` is not looked at (explicit opt-out).
    Any,
}

/// Verifies Auth's tokens with the issuer's public keys, without calling Auth.
///
/// Built for one algorithm ([`KeyAlgorithm`]) and one issuer; checks the
/// signature with the key the token's `kid` names, `exp`, `nbf` (when
/// present), `iss`, and `aud`.
///
/// * **The audience is required.** Say which with
///   [`with_audience`](Self::with_audience) (this service's name), or opt
///   out explicitly with [`with_any_audience`](Self::with_any_audience); a
///   verifier given neither refuses every token with
///   [`AuthError::AudienceNotConfigured`].
/// * **Keys come as a set, selected by `kid`.** The one-key constructors
///   ([`ed25519_pem`](Self::ed25519_pem), [`rs256_pem`](Self::rs256_pem))
///   make a set of one that answers whatever the `kid`.
///   [`from_announcements`](Self::from_announcements) starts empty and
///   learns the set from Auth's signed [`KeysRotated`] announcements
///   ([`follow`](Self::follow) on the bus, or [`apply`](Self::apply)); an
///   unknown `kid` is refused, and a rotated-out key is refused once its
///   announced `not_after` has passed. See [the module docs](super#key-rotation).
///
/// Clones share the key set: an announcement applied through one is seen
/// by all, so keep one behind an `Arc` for the [`AuthLayer`](super::AuthLayer)
/// and the follower alike.
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
/// let verifier = TokenVerifier::ed25519_pem(PUBLIC.as_bytes(), "auth")?.with_any_audience();
/// let claims: Claims = verifier.verify(&token)?;
/// assert_eq!(claims.sub, "user-42");
///
/// // No audience chosen: refused, whatever the token.
/// let careless = TokenVerifier::ed25519_pem(PUBLIC.as_bytes(), "auth")?;
/// assert_eq!(careless.verify::<Claims>(&token), Err(AuthError::AudienceNotConfigured));
///
/// let other = TokenVerifier::ed25519_pem(PUBLIC.as_bytes(), "someone-else")?.with_any_audience();
/// assert!(matches!(other.verify::<Claims>(&token), Err(AuthError::WrongIssuer { .. })));
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Clone)]
pub struct TokenVerifier {
    algorithm: KeyAlgorithm,
    keys: Arc<KeyRing>,
    validation: Validation,
    issuer: String,
    audience: AudiencePolicy,
    anchor: Option<TrustAnchor>,
    clock: Clock,
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
        Ok(Self::new(
            KeyAlgorithm::EdDsa,
            KeySet::one(key),
            issuer.into(),
        ))
    }

    /// A verifier for `RS256` tokens from `issuer`, with the issuer's RSA
    /// public key as PEM (PKCS#1 or SPKI).
    ///
    /// Fails with [`ErrorKind::Config`] when the PEM is not an RSA public key.
    pub fn rs256_pem(public_key_pem: &[u8], issuer: impl Into<String>) -> Result<Self, Error> {
        let key = DecodingKey::from_rsa_pem(public_key_pem).map_err(|e| invalid_key("RSA", e))?;
        Ok(Self::new(
            KeyAlgorithm::Rs256,
            KeySet::one(key),
            issuer.into(),
        ))
    }

    /// A verifier of `algorithm` tokens from `issuer` whose keys come from
    /// the issuer's [`KeysRotated`] announcements signed by `anchor` (the
    /// pinned key-signing key). It starts with no key, refusing every
    /// token, until [`follow`](Self::follow) or [`apply`](Self::apply)
    /// gives it a key set.
    pub fn from_announcements(
        algorithm: KeyAlgorithm,
        issuer: impl Into<String>,
        anchor: TrustAnchor,
    ) -> Self {
        Self::new(algorithm, KeySet::default(), issuer.into()).with_trust_anchor(anchor)
    }

    fn new(algorithm: KeyAlgorithm, keys: KeySet, issuer: String) -> Self {
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
            keys: Arc::new(KeyRing::new(keys)),
            validation,
            issuer,
            audience: AudiencePolicy::Unset,
            anchor: None,
            clock: Clock::system(),
        }
    }

    /// Requires `aud` to name `audience` (this service); a token without
    /// `aud` is refused with [`AuthError::MissingClaim`].
    pub fn with_audience(mut self, audience: impl Into<String>) -> Self {
        self.validation.set_audience(&[audience.into()]);
        self.validation.validate_aud = true;
        self.validation
            .set_required_spec_claims(&["exp", "iss", "aud"]);
        self.audience = AudiencePolicy::Required;
        self
    }

    /// Opts out of the audience check: `aud` is not looked at. Only for a
    /// service that accepts every token of the issuer on purpose (the
    /// issuer's tokens are then interchangeable between services).
    pub fn with_any_audience(mut self) -> Self {
        self.validation.aud = None;
        self.validation.validate_aud = false;
        self.validation.set_required_spec_claims(&["exp", "iss"]);
        self.audience = AudiencePolicy::Any;
        self
    }

    /// Pins the key-signing key whose signature a [`KeysRotated`]
    /// announcement needs to be applied. Without one, every announcement
    /// is refused with [`AnnouncementError::NoTrustAnchor`].
    pub fn with_trust_anchor(mut self, anchor: TrustAnchor) -> Self {
        self.anchor = Some(anchor);
        self
    }

    /// Reads the time for key lifetimes (`not_after`) from `now` instead
    /// of the system clock — for tests of rotation overlaps. Token `exp`
    /// and `nbf` are still checked against the system clock.
    pub fn with_clock(mut self, now: impl Fn() -> SystemTime + Send + Sync + 'static) -> Self {
        self.clock = Clock::custom(now);
        self
    }

    /// Applies a key-set announcement: checks its signature with the pinned
    /// key-signing key and its issuer, then replaces the key set with its
    /// keys of this verifier's algorithm (others are skipped) — for every
    /// clone of this verifier at once.
    ///
    /// Returns `Ok(false)`, changing nothing, when the announcement is not
    /// newer (by `sequence`) than the one applied last: a replayed or
    /// reordered announcement cannot bring a retired key back.
    pub fn apply(&self, announcement: &KeysRotated) -> Result<bool, AnnouncementError> {
        let anchor = self
            .anchor
            .as_ref()
            .ok_or(AnnouncementError::NoTrustAnchor)?;
        announcement.verify(anchor)?;
        if announcement.issuer != self.issuer {
            return Err(AnnouncementError::WrongIssuer {
                expected: self.issuer.clone(),
                found: announcement.issuer.clone(),
            });
        }
        let mut keys = Vec::with_capacity(announcement.keys.len());
        for announced in &announcement.keys {
            if announced.algorithm != self.algorithm.as_str() {
                tracing::debug!(kid = %announced.kid, algorithm = %announced.algorithm,
                    "announced key of another algorithm skipped");
                continue;
            }
            let key = self
                .algorithm
                .decoding_key(announced.public_key_pem.as_bytes())
                .map_err(|error| AnnouncementError::InvalidKey {
                    kid: announced.kid.clone(),
                    reason: error.to_string(),
                })?;
            keys.push(VerificationKey {
                kid: Some(announced.kid.clone()),
                key,
                not_after: announced.not_after,
            });
        }
        if keys.is_empty() {
            return Err(AnnouncementError::NoUsableKey {
                algorithm: self.algorithm.as_str(),
            });
        }
        let applied = self.keys.replace_if_newer(KeySet {
            sequence: Some(announcement.sequence),
            keys,
        });
        if applied {
            tracing::info!(issuer = %self.issuer, sequence = announcement.sequence,
                keys = ?self.key_ids(), "key set replaced");
        }
        Ok(applied)
    }

    /// The ids of the keys accepted now: announced keys whose `not_after`
    /// has not passed (a key from a one-key constructor has no id).
    pub fn key_ids(&self) -> Vec<String> {
        let now = self.clock.unix_secs();
        self.keys
            .current()
            .keys
            .iter()
            .filter(|key| key.not_after.is_none_or(|not_after| now < not_after))
            .filter_map(|key| key.kid.clone())
            .collect()
    }

    /// The `sequence` of the announcement the key set came from; `None`
    /// before the first one.
    pub fn key_set_sequence(&self) -> Option<u64> {
        self.keys.current().sequence
    }

    /// The pinned key-signing key, if any.
    pub fn trust_anchor(&self) -> Option<&TrustAnchor> {
        self.anchor.as_ref()
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

    /// Verifies `token` and returns its claims as `C` (usually [`Claims`](super::Claims)).
    pub fn verify<C: DeserializeOwned>(&self, token: &str) -> Result<C, AuthError> {
        if self.audience == AudiencePolicy::Unset {
            return Err(AuthError::AudienceNotConfigured);
        }
        let header = read_header(token)?;
        if header.alg != self.algorithm.as_str() {
            return Err(AuthError::AlgorithmNotAllowed {
                found: header.alg,
                expected: self.algorithm.as_str(),
            });
        }
        let keys = self.keys.current();
        let key = keys
            .find(header.kid.as_deref())
            .ok_or_else(|| AuthError::UnknownKey {
                kid: header.kid.clone(),
            })?;
        if let Some(not_after) = key.not_after
            && self.clock.unix_secs() >= not_after
        {
            return Err(AuthError::KeyRetired {
                kid: key.kid.clone().unwrap_or_default(),
            });
        }
        // Validation first, the claim type second: decoding straight into
        // `C` would report a missing `exp` as a shape error, not as the
        // missing claim it is.
        let claims = jsonwebtoken::decode::<serde_json::Value>(token, &key.key, &self.validation)
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
        let token = crate::bearer::token(value).ok_or(AuthError::NotBearer)?;
        self.verify(token)
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
        let keys = self.keys.current();
        f.debug_struct("TokenVerifier")
            .field("algorithm", &self.algorithm)
            .field("issuer", &self.issuer)
            .field("audience", &(&self.audience, &self.validation.aud))
            .field("leeway_secs", &self.validation.leeway)
            .field("keys", &keys.keys.len())
            .field("key_set_sequence", &keys.sequence)
            .field("trust_anchor", &self.anchor.is_some())
            .finish_non_exhaustive()
    }
}

/// The parts of a token's header the verifier reads itself.
#[derive(Deserialize)]
struct Header {
    alg: String,
    #[serde(default)]
    kid: Option<String>,
}

/// The `alg` and `kid` of a token's header as written, so that a refused
/// algorithm is named even when jsonwebtoken has no variant for it (`none`).
fn read_header(token: &str) -> Result<Header, AuthError> {
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
    serde_json::from_slice(&header)
        .map_err(|e| AuthError::Malformed(format!("header is not a JOSE header: {e}")))
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
pub(super) fn install_crypto_provider() {
    let _already_chosen = jsonwebtoken::crypto::CryptoProvider::install_default(
        &jsonwebtoken::crypto::aws_lc::DEFAULT_PROVIDER,
    );
}
