//! Turn idempotency keys (`Idempotency-Key` on `POST …/turns`): one item
//! per (user, key) in the users table, partition key
//! `turnkey#{user_id}#{key}` (a user id never contains `#`, so no user's
//! item can collide), expiring through the table's TTL attribute
//! `expires_at` ([`TURN_KEY_RETENTION`] after the key was first used). The
//! item carries no `machine_id` or `awake_shard`: no index ever sees it.
//!
//! A key is `running` (one request runs the turn, until `run_until`),
//! `pending` (no turn ran yet — e.g. the answer was `202 provisioning` —
//! so the next request with the key runs it) or `done` (the result is
//! stored; every later request with the key gets it back). Each step is one
//! conditional write: two requests with one key never both run.

use std::future::Future;
use std::time::Duration;

use aws_sdk_dynamodb::types::AttributeValue;

use super::engine::{Action, Cond, Update};
use super::raw::RawItems;
use super::record::Item;
use super::table::attr;
use super::{Result, StoreError};
use crate::api::UserId;

/// How long a turn key is kept after its first use.
pub const TURN_KEY_RETENTION: Duration = Duration::from_secs(24 * 3600);

/// Longest accepted key, in bytes.
pub const MAX_TURN_KEY_BYTES: usize = 128;

/// The prefix of turn-key items' partition keys.
pub const TURN_KEY_PREFIX: &str = "turnkey#";

/// Attribute names of a turn-key item.
mod key_attr {
    pub const KIND: &str = "item_kind";
    pub const BODY_HASH: &str = "body_hash";
    pub const KEY_STATE: &str = "key_state";
    pub const RUNNER: &str = "runner";
    pub const RUN_UNTIL: &str = "run_until";
    pub const RESPONSE: &str = "response";
    pub const VERSION: &str = "version";
    pub const CREATED_AT: &str = "created_at";
}

const KIND: &str = "turn_key";
const RUNNING: &str = "running";
const PENDING: &str = "pending";
const DONE: &str = "done";

/// What [`TurnKeys::begin_turn_key`] decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TurnKeyBegin {
    /// This request runs the turn; finish or release the key with `runner`.
    Run {
        /// This attempt's token.
        runner: String,
    },
    /// The turn ran already: its result (JSON), to return as it is.
    Replay {
        /// The stored response body.
        response: String,
    },
    /// Another request with this key runs the turn right now.
    Running {
        /// Until its claim ends at the latest.
        retry_after: Duration,
    },
    /// The key was used with a different body.
    Mismatch,
}

/// Turn idempotency keys.
pub trait TurnKeys: Send + Sync {
    /// Start a turn under `key`: claim it for this request (a new key, a
    /// `pending` one, or a `running` one whose claim ended), or say why not.
    fn begin_turn_key(
        &self,
        user_id: &UserId,
        key: &str,
        body_hash: &str,
        run_until_ms: u64,
        now_ms: u64,
    ) -> impl Future<Output = Result<TurnKeyBegin>> + Send;

    /// The turn ran: store its result (`response`, JSON) under the key.
    /// False if `runner` no longer holds the key.
    fn finish_turn_key(
        &self,
        user_id: &UserId,
        key: &str,
        runner: &str,
        response: &str,
        now_ms: u64,
    ) -> impl Future<Output = Result<bool>> + Send;

    /// No turn ran (provisioning, busy, a failure): the key goes back to
    /// `pending`, so a request that repeats it runs the turn. False if
    /// `runner` no longer holds it.
    fn release_turn_key(
        &self,
        user_id: &UserId,
        key: &str,
        runner: &str,
        now_ms: u64,
    ) -> impl Future<Output = Result<bool>> + Send;
}

/// The partition key of `key`'s item.
pub fn turn_key_item_key(user_id: &UserId, key: &str) -> String {
    format!("{TURN_KEY_PREFIX}{user_id}#{key}")
}

fn s(v: &str) -> AttributeValue {
    AttributeValue::S(v.to_owned())
}

fn n(v: u64) -> AttributeValue {
    AttributeValue::N(v.to_string())
}

fn string(item: &Item, a: &str) -> Option<String> {
    match item.get(a) {
        Some(AttributeValue::S(v)) => Some(v.clone()),
        _ => None,
    }
}

fn number(item: &Item, a: &str) -> Option<u64> {
    match item.get(a) {
        Some(AttributeValue::N(v)) => v.parse().ok(),
        _ => None,
    }
}

fn expires_at(now_ms: u64) -> u64 {
    (now_ms / 1000).saturating_add(TURN_KEY_RETENTION.as_secs())
}

/// A user id is never empty and never contains `#` ([`UserId`]); the key
/// must be 1 to [`MAX_TURN_KEY_BYTES`] bytes.
fn check_args(key: &str) -> Result<()> {
    if key.is_empty() || key.len() > MAX_TURN_KEY_BYTES {
        return Err(StoreError::InvalidArgument(format!(
            "a turn key has 1 to {MAX_TURN_KEY_BYTES} bytes"
        )));
    }
    Ok(())
}

