//! Verifying Auth's tokens locally, and a tower layer that does it for every
//! incoming HTTP or gRPC request.
//!
//! The strategy has Game trust Auth's tokens *without calling Auth* (strategy §2):
//! a call per request would put Auth on every request's path, and Auth being
//! down would stop everything instead of only new logins. So Auth signs its
//! tokens with a private key, publishes the public key, and every service
//! checks signatures, expiry and issuer on its own with a [`TokenVerifier`].
//!
//! * [`TokenVerifier`] — built for one algorithm (EdDSA or RS256) and one
//!   issuer; the token's own `alg` never decides how it is checked, so
//!   `alg: none` and HMAC-with-the-public-key forgeries are refused by name.
//! * [`AuthLayer`] / [`Auth`] / [`ResponseFuture`] — the tower layer. A
//!   tonic server's requests are `http::Request`s too, so one layer serves
//!   axum and tonic: on success the claims go into the request extensions, on
//!   failure the inner service is not called and the caller gets `401` with
//!   the crate's JSON error body (or `grpc-status: 16` UNAUTHENTICATED for
//!   gRPC); [`RefusalBody`] is what the response body must be.
//! * [`AuthError`] — one variant per reason; it becomes an
//!   [`Error`](crate::Error) of kind `Unauthorized`, not retryable.
//!
//! Issuing tokens is Auth's business and lives in its example, not here.

mod error;
mod future;
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

pub use error::AuthError;
pub use future::ResponseFuture;
pub use layer::AuthLayer;
pub use refusal::RefusalBody;
pub use verifier::{Claims, DEFAULT_LEEWAY, KeyAlgorithm, TokenVerifier};

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
