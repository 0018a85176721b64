//! tower middleware that keeps callers and consumers alive when a dependency
//! fails (strategy §4 and §6.2–6.3).
//!
//! Each concern is one layer in tower's shape — a service, its layer, its
//! response future — so they compose with tower's own and with each other,
//! and every one decides by [`ErrorKind`](crate::ErrorKind): only
//! infrastructure failures are retried or trip a breaker; a refused request
//! is the caller's to fix.
//!
//! Their order matters, and [`Resilience`] builds the two stacks in the one
//! that works (outer to inner):
//!
//! * RPC clients: `fallback ▸ retry ▸ circuit_breaker ▸ timeout ▸ service`;
//! * consumers: `dedupe ▸ dead_letter ▸ circuit_breaker ▸ retry ▸ timeout ▸
//!   handler`, the breaker waiting while open so the consume loop stops
//!   pulling ([`Resilience::consumer`] says why, and what it implies).
//!
//! Every retry is safe: a request is sent again after a failure that may
//! have taken effect (a timeout, a lost answer) only if it is marked
//! idempotent, and a retry budget keeps a brownout from multiplying the
//! load ([`retry`]).

pub mod circuit_breaker;
pub mod dead_letter;
pub mod dedupe;
pub mod fallback;
pub mod retry;
pub mod timeout;

mod stack;

#[allow(deprecated)]
pub use stack::Handler;
pub use stack::{BoxClient, Client, Consumer, Resilience};

#[cfg(test)]
mod test_support;
