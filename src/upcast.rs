//! Schema evolution: upcasters turn the payload of an older major version
//! of an event into the next one, so a consumer built for the new major
//! reads what producers on the old one still send.
//!
//! A step is registered per event type and major version it reads, and
//! names the version it writes (a later major). Steps chain: with `1 → 2`
//! and `2 → 3` registered, a consumer of version 3 reads a `1.x` envelope
//! through both. The envelope keeps its id, time, source and headers; its
//! version becomes the last step's. Without a path to the consumer's major,
//! decoding fails with [`DecodeError::UnsupportedVersion`] as before, and
//! the bus gives the message back to the group for a member that reads it
//! (see `SubscribeOptions::give_back_limit`). A step that fails is
//! [`DecodeError::UpcastFailed`]: the message is dead-lettered, not
//! retried — the data, not the consumer, is at fault.
//!
//! ```
//! use serde::{Deserialize, Serialize};
//! use serde_json::json;
//! use switchboard::{Codec, Event, EventEnvelope, Upcasters};
//!
//! /// Version 2 splits the price into units and currency.
//! #[derive(Debug, PartialEq, Serialize, Deserialize)]
//! struct TradeExecuted {
//!     order_id: String,
//!     price_cents: u64,
//!     currency: String,
//! }
//! impl Event for TradeExecuted {
//!     const TYPE: &'static str = "trade.executed";
//!     const VERSION: &'static str = "2.0";
//! }
//!
//! let upcasters = Upcasters::new().with::<TradeExecuted>(1, |mut payload| {
//!     let price = payload["price"].as_f64().ok_or("price is not a number")?;
//!     payload["price_cents"] = json!((price * 100.0).round() as u64);
//!     payload["currency"] = json!("USD");
//!     Ok(payload)
//! })?;
//! let codec = Codec::default().with_upcasters(upcasters);
//!
//! let old = EventEnvelope::untyped("trade.executed", "1.0", "trading", json!({"order_id": "7", "price": 150.25}));
//! let bytes = Codec::default().encode(&old)?;
//! let new = codec.decode::<TradeExecuted>(&bytes)?;
//! assert_eq!(new.payload().price_cents, 15025);
//! assert_eq!(new.version(), "2.0");
//! assert_eq!(new.event_id(), old.event_id());
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

use serde_json::Value;

use crate::codec::DecodeError;
use crate::envelope::{Event, EventEnvelope, major_version};
use crate::error::{Error, ErrorKind};

type UpcastFn = dyn Fn(Value) -> Result<Value, String> + Send + Sync;

/// One step: a payload of one major version becomes one of a later major.
#[derive(Clone)]
struct Step {
    to_version: String,
    to_major: u64,
    upcast: Arc<UpcastFn>,
}

/// The registered upcasters, by event type and the major version each step
/// reads; see the [module docs](self). Clones share them.
#[derive(Clone, Default)]
pub struct Upcasters {
    steps: Arc<HashMap<(String, u64), Step>>,
}

impl Upcasters {
    /// No upcasters.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a step: payloads of `event_type` at major `from_major` become
    /// payloads of `to_version` through `upcast`. `to_version` must be
    /// `MAJOR.MINOR` of a later major, and each (type, major) has one step.
    ///
    /// # Errors
    ///
    /// [`ErrorKind::Config`] naming the bad step.
    pub fn with_step(
        mut self,
        event_type: impl Into<String>,
        from_major: u64,
        to_version: impl Into<String>,
        upcast: impl Fn(Value) -> Result<Value, String> + Send + Sync + 'static,
    ) -> Result<Self, Error> {
        let (event_type, to_version) = (event_type.into(), to_version.into());
        let bad = |why: String| {
            Err(Error::new(
                ErrorKind::Config,
                format!("upcaster for {event_type} {from_major}.x: {why}"),
            ))
        };
        let Some(to_major) = major_version(&to_version) else {
            return bad(format!("{to_version:?} is not MAJOR.MINOR"));
        };
        if to_major <= from_major {
            return bad(format!("{to_version} is not a later major version"));
        }
        let key = (event_type.clone(), from_major);
        if self.steps.contains_key(&key) {
            return bad("a step from this version is already registered".to_owned());
        }
        let step = Step {
            to_version,
            to_major,
            upcast: Arc::new(upcast),
        };
        Arc::make_mut(&mut self.steps).insert(key, step);
        Ok(self)
    }

    /// Adds the step that ends at `E`: payloads of [`Event::TYPE`] at major
    /// `from_major` become payloads of [`Event::VERSION`].
    ///
    /// # Errors
    ///
    /// As [`with_step`](Self::with_step).
    pub fn with<E: Event>(
        self,
        from_major: u64,
        upcast: impl Fn(Value) -> Result<Value, String> + Send + Sync + 'static,
    ) -> Result<Self, Error> {
        self.with_step(E::TYPE, from_major, E::VERSION, upcast)
    }

    /// Whether no step is registered.
    pub fn is_empty(&self) -> bool {
        self.steps.is_empty()
    }

    /// Whether a chain of steps leads `event_type` from `version` to the
    /// major `to_major`.
    pub fn can_upcast(&self, event_type: &str, version: &str, to_major: u64) -> bool {
        let Some(mut major) = major_version(version) else {
            return false;
        };
        // Each step raises the major, so the walk ends.
        while major < to_major {
            match self.steps.get(&(event_type.to_owned(), major)) {
                Some(step) => major = step.to_major,
                None => return false,
            }
        }
        major == to_major
    }

    /// `envelope` upcast step by step to the major `to_major`: `Ok(None)`
    /// when no chain leads there, [`DecodeError::UpcastFailed`] when a step
    /// refuses the payload.
    pub fn upcast(
        &self,
        envelope: EventEnvelope<Value>,
        to_major: u64,
    ) -> Result<Option<EventEnvelope<Value>>, DecodeError> {
        if !self.can_upcast(envelope.event_type(), envelope.version(), to_major) {
            return Ok(None);
        }
        let event_type = envelope.event_type().to_owned();
        let mut envelope = envelope;
        while let Some(major) = major_version(envelope.version()).filter(|major| *major < to_major)
        {
            let step = &self.steps[&(event_type.clone(), major)];
            envelope = envelope
                .upcast_payload(&step.to_version, &*step.upcast)
                .map_err(|reason| DecodeError::UpcastFailed {
                    event_type: event_type.clone(),
                    from_major: major,
                    to_version: step.to_version.clone(),
                    // It may quote the payload: cut like every decode error.
                    reason: crate::codec::quoted(&reason),
                })?;
        }
        Ok(Some(envelope))
    }
}

impl fmt::Debug for Upcasters {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut steps: Vec<String> = self
            .steps
            .iter()
            .map(|((event_type, from), step)| {
                format!("{event_type} {from}.x → {}", step.to_version)
            })
            .collect();
        steps.sort();
        f.debug_struct("Upcasters").field("steps", &steps).finish()
    }
}
