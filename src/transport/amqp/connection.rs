//! The connections and the tasks that keep them up.
//!
//! There are two: one for publishing, one for consuming. RabbitMQ blocks a
//! connection that publishes while a resource alarm (memory, disk) is on,
//! and a blocked connection carries nothing at all — lapin stops writing to
//! it, acks included. So consumers, which only ack, reject and declare,
//! have a connection of their own that the broker never blocks; everything
//! that publishes (publishers, and a consumer's dead letters and
//! republished nacks) goes through the publishing connection under
//! [`AmqpConfig::publish_timeout`].
//!
//! lapin 4 can recover a connection by itself, but then the application
//! cannot tell when the topology has been declared again nor hand out a
//! fresh channel pool at a known moment. So the transport runs its own
//! supervisor: one live [`Link`] at a time, published through a watch; every
//! user of the connection takes the current link, and whoever sees it fail
//! (the connection's error event, or an operation failing because the
//! connection is gone) reports it, after which the supervisor reconnects with
//! an exponential backoff, declares everything known again and publishes the
//! next link.
//!
//! With several nodes ([`AmqpConfig::nodes`]) every reconnection attempt is
//! a round over them, starting at the node after the one just lost (so a
//! dead node is tried last, not first) and each under the connect deadline;
//! the backoff is between rounds, not between nodes, because another node
//! answering at once is the point of having it. Each connection rotates on
//! its own: the publishing one may sit on a different node than the
//! consuming one.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use futures_util::StreamExt;
use lapin::uri::AMQPUri;
use lapin::{Channel, Connection};
use tokio::sync::watch;
use tokio::time::Instant;

use super::error::{blocked_timeout, not_connected, redact};
use super::open::{NodeUri, after, open_any};
use super::{AmqpConfig, Shared};
use crate::error::{Error, ErrorKind};

/// Where the transport's connection to RabbitMQ stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ConnectionState {
    /// Connected, and the known topology declared on this connection.
    Connected,
    /// Connected, but the broker blocked the connection (a memory or disk
    /// alarm, `connection.blocked`): publishes wait until it is unblocked
    /// or their [`publish_timeout`](super::AmqpConfig::publish_timeout)
    /// passes, then fail with [`ErrorKind::Timeout`]. Only the publishing
    /// connection is ever blocked; consumers go on acking.
    Blocked,
    /// The connection was lost; reconnecting with backoff. Publishes wait
    /// (up to the publish timeout) and consumers resume once connected.
    Reconnecting,
    /// The transport was dropped; nothing reconnects any more.
    Closed,
}

/// One live connection and its pool of publishing channels.
#[derive(Clone)]
pub(crate) struct Link {
    pub(crate) generation: u64,
    /// The index of the node it is connected to.
    pub(crate) node: usize,
    pub(crate) connection: Arc<Connection>,
    /// Idle channels in confirm mode; a publish takes one for itself.
    pub(crate) pool: Arc<Mutex<Vec<Channel>>>,
}

/// Which of the two connections a supervisor keeps up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Role {
    /// Publishers, and the consumers' own publishes; declares the known
    /// topology on every new connection.
    Publishing,
    /// Consumers: they declare their own queues when they (re)start.
    Consuming,
}

impl Role {
    pub(super) fn name(self) -> &'static str {
        match self {
            Self::Publishing => "publish",
            Self::Consuming => "consume",
        }
    }
}

pub(crate) struct Supervisor {
    pub(super) role: Role,
    pub(super) nodes: Vec<NodeUri>,
    /// Where the next round of connection attempts starts.
    pub(super) start: AtomicUsize,
    state: watch::Sender<ConnectionState>,
    link: watch::Sender<Option<Link>>,
    /// The highest generation reported lost.
    lost: watch::Sender<u64>,
    /// The broker's reason while it blocks the live connection.
    blocked: watch::Sender<Option<String>>,
}

