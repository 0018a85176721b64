//! `WebhookAlert` posts every dead letter to a local receiver in
//! Alertmanager's webhook JSON (or its API's), retries a receiver that
//! answers 503, and never holds up the consumer when the receiver is gone.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use switchboard::config::{ResilienceConfig, RetryConfig};
use switchboard::middleware::Resilience;
use switchboard::middleware::dead_letter::{DEAD_LETTER_ALERT_NAME, WebhookAlert, WebhookFormat};
use switchboard::{Error, Event, EventBus, MemoryTransport, Message, SubscribeOptions, handler_fn};
use tokio::sync::mpsc;

const PATIENCE: Duration = Duration::from_secs(30);

#[derive(Debug, Clone, Serialize, Deserialize)]
struct TradeExecuted {
    order_id: u64,
}

impl Event for TradeExecuted {
    const TYPE: &'static str = "trade.executed";
    const VERSION: &'static str = "1.0";
}

/// What the receiver got: the headers and the JSON of each post.
type Posted = (HeaderMap, Value);

/// A receiver on a free port that answers `statuses` in turn (then 200)
/// and hands every post over.
async fn receiver(statuses: Vec<StatusCode>) -> (String, mpsc::UnboundedReceiver<Posted>) {
    let (posted, posts) = mpsc::unbounded_channel();
    let answers = Arc::new(std::sync::Mutex::new(statuses.into_iter()));
    let app = Router::new().route(
        "/hook",
        post(move |headers: HeaderMap, body: Bytes| {
            let posted = posted.clone();
            let answers = answers.clone();
            async move {
                let json = serde_json::from_slice(&body).expect("the webhook posts JSON");
                posted.send((headers, json)).ok();
                answers.lock().unwrap().next().unwrap_or(StatusCode::OK)
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (url, posts)
}

/// A bus whose `ledger` consumer rejects every trade (no retries), with
/// dead letters alerted through `alert`.
async fn rejecting_consumer(alert: WebhookAlert) -> (EventBus, switchboard::ConsumerHandle) {
    let bus = EventBus::new(Arc::new(MemoryTransport::new()), "trading");
    let config =
        ResilienceConfig::default().with_retry(RetryConfig::default().with_max_attempts(1));
    let resilience = Resilience::new(config).with_alert(Arc::new(alert));
    let handler = resilience.consumer(
        "ledger",
        handler_fn(|_: Message<TradeExecuted>| async {
            Err::<(), _>(Error::permanent("no such user"))
        }),
    );
    let consumer = bus
        .subscribe(SubscribeOptions::new("ledger"), handler)
        .await
        .unwrap();
    (bus, consumer)
}

async fn next_post(posts: &mut mpsc::UnboundedReceiver<Posted>, what: &str) -> Posted {
    tokio::time::timeout(PATIENCE, posts.recv())
        .await
        .unwrap_or_else(|_| panic!("{what}: nothing posted within {PATIENCE:?}"))
        .expect("the receiver runs")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_reaches_the_webhook_as_an_alertmanager_alert() {
    let (url, mut posts) = receiver(vec![]).await;
    let alert = WebhookAlert::new(url)
        .unwrap()
        .with_header("authorization", "Bearer s3cret")
        .unwrap();
    let (bus, _consumer) = rejecting_consumer(alert).await;
    let event_id = bus.publish(TradeExecuted { order_id: 7 }).await.unwrap();

    let (headers, payload) = next_post(&mut posts, "the dead letter's alert").await;
    assert_eq!(headers["authorization"], "Bearer s3cret");
    assert_eq!(headers["content-type"], "application/json");
    assert_eq!(payload["version"], "4");
    assert_eq!(payload["status"], "firing");
    assert_eq!(payload["groupLabels"]["alertname"], DEAD_LETTER_ALERT_NAME);
    let alerts = payload["alerts"].as_array().expect("alerts[]");
    assert_eq!(alerts.len(), 1);
    let alert = &alerts[0];
    assert_eq!(alert["status"], "firing");
    assert_eq!(alert["labels"]["alertname"], DEAD_LETTER_ALERT_NAME);
    assert_eq!(alert["labels"]["topic"], "trade.executed");
    assert_eq!(alert["labels"]["group"], "ledger");
    assert_eq!(alert["labels"]["event_type"], "trade.executed");
    assert_eq!(alert["labels"]["event_id"], event_id.to_string());
    assert!(
        alert["annotations"]["last_error"]
            .as_str()
            .unwrap()
            .contains("no such user"),
        "{alert}"
    );
    assert_eq!(alert["annotations"]["attempts"], "1");
    chrono::DateTime::parse_from_rfc3339(alert["startsAt"].as_str().unwrap()).expect("RFC 3339");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receiver_that_answers_503_gets_the_alert_again() {
    let (url, mut posts) = receiver(vec![
        StatusCode::SERVICE_UNAVAILABLE,
        StatusCode::SERVICE_UNAVAILABLE,
    ])
    .await;
    let alert = WebhookAlert::new(url)
        .unwrap()
        .with_format(WebhookFormat::AlertmanagerApi)
        .with_attempts(3);
    let (bus, _consumer) = rejecting_consumer(alert).await;
    let event_id = bus.publish(TradeExecuted { order_id: 8 }).await.unwrap();
    for attempt in 1..=3 {
        let (_, payload) = next_post(&mut posts, &format!("post {attempt}")).await;
        // The API's format: a bare array of alerts.
        let alerts = payload.as_array().expect("an array of alerts");
        assert_eq!(alerts[0]["labels"]["event_id"], event_id.to_string());
    }
    // Accepted on the third: nothing more.
    bus.publish(TradeExecuted { order_id: 9 }).await.unwrap();
    let (_, payload) = next_post(&mut posts, "the next dead letter").await;
    assert_ne!(payload[0]["labels"]["event_id"], event_id.to_string());
}

/// A receiver that is not there: the consumer goes on dead-lettering (its
/// handler is called for each trade) while the alerts fail in their task.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_webhook_that_is_down_does_not_hold_up_the_consumer() {
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/hook", closed.local_addr().unwrap());
    drop(closed);
    let alert = WebhookAlert::new(url)
        .unwrap()
        .with_capacity(2)
        .with_attempts(1);
    let bus = EventBus::new(Arc::new(MemoryTransport::new()), "trading");
    let config =
        ResilienceConfig::default().with_retry(RetryConfig::default().with_max_attempts(1));
    let resilience = Resilience::new(config).with_alert(Arc::new(alert));
    let (handled, mut handled_rx) = mpsc::unbounded_channel();
    let handler = resilience.consumer(
        "ledger",
        handler_fn(move |message: Message<TradeExecuted>| {
            handled.send(message.payload().order_id).ok();
            async { Err::<(), _>(Error::permanent("no such user")) }
        }),
    );
    let _consumer = bus
        .subscribe(SubscribeOptions::new("ledger"), handler)
        .await
        .unwrap();
    for order_id in 0..50 {
        bus.publish(TradeExecuted { order_id }).await.unwrap();
    }
    for expected in 0..50 {
        let order_id = tokio::time::timeout(PATIENCE, handled_rx.recv())
            .await
            .expect("the consumer goes on")
            .unwrap();
        assert_eq!(order_id, expected);
    }
    let letters = bus.dead_letters::<TradeExecuted>().unwrap();
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while letters.list(100).await.unwrap().len() < 50 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "all 50 dead-lettered"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
