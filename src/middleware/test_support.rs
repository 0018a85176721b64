//! Shared pieces of the middleware's unit tests.

use serde::{Deserialize, Serialize};

use crate::bus::Message;
use crate::envelope::{Event, EventEnvelope};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct Ping {
    pub(crate) n: u64,
}

impl Event for Ping {
    const TYPE: &'static str = "test.ping";
    const VERSION: &'static str = "1.0";
}

/// A message as the consume loop would hand it to a handler.
pub(crate) fn message(n: u64, attempt: u32) -> Message<Ping> {
    Message::new(
        EventEnvelope::new("test", Ping { n }),
        "test.ping",
        "g",
        attempt,
    )
}
