//! The example services under failure: SPEC §4.2's degradation for each
//! dependency (taken down by stopping its in-process server, then brought
//! back), and SPEC §6.2 / §6.3 end to end (a duplicated trade changes
//! holdings once; a poison trade is dead-lettered with an alert and, once
//! its cause is fixed, redriven and processed).
//!
//! The breakers open after one failure and allow a trial call 1 ms after
//! opening, so recovery needs no waiting beyond that: `until_closed` keeps
//! making the read that probes the dependency until the breaker's state is
//! `Closed` again (bounded by a deadline).

#[path = "../examples/common/mod.rs"]
mod common;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use common::brokers::Brokers;
use common::database::Database;
use common::domain::{Side, TradeExecuted};
use common::platform::Platform;
use common::session::{Gateway, gateway_resilience};
use common::trading_service::PlaceOrder;
use rust_decimal_macros::dec;
use switchboard::config::CircuitBreakerConfig;
use switchboard::middleware::Resilience;
use switchboard::middleware::circuit_breaker::{BreakerState, CircuitBreakerLayer};
use switchboard::middleware::dead_letter::{DeadLetterAdmin, DeadLetterAlert, DeadLetterFacts};
use switchboard::{ErrorKind, Event, EventEnvelope};
use tokio::sync::mpsc;

const DEADLINE: Duration = Duration::from_secs(10);

#[path = "services/auth_keys.rs"]
mod auth_keys;
#[path = "services/browser.rs"]
mod browser;
#[path = "services/console_api.rs"]
mod console_api;
#[path = "services/webdriver.rs"]
mod webdriver;

fn breaker() -> CircuitBreakerConfig {
    CircuitBreakerConfig::default()
        .with_failure_threshold(1)
        .with_timeout_ms(2_000)
        .with_reset_timeout_ms(1)
}

fn resilience() -> Resilience {
    Resilience::from_yaml(
        "\
circuit_breaker:
  failure_threshold: 1
  timeout_ms: 2000
  reset_timeout_ms: 1
retry:
  max_attempts: 1
",
    )
    .expect("valid resilience YAML")
}

#[derive(Debug)]
struct Pager(mpsc::UnboundedSender<DeadLetterFacts>);

impl DeadLetterAlert for Pager {
    fn alert(&self, facts: &DeadLetterFacts) {
        self.0.send(facts.clone()).ok();
    }
}

struct World {
    brokers: Brokers,
    database: Database,
    platform: Platform,
    gateway: Gateway,
    alerts: mpsc::UnboundedReceiver<DeadLetterFacts>,
    token: String,
    user_id: String,
}

async fn world() -> World {
    let brokers = Brokers::memory();
    // A SQLite file of its own in a temporary directory, removed by close().
    let database = Database::open(None).await.expect("an embedded database");
    let (pager, alerts) = mpsc::unbounded_channel();
    let platform = Platform::start(
        &brokers,
        &database,
        &resilience(),
        Some(Arc::new(Pager(pager))),
    )
    .await
    .expect("the four services start");
    let gateway = Gateway::new(platform.addresses(), &gateway_resilience(breaker()));
    let username = format!("bob-{}", uuid::Uuid::new_v4().simple());
    let user_id = gateway
        .register(&username, "a long password")
        .await
        .expect("register");
    let token = gateway
        .login(&username, "a long password")
        .await
        .expect("login");
    World {
        brokers,
        database,
        platform,
        gateway,
        alerts,
        token,
        user_id,
    }
}

impl World {
    /// Shuts the services down and removes their database.
    async fn finish(self) {
        self.platform.shutdown().await.expect("shutdown");
        self.database.close().await;
    }
}

fn buy(symbol: &str, quantity: rust_decimal::Decimal) -> PlaceOrder {
    PlaceOrder {
        symbol: symbol.into(),
        side: Side::Buy,
        quantity,
    }
}

