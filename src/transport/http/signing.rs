//! Signed webhook pushes, in the spirit of
//! [Standard Webhooks](https://www.standardwebhooks.com/): each request
//! carries `webhook-id` (new for every attempt), `webhook-timestamp` (Unix
//! seconds) and `webhook-signature` (`v1,` and the base64 HMAC-SHA256 of
//! `{id}.{timestamp}.{body}` under a shared secret).
//!
//! A receiver with the same [`WebhookSigning`] refuses, with `401` and
//! before the message reaches the inbox (so no handler runs): a request
//! without the headers, with a signature that does not match, with a
//! timestamp outside the replay window either way, or with an id it has
//! accepted within the window. The ids are kept in a bounded cache (moka)
//! for twice the window, so memory stays bounded under any load; a request
//! older than the window is refused by its timestamp alone.
//!
//! The signature covers the body (the envelope) and not the path or the
//! `switchboard-*` headers; put TLS (`http-tls`) in front against a
//! tampering network, the signature proves who sent the body and when.

use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::http::HeaderMap;
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::error::{Error, ErrorKind};

/// The header with the request's unique id.
pub const WEBHOOK_ID: &str = "webhook-id";
/// The header with the request's Unix time in seconds.
pub const WEBHOOK_TIMESTAMP: &str = "webhook-timestamp";
/// The header with `v1,<base64 signature>` (several, space-separated, are
/// accepted: one per key during a rotation).
pub const WEBHOOK_SIGNATURE: &str = "webhook-signature";

/// The default replay window: 5 minutes either way.
pub const DEFAULT_REPLAY_WINDOW: Duration = Duration::from_secs(5 * 60);

/// The default number of recent ids a receiver remembers.
pub const DEFAULT_SEEN_IDS: u64 = 100_000;

/// The shared secret that signs and checks webhook pushes, the replay
/// window and how many recent ids a receiver keeps. `Debug` shows no key.
///
/// ```
/// use std::time::Duration;
/// use switchboard::transport::http::WebhookSigning;
///
/// let signing = WebhookSigning::new(b"a secret of at least 16 bytes".to_vec())?
///     .with_replay_window(Duration::from_secs(60));
/// assert!(!format!("{signing:?}").contains("secret"));
/// # Ok::<(), switchboard::Error>(())
/// ```
#[derive(Clone)]
pub struct WebhookSigning {
    key: Vec<u8>,
    window: Duration,
    seen: moka::sync::Cache<String, ()>,
    capacity: u64,
}

impl WebhookSigning {
    /// Signing with `key`, which must be at least 16 bytes.
    pub fn new(key: impl Into<Vec<u8>>) -> Result<Self, Error> {
        let key = key.into();
        if key.len() < 16 {
            return Err(Error::new(
                ErrorKind::Config,
                "webhook signing: the key must be at least 16 bytes",
            ));
        }
        Ok(Self::build(key, DEFAULT_REPLAY_WINDOW, DEFAULT_SEEN_IDS))
    }

    fn build(key: Vec<u8>, window: Duration, capacity: u64) -> Self {
        let seen = moka::sync::Cache::builder()
            .max_capacity(capacity)
            .time_to_live(window * 2)
            .build();
        Self {
            key,
            window,
            seen,
            capacity,
        }
    }

    /// Sets how far a request's timestamp may be from the receiver's clock,
    /// either way (default [`DEFAULT_REPLAY_WINDOW`]).
    pub fn with_replay_window(self, window: Duration) -> Self {
        Self::build(self.key, window, self.capacity)
    }

    /// Sets how many recent ids a receiver remembers (default
    /// [`DEFAULT_SEEN_IDS`]). Past it the oldest are forgotten, and a
    /// replay of one of them inside the window would pass: size it above
    /// the pushes a receiver takes in twice the window.
    pub fn with_seen_ids(self, capacity: u64) -> Self {
        Self::build(self.key, self.window, capacity)
    }

