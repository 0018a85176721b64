//! One client across server restarts: the next call dials again, a call
//! while the server is down is a retryable `Connection` error, and a closed
//! client refuses every call with `Closed`.

use super::*;

/// A server on `listener` over `dir`, and what stops it and waits for it.
struct Running {
    stop: oneshot::Sender<()>,
    task: tokio::task::JoinHandle<Result<(), Error>>,
}

async fn serve(listener: TcpListener, dir: &std::path::Path) -> Running {
    let store = Arc::new(DirStore::new(dir).await.unwrap());
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(TransferServer::new(store).serve(listener, async {
        stopped.await.ok();
    }));
    Running { stop, task }
}

impl Running {
    /// Stops accepting, closes every connection and waits until it has.
    async fn stop(self) {
        self.stop.send(()).ok();
        self.task.await.unwrap().unwrap();
    }
}

async fn download_text(client: &TransferClient, name: &str) -> Result<Vec<u8>, Error> {
    let (mut download, mut text) = (client.download(name).await?, Vec::new());
    while let Some(chunk) = download.next().await {
        text.extend_from_slice(&chunk?);
    }
    Ok(text)
}

fn chunks(text: &'static str) -> impl Stream<Item = Result<Bytes, Infallible>> + Send + 'static {
    futures_util::stream::iter([Ok(Bytes::from_static(text.as_bytes()))])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_client_transfers_again_after_the_server_restarts_on_its_port() {
    let dir = temp_dir();
    let _cleanup = Cleanup(dir.clone());
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let server = serve(listener, &dir).await;
    let client = TransferClient::builder(format!("http://{address}"))
        .connect()
        .await
        .unwrap();
    assert_eq!(
        client
            .upload("before.txt", chunks("first run"))
            .await
            .unwrap(),
        9
    );

    server.stop().await;
    // Down: retryable, because the next call dials again.
    let down = client.download("before.txt").await.unwrap_err();
    assert_eq!(down.kind(), ErrorKind::Connection, "{down:?}");
    assert!(down.is_retryable());

    let server = serve(TcpListener::bind(address).await.unwrap(), &dir).await;
    assert_eq!(
        download_text(&client, "before.txt").await.unwrap(),
        b"first run"
    );
    assert_eq!(
        client
            .upload("after.txt", chunks("second run"))
            .await
            .unwrap(),
        10
    );

    // Once more, this time without a call in between that notices the
    // server is gone: the first call after the restart re-dials by itself.
    server.stop().await;
    let server = serve(TcpListener::bind(address).await.unwrap(), &dir).await;
    assert_eq!(
        download_text(&client, "after.txt").await.unwrap(),
        b"second run"
    );

    let clone = client.clone();
    client.close();
    assert!(clone.is_closed());
    let closed = clone.download("after.txt").await.unwrap_err();
    assert_eq!(closed.kind(), ErrorKind::Closed, "{closed:?}");
    assert!(!closed.is_retryable());
    server.stop().await;
}

#[tokio::test]
async fn a_client_built_without_a_server_dials_on_its_first_call() {
    let dir = temp_dir();
    let _cleanup = Cleanup(dir.clone());
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    drop(listener);
    // `build` does not dial, so it succeeds with nobody listening.
    let client = TransferClient::builder(format!("http://{address}"))
        .build()
        .unwrap();
    let refused = client.download("a.txt").await.unwrap_err();
    assert_eq!(refused.kind(), ErrorKind::Connection, "{refused:?}");

    let server = serve(TcpListener::bind(address).await.unwrap(), &dir).await;
    assert_eq!(client.upload("a.txt", chunks("late")).await.unwrap(), 4);
    client.close();
    server.stop().await;
}

#[test]
fn urls_other_than_http_or_https_to_a_host_are_configuration_errors() {
    for bad in [
        "127.0.0.1:9000",
        "ftp://files.internal",
        "http://",
        "http://files.internal/files/a",
        "http://user@files.internal",
        "not a url",
    ] {
        let error = TransferClient::builder(bad).build().unwrap_err();
        assert_eq!(error.kind(), ErrorKind::Config, "{bad:?}: {error:?}");
    }
    let client = TransferClient::builder("http://[::1]:9000/")
        .build()
        .unwrap();
    assert_eq!(client.url(), "http://[::1]:9000");
    assert_eq!(
        TransferClient::builder("http://files.internal")
            .build()
            .unwrap()
            .url(),
        "http://files.internal:80"
    );
    #[cfg(not(feature = "file-transfer-tls"))]
    assert_eq!(
        TransferClient::builder("https://files.internal")
            .build()
            .unwrap_err()
            .kind(),
        ErrorKind::Config
    );
}

/// Clients and servers move between tasks and sit in shared state.
const _: fn() = || {
    fn shareable<T: Send + Sync + Clone + 'static>() {}
    shareable::<TransferClient>();
    shareable::<TransferServer>();
    shareable::<switchboard::transfer::TransferService>();
};