impl Supervisor {
    pub(crate) fn new(config: &AmqpConfig, role: Role) -> Result<Self, Error> {
        let nodes = config
            .node_uris()
            .map(|text| {
                let mut uri: AMQPUri = text.parse().map_err(|error: String| {
                    Error::new(
                        ErrorKind::Config,
                        // lapin quotes a URL it cannot read whole.
                        format!(
                            "amqp: invalid uri {:?}: {}",
                            redact(text),
                            crate::transport::redact::redact_in(&error, text)
                        ),
                    )
                })?;
                uri.query.heartbeat =
                    Some(config.heartbeat.as_secs().clamp(1, u16::MAX.into()) as u16);
                let millis = config
                    .connect_timeout
                    .as_millis()
                    .try_into()
                    .unwrap_or(u64::MAX);
                uri.query.connection_timeout.get_or_insert(millis);
                let label = format!("{}:{}", uri.authority.host, uri.authority.port);
                Ok(NodeUri { uri, label })
            })
            .collect::<Result<Vec<_>, Error>>()?;
        Ok(Self {
            role,
            nodes,
            start: AtomicUsize::new(0),
            state: watch::Sender::new(ConnectionState::Reconnecting),
            link: watch::Sender::new(None),
            lost: watch::Sender::new(0),
            blocked: watch::Sender::new(None),
        })
    }

    /// The node (`host:port`) the live connection goes to.
    pub(crate) fn node(&self) -> Option<String> {
        let link = self.link.borrow();
        link.as_ref()
            .map(|link| self.nodes[link.node].label.clone())
    }

    /// The broker's reason while it blocks the live connection.
    pub(crate) fn blocked(&self) -> Option<String> {
        self.blocked.borrow().clone()
    }

    /// Waits until the live connection is not blocked, failing with a
    /// retryable [`ErrorKind::Timeout`] at `deadline`.
    pub(crate) async fn wait_unblocked(&self, deadline: Instant) -> Result<(), Error> {
        let mut blocked = self.blocked.subscribe();
        match tokio::time::timeout_at(deadline, blocked.wait_for(Option::is_none)).await {
            Ok(_) => Ok(()),
            Err(_) => Err(blocked_timeout(self.blocked())),
        }
    }

    pub(crate) fn state(&self) -> watch::Receiver<ConnectionState> {
        self.state.subscribe()
    }

    /// The current link, waiting for one until `deadline`.
    pub(crate) async fn wait_link(&self, deadline: Instant) -> Result<Link, Error> {
        self.wait_link_after(deadline, 0).await
    }

    /// The current link once its generation is above `after`, waiting until
    /// `deadline`.
    pub(crate) async fn wait_link_after(
        &self,
        deadline: Instant,
        after: u64,
    ) -> Result<Link, Error> {
        let mut link = self.link.subscribe();
        let newer = |link: &Option<Link>| link.as_ref().is_some_and(|link| link.generation > after);
        let waited = tokio::time::timeout_at(deadline, link.wait_for(newer)).await;
        match waited {
            Ok(Ok(link)) => Ok(link.clone().expect("waited for Some")),
            Ok(Err(_)) => Err(Error::closed("amqp transport")),
            Err(_) => Err(not_connected()),
        }
    }

    /// Stops keeping the connection up and closes it with `200`, waiting
    /// for the broker's answer until `deadline` (the socket is dropped
    /// after it either way).
    pub(crate) async fn close(&self, deadline: Instant) {
        self.state.send_replace(ConnectionState::Closed);
        self.blocked.send_replace(None);
        let Some(link) = self.link.send_replace(None) else {
            return;
        };
        let closing = link.connection.close(200, "closing".into());
        match tokio::time::timeout_at(deadline, closing).await {
            Ok(Ok(())) => {}
            Ok(Err(error)) => {
                tracing::debug!(%error, role = self.role.name(), "amqp: closing the connection failed");
            }
            Err(_) => {
                tracing::debug!(
                    role = self.role.name(),
                    "amqp: the broker did not answer the close in time"
                );
            }
        }
    }

    /// Whether a connection is live now.
    pub(crate) fn is_linked(&self) -> bool {
        self.link.borrow().is_some()
    }

