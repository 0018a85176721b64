//! Opening one connection: to which node, in which order, under which
//! deadlines, with the topology declared again before the link goes live.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use lapin::types::LongString;
use lapin::uri::AMQPUri;
use lapin::{Connection, ConnectionProperties};

use super::connection::{Link, Supervisor};
use super::declare::redeclare;
use super::error::{amqp_error, not_connected};
use super::{AmqpConfig, Shared};
use crate::error::{Error, ErrorKind};

/// One node the supervisor may connect to.
pub(super) struct NodeUri {
    pub(super) uri: AMQPUri,
    /// `host:port`, for health and logs: no credentials.
    pub(super) label: String,
}

/// Only the label: lapin's `AMQPUri` derives `Debug` with the password.
impl std::fmt::Debug for NodeUri {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeUri")
            .field("label", &self.label)
            .finish_non_exhaustive()
    }
}

/// The nodes in the order one reconnection round tries them: all of them
/// once, from `start` round the list.
pub(super) fn round(start: usize, nodes: usize) -> impl Iterator<Item = usize> {
    (0..nodes).map(move |offset| (start + offset) % nodes)
}

/// Where the round after losing the connection to `lost` starts: at the
/// next node, so the one that just failed is tried last.
pub(super) fn after(lost: usize, nodes: usize) -> usize {
    (lost + 1) % nodes
}

#[cfg(not(feature = "amqp-tls"))]
async fn connect(
    _config: &AmqpConfig,
    uri: AMQPUri,
    properties: ConnectionProperties,
    what: &str,
) -> Result<Connection, Error> {
    Connection::connect_uri(uri, properties)
        .await
        .map_err(|error| amqp_error(what, error))
}

/// lapin's rustls connector builds its config from rustls' process-default
/// provider (installing one from its features if none is): install ours
/// first, so the one provider is used whatever else is compiled in.
#[cfg(feature = "amqp-tls")]
async fn connect(
    config: &AmqpConfig,
    uri: AMQPUri,
    properties: ConnectionProperties,
    what: &str,
) -> Result<Connection, Error> {
    crate::tls::install_default_provider();
    let tls = lapin::tcp::OwnedTLSConfig {
        identity: None,
        cert_chain: config.tls_ca_pem.clone(),
    };
    let runtime = lapin::runtime::default_runtime().map_err(|error| amqp_error(what, error))?;
    Connection::connect_uri_with_config(uri, properties, tls, runtime)
        .await
        .map_err(|error| amqp_error(what, error))
}

/// One round: each node once, from where the supervisor's rotation starts,
/// until one connects and takes the declarations. The error is the last
/// node's, naming it.
pub(super) async fn open_any(
    shared: &Shared,
    supervisor: &Supervisor,
    generation: u64,
) -> Result<Link, Error> {
    let start = supervisor.start.load(Ordering::Relaxed);
    let mut last = None;
    for node in round(start, supervisor.nodes.len()) {
        match open(shared, supervisor, generation, node).await {
            Ok(link) => return Ok(link),
            Err(error) => {
                let label = &supervisor.nodes[node].label;
                tracing::debug!(%error, node = %label, role = supervisor.role.name(), "amqp: node did not connect");
                last = Some(error);
            }
        }
    }
    Err(last.unwrap_or_else(not_connected))
}

async fn open(
    shared: &Shared,
    supervisor: &Supervisor,
    generation: u64,
    node: usize,
) -> Result<Link, Error> {
    let name = format!("switchboard/{}/{generation}", supervisor.role.name());
    let properties = ConnectionProperties::default().with_connection_name(LongString::from(name));
    let target = &supervisor.nodes[node];
    // lapin's connection_timeout bounds the TCP connect; a node that
    // accepts and then says nothing would hold the whole round without a
    // deadline over the handshake too.
    let deadline = Duration::from_millis(target.uri.query.connection_timeout.unwrap_or(5_000));
    let connection = tokio::time::timeout(
        deadline,
        connect(
            &shared.config,
            target.uri.clone(),
            properties,
            &format!("connect to {}", target.label),
        ),
    )
    .await
    .map_err(|_| {
        Error::new(
            ErrorKind::Timeout,
            format!("amqp: connecting to {} took too long", target.label),
        )
    })??;
    let link = Link {
        generation,
        node,
        connection: Arc::new(connection),
        pool: Arc::default(),
    };
    // The link is not live yet, so nothing else notices if the connection
    // dies under the declarations: bound them, or the supervisor could wait
    // forever instead of reconnecting.
    let declared = tokio::time::timeout(DECLARE_TIMEOUT, redeclare(shared, supervisor, &link))
        .await
        .map_err(|_| {
            Error::new(
                ErrorKind::Timeout,
                "amqp: declaring the topology on a new connection took too long",
            )
        })?;
    declared?;
    Ok(link)
}

/// How long a new connection may take to declare the known topology.
const DECLARE_TIMEOUT: Duration = Duration::from_secs(30);
