//! Verifying Auth's tokens locally, keeping the issuer's keys current from
//! the bus, and a tower layer that does it for every incoming HTTP or gRPC
//! request.
//!
//! The strategy has Game trust Auth's tokens *without calling Auth* (strategy §2):
//! a call per request would put Auth on every request's path, and Auth being
//! down would stop everything instead of only new logins. So Auth signs its
//! tokens with a private key, publishes the public keys, and every service
//! checks signatures, expiry, issuer and audience on its own with a
//! [`TokenVerifier`].
//!
//! * [`TokenVerifier`] — built for one algorithm (EdDSA or RS256) and one
//!   issuer; the token's own `alg` never decides how it is checked, so
//!   `alg: none` and HMAC-with-the-public-key forgeries are refused by name.
//!   It holds a key set selected by the token's `kid`, and requires an
//!   audience unless told otherwise ([`with_any_audience`](TokenVerifier::with_any_audience)).
//! * [`KeysRotated`] / [`AnnouncedKey`] — the key-set announcement, an
//!   event (`auth.keys_rotated`) signed by a [`KeySigningKey`] whose public
//!   half each verifier pins as its [`TrustAnchor`];
//!   [`TokenVerifier::follow`] keeps a verifier current from the bus.
//! * [`AuthLayer`] / [`Auth`] / [`ResponseFuture`] — the tower layer. A
//!   tonic server's requests are `http::Request`s too, so one layer serves
//!   axum and tonic: on success the claims go into the request extensions, on
//!   failure the inner service is not called and the caller gets `401` with
//!   the crate's JSON error body (or `grpc-status: 16` UNAUTHENTICATED for
//!   gRPC); [`RefusalBody`] is what the response body must be.
//! * [`AuthError`] — one variant per reason; it becomes an
//!   [`Error`](crate::Error) of kind `Unauthorized`, not retryable.
//!   [`AnnouncementError`] says why an announcement was not applied.
//!
//! Issuing tokens and rotating the signing key are Auth's business and live
//! in its example (`examples/common/auth_service.rs`), not here; the
//! announcement format both sides agree on is here.
//!
//! # Audience
//!
//! A token Auth issued for one service must not open another, so the
//! audience is required by default: [`TokenVerifier::with_audience`] names
//! this service and a token whose `aud` does not name it is refused. A
//! verifier given no audience refuses *every* token with
//! [`AuthError::AudienceNotConfigured`] — a forgotten setting fails
//! closed. Opting out is explicit: [`TokenVerifier::with_any_audience`].
//!
//! # Key rotation
//!
//! Auth signs tokens with a token-signing key named by `kid` in the token
//! header, and rotates it: it makes a new key, gives the old one a
//! `not_after` of "now + overlap", and publishes the whole set as a
//! [`KeysRotated`] event on the bus. Verifiers learn the new key from that
//! event — no call to Auth.
//!
//! * **Trust anchor.** An announcement counts only if the *key-signing key*
//!   pinned in the verifier's configuration ([`TrustAnchor`]) signed it.
//!   The token-signing key cannot sign announcements, so a leaked token key
//!   lets an attacker forge tokens until it is rotated away, but never
//!   rotate verifiers to a key of their own. A refused announcement is
//!   dead-lettered and changes nothing ([`AnnouncementError`]).
//! * **Order.** `sequence` grows with each announcement; a verifier ignores
//!   one that is not newer than the set it holds, so replaying an old
//!   announcement cannot revive a retired key.
//! * **Start-up.** [`TokenVerifier::follow`] subscribes, then reads the
//!   newest announcement the transport holds
//!   ([`EventBus::read_latest`](crate::EventBus::read_latest): the in-memory
//!   transport's kept last message, Redis Streams' last entry by
//!   `XREVRANGE`), so a verifier that starts after several rotations
//!   accepts current tokens at once instead of replaying a history that
//!   stream trimming may have removed.
//! * **Overlap.** A rotated-out key keeps working until its announced
//!   `not_after`, then is refused with [`AuthError::KeyRetired`]; a `kid`
//!   not in the set is refused with [`AuthError::UnknownKey`]. The overlap
//!   is Auth's setting (the example's `DEFAULT_KEY_OVERLAP` is 30 minutes,
//!   twice its 15-minute token lifetime): it must cover the longest-lived
//!   token signed just before a rotation, plus the verifiers' clock skew.
//! * **Updates never block readers.** The key set is immutable and swapped
//!   whole behind an `Arc`; every clone of a verifier (the layer's, the
//!   follower's) sees the swap at once.
//!
//! ```
//! use std::sync::Arc;
//! use std::time::{Duration, SystemTime};
//! use switchboard::auth::{
//!     AnnouncedKey, AuthError, Claims, KeyAlgorithm, KeySigningKey, KeysRotated, TokenVerifier,
//!     TrustAnchor,
//! };
//!
//! # const KSK_PRIVATE: &str = "-----BEGIN PRIVATE KEY-----\nMC4CAQAwBQYDK2VwBCIEIOXxmvdLnI8RpIxpNPNUunpuDSoPjob7FXc5IaBRJydL\n-----END PRIVATE KEY-----\n";
//! # const KSK_PUBLIC: &str = "-----BEGIN PUBLIC KEY-----\nMCowBQYDK2VwAyEAg3ve/6wyVumFUmirqzhJiySYX2y+VV27M1Vz7CIlmNg=\n-----END PUBLIC KEY-----\n";
//! # const TOKEN_PRIVATE: &str = KSK_PRIVATE; // one key plays both parts here
//! # const TOKEN_PUBLIC: &str = KSK_PUBLIC;
//! let now = jsonwebtoken::get_current_timestamp();
//! let signer = KeySigningKey::ed25519_pem(KSK_PRIVATE.as_bytes())?;
//! let old_key = |not_after| AnnouncedKey {
//!     kid: "old".into(),
//!     algorithm: "EdDSA".into(),
//!     public_key_pem: TOKEN_PUBLIC.into(),
//!     valid_from: now - 3_600,
//!     not_after,
//! };
//!
//! let verifier = TokenVerifier::from_announcements(
//!     KeyAlgorithm::EdDsa,
//!     "auth-service",
//!     TrustAnchor::ed25519_pem(KSK_PUBLIC.as_bytes())?,
//! )
//! .with_audience("game-service");
//! verifier.apply(&KeysRotated::signed("auth-service", 1, vec![old_key(None)], &signer)?)?;
//!
//! let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::EdDSA);
//! header.kid = Some("old".into());
//! let claims = serde_json::json!({
//!     "sub": "user-42", "iss": "auth-service", "aud": "game-service", "exp": now + 600,
//! });
//! let token = jsonwebtoken::encode(
//!     &header,
//!     &claims,
//!     &jsonwebtoken::EncodingKey::from_ed_pem(TOKEN_PRIVATE.as_bytes()).unwrap(),
//! )
//! .unwrap();
//! assert!(verifier.verify::<Claims>(&token).is_ok());
//!
//! // Rotated out with an overlap that has already ended: refused.
//! verifier.apply(&KeysRotated::signed("auth-service", 2, vec![old_key(Some(now - 1))], &signer)?)?;
//! assert_eq!(
//!     verifier.verify::<Claims>(&token),
//!     Err(AuthError::KeyRetired { kid: "old".into() })
//! );
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

