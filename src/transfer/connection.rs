//! The client's one HTTP/2 connection, dialled when first needed and again
//! whenever it has died (the server restarted, the network dropped it).

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper::client::conn::http2;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tower::Service;

use super::body::TransferBody;
use crate::{Effect, Error, ErrorKind};

/// Where to dial and how to speak to it.
pub(super) struct Target {
    /// `http://host:port` or `https://host:port`: what requests name.
    pub(super) base: String,
    pub(super) host: String,
    pub(super) port: u16,
    #[cfg(feature = "file-transfer-tls")]
    pub(super) tls: Option<Tls>,
}

/// The TLS side of a `https://` target.
#[cfg(feature = "file-transfer-tls")]
pub(super) struct Tls {
    pub(super) name: rustls::pki_types::ServerName<'static>,
    pub(super) config: Arc<rustls::ClientConfig>,
}

/// Shared by every clone of a client: the current connection, if any.
pub(super) struct Connector {
    target: Target,
    connect_timeout: Duration,
    state: Mutex<State>,
    // Held while dialling, so that calls that find the connection dead
    // together open one new connection, not one each.
    dialing: tokio::sync::Mutex<()>,
}

#[derive(Default)]
struct State {
    open: Option<(http2::SendRequest<TransferBody>, u64)>,
    dials: u64,
    closed: bool,
}

impl Connector {
    pub(super) fn new(target: Target, connect_timeout: Duration) -> Self {
        Self {
            target,
            connect_timeout,
            state: Mutex::default(),
            dialing: tokio::sync::Mutex::new(()),
        }
    }

    pub(super) fn base(&self) -> &str {
        &self.target.base
    }

    pub(super) fn connect_timeout(&self) -> Duration {
        self.connect_timeout
    }

    /// Refuses every later call with [`ErrorKind::Closed`] and lets go of
    /// the connection (hyper closes it once the transfers in flight end).
    pub(super) fn close(&self) {
        let mut state = self.lock();
        state.closed = true;
        state.open = None;
    }

    pub(super) fn is_closed(&self) -> bool {
        self.lock().closed
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // The state is a few fields set in one go; a panic elsewhere cannot
        // leave it half-written.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The live connection, if there is one; `Closed` once closed.
    fn current(&self) -> Result<Option<(http2::SendRequest<TransferBody>, u64)>, Error> {
        let state = self.lock();
        if state.closed {
            return Err(closed());
        }
        Ok(state
            .open
            .as_ref()
            .filter(|(sender, _)| !sender.is_closed())
            .cloned())
    }

    /// The live connection, dialled first if there is none, within the
    /// connect timeout (which includes waiting for another call's dial).
    pub(super) async fn sender(&self) -> Result<(http2::SendRequest<TransferBody>, u64), Error> {
        if let Some(open) = self.current()? {
            return Ok(open);
        }
        let dialed = tokio::time::timeout(self.connect_timeout, async {
            let _dialing = self.dialing.lock().await;
            if let Some(open) = self.current()? {
                return Ok(open);
            }
            let sender = dial(&self.target).await?;
            let mut state = self.lock();
            if state.closed {
                return Err(closed());
            }
            state.dials += 1;
            state.open = Some((sender.clone(), state.dials));
            Ok((sender, state.dials))
        })
        .await;
        dialed.unwrap_or_else(|_| {
            Err(Error::new(
                ErrorKind::Connection,
                format!(
                    "no connection to {} within the connect timeout of {:?}",
                    self.target.base, self.connect_timeout
                ),
            ))
        })
    }

    /// Forgets connection number `generation`, found dead, unless another
    /// call has already replaced it.
    fn discard(&self, generation: u64) {
        let mut state = self.lock();
        if state
            .open
            .as_ref()
            .is_some_and(|(_, open)| *open == generation)
        {
            state.open = None;
        }
    }

    /// Sends `request` on the live connection. A connection found dead
    /// before the request left (the server restarted since the last call)
    /// is replaced once and the request sent on the new one. A connection
    /// that fails under a request that had left (the server went away
    /// mid-call, or is draining after a GOAWAY) is forgotten too, so that a
    /// retry dials a new one instead of failing on it again.
    pub(super) async fn send(
        &self,
        request: Request<TransferBody>,
    ) -> Result<Response<Incoming>, Error> {
        let (sender, generation) = self.sender().await?;
        let request = match try_send(sender, request).await {
            Sent::Answered(response) => return Ok(response),
            Sent::Lost { error, connection } => {
                if connection {
                    self.discard(generation);
                }
                return Err(error);
            }
            Sent::Unsent(request) => request,
        };
        self.discard(generation);
        let (sender, generation) = self.sender().await?;
        match try_send(sender, request).await {
            Sent::Answered(response) => Ok(response),
            Sent::Lost { error, connection } => {
                if connection {
                    self.discard(generation);
                }
                Err(error)
            }
            Sent::Unsent(_) => {
                self.discard(generation);
                Err(Error::new(
                    ErrorKind::Connection,
                    format!(
                        "{}: the new connection closed before the request was sent",
                        self.target.base
                    ),
                ))
            }
        }
    }
}

impl fmt::Debug for Connector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Connector")
            .field("base", &self.target.base)
            .field("connect_timeout", &self.connect_timeout)
            .field("closed", &self.is_closed())
            .finish_non_exhaustive()
    }
}

