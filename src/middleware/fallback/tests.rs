use std::sync::{Arc, Mutex};
use std::time::Duration;

use tower::{Layer, Service, ServiceBuilder, ServiceExt, service_fn};

use super::*;
use crate::config::CircuitBreakerConfig;
use crate::middleware::circuit_breaker::{BreakerState, CircuitBreakerLayer};

/// A dependency answering `Ok(answer)` or failing with the set kind.
#[derive(Clone, Default)]
struct Dependency {
    failing_with: Arc<Mutex<Option<ErrorKind>>>,
}

impl Dependency {
    fn fail_with(&self, kind: Option<ErrorKind>) {
        *self.failing_with.lock().unwrap() = kind;
    }

    fn service(
        &self,
    ) -> impl Service<String, Response = String, Error = Error, Future: Send> + Clone + Send + 'static
    {
        let failing_with = self.failing_with.clone();
        service_fn(move |request: String| {
            let failing = *failing_with.lock().unwrap();
            async move {
                match failing {
                    None => Ok(format!("{request}=150")),
                    Some(kind) => Err(Error::new(kind, "scripted")),
                }
            }
        })
    }
}

#[tokio::test(start_paused = true)]
async fn stale_cache_serves_the_last_good_answer_with_its_age() {
    let market = Dependency::default();
    let prices = StaleCacheLayer::new(|symbol: &String| symbol.clone()).layer(market.service());

    let fresh = prices.clone().oneshot("AAPL".into()).await.unwrap();
    assert_eq!(
        fresh,
        Cached {
            value: "AAPL=150".to_owned(),
            freshness: Freshness::Fresh
        }
    );
    market.fail_with(Some(ErrorKind::Unavailable));
    tokio::time::advance(Duration::from_secs(5)).await;
    let stale = prices.clone().oneshot("AAPL".into()).await.unwrap();
    assert_eq!(stale.value, "AAPL=150");
    assert_eq!(
        stale.freshness,
        Freshness::Stale {
            age: Duration::from_secs(5)
        }
    );
    // Nothing known for another key: the error goes through.
    let error = prices.clone().oneshot("MSFT".into()).await.unwrap_err();
    assert_eq!(error.kind(), ErrorKind::Unavailable);
    // A refused request is not the dependency being down.
    market.fail_with(Some(ErrorKind::Rejected));
    let error = prices.oneshot("AAPL".into()).await.unwrap_err();
    assert_eq!(error.kind(), ErrorKind::Rejected);
}

#[tokio::test(start_paused = true)]
async fn stale_cache_serves_while_the_breaker_is_open_and_respects_a_max_age() {
    let market = Dependency::default();
    let breaker = CircuitBreakerLayer::new(CircuitBreakerConfig {
        failure_threshold: 1,
        ..Default::default()
    });
    let prices = ServiceBuilder::new()
        .layer(
            StaleCacheLayer::new(|symbol: &String| symbol.clone())
                .with_max_age(Duration::from_secs(60)),
        )
        .layer(breaker.clone())
        .service(market.service());
    prices.clone().oneshot("AAPL".into()).await.unwrap();
    market.fail_with(Some(ErrorKind::Timeout));
    assert!(
        prices
            .clone()
            .oneshot("AAPL".into())
            .await
            .unwrap()
            .is_stale()
    );
    assert_eq!(breaker.state(), BreakerState::Open);
    let stale = prices.clone().oneshot("AAPL".into()).await.unwrap();
    assert!(stale.is_stale(), "not served while the breaker is open");

    tokio::time::advance(Duration::from_secs(61)).await;
    let error = prices.oneshot("AAPL".into()).await.unwrap_err();
    assert!(error.is_retryable() || error.kind() == ErrorKind::BreakerOpen);
}

/// Serves the last good answer up to `max_age` after it was given, and the
/// dependency's error past it.
async fn served_at<S>(
    prices: &StaleCache<S, fn(&String) -> String, String, String>,
    market: &Dependency,
    age: Duration,
) -> Result<Cached<String>, Error>
where
    S: Service<String, Response = String, Error = Error> + Clone,
    S::Future: Send + 'static,
{
    market.fail_with(None);
    prices.clone().oneshot("AAPL".into()).await.unwrap();
    market.fail_with(Some(ErrorKind::Unavailable));
    tokio::time::advance(age).await;
    prices.clone().oneshot("AAPL".into()).await
}

