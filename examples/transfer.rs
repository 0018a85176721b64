//! Moves 1 GiB over HTTP/2 each way — upload, then download — and reports
//! the throughput and the peak heap of the whole process (client and server
//! together), measured by a counting global allocator.
//!
//! ```sh
//! cargo run --release --features file-transfer --example transfer            # 1 GiB each way
//! cargo run --release --features file-transfer --example transfer -- 256     # MiB each way
//! cargo run --release --features file-transfer --example transfer -- 1024 /tmp/files  # through disk
//! cargo run --release --features file-transfer-tls --example transfer -- --tls   # over TLS
//! ```
//!
//! Without a directory, the server's store keeps nothing: an upload is
//! hashed as it arrives and a download is generated as it is sent, so the
//! figures are the transfer path itself. With a directory, `DirStore` writes
//! and reads the file. Either way the data is generated lazily and hashed on
//! both ends (SHA-256), so nothing ever holds a whole file.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use futures_util::StreamExt;
use sha2::{Digest, Sha256};
use switchboard::Error;
use switchboard::transfer::{
    ByteStream, DirStore, FileStore, TransferClient, TransferServer, TransferService,
};

/// Counts live heap bytes and remembers the peak.
///
/// This is the one `unsafe` in the project, and it lives in this example on
/// purpose: `GlobalAlloc` is an `unsafe trait`, so measuring the heap needs an
/// `unsafe impl`. The library itself is `#![forbid(unsafe_code)]`; an example
/// is a separate crate, so that rule does not reach here. The impl only
/// forwards to the system allocator and adds counters.
struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

// SAFETY: every call is forwarded unchanged to `System`, which upholds the
// `GlobalAlloc` contract; the counters do not touch the memory.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: same layout, same contract as the caller's.
        let pointer = unsafe { System.alloc(layout) };
        if !pointer.is_null() {
            grew(layout.size());
        }
        pointer
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: as above.
        let pointer = unsafe { System.alloc_zeroed(layout) };
        if !pointer.is_null() {
            grew(layout.size());
        }
        pointer
    }

    unsafe fn dealloc(&self, pointer: *mut u8, layout: Layout) {
        // SAFETY: `pointer` came from this allocator (that is, from System)
        // with `layout`.
        unsafe { System.dealloc(pointer, layout) };
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
    }

    unsafe fn realloc(&self, pointer: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: forwarded with the caller's guarantees.
        let moved = unsafe { System.realloc(pointer, layout, new_size) };
        if !moved.is_null() {
            LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
            grew(new_size);
        }
        moved
    }
}

fn grew(size: usize) {
    let live = LIVE.fetch_add(size, Ordering::Relaxed) + size;
    PEAK.fetch_max(live, Ordering::Relaxed);
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

const MIB: u64 = 1024 * 1024;

/// `len` pseudo-random bytes in 64 KiB chunks, made only when pulled and
/// hashed as they are made; the digest is stored when the stream ends.
fn generated(len: u64, seed: u64, digest: Arc<Mutex<Option<[u8; 32]>>>) -> ByteStream {
    let state = (len, seed | 1, Sha256::new());
    futures_util::stream::unfold(state, move |(left, mut rng, mut hasher)| {
        let digest = digest.clone();
        async move {
            if left == 0 {
                *digest.lock().unwrap() = Some(hasher.finalize().into());
                return None;
            }
            let size = left.min(64 * 1024) as usize;
            let mut chunk = Vec::with_capacity(size);
            while chunk.len() < size {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                chunk.extend_from_slice(&rng.to_le_bytes());
            }
            chunk.truncate(size);
            hasher.update(&chunk);
            Some((Ok(Bytes::from(chunk)), (left - size as u64, rng, hasher)))
        }
    })
    .boxed()
}

async fn hash(
    mut chunks: impl futures_util::Stream<Item = Result<Bytes, Error>> + Unpin,
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

/// Keeps nothing: hashes uploads, generates downloads.
struct Hashing {
    len: u64,
    received: Mutex<Option<[u8; 32]>>,
    sent: Arc<Mutex<Option<[u8; 32]>>>,
}

#[async_trait]
impl FileStore for Hashing {
    async fn put(&self, _name: &str, chunks: ByteStream) -> Result<u64, Error> {
        let (digest, len) = hash(chunks).await?;
        *self.received.lock().unwrap() = Some(digest);
        Ok(len)
    }

    async fn get(&self, _name: &str) -> Result<(ByteStream, Option<u64>), Error> {
        Ok((
            generated(self.len, 0xD0_57, self.sent.clone()),
            Some(self.len),
        ))
    }
}

/// The routes for any size given on the command line, replacing
/// `big.bin` of an earlier run (the hashing store keeps no file, so every
/// name "exists" to it).
fn routes(store: Arc<dyn FileStore>) -> TransferService {
    TransferService::new(store)
        .with_max_upload(u64::MAX)
        .with_overwrite(true)
}

fn report(what: &str, bytes: u64, started: Instant) {
    let seconds = started.elapsed().as_secs_f64();
    println!(
        "{what:<9} {:>6} MiB in {seconds:>6.2} s = {:>7.1} MiB/s; peak heap {:>5.1} MiB",
        bytes / MIB,
        bytes as f64 / MIB as f64 / seconds,
        PEAK.load(Ordering::Relaxed) as f64 / MIB as f64,
    );
}

type Started = (tokio::task::JoinHandle<Result<(), Error>>, TransferClient);

/// A TLS server with a certificate made on the spot, and a client trusting it.
#[cfg(feature = "file-transfer-tls")]
async fn start_tls(
    store: Arc<dyn FileStore>,
    listener: tokio::net::TcpListener,
    stopped: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<Started, Box<dyn std::error::Error>> {
    use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
    use switchboard::transfer::tls::{client_config, server_config};

    let address = listener.local_addr()?;
    let certified = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()])?;
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(
        certified.signing_key.serialize_der(),
    ));
    let config = server_config(vec![certified.cert.der().clone()], key)?;
    let mut roots = rustls::RootCertStore::empty();
    roots.add(certified.cert.der().clone())?;
    let server = tokio::spawn(
        TransferServer::with_service(routes(store)).serve_tls(listener, config, stopped),
    );
    // The certificate names `localhost`; the URL dials the address itself.
    let client = TransferClient::builder(format!("https://{address}"))
        .tls_config(client_config(roots)?)
        .tls_server_name("localhost")
        .connect()
        .await?;
    Ok((server, client))
}