/// How one attempt to send a request went.
enum Sent {
    Answered(Response<Incoming>),
    /// It went out and the answer was lost: the server may have stored it,
    /// or not. `connection` is false when the request's own body failed
    /// (the connection is fine then).
    Lost {
        error: Error,
        connection: bool,
    },
    /// The connection was already dead and nothing of the request was sent.
    Unsent(Request<TransferBody>),
}

async fn try_send(
    mut sender: http2::SendRequest<TransferBody>,
    request: Request<TransferBody>,
) -> Sent {
    if sender.ready().await.is_err() {
        return Sent::Unsent(request);
    }
    match sender.try_send_request(request).await {
        Ok(response) => Sent::Answered(response),
        Err(mut error) => match error.take_message() {
            Some(request) => Sent::Unsent(request),
            None => {
                let error = error.into_error();
                Sent::Lost {
                    connection: !error.is_user(),
                    error: connection_error(error).with_effect(Effect::Unknown),
                }
            }
        },
    }
}

fn closed() -> Error {
    Error::new(ErrorKind::Closed, "the transfer client was closed")
}

pub(super) fn connection_error(error: hyper::Error) -> Error {
    Error::new(
        ErrorKind::Connection,
        format!("transfer connection: {error}"),
    )
    .with_source(error)
}

async fn dial(target: &Target) -> Result<http2::SendRequest<TransferBody>, Error> {
    let stream = tokio::net::TcpStream::connect((target.host.as_str(), target.port))
        .await
        .map_err(|error| {
            Error::new(
                ErrorKind::Connection,
                format!("cannot connect to {}: {error}", target.base),
            )
            .with_source(error)
        })?;
    let _ = stream.set_nodelay(true);
    #[cfg(feature = "file-transfer-tls")]
    if let Some(tls) = &target.tls {
        let stream = tls_handshake(tls, stream).await?;
        return handshake(stream).await;
    }
    handshake(stream).await
}

#[cfg(feature = "file-transfer-tls")]
async fn tls_handshake(
    tls: &Tls,
    stream: tokio::net::TcpStream,
) -> Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>, Error> {
    let name = tls.name.to_str();
    let stream = tokio_rustls::TlsConnector::from(tls.config.clone())
        .connect(tls.name.clone(), stream)
        .await
        .map_err(|error| {
            // A certificate the client does not trust will not become
            // trusted by trying again; a reset handshake might.
            let kind = if error
                .get_ref()
                .is_some_and(|inner| inner.is::<rustls::Error>())
            {
                ErrorKind::Rejected
            } else {
                ErrorKind::Connection
            };
            Error::new(kind, format!("TLS handshake with {name}: {error}")).with_source(error)
        })?;
    if stream.get_ref().1.alpn_protocol() != Some(super::tls::H2) {
        return Err(Error::new(
            ErrorKind::Rejected,
            format!("{name} did not agree to HTTP/2 (ALPN h2)"),
        ));
    }
    Ok(stream)
}

async fn handshake<I>(io: I) -> Result<http2::SendRequest<TransferBody>, Error>
where
    I: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let (sender, connection) = http2::Builder::new(TokioExecutor::new())
        .timer(TokioTimer::new())
        .adaptive_window(true)
        .handshake(TokioIo::new(io))
        .await
        .map_err(connection_error)?;
    tokio::spawn(async move {
        if let Err(error) = connection.await {
            tracing::debug!(%error, "transfer connection closed with an error");
        }
    });
    Ok(sender)
}

/// The innermost service of a client: sends one request on the client's
/// connection, dialling it first if needed, and answers with the response
/// head and a streaming body. The builder's layers wrap it.
#[derive(Clone)]
pub(super) struct Exchange {
    connector: Arc<Connector>,
}

impl Exchange {
    pub(super) fn new(connector: Arc<Connector>) -> Self {
        Self { connector }
    }
}

impl fmt::Debug for Exchange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Exchange")
            .field("base", &self.connector.base())
            .finish()
    }
}

impl Service<Request<TransferBody>> for Exchange {
    type Response = Response<Incoming>;
    type Error = Error;
    type Future = Pin<Box<dyn Future<Output = Result<Response<Incoming>, Error>> + Send>>;

    /// Always ready: readiness is the connection's, awaited in the call
    /// (under the connect timeout) so that a dead one can be replaced.
    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<TransferBody>) -> Self::Future {
        let connector = self.connector.clone();
        Box::pin(async move { connector.send(request).await })
    }
}
