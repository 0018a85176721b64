//! The server as a tower service behind `AuthLayer`, and the client's
//! headers and layers: a request without a token is refused with 401
//! before the store sees it, one with a token passes.

use std::time::{SystemTime, UNIX_EPOCH};

use http::header::AUTHORIZATION;
use http::{HeaderValue, Request, StatusCode};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use switchboard::auth::{AuthLayer, TokenVerifier};
use switchboard::transfer::TransferService;
use tower::ServiceBuilder;

use super::*;

const ED_PUBLIC: &[u8] = include_bytes!("../fixtures/auth/ed25519_public.pem");
const ED_PRIVATE: &[u8] = include_bytes!("../fixtures/auth/ed25519_private.pem");
const ISSUER: &str = "auth-service";

fn token() -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let claims =
        serde_json::json!({ "sub": "uploader", "iss": ISSUER, "exp": now + 600, "iat": now });
    jsonwebtoken::encode(
        &Header::new(Algorithm::EdDSA),
        &claims,
        &EncodingKey::from_ed_pem(ED_PRIVATE).unwrap(),
    )
    .unwrap()
}

/// A `TransferService` over `store` behind `AuthLayer`, served on a free
/// port; the client has no token.
async fn start_with_auth(store: Arc<dyn FileStore>) -> Server {
    let verifier = Arc::new(
        TokenVerifier::ed25519_pem(ED_PUBLIC, ISSUER)
            .unwrap()
            .with_any_audience(),
    );
    let service = ServiceBuilder::new()
        .layer(AuthLayer::new(verifier))
        .service(TransferService::new(store));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let (stop, stopped) = oneshot::channel::<()>();
    tokio::spawn(
        TransferServer::with_service(service).serve(listener, async {
            stopped.await.ok();
        }),
    );
    Server {
        client: TransferClient::builder(format!("http://{address}"))
            .connect()
            .await
            .unwrap(),
        _stop: stop,
    }
}

fn bearer() -> HeaderValue {
    HeaderValue::from_str(&format!("Bearer {}", token())).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_token_the_server_answers_401_and_with_one_the_transfer_passes() {
    let store = Arc::new(HashingStore::default());
    let server = start_with_auth(store.clone()).await;

    let (chunks, _) = generated(64 * 1024, 3);
    let refused = server
        .client
        .upload("secret.bin", chunks)
        .await
        .unwrap_err();
    assert_eq!(refused.kind(), ErrorKind::Unauthorized, "{refused:?}");
    assert!(!refused.is_retryable());
    assert!(refused.message().starts_with("401"), "{refused}");
    let refused = server.client.download("generated.bin").await.unwrap_err();
    assert_eq!(refused.kind(), ErrorKind::Unauthorized, "{refused:?}");
    let forged = server
        .client
        .with_header(
            AUTHORIZATION,
            HeaderValue::from_static("Bearer not.a.token"),
        )
        .download("generated.bin")
        .await
        .unwrap_err();
    assert_eq!(forged.kind(), ErrorKind::Unauthorized, "{forged:?}");
    assert!(
        store.uploads.lock().unwrap().is_empty(),
        "the store was reached"
    );

    let with_token = server.client.with_header(AUTHORIZATION, bearer());
    let (chunks, sent_digest) = generated(4 * 1024 * 1024, 4);
    assert_eq!(
        with_token.upload("secret.bin", chunks).await.unwrap(),
        4 * 1024 * 1024
    );
    let sent_digest = sent_digest.await.unwrap();
    let uploads = store.uploads.lock().unwrap().clone();
    assert_eq!(
        uploads,
        [("secret.bin".to_owned(), sent_digest, 4 * 1024 * 1024)]
    );
    let download = with_token.download("generated.bin").await.unwrap();
    let (digest, len) = hash(download).await.unwrap();
    assert_eq!(len, SIZE);
    let sent = store.sent.lock().unwrap().take().unwrap();
    assert_eq!(digest, sent.await.unwrap());
    // The clone's header stays on the clone.
    assert!(server.client.headers().is_empty());
}

#[tokio::test]
async fn builder_headers_and_layers_reach_every_request() {
    let store = Arc::new(HashingStore::default());
    let server = start_with_auth(store.clone()).await;
    let url = server.client.url().to_owned();

    // A header for every request, set on the builder.
    let client = TransferClient::builder(&url)
        .header(AUTHORIZATION, bearer())
        .build()
        .unwrap();
    let empty = futures_util::stream::empty::<Result<Bytes, Infallible>>();
    assert_eq!(client.upload("empty.bin", empty).await.unwrap(), 0);

    // A client layer sees each request and its answer.
    let (seen, mut statuses) = mpsc::unbounded_channel();
    let client = TransferClient::builder(&url)
        .layer(tower::util::MapRequestLayer::new(
            |mut request: Request<switchboard::transfer::TransferBody>| {
                request.headers_mut().insert(AUTHORIZATION, bearer());
                request
            },
        ))
        .layer(tower::util::MapResponseLayer::new(
            move |response: http::Response<hyper::body::Incoming>| {
                seen.send(response.status()).ok();
                response
            },
        ))
        .build()
        .unwrap();
    let missing = client.download("missing.bin").await.unwrap_err();
    assert_eq!(missing.kind(), ErrorKind::NotFound, "{missing:?}");
    assert_eq!(statuses.recv().await, Some(StatusCode::NOT_FOUND));
}
