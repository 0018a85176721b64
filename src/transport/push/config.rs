//! Where a push transport sends each topic, and how: [`PushEndpoint`],
//! [`PushRoutes`], [`PushConfig`].

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{DEFAULT_QUEUE_CAPACITY, consumer};
use crate::config::RetryConfig;
use crate::error::{Error, ErrorKind};

/// One place to push a topic's messages to.
///
/// ```
/// use switchboard::transport::push::PushEndpoint;
///
/// let game = PushEndpoint::new("http://game:50051").for_group("game");
/// assert_eq!(game.group.as_deref(), Some("game"));
/// ```
#[non_exhaustive]
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PushEndpoint {
    /// The receiver's base URL, such as `http://game:50051`.
    pub url: String,
    /// The consumer group the endpoint serves; `None` reaches every group
    /// subscribed to the topic at that receiver.
    #[serde(default)]
    pub group: Option<String>,
}

/// Leaves a password in the URL's user-info out.
impl std::fmt::Debug for PushEndpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PushEndpoint")
            .field("url", &crate::transport::redact::redact_url(&self.url))
            .field("group", &self.group)
            .finish()
    }
}

impl PushEndpoint {
    /// An endpoint for every group subscribed at `url`.
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            group: None,
        }
    }

    /// Limits the endpoint to one consumer group.
    pub fn for_group(mut self, group: impl Into<String>) -> Self {
        self.group = Some(group.into());
        self
    }
}

/// Which endpoints each topic is pushed to: one per subscribing group.
///
/// A topic without its own entry uses the `default` endpoints; a topic with
/// neither cannot be published to (an [`ErrorKind::Config`] error).
///
/// ```
/// use switchboard::transport::push::{PushEndpoint, PushRoutes};
///
/// let routes = PushRoutes::new()
///     .route("trade.executed", PushEndpoint::new("http://game:8080").for_group("game"))
///     .route("trade.executed", PushEndpoint::new("http://audit:8080").for_group("audit"))
///     .default_route(PushEndpoint::new("http://everything:8080"));
/// assert_eq!(routes.endpoints("trade.executed").len(), 2);
/// assert_eq!(routes.endpoints("price.updated")[0].url, "http://everything:8080");
/// ```
#[non_exhaustive]
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PushRoutes {
    /// Endpoints per topic.
    pub topics: BTreeMap<String, Vec<PushEndpoint>>,
    /// Endpoints for topics without an entry of their own.
    pub default: Vec<PushEndpoint>,
}

impl PushRoutes {
    /// No routes.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds an endpoint for `topic`.
    pub fn route(mut self, topic: impl Into<String>, endpoint: PushEndpoint) -> Self {
        self.topics.entry(topic.into()).or_default().push(endpoint);
        self
    }

    /// Adds an endpoint for topics without routes of their own.
    pub fn default_route(mut self, endpoint: PushEndpoint) -> Self {
        self.default.push(endpoint);
        self
    }

    /// The endpoints `topic` is pushed to (empty when there are none).
    pub fn endpoints(&self, topic: &str) -> &[PushEndpoint] {
        self.topics.get(topic).map_or(&self.default, Vec::as_slice)
    }

    /// Every distinct endpoint URL, for opening connections up front.
    pub fn urls(&self) -> impl Iterator<Item = &str> {
        let mut urls: Vec<&str> = self
            .topics
            .values()
            .flatten()
            .chain(&self.default)
            .map(|endpoint| endpoint.url.as_str())
            .collect();
        urls.sort_unstable();
        urls.dedup();
        urls.into_iter()
    }

