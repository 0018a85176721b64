//! Handlers from async functions, with their error type fixed so that
//! `Ok(())` needs no annotation.

use std::fmt;
use std::future::Future;
use std::marker::PhantomData;
use std::task::{Context, Poll};

use futures_util::TryFutureExt;
use futures_util::future::MapErr;
use tower::Service;

use super::Message;
use crate::error::{BoxError, Error};

/// A handler made from an async function that returns
/// `Result<(), switchboard::Error>`: see [`handler_fn`].
pub struct HandlerFn<F, E> {
    f: F,
    _event: PhantomData<fn(Message<E>)>,
}

/// A handler made from an async function whose error is any error type
/// that can be boxed: see [`handler_fn_boxed`].
pub struct BoxedHandlerFn<F, E> {
    f: F,
    _event: PhantomData<fn(Message<E>)>,
}

/// Makes a handler of `f`, an async function from a [`Message`] to
/// `Result<(), Error>`.
///
/// The error type is fixed, so the closure's `Ok(())` needs no turbofish
/// (`tower::service_fn` leaves it open and the compiler asks for one,
/// E0282). A handler with another error type — `anyhow::Error`,
/// `Box<dyn Error>`, `std::io::Error` — takes [`handler_fn_boxed`].
///
/// ```
/// use std::sync::Arc;
/// use serde::{Deserialize, Serialize};
/// use switchboard::{handler_fn, Event, EventBus, Message, MemoryTransport, SubscribeOptions};
///
/// #[derive(Debug, Clone, Serialize, Deserialize)]
/// struct OrderPlaced { order_id: String }
/// impl Event for OrderPlaced {
///     const TYPE: &'static str = "order.placed";
///     const VERSION: &'static str = "1.0";
/// }
///
/// # tokio::runtime::Runtime::new().unwrap().block_on(async {
/// let bus = EventBus::new(Arc::new(MemoryTransport::new()), "orders");
/// let (seen, mut rx) = tokio::sync::mpsc::unbounded_channel();
/// let consumer = bus
///     .subscribe(
///         SubscribeOptions::new("shipping"),
///         handler_fn(move |message: Message<OrderPlaced>| {
///             let seen = seen.clone();
///             async move {
///                 seen.send(message.payload().order_id.clone()).ok();
///                 Ok(())
///             }
///         }),
///     )
///     .await?;
/// bus.publish(OrderPlaced { order_id: "A-17".into() }).await?;
/// assert_eq!(rx.recv().await.as_deref(), Some("A-17"));
/// consumer.shutdown().await?;
/// # Ok::<(), switchboard::Error>(())
/// # }).unwrap();
/// ```
pub fn handler_fn<E, F, Fut>(f: F) -> HandlerFn<F, E>
where
    F: FnMut(Message<E>) -> Fut,
    Fut: Future<Output = Result<(), Error>>,
{
    HandlerFn {
        f,
        _event: PhantomData,
    }
}

/// Makes a handler of `f`, an async function whose error is any type that
/// boxes into `Box<dyn std::error::Error + Send + Sync>`: `anyhow::Error`,
/// `Box<dyn Error + Send + Sync>`, `std::io::Error`, a `thiserror` enum.
///
/// The error becomes an [`Error`] as [`From<BoxError>`](Error#impl-From<BoxError>-for-Error)
/// says: a switchboard [`Error`] anywhere in its source chain (an
/// `anyhow` context around `Error::permanent(..)`, say) gives its kind, so
/// a refusal stays a refusal and is dead-lettered at once instead of being
/// retried; anything else is a transient failure.
///
/// ```
/// use std::sync::Arc;
/// use serde::{Deserialize, Serialize};
/// use switchboard::{handler_fn_boxed, Error, ErrorKind, Event, Message};
/// use tower::{Service, ServiceExt};
///
/// #[derive(Debug, Clone, Serialize, Deserialize)]
/// struct OrderPlaced { quantity: i64 }
/// impl Event for OrderPlaced {
///     const TYPE: &'static str = "order.placed";
///     const VERSION: &'static str = "1.0";
/// }
///
/// #[derive(Debug, thiserror::Error)]
/// #[error("cannot ship order")]
/// struct CannotShip(#[source] Error);
///
/// # tokio::runtime::Runtime::new().unwrap().block_on(async {
/// let mut handler = handler_fn_boxed(|message: Message<OrderPlaced>| async move {
///     if message.payload().quantity < 1 {
///         return Err(CannotShip(Error::permanent("quantity must be positive")));
///     }
///     Ok(())
/// });
/// let message = Message::new(
///     switchboard::EventEnvelope::new("orders", OrderPlaced { quantity: 0 }),
///     "order.placed",
///     "shipping",
///     1,
/// );
/// let error = handler.ready().await?.call(message).await.unwrap_err();
/// // The crate error inside keeps its kind: not retried, dead-lettered.
/// assert_eq!(error.kind(), ErrorKind::Rejected);
/// assert_eq!(error.message(), "cannot ship order");
/// # Ok::<(), Error>(())
/// # }).unwrap();
/// ```
pub fn handler_fn_boxed<E, F, Fut, Er>(f: F) -> BoxedHandlerFn<F, E>
where
    F: FnMut(Message<E>) -> Fut,
    Fut: Future<Output = Result<(), Er>>,
    Er: Into<BoxError>,
{
    BoxedHandlerFn {
        f,
        _event: PhantomData,
    }
}

impl<E, F, Fut> Service<Message<E>> for HandlerFn<F, E>
where
    F: FnMut(Message<E>) -> Fut,
    Fut: Future<Output = Result<(), Error>>,
{
    type Response = ();
    type Error = Error;
    type Future = Fut;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, message: Message<E>) -> Fut {
        (self.f)(message)
    }
}

impl<E, F, Fut, Er> Service<Message<E>> for BoxedHandlerFn<F, E>
where
    F: FnMut(Message<E>) -> Fut,
    Fut: Future<Output = Result<(), Er>>,
    Er: Into<BoxError>,
{
    type Response = ();
    type Error = Error;
    type Future = MapErr<Fut, fn(Er) -> Error>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, message: Message<E>) -> Self::Future {
        (self.f)(message).map_err(boxed_into_error::<Er> as fn(Er) -> Error)
    }
}

fn boxed_into_error<Er: Into<BoxError>>(error: Er) -> Error {
    Error::from(error.into())
}

// Clone by hand: a derive would ask `E: Clone` of the event type, which a
// handler never holds.
impl<F: Clone, E> Clone for HandlerFn<F, E> {
    fn clone(&self) -> Self {
        Self {
            f: self.f.clone(),
            _event: PhantomData,
        }
    }
}

impl<F: Clone, E> Clone for BoxedHandlerFn<F, E> {
    fn clone(&self) -> Self {
        Self {
            f: self.f.clone(),
            _event: PhantomData,
        }
    }
}

impl<F, E> fmt::Debug for HandlerFn<F, E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HandlerFn")
            .field("event", &std::any::type_name::<E>())
            .finish_non_exhaustive()
    }
}

impl<F, E> fmt::Debug for BoxedHandlerFn<F, E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BoxedHandlerFn")
            .field("event", &std::any::type_name::<E>())
            .finish_non_exhaustive()
    }
}
