//! Closing a transport and asking how it is: [`Transport::close`](super::Transport::close) and
//! [`Transport::health`](super::Transport::health), and what each transport shares to keep them.
//!
//! # Closing
//!
//! `close().await` drains what the transport owns, in this order:
//!
//! 1. it stops accepting work: every later `publish`, `publish_batch`,
//!    `subscribe` and `declare` fails with [`ErrorKind::Closed`], which is
//!    not retryable, so a retrying publisher gives up at once;
//! 2. every subscription it handed out ends: its stream yields `None`, so a
//!    consumer loop stops, settles what it holds and shuts the subscription
//!    down; `close` waits for that;
//! 3. it stops its background tasks (connection supervisors, lease keepers,
//!    trimmers) and closes its connections politely (RabbitMQ
//!    `connection.close`), so the broker and the client libraries log no
//!    error.
//!
//! Everything is bounded by [`CLOSE_TIMEOUT`]: a subscription whose holder
//! never lets go makes `close` fail with [`ErrorKind::Timeout`] once the
//! deadline passes, after the connections are closed anyway. `close` is
//! idempotent: a second call (or a concurrent one) waits for the first and
//! returns `Ok` once the transport is closed.

use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use tokio::sync::watch;
use tokio::time::Instant;

use super::Subscription;
use crate::error::{Error, ErrorKind};

/// How long [`Transport::close`](super::Transport::close) waits for the
/// subscriptions to end and the connections to close.
pub const CLOSE_TIMEOUT: Duration = Duration::from_secs(10);

/// How a transport is, as [`Transport::health`](super::Transport::health)
/// and [`EventBus::health`](crate::EventBus::health) report it: one type for
/// every transport, for a `/health` endpoint.
///
/// ```
/// use switchboard::{HealthState, MemoryTransport, Transport};
///
/// let transport = MemoryTransport::new();
/// let health = transport.health();
/// assert_eq!(health.transport, "memory");
/// assert_eq!(health.state, HealthState::Up);
/// assert!(health.is_up());
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct TransportHealth {
    /// The transport's [`name`](super::Transport::name).
    pub transport: &'static str,
    /// Up, degraded, down or closed.
    pub state: HealthState,
}

/// Where a transport stands.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum HealthState {
    /// Connected and accepting work.
    Up,
    /// Working, but not fully: a broker blocks publishing, one of two
    /// connections reconnects, a subscription's connection is lost.
    Degraded {
        /// What is wrong.
        reason: String,
    },
    /// Not connected: work fails (retryably) or waits until it reconnects.
    Down {
        /// What is wrong.
        reason: String,
    },
    /// [`close`](super::Transport::close) was called: nothing is accepted
    /// any more.
    Closed,
}

impl TransportHealth {
    /// `transport` is up.
    pub fn up(transport: &'static str) -> Self {
        Self::new(transport, HealthState::Up)
    }

    /// `transport` in `state`.
    pub fn new(transport: &'static str, state: HealthState) -> Self {
        Self { transport, state }
    }

    /// `transport` works only partly, because of `reason`.
    pub fn degraded(transport: &'static str, reason: impl Into<String>) -> Self {
        Self::new(
            transport,
            HealthState::Degraded {
                reason: reason.into(),
            },
        )
    }

    /// `transport` is down, because of `reason`.
    pub fn down(transport: &'static str, reason: impl Into<String>) -> Self {
        Self::new(
            transport,
            HealthState::Down {
                reason: reason.into(),
            },
        )
    }

    /// `transport` has been closed.
    pub fn closed(transport: &'static str) -> Self {
        Self::new(transport, HealthState::Closed)
    }

    /// Fully up.
    pub fn is_up(&self) -> bool {
        self.state == HealthState::Up
    }

    /// Up or degraded: worth sending traffic to (a readiness probe).
    pub fn is_serving(&self) -> bool {
        matches!(self.state, HealthState::Up | HealthState::Degraded { .. })
    }

    /// The reason when degraded or down.
    pub fn reason(&self) -> Option<&str> {
        match &self.state {
            HealthState::Degraded { reason } | HealthState::Down { reason } => Some(reason),
            _ => None,
        }
    }
}

impl fmt::Display for TransportHealth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.state {
            HealthState::Up => write!(f, "{}: up", self.transport),
            HealthState::Degraded { reason } => write!(f, "{}: degraded: {reason}", self.transport),
            HealthState::Down { reason } => write!(f, "{}: down: {reason}", self.transport),
            HealthState::Closed => write!(f, "{}: closed", self.transport),
        }
    }
}

/// What a transport keeps to close: the closed flag, the live
/// subscriptions, and whether closing has finished. Clones share it.
#[derive(Clone)]
pub(crate) struct Lifecycle {
    inner: Arc<State>,
}

struct State {
    name: &'static str,
    closed: watch::Sender<bool>,
    /// How many subscriptions handed out have not ended yet.
    live: Arc<watch::Sender<usize>>,
    /// Held by the `close` that does the work; later ones wait for it.
    finishing: tokio::sync::Mutex<bool>,
}

impl Lifecycle {
    pub(crate) fn new(name: &'static str) -> Self {
        Self {
            inner: Arc::new(State {
                name,
                closed: watch::Sender::new(false),
                live: Arc::new(watch::Sender::new(0)),
                finishing: tokio::sync::Mutex::new(false),
            }),
        }
    }

    pub(crate) fn is_closed(&self) -> bool {
        *self.inner.closed.borrow()
    }

