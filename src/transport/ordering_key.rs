//! What a subscription orders its messages by ([`OrderingKey`]).

use std::any::{Any, TypeId};
use std::fmt;
use std::sync::Arc;

use crate::envelope::{Event, EventEnvelope};
use crate::error::{Error, ErrorKind};

/// What the [`EventBus`](crate::EventBus) consume loop orders messages by
/// ([`SubscribeOptions::with_ordering_key`](crate::SubscribeOptions::with_ordering_key)):
/// an envelope header, or a function of the typed envelope (a `user_id`, an
/// `order_id`).
///
/// Within one subscription, messages with the same key are handled one at a
/// time, in the order the transport handed them out; messages with
/// different keys run in parallel, up to
/// [`concurrency`](crate::SubscribeOptions::concurrency). A message retried
/// after a delay (an open breaker, a duplicate still in progress) is held by
/// the subscription through its delay and handled again before any later
/// message of its key. A message without a key (the header is missing) is
/// ordered with nothing.
///
/// # Which promise holds where
///
/// Within one subscription the order above holds on every transport, as
/// far as the transport hands messages out in publish order (each does, per
/// topic, but a message that went back to the broker — a consumer crash, a
/// give-back — comes back behind later ones). Across the members of a
/// group it does not hold on competing consumers: each member takes a share
/// of a key's messages and they run side by side, and a redelivery (a
/// dead member's messages reclaimed) arrives after later entries. Where it
/// must hold for the whole group, let one member at a time consume:
///
/// | transport | within a subscription | across the members of a group |
/// |---|---|---|
/// | memory | yes | no (competing members) |
/// | Redis Streams | yes | no (competing members; `XAUTOCLAIM` hands a dead member's entries out after later ones) |
/// | RabbitMQ | yes | no; **yes** with `AmqpConfig::single_active_consumer` (feature `amqp`): the broker feeds one member at a time, and the next once it goes |
/// | Redis Pub/Sub | yes | — (every subscriber gets every message; at most once) |
/// | gRPC / HTTP push | as the receiver gets them | no (the publisher's retries can reorder) |
///
/// With a poison guard (`max_deliveries`) on a classic RabbitMQ queue, a
/// redelivered message is republished to the back of the queue to count it,
/// so at a fail-over its key's order is not kept.
/// Tested by `cargo test --all-features --test bus ordering`,
/// `--test redis_streams ordering` and `--test amqp ordering`.
/// What a retried message does to its key is on
/// [`SubscribeOptions::ordering_key`](crate::SubscribeOptions::ordering_key).
///
/// ```
/// use serde::{Deserialize, Serialize};
/// use switchboard::{Event, EventEnvelope, OrderingKey, SubscribeOptions};
///
/// #[derive(Debug, Clone, Serialize, Deserialize)]
/// struct TradeExecuted { user_id: String, quantity: i64 }
/// impl Event for TradeExecuted {
///     const TYPE: &'static str = "trade.executed";
///     const VERSION: &'static str = "1.0";
/// }
///
/// let by_user = OrderingKey::of(|trade: &EventEnvelope<TradeExecuted>| trade.payload().user_id.clone());
/// let options = SubscribeOptions::new("game").with_concurrency(16).with_ordering_key(by_user.clone());
/// assert_eq!(options.ordering_key, Some(by_user));
///
/// let trade = EventEnvelope::new("trading", TradeExecuted { user_id: "42".into(), quantity: 1 })
///     .with_header("account", "A-7");
/// assert_eq!(options.ordering_key.unwrap().key_of(&trade)?.as_deref(), Some("42"));
/// assert_eq!(OrderingKey::header("account").key_of(&trade)?.as_deref(), Some("A-7"));
/// # Ok::<(), switchboard::Error>(())
/// ```
#[derive(Clone)]
pub struct OrderingKey {
    by: By,
}

type KeyFn = dyn Fn(&dyn Any) -> String + Send + Sync;

#[derive(Clone)]
enum By {
    Header(Arc<str>),
    Function {
        event: TypeId,
        event_name: &'static str,
        key: Arc<KeyFn>,
    },
}

