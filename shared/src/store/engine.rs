//! The store's semantics, written once: every [`UserStore`] operation as a
//! condition plus update actions over the flat attributes, applied through a
//! small [`Backend`] that the DynamoDB and in-memory adapters implement.
//!
//! [`Cond`] and [`Action`] are a tiny subset of DynamoDB's expression
//! language; the DynamoDB adapter renders them as expressions, the memory
//! adapter evaluates them with DynamoDB's rules, so both behave alike.

use std::future::Future;

use aws_sdk_dynamodb::types::AttributeValue;
use base64::Engine as _;

use super::record::Item;
use super::table::{attr, shard_for, shard_in, AWAKE_SHARDS};
use super::{
    AcquireOutcome, ClaimOutcome, CountOutcome, Counter, CreateKey, Cursor, DeleteGuard,
    DeleteOutcome, Hold, Lease, LeaseKind, LeasePurpose, MachineState, Page, Power, ReleaseOutcome,
    Result, SleepPlan, StoreError, UserRecord, UserStore,
};
use super::{BeginTurn, TurnCount, TurnEnd};
use crate::api::UserId;

/// A condition over an item's attributes (DynamoDB semantics: comparisons
/// with a missing attribute are false).
#[derive(Debug, Clone)]
pub enum Cond {
    /// `attribute_exists(a)`
    Exists(&'static str),
    /// `attribute_not_exists(a)`
    NotExists(&'static str),
    /// `a = v`
    Eq(&'static str, AttributeValue),
    /// `a < n` (numbers)
    Lt(&'static str, u64),
    /// `a IN (v, ...)`
    In(&'static str, Vec<AttributeValue>),
    /// All of them.
    And(Vec<Cond>),
    /// Any of them.
    Or(Vec<Cond>),
}

impl Cond {
    /// Evaluate with DynamoDB's rules: numbers compare numerically, any
    /// comparison involving a missing attribute (or mismatched types) is false.
    pub fn eval(&self, item: &Item) -> bool {
        match self {
            Self::Exists(a) => item.contains_key(*a),
            Self::NotExists(a) => !item.contains_key(*a),
            Self::Eq(a, v) => item.get(*a).is_some_and(|have| values_equal(have, v)),
            Self::Lt(a, bound) => match item.get(*a) {
                Some(AttributeValue::N(have)) => {
                    number(have).is_some_and(|h| h < i128::from(*bound))
                }
                _ => false,
            },
            Self::In(a, vs) => item
                .get(*a)
                .is_some_and(|have| vs.iter().any(|v| values_equal(have, v))),
            Self::And(cs) => cs.iter().all(|c| c.eval(item)),
            Self::Or(cs) => cs.iter().any(|c| c.eval(item)),
        }
    }
}

fn number(s: &str) -> Option<i128> {
    s.trim().parse().ok()
}

fn values_equal(a: &AttributeValue, b: &AttributeValue) -> bool {
    match (a, b) {
        (AttributeValue::N(x), AttributeValue::N(y)) => match (number(x), number(y)) {
            (Some(x), Some(y)) => x == y,
            _ => x == y,
        },
        _ => a == b,
    }
}

impl Action {
    /// The attribute the action writes.
    pub fn attribute(&self) -> &'static str {
        match self {
            Self::Set(a, _)
            | Self::SetIfNotExists(a, _)
            | Self::Add(a, _)
            | Self::Remove(a)
            | Self::CopyOr(a, _, _) => a,
        }
    }

    /// Apply to an item with DynamoDB's rules.
    pub fn apply(&self, item: &mut Item) {
        match self {
            Self::Set(a, v) => {
                item.insert((*a).to_owned(), v.clone());
            }
            Self::SetIfNotExists(a, v) => {
                item.entry((*a).to_owned()).or_insert_with(|| v.clone());
            }
            Self::Add(a, delta) => {
                let base = match item.get(*a) {
                    Some(AttributeValue::N(have)) => number(have).unwrap_or(0),
                    _ => 0,
                };
                item.insert(
                    (*a).to_owned(),
                    AttributeValue::N((base + i128::from(*delta)).to_string()),
                );
            }
            Self::Remove(a) => {
                item.remove(*a);
            }
            Self::CopyOr(a, from, v) => {
                let value = item.get(*from).cloned().unwrap_or_else(|| v.clone());
                item.insert((*a).to_owned(), value);
            }
        }
    }
}

/// One update action.
#[derive(Debug, Clone)]
pub enum Action {
    /// `SET a = v`
    Set(&'static str, AttributeValue),
    /// `SET a = if_not_exists(a, v)`
    SetIfNotExists(&'static str, AttributeValue),
    /// `SET a = if_not_exists(a, 0) + n`
    Add(&'static str, u64),
    /// `REMOVE a`
    Remove(&'static str),
    /// `SET a = if_not_exists(b, v)`: copies `b` as it was before the
    /// update (list it before any action writing `b`).
    CopyOr(&'static str, &'static str, AttributeValue),
}

/// A conditional update of an existing item.
#[derive(Debug, Clone)]
pub struct Update {
    /// Must hold on the current item (the item's existence is always required too).
    pub cond: Cond,
    /// Applied when it holds.
    pub actions: Vec<Action>,
}

/// A refused conditional write: the item as it is, if it exists and the
/// backend returned it.
pub type Refused = Option<UserRecord>;

/// Position in the `awake` index (its `LastEvaluatedKey`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct AwakeKey {
    /// Index partition.
    pub shard: String,
    /// Index sort key.
    pub last_active_at: u64,
    /// Table key.
    pub user_id: String,
}

/// Position in the `pending-sleep` index (its `LastEvaluatedKey`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PendingKey {
    /// Index partition.
    pub shard: String,
    /// Index sort key.
    pub sleep_at: u64,
    /// Table key.
    pub user_id: String,
}

/// What an adapter provides. Public only inside this private module (sealed).
///
/// The typed read and update are the raw ones plus decoding, written once
/// here for both adapters.
pub trait Backend: super::raw::RawItems + Send + Sync {
    /// Strongly consistent read.
    fn get_item(
        &self,
        user_id: &UserId,
    ) -> impl Future<Output = Result<Option<UserRecord>>> + Send {
        async move {
            self.get_raw(user_id.as_str())
                .await?
                .map(UserRecord::from_item)
                .transpose()
        }
    }
    /// Put if no item has this user id.
    fn put_new(
        &self,
        record: &UserRecord,
    ) -> impl Future<Output = Result<std::result::Result<(), Refused>>> + Send;
    /// Conditional update of an existing item; the item after the write.
    fn update(
        &self,
        op: &'static str,
        user_id: &UserId,
        update: Update,
    ) -> impl Future<Output = Result<std::result::Result<UserRecord, Refused>>> + Send {
        async move {
            match self.update_raw(op, user_id.as_str(), update).await? {
                Ok(item) if item.is_empty() => Err(StoreError::Malformed {
                    attribute: String::new(),
                    message: format!("{op}: UpdateItem returned no attributes"),
                }),
                Ok(item) => Ok(Ok(UserRecord::from_item(item)?)),
                Err(refused) => Ok(Err(refused.map(UserRecord::from_item).transpose()?)),
            }
        }
    }
    /// Conditional delete; the item as it was.
    fn delete_item(
        &self,
        user_id: &UserId,
        cond: Cond,
    ) -> impl Future<Output = Result<std::result::Result<UserRecord, Refused>>> + Send;
    /// `awake` index query, ascending by `last_active_at`.
    fn query_awake(
        &self,
        shard: &str,
        idle_before_ms: u64,
        start: Option<AwakeKey>,
        limit: u32,
    ) -> impl Future<Output = Result<(Vec<UserRecord>, Option<AwakeKey>)>> + Send;
    /// `by-machine` index query.
    fn query_machine(
        &self,
        machine_id: &str,
    ) -> impl Future<Output = Result<Vec<UserRecord>>> + Send;
    /// `pending-sleep` index query (`sleep_at <= due_by_ms`), ascending by
    /// `sleep_at`.
    fn query_pending(
        &self,
        shard: &str,
        due_by_ms: u64,
        start: Option<PendingKey>,
        limit: u32,
    ) -> impl Future<Output = Result<(Vec<UserRecord>, Option<PendingKey>)>> + Send;
    /// The shard count a wake writes with (`AWAKE_SHARDS`).
    fn awake_shards(&self) -> u32 {
        AWAKE_SHARDS
    }
}

/// A shared store is a store (e.g. one `MemoryStore` behind the provisioner
/// and the sweeper of a simulation).
impl<B: Backend> Backend for std::sync::Arc<B> {
    fn get_item(
        &self,
        user_id: &UserId,
    ) -> impl Future<Output = Result<Option<UserRecord>>> + Send {
        (**self).get_item(user_id)
    }
    fn put_new(
        &self,
        record: &UserRecord,
    ) -> impl Future<Output = Result<std::result::Result<(), Refused>>> + Send {
        (**self).put_new(record)
    }
    fn update(
        &self,
        op: &'static str,
        user_id: &UserId,
        update: Update,
    ) -> impl Future<Output = Result<std::result::Result<UserRecord, Refused>>> + Send {
        (**self).update(op, user_id, update)
    }
    fn delete_item(
        &self,
        user_id: &UserId,
        cond: Cond,
    ) -> impl Future<Output = Result<std::result::Result<UserRecord, Refused>>> + Send {
        (**self).delete_item(user_id, cond)
    }
    fn query_awake(
        &self,
        shard: &str,
        idle_before_ms: u64,
        start: Option<AwakeKey>,
        limit: u32,
    ) -> impl Future<Output = Result<(Vec<UserRecord>, Option<AwakeKey>)>> + Send {
        (**self).query_awake(shard, idle_before_ms, start, limit)
    }
    fn query_machine(
        &self,
        machine_id: &str,
    ) -> impl Future<Output = Result<Vec<UserRecord>>> + Send {
        (**self).query_machine(machine_id)
    }
    fn query_pending(
        &self,
        shard: &str,
        due_by_ms: u64,
        start: Option<PendingKey>,
        limit: u32,
    ) -> impl Future<Output = Result<(Vec<UserRecord>, Option<PendingKey>)>> + Send {
        (**self).query_pending(shard, due_by_ms, start, limit)
    }
    fn awake_shards(&self) -> u32 {
        (**self).awake_shards()
    }
}

fn s(v: &str) -> AttributeValue {
    AttributeValue::S(v.to_owned())
}

fn n(v: u64) -> AttributeValue {
    AttributeValue::N(v.to_string())
}

fn state_in(states: &[MachineState]) -> Cond {
    Cond::In(
        attr::STATE,
        states.iter().map(|st| s(st.as_str())).collect(),
    )
}

fn lease_owned_by(owner: &str) -> Cond {
    Cond::Eq(attr::LEASE_OWNER, s(owner))
}

/// No live lease at `now_ms`: absent or `lease_until < now_ms`.
fn no_live_lease(now_ms: u64) -> Cond {
    Cond::Or(vec![
        Cond::NotExists(attr::LEASE_UNTIL),
        Cond::Lt(attr::LEASE_UNTIL, now_ms),
    ])
}

const NOT_DESTROYING: &[MachineState] = &[
    MachineState::Provisioning,
    MachineState::Bootstrapping,
    MachineState::Ready,
    MachineState::Failed,
];

fn set_lease(lease: &Lease) -> [Action; 3] {
    [
        Action::Set(attr::LEASE_OWNER, s(&lease.owner)),
        Action::Set(attr::LEASE_KIND, s(lease.kind.as_str())),
        Action::Set(attr::LEASE_UNTIL, n(lease.until)),
    ]
}

const REMOVE_LEASE: [Action; 3] = [
    Action::Remove(attr::LEASE_OWNER),
    Action::Remove(attr::LEASE_KIND),
    Action::Remove(attr::LEASE_UNTIL),
];

/// Drops a pending sleep (the item leaves the `pending-sleep` index).
const REMOVE_PENDING_SLEEP: [Action; 3] = [
    Action::Remove(attr::SLEEP_SHARD),
    Action::Remove(attr::SLEEP_AT),
    Action::Remove(attr::SLEEP_REASON),
];

fn awake_actions(user_id: &UserId, now_ms: u64, shards: u32) -> [Action; 3] {
    [
        Action::Set(attr::POWER, s(Power::Awake.as_str())),
        Action::Set(attr::AWAKE_SHARD, s(&shard_in(user_id, shards))),
        Action::SetIfNotExists(attr::AWAKE_SINCE, n(now_ms)),
    ]
}

/// Longest `last_error` kept (bytes): items stay far below DynamoDB's 400 KB.
const MAX_ERROR_BYTES: usize = 2048;

fn error_text(error: &str) -> AttributeValue {
    s(&error[..crate::text::floor_boundary(error, MAX_ERROR_BYTES)])
}

fn non_empty(what: &str, v: &str) -> Result<()> {
    if v.is_empty() {
        return Err(StoreError::InvalidArgument(format!("{what} is empty")));
    }
    Ok(())
}

fn valid_create_key(k: &str) -> Result<()> {
    if k.len() == 32
        && k.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        Ok(())
    } else {
        Err(StoreError::InvalidArgument(
            "create_key must be 32 lowercase hex characters".to_owned(),
        ))
    }
}

fn encode_cursor<K: serde::Serialize>(key: &K) -> Result<Cursor> {
    let json =
        serde_json::to_vec(key).map_err(|e| StoreError::InvalidArgument(format!("cursor: {e}")))?;
    Ok(Cursor(
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(json),
    ))
}

fn decode_cursor(cursor: &Cursor, shard: &str) -> Result<AwakeKey> {
    let key: AwakeKey = decode_json_cursor(cursor)?;
    if key.shard != shard || key.user_id.is_empty() {
        return Err(StoreError::InvalidCursor);
    }
    Ok(key)
}

fn decode_pending_cursor(cursor: &Cursor, shard: &str) -> Result<PendingKey> {
    let key: PendingKey = decode_json_cursor(cursor)?;
    if key.shard != shard || key.user_id.is_empty() {
        return Err(StoreError::InvalidCursor);
    }
    Ok(key)
}

fn decode_json_cursor<K: serde::de::DeserializeOwned>(cursor: &Cursor) -> Result<K> {
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(cursor.as_str())
        .map_err(|_| StoreError::InvalidCursor)?;
    serde_json::from_slice(&bytes).map_err(|_| StoreError::InvalidCursor)
}

/// Run a conditional update of an existing item that is not `destroying`:
/// deletion is a state no writer may leave or write under (a sweep's
/// `mark_lost`, a turn's bookkeeping, a worker's `record_machine_id` are all
/// refused once DELETE has begun). Only [`apply_any_state`] callers
/// (`mark_destroying` itself, and `release_lease`, which changes no state)
/// write a `destroying` item.
async fn apply<B: Backend>(
    b: &B,
    op: &'static str,
    user_id: &UserId,
    cond: Cond,
    actions: Vec<Action>,
    now_ms: u64,
) -> Result<std::result::Result<UserRecord, UserRecord>> {
    let cond = Cond::And(vec![state_in(NOT_DESTROYING), cond]);
    apply_any_state(b, op, user_id, cond, actions, now_ms).await
}

/// Run a conditional update of an existing item in any state: adds the
/// existence check, the generation bump and `updated_at`. A refusal without
/// the current item (the backend did not return it) is resolved with one
/// consistent read, so a missing item is always [`StoreError::NotFound`].
async fn apply_any_state<B: Backend>(
    b: &B,
    op: &'static str,
    user_id: &UserId,
    cond: Cond,
    mut actions: Vec<Action>,
    now_ms: u64,
) -> Result<std::result::Result<UserRecord, UserRecord>> {
    debug_assert!(
        {
            let mut seen = std::collections::HashSet::new();
            actions.iter().all(|a| seen.insert(a.attribute()))
        },
        "{op}: an attribute appears twice in one update (DynamoDB rejects overlapping paths)"
    );
    actions.push(Action::Add(attr::GENERATION, 1));
    actions.push(Action::Set(attr::UPDATED_AT, n(now_ms)));
    let update = Update {
        cond: Cond::And(vec![Cond::Exists(attr::USER_ID), cond]),
        actions,
    };
    match b.update(op, user_id, update).await? {
        Ok(rec) => Ok(Ok(rec)),
        Err(Some(current)) => Ok(Err(current)),
        Err(None) => match b.get_item(user_id).await? {
            Some(current) => Ok(Err(current)),
            None => Err(StoreError::NotFound {
                user_id: user_id.to_string(),
            }),
        },
    }
}

/// [`apply`] where a refusal is a [`StoreError::Conflict`].
async fn apply_or_conflict<B: Backend>(
    b: &B,
    op: &'static str,
    user_id: &UserId,
    cond: Cond,
    actions: Vec<Action>,
    now_ms: u64,
) -> Result<UserRecord> {
    apply(b, op, user_id, cond, actions, now_ms)
        .await?
        .map_err(|current| StoreError::Conflict {
            op,
            current: Some(Box::new(current)),
        })
}

/// A write only the lease holder `owner` may make ([`apply_or_conflict`]).
async fn by_holder<B: Backend>(
    b: &B,
    op: &'static str,
    user_id: &UserId,
    owner: &str,
    actions: Vec<Action>,
    now_ms: u64,
) -> Result<UserRecord> {
    apply_or_conflict(b, op, user_id, lease_owned_by(owner), actions, now_ms).await
}

/// A write that takes a lease if all of `conds` hold: `Acquired`, or why
/// not — `Busy` (a live lease) or `Changed` (the item moved on).
async fn take_lease<B: Backend>(
    b: &B,
    op: &'static str,
    user_id: &UserId,
    conds: Vec<Cond>,
    actions: Vec<Action>,
    now_ms: u64,
) -> Result<AcquireOutcome> {
    Ok(
        match apply(b, op, user_id, Cond::And(conds), actions, now_ms).await? {
            Ok(rec) => AcquireOutcome::Acquired(rec),
            Err(current) if current.live_lease(now_ms).is_some() => AcquireOutcome::Busy(current),
            Err(current) => AcquireOutcome::Changed(current),
        },
    )
}

/// Writes that end an awake period (sleep, lost) need `awake_since` as read,
/// to add the awake time; the condition pins it, and a concurrent change
/// (e.g. a power correction) is retried a few times.
async fn end_awake_period<B: Backend>(
    b: &B,
    op: &'static str,
    user_id: &UserId,
    guard: Cond,
    extra: impl Fn(&UserRecord) -> Vec<Action>,
    now_ms: u64,
) -> Result<UserRecord> {
    let mut attempts = 0;
    let mut current = b
        .get_item(user_id)
        .await?
        .ok_or_else(|| StoreError::NotFound {
            user_id: user_id.to_string(),
        })?;
    loop {
        let (pin, mut actions) = match current.awake_since {
            Some(since) => (
                Cond::Eq(attr::AWAKE_SINCE, n(since)),
                vec![Action::Add(
                    attr::AWAKE_MS_TOTAL,
                    now_ms.saturating_sub(since),
                )],
            ),
            None => (Cond::NotExists(attr::AWAKE_SINCE), vec![]),
        };
        actions.extend([
            Action::Remove(attr::AWAKE_SHARD),
            Action::Remove(attr::AWAKE_SINCE),
            Action::Remove(attr::SLEEP_ELIGIBLE_AT),
        ]);
        actions.extend(REMOVE_PENDING_SLEEP);
        actions.extend(extra(&current));
        let cond = Cond::And(vec![guard.clone(), pin]);
        match apply(b, op, user_id, cond.clone(), actions, now_ms).await? {
            Ok(rec) => return Ok(rec),
            Err(now) => {
                attempts += 1;
                let guard_holds =
                    now.state != MachineState::Destroying && guard.eval(&now.to_item()?);
                if !guard_holds || attempts >= 3 {
                    return Err(StoreError::Conflict {
                        op,
                        current: Some(Box::new(now)),
                    });
                }
                current = now;
            }
        }
    }
}

/// The hold set as the lease holder rewrites it: `next` computes it from
/// the item as read (the generation pins that read; a concurrent write is
/// retried a few times while `owner` still holds the lease). A single hold
/// of an older item moves into the set.
async fn rewrite_holds<B: Backend>(
    b: &B,
    op: &'static str,
    user_id: &UserId,
    owner: &str,
    next: impl Fn(&UserRecord) -> Vec<Hold>,
    now_ms: u64,
) -> Result<UserRecord> {
    let mut current = b
        .get_item(user_id)
        .await?
        .ok_or_else(|| StoreError::NotFound {
            user_id: user_id.to_string(),
        })?;
    let mut attempt = 0;
    loop {
        attempt += 1;
        let holds = next(&current);
        let set = if holds.is_empty() {
            Action::Remove(attr::HOLDS)
        } else {
            let value =
                serde_dynamo::to_attribute_value(&holds).map_err(|e| StoreError::Malformed {
                    attribute: attr::HOLDS.to_owned(),
                    message: format!("cannot encode the holds: {e}"),
                })?;
            Action::Set(attr::HOLDS, value)
        };
        let actions = vec![
            set,
            Action::Remove(attr::HOLD_UNTIL),
            Action::Remove(attr::HOLD_MARKER),
        ];
        let cond = Cond::And(vec![
            lease_owned_by(owner),
            Cond::Eq(attr::GENERATION, n(current.generation)),
        ]);
        match apply(b, op, user_id, cond, actions, now_ms).await? {
            Ok(rec) => return Ok(rec),
            Err(now) => {
                let still_ours = lease_owned_by(owner).eval(&now.to_item()?);
                if !still_ours || attempt >= 3 {
                    return Err(StoreError::Conflict {
                        op,
                        current: Some(Box::new(now)),
                    });
                }
                current = now;
            }
        }
    }
}

impl<B: Backend> UserStore for B {
    async fn get(&self, user_id: &UserId) -> Result<Option<UserRecord>> {
        self.get_item(user_id).await
    }

    async fn find_by_machine(&self, machine_id: &str) -> Result<Vec<UserRecord>> {
        non_empty("machine_id", machine_id)?;
        self.query_machine(machine_id).await
    }

    async fn claim(
        &self,
        user_id: &UserId,
        create_key: &str,
        lease: &Lease,
        now_ms: u64,
    ) -> Result<ClaimOutcome> {
        non_empty("lease owner", &lease.owner)?;
        valid_create_key(create_key)?;
        let record = UserRecord {
            user_id: user_id.clone(),
            machine_id: None,
            state: MachineState::Provisioning,
            power: Power::Unknown,
            generation: 1,
            create_key: create_key.to_owned(),
            bootstrap_version: None,
            last_active_at: now_ms,
            lease: Some(lease.clone()),
            terminal_id: None,
            parked_terminals: Vec::new(),
            awake_since: None,
            awake_ms_total: 0,
            sleep_eligible_at: None,
            hold: None,
            holds: Vec::new(),
            last_error: None,
            updated_at: now_ms,
            created_at: now_ms,
            awake_shard: None,
            awake_day: None,
            turns: Default::default(),
            provision_attempts: 0,
            pending_sleep: None,
            gap_hist: Vec::new(),
        };
        match self.put_new(&record).await? {
            Ok(()) => Ok(ClaimOutcome::Claimed(record)),
            Err(Some(current)) => Ok(ClaimOutcome::AlreadyExists(current)),
            // Refused without the item: it existed at the time; read it.
            Err(None) => match self.get_item(user_id).await? {
                Some(current) => Ok(ClaimOutcome::AlreadyExists(current)),
                None => Err(StoreError::Conflict {
                    op: "claim",
                    current: None,
                }),
            },
        }
    }

    async fn record_machine_id(
        &self,
        user_id: &UserId,
        create_key: &str,
        machine_id: &str,
        now_ms: u64,
    ) -> Result<UserRecord> {
        non_empty("machine_id", machine_id)?;
        let cond = Cond::And(vec![
            Cond::Eq(attr::CREATE_KEY, s(create_key)),
            Cond::Or(vec![
                Cond::NotExists(attr::MACHINE_ID),
                Cond::Eq(attr::MACHINE_ID, s(machine_id)),
            ]),
        ]);
        let mut actions = vec![Action::Set(attr::MACHINE_ID, s(machine_id))];
        actions.extend(super::stage::stage_actions(
            super::stage::ProvisionStage::Booting,
            now_ms,
        ));
        apply_or_conflict(self, "record_machine_id", user_id, cond, actions, now_ms).await
    }

    async fn mark_bootstrapping(
        &self,
        user_id: &UserId,
        owner: &str,
        now_ms: u64,
    ) -> Result<UserRecord> {
        let cond = Cond::And(vec![
            lease_owned_by(owner),
            Cond::Exists(attr::MACHINE_ID),
            state_in(&[MachineState::Provisioning, MachineState::Bootstrapping]),
        ]);
        let mut actions = vec![Action::Set(
            attr::STATE,
            s(MachineState::Bootstrapping.as_str()),
        )];
        actions.extend(super::stage::stage_actions(
            super::stage::ProvisionStage::Bootstrapping,
            now_ms,
        ));
        apply_or_conflict(self, "mark_bootstrapping", user_id, cond, actions, now_ms).await
    }

    async fn mark_ready(
        &self,
        user_id: &UserId,
        owner: &str,
        bootstrap_version: &str,
        now_ms: u64,
    ) -> Result<UserRecord> {
        non_empty("bootstrap_version", bootstrap_version)?;
        let cond = Cond::And(vec![
            lease_owned_by(owner),
            Cond::Exists(attr::MACHINE_ID),
            state_in(&[
                MachineState::Provisioning,
                MachineState::Bootstrapping,
                MachineState::Ready,
            ]),
        ]);
        let mut actions = vec![
            Action::Set(attr::STATE, s(MachineState::Ready.as_str())),
            Action::Set(attr::BOOTSTRAP_VERSION, s(bootstrap_version)),
            Action::Set(attr::LAST_ACTIVE_AT, n(now_ms)),
            Action::Remove(attr::LAST_ERROR),
        ];
        actions.extend(awake_actions(user_id, now_ms, self.awake_shards()));
        actions.extend(super::stage::CLEAR_STAGE);
        apply_or_conflict(self, "mark_ready", user_id, cond, actions, now_ms).await
    }

    async fn mark_failed(
        &self,
        user_id: &UserId,
        owner: &str,
        error: &str,
        now_ms: u64,
    ) -> Result<UserRecord> {
        let cond = Cond::And(vec![
            lease_owned_by(owner),
            state_in(&[MachineState::Provisioning, MachineState::Bootstrapping]),
        ]);
        let actions = vec![
            Action::Set(attr::STATE, s(MachineState::Failed.as_str())),
            Action::Set(attr::LAST_ERROR, error_text(error)),
        ];
        apply_or_conflict(self, "mark_failed", user_id, cond, actions, now_ms).await
    }

    async fn restart_provisioning(
        &self,
        user_id: &UserId,
        expected_generation: u64,
        lease: &Lease,
        create_key: CreateKey,
        now_ms: u64,
    ) -> Result<AcquireOutcome> {
        non_empty("lease owner", &lease.owner)?;
        let mut conds = vec![
            Cond::Eq(attr::GENERATION, n(expected_generation)),
            state_in(&[
                MachineState::Provisioning,
                MachineState::Bootstrapping,
                MachineState::Failed,
            ]),
            no_live_lease(now_ms),
        ];
        let mut actions = vec![
            Action::Set(attr::STATE, s(MachineState::Provisioning.as_str())),
            Action::Remove(attr::LAST_ERROR),
            Action::Set(attr::PROVISION_ATTEMPTS, n(0)),
        ];
        actions.extend(set_lease(lease));
        actions.extend(super::stage::stage_actions(
            super::stage::ProvisionStage::Claimed,
            now_ms,
        ));
        if let CreateKey::Replace(key) = &create_key {
            valid_create_key(key)?;
            conds.push(Cond::NotExists(attr::MACHINE_ID));
            actions.push(Action::Set(attr::CREATE_KEY, s(key)));
        }
        take_lease(
            self,
            "restart_provisioning",
            user_id,
            conds,
            actions,
            now_ms,
        )
        .await
    }

    async fn acquire_lease(
        &self,
        user_id: &UserId,
        owner: &str,
        purpose: LeasePurpose,
        until_ms: u64,
        now_ms: u64,
    ) -> Result<AcquireOutcome> {
        non_empty("lease owner", owner)?;
        let mut conds = vec![state_in(NOT_DESTROYING), no_live_lease(now_ms)];
        if let LeasePurpose::Sweep {
            expected_last_active_at,
        } = purpose
        {
            conds.push(Cond::Eq(attr::LAST_ACTIVE_AT, n(expected_last_active_at)));
        }
        let lease = Lease::new(owner, purpose.kind(), until_ms);
        let mut actions = set_lease(&lease).to_vec();
        // The provisioning worker took over from the trigger: its next step
        // is the create (a recorded machine reads as `booting`).
        if purpose == LeasePurpose::Provision {
            actions.extend(super::stage::stage_actions(
                super::stage::ProvisionStage::Creating,
                now_ms,
            ));
        }
        if matches!(purpose, LeasePurpose::Provision) {
            // The worker's run: one more attempt at this provisioning.
            actions.push(Action::Add(attr::PROVISION_ATTEMPTS, 1));
        }
        if purpose == LeasePurpose::Turn {
            // A turn starting cancels a pending sleep (requested or adaptive).
            actions.extend(REMOVE_PENDING_SLEEP);
        }
        take_lease(self, "acquire_lease", user_id, conds, actions, now_ms).await
    }

    async fn renew_lease(
        &self,
        user_id: &UserId,
        owner: &str,
        until_ms: u64,
        now_ms: u64,
    ) -> Result<UserRecord> {
        let actions = vec![Action::Set(attr::LEASE_UNTIL, n(until_ms))];
        by_holder(self, "renew_lease", user_id, owner, actions, now_ms).await
    }

    async fn release_lease(
        &self,
        user_id: &UserId,
        owner: &str,
        now_ms: u64,
    ) -> Result<ReleaseOutcome> {
        let released = apply_any_state(
            self,
            "release_lease",
            user_id,
            lease_owned_by(owner),
            REMOVE_LEASE.to_vec(),
            now_ms,
        )
        .await;
        match released {
            Ok(Ok(rec)) => Ok(ReleaseOutcome::Released(rec)),
            Ok(Err(current)) => Ok(ReleaseOutcome::NotHeld(Some(current))),
            Err(StoreError::NotFound { .. }) => Ok(ReleaseOutcome::NotHeld(None)),
            Err(e) => Err(e),
        }
    }

    async fn mark_awake(&self, user_id: &UserId, owner: &str, now_ms: u64) -> Result<UserRecord> {
        let mut actions = vec![Action::Set(attr::LAST_ACTIVE_AT, n(now_ms))];
        actions.extend(awake_actions(user_id, now_ms, self.awake_shards()));
        by_holder(self, "mark_awake", user_id, owner, actions, now_ms).await
    }

    async fn touch(&self, user_id: &UserId, owner: &str, now_ms: u64) -> Result<UserRecord> {
        let actions = vec![Action::Set(attr::LAST_ACTIVE_AT, n(now_ms))];
        by_holder(self, "touch", user_id, owner, actions, now_ms).await
    }

    async fn set_terminal(
        &self,
        user_id: &UserId,
        owner: &str,
        terminal_id: Option<&str>,
        now_ms: u64,
    ) -> Result<UserRecord> {
        let action = match terminal_id {
            Some(t) => {
                non_empty("terminal_id", t)?;
                Action::Set(attr::TERMINAL_ID, s(t))
            }
            None => Action::Remove(attr::TERMINAL_ID),
        };
        by_holder(self, "set_terminal", user_id, owner, vec![action], now_ms).await
    }

    async fn set_terminals(
        &self,
        user_id: &UserId,
        owner: &str,
        current: Option<&str>,
        parked: &[String],
        now_ms: u64,
    ) -> Result<UserRecord> {
        let mut actions = vec![match current {
            Some(t) => {
                non_empty("terminal_id", t)?;
                Action::Set(attr::TERMINAL_ID, s(t))
            }
            None => Action::Remove(attr::TERMINAL_ID),
        }];
        if parked.iter().any(String::is_empty) {
            return Err(StoreError::InvalidArgument(
                "parked terminal id is empty".to_owned(),
            ));
        }
        actions.push(if parked.is_empty() {
            Action::Remove(attr::PARKED_TERMINALS)
        } else {
            Action::Set(
                attr::PARKED_TERMINALS,
                AttributeValue::L(parked.iter().map(|t| s(t)).collect()),
            )
        });
        by_holder(self, "set_terminals", user_id, owner, actions, now_ms).await
    }

    async fn set_hold(
        &self,
        user_id: &UserId,
        owner: &str,
        hold: &Hold,
        now_ms: u64,
    ) -> Result<UserRecord> {
        non_empty("marker", &hold.marker)?;
        let add = |current: &UserRecord| {
            let mut holds: Vec<Hold> = current
                .all_holds()
                .filter(|h| h.marker != hold.marker && h.until >= now_ms)
                .cloned()
                .collect();
            holds.push(hold.clone());
            holds
        };
        rewrite_holds(self, "set_hold", user_id, owner, add, now_ms).await
    }

    async fn release_holds(
        &self,
        user_id: &UserId,
        owner: &str,
        markers: &[String],
        now_ms: u64,
    ) -> Result<UserRecord> {
        let keep = |current: &UserRecord| {
            current
                .all_holds()
                .filter(|h| !markers.contains(&h.marker))
                .cloned()
                .collect()
        };
        rewrite_holds(self, "release_holds", user_id, owner, keep, now_ms).await
    }

    async fn clear_hold(&self, user_id: &UserId, owner: &str, now_ms: u64) -> Result<UserRecord> {
        let actions = vec![
            Action::Remove(attr::HOLD_UNTIL),
            Action::Remove(attr::HOLD_MARKER),
            Action::Remove(attr::HOLDS),
        ];
        by_holder(self, "clear_hold", user_id, owner, actions, now_ms).await
    }

    async fn mark_asleep(&self, user_id: &UserId, owner: &str, now_ms: u64) -> Result<UserRecord> {
        let guard = Cond::And(vec![
            lease_owned_by(owner),
            Cond::Eq(attr::LEASE_KIND, s(LeaseKind::Sweep.as_str())),
        ]);
        let extra = |_: &UserRecord| vec![Action::Set(attr::POWER, s(Power::Asleep.as_str()))];
        end_awake_period(self, "mark_asleep", user_id, guard, extra, now_ms).await
    }

    async fn set_sleep_eligible_at(
        &self,
        user_id: &UserId,
        owner: &str,
        eligible_at_ms: u64,
        now_ms: u64,
    ) -> Result<UserRecord> {
        let actions = vec![Action::Set(attr::SLEEP_ELIGIBLE_AT, n(eligible_at_ms))];
        by_holder(
            self,
            "set_sleep_eligible_at",
            user_id,
            owner,
            actions,
            now_ms,
        )
        .await
    }

    async fn mark_lost(
        &self,
        user_id: &UserId,
        owner: &str,
        error: &str,
        now_ms: u64,
    ) -> Result<UserRecord> {
        let extra = |current: &UserRecord| {
            let machine = current.machine_id.as_deref().unwrap_or("(none)");
            vec![
                Action::Set(attr::STATE, s(MachineState::Failed.as_str())),
                Action::Set(attr::POWER, s(Power::Unknown.as_str())),
                Action::Set(
                    attr::LAST_ERROR,
                    error_text(&format!("machine {machine} lost: {error}")),
                ),
                Action::Remove(attr::MACHINE_ID),
                Action::Remove(attr::TERMINAL_ID),
                Action::Remove(attr::PARKED_TERMINALS),
                Action::Remove(attr::HOLD_UNTIL),
                Action::Remove(attr::HOLD_MARKER),
                Action::Remove(attr::HOLDS),
                Action::Remove(attr::BOOTSTRAP_VERSION),
                // The old key's create produced the machine that is now
                // gone: a retry with it would get that machine back. The
                // next provisioning creates a new one under a fresh key.
                Action::Set(attr::CREATE_KEY, s(&crate::store::new_create_key())),
            ]
        };
        end_awake_period(
            self,
            "mark_lost",
            user_id,
            lease_owned_by(owner),
            extra,
            now_ms,
        )
        .await
    }

    async fn set_power(
        &self,
        current: &UserRecord,
        power: Power,
        now_ms: u64,
    ) -> Result<UserRecord> {
        let user_id = &current.user_id;
        let cond = Cond::Eq(attr::GENERATION, n(current.generation));
        let actions = match power {
            Power::Awake => awake_actions(user_id, now_ms, self.awake_shards()).to_vec(),
            Power::Asleep => {
                let mut actions = vec![
                    Action::Set(attr::POWER, s(Power::Asleep.as_str())),
                    Action::Remove(attr::AWAKE_SHARD),
                    Action::Remove(attr::AWAKE_SINCE),
                ];
                actions.extend(REMOVE_PENDING_SLEEP);
                if let Some(since) = current.awake_since {
                    actions.push(Action::Add(
                        attr::AWAKE_MS_TOTAL,
                        now_ms.saturating_sub(since),
                    ));
                }
                actions
            }
            Power::Unknown => vec![Action::Set(attr::POWER, s(Power::Unknown.as_str()))],
        };
        apply_or_conflict(self, "set_power", user_id, cond, actions, now_ms).await
    }

    async fn mark_destroying(&self, user_id: &UserId, now_ms: u64) -> Result<UserRecord> {
        let actions = vec![
            Action::Set(attr::STATE, s(MachineState::Destroying.as_str())),
            Action::Remove(attr::AWAKE_SHARD),
            Action::Remove(attr::SLEEP_SHARD),
            Action::Remove(attr::SLEEP_AT),
            Action::Remove(attr::SLEEP_REASON),
        ];
        // Existence is the only condition: deletion wins over every state.
        let cond = Cond::Exists(attr::USER_ID);
        apply_any_state(self, "mark_destroying", user_id, cond, actions, now_ms)
            .await?
            .map_err(|current| StoreError::Conflict {
                op: "mark_destroying",
                current: Some(Box::new(current)),
            })
    }

    async fn delete(&self, user_id: &UserId, guard: DeleteGuard) -> Result<DeleteOutcome> {
        let cond = match guard {
            DeleteGuard::Generation(g) => Cond::Eq(attr::GENERATION, n(g)),
            DeleteGuard::Destroying => Cond::Eq(attr::STATE, s(MachineState::Destroying.as_str())),
        };
        match self.delete_item(user_id, cond).await? {
            Ok(old) => Ok(DeleteOutcome::Deleted(Box::new(old))),
            Err(Some(current)) => Err(StoreError::Conflict {
                op: "delete",
                current: Some(Box::new(current)),
            }),
            Err(None) => match self.get_item(user_id).await? {
                None => Ok(DeleteOutcome::AlreadyGone),
                Some(current) => Err(StoreError::Conflict {
                    op: "delete",
                    current: Some(Box::new(current)),
                }),
            },
        }
    }

    async fn count_request(
        &self,
        user_id: &UserId,
        counter: Counter,
        limit: u32,
        window_ms: u64,
        now_ms: u64,
    ) -> Result<CountOutcome> {
        let window_ms = window_ms.max(1);
        let window = now_ms - now_ms % window_ms;
        let limited = CountOutcome::Limited {
            retry_after_ms: window + window_ms - now_ms,
        };
        if limit == 0 {
            return Ok(limited);
        }
        let (win_attr, count_attr) = counter.attributes();
        // Count in the current window, below the limit ...
        let bump = Update {
            cond: Cond::And(vec![
                Cond::Exists(attr::USER_ID),
                Cond::Eq(win_attr, n(window)),
                Cond::Lt(count_attr, u64::from(limit)),
            ]),
            actions: vec![Action::Add(count_attr, 1)],
        };
        // ... or start the current window (the stored one is older or absent).
        let start = Update {
            cond: Cond::And(vec![
                Cond::Exists(attr::USER_ID),
                Cond::Or(vec![Cond::NotExists(win_attr), Cond::Lt(win_attr, window)]),
            ]),
            actions: vec![
                Action::Set(win_attr, n(window)),
                Action::Set(count_attr, n(1)),
            ],
        };
        // A concurrent start between the two makes the first one succeed on
        // the next round; windows only move forward, so this ends.
        for _ in 0..2 {
            if self
                .update("count_request", user_id, bump.clone())
                .await?
                .is_ok()
            {
                return Ok(CountOutcome::Counted);
            }
            match self.update("count_request", user_id, start.clone()).await? {
                Ok(_) => return Ok(CountOutcome::Counted),
                Err(None) if self.get_item(user_id).await?.is_none() => {
                    return Ok(CountOutcome::NoItem)
                }
                Err(_) => {}
            }
        }
        Ok(limited)
    }

    async fn note_awake_day(&self, user_id: &UserId, day_start: u64, base_ms: u64) -> Result<()> {
        let update = Update {
            cond: Cond::And(vec![
                Cond::Exists(attr::USER_ID),
                Cond::Or(vec![
                    Cond::NotExists(attr::AWAKE_DAY),
                    Cond::Lt(attr::AWAKE_DAY, day_start),
                ]),
            ]),
            actions: vec![
                Action::Set(attr::AWAKE_DAY, n(day_start)),
                Action::Set(attr::AWAKE_DAY_BASE, n(base_ms)),
            ],
        };
        match self.update("note_awake_day", user_id, update).await? {
            Ok(_) | Err(Some(_)) => Ok(()),
            Err(None) => match self.get_item(user_id).await? {
                Some(_) => Ok(()),
                None => Err(StoreError::NotFound {
                    user_id: user_id.to_string(),
                }),
            },
        }
    }

    async fn query_awake_idle(
        &self,
        shard: &str,
        idle_before_ms: u64,
        cursor: Option<&Cursor>,
        limit: u32,
    ) -> Result<Page<UserRecord>> {
        non_empty("shard", shard)?;
        if limit == 0 {
            return Err(StoreError::InvalidArgument(
                "limit must be at least 1".to_owned(),
            ));
        }
        let start = cursor.map(|c| decode_cursor(c, shard)).transpose()?;
        let (items, last) = self
            .query_awake(shard, idle_before_ms, start, limit)
            .await?;
        Ok(Page {
            items,
            cursor: last.as_ref().map(encode_cursor).transpose()?,
        })
    }

    async fn begin_turn(
        &self,
        user_id: &UserId,
        owner: &str,
        until_ms: u64,
        count: Option<TurnCount>,
        now_ms: u64,
    ) -> Result<BeginTurn> {
        begin_turn(self, user_id, owner, until_ms, count, now_ms).await
    }

    async fn end_turn(
        &self,
        user_id: &UserId,
        owner: &str,
        end: &TurnEnd,
        now_ms: u64,
    ) -> Result<UserRecord> {
        end_turn(self, user_id, owner, end, now_ms).await
    }

    async fn move_awake_shard(&self, user_id: &UserId, from: &str, to: &str) -> Result<bool> {
        non_empty("shard", from)?;
        non_empty("shard", to)?;
        let update = Update {
            cond: Cond::And(vec![
                Cond::Exists(attr::USER_ID),
                Cond::Eq(attr::AWAKE_SHARD, s(from)),
            ]),
            actions: vec![Action::Set(attr::AWAKE_SHARD, s(to))],
        };
        Ok(self
            .update("move_awake_shard", user_id, update)
            .await?
            .is_ok())
    }

    async fn schedule_sleep(
        &self,
        user_id: &UserId,
        plan: &SleepPlan<'_>,
        now_ms: u64,
    ) -> Result<UserRecord> {
        schedule_sleep(self, user_id, plan, now_ms).await
    }

    async fn clear_pending_sleep(
        &self,
        user_id: &UserId,
        expected_at: u64,
        now_ms: u64,
    ) -> Result<UserRecord> {
        clear_pending_sleep(self, user_id, expected_at, now_ms).await
    }

    async fn query_pending_sleeps(
        &self,
        shard: &str,
        due_by_ms: u64,
        cursor: Option<&Cursor>,
        limit: u32,
    ) -> Result<Page<UserRecord>> {
        query_pending_sleeps(self, shard, due_by_ms, cursor, limit).await
    }
}

/// The write of [`UserStore::schedule_sleep`]: refused unless the item is
/// as the caller left it (`last_active_at` unchanged, no live lease — a turn
/// that started since would hold one, or have moved `last_active_at`).
fn schedule_sleep_update(
    plan: &SleepPlan<'_>,
    user_id: &UserId,
    now_ms: u64,
) -> (Cond, Vec<Action>) {
    let mut conds = vec![
        Cond::Eq(attr::LAST_ACTIVE_AT, n(plan.expected_last_active_at)),
        no_live_lease(now_ms),
    ];
    let mut actions = Vec::new();
    if let Some((at, reason)) = plan.sleep {
        conds.push(Cond::Exists(attr::AWAKE_SHARD));
        actions.extend([
            Action::Set(attr::SLEEP_SHARD, s(&shard_for(user_id))),
            Action::Set(attr::SLEEP_AT, n(at)),
            Action::Set(attr::SLEEP_REASON, s(reason.as_str())),
        ]);
    }
    if let Some(hist) = plan.gap_hist {
        actions.push(Action::Set(
            attr::GAP_HIST,
            AttributeValue::L(hist.iter().map(|c| n(u64::from(*c))).collect()),
        ));
    }
    (Cond::And(conds), actions)
}

/// The pending-sleep operations (`pending-sleep` index; docs/design.md §4).
pub(super) async fn schedule_sleep<B: Backend>(
    b: &B,
    user_id: &UserId,
    plan: &SleepPlan<'_>,
    now_ms: u64,
) -> Result<UserRecord> {
    let (cond, actions) = schedule_sleep_update(plan, user_id, now_ms);
    if actions.is_empty() {
        return Err(StoreError::InvalidArgument(
            "a sleep plan with nothing to write".to_owned(),
        ));
    }
    apply_or_conflict(b, "schedule_sleep", user_id, cond, actions, now_ms).await
}

pub(super) async fn clear_pending_sleep<B: Backend>(
    b: &B,
    user_id: &UserId,
    expected_at: u64,
    now_ms: u64,
) -> Result<UserRecord> {
    let cond = Cond::Eq(attr::SLEEP_AT, n(expected_at));
    let actions = REMOVE_PENDING_SLEEP.to_vec();
    apply_or_conflict(b, "clear_pending_sleep", user_id, cond, actions, now_ms).await
}

pub(super) async fn query_pending_sleeps<B: Backend>(
    b: &B,
    shard: &str,
    due_by_ms: u64,
    cursor: Option<&Cursor>,
    limit: u32,
) -> Result<Page<UserRecord>> {
    non_empty("shard", shard)?;
    if limit == 0 {
        return Err(StoreError::InvalidArgument(
            "limit must be at least 1".to_owned(),
        ));
    }
    let start = cursor
        .map(|c| decode_pending_cursor(c, shard))
        .transpose()?;
    let (items, last) = b.query_pending(shard, due_by_ms, start, limit).await?;
    Ok(Page {
        items,
        cursor: last.as_ref().map(encode_cursor).transpose()?,
    })
}

/// The key of `rec` in the `pending-sleep` index, if it is in it.
pub fn pending_key(rec: &UserRecord) -> Option<PendingKey> {
    rec.pending_sleep.as_ref().map(|p| PendingKey {
        shard: p.shard.clone(),
        sleep_at: p.at,
        user_id: rec.user_id.to_string(),
    })
}

// ------------------------------------------------------------ turn writes --

/// How a turn's fair-use count is written: into the stored window (below
/// the limit) or as the first turn of a new window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CountForm {
    Bump,
    Start,
}

/// The fair-use condition and actions of `form` for the window `window`.
fn count_parts(form: CountForm, window: u64, limit: u32) -> (Cond, Vec<Action>) {
    use super::table::attr::{TURNS_COUNT, TURNS_WINDOW};
    match form {
        CountForm::Bump => (
            Cond::And(vec![
                Cond::Eq(TURNS_WINDOW, n(window)),
                Cond::Lt(TURNS_COUNT, u64::from(limit)),
            ]),
            vec![Action::Add(TURNS_COUNT, 1)],
        ),
        CountForm::Start => (
            Cond::Or(vec![
                Cond::NotExists(TURNS_WINDOW),
                Cond::Lt(TURNS_WINDOW, window),
            ]),
            vec![
                Action::Set(TURNS_WINDOW, n(window)),
                Action::Set(TURNS_COUNT, n(1)),
            ],
        ),
    }
}

/// The item allows a turn to begin at `now_ms` (counter aside). A flat
/// list, spliced into the write's condition (DynamoDB refuses redundant
/// parentheses).
fn turn_may_begin(now_ms: u64) -> Vec<Cond> {
    vec![
        Cond::Eq(attr::STATE, s(MachineState::Ready.as_str())),
        Cond::Exists(attr::MACHINE_ID),
        no_live_lease(now_ms),
    ]
}

async fn begin_turn<B: Backend>(
    b: &B,
    user_id: &UserId,
    owner: &str,
    until_ms: u64,
    count: Option<TurnCount>,
    now_ms: u64,
) -> Result<BeginTurn> {
    non_empty("owner", owner)?;
    let window = count.map(|c| {
        let w = c.window_ms.max(1);
        (now_ms - now_ms % w, w)
    });
    let mut form = match (count, window) {
        (Some(c), Some((w, _))) if c.stored_window == Some(w) => CountForm::Bump,
        _ => CountForm::Start,
    };
    let lease = Lease::new(owner, LeaseKind::Turn, until_ms);
    // A wrong guess of the stored window is corrected once per form.
    for _ in 0..3 {
        let mut cond = turn_may_begin(now_ms);
        let mut actions = begin_turn_actions(&lease, user_id, now_ms, b.awake_shards());
        if let (Some(c), Some((w, _))) = (count, window) {
            let (c_cond, c_actions) = count_parts(form, w, c.limit);
            cond.push(c_cond);
            actions.extend(c_actions);
        }
        let current = match apply(b, "begin_turn", user_id, Cond::And(cond), actions, now_ms).await
        {
            Ok(Ok(rec)) => return Ok(BeginTurn::Begun(rec)),
            Ok(Err(current)) => current,
            Err(StoreError::NotFound { .. }) => return Ok(BeginTurn::NoItem),
            Err(e) => return Err(e),
        };
        let (Some(c), Some(window)) = (count, window) else {
            return Ok(BeginTurn::Refused(current));
        };
        form = match refused_count(current, c, window, form, now_ms)? {
            Ok(right) => right,
            Err(answer) => return Ok(answer),
        };
    }
    // The window moved under us three times: another writer counts too.
    Ok(BeginTurn::Limited {
        retry_after_ms: 1000,
    })
}

/// What a beginning turn writes, the fair-use count aside: its lease, the
/// activity (the one before it kept first, for adaptive idle's gap), awake,
/// one more turn, and no pending sleep (a turn starting cancels it).
fn begin_turn_actions(lease: &Lease, user_id: &UserId, now_ms: u64, shards: u32) -> Vec<Action> {
    let mut actions = set_lease(lease).to_vec();
    actions.push(Action::CopyOr(
        attr::PREV_ACTIVE_AT,
        attr::LAST_ACTIVE_AT,
        n(now_ms),
    ));
    actions.push(Action::Set(attr::LAST_ACTIVE_AT, n(now_ms)));
    actions.extend(awake_actions(user_id, now_ms, shards));
    actions.push(Action::Add(attr::TURN_SEQ, 1));
    actions.extend(REMOVE_PENDING_SLEEP);
    actions
}

/// A counted begin was refused with the item as `current`: the answer
/// (limited, or refused for another reason), or the count form to try
/// again with when only the guess of the stored window was wrong.
fn refused_count(
    current: UserRecord,
    c: TurnCount,
    (w, len): (u64, u64),
    form: CountForm,
    now_ms: u64,
) -> Result<std::result::Result<CountForm, BeginTurn>> {
    let marks = current.turns;
    if marks.window == Some(w) && marks.count >= u64::from(c.limit) {
        return Ok(Err(BeginTurn::Limited {
            retry_after_ms: w + len - now_ms,
        }));
    }
    let right = if marks.window == Some(w) {
        CountForm::Bump
    } else {
        CountForm::Start
    };
    let may_begin = current.state != MachineState::Destroying
        && Cond::And(turn_may_begin(now_ms)).eval(&current.to_item()?);
    if right == form || !may_begin {
        return Ok(Err(BeginTurn::Refused(current)));
    }
    Ok(Ok(right))
}

/// The actions storing the terminals a turn leaves.
fn terminal_actions(current: Option<&str>, parked: &[String]) -> Result<Vec<Action>> {
    if parked.iter().any(String::is_empty) || current.is_some_and(str::is_empty) {
        return Err(StoreError::InvalidArgument(
            "terminal id is empty".to_owned(),
        ));
    }
    Ok(vec![
        match current {
            Some(t) => Action::Set(attr::TERMINAL_ID, s(t)),
            None => Action::Remove(attr::TERMINAL_ID),
        },
        if parked.is_empty() {
            Action::Remove(attr::PARKED_TERMINALS)
        } else {
            Action::Set(
                attr::PARKED_TERMINALS,
                AttributeValue::L(parked.iter().map(|t| s(t)).collect()),
            )
        },
    ])
}

/// The actions writing the whole hold set (an older single hold moves in).
fn hold_actions(holds: &[Hold]) -> Result<Vec<Action>> {
    let set = if holds.is_empty() {
        Action::Remove(attr::HOLDS)
    } else {
        let value = serde_dynamo::to_attribute_value(holds).map_err(|e| StoreError::Malformed {
            attribute: attr::HOLDS.to_owned(),
            message: format!("cannot encode the holds: {e}"),
        })?;
        Action::Set(attr::HOLDS, value)
    };
    Ok(vec![
        set,
        Action::Remove(attr::HOLD_UNTIL),
        Action::Remove(attr::HOLD_MARKER),
    ])
}

async fn end_turn<B: Backend>(
    b: &B,
    user_id: &UserId,
    owner: &str,
    end: &TurnEnd,
    now_ms: u64,
) -> Result<UserRecord> {
    let mut actions = REMOVE_LEASE.to_vec();
    actions.push(Action::Set(attr::LAST_ACTIVE_AT, n(now_ms)));
    if let Some((current, parked)) = &end.terminals {
        actions.extend(terminal_actions(current.as_deref(), parked)?);
    }
    if let Some(holds) = &end.holds {
        actions.extend(hold_actions(holds)?);
    }
    if let Some(seq) = end.clean_seq {
        actions.push(Action::Set(attr::CLEAN_SEQ, n(seq)));
    }
    by_holder(b, "end_turn", user_id, owner, actions, now_ms).await
}

/// The key of `rec` in the `awake` index, if it is in it.
pub fn awake_key(rec: &UserRecord) -> Option<AwakeKey> {
    rec.awake_shard.as_ref().map(|shard| AwakeKey {
        shard: shard.clone(),
        last_active_at: rec.last_active_at,
        user_id: rec.user_id.to_string(),
    })
}

/// The key of the item with partition key `pk` (a user id, or a turn key's).
pub fn key(pk: &str) -> Item {
    Item::from([(attr::USER_ID.to_owned(), s(pk))])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn given_a_long_multibyte_error_when_stored_then_it_is_cut_on_a_char_boundary() {
        let long = "é".repeat(MAX_ERROR_BYTES);
        match error_text(&long) {
            AttributeValue::S(kept) => {
                assert!(kept.len() <= MAX_ERROR_BYTES && kept.len() >= MAX_ERROR_BYTES - 1);
                assert!(kept.chars().all(|c| c == 'é'));
            }
            other => panic!("expected S, got {other:?}"),
        }
    }

    #[test]
    fn given_conditions_when_evaluated_then_missing_attributes_compare_false() {
        let item = Item::from([
            ("n".to_owned(), AttributeValue::N("10".into())),
            ("s".to_owned(), AttributeValue::S("x".into())),
        ]);
        assert!(Cond::Lt("n", 11).eval(&item));
        assert!(!Cond::Lt("n", 10).eval(&item));
        assert!(!Cond::Lt("missing", u64::MAX).eval(&item));
        assert!(!Cond::Lt("s", u64::MAX).eval(&item));
        assert!(Cond::Eq("n", AttributeValue::N("010".into())).eval(&item));
        assert!(!Cond::Eq("missing", AttributeValue::S("x".into())).eval(&item));
        assert!(Cond::In("s", vec![s("y"), s("x")]).eval(&item));
        assert!(Cond::Or(vec![Cond::NotExists("missing"), Cond::Exists("missing")]).eval(&item));
    }
}