/// A fresh key (32 lowercase hex) for a message that came without one.
pub fn new_turn_key() -> String {
    uuid::Uuid::now_v7().simple().to_string()
}

fn new_runner() -> String {
    uuid::Uuid::now_v7().simple().to_string()
}

/// The item is gone for good (its TTL passed; DynamoDB deletes expired
/// items some time later).
fn expired(item: &Item, now_ms: u64) -> bool {
    number(item, attr::EXPIRES_AT).is_some_and(|e| e < now_ms / 1000)
}

/// Decide on an existing item that was not ours to create.
fn classify(item: &Item, body_hash: &str, now_ms: u64) -> Option<TurnKeyBegin> {
    if string(item, key_attr::BODY_HASH).as_deref() != Some(body_hash) {
        return Some(TurnKeyBegin::Mismatch);
    }
    match string(item, key_attr::KEY_STATE).as_deref() {
        Some(DONE) => Some(match string(item, key_attr::RESPONSE) {
            Some(response) => TurnKeyBegin::Replay { response },
            None => TurnKeyBegin::Mismatch,
        }),
        Some(RUNNING) => {
            let until = number(item, key_attr::RUN_UNTIL).unwrap_or(0);
            (until >= now_ms).then(|| TurnKeyBegin::Running {
                retry_after: Duration::from_millis(until - now_ms),
            })
        }
        // pending (or unreadable): this request may take it.
        _ => None,
    }
}

impl<B: RawItems> TurnKeys for B {
    async fn begin_turn_key(
        &self,
        user_id: &UserId,
        key: &str,
        body_hash: &str,
        run_until_ms: u64,
        now_ms: u64,
    ) -> Result<TurnKeyBegin> {
        check_args(key)?;
        let pk = turn_key_item_key(user_id, key);
        let runner = new_runner();
        let fresh = fresh_key_item(&pk, body_hash, &runner, run_until_ms, now_ms);
        // New, or expired but not yet deleted by the TTL: a fresh key.
        let absent = Cond::Or(vec![
            Cond::NotExists(attr::USER_ID),
            Cond::Lt(attr::EXPIRES_AT, now_ms / 1000),
        ]);
        let current = match self.put_raw_if("begin_turn_key", fresh, absent).await? {
            Ok(()) => return Ok(TurnKeyBegin::Run { runner }),
            Err(Some(current)) => current,
            Err(None) => match self.get_raw(&pk).await? {
                Some(current) => current,
                None => {
                    return Ok(TurnKeyBegin::Running {
                        retry_after: Duration::from_secs(1),
                    })
                }
            },
        };
        if expired(&current, now_ms) {
            // Expired between our write and the read: the caller retries.
            return Ok(TurnKeyBegin::Running {
                retry_after: Duration::from_secs(1),
            });
        }
        if let Some(decided) = classify(&current, body_hash, now_ms) {
            return Ok(decided);
        }
        take_over(self, &pk, &current, body_hash, runner, run_until_ms, now_ms).await
    }

    async fn finish_turn_key(
        &self,
        user_id: &UserId,
        key: &str,
        runner: &str,
        response: &str,
        _now_ms: u64,
    ) -> Result<bool> {
        let done = [
            Action::Set(key_attr::KEY_STATE, s(DONE)),
            Action::Set(key_attr::RESPONSE, s(response)),
        ];
        settle_key(self, "finish_turn_key", user_id, key, runner, done).await
    }

    async fn release_turn_key(
        &self,
        user_id: &UserId,
        key: &str,
        runner: &str,
        _now_ms: u64,
    ) -> Result<bool> {
        let pending = [Action::Set(key_attr::KEY_STATE, s(PENDING))];
        settle_key(self, "release_turn_key", user_id, key, runner, pending).await
    }
}

/// A new key's item, `running` under `runner` until `run_until_ms`.
fn fresh_key_item(pk: &str, body_hash: &str, runner: &str, run_until_ms: u64, now_ms: u64) -> Item {
    Item::from([
        (attr::USER_ID.to_owned(), s(pk)),
        (key_attr::KIND.to_owned(), s(KIND)),
        (key_attr::BODY_HASH.to_owned(), s(body_hash)),
        (key_attr::KEY_STATE.to_owned(), s(RUNNING)),
        (key_attr::RUNNER.to_owned(), s(runner)),
        (key_attr::RUN_UNTIL.to_owned(), n(run_until_ms)),
        (key_attr::VERSION.to_owned(), n(1)),
        (key_attr::CREATED_AT.to_owned(), n(now_ms)),
        (attr::EXPIRES_AT.to_owned(), n(expires_at(now_ms))),
    ])
}

