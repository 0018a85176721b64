//! An address whose connects never complete, for connect-timeout tests: a
//! listener with a backlog of one that already holds a connection nobody
//! accepts, so the kernel drops every further SYN and a client waits until
//! its own connect timeout gives up.

use std::net::SocketAddr;

/// Keep it alive while the address is in use.
pub struct Unanswered {
    _listener: tokio::net::TcpListener,
    _held: std::net::TcpStream,
    pub addr: SocketAddr,
}

impl Unanswered {
    pub async fn new() -> Self {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let listener = socket.listen(0).unwrap();
        let addr = listener.local_addr().unwrap();
        // Fills the accept queue (a backlog of 0 keeps one connection).
        let held = std::net::TcpStream::connect(addr).unwrap();
        Self {
            _listener: listener,
            _held: held,
            addr,
        }
    }
}
