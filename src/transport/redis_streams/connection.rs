//! The connections: one shared command connection per transport (which
//! reconnects by itself) and one blocking-read connection per subscription.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster::{ClusterClient, ClusterConfig};
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, FromRedisValue, Pipeline, RedisFuture, RedisResult, Value};

use super::{GroupStart, Inner, RedisStreamsConfig, RedisStreamsTransport};
use crate::error::Error;
use crate::transport::redis_support::{
    LastOutcome, connection_manager, open_client, redis_error, within_connect_timeout,
};

/// A connection to one server or a cluster, noting what each command's
/// outcome says of Redis's reachability in the transport's [`LastOutcome`].
#[derive(Clone)]
pub(super) struct Conn {
    pub(super) link: Link,
    seen: Arc<LastOutcome>,
}

#[derive(Clone)]
pub(super) enum Link {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

impl Conn {
    fn new(link: Link, seen: Arc<LastOutcome>) -> Self {
        Self { link, seen }
    }

    pub(super) fn is_cluster(&self) -> bool {
        matches!(self.link, Link::Cluster(_))
    }

    /// `cmd.query_async(conn)`, its outcome recorded as every command's,
    /// without the boxed future the [`ConnectionLike`] impl wraps around
    /// the connection's own: one allocation fewer per publish.
    pub(super) async fn query<T: FromRedisValue>(&mut self, cmd: &Cmd) -> RedisResult<T> {
        let reply = self.send(cmd).await?;
        Ok(redis::from_redis_value(reply.extract_error()?)?)
    }

    /// Sends `cmd` on the link and records the outcome: what every command
    /// of this transport goes through.
    async fn send(&mut self, cmd: &Cmd) -> RedisResult<Value> {
        let reply = match &mut self.link {
            Link::Single(conn) => conn.req_packed_command(cmd).await,
            Link::Cluster(conn) => conn.req_packed_command(cmd).await,
        };
        self.seen.record(&reply);
        reply
    }
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        Box::pin(self.send(cmd))
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        let Self { link, seen } = self;
        let replies = match link {
            Link::Single(conn) => conn.req_packed_commands(pipeline, offset, count),
            Link::Cluster(conn) => conn.req_packed_commands(pipeline, offset, count),
        };
        Box::pin(async move {
            let replies = replies.await;
            seen.record(&replies);
            replies
        })
    }

    fn get_db(&self) -> i64 {
        match &self.link {
            Link::Single(conn) => conn.get_db(),
            Link::Cluster(conn) => conn.get_db(),
        }
    }
}

/// Makes the dedicated connections blocking reads use.
// One per transport, so the size of a TLS-capable client is no concern.
#[allow(clippy::large_enum_variant)]
pub(super) enum Connector {
    Single(redis::Client),
    // Boxed: a cluster client is twice the size of a plain one.
    Cluster(Box<ClusterClient>),
}

impl RedisStreamsTransport {
    /// [`RedisStreamsConfig`].
    pub async fn connect(url: &str) -> Result<Self, Error> {
        Self::connect_with(url, RedisStreamsConfig::default()).await
    }

    /// Connects to one Redis server with `config`.
    pub async fn connect_with(url: &str, config: RedisStreamsConfig) -> Result<Self, Error> {
        config.validate()?;
        let client = open_client(url, config.tls_ca_pem.as_deref().map(str::as_bytes))?;
        let manager =
            ConnectionManagerConfig::new().set_response_timeout(Some(config.response_timeout));
        let commands =
            connection_manager(super::NAME, &client, manager, config.connect_timeout).await?;
        let hash_tag = config.hash_tag.unwrap_or(false);
        Ok(Self::finish(
            Link::Single(commands),
            Connector::Single(client),
            config,
            hash_tag,
        )
        .await)
    }

