//! Auth's keys: the token-signing keys (named by `kid`, rotated) and the
//! key-signing key that signs their announcement.
//!
//! With a key directory the keys survive Auth's restart: a token issued
//! before the restart still verifies after it, and the verifiers' pinned
//! key-signing key stays the same. The directory holds
//!
//! * `signing-keys.json` — the token-signing keys (private and public PEM,
//!   `kid`, `valid_from`, `not_after`) and the last announcement's sequence;
//!   rewritten atomically (a temporary file renamed over it) on each change;
//! * `key-signing-key.pem` — the key-signing key's private half;
//! * `key-signing-key.pub.pem` — its public half: what Trading and Game pin
//!   (`--trust-anchor`).
//!
//! A missing directory is created with fresh keys on the first start (both
//! private files mode 0600). In production the key-signing key would live
//! apart from Auth's disk (a secret store, an HSM); the demo keeps it beside
//! the token keys. Without a directory ([`KeySource::Memory`], the
//! in-process platform) the keys live as long as the process, like its users.

use std::path::{Path, PathBuf};
use std::time::Duration;

use jsonwebtoken::EncodingKey;
use serde::{Deserialize, Serialize};
use switchboard::auth::{AnnouncedKey, KeySigningKey, KeysRotated};
use switchboard::{Error, ErrorKind};

/// How long a rotated-out key keeps verifying: twice the token lifetime,
/// so every token signed just before a rotation expires first, with room
/// for clock skew.
pub const DEFAULT_KEY_OVERLAP: Duration = Duration::from_secs(30 * 60);

const SIGNING_KEYS: &str = "signing-keys.json";
const KEY_SIGNING_KEY: &str = "key-signing-key.pem";
/// The file Trading and Game pin, inside the key directory.
pub const TRUST_ANCHOR_FILE: &str = "key-signing-key.pub.pem";

/// Where Auth keeps its keys.
#[derive(Debug, Clone)]
pub enum KeySource {
    /// A directory, so the keys survive a restart.
    Dir(PathBuf),
    /// Only in this process (the in-process platform and tests).
    Memory,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct StoredKey {
    kid: String,
    private_key_pem: String,
    public_key_pem: String,
    valid_from: u64,
    #[serde(default)]
    not_after: Option<u64>,
}

impl StoredKey {
    fn generate(now: u64) -> Result<Self, Error> {
        let (private_key_pem, public_key_pem) = key_pair()?;
        Ok(Self {
            kid: format!("auth-{}", &uuid::Uuid::new_v4().simple().to_string()[..12]),
            private_key_pem,
            public_key_pem,
            valid_from: now,
            not_after: None,
        })
    }

    fn announced(&self) -> AnnouncedKey {
        AnnouncedKey {
            kid: self.kid.clone(),
            algorithm: "EdDSA".into(),
            public_key_pem: self.public_key_pem.clone(),
            valid_from: self.valid_from,
            not_after: self.not_after,
        }
    }
}

/// The token-signing keys, oldest first; the last one signs.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct KeySet {
    sequence: u64,
    keys: Vec<StoredKey>,
}

/// The key that signs tokens now.
#[derive(Clone)]
pub struct CurrentKey {
    pub kid: String,
    pub encoding: EncodingKey,
    pub public_key_pem: String,
}

/// Auth's keys, loaded or made once.
pub struct AuthKeys {
    source: KeySource,
    set: KeySet,
    current: CurrentKey,
    signer: KeySigningKey,
    trust_anchor_pem: String,
}

impl std::fmt::Debug for AuthKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuthKeys")
            .field("source", &self.source)
            .field("sequence", &self.set.sequence)
            .field("current", &self.current.kid)
            .finish_non_exhaustive()
    }
}

/// A prepared change of the key set: announced first, installed once the
/// bus has accepted the announcement.
pub struct Rotation {
    set: KeySet,
    pub announcement: KeysRotated,
}

