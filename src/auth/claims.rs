//! The claims a verified token carries.

use std::collections::BTreeMap;

use serde::{Deserialize, Deserializer, Serialize};

/// The claims of a token from Auth: the registered ones the verifier checks,
/// and everything else (roles, scopes) in [`extra`](Claims::extra).
///
/// It is what [`AuthLayer`](super::AuthLayer) puts in the request extensions
/// unless it is told to use another type.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Claims {
    /// The subject: the user (or service) the token speaks for.
    pub sub: String,
    /// The issuer; always the trusted one once verified.
    pub iss: String,
    /// Expiry, seconds since the Unix epoch.
    pub exp: u64,
    /// Not before, seconds since the Unix epoch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbf: Option<u64>,
    /// Issued at, seconds since the Unix epoch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iat: Option<u64>,
    /// The audiences; a single string in the token becomes one entry.
    #[serde(
        default,
        deserialize_with = "one_or_many",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub aud: Vec<String>,
    /// Every other claim, as JSON.
    #[serde(flatten)]
    pub extra: BTreeMap<String, serde_json::Value>,
}

fn one_or_many<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(String),
        Many(Vec<String>),
    }
    Ok(match OneOrMany::deserialize(deserializer)? {
        OneOrMany::One(one) => vec![one],
        OneOrMany::Many(many) => many,
    })
}