    /// Refuses invalid topic or group names and empty URLs.
    pub fn validate(&self) -> Result<(), Error> {
        let all = self.topics.iter().flat_map(|(topic, endpoints)| {
            endpoints
                .iter()
                .map(move |endpoint| (Some(topic), endpoint))
        });
        for (topic, endpoint) in all.chain(self.default.iter().map(|endpoint| (None, endpoint))) {
            if let Some(topic) = topic {
                crate::validate_name("topic", topic).map_err(config)?;
            }
            if let Some(group) = &endpoint.group {
                crate::validate_name("group", group).map_err(config)?;
            }
            if endpoint.url.trim().is_empty() {
                return Err(Error::new(
                    ErrorKind::Config,
                    "push endpoint with an empty url",
                ));
            }
        }
        Ok(())
    }
}

fn config(error: Error) -> Error {
    Error::new(
        ErrorKind::Config,
        format!("push routes: {}", error.message()),
    )
}

/// How a push transport sends and receives: where to ([`PushRoutes`]), how
/// often to try, how long to wait for a handler, the largest body, and how
/// many pushes its receiver keeps waiting for a handler.
///
/// From YAML (every key optional; the values shown are the defaults, with an
/// example route):
///
/// ```
/// use switchboard::transport::push::PushConfig;
///
/// let config = PushConfig::from_yaml(
///     r#"
/// routes:
///   topics:
///     trade.executed:
///       - url: http://game:50051
///         group: game
/// retry:
///   max_attempts: 3
///   backoff_ms: 100
/// timeout_ms: 30000
/// max_body_bytes: 1048576
/// "#,
/// )?;
/// assert_eq!(config.routes.endpoints("trade.executed").len(), 1);
/// # Ok::<(), switchboard::Error>(())
/// ```
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PushConfig {
    /// Where each topic is pushed.
    pub routes: PushRoutes,
    /// How often a delivery is tried when the receiver is unavailable or
    /// nacks; a nack's delay is waited for at least.
    pub retry: RetryConfig,
    /// How long one attempt waits for the receiver's answer (the handler
    /// runs before it answers), in milliseconds. A receiver whose queue is
    /// full is asked again within this time, with the same attempt number.
    pub timeout_ms: u64,
    /// How long opening a connection to a receiver may take, in
    /// milliseconds (default 5 000). A receiver that is down or does not
    /// accept fails the attempt with a retryable
    /// [`ErrorKind::Connection`] within it, and the retry policy decides
    /// what comes next. The HTTP transport applies it to the client it
    /// builds; a client given to `HttpTransport::with_client` keeps its
    /// own.
    pub connect_timeout_ms: u64,
    /// The largest body sent or accepted, in bytes (default 1 MiB, like the
    /// codec). Larger messages are refused before they are sent.
    pub max_body_bytes: usize,
    /// The receiver's side: how many pushes may wait per subscribed group
    /// for a subscription to take them (default 64, like the default
    /// prefetch). One more is refused at once with RESOURCE_EXHAUSTED / 503
    /// and a retry hint; see [the module docs](super).
    pub queue_capacity: usize,
}

impl Default for PushConfig {
    fn default() -> Self {
        Self {
            routes: PushRoutes::default(),
            retry: RetryConfig::default(),
            timeout_ms: 30_000,
            connect_timeout_ms: 5_000,
            max_body_bytes: crate::DEFAULT_MAX_SIZE,
            queue_capacity: DEFAULT_QUEUE_CAPACITY,
        }
    }
}

impl PushConfig {
    /// Defaults with these routes.
    pub fn new(routes: PushRoutes) -> Self {
        Self {
            routes,
            ..Self::default()
        }
    }

    /// Sets the retry policy.
    pub fn with_retry(mut self, retry: RetryConfig) -> Self {
        self.retry = retry;
        self
    }