/// A pending key, or one whose runner's claim ended (`current` as read):
/// `runner` takes it over, if nobody else did since the read.
async fn take_over<B: RawItems>(
    b: &B,
    pk: &str,
    current: &Item,
    body_hash: &str,
    runner: String,
    run_until_ms: u64,
    now_ms: u64,
) -> Result<TurnKeyBegin> {
    let version = number(current, key_attr::VERSION).unwrap_or(0);
    let update = Update {
        cond: Cond::And(vec![
            Cond::Exists(attr::USER_ID),
            Cond::Eq(key_attr::VERSION, n(version)),
        ]),
        actions: vec![
            Action::Set(key_attr::KEY_STATE, s(RUNNING)),
            Action::Set(key_attr::RUNNER, s(&runner)),
            Action::Set(key_attr::RUN_UNTIL, n(run_until_ms)),
            Action::Add(key_attr::VERSION, 1),
        ],
    };
    match b.update_raw("begin_turn_key", pk, update).await? {
        Ok(_) => Ok(TurnKeyBegin::Run { runner }),
        Err(now) => Ok(now
            .and_then(|item| classify(&item, body_hash, now_ms))
            .unwrap_or(TurnKeyBegin::Running {
                retry_after: Duration::from_secs(1),
            })),
    }
}

/// End `runner`'s claim on a key (only the runner that holds it may):
/// `state` says what the key becomes; the claim's fields go. `false` when
/// the claim is no longer `runner`'s.
async fn settle_key<B: RawItems>(
    b: &B,
    op: &'static str,
    user_id: &UserId,
    key: &str,
    runner: &str,
    state: impl IntoIterator<Item = Action>,
) -> Result<bool> {
    check_args(key)?;
    let mut actions: Vec<Action> = state.into_iter().collect();
    actions.extend([
        Action::Remove(key_attr::RUNNER),
        Action::Remove(key_attr::RUN_UNTIL),
        Action::Add(key_attr::VERSION, 1),
    ]);
    let update = Update {
        cond: Cond::And(vec![
            Cond::Exists(attr::USER_ID),
            Cond::Eq(key_attr::RUNNER, s(runner)),
        ]),
        actions,
    };
    let pk = turn_key_item_key(user_id, key);
    Ok(b.update_raw(op, &pk, update).await?.is_ok())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::user_id::uid;
    use crate::store::MemoryStore;

    #[tokio::test]
    async fn given_a_key_when_used_again_then_it_runs_once_replays_and_refuses_another_body() {
        let store = MemoryStore::new();
        let TurnKeyBegin::Run { runner } = store
            .begin_turn_key(&uid("u1"), "k1", "h1", 10_000, 1_000)
            .await
            .expect("begin")
        else {
            panic!("a new key runs");
        };
        // While it runs, the same key is refused (one turn at a time).
        assert!(matches!(
            store
                .begin_turn_key(&uid("u1"), "k1", "h1", 10_000, 2_000)
                .await,
            Ok(TurnKeyBegin::Running { .. })
        ));
        // Another body under the key: never a second run.
        assert_eq!(
            store
                .begin_turn_key(&uid("u1"), "k1", "h2", 10_000, 2_000)
                .await
                .expect("begin"),
            TurnKeyBegin::Mismatch
        );
        // Provisioning: back to pending; the re-send runs it.
        assert!(store
            .release_turn_key(&uid("u1"), "k1", &runner, 3_000)
            .await
            .expect("release"));
        let TurnKeyBegin::Run { runner } = store
            .begin_turn_key(&uid("u1"), "k1", "h1", 20_000, 4_000)
            .await
            .expect("begin")
        else {
            panic!("a pending key runs");
        };
        assert!(store
            .finish_turn_key(&uid("u1"), "k1", &runner, r#"{"turn_id":"t"}"#, 5_000)
            .await
            .expect("finish"));
        assert_eq!(
            store
                .begin_turn_key(&uid("u1"), "k1", "h1", 30_000, 6_000)
                .await
                .expect("begin"),
            TurnKeyBegin::Replay {
                response: r#"{"turn_id":"t"}"#.into()
            }
        );
        // A stale runner cannot overwrite the result.
        assert!(!store
            .release_turn_key(&uid("u1"), "k1", &runner, 7_000)
            .await
            .expect("release"));
        // Keys are per user.
        assert!(matches!(
            store
                .begin_turn_key(&uid("u2"), "k1", "h2", 10_000, 2_000)
                .await,
            Ok(TurnKeyBegin::Run { .. })
        ));
    }

    #[tokio::test]
    async fn given_a_runner_that_died_when_its_claim_ends_then_the_key_is_taken_over() {
        let store = MemoryStore::new();
        assert!(matches!(
            store
                .begin_turn_key(&uid("u1"), "k", "h", 2_000, 1_000)
                .await,
            Ok(TurnKeyBegin::Run { .. })
        ));
        assert!(matches!(
            store
                .begin_turn_key(&uid("u1"), "k", "h", 9_000, 3_000)
                .await,
            Ok(TurnKeyBegin::Run { .. })
        ));
        // A `#` cannot reach a turn key's item key: no user id has one.
        assert!(UserId::parse("u1#x").is_err());
        let long = "k".repeat(MAX_TURN_KEY_BYTES + 1);
        assert!(store
            .begin_turn_key(&uid("u1"), &long, "h", 1, 1)
            .await
            .is_err());
    }
}
