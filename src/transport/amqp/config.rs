//! How to reach RabbitMQ and how to lay out exchanges and queues.

use std::fmt;
use std::time::Duration;

use super::DLQ_SUFFIX;
use super::error::redact;
use crate::error::{Error, ErrorKind};
use crate::transport::validate_name;

/// Classic or quorum queues.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum QueueType {
    /// Classic queues: the broker keeps no delivery count, so the transport
    /// counts attempts in a header when it republishes a nacked message.
    #[default]
    Classic,
    /// Quorum queues (replicated): the broker counts returns in
    /// `x-delivery-count`, which the attempts of an unguarded subscription
    /// come from; nacks and the poison guard work as on classic queues.
    Quorum,
}

/// What a publish does when no queue is bound for its topic (the broker
/// returns a mandatory message it cannot route).
///
/// RabbitMQ keeps a message only in a queue, and a group's queue exists
/// once the group's consumer (or [`Transport::declare`] with its topology)
/// has declared it. Publishing before that is the publisher's own
/// decision: fail and say so, or go on as a broadcast with no listener
/// would.
///
/// [`Transport::declare`]: crate::Transport::declare
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[non_exhaustive]
pub enum Unroutable {
    /// The publish fails with a non-retryable [`ErrorKind::NotFound`]
    /// naming the topic: nothing is dropped without the caller hearing of
    /// it. The default.
    #[default]
    Fail,
    /// The publish succeeds and the message is dropped, counted in
    /// `switchboard_dropped_total{reason="unroutable"}` and logged at
    /// DEBUG. For topics where an event nobody subscribed to yet is worth
    /// nothing (notifications, cache invalidations), so publishers need not
    /// know their consumers' groups. Dead letters and redrives always fail
    /// when their queue is missing.
    Discard,
}

/// How to reach RabbitMQ and how to lay out exchanges and queues.
///
/// ```
/// use std::time::Duration;
/// use switchboard::transport::amqp::{AmqpConfig, QueueType};
///
/// let config = AmqpConfig::new("amqp://127.0.0.1:5672/%2f")
///     .with_exchange("platform")
///     .with_queue_type(QueueType::Quorum)
///     .with_publish_window(512)
///     .with_heartbeat(Duration::from_secs(3));
/// assert_eq!(config.exchange, "platform");
/// assert_eq!(config.queue_name("trade.executed", "game").unwrap(), "platform.trade.executed.game");
///
/// let secret = AmqpConfig::new("amqp://app:s3cret@rabbit:5672/%2f");
/// assert!(!format!("{secret:?}").contains("s3cret"), "Debug hides the password");
///
/// // A cluster: the first node that answers, the others on failover.
/// let cluster = AmqpConfig::new_cluster([
///     "amqp://app:s3cret@rabbit-1:5672/%2f",
///     "amqp://app:s3cret@rabbit-2:5672/%2f",
///     "amqp://app:s3cret@rabbit-3:5672/%2f",
/// ]);
/// assert_eq!(cluster.uri, "amqp://app:s3cret@rabbit-1:5672/%2f");
/// assert_eq!(cluster.node_uris().count(), 3);
/// assert!(!format!("{cluster:?}").contains("s3cret"));
/// ```
#[derive(Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct AmqpConfig {
    /// The AMQP URI, such as `amqp://guest:guest@127.0.0.1:5672/%2f`: the
    /// first node tried.
    pub uri: String,
    /// The other nodes of the same cluster, tried after [`uri`](Self::uri)
    /// in this order (default none). Each connection goes to the first node
    /// that answers; when it is lost, reconnecting starts at the node after
    /// the one lost and goes round the list, each try under
    /// [`connect_timeout`](Self::connect_timeout).
    pub nodes: Vec<String>,
    /// The topic exchange every message is published to (default
    /// `"switchboard"`). Queue names start with it.
    pub exchange: String,
    /// Delete the exchange once its last queue is unbound (default `false`);
    /// for tests, next to [`queue_expires`](Self::queue_expires).
    pub exchange_auto_delete: bool,
    /// Classic (default) or quorum queues.
    pub queue_type: QueueType,
    /// `x-expires` on every queue this transport declares: the broker deletes
    /// a queue unused for this long. For tests, so a failed run leaves
    /// nothing behind; `None` (the default) for production.
    pub queue_expires: Option<Duration>,
    /// Publishes in flight at once, and confirms outstanding in one
    /// `publish_batch` (default 256).
    pub publish_window: usize,
    /// The deadline of each publish, over all it waits for — a place in the
    /// window, a connection, the broker unblocking a blocked connection, the
    /// confirm — and the tries after a lost connection; past it the publish
    /// fails with a retryable error (default 30 s). `declare`, `subscribe`
    /// and the dead-letter operations wait as long for a connection, and
    /// declarations as long for the broker's answer.
    pub publish_timeout: Duration,
    /// The AMQP heartbeat, so a dead peer is noticed (default 5 s).
    pub heartbeat: Duration,
    /// How long connecting to one node may take, TCP, TLS and the AMQP
    /// handshake together (default 5 s); a URI's own `connection_timeout`
    /// query parameter (milliseconds) wins. `connect` tries each node once,
    /// so a broker that is down fails it within this per node with a
    /// retryable error.
    pub connect_timeout: Duration,
    /// The first and the longest wait between reconnection attempts
    /// (default 100 ms and 5 s, doubling).
    pub reconnect_delay: (Duration, Duration),
    /// The content type set on published messages (default
    /// `application/json`).
    pub content_type: String,
    /// How often each subscription samples its queue's depth into the
    /// `switchboard_consumer_lag` gauge (default 5 s).
    pub lag_every: Duration,
    /// Extra CA certificates (PEM) trusted for an `amqps://` URI, next to
    /// the webpki roots: a private CA's certificate. Needs the `amqp-tls`
    /// feature, as any `amqps://` URI does (default `None`).
    pub tls_ca_pem: Option<String>,
    /// What a publish to a topic with no bound queue does (default
    /// [`Unroutable::Fail`]).
    pub unroutable: Unroutable,
    /// Declare every group queue with `x-single-active-consumer` (default
    /// `false`): the broker hands the queue's messages to one member of the
    /// group at a time and fails over to the next when it goes, so order
    /// per key (see [`OrderingKey`](crate::OrderingKey)) holds across the
    /// members of a group, not only within one subscription — at the cost
    /// of one member doing all the group's work.
    ///
    /// RabbitMQ cannot change the argument of an existing queue: declaring
    /// a queue that exists with the other setting fails with
    /// `PRECONDITION_FAILED` (the `subscribe` or `declare` that needed it
    /// returns the broker's reason, and nothing is redeclared behind your
    /// back). Turn it on for a new group name, or delete the queue first
    /// (its messages go with it).
    pub single_active_consumer: bool,
}

