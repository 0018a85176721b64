//! Key rotation: verifiers learn Auth's key set from signed announcements
//! on the bus (no call to Auth), select keys by `kid`, keep the old key for
//! the announced overlap and refuse it after, refuse announcements not
//! signed by the pinned key-signing key, and a verifier that starts late
//! reads the newest announcement instead of the history.
//!
//! The key-signing key is the fixture pair; token-signing keys are made per
//! test. Overlap expiry runs on an injected clock, not on sleeps.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, EncodingKey, Header, get_current_timestamp};
use serde_json::json;
use switchboard::auth::{
    AnnouncedKey, AnnouncementError, AuthError, AuthLayer, Claims, KeyAlgorithm, KeySigningKey,
    KeysRotated, TokenVerifier, TrustAnchor,
};
use switchboard::{ErrorKind, EventBus, MemoryTransport, SubscribeOptions, Transport};
use tower::{Layer, ServiceExt};

use super::{ED_PRIVATE, ED_PUBLIC, ISSUER, OTHER_ED_PRIVATE, echo_subject, request};

const AUDIENCE: &str = "game-service";
const OVERLAP: Duration = Duration::from_secs(30 * 60);
const DEADLINE: Duration = Duration::from_secs(10);

/// One token-signing key of the simulated Auth.
struct SigningKey {
    kid: String,
    private_pem: String,
    public_pem: String,
    valid_from: u64,
    not_after: Option<u64>,
}

impl SigningKey {
    fn new(kid: &str) -> Self {
        let pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).expect("Ed25519 key");
        Self {
            kid: kid.into(),
            private_pem: pair.serialize_pem(),
            public_pem: pair.public_key_pem(),
            valid_from: get_current_timestamp(),
            not_after: None,
        }
    }

    fn announced(&self) -> AnnouncedKey {
        AnnouncedKey {
            kid: self.kid.clone(),
            algorithm: "EdDSA".into(),
            public_key_pem: self.public_pem.clone(),
            valid_from: self.valid_from,
            not_after: self.not_after,
        }
    }

    /// A token for `sub`, valid ten minutes, naming this key.
    fn token(&self, sub: &str) -> String {
        let mut header = Header::new(Algorithm::EdDSA);
        header.kid = Some(self.kid.clone());
        sign_with(header, &self.private_pem, sub)
    }
}

fn sign_with(header: Header, private_pem: &str, sub: &str) -> String {
    let now = get_current_timestamp();
    let claims =
        json!({ "sub": sub, "iss": ISSUER, "aud": [AUDIENCE], "exp": now + 600, "iat": now });
    let key = EncodingKey::from_ed_pem(private_pem.as_bytes()).unwrap();
    jsonwebtoken::encode(&header, &claims, &key).unwrap()
}

/// What Auth does, minus HTTP: holds its keys, rotates, announces.
struct Issuer {
    keys: Vec<SigningKey>,
    sequence: u64,
    signer: KeySigningKey,
}

impl Issuer {
    fn new() -> Self {
        Self {
            keys: vec![SigningKey::new("k1")],
            sequence: 1,
            signer: KeySigningKey::ed25519_pem(ED_PRIVATE).unwrap(),
        }
    }

    fn current(&self) -> &SigningKey {
        self.keys.last().expect("a key")
    }

    fn announcement(&self) -> KeysRotated {
        let keys = self.keys.iter().map(SigningKey::announced).collect();
        KeysRotated::signed(ISSUER, self.sequence, keys, &self.signer).unwrap()
    }

    /// A new current key; the old one valid for `OVERLAP` from `now`;
    /// keys whose overlap ended by `now` left out.
    fn rotate(&mut self, now: u64) {
        for key in &mut self.keys {
            key.not_after.get_or_insert(now + OVERLAP.as_secs());
        }
        self.keys
            .retain(|key| key.not_after.is_none_or(|not_after| not_after > now));
        let kid = format!("k{}", self.sequence + 1);
        self.keys.push(SigningKey::new(&kid));
        self.sequence += 1;
    }
}

/// A clock the test moves by hand, in seconds since the epoch.
#[derive(Clone)]
struct TestClock(Arc<AtomicU64>);

impl TestClock {
    fn new() -> Self {
        Self(Arc::new(AtomicU64::new(get_current_timestamp())))
    }

    fn now(&self) -> u64 {
        self.0.load(Ordering::SeqCst)
    }

    fn advance(&self, by: Duration) {
        self.0.fetch_add(by.as_secs(), Ordering::SeqCst);
    }
}

