//! Handlers made from async functions: the error type is inferred, and an
//! `anyhow` error keeps the kind of a crate error in its chain, so a retry
//! layer retries what may pass and gives up at once on a refusal.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use anyhow::Context as _;
use switchboard::middleware::Resilience;
use switchboard::{Error, ErrorKind, Message, handler_fn, handler_fn_boxed};
use tower::{Service, ServiceExt};

use super::Ping;

fn message(n: u64) -> Message<Ping> {
    Message::new(
        switchboard::EventEnvelope::new("test", Ping { n }),
        "test.ping",
        "g",
        1,
    )
}

fn resilience() -> Resilience {
    Resilience::from_yaml(
        "retry:\n  max_attempts: 3\n  backoff_ms: 10\ntimeouts:\n  ledger: 1000\n",
    )
    .expect("valid config")
}

/// Runs `handler` behind the consumer stack and says how often it was called
/// and how the stack answered.
async fn calls_and_error<H>(handler: impl FnOnce(Arc<AtomicU32>) -> H) -> (u32, Error)
where
    H: Service<Message<Ping>, Response = (), Error = Error> + Clone + Send + 'static,
    H::Future: Send + 'static,
{
    let calls = Arc::new(AtomicU32::new(0));
    let stack = resilience().consumer("ledger", handler(calls.clone()));
    let error = stack
        .oneshot(message(1))
        .await
        .expect_err("the handler fails");
    (calls.load(Ordering::SeqCst), error)
}

#[tokio::test(start_paused = true)]
async fn an_anyhow_context_around_a_refusal_is_not_retried() {
    let (calls, error) = calls_and_error(|calls| {
        handler_fn_boxed(move |_: Message<Ping>| {
            calls.fetch_add(1, Ordering::SeqCst);
            async {
                Err::<(), _>(Error::permanent("unknown account")).context("cannot apply the credit")
            }
        })
    })
    .await;
    assert_eq!(calls, 1, "a refusal is not worth another try");
    assert_eq!(error.kind(), ErrorKind::Rejected, "{error:?}");
    assert!(
        error.to_string().contains("cannot apply the credit"),
        "{error}"
    );
}

#[tokio::test(start_paused = true)]
async fn an_anyhow_error_without_a_crate_error_is_transient_and_retried() {
    let (calls, error) = calls_and_error(|calls| {
        handler_fn_boxed(move |_: Message<Ping>| {
            calls.fetch_add(1, Ordering::SeqCst);
            async { Err::<(), _>(anyhow::anyhow!("database busy")) }
        })
    })
    .await;
    assert_eq!(calls, 3, "retried up to max_attempts");
    assert_eq!(error.kind(), ErrorKind::Unavailable, "{error:?}");
}

#[tokio::test(start_paused = true)]
async fn a_box_dyn_error_keeps_the_kind_of_the_crate_error_it_wraps() {
    let (calls, error) = calls_and_error(|calls| {
        handler_fn_boxed(move |_: Message<Ping>| {
            calls.fetch_add(1, Ordering::SeqCst);
            async {
                let refusal: Box<dyn std::error::Error + Send + Sync> =
                    Box::new(Error::new(ErrorKind::Unauthorized, "token expired"));
                Err(refusal)
            }
        })
    })
    .await;
    assert_eq!(calls, 1);
    assert_eq!(error.kind(), ErrorKind::Unauthorized);
}

#[tokio::test]
async fn a_handler_fn_infers_its_error_type() {
    // `Ok(())` with no turbofish: the error type is the crate's.
    let mut handler = handler_fn(|message: Message<Ping>| async move {
        if message.payload().n == 0 {
            return Err(Error::permanent("zero"));
        }
        Ok(())
    });
    handler
        .ready()
        .await
        .unwrap()
        .call(message(1))
        .await
        .unwrap();
    let error = handler.ready().await.unwrap().call(message(0)).await;
    assert_eq!(error.unwrap_err().kind(), ErrorKind::Rejected);
}