    /// Connects to a Redis Cluster through any of its nodes
    /// (`redis://host:port`). Stream keys are hash-tagged unless `config`
    /// says otherwise, so a stream and its dead letters share a slot.
    pub async fn connect_cluster<I, S>(nodes: I, config: RedisStreamsConfig) -> Result<Self, Error>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        config.validate()?;
        let nodes: Vec<String> = nodes.into_iter().map(|n| n.as_ref().to_owned()).collect();
        let builder = ClusterClient::builder(nodes)
            .response_timeout(config.response_timeout)
            .connection_timeout(config.connect_timeout);
        #[cfg(feature = "redis-tls")]
        let builder = {
            crate::tls::install_default_provider();
            match &config.tls_ca_pem {
                Some(ca) => builder.certs(redis::TlsCertificates {
                    client_tls: None,
                    root_cert: Some(ca.as_bytes().to_vec()),
                }),
                None => builder,
            }
        };
        let client = builder
            .build()
            .map_err(|error| redis_error("open cluster", error))?;
        let commands = within_connect_timeout(
            super::NAME,
            config.connect_timeout,
            client.get_async_connection(),
        )
        .await?
        .map_err(|error| redis_error("connect to cluster", error))?;
        let hash_tag = config.hash_tag.unwrap_or(true);
        Ok(Self::finish(
            Link::Cluster(commands),
            Connector::Cluster(Box::new(client)),
            config,
            hash_tag,
        )
        .await)
    }

    async fn finish(
        commands: Link,
        connector: Connector,
        config: RedisStreamsConfig,
        hash_tag: bool,
    ) -> Self {
        let seen = Arc::new(LastOutcome::default());
        let commands = Conn::new(commands, seen.clone());
        let persistent = aof_enabled(commands.clone()).await;
        let transport = Self {
            inner: Arc::new(Inner {
                commands,
                seen,
                connector,
                config,
                hash_tag,
                persistent,
                consumers: std::sync::Mutex::default(),
                trimmers: super::trim::Trimmers::default(),
                mover: super::schedule::Mover::default(),
                lifecycle: crate::transport::Lifecycle::new(super::NAME),
            }),
        };
        transport.start_mover();
        transport
    }

    pub(super) async fn blocking_connection(&self) -> Result<Conn, Error> {
        // Longer than BLOCK, so a read that waits its full time is not cut off.
        let timeout = self.inner.config.block + Duration::from_secs(5);
        match &self.inner.connector {
            Connector::Single(client) => {
                let config = ConnectionManagerConfig::new()
                    .set_response_timeout(Some(timeout))
                    .set_connection_timeout(Some(self.inner.config.connect_timeout));
                client
                    .get_connection_manager_with_config(config)
                    .await
                    .map(|link| Conn::new(Link::Single(link), self.inner.seen.clone()))
                    .map_err(|error| redis_error("connect for reading", error))
            }
            Connector::Cluster(client) => {
                let config = ClusterConfig::new().set_response_timeout(timeout);
                client
                    .get_async_connection_with_config(config)
                    .await
                    .map(|link| Conn::new(Link::Cluster(link), self.inner.seen.clone()))
                    .map_err(|error| redis_error("connect to cluster for reading", error))
            }
        }
    }
}

/// Reads `CONFIG GET append*`; any failure (a managed Redis that hides
/// CONFIG) counts as "not persistent", the safe answer.
pub(super) async fn aof_enabled(mut conn: Conn) -> bool {
    let reply: RedisResult<HashMap<String, String>> = redis::cmd("CONFIG")
        .arg("GET")
        .arg("append*")
        .query_async(&mut conn)
        .await;
    match reply {
        Ok(settings) => {
            let aof = settings.get("appendonly").is_some_and(|v| v == "yes");
            let fsync = settings
                .get("appendfsync")
                .is_some_and(|v| v == "always" || v == "everysec");
            aof && fsync
        }
        Err(error) => {
            tracing::warn!(%error, "redis-streams: cannot read the AOF settings; not persistent");
            false
        }
    }
}

pub(super) async fn ensure_group(
    mut conn: Conn,
    stream: &str,
    group: &str,
    start: GroupStart,
) -> Result<(), Error> {
    let created: RedisResult<()> = redis::cmd("XGROUP")
        .arg("CREATE")
        .arg(stream)
        .arg(group)
        .arg(start.id())
        .arg("MKSTREAM")
        .query_async(&mut conn)
        .await;
    match created {
        Ok(()) => Ok(()),
        Err(error) if error.code() == Some("BUSYGROUP") => Ok(()),
        Err(error) => Err(redis_error("create consumer group", error)),
    }
}