fn verifier(clock: &TestClock) -> TokenVerifier {
    let clock = clock.0.clone();
    TokenVerifier::from_announcements(
        KeyAlgorithm::EdDsa,
        ISSUER,
        TrustAnchor::ed25519_pem(ED_PUBLIC).unwrap(),
    )
    .with_audience(AUDIENCE)
    .with_clock(move || UNIX_EPOCH + Duration::from_secs(clock.load(Ordering::SeqCst)))
}

fn bus(transport: Arc<dyn Transport>) -> EventBus {
    EventBus::new(transport, "auth-service")
        .with_namespace(format!("rotation-{}", uuid::Uuid::new_v4().simple()))
}

/// Waits until the verifier holds the announcement `sequence` (applied by
/// its follower), under a deadline.
async fn until_applied(verifier: &TokenVerifier, sequence: u64) {
    tokio::time::timeout(DEADLINE, async {
        while verifier.key_set_sequence() < Some(sequence) {
            tokio::task::yield_now().await;
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    })
    .await
    .unwrap_or_else(|_| {
        panic!(
            "announcement {sequence} not applied in {DEADLINE:?}; holding {:?}",
            verifier.key_set_sequence()
        )
    });
}

#[tokio::test]
async fn a_rotation_mid_session_accepts_both_keys_during_the_overlap_and_the_old_one_no_longer_after()
 {
    let clock = TestClock::new();
    let bus = bus(Arc::new(MemoryTransport::new()));
    let mut auth = Issuer::new();
    bus.publish(auth.announcement()).await.unwrap();

    let verifier = Arc::new(verifier(&clock));
    let follower = verifier
        .follow(&bus, SubscribeOptions::new("game-keys-1"))
        .await
        .unwrap();
    let calls = Arc::new(AtomicUsize::new(0));
    let service = AuthLayer::new(verifier.clone()).layer(echo_subject(calls.clone()));
    let call = |token: String| {
        service
            .clone()
            .oneshot(request(Some(format!("Bearer {token}")), "application/json"))
    };

    // The session starts on k1.
    let before = auth.current().token("user-1");
    assert_eq!(call(before.clone()).await.unwrap().body(), "user-1");

    // Auth rotates mid-session and announces on the bus; no one calls Auth.
    auth.rotate(clock.now());
    bus.publish(auth.announcement()).await.unwrap();
    until_applied(&verifier, 2).await;
    let after = auth.current().token("user-2");
    assert_eq!(call(before.clone()).await.unwrap().body(), "user-1");
    assert_eq!(call(after.clone()).await.unwrap().body(), "user-2");
    assert_eq!(verifier.key_ids(), ["k1", "k2"]);

    // Still within the overlap a second before it ends...
    clock.advance(OVERLAP - Duration::from_secs(1));
    assert!(verifier.verify::<Claims>(&before).is_ok());
    // ...and refused once it has.
    clock.advance(Duration::from_secs(1));
    assert_eq!(
        verifier.verify::<Claims>(&before).unwrap_err(),
        AuthError::KeyRetired { kid: "k1".into() }
    );
    let refused = call(before).await.unwrap();
    assert_eq!(refused.status(), http::StatusCode::UNAUTHORIZED);
    assert_eq!(call(after).await.unwrap().body(), "user-2");
    assert_eq!(verifier.key_ids(), ["k2"]);
    assert_eq!(
        calls.load(Ordering::SeqCst),
        4,
        "the refused call got through"
    );
    follower.shutdown().await.unwrap();
}

#[tokio::test]
async fn an_unknown_kid_is_refused() {
    let clock = TestClock::new();
    let auth = Issuer::new();
    let verifier = verifier(&clock);
    assert!(verifier.apply(&auth.announcement()).unwrap());

    // A key Auth never announced, though the signature is fine.
    let stray = SigningKey::new("k-unannounced");
    assert_eq!(
        verifier
            .verify::<Claims>(&stray.token("user-1"))
            .unwrap_err(),
        AuthError::UnknownKey {
            kid: Some("k-unannounced".into())
        }
    );
    // A token naming an announced kid but signed by another key.
    let mut header = Header::new(Algorithm::EdDSA);
    header.kid = Some("k1".into());
    let forged = sign_with(header, &stray.private_pem, "user-1");
    assert_eq!(
        verifier.verify::<Claims>(&forged).unwrap_err(),
        AuthError::BadSignature
    );
    // No kid at all, where every key has one.
    let nameless = sign_with(
        Header::new(Algorithm::EdDSA),
        &auth.current().private_pem,
        "user-1",
    );
    assert_eq!(
        verifier.verify::<Claims>(&nameless).unwrap_err(),
        AuthError::UnknownKey { kid: None }
    );
    let error = switchboard::Error::from(AuthError::UnknownKey { kid: None });
    assert_eq!(error.kind(), ErrorKind::Unauthorized);
    // A verifier that has heard nothing refuses everything by kid.
    let empty = self::verifier(&clock);
    assert_eq!(
        empty
            .verify::<Claims>(&auth.current().token("user-1"))
            .unwrap_err(),
        AuthError::UnknownKey {
            kid: Some("k1".into())
        }
    );
}

#[tokio::test]
async fn an_announcement_not_signed_by_the_pinned_key_is_refused() {
    let clock = TestClock::new();
    let mut auth = Issuer::new();
    let verifier = verifier(&clock);
    verifier.apply(&auth.announcement()).unwrap();
    let genuine = auth.current().token("user-1");

    // An attacker who leaked the token-signing key signs an announcement of
    // their own key with it: not the key-signing key, so refused.
    let attacker = SigningKey::new("evil");
    let leaked_as_signer =
        KeySigningKey::ed25519_pem(auth.current().private_pem.as_bytes()).unwrap();
    let with_leaked_key =
        KeysRotated::signed(ISSUER, 99, vec![attacker.announced()], &leaked_as_signer).unwrap();
    assert_eq!(
        verifier.apply(&with_leaked_key).unwrap_err(),
        AnnouncementError::NotSignedByAnchor
    );
    // Any other key-signing key: refused.
    let stranger = KeySigningKey::ed25519_pem(OTHER_ED_PRIVATE).unwrap();
    let by_stranger =
        KeysRotated::signed(ISSUER, 99, vec![attacker.announced()], &stranger).unwrap();
    assert_eq!(
        verifier.apply(&by_stranger).unwrap_err(),
        AnnouncementError::NotSignedByAnchor
    );
    // A genuine announcement changed after signing: refused.
    let mut tampered = auth.announcement();
    tampered.keys.push(attacker.announced());
    assert_eq!(
        verifier.apply(&tampered).unwrap_err(),
        AnnouncementError::NotSignedByAnchor
    );
    let mut garbled = auth.announcement();
    garbled.signature = "not base64url!".into();
    assert_eq!(
        verifier.apply(&garbled).unwrap_err(),
        AnnouncementError::NotSignedByAnchor
    );
    // Signed by the anchor but for another issuer: refused.
    let other_issuer =
        KeysRotated::signed("evil-auth", 99, vec![attacker.announced()], &auth.signer).unwrap();
    assert!(matches!(
        verifier.apply(&other_issuer).unwrap_err(),
        AnnouncementError::WrongIssuer { .. }
    ));
    // Nothing changed: the attacker's tokens are refused, Auth's accepted.
    assert_eq!(verifier.key_set_sequence(), Some(1));
    assert_eq!(
        verifier
            .verify::<Claims>(&attacker.token("admin"))
            .unwrap_err(),
        AuthError::UnknownKey {
            kid: Some("evil".into())
        }
    );
    assert!(verifier.verify::<Claims>(&genuine).is_ok());

    // On the bus: the forgery is dead-lettered, the next genuine
    // announcement still applies.
    let transport = MemoryTransport::new();
    let bus = bus(Arc::new(transport.clone()));
    let follower = verifier
        .follow(&bus, SubscribeOptions::new("game-keys-1"))
        .await
        .unwrap();
    bus.publish(by_stranger).await.unwrap();
    auth.rotate(clock.now());
    auth.rotate(clock.now());
    bus.publish(auth.announcement()).await.unwrap();
    until_applied(&verifier, 3).await;
    let topic = bus.topic_of::<KeysRotated>();
    let dead = transport
        .dead_letters()
        .unwrap()
        .list(&topic, 10)
        .await
        .unwrap();
    assert_eq!(dead.len(), 1, "{dead:?}");
    let why = dead[0].last_error.as_deref().unwrap_or_default();
    assert!(
        why.contains("not signed by the pinned key-signing key"),
        "{:?}",
        dead[0]
    );
    assert!(verifier.verify::<Claims>(&attacker.token("admin")).is_err());
    follower.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_replayed_older_announcement_changes_nothing() {
    let clock = TestClock::new();
    let mut auth = Issuer::new();
    let verifier = verifier(&clock);
    let first = auth.announcement();
    assert!(verifier.apply(&first).unwrap());
    auth.rotate(clock.now());
    clock.advance(OVERLAP);
    auth.rotate(clock.now());
    assert!(verifier.apply(&auth.announcement()).unwrap());
    assert_eq!(verifier.key_ids(), ["k2", "k3"]);
    // The first announcement had k1 with no end: replaying it would revive it.
    assert!(!verifier.apply(&first).unwrap());
    assert_eq!(verifier.key_set_sequence(), Some(3));
    assert_eq!(verifier.key_ids(), ["k2", "k3"]);
}

/// Verifiers that start late, and what following needs.
#[path = "startup.rs"]
mod startup;
