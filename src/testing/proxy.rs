//! A fault-injecting TCP proxy, for tests of what a client does when its
//! connection dies.
//!
//! Killing a shared broker would break every other test running against it;
//! cutting the connections of one client through a proxy breaks only that
//! client. [`FaultProxy`] listens on a free local port and forwards every
//! connection to a target. [`cut`](FaultProxy::cut) closes every live
//! connection and refuses new ones (they are accepted and closed at once, as
//! a broker that is down would), [`stall`](FaultProxy::stall) keeps every
//! connection open but passes no byte (a peer that hangs without closing,
//! which only heartbeats reveal), [`restore`](FaultProxy::restore) lets them
//! through again, and [`all_closed`](FaultProxy::all_closed) resolves once no
//! proxied connection is open — an event to wait on instead of a sleep.
//!
//! ```
//! use switchboard::testing::proxy::FaultProxy;
//! use tokio::io::{AsyncReadExt, AsyncWriteExt};
//! use tokio::net::{TcpListener, TcpStream};
//!
//! # tokio::runtime::Runtime::new().unwrap().block_on(async {
//! // An echo server to stand in for a broker.
//! let server = TcpListener::bind("127.0.0.1:0").await?;
//! let target = server.local_addr()?;
//! tokio::spawn(async move {
//!     while let Ok((mut socket, _)) = server.accept().await {
//!         tokio::spawn(async move {
//!             let (mut read, mut write) = socket.split();
//!             let _ = tokio::io::copy(&mut read, &mut write).await;
//!         });
//!     }
//! });
//!
//! let proxy = FaultProxy::start(target).await?;
//! let mut client = TcpStream::connect(proxy.addr()).await?;
//! client.write_all(b"ping").await?;
//! let mut echo = [0; 4];
//! client.read_exact(&mut echo).await?;
//! assert_eq!(&echo, b"ping");
//!
//! proxy.cut();
//! proxy.all_closed().await;
//! assert_eq!(client.read(&mut echo).await?, 0, "the connection was closed");
//!
//! // While cut, new connections are closed at once.
//! let mut refused = TcpStream::connect(proxy.addr()).await?;
//! assert_eq!(refused.read(&mut echo).await.unwrap_or(0), 0);
//!
//! proxy.restore();
//! let mut client = TcpStream::connect(proxy.addr()).await?;
//! client.write_all(b"pong").await?;
//! client.read_exact(&mut echo).await?;
//! assert_eq!(&echo, b"pong");
//! # Ok::<(), std::io::Error>(())
//! # }).unwrap();
//! ```

use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// A TCP proxy whose connections can be cut on demand. Dropping it stops
/// accepting and closes every connection.
pub struct FaultProxy {
    addr: SocketAddr,
    target: SocketAddr,
    shared: Arc<ProxyShared>,
    accept: JoinHandle<()>,
}

struct ProxyShared {
    refusing: AtomicBool,
    /// While true, connections stay open but no byte is forwarded.
    stalled: watch::Sender<bool>,
    /// Bumped by every cut; each connection closes when it changes.
    cuts: watch::Sender<u64>,
    /// Connections open right now.
    open: watch::Sender<usize>,
}