async fn until_state(breaker: &CircuitBreakerLayer, wanted: BreakerState) {
    let mut states = breaker.watch();
    tokio::time::timeout(DEADLINE, states.wait_for(|state| *state == wanted))
        .await
        .unwrap_or_else(|_| panic!("{} never became {wanted:?}", breaker.name()))
        .expect("the breaker lives");
}

/// Makes `probe` until `breaker` is closed (the first probe 1 ms after it
/// opened is its trial call).
async fn until_closed<F, Fut>(breaker: &CircuitBreakerLayer, mut probe: F)
where
    F: FnMut() -> Fut,
    Fut: Future,
{
    tokio::time::timeout(DEADLINE, async {
        while breaker.state() != BreakerState::Closed {
            probe().await;
            tokio::task::yield_now().await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("{} did not close after recovery", breaker.name()));
}

#[tokio::test]
async fn market_down_serves_the_last_price_flagged_delayed_with_its_age() {
    let mut world = world().await;
    let receipt = world
        .gateway
        .place_order(&world.token, buy("AAPL", dec!(4)))
        .await
        .expect("order with Market up");
    world.platform.game.wait_for_trades(&world.user_id, 1).await;
    let fresh = world
        .platform
        .game
        .portfolio(&world.user_id)
        .await
        .expect("the holdings");
    assert!(!fresh.positions[0].price_delayed, "{fresh:?}");
    let fresh_price = fresh.positions[0].price.expect("a price");

    world.platform.market.stop().await;
    let delayed = world
        .platform
        .game
        .portfolio(&world.user_id)
        .await
        .expect("the holdings");
    until_state(world.platform.game.market_breaker(), BreakerState::Open).await;
    let position = &delayed.positions[0];
    assert!(position.price_delayed, "{delayed:?}");
    assert_eq!(position.price, Some(fresh_price));
    assert!(position.price_age_ms.is_some(), "{delayed:?}");
    // Trading will not fill without a fresh price, and says why.
    let refused = world
        .gateway
        .place_order(&world.token, buy("AAPL", dec!(1)))
        .await
        .expect_err("no fill without Market");
    assert!(
        refused.to_string().contains("no price from Market"),
        "{refused}"
    );

    world.platform.market.restart().await.expect("Market back");
    let game = &world.platform.game;
    until_closed(game.market_breaker(), || game.portfolio(&world.user_id)).await;
    let again = game.portfolio(&world.user_id).await.expect("the holdings");
    assert!(!again.positions[0].price_delayed, "{again:?}");
    assert_eq!(again.positions[0].price_age_ms, None);
    let trading = &world.platform.trading;
    // Trading's refusal (a 503) opened the gateway's breaker on Trading
    // too: a read finds Trading answering, then an order finds Market.
    until_closed(world.gateway.trading_breaker(), || {
        world.gateway.orders(&world.token)
    })
    .await;
    until_closed(trading.market_breaker(), || {
        world
            .gateway
            .place_order(&world.token, buy("AAPL", dec!(1)))
    })
    .await;
    assert!(receipt.price > dec!(0));
    world.finish().await;
}

#[tokio::test]
async fn auth_down_refuses_new_logins_and_keeps_existing_sessions() {
    let mut world = world().await;
    world.platform.auth.stop().await;

    // The first attempt finds Auth gone and opens the breaker; from then on
    // logins are refused at once, by name.
    let first = world.gateway.login("anyone", "a long password").await;
    assert!(first.expect_err("Auth is down").is_retryable());
    until_state(world.gateway.auth_breaker(), BreakerState::Open).await;
    let refused = world
        .gateway
        .login("anyone", "a long password")
        .await
        .expect_err("new logins refused");
    assert_eq!(refused.kind(), ErrorKind::BreakerOpen);
    assert!(
        refused
            .to_string()
            .contains("read-only mode: auth is unavailable"),
        "{refused}"
    );
    let registration = world.gateway.register("newcomer", "a long password").await;
    assert_eq!(
        registration.expect_err("refused").kind(),
        ErrorKind::BreakerOpen
    );

    // Existing tokens keep working: Trading and Game check them locally.
    world
        .gateway
        .place_order(&world.token, buy("NVDA", dec!(2)))
        .await
        .expect("an existing session still trades");
    let holdings = world
        .gateway
        .holdings(&world.token, &world.user_id, Some(1))
        .await
        .expect("an existing session still reads");
    assert_eq!(holdings.positions[0].quantity, dec!(2));

    world.platform.auth.restart().await.expect("Auth back");
    until_closed(world.gateway.auth_breaker(), || {
        world.gateway.auth_endpoints()
    })
    .await;
    world
        .gateway
        .login("newcomer-2", "a long password")
        .await
        .expect_err("unknown user")
        .kind()
        .eq(&ErrorKind::Unauthorized)
        .then_some(())
        .expect("Auth answers again: an unknown user is Unauthorized, not refused");
    let username = format!("carol-{}", uuid::Uuid::new_v4().simple());
    world
        .gateway
        .register(&username, "a long password")
        .await
        .expect("registration after recovery");
    world
        .gateway
        .login(&username, "a long password")
        .await
        .expect("login after recovery");
    world.finish().await;
}

#[tokio::test]
async fn trading_down_is_read_only_mode() {
    let mut world = world().await;
    world
        .gateway
        .place_order(&world.token, buy("MSFT", dec!(1.5)))
        .await
        .expect("order with Trading up");
    world.platform.trading.stop().await;

    let first = world
        .gateway
        .place_order(&world.token, buy("MSFT", dec!(1)))
        .await;
    assert!(first.expect_err("Trading is down").is_retryable());
    until_state(world.gateway.trading_breaker(), BreakerState::Open).await;
    let refused = world
        .gateway
        .place_order(&world.token, buy("MSFT", dec!(1)))
        .await
        .expect_err("read-only mode");
    assert_eq!(refused.kind(), ErrorKind::BreakerOpen);
    assert!(
        refused
            .to_string()
            .contains("read-only mode: trading is unavailable"),
        "{refused}"
    );
    // Reads are served.
    let prices = world.gateway.prices().await.expect("prices from Market");
    assert!(prices.contains_key("MSFT"));
    let holdings = world
        .gateway
        .holdings(&world.token, &world.user_id, Some(1))
        .await
        .expect("holdings from Game");
    assert_eq!(holdings.positions[0].quantity, dec!(1.5));

    world
        .platform
        .trading
        .restart()
        .await
        .expect("Trading back");
    until_closed(world.gateway.trading_breaker(), || {
        world.gateway.orders(&world.token)
    })
    .await;
    world
        .gateway
        .place_order(&world.token, buy("MSFT", dec!(1)))
        .await
        .expect("orders accepted again");
    world.finish().await;
}

#[tokio::test]
async fn game_down_returns_the_last_holdings_snapshot_marked_basic() {
    let mut world = world().await;
    world
        .gateway
        .place_order(&world.token, buy("AAPL", dec!(7)))
        .await
        .expect("order");
    let live = world
        .gateway
        .holdings(&world.token, &world.user_id, Some(1))
        .await
        .expect("holdings");
    assert!(!live.basic);
    world.platform.game.stop().await;

    let basic = world
        .gateway
        .holdings(&world.token, &world.user_id, None)
        .await
        .expect("the last snapshot");
    assert!(basic.basic, "{basic:?}");
    assert_eq!(basic.positions, live.positions);
    until_state(world.gateway.game_breaker(), BreakerState::Open).await;

    // A trade while Game's API is down is still applied (its consumer runs).
    world
        .gateway
        .place_order(&world.token, buy("AAPL", dec!(1)))
        .await
        .expect("order");
    world.platform.game.wait_for_trades(&world.user_id, 2).await;

    world.platform.game.restart().await.expect("Game back");
    until_closed(world.gateway.game_breaker(), || {
        world.gateway.holdings(&world.token, &world.user_id, None)
    })
    .await;
    let fresh = world
        .gateway
        .holdings(&world.token, &world.user_id, None)
        .await
        .expect("fresh holdings");
    assert!(!fresh.basic);
    assert_eq!(fresh.positions[0].quantity, dec!(8));
    world.finish().await;
}

fn trade(user_id: &str, quantity: rust_decimal::Decimal) -> TradeExecuted {
    TradeExecuted {
        order_id: uuid::Uuid::new_v4().to_string(),
        user_id: user_id.to_owned(),
        symbol: "NVDA".into(),
        side: Side::Buy,
        quantity,
        price: dec!(120.10),
    }
}

#[tokio::test]
async fn a_duplicated_trade_changes_holdings_once() {
    let world = world().await;
    let bus = world.brokers.events("trading-service");
    let first = EventEnvelope::new("trading-service", trade(&world.user_id, dec!(5)));
    bus.publish_envelope(&first).await.expect("publish");
    bus.publish_envelope(&first)
        .await
        .expect("publish the duplicate");
    bus.publish(trade(&world.user_id, dec!(0.25)))
        .await
        .expect("publish");
    // One consumer, in order: once the third is applied the duplicate has
    // been seen and skipped.
    tokio::time::timeout(
        DEADLINE,
        world.platform.game.wait_for_trades(&world.user_id, 2),
    )
    .await
    .expect("two trades applied");
    let portfolio = world
        .platform
        .game
        .portfolio(&world.user_id)
        .await
        .expect("the holdings");
    assert_eq!(portfolio.trades_applied, 2);
    assert_eq!(portfolio.positions[0].quantity, dec!(5.25));
    world.finish().await;
}

#[tokio::test]
async fn a_poison_trade_is_dead_lettered_with_an_alert_and_redriven_once_fixed() {
    let mut world = world().await;
    let ghost = uuid::Uuid::new_v4().to_string();
    let bus = world.brokers.events("trading-service");
    let event_id = bus.publish(trade(&ghost, dec!(3))).await.expect("publish");

    let facts = tokio::time::timeout(DEADLINE, world.alerts.recv())
        .await
        .expect("an alert")
        .expect("the pager lives");
    assert_eq!(facts.event_id, event_id);
    assert_eq!(facts.group, "game");
    assert!(
        facts.last_error.contains("whom Auth does not know"),
        "{facts:?}"
    );

    let admin = DeadLetterAdmin::new(world.brokers.events.clone());
    let letter = tokio::time::timeout(DEADLINE, async {
        loop {
            let letters = admin.list(TradeExecuted::TYPE, 10).await.expect("list");
            if let Some(letter) = letters.into_iter().next() {
                return letter;
            }
            tokio::task::yield_now().await;
        }
    })
    .await
    .expect("the dead letter is listed");
    assert_eq!(letter.group, "game");

    // The cause: Auth lost the user. An operator restores it, then redrives.
    world
        .platform
        .auth
        .restore_user(&ghost, "restored")
        .await
        .expect("restore");
    admin
        .redrive(TradeExecuted::TYPE, &letter.id)
        .await
        .expect("redrive");
    tokio::time::timeout(DEADLINE, world.platform.game.wait_for_trades(&ghost, 1))
        .await
        .expect("the redriven trade is applied");
    let portfolio = world
        .platform
        .game
        .portfolio(&ghost)
        .await
        .expect("the holdings");
    assert_eq!(portfolio.positions[0].quantity, dec!(3));
    assert_eq!(portfolio.username.as_deref(), Some("restored"));
    assert!(
        admin
            .list(TradeExecuted::TYPE, 10)
            .await
            .expect("list")
            .is_empty()
    );
    world.finish().await;
}

/// The operator's commands of `examples/dlq.rs` on a broker's real
/// dead-letter queue: list, inspect, redrive one, redrive all.
async fn operator_commands_on(kind: common::operator::Kind) {
    use common::operator::{self, Command};
    use switchboard::{EventBus, Message, SubscribeOptions, handler_fn};

    let namespace = format!("dlq-test-{}", uuid::Uuid::new_v4().simple());
    let topic = format!("{namespace}.{}", TradeExecuted::TYPE);
    let transport = operator::connect(kind, kind.default_url(), &topic, "game")
        .await
        .expect("the broker answers");
    let admin = DeadLetterAdmin::new(transport.clone());
    let bus = EventBus::new(transport, "trading-service").with_namespace(namespace);

    let fixed = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (handled, mut handled_rx) = mpsc::unbounded_channel::<String>();
    let consumer = {
        let fixed = fixed.clone();
        bus.subscribe(
            SubscribeOptions::new("game"),
            handler_fn(move |message: Message<TradeExecuted>| {
                let fixed = fixed.load(std::sync::atomic::Ordering::SeqCst);
                let order_id = message.payload().order_id.clone();
                let handled = handled.clone();
                async move {
                    if !fixed {
                        return Err(switchboard::Error::permanent("ledger rejects the trade"));
                    }
                    handled.send(order_id).ok();
                    Ok(())
                }
            }),
        )
        .await
        .expect("subscribe")
    };
    let first = trade("someone", dec!(1));
    let second = trade("someone", dec!(2));
    bus.publish(first.clone()).await.expect("publish");
    bus.publish(second.clone()).await.expect("publish");

    let letters = tokio::time::timeout(DEADLINE, async {
        loop {
            let letters = admin.list(&topic, 10).await.expect("list");
            if letters.len() == 2 {
                return letters;
            }
            tokio::task::yield_now().await;
        }
    })
    .await
    .expect("both trades dead-lettered");

    let (listed, _) = operator::execute(&admin, &topic, &Command::List)
        .await
        .expect("list");
    for letter in &letters {
        assert!(listed.contains(&letter.id), "{listed}");
    }
    assert_eq!(listed.matches("group=game").count(), 2, "{listed}");
    let (inspected, _) =
        operator::execute(&admin, &topic, &Command::Inspect(letters[0].id.clone()))
            .await
            .expect("inspect");
    assert!(
        inspected.contains("ledger rejects the trade"),
        "{inspected}"
    );
    assert!(inspected.contains(&letters[0].id), "{inspected}");

    fixed.store(true, std::sync::atomic::Ordering::SeqCst);
    let (_, one) = operator::execute(&admin, &topic, &Command::Redrive(letters[0].id.clone()))
        .await
        .expect("redrive one");
    assert_eq!(one, 1);
    let redriven = tokio::time::timeout(DEADLINE, handled_rx.recv())
        .await
        .expect("the redriven trade is handled")
        .expect("the handler lives");
    let body = String::from_utf8_lossy(&letters[0].message.body).into_owned();
    assert!(body.contains(&redriven), "{redriven} not in {body}");
    assert_eq!(admin.list(&topic, 10).await.expect("list").len(), 1);

    let (_, rest) = operator::execute(&admin, &topic, &Command::RedriveAll)
        .await
        .expect("redrive all");
    assert_eq!(rest, 1);
    let other = tokio::time::timeout(DEADLINE, handled_rx.recv())
        .await
        .expect("the other trade is handled")
        .expect("the handler lives");
    let mut both = [redriven, other];
    both.sort();
    let mut sent = [first.order_id, second.order_id];
    sent.sort();
    assert_eq!(both, sent);
    assert!(admin.list(&topic, 10).await.expect("list").is_empty());
    consumer.shutdown().await.expect("shutdown");
}

/// Needs Redis on 127.0.0.1:6379 (as `scripts/test` ensures).
#[tokio::test]
async fn operator_commands_on_redis_streams() {
    operator_commands_on(common::operator::Kind::Redis).await;
}

/// Needs RabbitMQ on 127.0.0.1:5672, guest/guest (as `scripts/test` ensures).
#[tokio::test]
async fn operator_commands_on_rabbitmq() {
    operator_commands_on(common::operator::Kind::Amqp).await;
}

#[test]
fn bad_flags_are_one_line_usage_errors() {
    use common::cli::{Failure, Flags};
    for (args, wanted) in [
        (vec!["--bogus"], "unknown argument"),
        (vec!["--port", "seventy"], "--port wants a number"),
        (vec!["--auth", "1.2.3"], "--auth wants HOST:PORT"),
        (vec!["--orders", "0"], "--orders wants a positive number"),
        (vec!["--redis"], "--redis needs a value"),
    ] {
        let args = args.into_iter().map(str::to_owned);
        match Flags::parse(args, "usage") {
            Err(Failure::Usage(message)) => {
                assert!(message.contains(wanted), "{message}");
                assert!(!message.contains('\n'), "{message}");
            }
            other => panic!("{wanted}: {other:?}"),
        }
    }
}

#[tokio::test]
async fn an_unreachable_broker_is_one_line_that_says_what_to_do() {
    // A port nothing listens on: bound, then released.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("a free port")
        .port();
    for (redis, amqp, broker) in [
        (Some(format!("redis://127.0.0.1:{port}")), None, "Redis"),
        (
            None,
            Some(format!("amqp://guest:guest@127.0.0.1:{port}")),
            "RabbitMQ",
        ),
    ] {
        let error = Brokers::connect(redis.as_deref(), amqp.as_deref(), None)
            .await
            .expect_err("nothing listens there");
        let message = error.to_string();
        assert_eq!(error.kind(), ErrorKind::Connection);
        assert!(
            message.contains(&format!("cannot reach {broker}")),
            "{message}"
        );
        assert!(message.contains("leave out its URL"), "{message}");
        assert!(!message.contains('\n'), "{message}");
        assert!(
            !message.contains("guest:guest"),
            "the password is not shown: {message}"
        );
    }
}

/// The four services stopped and started again on the same database: the
/// orders, the holdings and the users are still there, and the token Auth
/// signed before the restart still works (its keys are kept beside the
/// embedded database).
#[tokio::test]
async fn the_services_state_survives_their_restart() {
    let world = world().await;
    for quantity in [dec!(4), dec!(1.5)] {
        world
            .gateway
            .place_order(&world.token, buy("MSFT", quantity))
            .await
            .expect("order");
    }
    world.platform.game.wait_for_trades(&world.user_id, 2).await;
    world.platform.shutdown().await.expect("shutdown");

    let platform = Platform::start(&world.brokers, &world.database, &resilience(), None)
        .await
        .expect("the four services start again");
    let gateway = Gateway::new(platform.addresses(), &gateway_resilience(breaker()));
    let orders = gateway
        .orders(&world.token)
        .await
        .expect("the orders, same token");
    assert_eq!(orders.len(), 2, "{orders:?}");
    let portfolio = gateway
        .holdings(&world.token, &world.user_id, Some(2))
        .await
        .expect("the holdings");
    assert_eq!(portfolio.trades_applied, 2);
    assert_eq!(portfolio.positions[0].quantity, dec!(5.5));
    assert!(portfolio.username.is_some(), "{portfolio:?}");
    let settled = gateway
        .trading_stats(&world.user_id, 2)
        .await
        .expect("Trading's figures");
    assert_eq!((settled.orders, settled.settled), (2, 2));
    platform.shutdown().await.expect("shutdown");
    world.database.close().await;
}

#[tokio::test]
async fn a_bad_database_url_is_one_line_that_says_what_to_do() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("a free port")
        .port();
    for url in [
        format!("postgres://postgres:s3cret@127.0.0.1:{port}/test"),
        "mysql://root:s3cret@127.0.0.1/test".to_owned(),
    ] {
        let error = Database::open(Some(&url))
            .await
            .expect_err("no database there");
        let message = error.to_string();
        assert_eq!(error.kind(), ErrorKind::Connection, "{message}");
        assert!(message.contains("cannot open the database"), "{message}");
        assert!(message.contains("fix DATABASE_URL"), "{message}");
        assert!(message.contains("unset it"), "{message}");
        assert!(!message.contains('\n'), "{message}");
        assert!(
            !message.contains("s3cret"),
            "the password is not shown: {message}"
        );
    }
}
