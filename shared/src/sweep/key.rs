//! Deterministic Idempotency-Keys for sleep calls.
//!
//! A sleep is one logical operation per (machine, awake interval, last
//! activity): the same sweep decision, re-made by a later run after a crash
//! or a lost response, must *replay* the first call's result rather than
//! issue a second sleep. A turn in between changes `last_active_at` (and a
//! wake after a sleep changes `awake_since`), which makes a new key, so an
//! old stored "sleeping" answer is never replayed for a machine that was
//! woken since.
//!
//! The API requires a compact UUIDv7 (32 lowercase hex). The key is built
//! like one: the 48-bit timestamp field is `awake_since` (else
//! `last_active_at`), the random fields are SHA-256 of the inputs, and the
//! version (7) and variant (`10`) bits are set.

use sha2::{Digest, Sha256};

use crate::dedalus::IdempotencyKey;

/// The key of "sleep `machine_id` at the end of the awake interval that
/// started at `awake_since`, last active at `last_active_at`".
pub fn sleep_key(
    machine_id: &str,
    awake_since: Option<u64>,
    last_active_at: u64,
) -> IdempotencyKey {
    derive(
        "agenthome.sweep.sleep",
        machine_id,
        awake_since.unwrap_or(0),
        last_active_at,
        awake_since.unwrap_or(last_active_at),
    )
}

/// The key of "sleep orphan `machine_id`" for its current revision (an orphan
/// has no item, so its revision stands in for the awake interval).
pub fn orphan_sleep_key(machine_id: &str, revision: &str) -> IdempotencyKey {
    let mut h = Sha256::new();
    h.update(revision.as_bytes());
    let rev = h.finalize();
    let mut r = [0u8; 8];
    r.copy_from_slice(&rev[..8]);
    derive(
        "agenthome.reconcile.orphan-sleep",
        machine_id,
        u64::from_be_bytes(r),
        0,
        0,
    )
}

fn derive(domain: &str, machine_id: &str, a: u64, b: u64, timestamp_ms: u64) -> IdempotencyKey {
    let mut h = Sha256::new();
    for part in [domain.as_bytes(), machine_id.as_bytes()] {
        h.update((part.len() as u64).to_be_bytes());
        h.update(part);
    }
    h.update(a.to_be_bytes());
    h.update(b.to_be_bytes());
    let digest = h.finalize();
    let mut bytes = [0u8; 16];
    // 48-bit big-endian millisecond timestamp, as in a UUIDv7.
    let ts = (timestamp_ms & 0xFFFF_FFFF_FFFF).to_be_bytes();
    bytes[..6].copy_from_slice(&ts[2..]);
    bytes[6..].copy_from_slice(&digest[..10]);
    bytes[6] = (bytes[6] & 0x0f) | 0x70; // version 7
    bytes[8] = (bytes[8] & 0x3f) | 0x80; // RFC 4122 variant
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    // The bytes above always form a valid compact UUIDv7; fall back to a
    // fresh key rather than panic should that ever not hold.
    IdempotencyKey::parse(hex).unwrap_or_else(|_| IdempotencyKey::new())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn given_the_same_interval_when_derived_twice_then_the_key_is_the_same_valid_uuidv7() {
        let a = sleep_key("dm-abc", Some(1_700_000_000_000), 1_700_000_100_000);
        let b = sleep_key("dm-abc", Some(1_700_000_000_000), 1_700_000_100_000);
        assert_eq!(a, b);
        assert!(IdempotencyKey::parse(a.as_str()).is_ok(), "{a}");
        assert_eq!(a.as_str().as_bytes()[12], b'7');
        let uuid = uuid::Uuid::try_parse(a.as_str()).expect("uuid");
        assert_eq!(uuid.get_version_num(), 7);
        assert_eq!(uuid.get_variant(), uuid::Variant::RFC4122);
        // The timestamp field is awake_since.
        let (secs, nanos) = uuid.get_timestamp().expect("v7 timestamp").to_unix();
        assert_eq!(
            secs * 1000 + u64::from(nanos) / 1_000_000,
            1_700_000_000_000
        );
    }

    #[test]
    fn given_another_machine_interval_or_activity_when_derived_then_the_key_differs() {
        let base = sleep_key("dm-abc", Some(1000), 2000);
        assert_ne!(base, sleep_key("dm-abd", Some(1000), 2000));
        assert_ne!(base, sleep_key("dm-abc", Some(1001), 2000));
        assert_ne!(base, sleep_key("dm-abc", Some(1000), 2001));
        assert_ne!(base, sleep_key("dm-abc", None, 2000));
        assert_ne!(
            orphan_sleep_key("dm-abc", "r1"),
            orphan_sleep_key("dm-abc", "r2")
        );
        assert_eq!(
            orphan_sleep_key("dm-abc", "r1"),
            orphan_sleep_key("dm-abc", "r1")
        );
        assert!(IdempotencyKey::parse(orphan_sleep_key("x", "").as_str()).is_ok());
    }
}