impl AmqpConfig {
    /// The defaults with this URI.
    pub fn new(uri: impl Into<String>) -> Self {
        Self {
            uri: uri.into(),
            nodes: Vec::new(),
            exchange: "switchboard".to_owned(),
            exchange_auto_delete: false,
            queue_type: QueueType::Classic,
            queue_expires: None,
            publish_window: 256,
            publish_timeout: Duration::from_secs(30),
            heartbeat: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(5),
            reconnect_delay: (Duration::from_millis(100), Duration::from_secs(5)),
            content_type: "application/json".to_owned(),
            lag_every: Duration::from_secs(5),
            tls_ca_pem: None,
            unroutable: Unroutable::Fail,
            single_active_consumer: false,
        }
    }

    /// The defaults with the nodes of one cluster: the first is
    /// [`uri`](Self::uri), the rest [`nodes`](Self::nodes). An empty list
    /// leaves `uri` empty, which [`AmqpTransport::connect`] refuses as a
    /// config error.
    ///
    /// [`AmqpTransport::connect`]: super::AmqpTransport::connect
    ///
    /// ```
    /// use switchboard::transport::amqp::AmqpConfig;
    ///
    /// let config = AmqpConfig::new_cluster(["amqp://rabbit-1", "amqp://rabbit-2"]);
    /// assert_eq!(config.uri, "amqp://rabbit-1");
    /// assert_eq!(config.nodes, ["amqp://rabbit-2"]);
    /// ```
    pub fn new_cluster<I, S>(uris: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        let mut uris = uris.into_iter().map(Into::into);
        let first = uris.next().unwrap_or_default();
        Self::new(first).with_nodes(uris)
    }

    /// Sets [`nodes`](Self::nodes): the cluster's other nodes, after
    /// [`uri`](Self::uri).
    ///
    /// ```
    /// use switchboard::transport::amqp::AmqpConfig;
    ///
    /// let config = AmqpConfig::new("amqp://rabbit-1").with_nodes(["amqp://rabbit-2"]);
    /// let nodes: Vec<&str> = config.node_uris().collect();
    /// assert_eq!(nodes, ["amqp://rabbit-1", "amqp://rabbit-2"]);
    /// ```
    pub fn with_nodes<I, S>(mut self, uris: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.nodes = uris.into_iter().map(Into::into).collect();
        self
    }