impl FaultProxy {
    /// Listens on a free port of 127.0.0.1 and forwards to `target`.
    pub async fn start(target: SocketAddr) -> std::io::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(ProxyShared {
            refusing: AtomicBool::new(false),
            stalled: watch::Sender::new(false),
            cuts: watch::Sender::new(0),
            open: watch::Sender::new(0),
        });
        let accept = tokio::spawn(accept_loop(listener, target, shared.clone()));
        Ok(Self {
            addr,
            target,
            shared,
            accept,
        })
    }

    /// Where clients connect.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Where connections are forwarded.
    pub fn target(&self) -> SocketAddr {
        self.target
    }

    /// Closes every live connection and refuses new ones until
    /// [`restore`](Self::restore).
    pub fn cut(&self) {
        self.shared.refusing.store(true, Ordering::SeqCst);
        self.shared.cuts.send_modify(|cuts| *cuts += 1);
    }

    /// Keeps every connection (live and new) open but forwards no byte
    /// until [`restore`](Self::restore): to the client, the peer has hung.
    pub fn stall(&self) {
        self.shared.stalled.send_replace(true);
    }

    /// Accepts and forwards connections again (after a cut or a stall).
    pub fn restore(&self) {
        self.shared.refusing.store(false, Ordering::SeqCst);
        self.shared.stalled.send_replace(false);
    }

    /// How many proxied connections are open.
    pub fn open_connections(&self) -> usize {
        *self.shared.open.borrow()
    }

    /// Resolves once no proxied connection is open (at once when none is).
    pub async fn all_closed(&self) {
        let mut open = self.shared.open.subscribe();
        // The sender lives as long as `self`, so this cannot fail.
        let _ = open.wait_for(|open| *open == 0).await;
    }
}

async fn accept_loop(listener: TcpListener, target: SocketAddr, shared: Arc<ProxyShared>) {
    while let Ok((client, _)) = listener.accept().await {
        // Subscribed before checking `refusing`, so a cut between the two
        // is still seen by this connection.
        let cuts = shared.cuts.subscribe();
        if shared.refusing.load(Ordering::SeqCst) {
            drop(client);
            continue;
        }
        shared.open.send_modify(|open| *open += 1);
        let guard = OpenGuard(shared.clone());
        let stalled = shared.stalled.subscribe();
        tokio::spawn(forward(client, target, cuts, stalled, guard));
    }
}

/// Counts a connection as open until dropped.
struct OpenGuard(Arc<ProxyShared>);

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0.open.send_modify(|open| *open -= 1);
    }
}

async fn forward(
    client: TcpStream,
    target: SocketAddr,
    mut cuts: watch::Receiver<u64>,
    stalled: watch::Receiver<bool>,
    _guard: OpenGuard,
) {
    let upstream = tokio::select! {
        _ = cuts.changed() => return,
        upstream = TcpStream::connect(target) => match upstream {
            Ok(upstream) => upstream,
            Err(_) => return,
        },
    };
    let _ = client.set_nodelay(true);
    let _ = upstream.set_nodelay(true);
    let (client_read, client_write) = client.into_split();
    let (upstream_read, upstream_write) = upstream.into_split();
    // Both sockets are dropped when this returns, before the guard: once
    // `all_closed` resolves, no byte passes any more.
    tokio::select! {
        _ = cuts.changed() => {}
        () = pump(client_read, upstream_write, stalled.clone()) => {}
        () = pump(upstream_read, client_write, stalled) => {}
    }
}

/// Copies bytes one way until either side closes, pausing while stalled.
async fn pump(mut from: OwnedReadHalf, mut to: OwnedWriteHalf, mut stalled: watch::Receiver<bool>) {
    let mut buffer = vec![0; 64 * 1024];
    loop {
        if stalled.wait_for(|stalled| !*stalled).await.is_err() {
            return;
        }
        let read = tokio::select! {
            read = from.read(&mut buffer) => read,
            // Reading is cancel-safe: nothing read is lost.
            _ = stalled.wait_for(|stalled| *stalled) => continue,
        };
        match read {
            Ok(0) | Err(_) => return,
            Ok(count) => {
                if to.write_all(&buffer[..count]).await.is_err() {
                    return;
                }
            }
        }
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.accept.abort();
        self.shared.cuts.send_modify(|cuts| *cuts += 1);
    }
}

impl fmt::Debug for FaultProxy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FaultProxy")
            .field("addr", &self.addr)
            .field("target", &self.target)
            .field("refusing", &self.shared.refusing.load(Ordering::SeqCst))
            .field("stalled", &*self.shared.stalled.borrow())
            .field("open", &self.open_connections())
            .finish()
    }
}
