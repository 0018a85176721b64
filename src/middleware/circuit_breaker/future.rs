use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use pin_project_lite::pin_project;

use super::state::{Outcome, Permit, Recorded, Shared};
use crate::error::Error;

pin_project! {
    /// The response future of [`CircuitBreaker`](super::CircuitBreaker):
    /// either the inner call, whose outcome it reports to the breaker, or
    /// the error of an open breaker.
    pub struct ResponseFuture<F> {
        #[pin]
        kind: Kind<F>,
    }
}

pin_project! {
    #[project = KindProj]
    enum Kind<F> {
        Called {
            #[pin]
            future: F,
            permit: PermitGuard,
            // Whether a failure during a known outage asks to be requeued.
            requeue_in_outage: bool,
        },
        Rejected {
            error: Option<Error>,
        },
    }
}

impl<F> ResponseFuture<F> {
    pub(super) fn called(
        future: F,
        shared: Arc<Shared>,
        permit: Permit,
        requeue_in_outage: bool,
    ) -> Self {
        Self {
            kind: Kind::Called {
                future,
                permit: PermitGuard {
                    shared,
                    permit: Some(permit),
                },
                requeue_in_outage,
            },
        }
    }

    pub(super) fn rejected(error: Error) -> Self {
        Self {
            kind: Kind::Rejected { error: Some(error) },
        }
    }
}

impl<F, T, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<T, E>>,
    E: Into<Error>,
{
    type Output = Result<T, Error>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().kind.project() {
            KindProj::Called {
                future,
                permit,
                requeue_in_outage,
            } => {
                let result = ready!(future.poll(cx)).map_err(Into::into);
                let recorded = permit.finish(Outcome::of(&result));
                Poll::Ready(match (result, recorded) {
                    // The message did nothing wrong: the dependency is known
                    // to be down, so it goes back for the next trial call.
                    (Err(error), Some(Recorded::Outage(until_probe)))
                        if *requeue_in_outage && error.requeue_after().is_none() =>
                    {
                        Err(error.with_requeue(until_probe))
                    }
                    (result, _) => result,
                })
            }
            KindProj::Rejected { error } => Poll::Ready(Err(error
                .take()
                .expect("circuit breaker future polled after completion"))),
        }
    }
}

impl<F> fmt::Debug for ResponseFuture<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match &self.kind {
            Kind::Called { .. } => "called",
            Kind::Rejected { .. } => "rejected",
        };
        f.debug_struct("ResponseFuture")
            .field("kind", &kind)
            .finish()
    }
}

/// Reports a permitted call's outcome once; a call dropped unfinished (its
/// caller gave up) hands back its permit instead, so a trial call that
/// never ends cannot hold a half-open breaker forever.
struct PermitGuard {
    shared: Arc<Shared>,
    permit: Option<Permit>,
}

impl PermitGuard {
    fn finish(&mut self, outcome: Outcome) -> Option<Recorded> {
        let permit = self.permit.take()?;
        Some(self.shared.record(permit, outcome))
    }
}

impl Drop for PermitGuard {
    fn drop(&mut self) {
        if let Some(permit) = self.permit.take() {
            self.shared.abandon(permit);
        }
    }
}
