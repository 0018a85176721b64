//! The key-set announcement: Auth's public keys as an event on the bus,
//! signed by a key-signing key that every verifier pins in its config.
//!
//! A token-signing key is used all day and lives in Auth's memory; if it
//! leaks, the attacker can sign tokens until it is rotated away. Were the
//! announcement trusted because it arrived on the bus (or because it was
//! signed with the current token key), the same leak would let the attacker
//! announce a key of their own and keep it. So the announcement is signed
//! by a separate key-signing key, whose public half is pinned in each
//! verifier's configuration: only its holder can change what verifiers
//! trust.

use std::fmt;

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey};
use serde::{Deserialize, Serialize};

use crate::envelope::Event;
use crate::{Error, ErrorKind};

/// What the signature of a [`KeysRotated`] covers comes after this prefix,
/// so the signature can never be mistaken for one over a token or any other
/// message signed by the same key.
const SIGNING_CONTEXT: &[u8] = b"switchboard.auth.keys_rotated.v1\n";

/// One public key of an issuer's key set, as announced.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AnnouncedKey {
    /// The key id tokens name in their header's `kid`.
    pub kid: String,
    /// The JOSE name of its algorithm: `EdDSA` or `RS256`. A verifier uses
    /// only the keys of its own algorithm and skips the others.
    pub algorithm: String,
    /// The public key, PEM (`-----BEGIN PUBLIC KEY-----`).
    pub public_key_pem: String,
    /// When the issuer began signing with it, seconds since the Unix epoch.
    pub valid_from: u64,
    /// When verifiers stop accepting it, seconds since the Unix epoch; `None`
    /// for the key the issuer signs with now. A rotated-out key gets
    /// "rotation time + overlap", so tokens it signed keep working until
    /// then.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_after: Option<u64>,
}

/// The event Auth publishes whenever its key set changes (`auth.keys_rotated`):
/// the whole set of public keys verifiers should accept, numbered, and signed
/// by the key-signing key.
///
/// Each announcement replaces the previous set entirely, so a verifier only
/// ever needs the newest one (see
/// [`EventBus::read_latest`](crate::EventBus::read_latest)). `sequence`
/// only grows: a verifier ignores an announcement not newer than the one it
/// holds, so an old announcement replayed on the bus cannot bring back a
/// retired key.
///
/// # What is signed
///
/// The signature is Ed25519 (base64url, no padding) over the bytes
/// `"switchboard.auth.keys_rotated.v1\n"` followed by the compact JSON of
/// `{"issuer", "sequence", "keys"}` in that order, each key's fields in the
/// order of [`AnnouncedKey`] (`not_after` left out when `None`) — what
/// [`signed_bytes`](Self::signed_bytes) returns.
///
/// ```
/// use switchboard::auth::{AnnouncedKey, KeySigningKey, KeysRotated, TrustAnchor};
///
/// # let ksk_private = "-----BEGIN PRIVATE KEY-----\nMC4CAQAwBQYDK2VwBCIEIOXxmvdLnI8RpIxpNPNUunpuDSoPjob7FXc5IaBRJydL\n-----END PRIVATE KEY-----\n";
/// # let ksk_public = "-----BEGIN PUBLIC KEY-----\nMCowBQYDK2VwAyEAg3ve/6wyVumFUmirqzhJiySYX2y+VV27M1Vz7CIlmNg=\n-----END PUBLIC KEY-----\n";
/// # let token_public = ksk_public;
/// let signer = KeySigningKey::ed25519_pem(ksk_private.as_bytes())?;
/// let key = AnnouncedKey {
///     kid: "2026-12-07".into(),
///     algorithm: "EdDSA".into(),
///     public_key_pem: token_public.into(),
///     valid_from: 1_796_000_000,
///     not_after: None,
/// };
/// let announcement = KeysRotated::signed("auth-service", 7, vec![key], &signer)?;
///
/// let anchor = TrustAnchor::ed25519_pem(ksk_public.as_bytes())?;
/// assert!(announcement.verify(&anchor).is_ok());
///
/// let mut forged = announcement.clone();
/// forged.keys[0].public_key_pem = "an attacker's key".into();
/// assert!(forged.verify(&anchor).is_err());
/// # Ok::<(), switchboard::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeysRotated {
    /// The issuer whose keys these are (the tokens' `iss`).
    pub issuer: String,
    /// Grows with every announcement of the issuer.
    pub sequence: u64,
    /// The keys to accept, the one signing now among them.
    pub keys: Vec<AnnouncedKey>,
    /// The key-signing key's signature over [`signed_bytes`](Self::signed_bytes).
    pub signature: String,
}

impl Event for KeysRotated {
    const TYPE: &'static str = "auth.keys_rotated";
    const VERSION: &'static str = "1.0";
}

impl KeysRotated {
    /// An announcement of `keys` for `issuer`, signed by `signer`.
    ///
    /// Fails with [`ErrorKind::Encode`] only if signing fails.
    pub fn signed(
        issuer: impl Into<String>,
        sequence: u64,
        keys: Vec<AnnouncedKey>,
        signer: &KeySigningKey,
    ) -> Result<Self, Error> {
        let mut announcement = Self {
            issuer: issuer.into(),
            sequence,
            keys,
            signature: String::new(),
        };
        super::verifier::install_crypto_provider();
        announcement.signature =
            jsonwebtoken::crypto::sign(&announcement.signed_bytes(), &signer.key, Algorithm::EdDSA)
                .map_err(|error| {
                    Error::new(
                        ErrorKind::Encode,
                        format!("signing the key-set announcement: {error}"),
                    )
                })?;
        Ok(announcement)
    }

