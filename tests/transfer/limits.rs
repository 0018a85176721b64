//! What a server refuses: uploads over its limit (413, nothing left on
//! disk), an upload over an existing file unless allowed (409, the file
//! unchanged), names that could leave its directory (400); and what its
//! errors never tell: the server's paths.

use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use switchboard::transfer::{TransferService, validate_file_name};
use tower::ServiceExt;

use super::*;

async fn serve(service: TransferService) -> Server {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let (stop, stopped) = oneshot::channel::<()>();
    tokio::spawn(
        TransferServer::with_service(service).serve(listener, async {
            stopped.await.ok();
        }),
    );
    Server {
        client: TransferClient::connect(address).await.unwrap(),
        _stop: stop,
    }
}

fn entries(dir: &std::path::Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
        .collect()
}

fn once(text: &'static str) -> ByteStream {
    futures_util::stream::iter([Ok(Bytes::from(text))]).boxed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_over_the_limit_is_413_and_leaves_nothing_on_disk() {
    let dir = temp_dir();
    let _cleanup = Cleanup(dir.clone());
    let store = Arc::new(DirStore::new(&dir).await.unwrap());
    let server = serve(TransferService::new(store).with_max_upload(1024 * 1024)).await;

    // Streamed, so no content-length: refused once the bytes pass the limit.
    let (chunks, _) = generated(3 * 1024 * 1024, 7);
    let refused = server.client.upload("big.bin", chunks).await.unwrap_err();
    assert_eq!(refused.kind(), ErrorKind::Rejected, "{refused:?}");
    assert!(refused.message().starts_with("413"), "{refused}");
    assert!(!refused.is_retryable());
    assert!(entries(&dir).is_empty(), "left behind: {:?}", entries(&dir));

    // Exactly at the limit is allowed.
    let (chunks, sent) = generated(1024 * 1024, 8);
    assert_eq!(
        server.client.upload("fits.bin", chunks).await.unwrap(),
        1024 * 1024
    );
    let (got, len) = hash(server.client.download("fits.bin").await.unwrap())
        .await
        .unwrap();
    assert_eq!((got, len), (sent.await.unwrap(), 1024 * 1024));
}

#[tokio::test]
async fn a_declared_length_over_the_limit_is_refused_before_the_store_sees_it() {
    let store = Arc::new(HashingStore::default());
    let service = TransferService::new(store.clone()).with_max_upload(4);
    let upload = Request::put("/files/big.bin")
        .header(http::header::CONTENT_LENGTH, "5")
        .body(Full::new(Bytes::from("12345")))
        .unwrap();
    let answer = service.oneshot(upload).await.unwrap();
    assert_eq!(answer.status(), StatusCode::PAYLOAD_TOO_LARGE);
    assert!(store.uploads.lock().unwrap().is_empty(), "never stored");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_existing_file_is_replaced_only_when_the_server_allows_it() {
    let dir = temp_dir();
    let _cleanup = Cleanup(dir.clone());
    let store = Arc::new(DirStore::new(&dir).await.unwrap());
    let server = serve(TransferService::new(store.clone())).await;
    assert_eq!(
        server.client.upload("a.txt", once("first")).await.unwrap(),
        5
    );
    let refused = server
        .client
        .upload("a.txt", once("second"))
        .await
        .unwrap_err();
    assert_eq!(refused.kind(), ErrorKind::Rejected, "{refused:?}");
    assert!(refused.message().starts_with("409"), "{refused}");
    assert_eq!(std::fs::read(dir.join("a.txt")).unwrap(), b"first");
    assert_eq!(entries(&dir), ["a.txt"], "no partial left");

    let replacing = serve(TransferService::new(store).with_overwrite(true)).await;
    assert_eq!(
        replacing
            .client
            .upload("a.txt", once("second"))
            .await
            .unwrap(),
        6
    );
    assert_eq!(std::fs::read(dir.join("a.txt")).unwrap(), b"second");
}

#[tokio::test]
async fn two_new_uploads_of_one_name_store_one_file() {
    let dir = temp_dir();
    let _cleanup = Cleanup(dir.clone());
    let store = DirStore::new(&dir).await.unwrap();
    let (first, second) = tokio::join!(
        store.put_new("race.txt", once("one")),
        store.put_new("race.txt", once("two"))
    );
    let stored: Vec<_> = [first.unwrap(), second.unwrap()]
        .into_iter()
        .flatten()
        .collect();
    assert_eq!(stored, [3], "exactly one stored");
    assert_eq!(entries(&dir), ["race.txt"]);
}

/// A store whose errors name a path on the server.
struct FailingStore;

#[async_trait]
impl FileStore for FailingStore {
    async fn put(&self, _: &str, _: ByteStream) -> Result<u64, Error> {
        Err(Error::new(
            ErrorKind::Unavailable,
            "writing /srv/private/uploads/x: disk full",
        ))
    }
    async fn get(&self, _: &str) -> Result<(ByteStream, Option<u64>), Error> {
        Err(Error::new(ErrorKind::NotFound, "opening /srv/private/x"))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn error_answers_name_no_server_path() {
    let dir = temp_dir();
    let _cleanup = Cleanup(dir.clone());
    let server = serve(TransferService::new(Arc::new(
        DirStore::new(&dir).await.unwrap(),
    )))
    .await;
    let missing = server.client.download("missing.bin").await.unwrap_err();
    assert_eq!(missing.kind(), ErrorKind::NotFound);
    let root = dir.to_string_lossy().into_owned();
    assert!(!missing.message().contains(&root), "{missing}");
    assert!(missing.message().contains("missing.bin"), "{missing}");

    let failing = serve(TransferService::new(Arc::new(FailingStore)).with_overwrite(true)).await;
    let failed = failing.client.upload("x", once("x")).await.unwrap_err();
    assert!(failed.message().starts_with("500"), "{failed}");
    let missing = failing.client.download("x").await.unwrap_err();
    for error in [failed, missing] {
        assert!(!error.message().contains("/srv"), "{error}");
    }
}

#[tokio::test]
async fn names_that_could_leave_the_directory_are_400() {
    let dir = temp_dir();
    let _cleanup = Cleanup(dir.clone());
    let service = TransferService::new(Arc::new(DirStore::new(&dir).await.unwrap()));
    for path in [
        "/files/..",
        "/files/../escape",
        "/files/%2e%2e",
        "/files/..%2Fescape",
        "/files/a%2Fb",
        "/files/a%5Cb",
        "/files//etc/passwd",
        "/files/a%00b",
        "/files/",
    ] {
        let request = Request::put(path)
            .body(Full::new(Bytes::from("x")))
            .unwrap();
        let answer = service.clone().oneshot(request).await.unwrap();
        assert_eq!(answer.status(), StatusCode::BAD_REQUEST, "{path}");
        let body = answer.into_body().collect().await.unwrap().to_bytes();
        assert!(!String::from_utf8_lossy(&body).contains(&*dir.to_string_lossy()));
    }
    for name in ["a\0b", "/etc/passwd", "..", "a/../b", "a\\b", "ü"] {
        assert!(validate_file_name(name).is_err(), "{name:?}");
    }
    assert!(entries(&dir).is_empty());
}
