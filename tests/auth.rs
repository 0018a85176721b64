//! Local token verification: every refusal case, both algorithms, the
//! tower layer in front of HTTP and gRPC services, and key rotation by
//! signed announcements (`auth/rotation.rs`). The tests sign their own
//! tokens with the key pairs in tests/fixtures/auth.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use http::{Request, Response, StatusCode};
use jsonwebtoken::{Algorithm, EncodingKey, Header, get_current_timestamp};
use serde::Deserialize;
use serde_json::{Value, json};
use switchboard::auth::{Auth, AuthError, AuthLayer, Claims, KeyAlgorithm, TokenVerifier};
use switchboard::{Error, ErrorKind};
use tower::{Layer, ServiceExt, service_fn};

const ED_PUBLIC: &[u8] = include_bytes!("fixtures/auth/ed25519_public.pem");
const ED_PRIVATE: &[u8] = include_bytes!("fixtures/auth/ed25519_private.pem");
const OTHER_ED_PRIVATE: &[u8] = include_bytes!("fixtures/auth/other_ed25519_private.pem");
const RSA_PUBLIC: &[u8] = include_bytes!("fixtures/auth/rsa_public.pem");
const RSA_PRIVATE: &[u8] = include_bytes!("fixtures/auth/rsa_private.pem");

const ISSUER: &str = "auth-service";

#[path = "auth/rotation.rs"]
mod rotation;

#[cfg(feature = "console")]
#[path = "auth/console.rs"]
mod console;

/// A one-key verifier that opts out of the audience check (the audience
/// tests opt back in).
fn ed_verifier() -> TokenVerifier {
    TokenVerifier::ed25519_pem(ED_PUBLIC, ISSUER)
        .expect("valid Ed25519 key")
        .with_any_audience()
}

fn rsa_verifier() -> TokenVerifier {
    TokenVerifier::rs256_pem(RSA_PUBLIC, ISSUER)
        .expect("valid RSA key")
        .with_any_audience()
}

fn now() -> u64 {
    get_current_timestamp()
}

/// Claims valid for ten minutes from the trusted issuer.
fn good_claims() -> Value {
    json!({ "sub": "user-42", "iss": ISSUER, "exp": now() + 600, "iat": now(), "role": "player" })
}

fn sign_ed(claims: &Value) -> String {
    sign(
        Algorithm::EdDSA,
        &EncodingKey::from_ed_pem(ED_PRIVATE).unwrap(),
        claims,
    )
}

fn sign_rsa(claims: &Value) -> String {
    sign(
        Algorithm::RS256,
        &EncodingKey::from_rsa_pem(RSA_PRIVATE).unwrap(),
        claims,
    )
}

fn sign(algorithm: Algorithm, key: &EncodingKey, claims: &Value) -> String {
    jsonwebtoken::encode(&Header::new(algorithm), claims, key).expect("sign")
}

