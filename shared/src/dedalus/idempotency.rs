//! Idempotency keys: one per logical mutating operation, reused on retries.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// An `Idempotency-Key`: a compact UUIDv7 (32 lowercase hex digits), the form
/// the API requires.
///
/// Generate one with [`IdempotencyKey::new`], persist it before making the
/// call when the operation must be exactly-once across process crashes, and
/// pass it to the client; the client reuses it on every retry.
#[derive(Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct IdempotencyKey(String);

/// A persisted idempotency key did not have the compact UUIDv7 form.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid idempotency key (want 32 lowercase hex digits of a UUIDv7): {reason}")]
pub struct InvalidIdempotencyKey {
    reason: &'static str,
}

impl IdempotencyKey {
    /// A fresh key: UUIDv7, compact form.
    #[allow(clippy::new_without_default)]
    pub fn new() -> Self {
        Self(Uuid::now_v7().simple().to_string())
    }

    /// Validates a persisted key (compact, lowercase, UUID version 7).
    pub fn parse(key: impl Into<String>) -> Result<Self, InvalidIdempotencyKey> {
        let key = key.into();
        if key.len() != 32 {
            return Err(InvalidIdempotencyKey {
                reason: "length is not 32",
            });
        }
        if !key.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
            return Err(InvalidIdempotencyKey {
                reason: "not lowercase hex",
            });
        }
        let uuid = Uuid::try_parse(&key).map_err(|_| InvalidIdempotencyKey {
            reason: "not a UUID",
        })?;
        if uuid.get_version_num() != 7 {
            return Err(InvalidIdempotencyKey {
                reason: "not a version 7 UUID",
            });
        }
        Ok(Self(key))
    }

    /// The key as sent in the header.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for IdempotencyKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "IdempotencyKey({})", self.0)
    }
}

impl fmt::Display for IdempotencyKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl AsRef<str> for IdempotencyKey {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl FromStr for IdempotencyKey {
    type Err = InvalidIdempotencyKey;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl TryFrom<String> for IdempotencyKey {
    type Error = InvalidIdempotencyKey;
    fn try_from(value: String) -> Result<Self, Self::Error> {
        Self::parse(value)
    }
}

impl From<IdempotencyKey> for String {
    fn from(value: IdempotencyKey) -> Self {
        value.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn new_key_is_compact_lowercase_uuidv7() {
        let key = IdempotencyKey::new();
        assert_eq!(key.as_str().len(), 32);
        assert!(key
            .as_str()
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)));
        assert_eq!(key.as_str().as_bytes()[12], b'7');
        assert_eq!(IdempotencyKey::parse(key.to_string()), Ok(key.clone()));
        assert_ne!(IdempotencyKey::new(), key, "fresh keys differ");
    }

    #[test]
    fn parse_rejects_other_forms() {
        let v7 = Uuid::now_v7();
        assert!(IdempotencyKey::parse(v7.hyphenated().to_string()).is_err());
        assert!(IdempotencyKey::parse(v7.simple().to_string().to_uppercase()).is_err());
        assert!(IdempotencyKey::parse(Uuid::new_v4().simple().to_string()).is_err());
        assert!(IdempotencyKey::parse("").is_err());
        assert!(IdempotencyKey::parse("z".repeat(32)).is_err());
    }

    #[test]
    fn serde_round_trip_validates() {
        let key = IdempotencyKey::new();
        let json = serde_json::to_string(&key).expect("serialize");
        assert_eq!(json, format!("\"{key}\""));
        let back: IdempotencyKey = serde_json::from_str(&json).expect("deserialize");
        assert_eq!(back, key);
        assert!(serde_json::from_str::<IdempotencyKey>("\"nope\"").is_err());
    }
}
