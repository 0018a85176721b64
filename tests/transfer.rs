//! HTTP/2 file transfer: 32 MiB each way, generated and hashed on the fly
//! (never held whole), with the SHA-256 compared on both ends; the directory
//! store; errors.

use std::convert::Infallible;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use sha2::{Digest, Sha256};
use switchboard::transfer::{ByteStream, DirStore, FileStore, TransferClient, TransferServer};
use switchboard::{Error, ErrorKind};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot};

const SIZE: u64 = 32 * 1024 * 1024;

/// `len` pseudo-random bytes, produced lazily in chunks of varying size (so
/// frames and chunks do not line up), hashed as they are produced; the digest
/// arrives on the returned receiver once the last chunk has been taken.
fn generated(len: u64, seed: u64) -> (ByteStream, oneshot::Receiver<[u8; 32]>) {
    struct State {
        left: u64,
        rng: u64,
        hasher: Sha256,
        done: Option<oneshot::Sender<[u8; 32]>>,
    }
    let (done, digest) = oneshot::channel();
    let state = State {
        left: len,
        rng: seed | 1,
        hasher: Sha256::new(),
        done: Some(done),
    };
    let stream = futures_util::stream::unfold(state, |mut state| async move {
        if state.left == 0 {
            if let Some(done) = state.done.take() {
                done.send(state.hasher.clone().finalize().into()).ok();
            }
            return None;
        }
        // xorshift64: fast, deterministic, not compressible.
        let mut next = || {
            state.rng ^= state.rng << 13;
            state.rng ^= state.rng >> 7;
            state.rng ^= state.rng << 17;
            state.rng
        };
        let size = (1 + next() % 100_000).min(state.left) as usize;
        let mut chunk = Vec::with_capacity(size + 8);
        while chunk.len() < size {
            chunk.extend_from_slice(&next().to_le_bytes());
        }
        chunk.truncate(size);
        state.hasher.update(&chunk);
        state.left -= size as u64;
        Some((Ok(Bytes::from(chunk)), state))
    });
    (stream.boxed(), digest)
}

/// Hashes a stream as it is consumed, chunk by chunk.
async fn hash(
    mut chunks: impl Stream<Item = Result<Bytes, Error>> + Unpin,
) -> Result<([u8; 32], u64), Error> {
    let mut hasher = Sha256::new();
    let mut len = 0;
    while let Some(chunk) = chunks.next().await {
        let chunk = chunk?;
        hasher.update(&chunk);
        len += chunk.len() as u64;
    }
    Ok((hasher.finalize().into(), len))
}

/// A store that keeps nothing: uploads are hashed as they arrive, downloads
/// are generated (and hashed) as they are sent.
#[derive(Default)]
struct HashingStore {
    uploads: Mutex<Vec<(String, [u8; 32], u64)>>,
    sent: Mutex<Option<oneshot::Receiver<[u8; 32]>>>,
}

#[async_trait]
impl FileStore for HashingStore {
    async fn put(&self, name: &str, chunks: ByteStream) -> Result<u64, Error> {
        let (digest, len) = hash(chunks).await?;
        self.uploads
            .lock()
            .unwrap()
            .push((name.to_owned(), digest, len));
        Ok(len)
    }

    async fn get(&self, name: &str) -> Result<(ByteStream, Option<u64>), Error> {
        if name != "generated.bin" {
            return Err(Error::new(ErrorKind::NotFound, format!("no {name}")));
        }
        let (chunks, digest) = generated(SIZE, 0x5eed);
        *self.sent.lock().unwrap() = Some(digest);
        Ok((chunks, Some(SIZE)))
    }
}

/// A running server on a free loopback port; stops when dropped.
struct Server {
    client: TransferClient,
    _stop: oneshot::Sender<()>,
}