impl OrderingKey {
    /// Orders by the envelope header `name` (see
    /// [`EventEnvelope::with_header`]); a message without it is ordered with
    /// nothing.
    pub fn header(name: impl Into<String>) -> Self {
        Self {
            by: By::Header(name.into().into()),
        }
    }

    /// Orders by `key` of the typed envelope, such as its payload's
    /// `user_id`. A subscription to another event type than `E` is refused
    /// with [`ErrorKind::Config`].
    pub fn of<E, K, F>(key: F) -> Self
    where
        E: Event,
        K: fmt::Display,
        F: Fn(&EventEnvelope<E>) -> K + Send + Sync + 'static,
    {
        let key = move |envelope: &dyn Any| match envelope.downcast_ref::<EventEnvelope<E>>() {
            Some(envelope) => key(envelope).to_string(),
            // `key_of` checks the type first.
            None => String::new(),
        };
        Self {
            by: By::Function {
                event: TypeId::of::<E>(),
                event_name: std::any::type_name::<E>(),
                key: Arc::new(key),
            },
        }
    }

    /// The key of `envelope`: `None` when it has none (the header is
    /// missing). A function of another event type than `E` is an error of
    /// kind [`ErrorKind::Config`].
    pub fn key_of<E: Event>(&self, envelope: &EventEnvelope<E>) -> Result<Option<String>, Error> {
        self.check::<E>()?;
        Ok(match &self.by {
            By::Header(name) => envelope.headers().get(&**name).cloned(),
            By::Function { key, .. } => Some(key(envelope)),
        })
    }

    /// Refuses a function of another event type than `E`.
    pub(crate) fn check<E: Event>(&self) -> Result<(), Error> {
        match &self.by {
            By::Function {
                event, event_name, ..
            } if *event != TypeId::of::<E>() => Err(Error::new(
                ErrorKind::Config,
                format!(
                    "the ordering key is a function of {event_name}, but the subscription consumes {}",
                    std::any::type_name::<E>()
                ),
            )),
            _ => Ok(()),
        }
    }
}

impl PartialEq for OrderingKey {
    /// Headers by name; functions by identity (a clone is equal).
    fn eq(&self, other: &Self) -> bool {
        match (&self.by, &other.by) {
            (By::Header(a), By::Header(b)) => a == b,
            (By::Function { key: a, .. }, By::Function { key: b, .. }) => Arc::ptr_eq(a, b),
            _ => false,
        }
    }
}

impl Eq for OrderingKey {}

impl fmt::Debug for OrderingKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.by {
            By::Header(name) => f.debug_tuple("OrderingKey::header").field(name).finish(),
            By::Function { event_name, .. } => {
                f.debug_tuple("OrderingKey::of").field(event_name).finish()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use serde::{Deserialize, Serialize};

    use super::*;

    #[derive(Debug, Serialize, Deserialize)]
    struct A {
        user: u64,
    }
    impl Event for A {
        const TYPE: &'static str = "a";
        const VERSION: &'static str = "1.0";
    }
    #[derive(Debug, Serialize, Deserialize)]
    struct B;
    impl Event for B {
        const TYPE: &'static str = "b";
        const VERSION: &'static str = "1.0";
    }

    #[test]
    fn a_function_of_another_event_is_refused() {
        let key = OrderingKey::of(|envelope: &EventEnvelope<A>| envelope.payload().user);
        let a = EventEnvelope::new("s", A { user: 7 });
        assert_eq!(key.key_of(&a).unwrap().as_deref(), Some("7"));
        let error = key.key_of(&EventEnvelope::new("s", B)).unwrap_err();
        assert_eq!(error.kind(), ErrorKind::Config);
        assert!(error.to_string().contains("ordering key"), "{error}");
        assert!(OrderingKey::header("x").check::<B>().is_ok());
        assert_eq!(key.clone(), key);
        assert_ne!(key, OrderingKey::of(|_: &EventEnvelope<A>| 1));
        assert!(format!("{key:?}").contains("OrderingKey::of"));
    }
}
