//! The operator console's actions authenticated by the Auth service's
//! tokens (`ConsoleBuilder::verifier`): a valid token acts, a forged or
//! expired one is 401, and the operator token still works beside it.

use std::sync::Arc;

use axum::body::Body;
use http::{Request, StatusCode};
use switchboard::MemoryTransport;
use switchboard::console::Console;
use switchboard::middleware::dead_letter::DeadLetterAdmin;
use tower::ServiceExt;

use super::{ed_verifier, good_claims, sign_ed, unsigned, with_claim};

fn redrive_all(bearer: &str) -> Request<Body> {
    Request::post("/api/dead-letters/trade.executed/redrive-all")
        .header("authorization", format!("Bearer {bearer}"))
        .body(Body::empty())
        .unwrap()
}

#[tokio::test]
async fn a_token_the_verifier_accepts_acts_and_others_are_refused() {
    let console = Console::builder("game")
        .dead_letters(
            DeadLetterAdmin::new(Arc::new(MemoryTransport::new())),
            ["trade.executed"],
        )
        .verifier(Arc::new(ed_verifier()))
        .operator_token("an operator token")
        .build();
    let app = console.router();

    let accepted = app
        .clone()
        .oneshot(redrive_all(&sign_ed(&good_claims())))
        .await
        .unwrap();
    assert_eq!(accepted.status(), StatusCode::OK);
    let operator = app
        .clone()
        .oneshot(redrive_all("an operator token"))
        .await
        .unwrap();
    assert_eq!(operator.status(), StatusCode::OK);

    let expired = with_claim(good_claims(), "exp", serde_json::json!(1));
    for refused in [
        unsigned(&good_claims()),
        sign_ed(&expired),
        "garbage".to_owned(),
    ] {
        let response = app.clone().oneshot(redrive_all(&refused)).await.unwrap();
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED, "{refused}");
    }
}
