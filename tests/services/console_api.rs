//! The operator console's answers to bad input and to actions it must
//! refuse, over HTTP against Game's console: unknown topics and ids,
//! malformed ids and queries get a clear 4xx, never a 500; an action
//! without the operator token is 401, from a foreign origin 403; a
//! read-only console refuses every action.

use std::sync::Arc;

use reqwest::StatusCode;
use rust_decimal_macros::dec;
use switchboard::console::Console;
use switchboard::middleware::dead_letter::DeadLetterAdmin;
use switchboard::{Event, MemoryTransport};

use super::common::domain::TradeExecuted;
use super::{DEADLINE, trade, world};

async fn status_and_error(response: reqwest::Response) -> (StatusCode, String) {
    let status = response.status();
    let body: serde_json::Value = response.json().await.expect("a JSON error");
    (
        status,
        body["error"].as_str().unwrap_or_default().to_owned(),
    )
}

#[tokio::test]
async fn bad_input_gets_a_clear_4xx_and_actions_need_the_token_from_the_same_origin() {
    let world = world().await;
    let console = world.platform.game.console_url();
    let http = reqwest::Client::new();
    let topic = TradeExecuted::TYPE;
    let get = |path: String| http.get(format!("{console}{path}")).send();

    let (status, error) =
        status_and_error(get("/api/dead-letters/no.such.topic".into()).await.unwrap()).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(error.contains("unknown topic"), "{error}");
    let (status, error) = status_and_error(
        get(format!("/api/dead-letters/{topic}/no-such-id"))
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{error}");
    let long_id = "x".repeat(300);
    let (status, error) = status_and_error(
        get(format!("/api/dead-letters/{topic}/{long_id}"))
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(error.contains("malformed dead-letter id"), "{error}");
    for query in ["limit=0", "limit=ten", "offset=2"] {
        let response = get(format!("/api/dead-letters/{topic}?{query}"))
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::BAD_REQUEST, "{query}");
    }
    let response = get("/no/such/page".into()).await.unwrap();
    assert_eq!(response.status(), StatusCode::NOT_FOUND);
    // An action by GET is not an action.
    let response = get(format!("/api/dead-letters/{topic}/redrive-all"))
        .await
        .unwrap();
    assert!(response.status().is_client_error(), "{}", response.status());

    // A dead letter to act on.
    let bus = world.brokers.events("trading-service");
    let event_id = bus
        .publish(trade(&uuid::Uuid::new_v4().to_string(), dec!(1)))
        .await
        .expect("publish");
    tokio::time::timeout(DEADLINE, async {
        loop {
            let listed: serde_json::Value = get(format!("/api/dead-letters/{topic}"))
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            if listed["letters"]
                .as_array()
                .is_some_and(|letters| !letters.is_empty())
            {
                return;
            }
            tokio::task::yield_now().await;
        }
    })
    .await
    .expect("the poison trade is listed");
    let inspected: serde_json::Value = get(format!("/api/dead-letters/{topic}/{event_id}"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(inspected["id"], event_id.to_string());
    assert_eq!(inspected["envelope"]["payload"]["quantity"], "1");

    let overview: serde_json::Value = get("/api/overview".into())
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let ledger = overview["consumers"]
        .as_array()
        .expect("consumers")
        .iter()
        .find(|consumer| consumer["topic"] == topic)
        .expect("the ledger's consumer");
    assert_eq!(ledger["state"], "running");
    assert_eq!(
        ledger["lag"], 0,
        "the memory transport tells the lag: {ledger}"
    );
    assert!(ledger["failed"].as_u64() >= Some(1), "{ledger}");

    let redrive = format!("{console}/api/dead-letters/{topic}/{event_id}/redrive");
    let token = world.platform.game.console_token().to_owned();
    let (status, error) = status_and_error(http.post(&redrive).send().await.unwrap()).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{error}");
    let (status, _) = status_and_error(
        http.post(&redrive)
            .bearer_auth("wrong")
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let (status, error) = status_and_error(
        http.post(&redrive)
            .bearer_auth(&token)
            .header("Origin", "http://evil.example")
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert!(error.contains("cross-site"), "{error}");
    let unknown = format!("{console}/api/dead-letters/{topic}/no-such-id/redrive");
    let (status, _) = status_and_error(
        http.post(&unknown)
            .bearer_auth(&token)
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    // With the token, from no browser (a script): done.
    let done: serde_json::Value = http
        .post(&redrive)
        .bearer_auth(&token)
        .send()
        .await
        .unwrap()
        .error_for_status()
        .expect("redriven")
        .json()
        .await
        .unwrap();
    assert_eq!(done["redriven"], 1);
    world.finish().await;
}

#[test]
fn the_console_flag_keeps_the_platform_running() {
    use super::common::cli::Flags;
    let args = ["--console", "--orders", "3"].map(str::to_owned);
    let flags = Flags::parse(args, "usage")
        .expect("valid flags")
        .expect("not --help");
    assert!(flags.console);
    assert_eq!(flags.orders, Some(3));
    let none = Flags::parse(Vec::new(), "usage").unwrap().unwrap();
    assert!(!none.console);
}

#[tokio::test]
async fn a_read_only_console_shows_no_actions_and_refuses_them() {
    let transport = Arc::new(MemoryTransport::new());
    let console = Console::builder("dashboard")
        .dead_letters(DeadLetterAdmin::new(transport), [TradeExecuted::TYPE])
        .operator_token("t0ken")
        .read_only()
        .build();
    assert!(console.is_read_only());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(async move {
        axum::serve(
            listener,
            axum::Router::new().nest("/console", console.router()),
        )
        .await
        .ok();
    });
    let http = reqwest::Client::new();
    let page = http
        .get(format!("http://{addr}/console"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(page.contains("read-only"), "{page}");
    assert!(!page.contains("id=\"token\""), "{page}");
    let response = http
        .post(format!(
            "http://{addr}/console/api/dead-letters/{}/redrive-all",
            TradeExecuted::TYPE
        ))
        .bearer_auth("t0ken")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::FORBIDDEN);
    server.abort();
}