impl AuthKeys {
    /// Loads the keys from `source`, making them on a first start.
    pub fn load(source: KeySource) -> Result<Self, Error> {
        let now = now_secs();
        let (set, ksk_private, trust_anchor_pem) = match &source {
            KeySource::Memory => {
                let (private, public) = key_pair()?;
                let set = KeySet {
                    sequence: 0,
                    keys: vec![StoredKey::generate(now)?],
                };
                (set, private, public)
            }
            KeySource::Dir(dir) => load_dir(dir, now)?,
        };
        let signer = KeySigningKey::ed25519_pem(ksk_private.as_bytes())?;
        let current = current_of(&set)?;
        Ok(Self {
            source,
            set,
            current,
            signer,
            trust_anchor_pem,
        })
    }

    /// The key that signs tokens now.
    pub fn current(&self) -> &CurrentKey {
        &self.current
    }

    /// The key-signing key's public half (PEM): what verifiers pin.
    pub fn trust_anchor_pem(&self) -> &str {
        &self.trust_anchor_pem
    }

    /// The same keys announced again under the next sequence (Auth does it
    /// at every start, so the bus always holds its current set).
    pub fn reannouncement(&self) -> Result<Rotation, Error> {
        let mut set = self.set.clone();
        set.keys
            .retain(|key| key.not_after.is_none_or(|end| end > now_secs()));
        self.prepare(set)
    }

    /// A new signing key; the current one keeps verifying for `overlap`;
    /// keys whose overlap has ended are dropped.
    pub fn rotation(&self, overlap: Duration) -> Result<Rotation, Error> {
        let now = now_secs();
        let mut set = self.set.clone();
        for key in &mut set.keys {
            key.not_after.get_or_insert(now + overlap.as_secs());
        }
        set.keys
            .retain(|key| key.not_after.is_none_or(|end| end > now));
        set.keys.push(StoredKey::generate(now)?);
        self.prepare(set)
    }

    fn prepare(&self, mut set: KeySet) -> Result<Rotation, Error> {
        set.sequence += 1;
        let keys = set.keys.iter().map(StoredKey::announced).collect();
        let announcement = KeysRotated::signed(
            super::auth_service::ISSUER,
            set.sequence,
            keys,
            &self.signer,
        )?;
        Ok(Rotation { set, announcement })
    }

    /// Writes a prepared rotation to the key directory (nothing in
    /// memory), before it is announced: should the announcement or the
    /// process fail next, the next start loads and announces this set, so
    /// no key is ever announced that the file does not hold.
    pub fn save(&self, rotation: &Rotation) -> Result<(), Error> {
        if let KeySource::Dir(dir) = &self.source {
            let json = serde_json::to_vec_pretty(&rotation.set)
                .map_err(|error| Error::new(ErrorKind::Encode, error.to_string()))?;
            write_private(&dir.join(SIGNING_KEYS), &json)?;
        }
        Ok(())
    }

    /// Makes a saved and announced rotation the key set in memory: its
    /// newest key signs from now on.
    pub fn install(&mut self, rotation: Rotation) -> Result<(), Error> {
        self.current = current_of(&rotation.set)?;
        self.set = rotation.set;
        Ok(())
    }
}

fn load_dir(dir: &Path, now: u64) -> Result<(KeySet, String, String), Error> {
    std::fs::create_dir_all(dir).map_err(|error| io(dir, error))?;
    let ksk_path = dir.join(KEY_SIGNING_KEY);
    let anchor_path = dir.join(TRUST_ANCHOR_FILE);
    if !ksk_path.exists() {
        let (private, public) = key_pair()?;
        write_private(&ksk_path, private.as_bytes())?;
        std::fs::write(&anchor_path, public).map_err(|error| io(&anchor_path, error))?;
    }
    let ksk_private = std::fs::read_to_string(&ksk_path).map_err(|error| io(&ksk_path, error))?;
    let anchor = std::fs::read_to_string(&anchor_path).map_err(|error| io(&anchor_path, error))?;
    let keys_path = dir.join(SIGNING_KEYS);
    let set = if keys_path.exists() {
        let bytes = std::fs::read(&keys_path).map_err(|error| io(&keys_path, error))?;
        serde_json::from_slice(&bytes).map_err(|error| {
            Error::new(
                ErrorKind::Config,
                format!("{} is not Auth's key file: {error}", keys_path.display()),
            )
        })?
    } else {
        let set = KeySet {
            sequence: 0,
            keys: vec![StoredKey::generate(now)?],
        };
        let json = serde_json::to_vec_pretty(&set)
            .map_err(|error| Error::new(ErrorKind::Encode, error.to_string()))?;
        write_private(&keys_path, &json)?;
        set
    };
    Ok((set, ksk_private, anchor))
}

