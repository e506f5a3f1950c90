//! User ids in tests.

use agenthome::api::UserId;

/// A user id from a literal or a generated name: an invalid one fails the
/// test at once (tests only; production code parses ids where they enter).
pub fn uid(raw: &str) -> UserId {
    UserId::parse(raw).expect("a valid test user id")
}