mod announcement;
mod claims;
mod error;
mod follow;
mod future;
mod keys;
mod layer;
mod refusal;
mod verifier;

use std::fmt;
use std::marker::PhantomData;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::{Request, Response};
use serde::de::DeserializeOwned;
use tower::Service;

pub use announcement::{AnnouncedKey, AnnouncementError, KeySigningKey, KeysRotated, TrustAnchor};
pub use claims::Claims;
pub use error::AuthError;
pub use future::ResponseFuture;
pub use layer::AuthLayer;
pub use refusal::RefusalBody;
pub use verifier::{DEFAULT_LEEWAY, KeyAlgorithm, TokenVerifier};

/// A service that only lets through requests with a valid bearer token; see
/// [`AuthLayer`].
///
/// The inner service is never called for a refused request, though
/// `poll_ready` has already asked it to be ready (the token is read in
/// `call`); a service that reserves capacity in `poll_ready` holds it until
/// its next call, as with tower-http's header validation. A plain HTTP
/// refusal is a 401 with the JSON error body of `transport::http::ErrorResponse`
/// (`{"error":{"kind":"unauthorized","message":"..."}}`); a gRPC one has an
/// empty body. The response body is any [`RefusalBody`]: axum's, tonic's,
/// `String`, http-body-util's `Full`.
pub struct Auth<S, C = Claims> {
    inner: S,
    verifier: Arc<TokenVerifier>,
    _claims: PhantomData<fn() -> C>,
}

impl<S> Auth<S> {
    /// Wraps `inner`, storing [`Claims`] in the extensions.
    pub fn new(inner: S, verifier: Arc<TokenVerifier>) -> Self {
        Self::with_claims(inner, verifier)
    }
}

impl<S, C> Auth<S, C> {
    /// Wraps `inner`, storing the claims as `C`.
    pub fn with_claims(inner: S, verifier: Arc<TokenVerifier>) -> Self {
        Self {
            inner,
            verifier,
            _claims: PhantomData,
        }
    }

    /// The inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The inner service, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// Unwraps the inner service.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S, C, ReqBody, ResBody> Service<Request<ReqBody>> for Auth<S, C>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
    ResBody: RefusalBody,
    C: DeserializeOwned + Clone + Send + Sync + 'static,
{
    type Response = Response<ResBody>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future, ResBody>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<ReqBody>) -> Self::Future {
        match self.verifier.authenticate::<C>(request.headers()) {
            Ok(claims) => {
                request.extensions_mut().insert(claims);
                ResponseFuture::called(self.inner.call(request))
            }
            Err(error) => {
                tracing::debug!(%error, uri = %request.uri(), "request refused");
                let grpc = refusal::is_grpc(request.headers());
                ResponseFuture::refused(refusal::refusal(grpc, &error))
            }
        }
    }
}

impl<S: Clone, C> Clone for Auth<S, C> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            verifier: self.verifier.clone(),
            _claims: PhantomData,
        }
    }
}

impl<S: fmt::Debug, C> fmt::Debug for Auth<S, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Auth")
            .field("inner", &self.inner)
            .field("verifier", &self.verifier)
            .finish()
    }
}