/// A token with `alg: none` and no signature, the classic forgery.
fn unsigned(claims: &Value) -> String {
    let header = URL_SAFE_NO_PAD.encode(br#"{"alg":"none","typ":"JWT"}"#);
    let payload = URL_SAFE_NO_PAD.encode(serde_json::to_vec(claims).unwrap());
    format!("{header}.{payload}.")
}

fn with_claim(mut claims: Value, name: &str, value: Value) -> Value {
    claims[name] = value;
    claims
}

fn without_claim(mut claims: Value, name: &str) -> Value {
    claims.as_object_mut().unwrap().remove(name);
    claims
}

#[test]
fn an_ed25519_token_from_the_issuer_is_accepted_with_its_claims() {
    let claims: Claims = ed_verifier()
        .verify(&sign_ed(&good_claims()))
        .expect("valid");
    assert_eq!(claims.sub, "user-42");
    assert_eq!(claims.iss, ISSUER);
    assert_eq!(claims.extra["role"], "player");
    assert_eq!(ed_verifier().algorithm(), KeyAlgorithm::EdDsa);
}

#[test]
fn an_rs256_token_from_the_issuer_is_accepted_with_its_claims() {
    let claims: Claims = rsa_verifier()
        .verify(&sign_rsa(&good_claims()))
        .expect("valid");
    assert_eq!(claims.sub, "user-42");
    assert_eq!(rsa_verifier().algorithm(), KeyAlgorithm::Rs256);
}

#[test]
fn alg_none_is_refused_by_name() {
    for verifier in [ed_verifier(), rsa_verifier()] {
        let refused = verifier
            .verify::<Claims>(&unsigned(&good_claims()))
            .unwrap_err();
        assert_eq!(
            refused,
            AuthError::AlgorithmNotAllowed {
                found: "none".into(),
                expected: verifier.algorithm().as_str()
            }
        );
    }
}

#[test]
fn hmac_signed_with_the_public_key_as_secret_is_refused() {
    // The attack: the public key is public, so a forger HMACs with it and
    // hopes the verifier picks the algorithm from the token.
    for (verifier, public) in [(ed_verifier(), ED_PUBLIC), (rsa_verifier(), RSA_PUBLIC)] {
        for algorithm in [Algorithm::HS256, Algorithm::HS384, Algorithm::HS512] {
            let forged = sign(algorithm, &EncodingKey::from_secret(public), &good_claims());
            let refused = verifier.verify::<Claims>(&forged).unwrap_err();
            assert_eq!(
                refused,
                AuthError::AlgorithmNotAllowed {
                    found: format!("{algorithm:?}"),
                    expected: verifier.algorithm().as_str()
                }
            );
        }
    }
}

#[test]
fn the_other_asymmetric_algorithm_is_refused() {
    let refused = ed_verifier()
        .verify::<Claims>(&sign_rsa(&good_claims()))
        .unwrap_err();
    assert!(
        matches!(refused, AuthError::AlgorithmNotAllowed { ref found, expected: "EdDSA" } if found == "RS256")
    );
    let refused = rsa_verifier()
        .verify::<Claims>(&sign_ed(&good_claims()))
        .unwrap_err();
    assert!(
        matches!(refused, AuthError::AlgorithmNotAllowed { ref found, expected: "RS256" } if found == "EdDSA")
    );
}

#[test]
fn a_token_signed_by_another_key_is_refused() {
    let stranger = EncodingKey::from_ed_pem(OTHER_ED_PRIVATE).unwrap();
    let token = sign(Algorithm::EdDSA, &stranger, &good_claims());
    assert_eq!(
        ed_verifier().verify::<Claims>(&token).unwrap_err(),
        AuthError::BadSignature
    );
}

#[test]
fn a_token_changed_after_signing_is_refused() {
    for (verifier, token) in [
        (ed_verifier(), sign_ed(&good_claims())),
        (rsa_verifier(), sign_rsa(&good_claims())),
    ] {
        let mut parts: Vec<&str> = token.split('.').collect();
        let promoted = URL_SAFE_NO_PAD.encode(
            serde_json::to_vec(&with_claim(good_claims(), "role", json!("admin"))).unwrap(),
        );
        parts[1] = &promoted;
        let tampered = parts.join(".");
        assert_eq!(
            verifier.verify::<Claims>(&tampered).unwrap_err(),
            AuthError::BadSignature
        );
    }
}

#[test]
fn an_expired_token_is_refused() {
    let expired = with_claim(good_claims(), "exp", json!(now() - 3600));
    assert_eq!(
        ed_verifier()
            .verify::<Claims>(&sign_ed(&expired))
            .unwrap_err(),
        AuthError::Expired
    );
    assert_eq!(
        rsa_verifier()
            .verify::<Claims>(&sign_rsa(&expired))
            .unwrap_err(),
        AuthError::Expired
    );
}

#[test]
fn the_leeway_tolerates_clock_skew_and_no_more() {
    let just_expired = sign_ed(&with_claim(good_claims(), "exp", json!(now() - 10)));
    assert!(
        ed_verifier().verify::<Claims>(&just_expired).is_ok(),
        "within the default 30 s"
    );
    let strict = ed_verifier().with_leeway(Duration::ZERO);
    assert_eq!(
        strict.verify::<Claims>(&just_expired).unwrap_err(),
        AuthError::Expired
    );
}

#[test]
fn a_token_not_valid_yet_is_refused() {
    let early = with_claim(good_claims(), "nbf", json!(now() + 3600));
    assert_eq!(
        ed_verifier()
            .verify::<Claims>(&sign_ed(&early))
            .unwrap_err(),
        AuthError::NotYetValid
    );
    let started = with_claim(good_claims(), "nbf", json!(now() - 60));
    assert!(ed_verifier().verify::<Claims>(&sign_ed(&started)).is_ok());
}

#[test]
fn a_token_from_another_issuer_is_refused() {
    let foreign = with_claim(good_claims(), "iss", json!("evil-auth"));
    assert_eq!(
        ed_verifier()
            .verify::<Claims>(&sign_ed(&foreign))
            .unwrap_err(),
        AuthError::WrongIssuer {
            expected: ISSUER.into()
        }
    );
}

#[test]
fn exp_and_iss_are_required() {
    for claim in ["exp", "iss"] {
        let token = sign_ed(&without_claim(good_claims(), claim));
        assert_eq!(
            ed_verifier().verify::<Claims>(&token).unwrap_err(),
            AuthError::MissingClaim(claim.into()),
        );
    }
}

#[test]
fn the_audience_is_checked_when_set() {
    let verifier = ed_verifier().with_audience("game");
    let for_game = sign_ed(&with_claim(good_claims(), "aud", json!(["market", "game"])));
    let claims: Claims = verifier.verify(&for_game).expect("game is an audience");
    assert_eq!(claims.aud, ["market", "game"]);

    let for_market = sign_ed(&with_claim(good_claims(), "aud", json!("market")));
    assert_eq!(
        verifier.verify::<Claims>(&for_market).unwrap_err(),
        AuthError::WrongAudience
    );

    let for_anyone = sign_ed(&good_claims());
    assert_eq!(
        verifier.verify::<Claims>(&for_anyone).unwrap_err(),
        AuthError::MissingClaim("aud".into())
    );
    // With the explicit opt-out, `aud` is not looked at.
    assert!(ed_verifier().verify::<Claims>(&for_market).is_ok());
}

#[test]
fn the_audience_is_required_unless_opted_out() {
    let unset = TokenVerifier::ed25519_pem(ED_PUBLIC, ISSUER).unwrap();
    for token in [
        sign_ed(&good_claims()),
        sign_ed(&with_claim(good_claims(), "aud", json!("game"))),
    ] {
        assert_eq!(
            unset.verify::<Claims>(&token).unwrap_err(),
            AuthError::AudienceNotConfigured
        );
    }
    let error = Error::from(AuthError::AudienceNotConfigured);
    assert_eq!(error.kind(), ErrorKind::Unauthorized);
    assert!(error.message().contains("with_any_audience"));
    // The opt-out after an audience drops the requirement again.
    let any = unset.with_audience("game").with_any_audience();
    assert!(any.verify::<Claims>(&sign_ed(&good_claims())).is_ok());
}

#[test]
fn malformed_tokens_and_claims_are_refused_with_the_reason() {
    for garbage in ["", "abc", "a.b", "a.b.c.d", "!!!.e30.", "e30.e30.sig"] {
        let refused = ed_verifier().verify::<Claims>(garbage).unwrap_err();
        assert!(
            matches!(refused, AuthError::Malformed(_)),
            "{garbage:?}: {refused:?}"
        );
    }
    let no_subject = sign_ed(&without_claim(good_claims(), "sub"));
    let refused = ed_verifier().verify::<Claims>(&no_subject).unwrap_err();
    assert!(
        matches!(&refused, AuthError::InvalidClaims(why) if why.contains("sub")),
        "{refused:?}"
    );
    let text_expiry = sign_ed(&with_claim(good_claims(), "exp", json!("tomorrow")));
    assert_eq!(
        ed_verifier().verify::<Claims>(&text_expiry).unwrap_err(),
        AuthError::MissingClaim("exp".into())
    );
    let text_start = sign_ed(&with_claim(good_claims(), "nbf", json!("soon")));
    let refused = ed_verifier().verify::<Claims>(&text_start).unwrap_err();
    assert!(
        matches!(&refused, AuthError::InvalidClaims(why) if why.contains("nbf")),
        "{refused:?}"
    );
}

#[test]
fn every_refusal_is_unauthorized_and_not_retryable() {
    let error = Error::from(AuthError::BadSignature);
    assert_eq!(error.kind(), ErrorKind::Unauthorized);
    assert!(!error.is_retryable());
    let source = std::error::Error::source(&error).expect("the AuthError is kept");
    assert_eq!(
        source.downcast_ref::<AuthError>(),
        Some(&AuthError::BadSignature)
    );
}

#[test]
fn a_key_of_the_wrong_kind_is_a_configuration_error() {
    let error = TokenVerifier::ed25519_pem(RSA_PUBLIC, ISSUER).unwrap_err();
    assert_eq!(error.kind(), ErrorKind::Config);
    let error = TokenVerifier::rs256_pem(b"not a key", ISSUER).unwrap_err();
    assert_eq!(error.kind(), ErrorKind::Config);
}

#[test]
fn a_service_can_use_its_own_claim_type() {
    #[derive(Deserialize)]
    struct GameClaims {
        sub: String,
        role: String,
    }
    let claims: GameClaims = ed_verifier().verify(&sign_ed(&good_claims())).unwrap();
    assert_eq!(
        (claims.sub.as_str(), claims.role.as_str()),
        ("user-42", "player")
    );
}

// The layer.

/// An inner service that counts its calls and echoes the subject it finds.
fn echo_subject(
    calls: Arc<AtomicUsize>,
) -> impl tower::Service<Request<String>, Response = Response<String>, Error = Infallible, Future: Send>
+ Clone {
    service_fn(move |request: Request<String>| {
        calls.fetch_add(1, Ordering::SeqCst);
        let subject = request
            .extensions()
            .get::<Claims>()
            .map(|claims| claims.sub.clone());
        async move {
            Ok::<_, Infallible>(Response::new(
                subject.unwrap_or_else(|| "<no claims>".into()),
            ))
        }
    })
}

fn request(authorization: Option<String>, content_type: &str) -> Request<String> {
    let mut builder = Request::post("/orders").header("content-type", content_type);
    if let Some(value) = authorization {
        builder = builder.header("authorization", value);
    }
    builder.body(String::new()).unwrap()
}

fn layer() -> AuthLayer {
    AuthLayer::new(Arc::new(ed_verifier()))
}

#[tokio::test]
async fn the_layer_passes_a_valid_token_and_its_claims_to_the_inner_service() {
    let calls = Arc::new(AtomicUsize::new(0));
    let service = layer().layer(echo_subject(calls.clone()));
    let token = sign_ed(&good_claims());
    for scheme in ["Bearer", "bearer"] {
        let response = service
            .clone()
            .oneshot(request(
                Some(format!("{scheme} {token}")),
                "application/json",
            ))
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(response.body(), "user-42");
    }
    assert_eq!(calls.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn the_layer_answers_401_without_calling_the_inner_service() {
    let calls = Arc::new(AtomicUsize::new(0));
    let service = layer().layer(echo_subject(calls.clone()));
    let expired = sign_ed(&with_claim(good_claims(), "exp", json!(now() - 3600)));
    let cases = [
        (None, "Bearer".to_owned()),
        (
            Some(format!("Basic {}", URL_SAFE_NO_PAD.encode("user:pw"))),
            "Bearer error=\"invalid_token\", error_description=\"the `Authorization` header is not `Bearer <token>`\"".to_owned(),
        ),
        (
            Some(format!("Bearer {expired}")),
            "Bearer error=\"invalid_token\", error_description=\"the token has expired\"".to_owned(),
        ),
        (
            Some(format!("Bearer {}", unsigned(&good_claims()))),
            "Bearer error=\"invalid_token\", error_description=\"the token is signed with `none`, but only `EdDSA` is accepted\"".to_owned(),
        ),
    ];
    for (authorization, challenge) in cases {
        let response = service
            .clone()
            .oneshot(request(authorization, "application/json"))
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
        assert_eq!(response.headers()["www-authenticate"], challenge.as_str());
        // The same JSON error body as every other HTTP error of the crate.
        assert_eq!(response.headers()["content-type"], "application/json");
        let body: serde_json::Value = serde_json::from_str(response.body()).unwrap();
        assert_eq!(body["error"]["kind"], "unauthorized");
        let message = body["error"]["message"].as_str().unwrap();
        assert!(
            challenge == "Bearer" || challenge.contains(message),
            "{message:?} is the reason in {challenge:?}"
        );
    }
    assert_eq!(
        calls.load(Ordering::SeqCst),
        0,
        "the inner service was called"
    );
}

#[tokio::test]
async fn the_layer_answers_grpc_with_unauthenticated() {
    let calls = Arc::new(AtomicUsize::new(0));
    let service = Auth::new(echo_subject(calls.clone()), Arc::new(ed_verifier()));
    let expired = sign_ed(&with_claim(good_claims(), "exp", json!(now() - 3600)));

    let response = service
        .clone()
        .oneshot(request(
            Some(format!("Bearer {expired}")),
            "application/grpc+proto",
        ))
        .await
        .unwrap();
    // gRPC carries the outcome in grpc-status; HTTP status stays 200.
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()["content-type"], "application/grpc");
    assert_eq!(response.headers()["grpc-status"], "16");
    assert_eq!(response.headers()["grpc-message"], "the token has expired");

    let response = service
        .clone()
        .oneshot(request(None, "application/grpc"))
        .await
        .unwrap();
    assert_eq!(response.headers()["grpc-status"], "16");
    assert_eq!(
        response.headers()["grpc-message"],
        "the request has no `Authorization` header"
    );
    assert_eq!(calls.load(Ordering::SeqCst), 0);

    let token = sign_ed(&good_claims());
    let response = service
        .oneshot(request(Some(format!("Bearer {token}")), "application/grpc"))
        .await
        .unwrap();
    assert_eq!(response.body(), "user-42");
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn the_layer_can_store_a_custom_claim_type() {
    #[derive(Debug, Clone, Deserialize)]
    struct GameClaims {
        role: String,
    }
    let service = AuthLayer::<GameClaims>::with_claims(Arc::new(ed_verifier())).layer(service_fn(
        |request: Request<String>| async move {
            let role = request
                .extensions()
                .get::<GameClaims>()
                .unwrap()
                .role
                .clone();
            Ok::<_, Infallible>(Response::new(role))
        },
    ));
    let token = sign_ed(&good_claims());
    let response = service
        .oneshot(request(Some(format!("Bearer {token}")), "application/json"))
        .await
        .unwrap();
    assert_eq!(response.body(), "player");
}

#[test]
fn the_wrapper_gives_access_to_the_inner_service() {
    let mut auth = Auth::new(7_u32, Arc::new(ed_verifier()));
    assert_eq!(*auth.get_ref(), 7);
    *auth.get_mut() = 8;
    assert_eq!(auth.into_inner(), 8);
}