#[tokio::test(start_paused = true)]
async fn stale_cache_serves_answers_up_to_five_minutes_old_by_default() {
    let market = Dependency::default();
    let key: fn(&String) -> String = String::clone;
    let prices = StaleCacheLayer::new(key).layer(market.service());
    assert_eq!(StaleCache::DEFAULT_MAX_AGE, Duration::from_secs(300));
    assert_eq!(prices.max_age(), Duration::from_secs(300));

    let stale = served_at(&prices, &market, Duration::from_secs(300))
        .await
        .unwrap();
    assert_eq!(
        stale.freshness,
        Freshness::Stale {
            age: Duration::from_secs(300)
        }
    );
    let error = served_at(&prices, &market, Duration::from_secs(301))
        .await
        .unwrap_err();
    assert_eq!(
        error.kind(),
        ErrorKind::Unavailable,
        "older than 5 minutes: the error goes through"
    );

    // The service built without the layer has the same default.
    let direct = StaleCache::new(market.service(), key, 10);
    assert!(
        served_at(&direct, &market, Duration::from_secs(301))
            .await
            .is_err()
    );
}

#[tokio::test(start_paused = true)]
async fn stale_cache_with_max_age_duration_max_serves_any_age() {
    let market = Dependency::default();
    let key: fn(&String) -> String = String::clone;
    let prices = StaleCacheLayer::new(key)
        .with_max_age(Duration::MAX)
        .layer(market.service());
    let year = Duration::from_secs(365 * 24 * 3600);
    let stale = served_at(&prices, &market, year).await.unwrap();
    assert_eq!(stale.freshness, Freshness::Stale { age: year });

    let shorter = StaleCache::new(market.service(), key, 10).with_max_age(Duration::from_secs(10));
    assert!(
        served_at(&shorter, &market, Duration::from_secs(10))
            .await
            .is_ok()
    );
    assert!(
        served_at(&shorter, &market, Duration::from_secs(11))
            .await
            .is_err()
    );
}

#[tokio::test(start_paused = true)]
async fn gate_refuses_writes_and_serves_reads_while_the_breaker_is_open() {
    let trading = Dependency::default();
    let breaker = CircuitBreakerLayer::named(
        "trading",
        CircuitBreakerConfig {
            failure_threshold: 1,
            ..Default::default()
        },
    );
    let classify = |request: &String| {
        if request.starts_with("GET") {
            Access::Read
        } else {
            Access::Write
        }
    };
    let orders_api =
        GateLayer::new(&breaker, classify).layer(service_fn(|request: String| async move {
            Ok::<_, Error>(format!("served {request}"))
        }));
    let mut trading_client = breaker.layer(trading.service());

    assert_eq!(orders_api.mode(), Mode::Normal);
    trading.fail_with(Some(ErrorKind::Connection));
    trading_client
        .ready()
        .await
        .unwrap()
        .call("x".into())
        .await
        .unwrap_err();
    assert_eq!(orders_api.mode(), Mode::ReadOnly);

    let refused = orders_api
        .clone()
        .oneshot("POST /orders".into())
        .await
        .unwrap_err();
    assert_eq!(refused.kind(), ErrorKind::BreakerOpen);
    assert!(!refused.is_retryable());
    assert!(refused.message().contains("read-only mode"), "{refused}");
    assert!(refused.message().contains("trading"), "{refused}");
    let read = orders_api
        .clone()
        .oneshot("GET /orders".into())
        .await
        .unwrap();
    assert_eq!(read, "served GET /orders");

    tokio::time::advance(Duration::from_secs(30)).await;
    trading.fail_with(None);
    trading_client
        .ready()
        .await
        .unwrap()
        .call("x".into())
        .await
        .unwrap();
    assert_eq!(orders_api.mode(), Mode::Normal);
    orders_api.oneshot("POST /orders".into()).await.unwrap();
}

#[tokio::test]
async fn fallback_answers_with_basic_data_from_the_last_snapshot() {
    let game = Dependency::default();
    let snapshot = Arc::new(Mutex::new(None::<String>));
    let substitute = {
        let snapshot = snapshot.clone();
        move |player: &String, error: Error| match snapshot.lock().unwrap().clone() {
            Some(last) => Ok(format!("{last} (basic, {player})")),
            None => Err(error),
        }
    };
    let profiles = FallbackLayer::new(substitute).layer(game.service());

    game.fail_with(Some(ErrorKind::Unavailable));
    let error = profiles.clone().oneshot("p1".into()).await.unwrap_err();
    assert_eq!(error.kind(), ErrorKind::Unavailable, "nothing known yet");

    *snapshot.lock().unwrap() = Some("level 3".into());
    let basic = profiles.clone().oneshot("p1".into()).await.unwrap();
    assert_eq!(basic, "level 3 (basic, p1)");

    game.fail_with(Some(ErrorKind::Unauthorized));
    let error = profiles.clone().oneshot("p1".into()).await.unwrap_err();
    assert_eq!(
        error.kind(),
        ErrorKind::Unauthorized,
        "a refusal is not substituted"
    );
    game.fail_with(None);
    assert_eq!(profiles.oneshot("p1".into()).await.unwrap(), "p1=150");
}
