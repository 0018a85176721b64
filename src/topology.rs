//! Which consumer groups subscribe to which topics, declared at start-up.
//!
//! A queue or a stream group that does not exist yet cannot keep a message
//! for its future consumer: RabbitMQ drops what no queue is bound for, and a
//! Redis consumer group created after a publish starts after it. Declaring
//! the whole [`Topology`] before the first publish — from code or from the
//! event catalogue in a config file — closes that gap.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::envelope::Event;
use crate::error::{Error, ErrorKind};

/// Topics and the consumer groups that subscribe to each.
///
/// From code:
///
/// ```
/// use switchboard::Topology;
///
/// let topology = Topology::new()
///     .with_groups("trade.executed", ["game", "market"])
///     .with_groups("holding.changed", [] as [&str; 0]);
/// assert_eq!(topology.groups("trade.executed").collect::<Vec<_>>(), ["game", "market"]);
/// ```
///
/// From YAML, one line per event type (SPEC §5.2's catalogue):
///
/// ```
/// use switchboard::Topology;
///
/// let topology = Topology::from_yaml("
/// trade.executed: [game, market]
/// order.created: [market]
/// user.registered: [game]
/// price.updated: [trading, game]
/// holding.changed: []
/// ")?;
/// assert_eq!(topology.groups("price.updated").count(), 2);
/// # Ok::<(), switchboard::Error>(())
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Topology {
    topics: BTreeMap<String, BTreeSet<String>>,
}

impl Topology {
    /// An empty topology.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `topic` with these groups (more groups may be added later).
    pub fn with_groups<G>(mut self, topic: impl Into<String>, groups: G) -> Self
    where
        G: IntoIterator,
        G::Item: Into<String>,
    {
        self.topics
            .entry(topic.into())
            .or_default()
            .extend(groups.into_iter().map(Into::into));
        self
    }

    /// Adds the topic of event type `E` (its [`Event::TYPE`]) with these groups.
    pub fn with_event<E: Event, G>(self, groups: G) -> Self
    where
        G: IntoIterator,
        G::Item: Into<String>,
    {
        self.with_groups(E::TYPE, groups)
    }

    /// Parses the YAML form (`topic: [group, ...]`) and validates it.
    pub fn from_yaml(text: &str) -> Result<Self, Error> {
        let topology: Self = serde_norway::from_str(text).map_err(|error| {
            Error::new(ErrorKind::Config, format!("topology: {error}")).with_source(error)
        })?;
        topology.validate().map_err(|error| {
            Error::new(ErrorKind::Config, format!("topology: {}", error.message()))
        })?;
        Ok(topology)
    }

    /// Refuses topic and group names that some transport could not use.
    pub fn validate(&self) -> Result<(), Error> {
        for (topic, groups) in &self.topics {
            validate_name("topic", topic)?;
            for group in groups {
                validate_name("group", group)?;
            }
        }
        Ok(())
    }

    /// The topics, in name order.
    pub fn topics(&self) -> impl Iterator<Item = &str> {
        self.topics.keys().map(String::as_str)
    }

    /// The groups subscribing to `topic`, in name order (none when unknown).
    pub fn groups(&self, topic: &str) -> impl Iterator<Item = &str> {
        self.topics
            .get(topic)
            .into_iter()
            .flatten()
            .map(String::as_str)
    }

    /// Every `(topic, group)` pair.
    pub fn subscriptions(&self) -> impl Iterator<Item = (&str, &str)> {
        self.topics.iter().flat_map(|(topic, groups)| {
            groups
                .iter()
                .map(move |group| (topic.as_str(), group.as_str()))
        })
    }

    /// The same topology with every topic put under `namespace`
    /// (`<namespace>.<topic>`), as [`EventBus::with_namespace`](crate::EventBus::with_namespace) does.
    pub fn namespaced(&self, namespace: &str) -> Self {
        let topics = self
            .topics
            .iter()
            .map(|(topic, groups)| (format!("{namespace}.{topic}"), groups.clone()))
            .collect();
        Self { topics }
    }

    /// Whether nothing is declared.
    pub fn is_empty(&self) -> bool {
        self.topics.is_empty()
    }
}

/// Checks a topic or group name: 1 to 255 bytes of ASCII letters, digits and
/// `. _ - :`. Every transport can use such a name as a stream key, routing
/// key, queue name or URL path segment without escaping.
///
/// ```
/// use switchboard::validate_name;
///
/// assert!(validate_name("topic", "trade.executed").is_ok());
/// assert!(validate_name("topic", "").is_err());
/// assert!(validate_name("topic", "trade executed").is_err());
/// ```
pub fn validate_name(what: &str, name: &str) -> Result<(), Error> {
    let allowed = |b: u8| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b':');
    if name.is_empty() || name.len() > 255 || !name.bytes().all(allowed) {
        return Err(Error::new(
            ErrorKind::Rejected,
            format!("invalid {what} name {name:?}: use 1 to 255 ASCII letters, digits or . _ - :"),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn yaml_with_a_bad_name_is_refused_naming_it() {
        let error = Topology::from_yaml("trade.executed: [\"game one\"]").unwrap_err();
        assert_eq!(error.kind(), ErrorKind::Config);
        assert!(error.message().contains("\"game one\""), "{error}");
    }

    #[test]
    fn yaml_of_the_wrong_shape_is_a_config_error() {
        let error = Topology::from_yaml("trade.executed: game").unwrap_err();
        assert_eq!(error.kind(), ErrorKind::Config);
    }

    #[test]
    fn subscriptions_lists_every_pair() {
        let topology = Topology::new()
            .with_groups("a", ["x", "y"])
            .with_groups("b", ["x"]);
        let pairs: Vec<_> = topology.subscriptions().collect();
        assert_eq!(pairs, [("a", "x"), ("a", "y"), ("b", "x")]);
    }
}
