//! tower middleware that keeps callers and consumers alive when a dependency
//! fails.
//!
//! Stacks, outer to inner:
//!
//! * RPC clients: `fallback ▸ retry ▸ circuit_breaker ▸ timeout ▸ service`;
//! * consumer handlers: `dedupe ▸ dead_letter ▸ retry ▸ timeout ▸ handler`.

pub mod circuit_breaker;
pub mod dead_letter;
pub mod dedupe;
pub mod fallback;
pub mod retry;
pub mod timeout;

mod stack;

pub use stack::{Client, Handler, Resilience};

#[cfg(test)]
mod test_support;