    /// Sets the per-attempt timeout.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout_ms = timeout.as_millis().try_into().unwrap_or(u64::MAX);
        self
    }

    /// Sets the connect timeout (see
    /// [`connect_timeout_ms`](Self::connect_timeout_ms)).
    ///
    /// ```
    /// use std::time::Duration;
    /// use switchboard::transport::push::PushConfig;
    ///
    /// assert_eq!(PushConfig::default().connect_timeout(), Duration::from_secs(5));
    /// let config = PushConfig::default().with_connect_timeout(Duration::from_millis(300));
    /// assert_eq!(config.connect_timeout_ms, 300);
    /// ```
    pub fn with_connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout_ms = timeout.as_millis().try_into().unwrap_or(u64::MAX);
        self
    }

    /// Replaces the routes.
    pub fn with_routes(mut self, routes: PushRoutes) -> Self {
        self.routes = routes;
        self
    }

    /// Sets the largest body.
    pub fn with_max_body_bytes(mut self, limit: usize) -> Self {
        self.max_body_bytes = limit;
        self
    }

    /// Sets how many pushes the receiver keeps waiting per group.
    ///
    /// ```
    /// use switchboard::ErrorKind;
    /// use switchboard::transport::push::PushConfig;
    ///
    /// let config = PushConfig::default().with_queue_capacity(8);
    /// assert_eq!(config.queue_capacity, 8);
    /// let error = PushConfig::default().with_queue_capacity(0).validate().unwrap_err();
    /// assert_eq!(error.kind(), ErrorKind::Config);
    /// ```
    pub fn with_queue_capacity(mut self, capacity: usize) -> Self {
        self.queue_capacity = capacity;
        self
    }

    /// The per-attempt timeout.
    pub fn timeout(&self) -> Duration {
        Duration::from_millis(self.timeout_ms)
    }

    /// The connect timeout.
    pub fn connect_timeout(&self) -> Duration {
        Duration::from_millis(self.connect_timeout_ms)
    }

    /// Parses and validates YAML; see the type's docs for the keys.
    pub fn from_yaml(text: &str) -> Result<Self, Error> {
        let config: Self = if text.trim().is_empty() {
            Self::default()
        } else {
            serde_norway::from_str(text)
                .map_err(|error| Error::new(ErrorKind::Config, format!("push config: {error}")))?
        };
        config.validate()?;
        Ok(config)
    }

    /// Checks routes, retry policy, timeout, body limit and queue capacity.
    pub fn validate(&self) -> Result<(), Error> {
        self.routes.validate()?;
        self.retry.validate()?;
        if self.timeout_ms == 0 || self.connect_timeout_ms == 0 || self.max_body_bytes == 0 {
            return Err(Error::new(
                ErrorKind::Config,
                "push config: timeout_ms, connect_timeout_ms and max_body_bytes must be at least 1",
            ));
        }
        consumer::validate_capacity(self.queue_capacity)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topic_routes_win_over_the_default() {
        let routes = PushRoutes::new()
            .route("a", PushEndpoint::new("http://a"))
            .default_route(PushEndpoint::new("http://d"));
        assert_eq!(routes.endpoints("a")[0].url, "http://a");
        assert_eq!(routes.endpoints("b")[0].url, "http://d");
        assert!(PushRoutes::new().endpoints("a").is_empty());
        assert_eq!(routes.urls().collect::<Vec<_>>(), ["http://a", "http://d"]);
    }

    #[test]
    fn bad_config_is_refused_naming_the_problem() {
        let bad_group = PushRoutes::new().route("a", PushEndpoint::new("http://a").for_group(""));
        assert_eq!(bad_group.validate().unwrap_err().kind(), ErrorKind::Config);
        let error = PushConfig::from_yaml("routs: {}").unwrap_err();
        assert_eq!(error.kind(), ErrorKind::Config);
        assert!(error.message().contains("routs"), "{error}");
        let error = PushConfig::from_yaml("timeout_ms: 0").unwrap_err();
        assert!(error.message().contains("timeout_ms"), "{error}");
        let error = PushConfig::from_yaml("connect_timeout_ms: 0").unwrap_err();
        assert!(error.message().contains("connect_timeout_ms"), "{error}");
        let error = PushConfig::from_yaml("queue_capacity: 0").unwrap_err();
        assert_eq!(error.kind(), ErrorKind::Config);
        assert!(error.message().contains("queue_capacity"), "{error}");
        assert_eq!(PushConfig::from_yaml("").unwrap(), PushConfig::default());
    }
}