    /// Every node's URI in the order they are tried: [`uri`](Self::uri),
    /// then [`nodes`](Self::nodes).
    ///
    /// ```
    /// use switchboard::transport::amqp::AmqpConfig;
    ///
    /// assert_eq!(AmqpConfig::new("amqp://rabbit").node_uris().count(), 1);
    /// ```
    pub fn node_uris(&self) -> impl Iterator<Item = &str> {
        std::iter::once(self.uri.as_str()).chain(self.nodes.iter().map(String::as_str))
    }

    /// Sets [`tls_ca_pem`](Self::tls_ca_pem).
    pub fn with_tls_ca_pem(mut self, pem: impl Into<String>) -> Self {
        self.tls_ca_pem = Some(pem.into());
        self
    }

    /// Sets [`unroutable`](Self::unroutable).
    ///
    /// ```
    /// use switchboard::transport::amqp::{AmqpConfig, Unroutable};
    ///
    /// let config = AmqpConfig::default().with_unroutable(Unroutable::Discard);
    /// assert_eq!(config.unroutable, Unroutable::Discard);
    /// assert_eq!(AmqpConfig::default().unroutable, Unroutable::Fail);
    /// ```
    pub fn with_unroutable(mut self, unroutable: Unroutable) -> Self {
        self.unroutable = unroutable;
        self
    }

    /// Sets [`single_active_consumer`](Self::single_active_consumer).
    ///
    /// ```
    /// use switchboard::transport::amqp::AmqpConfig;
    ///
    /// let config = AmqpConfig::default().with_single_active_consumer(true);
    /// assert!(config.single_active_consumer);
    /// assert!(!AmqpConfig::default().single_active_consumer);
    /// ```
    pub fn with_single_active_consumer(mut self, yes: bool) -> Self {
        self.single_active_consumer = yes;
        self
    }

    /// Sets [`lag_every`](Self::lag_every).
    pub fn with_lag_every(mut self, every: Duration) -> Self {
        self.lag_every = every;
        self
    }

    /// Sets [`exchange`](Self::exchange).
    pub fn with_exchange(mut self, exchange: impl Into<String>) -> Self {
        self.exchange = exchange.into();
        self
    }

    /// Sets [`exchange_auto_delete`](Self::exchange_auto_delete).
    pub fn with_exchange_auto_delete(mut self, yes: bool) -> Self {
        self.exchange_auto_delete = yes;
        self
    }

    /// Sets [`queue_type`](Self::queue_type).
    pub fn with_queue_type(mut self, queue_type: QueueType) -> Self {
        self.queue_type = queue_type;
        self
    }

    /// Sets [`queue_expires`](Self::queue_expires).
    pub fn with_queue_expires(mut self, expires: Duration) -> Self {
        self.queue_expires = Some(expires);
        self
    }

    /// Sets [`publish_window`](Self::publish_window).
    pub fn with_publish_window(mut self, window: usize) -> Self {
        self.publish_window = window;
        self
    }

    /// Sets [`publish_timeout`](Self::publish_timeout).
    pub fn with_publish_timeout(mut self, timeout: Duration) -> Self {
        self.publish_timeout = timeout;
        self
    }

    /// Sets [`heartbeat`](Self::heartbeat) (whole seconds, at least one).
    pub fn with_heartbeat(mut self, heartbeat: Duration) -> Self {
        self.heartbeat = heartbeat;
        self
    }

    /// Sets [`connect_timeout`](Self::connect_timeout).
    ///
    /// ```
    /// use std::time::Duration;
    /// use switchboard::transport::amqp::AmqpConfig;
    ///
    /// let config = AmqpConfig::default().with_connect_timeout(Duration::from_secs(2));
    /// assert_eq!(config.connect_timeout, Duration::from_secs(2));
    /// ```
    pub fn with_connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// Sets [`reconnect_delay`](Self::reconnect_delay).
    pub fn with_reconnect_delay(mut self, first: Duration, longest: Duration) -> Self {
        self.reconnect_delay = (first, longest);
        self
    }

    /// The queue of `group` for `topic`: `<exchange>.<topic>.<group>`. Its
    /// dead-letter queue is that name with `.dlq` appended; both must fit
    /// AMQP's 255-byte limit.
    pub fn queue_name(&self, topic: &str, group: &str) -> Result<String, Error> {
        let name = format!("{}.{topic}.{group}", self.exchange);
        if name.len() + DLQ_SUFFIX.len() > 255 {
            return Err(Error::new(
                ErrorKind::Rejected,
                format!(
                    "queue name {name:?} is too long: exchange, topic and group together \
                     must leave room for {DLQ_SUFFIX:?} within 255 bytes"
                ),
            ));
        }
        Ok(name)
    }

