//! Push receivers that authenticate: signed webhooks (unsigned, forged,
//! expired and replayed pushes refused with 401 and never delivered) and a
//! tower layer in front of the HTTP and gRPC receivers.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use switchboard::transport::http::{
    HttpTransport, WEBHOOK_ID, WEBHOOK_SIGNATURE, WEBHOOK_TIMESTAMP, WebhookSigning,
};
use switchboard::transport::push::{PushConfig, PushEndpoint, PushRoutes};
use switchboard::{Publisher, RawMessage, SubscribeOptions, Subscriber};

const KEY: &[u8] = b"a shared webhook key, 32 bytes.";

fn config(url: &str) -> PushConfig {
    PushConfig::new(PushRoutes::new().default_route(PushEndpoint::new(url))).with_retry(
        switchboard::config::RetryConfig::default()
            .with_max_attempts(1)
            .with_backoff_ms(1),
    )
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// `v1,` and the base64 HMAC-SHA256 of `{id}.{timestamp}.{body}`, computed
/// here independently of the crate.
fn signature(key: &[u8], id: &str, timestamp: u64, body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(key).unwrap();
    mac.update(format!("{id}.{timestamp}.").as_bytes());
    mac.update(body);
    let encoded = base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes());
    format!("v1,{encoded}")
}

/// A receiver with the signing key on a free port, a subscription to
/// `topic` whose handler counts deliveries, and the URL.
async fn signed_receiver(topic: &str) -> (HttpTransport, String, Arc<AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let transport = HttpTransport::new(config(&url))
        .unwrap()
        .with_signing(WebhookSigning::new(KEY).unwrap())
        .unwrap();
    tokio::spawn(transport.serve(listener));
    let handled = Arc::new(AtomicUsize::new(0));
    let mut subscription = transport
        .subscribe(topic, SubscribeOptions::new("g"))
        .await
        .unwrap();
    let count = handled.clone();
    tokio::spawn(async move {
        while let Some(delivery) = subscription.recv().await {
            count.fetch_add(1, Ordering::SeqCst);
            let _ = delivery.ack().await;
        }
    });
    (transport, url, handled)
}

