use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use pin_project_lite::pin_project;

use super::{DeadLetterAlert, give_up};
use crate::bus::Message;
use crate::error::Error;

pin_project! {
    /// The response future of [`DeadLettering`](super::DeadLettering).
    #[derive(Debug)]
    pub struct ResponseFuture<F, E> {
        #[pin]
        future: F,
        message: Option<Message<E>>,
        alert: Arc<dyn DeadLetterAlert>,
    }
}

impl<F, E> ResponseFuture<F, E> {
    pub(super) fn new(future: F, message: Message<E>, alert: Arc<dyn DeadLetterAlert>) -> Self {
        Self {
            future,
            message: Some(message),
            alert,
        }
    }
}

impl<F, Err, E> Future for ResponseFuture<F, E>
where
    F: Future<Output = Result<(), Err>>,
    Err: Into<Error>,
{
    type Output = Result<(), Error>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let result = ready!(this.future.poll(cx));
        let message = this
            .message
            .take()
            .expect("dead-lettering future polled after completion");
        Poll::Ready(result.map_err(|error| give_up(&message, error.into(), this.alert.clone())))
    }
}