async fn start(store: Arc<dyn FileStore>) -> Server {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let (stop, stopped) = oneshot::channel::<()>();
    tokio::spawn(TransferServer::new(store).serve(listener, async {
        stopped.await.ok();
    }));
    Server {
        client: TransferClient::connect(address).await.unwrap(),
        _stop: stop,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_of_32_mib_arrives_with_the_same_sha256() {
    let store = Arc::new(HashingStore::default());
    let server = start(store.clone()).await;

    let (chunks, sent_digest) = generated(SIZE, 42);
    let stored = server.client.upload("upload.bin", chunks).await.unwrap();

    assert_eq!(stored, SIZE);
    let sent_digest = sent_digest.await.unwrap();
    let uploads = store.uploads.lock().unwrap().clone();
    assert_eq!(uploads, [("upload.bin".to_owned(), sent_digest, SIZE)]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_download_of_32_mib_arrives_with_the_same_sha256() {
    let store = Arc::new(HashingStore::default());
    let server = start(store.clone()).await;

    let download = server.client.download("generated.bin").await.unwrap();
    assert_eq!(download.content_length(), Some(SIZE));
    let (received_digest, len) = hash(download).await.unwrap();

    assert_eq!(len, SIZE);
    let sent = store
        .sent
        .lock()
        .unwrap()
        .take()
        .expect("the store generated it");
    assert_eq!(received_digest, sent.await.unwrap());
}

fn temp_dir() -> PathBuf {
    std::env::temp_dir().join(format!("switchboard-transfer-{}", uuid::Uuid::new_v4()))
}

/// Removes the directory even when the test panics.
struct Cleanup(PathBuf);

impl Drop for Cleanup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_directory_store_round_trips_32_mib_through_disk() {
    let dir = temp_dir();
    let _cleanup = Cleanup(dir.clone());
    let server = start(Arc::new(DirStore::new(dir.join("server")).await.unwrap())).await;

    let (chunks, sent_digest) = generated(SIZE, 7);
    assert_eq!(
        server
            .client
            .upload("round-trip.bin", chunks)
            .await
            .unwrap(),
        SIZE
    );
    let sent_digest = sent_digest.await.unwrap();

    let on_disk = std::fs::read(dir.join("server/round-trip.bin")).unwrap();
    assert_eq!(<[u8; 32]>::from(Sha256::digest(&on_disk)), sent_digest);
    drop(on_disk);

    let download = server.client.download("round-trip.bin").await.unwrap();
    assert_eq!(download.content_length(), Some(SIZE));
    assert_eq!(hash(download).await.unwrap(), (sent_digest, SIZE));

    // And file to file.
    let copy = dir.join("copy.bin");
    assert_eq!(
        server
            .client
            .download_to_file("round-trip.bin", &copy)
            .await
            .unwrap(),
        SIZE
    );
    assert_eq!(
        server.client.upload_file("again.bin", &copy).await.unwrap(),
        SIZE
    );
    let again = std::fs::read(dir.join("server/again.bin")).unwrap();
    assert_eq!(<[u8; 32]>::from(Sha256::digest(&again)), sent_digest);
}

/// Reports when a `put` of the store it wraps starts and how it ended:
/// `Some(result)`, or `None` when it was cancelled (hyper drops a request's
/// future when the client resets the stream).
struct Reporting<S> {
    inner: S,
    started: Mutex<Option<oneshot::Sender<()>>>,
    ended: mpsc::UnboundedSender<Option<Result<u64, ErrorKind>>>,
}

struct ReportOnDrop {
    ended: mpsc::UnboundedSender<Option<Result<u64, ErrorKind>>>,
    result: Option<Result<u64, ErrorKind>>,
}

impl Drop for ReportOnDrop {
    fn drop(&mut self) {
        self.ended.send(self.result.take()).ok();
    }
}

#[async_trait]
impl<S: FileStore> FileStore for Reporting<S> {
    async fn put(&self, name: &str, chunks: ByteStream) -> Result<u64, Error> {
        if let Some(started) = self.started.lock().unwrap().take() {
            started.send(()).ok();
        }
        let mut report = ReportOnDrop {
            ended: self.ended.clone(),
            result: None,
        };
        // Declared after `report`, so on cancellation it is dropped first.
        let put = self.inner.put(name, chunks);
        let result = put.await;
        report.result = Some(result.as_ref().map(|n| *n).map_err(Error::kind));
        result
    }

    async fn get(&self, name: &str) -> Result<(ByteStream, Option<u64>), Error> {
        self.inner.get(name).await
    }
}

#[tokio::test]
async fn a_broken_upload_leaves_nothing_behind() {
    let dir = temp_dir();
    let _cleanup = Cleanup(dir.clone());
    let (started, has_started) = oneshot::channel();
    let (ended, mut puts) = mpsc::unbounded_channel();
    let store = Reporting {
        inner: DirStore::new(&dir).await.unwrap(),
        started: Mutex::new(Some(started)),
        ended,
    };
    let server = start(Arc::new(store)).await;

    // The source fails once the server is storing the upload (had it failed
    // before, the server could drop the reset stream without calling the
    // store at all).
    let breaking = futures_util::stream::iter([
        Ok(Bytes::from(vec![1_u8; 100_000])),
        Ok(Bytes::from(vec![2_u8; 100_000])),
    ])
    .chain(futures_util::stream::once(async move {
        has_started.await.ok();
        Err(std::io::Error::other("the source disk failed"))
    }));
    let error = server
        .client
        .upload("broken.bin", breaking)
        .await
        .unwrap_err();
    assert!(error.is_retryable(), "{error:?}");

    // Whether the store saw the broken body or was cancelled is a race.
    let ended = puts.recv().await.unwrap();
    assert!(
        matches!(ended, None | Some(Err(ErrorKind::Connection))),
        "{ended:?}"
    );
    let left: Vec<_> = std::fs::read_dir(&dir).unwrap().collect();
    assert!(left.is_empty(), "left behind: {left:?}");
}

#[tokio::test]
async fn errors_say_what_went_wrong_and_whether_to_retry() {
    let dir = temp_dir();
    let _cleanup = Cleanup(dir.clone());
    let server = start(Arc::new(DirStore::new(&dir).await.unwrap())).await;

    let missing = server.client.download("missing.bin").await.unwrap_err();
    assert_eq!(missing.kind(), ErrorKind::NotFound);
    assert!(missing.message().contains("missing.bin"), "{missing}");

    for bad in ["../escape", ".hidden", "a/b", ""] {
        let empty = futures_util::stream::empty::<Result<Bytes, Infallible>>();
        let refused = server.client.upload(bad, empty).await.unwrap_err();
        assert_eq!(refused.kind(), ErrorKind::Rejected, "{bad:?}");
    }
    let store = DirStore::new(&dir).await.unwrap();
    let escaped = store
        .put("../escape", futures_util::stream::empty().boxed())
        .await
        .unwrap_err();
    assert_eq!(escaped.kind(), ErrorKind::Rejected);

    // An empty upload is a file too.
    let empty = futures_util::stream::empty::<Result<Bytes, Infallible>>();
    assert_eq!(server.client.upload("empty.txt", empty).await.unwrap(), 0);
    assert_eq!(
        hash(server.client.download("empty.txt").await.unwrap())
            .await
            .unwrap()
            .1,
        0
    );
}

#[tokio::test]
async fn a_closed_server_is_a_retryable_connection_error() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    drop(listener);
    let error = TransferClient::connect(address).await.unwrap_err();
    assert_eq!(error.kind(), ErrorKind::Connection);
    assert!(error.is_retryable());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transfers_share_one_connection_concurrently() {
    let store = Arc::new(HashingStore::default());
    let server = start(store.clone()).await;
    let uploads = (0..4).map(|i| {
        let client = server.client.clone();
        async move {
            let (chunks, digest) = generated(2 * 1024 * 1024, 100 + i);
            let stored = client
                .upload(&format!("part-{i}.bin"), chunks)
                .await
                .unwrap();
            (format!("part-{i}.bin"), digest.await.unwrap(), stored)
        }
    });
    let mut sent = futures_util::future::join_all(uploads).await;
    let mut received = store.uploads.lock().unwrap().clone();
    sent.sort();
    received.sort();
    assert_eq!(sent, received);
}

/// The same transfers over TLS, with a certificate generated here.
#[cfg(feature = "file-transfer-tls")]
mod tls {
    use super::*;
    use rustls::RootCertStore;
    use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
    use switchboard::transfer::tls::{client_config, server_config};

    struct TlsServer {
        address: std::net::SocketAddr,
        roots: RootCertStore,
        _stop: oneshot::Sender<()>,
    }

    impl TlsServer {
        /// A client of `https://127.0.0.1:{port}` that checks the
        /// certificate for `server_name`.
        async fn client(
            &self,
            config: Arc<rustls::ClientConfig>,
            server_name: &str,
        ) -> Result<TransferClient, Error> {
            TransferClient::builder(format!("https://{}", self.address))
                .tls_config(config)
                .tls_server_name(server_name)
                .connect()
                .await
        }
    }

    async fn start_tls(store: Arc<dyn FileStore>) -> TlsServer {
        let certified = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(
            certified.signing_key.serialize_der(),
        ));
        let config = server_config(vec![certified.cert.der().clone()], key).unwrap();
        let mut roots = RootCertStore::empty();
        roots.add(certified.cert.der().clone()).unwrap();

        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        tokio::spawn(
            TransferServer::new(store).serve_tls(listener, config, async {
                stopped.await.ok();
            }),
        );
        TlsServer {
            address,
            roots,
            _stop: stop,
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn both_ways_32_mib_over_tls_arrive_with_the_same_sha256() {
        let store = Arc::new(HashingStore::default());
        let server = start_tls(store.clone()).await;
        let client = server
            .client(client_config(server.roots.clone()).unwrap(), "localhost")
            .await
            .unwrap();

        let (chunks, sent_digest) = generated(SIZE, 99);
        assert_eq!(client.upload("tls-up.bin", chunks).await.unwrap(), SIZE);
        let sent_digest = sent_digest.await.unwrap();
        assert_eq!(
            store.uploads.lock().unwrap().clone(),
            [("tls-up.bin".to_owned(), sent_digest, SIZE)]
        );

        let download = client.download("generated.bin").await.unwrap();
        let (received_digest, len) = hash(download).await.unwrap();
        assert_eq!(len, SIZE);
        let sent = store.sent.lock().unwrap().take().unwrap();
        assert_eq!(received_digest, sent.await.unwrap());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn thousands_of_40_byte_chunks_over_tls_arrive_whole() {
        use super::small_chunks::{
            CHUNK_LEN, CHUNKS, TinyChunkStore, download_whole, expected, tiny_chunks,
        };
        let store = Arc::new(TinyChunkStore::default());
        let server = start_tls(store.clone()).await;
        let client = server
            .client(client_config(server.roots.clone()).unwrap(), "localhost")
            .await
            .unwrap();

        assert!(
            download_whole(&client).await == expected(),
            "download differs"
        );
        let stored = client.upload("up.csv", tiny_chunks()).await.unwrap();
        assert_eq!(stored, (CHUNKS * CHUNK_LEN) as u64);
        assert!(
            store.uploads.lock().unwrap()[..] == [("up.csv".to_owned(), expected())],
            "upload differs"
        );
    }

    #[tokio::test]
    async fn an_untrusted_certificate_is_refused_and_not_retryable() {
        let server = start_tls(Arc::new(HashingStore::default())).await;
        let stranger = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
        let mut wrong_roots = RootCertStore::empty();
        wrong_roots.add(stranger.cert.der().clone()).unwrap();

        let error = server
            .client(client_config(wrong_roots).unwrap(), "localhost")
            .await
            .unwrap_err();
        assert_eq!(error.kind(), ErrorKind::Rejected, "{error:?}");
        assert!(!error.is_retryable());

        let error = server
            .client(
                client_config(server.roots.clone()).unwrap(),
                "files.example",
            )
            .await
            .unwrap_err();
        assert_eq!(error.kind(), ErrorKind::Rejected, "wrong name: {error:?}");
    }

    /// A listener that never accepts: the kernel completes the TCP
    /// handshake, nobody answers the TLS one. Paused time runs the connect
    /// timeout out at once.
    #[tokio::test(start_paused = true)]
    async fn a_server_that_never_answers_is_a_connection_error_after_the_connect_timeout() {
        let certified = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
        let mut roots = RootCertStore::empty();
        roots.add(certified.cert.der().clone()).unwrap();
        let silent = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TransferClient::builder(format!("https://{}", silent.local_addr().unwrap()))
            .tls_config(client_config(roots).unwrap())
            .tls_server_name("localhost")
            .connect_timeout(std::time::Duration::from_secs(3))
            .build()
            .unwrap();
        assert_eq!(client.connect_timeout(), std::time::Duration::from_secs(3));
        let error = client.download("a.bin").await.unwrap_err();
        assert_eq!(error.kind(), ErrorKind::Connection, "{error:?}");
        assert!(error.is_retryable());
        assert!(error.message().contains("connect timeout"), "{error}");
        drop(silent);
    }

    #[test]
    fn https_without_a_tls_config_is_a_configuration_error() {
        let error = TransferClient::builder("https://files.internal")
            .build()
            .unwrap_err();
        assert_eq!(error.kind(), ErrorKind::Config, "{error:?}");
    }

    #[tokio::test]
    async fn a_config_without_h2_is_a_configuration_error() {
        let server = start_tls(Arc::new(HashingStore::default())).await;
        let mut config = (*client_config(server.roots.clone()).unwrap()).clone();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        let error = server
            .client(Arc::new(config), "localhost")
            .await
            .unwrap_err();
        assert_eq!(error.kind(), ErrorKind::Config);
    }
}

/// Stores whose streams yield thousands of tiny chunks, as a store that
/// serves a file line by line does: every chunk becomes a DATA frame of its
/// own, far more frames than the 32 MiB transfers above send.
mod small_chunks {
    use super::*;

    pub(super) const CHUNKS: usize = 5_000;
    pub(super) const CHUNK_LEN: usize = 40;

    /// Chunk `i` of the content: 40 bytes that say which chunk they are, so
    /// a lost, doubled or reordered chunk shows in the comparison.
    fn chunk(i: usize) -> Bytes {
        let line = format!("{i:08},{:030}\n", i * 7919);
        assert_eq!(line.len(), CHUNK_LEN);
        Bytes::from(line)
    }

    pub(super) fn expected() -> Vec<u8> {
        (0..CHUNKS).flat_map(|i| chunk(i).to_vec()).collect()
    }

    /// The chunks, with an empty one after every tenth: 500 empty chunks,
    /// more than the 100 empty DATA frames h2 accepts on a connection.
    pub(super) fn tiny_chunks() -> ByteStream {
        futures_util::stream::iter((0..CHUNKS).flat_map(|i| {
            let empty = (i % 10 == 9).then(Bytes::new);
            [Some(chunk(i)), empty].into_iter().flatten().map(Ok)
        }))
        .boxed()
    }

    /// Serves `lines.csv` as 5 000 chunks of 40 bytes and keeps every upload
    /// whole.
    #[derive(Default)]
    pub(super) struct TinyChunkStore {
        pub(super) uploads: Mutex<Vec<(String, Vec<u8>)>>,
    }

    #[async_trait]
    impl FileStore for TinyChunkStore {
        async fn put(&self, name: &str, mut chunks: ByteStream) -> Result<u64, Error> {
            let mut content = Vec::new();
            while let Some(chunk) = chunks.next().await {
                content.extend_from_slice(&chunk?);
            }
            let len = content.len() as u64;
            self.uploads
                .lock()
                .unwrap()
                .push((name.to_owned(), content));
            Ok(len)
        }

        async fn get(&self, name: &str) -> Result<(ByteStream, Option<u64>), Error> {
            if name != "lines.csv" {
                return Err(Error::new(ErrorKind::NotFound, format!("no {name}")));
            }
            Ok((tiny_chunks(), Some((CHUNKS * CHUNK_LEN) as u64)))
        }
    }

    pub(super) async fn download_whole(client: &TransferClient) -> Vec<u8> {
        let download = client.download("lines.csv").await.unwrap();
        assert_eq!(download.content_length(), Some((CHUNKS * CHUNK_LEN) as u64));
        let mut download = download;
        let mut received = Vec::new();
        while let Some(chunk) = download.next().await {
            let chunk = chunk.unwrap_or_else(|error| {
                panic!("broke off after {} bytes: {error:?}", received.len())
            });
            received.extend_from_slice(&chunk);
        }
        received
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_download_of_5000_chunks_of_40_bytes_arrives_whole() {
        let server = start(Arc::new(TinyChunkStore::default())).await;
        let received = download_whole(&server.client).await;
        assert_eq!(received.len(), CHUNKS * CHUNK_LEN);
        assert!(received == expected(), "the content differs");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_upload_of_5000_chunks_of_40_bytes_arrives_whole() {
        let store = Arc::new(TinyChunkStore::default());
        let server = start(store.clone()).await;
        let stored = server.client.upload("up.csv", tiny_chunks()).await.unwrap();
        assert_eq!(stored, (CHUNKS * CHUNK_LEN) as u64);
        let uploads = store.uploads.lock().unwrap();
        assert_eq!(uploads.len(), 1);
        assert_eq!(uploads[0].0, "up.csv");
        assert!(uploads[0].1 == expected(), "the content differs");
    }
}

#[path = "transfer/reconnect.rs"]
mod reconnect;

#[cfg(feature = "auth")]
#[path = "transfer/layers.rs"]
mod layers;

#[path = "transfer/limits.rs"]
mod limits;