async fn post(
    url: &str,
    topic: &str,
    body: &'static str,
    headers: &[(&str, String)],
) -> reqwest::StatusCode {
    let mut request = reqwest::Client::new()
        .post(format!("{url}/events/{topic}"))
        .body(body);
    for (name, value) in headers {
        request = request.header(*name, value);
    }
    request.send().await.unwrap().status()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsigned_forged_expired_and_replayed_pushes_are_401_and_never_handled() {
    let topic = format!("signed-{}", uuid::Uuid::new_v4().simple());
    let (transport, url, handled) = signed_receiver(&topic).await;
    let body = "AAPL 150.00";
    let id = format!("msg_{}", uuid::Uuid::new_v4().simple());
    let at = now();
    let signed = |id: &str, at: u64, key: &[u8]| {
        vec![
            (WEBHOOK_ID, id.to_owned()),
            (WEBHOOK_TIMESTAMP, at.to_string()),
            (WEBHOOK_SIGNATURE, signature(key, id, at, body.as_bytes())),
        ]
    };
    let unauthorized = reqwest::StatusCode::UNAUTHORIZED;
    // Unsigned.
    assert_eq!(post(&url, &topic, body, &[]).await, unauthorized);
    // Forged: another key, and the right key over another body.
    assert_eq!(
        post(
            &url,
            &topic,
            body,
            &signed(&id, at, b"not the shared key!!")
        )
        .await,
        unauthorized
    );
    let mut other_body = signed(&id, at, KEY);
    other_body[2].1 = signature(KEY, &id, at, b"AAPL 1.00");
    assert_eq!(post(&url, &topic, body, &other_body).await, unauthorized);
    // Expired, and from the future: outside the 5 min window either way.
    for at in [at - 3600, at + 3600] {
        assert_eq!(
            post(&url, &topic, body, &signed(&id, at, KEY)).await,
            unauthorized
        );
    }
    // Signed right: taken once; the same request again is a replay.
    assert_eq!(
        post(&url, &topic, body, &signed(&id, at, KEY)).await,
        reqwest::StatusCode::NO_CONTENT
    );
    assert_eq!(
        post(&url, &topic, body, &signed(&id, at, KEY)).await,
        unauthorized
    );

    // The transport's own publisher signs; its push is handled. Each push
    // returns once handled, so the count is final: the refused ones never
    // reached the inbox.
    transport
        .publish(&topic, RawMessage::new(body))
        .await
        .expect("a signed publish");
    assert_eq!(handled.load(Ordering::SeqCst), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publisher_without_the_key_is_refused_and_told_not_to_retry() {
    let topic = format!("signed-{}", uuid::Uuid::new_v4().simple());
    let (_receiver, url, handled) = signed_receiver(&topic).await;
    let unsigned = HttpTransport::new(config(&url)).unwrap();
    let refused = unsigned
        .publish(&topic, RawMessage::new("x"))
        .await
        .unwrap_err();
    assert_eq!(
        refused.kind(),
        switchboard::ErrorKind::Unauthorized,
        "{refused:?}"
    );
    assert!(!refused.is_retryable());
    let stranger = HttpTransport::new(config(&url))
        .unwrap()
        .with_signing(WebhookSigning::new(b"another key of 16+ bytes".to_vec()).unwrap())
        .unwrap();
    let refused = stranger
        .publish(&topic, RawMessage::new("x"))
        .await
        .unwrap_err();
    assert_eq!(refused.kind(), switchboard::ErrorKind::Unauthorized);
    assert_eq!(handled.load(Ordering::SeqCst), 0);
}

#[test]
fn signing_on_a_shared_transport_is_a_config_error() {
    let transport = HttpTransport::new(PushConfig::default()).unwrap();
    let _clone = transport.clone();
    let error = transport
        .with_signing(WebhookSigning::new(KEY).unwrap())
        .unwrap_err();
    assert_eq!(error.kind(), switchboard::ErrorKind::Config);
}

#[cfg(all(feature = "auth", feature = "grpc"))]
mod layered {
    use switchboard::auth::{AuthLayer, TokenVerifier};
    use switchboard::transport::grpc::GrpcTransport;
    use switchboard::{ErrorKind, Transport};

    use super::*;

    use std::time::Duration;

    const PATIENCE: Duration = Duration::from_secs(20);
    const ED_PUBLIC: &[u8] = include_bytes!("../fixtures/auth/ed25519_public.pem");
    const ED_PRIVATE: &[u8] = include_bytes!("../fixtures/auth/ed25519_private.pem");

    fn layer() -> AuthLayer {
        AuthLayer::new(Arc::new(
            TokenVerifier::ed25519_pem(ED_PUBLIC, "auth-service")
                .unwrap()
                .with_any_audience(),
        ))
    }

    /// A publisher without a token is refused by the layer (401 /
    /// UNAUTHENTICATED); returns the subscription, to show nothing of it
    /// reached the inbox.
    async fn refused(
        receiver: &dyn Transport,
        publisher: &dyn Transport,
        topic: &str,
    ) -> switchboard::transport::Subscription {
        let subscription = receiver
            .subscribe(topic, SubscribeOptions::new("g"))
            .await
            .unwrap();
        let refused =
            tokio::time::timeout(PATIENCE, publisher.publish(topic, RawMessage::new("x")))
                .await
                .expect("an answer in time")
                .unwrap_err();
        assert_eq!(refused.kind(), ErrorKind::Unauthorized, "{refused:?}");
        assert!(!refused.is_retryable());
        subscription
    }

    fn token() -> String {
        let now = now();
        let claims = serde_json::json!({ "sub": "publisher", "iss": "auth-service", "exp": now + 600, "iat": now });
        jsonwebtoken::encode(
            &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::EdDSA),
            &claims,
            &jsonwebtoken::EncodingKey::from_ed_pem(ED_PRIVATE).unwrap(),
        )
        .unwrap()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_http_receiver_behind_auth_layer_refuses_a_push_without_a_token() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let transport = HttpTransport::new(config(&url)).unwrap();
        tokio::spawn(transport.serve_with_layer(listener, layer()));
        let topic = format!("layered-{}", uuid::Uuid::new_v4().simple());
        let mut subscription = refused(&transport, &transport, &topic).await;
        // With a token the push passes, and it is the first delivery: the
        // refused one never reached the inbox.
        let with_token = tokio::spawn(
            reqwest::Client::new()
                .post(format!("{url}/events/{topic}"))
                .bearer_auth(token())
                .body("with a token")
                .send(),
        );
        let first = tokio::time::timeout(PATIENCE, subscription.recv())
            .await
            .expect("a delivery in time")
            .expect("a delivery");
        assert_eq!(first.body().as_ref(), b"with a token");
        first.ack().await.unwrap();
        let answer = with_token.await.unwrap().unwrap();
        assert_eq!(answer.status(), reqwest::StatusCode::NO_CONTENT);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_grpc_receiver_behind_auth_layer_refuses_a_push_without_a_token() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let transport = GrpcTransport::new(config(&url)).unwrap();
        tokio::spawn(transport.serve_with_layer(listener, layer()));
        let topic = format!("layered-{}", uuid::Uuid::new_v4().simple());
        let mut subscription = refused(&transport, &transport, &topic).await;
        // The layer answered before the push service ran (that is where a
        // push enters the inbox), and the refusal has come back: nothing is
        // in flight, so the inbox is empty now, without waiting.
        use futures_util::FutureExt as _;
        assert!(
            subscription.recv().now_or_never().is_none(),
            "a refused push was delivered"
        );
    }
}
