//! The operator console in a real browser: headless Chromium driven over
//! WebDriver opens Game's console and, reading only the page, sees Market's
//! breaker open while Market is down and close once it is back, sees a
//! poison trade in the dead-letter queue, redrives it with a click (and a
//! confirmation) once its cause is fixed, and sees the queue empty and the
//! trade applied. The browser's console log is read after every step and
//! must hold no error. Skipped, saying why, only when Chromium and its
//! driver are missing and cannot be installed (`scripts/browser-deps`).
//! A screenshot of the console goes to the target directory, or where
//! `CONSOLE_SCREENSHOT` says (`docs/console.png` for the README).

use std::time::Duration;

use rust_decimal_macros::dec;
use switchboard::Event;

use super::common::domain::TradeExecuted;
use super::webdriver::{Browser, find_browser};
use super::{buy, trade, world};

const PAGE_DEADLINE: Duration = Duration::from_secs(20);

/// Fails on any error the page logged since the last look.
async fn no_errors(browser: &Browser, step: &str) {
    let errors: Vec<_> = browser
        .console_log()
        .await
        .into_iter()
        .filter(|entry| entry["level"] == "SEVERE")
        .collect();
    assert!(
        errors.is_empty(),
        "after {step}, the browser logged errors: {errors:?}"
    );
}

fn breaker_state(name: &str) -> String {
    format!(
        r#"const cell = document.querySelector('#breakers tr[data-breaker="{name}"] .state');
           return cell ? cell.textContent : null;"#
    )
}

async fn until_breaker(browser: &Browser, name: &str, wanted: &str, mut drive: impl AsyncFnMut()) {
    let script = breaker_state(name);
    tokio::time::timeout(PAGE_DEADLINE, async {
        loop {
            if browser.eval(&script).await == wanted {
                return;
            }
            drive().await;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("the page never showed breaker {name} {wanted}"));
}

/// The `handled` count of the row of `topic`'s consumer, as the page shows it.
fn handled_of(topic: &str) -> String {
    format!(
        r#"const row = document.querySelector('#consumers tr[data-consumer="{topic}/game"]');
           return row ? Number(row.children[5].textContent) : null;"#
    )
}

#[tokio::test]
async fn the_console_shows_a_breaker_and_redrives_a_dead_letter_in_a_browser() {
    let (chromium, chromedriver) = match find_browser() {
        Ok(found) => found,
        Err(why) => {
            println!("SKIPPED the console's browser test: {why}");
            return;
        }
    };
    let mut world = world().await;
    world
        .gateway
        .place_order(&world.token, buy("AAPL", dec!(4)))
        .await
        .expect("an order");
    world.platform.game.wait_for_trades(&world.user_id, 1).await;

    let browser = Browser::start(&chromium, &chromedriver, PAGE_DEADLINE).await;
    browser.goto(&world.platform.game.console_url()).await;
    let title = browser.eval("return document.title").await;
    assert!(
        title.as_str().unwrap_or_default().contains("game-service"),
        "{title}"
    );
    browser
        .wait_for("the breakers", PAGE_DEADLINE, &breaker_state("market"))
        .await;
    assert_eq!(browser.eval(&breaker_state("market")).await, "closed");
    no_errors(&browser, "opening the console").await;

    // Market goes down: Game's next quote fails and opens the breaker.
    world.platform.market.stop().await;
    let game = &world.platform.game;
    let user = world.user_id.clone();
    until_breaker(&browser, "market", "open", async || {
        let _ = game.portfolio(&user).await;
    })
    .await;
    no_errors(&browser, "Market stopped").await;

    world.platform.market.restart().await.expect("Market back");
    let game = &world.platform.game;
    until_breaker(&browser, "market", "closed", async || {
        let _ = game.portfolio(&user).await;
    })
    .await;
    no_errors(&browser, "Market back").await;

    // A trade for a user Auth does not know is dead-lettered.
    let applied_before = browser
        .wait_for(
            "the ledger's consumer",
            PAGE_DEADLINE,
            &handled_of(TradeExecuted::TYPE),
        )
        .await;
    let ghost = uuid::Uuid::new_v4().to_string();
    let bus = world.brokers.events("trading-service");
    let event_id = bus.publish(trade(&ghost, dec!(3))).await.expect("publish");
    let topic = TradeExecuted::TYPE;
    let letter_row = format!(r#"#dead-letters .topic[data-topic="{topic}"] tr[data-letter]"#);
    let id = browser
        .wait_for(
            "the poison trade in the dead-letter queue",
            PAGE_DEADLINE,
            &format!(
                r#"const row = document.querySelector('{letter_row}');
                   return row && row.textContent.includes('whom Auth does not know') ? row.dataset.letter : null;"#
            ),
        )
        .await;
    assert_eq!(id, event_id.to_string());
    no_errors(&browser, "the poison trade").await;
    let png = browser.screenshot().await;
    assert!(png.starts_with(b"\x89PNG"), "a PNG");
    // Into the target directory; CONSOLE_SCREENSHOT=docs/console.png
    // refreshes the README's picture.
    let shot = std::env::var("CONSOLE_SCREENSHOT")
        .map(|path| std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(path))
        .unwrap_or_else(|_| std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("console.png"));
    std::fs::write(&shot, &png).unwrap_or_else(|error| panic!("{}: {error}", shot.display()));

    // Inspecting it shows the envelope: the trade for the unknown user.
    browser
        .click(&format!("{letter_row} a"), PAGE_DEADLINE)
        .await;
    browser
        .wait_for(
            "the inspected envelope",
            PAGE_DEADLINE,
            &format!(
                r#"const envelope = document.getElementById('envelope');
                   return envelope && envelope.textContent.includes('{ghost}');"#
            ),
        )
        .await;
    no_errors(&browser, "inspecting the dead letter").await;
    browser.goto(&world.platform.game.console_url()).await;
    browser
        .wait_for(
            "the dead letter again",
            PAGE_DEADLINE,
            &format!("return document.querySelector('{letter_row}') !== null;"),
        )
        .await;

    // The cause is fixed; the operator redrives it from the page.
    world
        .platform
        .auth
        .restore_user(&ghost, "restored")
        .await
        .expect("restore");
    browser
        .type_into("#token", world.platform.game.console_token())
        .await;
    browser
        .click(&format!(r#"{letter_row} button.redrive"#), PAGE_DEADLINE)
        .await;
    let question = browser.accept_confirmation(PAGE_DEADLINE).await;
    assert!(question.contains(&event_id.to_string()), "{question}");
    browser
        .wait_for(
            "the dead-letter queue empty",
            PAGE_DEADLINE,
            &format!(
                r#"const empty = document.querySelector('#dead-letters .topic[data-topic="{topic}"] .empty');
                   return empty !== null && document.getElementById('status').textContent === 'redriven: 1';"#
            ),
        )
        .await;
    let applied_after = browser
        .wait_for(
            "the trade applied",
            PAGE_DEADLINE,
            &format!(
                r#"const handled = (function () {{ {} }})();
                   return handled > {applied_before} ? handled : null;"#,
                handled_of(topic)
            ),
        )
        .await;
    assert!(applied_after.as_u64() > applied_before.as_u64());
    no_errors(&browser, "the redrive").await;
    let portfolio = world
        .platform
        .game
        .portfolio(&ghost)
        .await
        .expect("holdings");
    assert_eq!(portfolio.positions[0].quantity, dec!(3));

    browser.quit().await;
    drop(browser);
    world.finish().await;
}