    pub(super) fn validate(&self) -> Result<(), Error> {
        let config = |message: String| Error::new(ErrorKind::Config, message);
        if self.node_uris().any(|uri| uri.trim().is_empty()) {
            return Err(config("amqp: every node needs a URI".into()));
        }
        validate_name("exchange", &self.exchange)
            .map_err(|error| config(format!("amqp: {}", error.message())))?;
        if self.publish_window == 0 {
            return Err(config("amqp: publish_window must be at least 1".into()));
        }
        if self.lag_every.is_zero() {
            return Err(config("amqp: lag_every must be above zero".into()));
        }
        if self.connect_timeout < Duration::from_millis(1) {
            return Err(config("amqp: connect_timeout must be at least 1 ms".into()));
        }
        if self.heartbeat < Duration::from_secs(1) {
            return Err(config("amqp: heartbeat must be at least 1 s".into()));
        }
        if self.reconnect_delay.0.is_zero() || self.reconnect_delay.1 < self.reconnect_delay.0 {
            return Err(config(
                "amqp: reconnect_delay must be (first > 0, longest >= first)".into(),
            ));
        }
        if cfg!(not(feature = "amqp-tls"))
            && (self.tls_ca_pem.is_some()
                || self
                    .node_uris()
                    .any(|uri| uri.trim_start().starts_with("amqps:")))
        {
            return Err(config(
                "amqp: TLS (an amqps:// URI or tls_ca_pem) needs the `amqp-tls` feature".into(),
            ));
        }
        Ok(())
    }
}

/// Leaves the password out of the URI.
impl fmt::Debug for AmqpConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AmqpConfig")
            .field("uri", &redact(&self.uri))
            .field(
                "nodes",
                &self.nodes.iter().map(|uri| redact(uri)).collect::<Vec<_>>(),
            )
            .field("exchange", &self.exchange)
            .field("exchange_auto_delete", &self.exchange_auto_delete)
            .field("queue_type", &self.queue_type)
            .field("queue_expires", &self.queue_expires)
            .field("publish_window", &self.publish_window)
            .field("publish_timeout", &self.publish_timeout)
            .field("heartbeat", &self.heartbeat)
            .field("connect_timeout", &self.connect_timeout)
            .field("reconnect_delay", &self.reconnect_delay)
            .field("content_type", &self.content_type)
            .field("lag_every", &self.lag_every)
            .field("tls_ca_pem", &self.tls_ca_pem.as_ref().map(|_| "<PEM>"))
            .field("unroutable", &self.unroutable)
            .field("single_active_consumer", &self.single_active_consumer)
            .finish()
    }
}

impl Default for AmqpConfig {
    fn default() -> Self {
        Self::new("amqp://127.0.0.1:5672/%2f")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Without `amqp-tls` there is no TLS stack: say so instead of failing
    /// to connect later with a less helpful error.
    #[cfg(not(feature = "amqp-tls"))]
    #[test]
    fn tls_without_the_feature_is_a_config_error() {
        for config in [
            AmqpConfig::new("amqps://rabbit:5671/%2f"),
            AmqpConfig::default().with_tls_ca_pem("-----BEGIN CERTIFICATE-----"),
        ] {
            let error = config.validate().unwrap_err();
            assert_eq!(error.kind(), ErrorKind::Config);
            assert!(error.message().contains("amqp-tls"), "{error}");
        }
    }

    #[test]
    fn an_empty_node_list_is_a_config_error() {
        let error = AmqpConfig::new_cluster(Vec::<String>::new())
            .validate()
            .unwrap_err();
        assert_eq!(error.kind(), ErrorKind::Config);
        let error = AmqpConfig::default()
            .with_nodes([""])
            .validate()
            .unwrap_err();
        assert_eq!(error.kind(), ErrorKind::Config);
    }

    #[test]
    fn debug_hides_every_nodes_password() {
        let config = AmqpConfig::new_cluster(["amqp://a:first-pw@x", "amqp://b:second-pw@y"]);
        let debug = format!("{config:?}");
        assert!(
            !debug.contains("first-pw") && !debug.contains("second-pw"),
            "{debug}"
        );
        assert!(debug.contains("b:***@y"), "{debug}");
    }

    #[cfg(feature = "amqp-tls")]
    #[test]
    fn amqps_with_the_feature_is_valid_and_debug_hides_the_pem() {
        let config = AmqpConfig::new("amqps://rabbit:5671/%2f").with_tls_ca_pem("SECRET-PEM");
        config.validate().expect("valid");
        assert!(!format!("{config:?}").contains("SECRET-PEM"));
    }
}
