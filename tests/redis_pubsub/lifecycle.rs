//! Closing cleanly, connecting to a Redis that is down or silent, and the
//! one line a message dropped for want of a dead-letter queue logs.

use std::sync::Arc;
use std::time::Duration;

use switchboard::transport::redis_pubsub::{RedisPubSubOptions, RedisPubSubTransport};
use switchboard::{Error, ErrorKind, EventBus, Message, SubscribeOptions, Transport, handler_fn};
use tokio::sync::mpsc;
use tracing::Level;

#[path = "../common/clean_exit.rs"]
mod harness;
#[path = "../common/unanswered.rs"]
mod unanswered;

use harness::Tick;

#[test]
fn a_closed_transport_exits_without_an_error_in_any_log() {
    harness::assert_clean_exit(
        "lifecycle::a_closed_transport_exits_without_an_error_in_any_log",
        || async {
            let transport = RedisPubSubTransport::connect(super::URL).await.unwrap();
            harness::publish_consume_close(Arc::new(transport), 20).await
        },
    );
}

/// A handler that fails for good on a transport without dead letters: the
/// loss is one ERROR line, "… message dropped", naming the topic and the
/// reason — not a "dead-lettered" line before it.
#[test]
fn a_message_dropped_for_want_of_a_dead_letter_queue_logs_one_error_line() {
    harness::assert_logs(
        "lifecycle::a_message_dropped_for_want_of_a_dead_letter_queue_logs_one_error_line",
        || async {
            let transport = RedisPubSubTransport::connect(super::URL).await.unwrap();
            let bus = EventBus::new(Arc::new(transport) as Arc<dyn Transport>, "drop-test")
                .with_namespace(super::unique("drop"));
            let (seen, mut handled) = mpsc::channel(2);
            let consumer = bus
                .subscribe::<Tick, _>(
                    SubscribeOptions::new("readers"),
                    handler_fn(move |message: Message<Tick>| {
                        let seen = seen.clone();
                        async move {
                            let n = message.payload().n;
                            let _ = seen.send(n).await;
                            if n == 0 {
                                return Err(Error::new(ErrorKind::Rejected, "tick 0 is invalid"));
                            }
                            Ok(())
                        }
                    }),
                )
                .await
                .unwrap();
            bus.publish(Tick { n: 0 }).await.unwrap();
            bus.publish(Tick { n: 1 }).await.unwrap();
            // Concurrency 1: tick 1 is handled once tick 0 was settled.
            for expected in [0, 1] {
                let got = tokio::time::timeout(super::PATIENCE, handled.recv()).await;
                assert_eq!(got.unwrap(), Some(expected));
            }
            bus.close().await.unwrap();
            consumer.shutdown().await.unwrap();
        },
        |events| {
            let errors: Vec<String> = events
                .iter()
                .filter(|event| event.level == Level::ERROR)
                .map(ToString::to_string)
                .collect();
            assert_eq!(errors.len(), 1, "one line for one loss: {errors:#?}");
            let line = &errors[0];
            assert!(line.contains("message dropped"), "{line}");
            assert!(line.contains("tick 0 is invalid"), "the reason: {line}");
            assert!(line.contains("clean.tick"), "the topic: {line}");
        },
    );
}

/// A port nothing listens on: bound, read, let go.
fn closed_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().port()
}

async fn connect_error(url: String) -> Error {
    let options = RedisPubSubOptions::default().with_connection_timeout(Duration::from_millis(300));
    let connecting = RedisPubSubTransport::connect_with(&url, options);
    // A guard against a hang, far above the transport's own timeout.
    match tokio::time::timeout(Duration::from_secs(20), connecting).await {
        Ok(Ok(_)) => panic!("connected to {url}"),
        Ok(Err(error)) => error,
        Err(_) => panic!("connect to {url} did not give up by itself"),
    }
}

#[tokio::test]
async fn connecting_to_a_redis_that_is_down_fails_retryably() {
    let error = connect_error(format!("redis://127.0.0.1:{}", closed_port())).await;
    assert_eq!(error.kind(), ErrorKind::Connection, "{error}");
    assert!(error.is_retryable());
}

#[tokio::test]
async fn connecting_to_a_redis_that_never_answers_fails_within_the_connect_timeout() {
    let silent = unanswered::Unanswered::new().await;
    let error = connect_error(format!("redis://{}", silent.addr)).await;
    assert_eq!(error.kind(), ErrorKind::Connection, "{error}");
    assert!(error.is_retryable());
    assert!(error.message().contains("connect timeout"), "{error}");
}

#[test]
fn the_connect_timeout_is_five_seconds_unless_set() {
    assert_eq!(
        RedisPubSubOptions::default().connection_timeout(),
        Duration::from_secs(5)
    );
}

#[tokio::test]
async fn a_zero_connect_timeout_is_refused() {
    let options = RedisPubSubOptions::default().with_connection_timeout(Duration::ZERO);
    let error = RedisPubSubTransport::connect_with(super::URL, options)
        .await
        .unwrap_err();
    assert_eq!(error.kind(), ErrorKind::Config, "{error}");
}
