use std::fmt;
use std::marker::PhantomData;
use std::sync::Arc;

use tower::Layer;

use super::{Auth, Claims, TokenVerifier};

/// Wraps a service in [`Auth`]: every request must carry a valid bearer
/// token, whose claims (as `C`) the inner service finds in the request
/// extensions.
///
/// ```
/// use std::sync::Arc;
/// use switchboard::auth::{AuthLayer, Claims, TokenVerifier};
/// use tower::ServiceBuilder;
///
/// # let pem = b"-----BEGIN PUBLIC KEY-----\nMCowBQYDK2VwAyEAg3ve/6wyVumFUmirqzhJiySYX2y+VV27M1Vz7CIlmNg=\n-----END PUBLIC KEY-----\n";
/// let verifier = Arc::new(TokenVerifier::ed25519_pem(pem, "auth")?.with_audience("orders"));
/// let service = ServiceBuilder::new()
///     .layer(AuthLayer::new(verifier))
///     .service_fn(|request: http::Request<String>| async move {
///         let user = &request.extensions().get::<Claims>().expect("set by Auth").sub;
///         Ok::<_, std::convert::Infallible>(http::Response::new(format!("hello {user}")))
///     });
/// # drop(service);
/// # Ok::<(), switchboard::Error>(())
/// ```
pub struct AuthLayer<C = Claims> {
    verifier: Arc<TokenVerifier>,
    _claims: PhantomData<fn() -> C>,
}

impl AuthLayer {
    /// A layer that verifies with `verifier` and stores [`Claims`].
    pub fn new(verifier: Arc<TokenVerifier>) -> Self {
        Self::with_claims(verifier)
    }
}

impl<C> AuthLayer<C> {
    /// A layer that verifies with `verifier` and stores the claims as `C`,
    /// for services whose tokens carry their own claim set.
    pub fn with_claims(verifier: Arc<TokenVerifier>) -> Self {
        Self {
            verifier,
            _claims: PhantomData,
        }
    }
}

impl<S, C> Layer<S> for AuthLayer<C> {
    type Service = Auth<S, C>;

    fn layer(&self, inner: S) -> Self::Service {
        Auth::with_claims(inner, self.verifier.clone())
    }
}

impl<C> Clone for AuthLayer<C> {
    fn clone(&self) -> Self {
        Self {
            verifier: self.verifier.clone(),
            _claims: PhantomData,
        }
    }
}

impl<C> fmt::Debug for AuthLayer<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AuthLayer")
            .field("verifier", &self.verifier)
            .finish()
    }
}