    /// The three headers for `body`, with a new id and the current time.
    pub(crate) fn sign(&self, body: &[u8]) -> [(&'static str, String); 3] {
        let id = format!("msg_{}", uuid::Uuid::new_v4().simple());
        let timestamp = unix_now().to_string();
        let signature = format!("v1,{}", STANDARD.encode(self.mac(&id, &timestamp, body)));
        [
            (WEBHOOK_ID, id),
            (WEBHOOK_TIMESTAMP, timestamp),
            (WEBHOOK_SIGNATURE, signature),
        ]
    }

    fn mac(&self, id: &str, timestamp: &str, body: &[u8]) -> Vec<u8> {
        self.hmac(id, timestamp, body)
            .finalize()
            .into_bytes()
            .to_vec()
    }

    fn hmac(&self, id: &str, timestamp: &str, body: &[u8]) -> Hmac<Sha256> {
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.key).expect("HMAC takes any key length");
        mac.update(id.as_bytes());
        mac.update(b".");
        mac.update(timestamp.as_bytes());
        mac.update(b".");
        mac.update(body);
        mac
    }

    /// Checks a received request; `Err` is [`ErrorKind::Unauthorized`]
    /// saying which check failed (never the key or the expected signature).
    pub(crate) fn verify(&self, headers: &HeaderMap, body: &[u8]) -> Result<(), Error> {
        let refuse = |why: &str| Error::new(ErrorKind::Unauthorized, format!("webhook: {why}"));
        let text = |name: &str| {
            headers
                .get(name)
                .and_then(|value| value.to_str().ok())
                .ok_or_else(|| refuse(&format!("no {name} header")))
        };
        let id = text(WEBHOOK_ID)?;
        let timestamp = text(WEBHOOK_TIMESTAMP)?;
        let signatures = text(WEBHOOK_SIGNATURE)?;
        if id.is_empty() || id.len() > 256 {
            return Err(refuse("the webhook-id must be 1 to 256 bytes"));
        }
        let sent: u64 = timestamp
            .parse()
            .map_err(|_| refuse("the webhook-timestamp is not Unix seconds"))?;
        if unix_now().abs_diff(sent) > self.window.as_secs() {
            return Err(refuse("the webhook-timestamp is outside the replay window"));
        }
        let signed = signatures.split(' ').any(|signature| {
            signature
                .strip_prefix("v1,")
                .and_then(|encoded| STANDARD.decode(encoded).ok())
                // Constant time: the comparison tells nothing of the bytes.
                .is_some_and(|mac| self.hmac(id, timestamp, body).verify_slice(&mac).is_ok())
        });
        if !signed {
            return Err(refuse("the signature does not match"));
        }
        // Only a signed id is remembered, so forgeries cannot fill the cache.
        if !self.seen.entry(id.to_owned()).or_insert(()).is_fresh() {
            return Err(refuse("this webhook-id was seen already (a replay)"));
        }
        Ok(())
    }
}

impl fmt::Debug for WebhookSigning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WebhookSigning")
            .field("key", &"<redacted>")
            .field("window", &self.window)
            .field("seen_ids", &self.capacity)
            .finish()
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |since| since.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, String)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.insert(*name, value.parse().unwrap());
        }
        map
    }

    fn signing() -> WebhookSigning {
        WebhookSigning::new(b"0123456789abcdef".to_vec()).unwrap()
    }

    #[test]
    fn a_signed_request_passes_once() {
        let signing = signing();
        let sent = headers(&signing.sign(b"body"));
        signing.verify(&sent, b"body").unwrap();
        let replay = signing.verify(&sent, b"body").unwrap_err();
        assert_eq!(replay.kind(), ErrorKind::Unauthorized);
        assert!(replay.message().contains("replay"), "{replay}");
    }

    #[test]
    fn another_body_key_or_time_is_refused() {
        let signing = signing();
        let sent = signing.sign(b"body");
        let error = signing.verify(&headers(&sent), b"other").unwrap_err();
        assert!(error.message().contains("does not match"), "{error}");
        let stranger = WebhookSigning::new(b"fedcba9876543210".to_vec()).unwrap();
        assert!(stranger.verify(&headers(&sent), b"body").is_err());
        let mut old = sent.clone();
        old[1].1 = (unix_now() - 3600).to_string();
        let error = signing.verify(&headers(&old), b"body").unwrap_err();
        assert!(error.message().contains("replay window"), "{error}");
        assert!(WebhookSigning::new(b"short".to_vec()).is_err());
    }
}
