//! Keeping a verifier's key set current from the bus: subscribe to the
//! announcements, then read the newest one once.
//!
//! The order matters. Subscribing first means an announcement published
//! while the newest is being read still arrives through the subscription;
//! reading the newest means a verifier that starts after several rotations
//! has the current keys before it serves, without replaying a history that
//! trimming may have cut. Either may deliver an announcement the other
//! already applied, or an older one: [`TokenVerifier::apply`] ignores
//! anything not newer than what it holds.

use crate::bus::{ConsumerHandle, EventBus, Message, handler_fn};
use crate::error::{Error, ErrorKind};
use crate::transport::SubscribeOptions;

use super::announcement::{AnnouncementError, KeysRotated};
use super::verifier::TokenVerifier;

impl TokenVerifier {
    /// Follows the issuer's [`KeysRotated`] announcements on `bus`: applies
    /// the newest one the transport holds
    /// ([`EventBus::read_latest`]) before returning, and every later one as
    /// it arrives, for this verifier and all its clones. No call to the
    /// issuer is made.
    ///
    /// Every instance of a service needs every announcement, so `options`
    /// should name a consumer group of this instance alone (on Redis
    /// Streams a group per replica, e.g. `game-keys-<hostname>`): replicas
    /// sharing a group would split the announcements between them. An
    /// announcement that fails its checks (not signed by the pinned
    /// key-signing key, another issuer, an unusable key) is rejected to the
    /// dead-letter queue and the key set stays as it was.
    ///
    /// Fails with [`ErrorKind::Config`] when no key-signing key is pinned,
    /// and with the transport's error when subscribing or the start-up read
    /// fails (the subscription is then stopped). A transport that keeps no
    /// history ([`ErrorKind::Unsupported`]) only skips the start-up read.
    ///
    /// ```
    /// use std::sync::Arc;
    /// use switchboard::auth::{AnnouncedKey, KeyAlgorithm, KeySigningKey, KeysRotated, TokenVerifier, TrustAnchor};
    /// use switchboard::{EventBus, MemoryTransport, SubscribeOptions};
    ///
    /// # const KSK_PRIVATE: &str = "-----BEGIN PRIVATE KEY-----\nMC4CAQAwBQYDK2VwBCIEIOXxmvdLnI8RpIxpNPNUunpuDSoPjob7FXc5IaBRJydL\n-----END PRIVATE KEY-----\n";
    /// # const KSK_PUBLIC: &str = "-----BEGIN PUBLIC KEY-----\nMCowBQYDK2VwAyEAg3ve/6wyVumFUmirqzhJiySYX2y+VV27M1Vz7CIlmNg=\n-----END PUBLIC KEY-----\n";
    /// # const TOKEN_PUBLIC: &str = KSK_PUBLIC;
    /// # tokio::runtime::Runtime::new().unwrap().block_on(async {
    /// let bus = EventBus::new(Arc::new(MemoryTransport::new()), "auth-service");
    ///
    /// // Auth announced its key set before this verifier started.
    /// let signer = KeySigningKey::ed25519_pem(KSK_PRIVATE.as_bytes())?;
    /// let key = AnnouncedKey {
    ///     kid: "k1".into(),
    ///     algorithm: "EdDSA".into(),
    ///     public_key_pem: TOKEN_PUBLIC.into(),
    ///     valid_from: 0,
    ///     not_after: None,
    /// };
    /// bus.publish(KeysRotated::signed("auth-service", 1, vec![key], &signer)?).await?;
    ///
    /// // The verifier pins the key-signing key and learns the rest from the bus.
    /// let anchor = TrustAnchor::ed25519_pem(KSK_PUBLIC.as_bytes())?;
    /// let verifier = Arc::new(
    ///     TokenVerifier::from_announcements(KeyAlgorithm::EdDsa, "auth-service", anchor)
    ///         .with_audience("game-service"),
    /// );
    /// let follower = verifier.follow(&bus, SubscribeOptions::new("game-keys-replica-1")).await?;
    /// assert_eq!(verifier.key_ids(), ["k1"]);
    /// follower.shutdown().await?;
    /// # Ok::<(), switchboard::Error>(())
    /// # }).unwrap();
    /// ```
    pub async fn follow(
        &self,
        bus: &EventBus,
        options: SubscribeOptions,
    ) -> Result<ConsumerHandle, Error> {
        if self.trust_anchor().is_none() {
            return Err(Error::new(
                ErrorKind::Config,
                AnnouncementError::NoTrustAnchor.to_string(),
            ));
        }
        let verifier = self.clone();
        let handler = handler_fn(move |message: Message<KeysRotated>| {
            let applied = verifier.apply(message.payload());
            async move {
                if let Err(refused) = &applied {
                    tracing::warn!(%refused, event_id = %message.event_id(), "key-set announcement refused");
                }
                applied.map(|_| ()).map_err(Error::from)
            }
        });
        let follower = bus.subscribe::<KeysRotated, _>(options, handler).await?;
        match bus.read_latest::<KeysRotated>().await {
            Ok(Some(latest)) => {
                if let Err(refused) = self.apply(latest.payload()) {
                    // The subscription goes on: the next valid announcement
                    // still gets through.
                    tracing::warn!(%refused, "the newest key-set announcement is refused");
                }
            }
            Ok(None) => tracing::info!(
                issuer = self.issuer(),
                "no key-set announcement yet: tokens are refused until one arrives"
            ),
            Err(error) if error.kind() == ErrorKind::Unsupported => tracing::info!(
                %error,
                "the transport keeps no history: the key set comes with the next announcement"
            ),
            Err(error) => {
                follower.abort();
                return Err(error);
            }
        }
        Ok(follower)
    }
}