    /// Up, or closed once closing started: the health of a transport that
    /// knows nothing more about its connections.
    pub(crate) fn health(&self) -> TransportHealth {
        if self.is_closed() {
            TransportHealth::closed(self.inner.name)
        } else {
            TransportHealth::up(self.inner.name)
        }
    }

    /// `Err(Closed)` once closing started: for publish, subscribe, declare.
    pub(crate) fn check(&self) -> Result<(), Error> {
        if self.is_closed() {
            return Err(Error::new(
                ErrorKind::Closed,
                format!("{}: the transport has been closed", self.inner.name),
            ));
        }
        Ok(())
    }

    /// Resolves once closing started (never if the transport is dropped
    /// without closing: its subscriptions live on as before).
    pub(crate) fn closed(&self) -> impl Future<Output = ()> + Send + use<> {
        let mut closed = self.inner.closed.subscribe();
        async move {
            if closed.wait_for(|closed| *closed).await.is_err() {
                std::future::pending::<()>().await;
            }
        }
    }

    /// `subscription`, ending when the transport closes and counted live
    /// until it is shut down or dropped.
    pub(crate) fn track(&self, subscription: Subscription) -> Subscription {
        let live = LiveGuard::new(self.inner.live.clone());
        subscription.until(self.closed(), live)
    }

    /// Runs `finish` (stopping tasks, closing connections) once, after the
    /// subscriptions ended or `CLOSE_TIMEOUT` passed; idempotent.
    pub(crate) async fn close<F>(&self, finish: impl FnOnce(Instant) -> F) -> Result<(), Error>
    where
        F: Future<Output = ()>,
    {
        let deadline = Instant::now() + CLOSE_TIMEOUT;
        let Ok(mut done) = tokio::time::timeout_at(deadline, self.inner.finishing.lock()).await
        else {
            return Err(self.timeout());
        };
        if *done {
            return Ok(());
        }
        self.inner.closed.send_replace(true);
        let mut live = self.inner.live.subscribe();
        let drained = tokio::time::timeout_at(deadline, live.wait_for(|live| *live == 0))
            .await
            .is_ok();
        finish(deadline).await;
        *done = true;
        if drained { Ok(()) } else { Err(self.timeout()) }
    }

    fn timeout(&self) -> Error {
        Error::new(
            ErrorKind::Timeout,
            format!(
                "{}: subscriptions were still held when the close deadline ({}s) passed",
                self.inner.name,
                CLOSE_TIMEOUT.as_secs()
            ),
        )
    }
}

impl fmt::Debug for Lifecycle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Lifecycle")
            .field("closed", &self.is_closed())
            .field("live", &*self.inner.live.borrow())
            .finish()
    }
}

/// Counts one live subscription until dropped.
pub(crate) struct LiveGuard(Arc<watch::Sender<usize>>);

impl LiveGuard {
    fn new(live: Arc<watch::Sender<usize>>) -> Self {
        live.send_modify(|live| *live += 1);
        Self(live)
    }
}

impl Drop for LiveGuard {
    fn drop(&mut self) {
        self.0.send_modify(|live| *live -= 1);
    }
}

impl Subscription {
    /// This subscription, its stream ending when `closed` resolves and
    /// `guard` kept until its drain finished (or it is dropped).
    fn until(
        self,
        closed: impl Future<Output = ()> + Send + 'static,
        guard: LiveGuard,
    ) -> Subscription {
        let settles_in_flight = self.settles_in_flight();
        let (topic, group, deliveries, drain) = self.into_parts();
        let deliveries = deliveries.take_until(closed);
        let drain = async move {
            let drained = drain.await;
            drop(guard);
            drained
        };
        let subscription = Subscription::new(topic, group, deliveries, drain);
        match settles_in_flight {
            Some(most) => subscription.with_settles_in_flight(most),
            None => subscription,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{MemoryTransport, Publisher, RawMessage, SubscribeOptions, Subscriber, Transport};

    #[tokio::test]
    async fn close_ends_subscriptions_refuses_work_and_is_idempotent() {
        let transport = MemoryTransport::new();
        let mut subscription = transport
            .subscribe("t", SubscribeOptions::new("g"))
            .await
            .unwrap();
        transport.publish("t", RawMessage::new("x")).await.unwrap();
        let delivery = subscription.recv().await.expect("a message");
        delivery.ack().await.unwrap();

        let consumer = tokio::spawn(async move {
            while subscription.recv().await.is_some() {}
            subscription.shutdown().await
        });
        transport.close().await.unwrap();
        consumer.await.unwrap().unwrap();
        transport.close().await.unwrap();

        let refused = transport.publish("t", RawMessage::new("y")).await;
        let error = refused.unwrap_err();
        assert_eq!(error.kind(), ErrorKind::Closed);
        assert!(!error.is_retryable());
        let refused = transport.subscribe("t", SubscribeOptions::new("g")).await;
        assert_eq!(refused.unwrap_err().kind(), ErrorKind::Closed);
        assert_eq!(transport.health(), TransportHealth::closed("memory"));
    }

    #[tokio::test(start_paused = true)]
    async fn close_gives_up_on_a_held_subscription_at_the_deadline() {
        let transport = MemoryTransport::new();
        let _held = transport
            .subscribe("t", SubscribeOptions::new("g"))
            .await
            .unwrap();
        let error = transport.close().await.unwrap_err();
        assert_eq!(error.kind(), ErrorKind::Timeout);
        // Closed all the same, and the next close does not wait again.
        assert!(transport.health().state == HealthState::Closed);
        transport.close().await.unwrap();
    }
}
