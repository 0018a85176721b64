//! Auth's signing keys end to end: they survive Auth's restart (kept in its
//! key directory), and a rotation reaches Trading and Game as a signed
//! announcement on the bus — they keep verifying with Auth down.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use switchboard::auth::Claims;

use super::common::auth_keys::{KeySource, TRUST_ANCHOR_FILE, follow_auth_keys};
use super::common::auth_service::{
    AuthConfig, AuthService, Credentials, GAME_AUDIENCE, Registered, Token,
};
use super::common::brokers::Brokers;
use super::common::database::Database;
use super::{DEADLINE, buy, world};

fn kid_of(token: &str) -> String {
    jsonwebtoken::decode_header(token)
        .expect("a JWT")
        .kid
        .expect("Auth names its key")
}

/// Polls `probe` until it succeeds, under the deadline: a key announcement
/// reaches the verifiers a moment after Auth publishes it.
async fn until_ok<T, E: std::fmt::Debug, Fut>(mut probe: impl FnMut() -> Fut) -> T
where
    Fut: Future<Output = Result<T, E>>,
{
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        match probe().await {
            Ok(value) => return value,
            Err(error) if tokio::time::Instant::now() >= deadline => {
                panic!("still failing after {DEADLINE:?}: {error:?}")
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
        }
    }
}

#[tokio::test]
async fn a_key_rotation_reaches_trading_and_game_over_the_bus() {
    let world = world().await;
    let old_kid = kid_of(&world.token);
    world.platform.auth.rotate_keys().await.expect("rotated");
    assert_ne!(world.platform.auth.current_kid(), old_kid);

    let username = format!("carol-{}", uuid::Uuid::new_v4().simple());
    let user_id = world
        .gateway
        .register(&username, "a long password")
        .await
        .unwrap();
    let fresh = world
        .gateway
        .login(&username, "a long password")
        .await
        .unwrap();
    assert_eq!(kid_of(&fresh), world.platform.auth.current_kid());

    // Auth goes down: nobody can ask it for keys, yet both sessions work
    // on Trading and Game — the new key came with the announcement.
    let mut auth = world.platform.auth;
    auth.stop().await;
    until_ok(|| world.gateway.orders(&fresh)).await;
    until_ok(|| world.gateway.holdings(&fresh, &user_id, None)).await;
    world
        .gateway
        .place_order(&fresh, buy("NVDA", rust_decimal_macros::dec!(1)))
        .await
        .expect("the new key's session trades");
    world
        .gateway
        .place_order(&world.token, buy("NVDA", rust_decimal_macros::dec!(1)))
        .await
        .expect("the old key's session still trades within the overlap");
    world
        .gateway
        .holdings(&world.token, &world.user_id, None)
        .await
        .expect("the old key's session still reads");
}

async fn post<T: serde::de::DeserializeOwned>(
    at: SocketAddr,
    path: &str,
    credentials: &Credentials,
) -> T {
    let response = reqwest::Client::new()
        .post(format!("http://{at}{path}"))
        .json(credentials)
        .send()
        .await
        .unwrap();
    assert!(
        response.status().is_success(),
        "{path}: {}",
        response.status()
    );
    response.json().await.unwrap()
}

/// Registers a user on `auth` and logs in.
async fn login(auth: &AuthService) -> String {
    // A new user each time: the users outlive Auth's restarts.
    let credentials = Credentials {
        username: format!("dave-{}", uuid::Uuid::new_v4().simple()),
        password: "a long password".into(),
    };
    let _: Registered = post(auth.addrs().http, "/v1/users", &credentials).await;
    let token: Token = post(auth.addrs().http, "/v1/tokens", &credentials).await;
    token.token
}

#[tokio::test]
async fn auths_signing_key_survives_its_restart() {
    let dir = std::env::temp_dir().join(format!("auth-keys-{}", uuid::Uuid::new_v4().simple()));
    let config = AuthConfig {
        keys: KeySource::Dir(dir.clone()),
        ..AuthConfig::in_memory(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)))
    };
    let brokers = Brokers::memory();
    let database = Database::open(None).await.unwrap();
    let mut auth = AuthService::start(&brokers, &database, config.clone())
        .await
        .unwrap();
    let anchor = std::fs::read_to_string(dir.join(TRUST_ANCHOR_FILE)).unwrap();
    assert_eq!(anchor, auth.trust_anchor_pem());
    let (verifier, follower) = follow_auth_keys(&brokers, "game-service", GAME_AUDIENCE, &anchor)
        .await
        .unwrap();
    let before = login(&auth).await;
    let first_kid = kid_of(&before);
    assert!(verifier.verify::<Claims>(&before).is_ok());

    // A new Auth from the same directory: the same keys, not fresh ones.
    auth.stop().await;
    drop(auth);
    let mut auth = AuthService::start(&brokers, &database, config.clone())
        .await
        .unwrap();
    assert_eq!(auth.current_kid(), first_kid);
    assert_eq!(auth.trust_anchor_pem(), anchor);
    let after = login(&auth).await;
    assert_eq!(kid_of(&after), first_kid);
    // Its start-up announcement is newer and holds the same key.
    until_ok(|| async {
        match verifier.key_set_sequence() {
            Some(2) => Ok(()),
            other => Err(other),
        }
    })
    .await;
    assert!(verifier.verify::<Claims>(&before).is_ok());
    assert!(verifier.verify::<Claims>(&after).is_ok());

    // A rotation is kept too: the next start signs with the rotated key and
    // still announces the old one for its overlap.
    auth.rotate_keys().await.unwrap();
    let rotated_kid = auth.current_kid();
    assert_ne!(rotated_kid, first_kid);
    auth.stop().await;
    drop(auth);
    let mut auth = AuthService::start(&brokers, &database, config)
        .await
        .unwrap();
    assert_eq!(auth.current_kid(), rotated_kid);
    let (late, late_follower) = follow_auth_keys(&brokers, "game-service", GAME_AUDIENCE, &anchor)
        .await
        .unwrap();
    assert_eq!(late.key_ids(), [first_kid, rotated_kid]);
    assert!(late.verify::<Claims>(&before).is_ok());
    assert!(late.verify::<Claims>(&login(&auth).await).is_ok());

    auth.stop().await;
    follower.shutdown().await.unwrap();
    late_follower.shutdown().await.unwrap();
    database.close().await;
    std::fs::remove_dir_all(&dir).unwrap();
}