    /// Resolves once the link of `generation` is no longer the live one.
    ///
    /// lapin leaves some operations pending forever when the connection
    /// dies under them (an ack in flight, for one), so every wait on the
    /// broker races this.
    pub(crate) async fn link_gone(&self, generation: u64) {
        let mut link = self.link.subscribe();
        let _ = link
            .wait_for(|link| {
                link.as_ref()
                    .is_none_or(|link| link.generation != generation)
            })
            .await;
    }

    /// Runs `operation`, failing with a connection error if the link of
    /// `generation` goes first.
    pub(crate) async fn guard<T>(
        &self,
        generation: u64,
        operation: impl Future<Output = Result<T, Error>>,
    ) -> Result<T, Error> {
        tokio::select! {
            result = operation => result,
            () = self.link_gone(generation) => Err(Error::new(
                ErrorKind::Connection,
                "amqp: the connection was lost before the broker answered",
            )),
        }
    }

    pub(crate) fn link_watch(&self) -> watch::Receiver<Option<Link>> {
        self.link.subscribe()
    }

    /// Reports that an operation on `link` failed with `error`; when the
    /// connection itself is gone, the supervisor starts reconnecting.
    pub(crate) fn failed(&self, link: &Link, error: &Error) {
        if error.kind() == ErrorKind::Connection && !link.connection.status().connected() {
            self.lost.send_if_modified(|lost| {
                let newer = link.generation > *lost;
                if newer {
                    *lost = link.generation;
                }
                newer
            });
        }
    }
}

/// Picks one of the two supervisors out of the shared state.
type Pick = fn(&Shared) -> &Supervisor;

/// Connects both connections once (so a bad URI or a broker that is down
/// fails the caller), then leaves each to its supervisor task.
pub(crate) async fn start(shared: &Arc<Shared>) -> Result<(), Error> {
    let publishing: Pick = |shared| &shared.supervisor;
    let consuming: Pick = |shared| &shared.consuming;
    for pick in [publishing, consuming] {
        let link = open_any(shared, pick(shared), 1).await?;
        let events = link.connection.events_listener();
        install(pick(shared), link.clone());
        tokio::spawn(supervise(
            Arc::downgrade(shared),
            pick,
            link,
            Box::pin(events),
        ));
    }
    Ok(())
}

type Events = std::pin::Pin<Box<dyn futures_core::Stream<Item = lapin::Event> + Send>>;

/// Follows the connection's events until it fails: a block or an unblock
/// is published in the supervisor's state.
async fn follow(shared: &Weak<Shared>, pick: Pick, connection: &Connection, events: &mut Events) {
    while let Some(event) = events.next().await {
        let Some(strong) = shared.upgrade() else {
            return;
        };
        if strong.lifecycle.is_closed() {
            return;
        }
        let supervisor = pick(&strong);
        match event {
            // lapin reports a channel closed by the broker (a refused
            // declaration, say) as an error event too: only one that took
            // the connection down is the connection's.
            lapin::Event::Error(error) if !connection.status().connected() => {
                tracing::warn!(%error, role = supervisor.role.name(), "amqp: connection error");
                return;
            }
            lapin::Event::Error(error) => {
                tracing::debug!(%error, role = supervisor.role.name(), "amqp: a channel closed");
            }
            lapin::Event::ConnectionBlocked(reason) => {
                tracing::warn!(%reason, role = supervisor.role.name(), "amqp: the broker blocked the connection");
                supervisor.blocked.send_replace(Some(reason));
                supervisor.state.send_replace(ConnectionState::Blocked);
            }
            lapin::Event::ConnectionUnblocked => {
                tracing::info!(
                    role = supervisor.role.name(),
                    "amqp: the broker unblocked the connection"
                );
                supervisor.blocked.send_replace(None);
                supervisor.state.send_replace(ConnectionState::Connected);
            }
            _ => {}
        }
    }
}