fn current_of(set: &KeySet) -> Result<CurrentKey, Error> {
    let key = set
        .keys
        .iter()
        .rev()
        .find(|key| key.not_after.is_none())
        .ok_or_else(|| Error::new(ErrorKind::Config, "Auth's key file has no current key"))?;
    let encoding = EncodingKey::from_ed_pem(key.private_key_pem.as_bytes()).map_err(|error| {
        Error::new(
            ErrorKind::Config,
            format!("signing key {}: {error}", key.kid),
        )
    })?;
    Ok(CurrentKey {
        kid: key.kid.clone(),
        encoding,
        public_key_pem: key.public_key_pem.clone(),
    })
}

/// A new Ed25519 key pair: (private PKCS#8 PEM, public SPKI PEM).
fn key_pair() -> Result<(String, String), Error> {
    let pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519)
        .map_err(|error| Error::new(ErrorKind::Config, format!("key generation: {error}")))?;
    Ok((pair.serialize_pem(), pair.public_key_pem()))
}

/// Writes `bytes` to `path` readable by its owner only, through a
/// temporary file renamed over it: a crash mid-write leaves the old file.
fn write_private(path: &Path, bytes: &[u8]) -> Result<(), Error> {
    use std::io::Write;
    let temporary = path.with_extension("tmp");
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut file = options
        .open(&temporary)
        .map_err(|error| io(&temporary, error))?;
    file.write_all(bytes)
        .and_then(|()| file.sync_all())
        .map_err(|error| io(&temporary, error))?;
    std::fs::rename(&temporary, path).map_err(|error| io(path, error))
}

fn io(path: &Path, error: std::io::Error) -> Error {
    Error::new(
        ErrorKind::Config,
        format!("Auth's key directory: {}: {error}", path.display()),
    )
}

pub fn now_secs() -> u64 {
    jsonwebtoken::get_current_timestamp()
}

/// What Trading and Game do to check Auth's tokens: a verifier for
/// `audience` that pins the key-signing key `trust_anchor_pem` and follows
/// Auth's key announcements on the events bus — no call to Auth. Returns
/// once the newest announcement on the bus is applied.
///
/// Each process follows with a consumer group of its own
/// (`<service>.auth-keys.<uuid>`): every replica needs every announcement.
pub async fn follow_auth_keys(
    brokers: &super::brokers::Brokers,
    service: &str,
    audience: &str,
    trust_anchor_pem: &str,
) -> Result<
    (
        std::sync::Arc<switchboard::auth::TokenVerifier>,
        switchboard::ConsumerHandle,
    ),
    Error,
> {
    use switchboard::auth::{KeyAlgorithm, TokenVerifier, TrustAnchor};
    let verifier = std::sync::Arc::new(
        TokenVerifier::from_announcements(
            KeyAlgorithm::EdDsa,
            super::auth_service::ISSUER,
            TrustAnchor::ed25519_pem(trust_anchor_pem.as_bytes())?,
        )
        .with_audience(audience),
    );
    let group = format!("{service}.auth-keys.{}", uuid::Uuid::new_v4().simple());
    let follower = verifier
        .follow(
            &brokers.events(service),
            switchboard::SubscribeOptions::new(group),
        )
        .await?;
    Ok((verifier, follower))
}
