//! A dead-letter queue that never answers must not hold the console: the
//! page renders with "no answer" in its place, and an inspect is a 504.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use axum::body::Body;
use axum::http::{Request, StatusCode};
use tower::ServiceExt;

use super::Console;
use crate::error::Error;
use crate::middleware::dead_letter::DeadLetterAdmin;
use crate::topology::Topology;
use crate::transport::{
    Capabilities, DeadLetterQueue, DeadLettered, DeliveryMode, Publisher, RawMessage, Redrive,
    SubscribeOptions, Subscriber, Subscription, Transport,
};

/// A broker that accepts the connection and then never answers.
struct Stalled;

#[async_trait]
impl Publisher for Stalled {
    async fn publish(&self, _: &str, _: RawMessage) -> Result<(), Error> {
        std::future::pending().await
    }
}

#[async_trait]
impl Subscriber for Stalled {
    async fn subscribe(&self, _: &str, _: SubscribeOptions) -> Result<Subscription, Error> {
        std::future::pending().await
    }
}

#[async_trait]
impl Transport for Stalled {
    fn name(&self) -> &'static str {
        "stalled"
    }
    fn capabilities(&self) -> Capabilities {
        Capabilities::new(DeliveryMode::Competing).with_dead_letter(true)
    }
    async fn declare(&self, _: &Topology) -> Result<(), Error> {
        std::future::pending().await
    }
    fn dead_letters(&self) -> Result<&dyn DeadLetterQueue, Error> {
        Ok(self)
    }
}

#[async_trait]
impl DeadLetterQueue for Stalled {
    async fn list(&self, _: &str, _: usize) -> Result<Vec<DeadLettered>, Error> {
        std::future::pending().await
    }
    async fn inspect(&self, _: &str, _: &str) -> Result<DeadLettered, Error> {
        std::future::pending().await
    }
    async fn redrive(&self, _: &str, _: Redrive) -> Result<usize, Error> {
        std::future::pending().await
    }
}

fn get(uri: &str) -> Request<Body> {
    Request::get(uri).body(Body::empty()).unwrap()
}

#[tokio::test(start_paused = true)]
async fn a_source_that_never_answers_shows_as_no_answer_within_the_limit() {
    let console = Console::builder("game")
        .dead_letters(DeadLetterAdmin::new(Arc::new(Stalled)), ["trade.executed"])
        .read_timeout(Duration::from_millis(500))
        .build();
    let page = console.router().oneshot(get("/")).await.unwrap();
    assert_eq!(page.status(), StatusCode::OK);
    let body = axum::body::to_bytes(page.into_body(), 1 << 20)
        .await
        .unwrap();
    let body = String::from_utf8_lossy(&body);
    assert!(body.contains("no answer within 500 ms"), "{body}");

    let inspect = console
        .router()
        .oneshot(get("/api/dead-letters/trade.executed/some-id"))
        .await
        .unwrap();
    assert_eq!(inspect.status(), StatusCode::GATEWAY_TIMEOUT);
}
