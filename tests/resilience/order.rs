//! The order of the client stack, per-path timeouts, and one breaker shared
//! by an RPC client and a consumer.

use std::time::Duration;

use switchboard::config::{ResilienceConfig, RetryConfig};
use switchboard::middleware::Resilience;
use switchboard::middleware::circuit_breaker::{BreakerState, WhenOpen};
use switchboard::middleware::fallback::FallbackLayer;
use switchboard::middleware::retry::RetryLayer;
use switchboard::{Error, ErrorKind, Event, Message, SubscribeOptions, Transport, handler_fn};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tower::{Layer, Service, ServiceBuilder, ServiceExt, service_fn};

use super::{Market, TradeExecuted, bus, spec};

#[tokio::test(start_paused = true)]
async fn in_the_right_order_the_breaker_opens_although_the_fallback_answers_every_caller() {
    let market = Market::default();
    let resilience = Resilience::new(spec());
    let breaker = resilience.breaker("market");
    let client = FallbackLayer::new(|_: &String, _: Error| Ok(-1.0))
        .layer(resilience.client_with_breaker(&breaker, market.service()));

    market.set_down(true);
    for _ in 0..2 {
        let answer = client.clone().oneshot("AAPL".into()).await.unwrap();
        assert_eq!(answer, -1.0, "the caller got the fallback");
    }
    // Three attempts of the first call and two of the second: the fifth
    // failure opened the breaker, and the retry stopped at `BreakerOpen`.
    assert_eq!(market.calls(), 5);
    assert_eq!(breaker.state(), BreakerState::Open);
    assert_eq!(client.clone().oneshot("AAPL".into()).await.unwrap(), -1.0);
    assert_eq!(market.calls(), 5, "an open breaker let a call through");
}

#[tokio::test(start_paused = true)]
async fn in_the_wrong_order_a_fallback_inside_the_breaker_hides_the_outage_from_it() {
    let market = Market::default();
    let resilience = Resilience::new(spec());
    let breaker = resilience.breaker("market");
    // breaker ▸ fallback ▸ service: every failure becomes a success.
    let client = ServiceBuilder::new()
        .layer(breaker.clone())
        .layer(FallbackLayer::new(|_: &String, _: Error| Ok(-1.0)))
        .service(market.service());

    market.set_down(true);
    for _ in 0..20 {
        assert_eq!(client.clone().oneshot("AAPL".into()).await.unwrap(), -1.0);
    }
    assert_eq!(breaker.state(), BreakerState::Closed);
    assert_eq!(
        market.calls(),
        20,
        "the dead dependency was called every time"
    );
}

#[tokio::test(start_paused = true)]
async fn each_path_has_its_own_timeout() {
    let slow = service_fn(|_: String| async {
        tokio::time::sleep(Duration::from_millis(30)).await;
        Ok::<_, Error>(150.0)
    });
    let resilience = Resilience::from_yaml("retry:\n  max_attempts: 1\n").unwrap();
    assert_eq!(
        resilience.timeout(),
        Duration::from_secs(5),
        "the SPEC's timeout_ms"
    );

    let grpc = resilience.clone().with_timeout(Duration::from_millis(20));
    let started = Instant::now();
    let error = grpc
        .client("market", slow)
        .oneshot("AAPL".into())
        .await
        .unwrap_err();
    assert_eq!(error.kind(), ErrorKind::Timeout);
    assert_eq!(started.elapsed(), Duration::from_millis(20));

    let http = resilience.with_timeout(Duration::from_millis(50));
    assert_eq!(
        http.client("market", slow)
            .oneshot("AAPL".into())
            .await
            .unwrap(),
        150.0
    );
}

// ---------------------------------------------- one stack for both sides