#[cfg(not(feature = "file-transfer-tls"))]
async fn start_tls(
    _: Arc<dyn FileStore>,
    _: tokio::net::TcpListener,
    _: impl std::future::Future<Output = ()>,
) -> Result<Started, Box<dyn std::error::Error>> {
    Err("--tls needs the file-transfer-tls feature".into())
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    // `--tls` anywhere; then size in MiB and a directory, both optional.
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let tls = args.iter().any(|arg| arg == "--tls");
    args.retain(|arg| arg != "--tls");
    let mut args = args.into_iter();
    let len = args.next().map_or(Ok(1024), |mib| mib.parse::<u64>())? * MIB;
    let dir = args.next();

    let hashing = Arc::new(Hashing {
        len,
        received: Mutex::new(None),
        sent: Arc::new(Mutex::new(None)),
    });
    let store: Arc<dyn FileStore> = match &dir {
        Some(dir) => Arc::new(DirStore::new(dir).await?),
        None => hashing.clone(),
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let address = listener.local_addr()?;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let stopped = async {
        stopped.await.ok();
    };
    let (server, client) = if tls {
        start_tls(store, listener, stopped).await?
    } else {
        // The routes are a tower service: layers (auth, trace context,
        // metrics) would go around `TransferService` here.
        let service = routes(store);
        let server = tokio::spawn(TransferServer::with_service(service).serve(listener, stopped));
        let client = TransferClient::builder(format!("http://{address}"))
            .connect_timeout(Duration::from_secs(5))
            .connect()
            .await?;
        (server, client)
    };
    println!(
        "moving {} MiB each way over {} on loopback ({}), tokio multi-thread runtime",
        len / MIB,
        if tls {
            "HTTP/2 + TLS (rustls, aws-lc-rs)"
        } else {
            "h2c"
        },
        dir.as_deref()
            .map_or("store keeps nothing".into(), |dir| format!(
                "DirStore in {dir}"
            )),
    );

    let uploaded = Arc::new(Mutex::new(None));
    PEAK.store(LIVE.load(Ordering::Relaxed), Ordering::Relaxed);
    let started = Instant::now();
    let stored = client
        .upload("big.bin", generated(len, 42, uploaded.clone()))
        .await?;
    report("upload", stored, started);
    let uploaded = uploaded.lock().unwrap().expect("the generator finished");
    if dir.is_none() {
        let received = hashing
            .received
            .lock()
            .unwrap()
            .expect("the store hashed it");
        assert_eq!(received, uploaded, "the upload arrived changed");
    }

    PEAK.store(LIVE.load(Ordering::Relaxed), Ordering::Relaxed);
    let started = Instant::now();
    let (received, bytes) = hash(client.download("big.bin").await?).await?;
    report("download", bytes, started);
    let expected = match dir {
        Some(_) => uploaded,
        None => hashing
            .sent
            .lock()
            .unwrap()
            .expect("the store generated it"),
    };
    assert_eq!(received, expected, "the download arrived changed");
    println!("SHA-256 matched on both ends, both ways");

    stop.send(()).ok();
    client.close();
    server.await??;
    Ok(())
}