    /// The bytes the signature covers (see [what is signed](Self#what-is-signed)).
    pub fn signed_bytes(&self) -> Vec<u8> {
        #[derive(Serialize)]
        struct Signed<'a> {
            issuer: &'a str,
            sequence: u64,
            keys: &'a [AnnouncedKey],
        }
        let mut bytes = SIGNING_CONTEXT.to_vec();
        // Plain strings and integers: serialising cannot fail.
        serde_json::to_writer(
            &mut bytes,
            &Signed {
                issuer: &self.issuer,
                sequence: self.sequence,
                keys: &self.keys,
            },
        )
        .expect("an announcement serialises");
        bytes
    }

    /// Checks the signature with the pinned key-signing key.
    pub fn verify(&self, anchor: &TrustAnchor) -> Result<(), AnnouncementError> {
        super::verifier::install_crypto_provider();
        // A signature that is not even base64url is an error here, and
        // just as much a refusal.
        let valid = jsonwebtoken::crypto::verify(
            &self.signature,
            &self.signed_bytes(),
            &anchor.key,
            Algorithm::EdDSA,
        )
        .unwrap_or(false);
        if valid {
            Ok(())
        } else {
            Err(AnnouncementError::NotSignedByAnchor)
        }
    }
}

/// The private key-signing key: what signs [`KeysRotated`] announcements.
/// Only the issuer holds it; verifiers pin its public half as a
/// [`TrustAnchor`].
pub struct KeySigningKey {
    key: EncodingKey,
}

impl KeySigningKey {
    /// An Ed25519 key-signing key from its private key as PKCS#8 PEM
    /// (`-----BEGIN PRIVATE KEY-----`).
    ///
    /// Fails with [`ErrorKind::Config`] when the PEM is not one.
    pub fn ed25519_pem(private_key_pem: &[u8]) -> Result<Self, Error> {
        let key = EncodingKey::from_ed_pem(private_key_pem).map_err(|error| {
            Error::new(
                ErrorKind::Config,
                format!("the key-signing key is not an Ed25519 private key in PEM: {error}"),
            )
        })?;
        Ok(Self { key })
    }
}

impl fmt::Debug for KeySigningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("KeySigningKey(Ed25519, <redacted>)")
    }
}

/// The pinned public key-signing key: a verifier applies a key-set
/// announcement only if this key signed it.
///
/// It comes from the verifier's own configuration (a file, a secret), never
/// from the bus — that is what makes it an anchor.
#[derive(Clone)]
pub struct TrustAnchor {
    key: DecodingKey,
}

impl TrustAnchor {
    /// The anchor from the key-signing key's Ed25519 public key, PEM
    /// (`-----BEGIN PUBLIC KEY-----`).
    ///
    /// Fails with [`ErrorKind::Config`] when the PEM is not one.
    pub fn ed25519_pem(public_key_pem: &[u8]) -> Result<Self, Error> {
        let key = DecodingKey::from_ed_pem(public_key_pem).map_err(|error| {
            Error::new(
                ErrorKind::Config,
                format!("the pinned key-signing key is not an Ed25519 public key in PEM: {error}"),
            )
        })?;
        Ok(Self { key })
    }
}

impl fmt::Debug for TrustAnchor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("TrustAnchor(Ed25519)")
    }
}

/// Why a key-set announcement was not applied.
///
/// It converts into an [`Error`] of kind [`ErrorKind::Rejected`]: the same
/// announcement will be refused again, so the consume loop dead-letters it
/// (where an operator sees a forgery attempt) instead of retrying.
///
/// ```
/// use switchboard::auth::AnnouncementError;
/// use switchboard::{Error, ErrorKind};
///
/// let error = Error::from(AnnouncementError::NotSignedByAnchor);
/// assert_eq!(error.kind(), ErrorKind::Rejected);
/// assert!(!error.is_retryable());
/// ```
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AnnouncementError {
    /// The verifier pins no key-signing key, so it trusts no announcement
    /// (see [`TokenVerifier::with_trust_anchor`](super::TokenVerifier::with_trust_anchor)).
    #[error("no key-signing key is pinned: key-set announcements cannot be trusted")]
    NoTrustAnchor,
    /// The signature does not verify with the pinned key-signing key: the
    /// announcement was forged or changed.
    #[error("the key-set announcement is not signed by the pinned key-signing key")]
    NotSignedByAnchor,
    /// The announcement is for another issuer than the verifier trusts.
    #[error("the key-set announcement is for issuer `{found}`, not `{expected}`")]
    WrongIssuer {
        /// The issuer this verifier trusts.
        expected: String,
        /// The issuer the announcement names.
        found: String,
    },
    /// An announced key of the verifier's algorithm is not a valid public key.
    #[error("announced key `{kid}` is unusable: {reason}")]
    InvalidKey {
        /// The key's id.
        kid: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The announcement holds no key of the verifier's algorithm; applying
    /// it would refuse every token.
    #[error("the key-set announcement has no `{algorithm}` key")]
    NoUsableKey {
        /// The verifier's algorithm.
        algorithm: &'static str,
    },
}

impl From<AnnouncementError> for Error {
    fn from(error: AnnouncementError) -> Self {
        Error::new(ErrorKind::Rejected, error.to_string()).with_source(error)
    }
}