async fn supervise(shared: Weak<Shared>, pick: Pick, mut link: Link, mut events: Events) {
    loop {
        let Some((mut lost, closed)) = shared
            .upgrade()
            .map(|shared| (pick(&shared).lost.subscribe(), shared.lifecycle.closed()))
        else {
            return;
        };
        let generation = link.generation;
        tokio::select! {
            // The transport is gone when the sender is dropped.
            result = lost.wait_for(|lost| *lost >= generation) => if result.is_err() {
                return;
            },
            () = follow(&shared, pick, &link.connection, &mut events) => {}
            // `close` closes the connection itself.
            () = closed => return,
        }
        drop(lost);
        let Some(strong) = shared.upgrade() else {
            return;
        };
        if strong.lifecycle.is_closed() {
            return;
        }
        let supervisor = pick(&strong);
        tracing::warn!(
            generation,
            role = supervisor.role.name(),
            "amqp: connection lost; reconnecting"
        );
        supervisor
            .start
            .store(after(link.node, supervisor.nodes.len()), Ordering::Relaxed);
        supervisor.link.send_replace(None);
        supervisor.blocked.send_replace(None);
        supervisor.state.send_replace(ConnectionState::Reconnecting);
        let (first, longest) = strong.config.reconnect_delay;
        drop(strong);
        // Closing politely may hang on a dead socket; dropping is enough.
        drop(link);

        let mut delays = backon::BackoffBuilder::build(
            backon::ExponentialBuilder::default()
                .with_min_delay(first)
                .with_max_delay(longest)
                .with_jitter()
                .without_max_times(),
        );
        let mut next = generation + 1;
        link = loop {
            let Some(strong) = shared.upgrade() else {
                return;
            };
            let closed = strong.lifecycle.closed();
            if strong.lifecycle.is_closed() {
                return;
            }
            match open_any(&strong, pick(&strong), next).await {
                Ok(link) => break link,
                Err(error) => {
                    tracing::warn!(%error, "amqp: reconnect failed");
                    next += 1;
                }
            }
            drop(strong);
            let delay = delays.next().unwrap_or(longest);
            tokio::select! {
                () = tokio::time::sleep(delay) => {}
                () = closed => return,
            }
        };
        events = Box::pin(link.connection.events_listener());
        let Some(strong) = shared.upgrade() else {
            return;
        };
        if strong.lifecycle.is_closed() {
            // Closed while this connection was being made: nobody uses it.
            let deadline = Instant::now() + CLOSE_TIMEOUT;
            let closing = link.connection.close(200, "closing".into());
            let _ = tokio::time::timeout_at(deadline, closing).await;
            return;
        }
        let supervisor = pick(&strong);
        install(supervisor, link.clone());
        tracing::info!(
            generation = link.generation,
            role = supervisor.role.name(),
            node = %supervisor.nodes[link.node].label,
            "amqp: reconnected"
        );
    }
}

fn install(supervisor: &Supervisor, link: Link) {
    // A connection the broker blocks says so in its first frames.
    let blocked = link.connection.status().blocked();
    supervisor.link.send_replace(Some(link));
    supervisor.state.send_replace(if blocked {
        ConnectionState::Blocked
    } else {
        ConnectionState::Connected
    });
}

impl Drop for Shared {
    fn drop(&mut self) {
        for supervisor in [&self.supervisor, &self.consuming] {
            supervisor.state.send_replace(ConnectionState::Closed);
            if let Some(link) = supervisor.link.send_replace(None) {
                let connection = link.connection.clone();
                drop(link);
                if let Ok(handle) = tokio::runtime::Handle::try_current() {
                    handle.spawn(async move {
                        let _ = connection.close(200, "transport dropped".into()).await;
                    });
                }
            }
        }
    }
}

/// How long closing a channel may wait for the broker's answer.
pub(crate) const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

/// A small pause before another try of something that keeps failing, so a
/// consumer does not spin while the supervisor reconnects.
pub(crate) const RETRY_PAUSE: Duration = Duration::from_millis(50);

#[cfg(test)]
#[path = "connection_tests.rs"]
mod tests;
