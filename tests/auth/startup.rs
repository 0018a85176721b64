//! Start-up: a verifier that starts after several rotations reads the
//! newest announcement (memory, and Redis Streams with its history trimmed),
//! and what following needs from the verifier and the transport.

use std::sync::Arc;
use std::time::Duration;

use switchboard::auth::{AnnouncementError, AuthError, Claims, KeysRotated, TokenVerifier};
use switchboard::{ErrorKind, MemoryTransport, Publisher, SubscribeOptions, Transport};

use super::super::{ED_PUBLIC, ISSUER};
use super::{AUDIENCE, Issuer, OVERLAP, TestClock, bus, until_applied, verifier};

#[tokio::test]
async fn a_verifier_started_after_two_rotations_accepts_current_tokens_at_once() {
    let clock = TestClock::new();
    let bus = bus(Arc::new(MemoryTransport::new()));
    let mut auth = Issuer::new();
    bus.publish(auth.announcement()).await.unwrap();
    let first_token = auth.current().token("user-1");
    for _ in 0..2 {
        clock.advance(OVERLAP + Duration::from_secs(1));
        auth.rotate(clock.now());
        bus.publish(auth.announcement()).await.unwrap();
    }

    let verifier = verifier(&clock);
    let follower = verifier
        .follow(&bus, SubscribeOptions::new("game-keys-late"))
        .await
        .unwrap();
    // No waiting: the newest announcement was read before `follow` returned.
    let claims: Claims = verifier.verify(&auth.current().token("user-3")).unwrap();
    assert_eq!(claims.sub, "user-3");
    assert_eq!(verifier.key_set_sequence(), Some(3));
    assert_eq!(
        verifier.verify::<Claims>(&first_token).unwrap_err(),
        AuthError::UnknownKey {
            kid: Some("k1".into())
        }
    );
    follower.shutdown().await.unwrap();
}

/// The same on Redis Streams, with the history trimmed down to the newest
/// entry: the start-up read does not depend on the old entries.
#[cfg(feature = "redis-streams")]
#[tokio::test]
async fn a_verifier_started_after_two_rotations_on_redis_streams_needs_no_history() {
    let url = std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    let transport = switchboard::RedisStreamsTransport::connect(&url)
        .await
        .expect("Redis at REDIS_URL or 127.0.0.1:6379");
    let bus = bus(Arc::new(transport.clone()));
    let clock = TestClock::new();
    let mut auth = Issuer::new();
    bus.publish(auth.announcement()).await.unwrap();
    for _ in 0..2 {
        auth.rotate(clock.now());
        bus.publish(auth.announcement()).await.unwrap();
    }
    let stream = transport.stream_key(&bus.topic_of::<KeysRotated>());
    let mut redis = redis::Client::open(url.as_str())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let trimmed: u64 = redis::cmd("XTRIM")
        .arg(&stream)
        .arg("MAXLEN")
        .arg(1)
        .query_async(&mut redis)
        .await
        .unwrap();
    assert_eq!(trimmed, 2);

    let verifier = verifier(&clock);
    let follower = verifier
        .follow(&bus, SubscribeOptions::new("game-keys-late"))
        .await
        .unwrap();
    assert!(
        verifier
            .verify::<Claims>(&auth.current().token("user-3"))
            .is_ok()
    );
    assert_eq!(verifier.key_set_sequence(), Some(3));

    // And it keeps following: the next rotation arrives by the subscription.
    auth.rotate(clock.now());
    bus.publish(auth.announcement()).await.unwrap();
    until_applied(&verifier, 4).await;
    assert!(
        verifier
            .verify::<Claims>(&auth.current().token("user-4"))
            .is_ok()
    );
    follower.shutdown().await.unwrap();
    bus.purge_namespace().await.unwrap();
}

#[tokio::test]
async fn following_needs_a_pinned_key_signing_key() {
    let bus = bus(Arc::new(MemoryTransport::new()));
    let unpinned = TokenVerifier::ed25519_pem(ED_PUBLIC, ISSUER)
        .unwrap()
        .with_audience(AUDIENCE);
    let error = unpinned
        .follow(&bus, SubscribeOptions::new("keys"))
        .await
        .unwrap_err();
    assert_eq!(error.kind(), ErrorKind::Config);
    assert_eq!(
        unpinned.apply(&Issuer::new().announcement()).unwrap_err(),
        AnnouncementError::NoTrustAnchor
    );
}

#[tokio::test]
async fn the_latest_read_is_unsupported_where_nothing_is_kept() {
    // A transport without history says so instead of answering "none".
    struct NoHistory(MemoryTransport);
    #[async_trait::async_trait]
    impl Publisher for NoHistory {
        async fn publish(
            &self,
            topic: &str,
            message: switchboard::RawMessage,
        ) -> Result<(), switchboard::Error> {
            self.0.publish(topic, message).await
        }
    }
    #[async_trait::async_trait]
    impl switchboard::Subscriber for NoHistory {
        async fn subscribe(
            &self,
            topic: &str,
            options: SubscribeOptions,
        ) -> Result<switchboard::Subscription, switchboard::Error> {
            self.0.subscribe(topic, options).await
        }
    }
    #[async_trait::async_trait]
    impl Transport for NoHistory {
        fn name(&self) -> &'static str {
            "no-history"
        }
        fn capabilities(&self) -> switchboard::Capabilities {
            self.0.capabilities()
        }
        async fn declare(
            &self,
            topology: &switchboard::Topology,
        ) -> Result<(), switchboard::Error> {
            self.0.declare(topology).await
        }
    }
    let bus = bus(Arc::new(NoHistory(MemoryTransport::new())));
    let error = bus.read_latest::<KeysRotated>().await.unwrap_err();
    assert_eq!(error.kind(), ErrorKind::Unsupported);
    // Following still works: keys come with the next announcement.
    let clock = TestClock::new();
    let verifier = verifier(&clock);
    let follower = verifier
        .follow(&bus, SubscribeOptions::new("keys"))
        .await
        .unwrap();
    bus.publish(Issuer::new().announcement()).await.unwrap();
    until_applied(&verifier, 1).await;
    follower.shutdown().await.unwrap();
}
