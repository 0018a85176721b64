//! Batch handlers from async functions ([`batch_fn`]).

use std::fmt;
use std::future::Future;
use std::marker::PhantomData;
use std::task::{Context, Poll};

use tower::Service;

use crate::bus::Message;
use crate::error::Error;

/// A batch handler made from an async function: see [`batch_fn`].
pub struct BatchFn<F, E> {
    f: F,
    _event: PhantomData<fn(Vec<Message<E>>)>,
}

/// Makes a batch handler of `f`, an async function from the messages of a
/// batch to one result per message, in the same order (`Ok` acks, an error
/// is mapped by [`Outcome::of`](crate::Outcome::of) as a single handler's
/// would be). For [`EventBus::subscribe_batch`](crate::EventBus::subscribe_batch).
///
/// ```
/// use serde::{Deserialize, Serialize};
/// use switchboard::{batch_fn, Error, Event, EventEnvelope, Message};
/// use tower::{Service, ServiceExt};
///
/// #[derive(Debug, Clone, Serialize, Deserialize)]
/// struct TradeExecuted { quantity: i64 }
/// impl Event for TradeExecuted {
///     const TYPE: &'static str = "trade.executed";
///     const VERSION: &'static str = "1.0";
/// }
///
/// # tokio::runtime::Runtime::new().unwrap().block_on(async {
/// let mut handler = batch_fn(|trades: Vec<Message<TradeExecuted>>| async move {
///     trades
///         .iter()
///         .map(|trade| match trade.payload().quantity {
///             0 => Err(Error::permanent("empty trade")),
///             _ => Ok(()),
///         })
///         .collect()
/// });
/// let batch = [3, 0]
///     .map(|quantity| Message::new(EventEnvelope::new("trading", TradeExecuted { quantity }), "trade.executed", "game", 1))
///     .to_vec();
/// let results = handler.ready().await?.call(batch).await?;
/// assert!(results[0].is_ok() && results[1].is_err());
/// # Ok::<(), Error>(())
/// # }).unwrap();
/// ```
pub fn batch_fn<E, F, Fut>(f: F) -> BatchFn<F, E>
where
    F: FnMut(Vec<Message<E>>) -> Fut,
    Fut: Future<Output = Vec<Result<(), Error>>>,
{
    BatchFn {
        f,
        _event: PhantomData,
    }
}

impl<E, F, Fut> Service<Vec<Message<E>>> for BatchFn<F, E>
where
    F: FnMut(Vec<Message<E>>) -> Fut,
    Fut: Future<Output = Vec<Result<(), Error>>>,
{
    type Response = Vec<Result<(), Error>>;
    type Error = Error;
    type Future = futures_util::future::Map<Fut, fn(Vec<Result<(), Error>>) -> BatchResult>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, messages: Vec<Message<E>>) -> Self::Future {
        use futures_util::FutureExt;
        (self.f)(messages).map(Ok as fn(Vec<Result<(), Error>>) -> BatchResult)
    }
}

type BatchResult = Result<Vec<Result<(), Error>>, Error>;

// Clone by hand: a derive would ask `E: Clone` of the event type.
impl<F: Clone, E> Clone for BatchFn<F, E> {
    fn clone(&self) -> Self {
        Self {
            f: self.f.clone(),
            _event: PhantomData,
        }
    }
}

impl<F, E> fmt::Debug for BatchFn<F, E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BatchFn")
            .field("event", &std::any::type_name::<E>())
            .finish_non_exhaustive()
    }
}