#[tokio::test(start_paused = true)]
async fn one_breaker_and_retry_guard_an_rpc_client_and_a_consumer_of_the_same_dependency() {
    let market = Market::default();
    // Without jitter, so the attempts come at the times asserted below.
    let config = ResilienceConfig::default().with_retry(RetryConfig::default().with_jitter(false));
    let breaker = Resilience::new(config).breaker("market");
    let retry = RetryLayer::new(config.retry);

    // The RPC side fails fast while open.
    let rpc = ServiceBuilder::new()
        .layer(retry.clone())
        .layer(breaker.clone())
        .service(market.service());
    // The consumer side: the same layers; while the breaker is open the
    // consume loop stops pulling.
    let (handled, mut handled_rx) = mpsc::unbounded_channel();
    let consumer_market = market.clone();
    let handler = ServiceBuilder::new()
        .layer(retry)
        .layer(breaker.clone().when_open(WhenOpen::Wait))
        .service(handler_fn(move |message: Message<TradeExecuted>| {
            let result = consumer_market.quote();
            handled
                .send((message.payload().order_id, Instant::now(), result.is_ok()))
                .ok();
            std::future::ready(result.map(|_| ()))
        }));
    let (bus, transport) = bus("game").await;
    let _consumer = bus
        .subscribe(SubscribeOptions::new("game"), handler)
        .await
        .unwrap();

    market.set_down(true);
    let started = Instant::now();
    rpc.clone().oneshot("AAPL".into()).await.unwrap_err();
    let error = rpc.clone().oneshot("AAPL".into()).await.unwrap_err();
    assert_eq!(error.kind(), ErrorKind::BreakerOpen);
    // Attempts at 0, 100 and 300 ms, then 300 and 400 ms: the fifth failure
    // opened it at 400 ms, and the third attempt at 600 ms met it open.
    assert_eq!(started.elapsed(), Duration::from_millis(600));
    let opened = started + Duration::from_millis(400);
    assert_eq!(breaker.state(), BreakerState::Open);
    market.set_down(false);

    // Published while open: the consumer holds it until the trial call is due.
    bus.publish(TradeExecuted { order_id: 1 }).await.unwrap();
    let (order_id, at, ok) = handled_rx.recv().await.unwrap();
    assert_eq!(order_id, 1);
    assert!(ok);
    assert_eq!(
        at - opened,
        Duration::from_secs(30),
        "pulled before the trial call was due"
    );

    // The consumer's trial call closed the breaker the RPC client shares.
    assert_eq!(breaker.state(), BreakerState::Closed);
    assert_eq!(rpc.oneshot("AAPL".into()).await.unwrap(), 150.0);
    let letters = transport
        .dead_letters()
        .unwrap()
        .list(TradeExecuted::TYPE, 10)
        .await;
    assert!(letters.unwrap().is_empty());
}

#[tokio::test(start_paused = true)]
async fn a_message_failed_fast_by_an_open_breaker_is_requeued_not_dead_lettered() {
    let market = Market::default();
    let breaker = Resilience::new(spec()).breaker("market");
    market.set_down(true);
    let mut rpc = breaker.clone().layer(market.service());
    for _ in 0..5 {
        rpc.ready()
            .await
            .unwrap()
            .call("AAPL".into())
            .await
            .unwrap_err();
    }
    let opened = Instant::now();
    market.set_down(false);

    let (handled, mut handled_rx) = mpsc::unbounded_channel();
    let consumer_market = market.clone();
    // Fail-fast mode in a consumer: the message meets `BreakerOpen`.
    let handler = breaker.layer(handler_fn(move |message: Message<TradeExecuted>| {
        handled.send((message.attempt(), Instant::now())).ok();
        std::future::ready(consumer_market.quote().map(|_| ()))
    }));
    let (bus, transport) = bus("game").await;
    let _consumer = bus
        .subscribe(SubscribeOptions::new("game"), handler)
        .await
        .unwrap();
    bus.publish(TradeExecuted { order_id: 1 }).await.unwrap();

    let (attempt, at) = handled_rx.recv().await.unwrap();
    assert_eq!(attempt, 2, "nacked once, then delivered again");
    assert_eq!(at - opened, Duration::from_secs(30));
    let letters = transport
        .dead_letters()
        .unwrap()
        .list(TradeExecuted::TYPE, 10)
        .await;
    assert!(letters.unwrap().is_empty());
}
