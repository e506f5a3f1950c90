//! The user→machine table (docs/design.md §4): the typed item, the [`UserStore`]
//! operations, and two adapters with identical semantics: [`DynamoStore`]
//! (DynamoDB) and [`MemoryStore`] (in-process, for fast domain tests).
//!
//! Every write is one conditional write whose outcome is typed: a refused
//! condition is a variant of the operation's outcome or
//! [`StoreError::Conflict`] carrying the current item (from
//! `ReturnValuesOnConditionCheckFailure=ALL_OLD`, no second read), never a
//! stringified SDK error. Every write bumps `generation` and sets
//! `updated_at`. Time is always passed in (`now_ms`, epoch ms): the store
//! never reads a clock.
//!
//! Leases: a lease is *live* while `now_ms <= lease.until`. Acquiring needs no
//! live lease; renewing, releasing and every "bookkeeping" write under a lease
//! need `lease_owner == owner` (an expired lease nobody took is still yours;
//! a taken one is not). Owners must be unique per acquisition.
//!
//! Deletion wins: once [`UserStore::mark_destroying`] has run, every other
//! write is refused (a `destroying` item is never turned back into
//! `failed`, `ready` or awake, and no machine id is recorded on it); only
//! [`UserStore::release_lease`] (no state change) and
//! [`UserStore::delete`] still apply.
//!
//! Optimistic concurrency: operations a caller performs *because of what it
//! read* ([`UserStore::restart_provisioning`], [`UserStore::set_power`],
//! [`UserStore::delete`]) take the read `generation`; lease operations use
//! direct attribute conditions instead.
//!
//! The semantics live once, in a blanket implementation over a small private
//! backend interface (get / put-if-absent / conditional update / conditional
//! delete / two index queries); the adapters only translate those.

use std::future::Future;

use crate::api::UserId;

mod dynamo;
mod engine;
mod memory;
mod raw;
mod record;
pub mod stage;
pub mod table;
pub mod turn_keys;

pub use dynamo::DynamoStore;
pub use memory::{MemoryStore, StoreHook};
pub use record::{
    AwakeDay, Hold, Item, Lease, LeaseKind, MachineState, PendingSleep, Power, SleepReason,
    TurnMarks, UserRecord,
};
pub use table::{create_table, shard_for, shard_in, ShardLayout, AWAKE_SHARDS};

pub use stage::{ProvisionStage, StageReader, StageView};
pub use turn_keys::{TurnKeyBegin, TurnKeys};

/// Result of store operations.
pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// Errors from the store. Refused conditions are [`StoreError::Conflict`]
/// (or an operation-specific outcome); infrastructure failures keep the SDK
/// error as their source and say whether retrying may help.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The user has no item.
    #[error("no item for user {user_id}")]
    NotFound {
        /// The user looked up.
        user_id: String,
    },
    /// A conditional write was refused; `current` is the item as it is now
    /// (when the backend returned it).
    #[error("{op}: condition failed (item changed, lease not held, or wrong state)")]
    Conflict {
        /// The operation refused.
        op: &'static str,
        /// The current item.
        current: Option<Box<UserRecord>>,
    },
    /// An item read from the table does not decode.
    #[error("malformed item: attribute {attribute:?}: {message}")]
    Malformed {
        /// The offending attribute.
        attribute: String,
        /// What is wrong with it.
        message: String,
    },
    /// The caller passed a value the table cannot hold (empty key, bad create key, ...).
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// A page cursor that this store did not produce (or for another shard).
    #[error("invalid page cursor")]
    InvalidCursor,
    /// The backend failed (network, throttling, service error).
    #[error("{op}: DynamoDB request failed (retryable: {retryable})")]
    Backend {
        /// The operation that failed.
        op: &'static str,
        /// Throttling, 5xx or transport failure: worth retrying later.
        retryable: bool,
        /// The SDK error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

impl StoreError {
    /// Whether retrying the same operation later may succeed (throttling,
    /// 5xx, transport). Conflicts are not retryable as such: re-read and decide.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            Self::Backend {
                retryable: true,
                ..
            }
        )
    }

    /// The current item carried by a [`StoreError::Conflict`].
    pub fn current(&self) -> Option<&UserRecord> {
        match self {
            Self::Conflict { current, .. } => current.as_deref(),
            _ => None,
        }
    }

    pub(crate) fn backend(
        op: &'static str,
        retryable: bool,
        source: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> Self {
        Self::Backend {
            op,
            retryable,
            source: source.into(),
        }
    }
}

/// Outcome of [`UserStore::claim`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClaimOutcome {
    /// This call created the item.
    Claimed(UserRecord),
    /// The item already existed; here it is, untouched.
    AlreadyExists(UserRecord),
}

/// What a lease is being acquired for, with the extra condition each needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeasePurpose {
    /// A chat turn: needs no live lease.
    Turn,
    /// The provisioning worker: needs no live lease.
    Provision,
    /// The sleep sweep: needs no live lease and `last_active_at` unchanged
    /// since the sweep's query.
    Sweep {
        /// `last_active_at` as the sweep read it.
        expected_last_active_at: u64,
    },
}

impl LeasePurpose {
    /// The stored lease kind.
    pub fn kind(self) -> LeaseKind {
        match self {
            Self::Turn => LeaseKind::Turn,
            Self::Provision => LeaseKind::Provision,
            Self::Sweep { .. } => LeaseKind::Sweep,
        }
    }
}

/// Outcome of [`UserStore::acquire_lease`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AcquireOutcome {
    /// The lease is ours; the item after the write.
    Acquired(UserRecord),
    /// Someone holds a live lease (see `record.lease`).
    Busy(UserRecord),
    /// No live lease, but the item no longer qualifies (`last_active_at`
    /// changed for a sweep, or the item is being destroyed).
    Changed(UserRecord),
}

/// Outcome of [`UserStore::release_lease`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReleaseOutcome {
    /// The lease was ours and is gone; the item after the write.
    Released(UserRecord),
    /// Nothing to release: the lease is someone else's or absent (the item
    /// as it is, if it exists).
    NotHeld(Option<UserRecord>),
}

/// Which create key a restarted provisioning uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CreateKey {
    /// Keep the stored key: the previous create may have happened, and
    /// retrying with the same key returns the same machine. The default.
    Keep,
    /// Use a fresh key. Only for when the previous create is known not to have
    /// produced a machine (non-retryable refusal, or the machine was lost);
    /// refused if a `machine_id` is recorded.
    Replace(String),
}

/// Guard for [`UserStore::delete`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeleteGuard {
    /// Delete only if `generation` is still this.
    Generation(u64),
    /// Delete only if the item is in state `destroying`.
    Destroying,
}

/// Outcome of [`UserStore::delete`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeleteOutcome {
    /// Deleted; the item as it was.
    Deleted(Box<UserRecord>),
    /// There was no item.
    AlreadyGone,
}

/// A per-user fair-use counter ([`UserStore::count_request`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Counter {
    /// Chat turns started.
    Turns,
    /// Status reads that reach Dedalus.
    StatusReads,
}

impl Counter {
    /// The (window, count) attributes of the counter.
    pub fn attributes(self) -> (&'static str, &'static str) {
        use table::attr;
        match self {
            Self::Turns => (attr::TURNS_WINDOW, attr::TURNS_COUNT),
            Self::StatusReads => (attr::STATUS_WINDOW, attr::STATUS_COUNT),
        }
    }
}

/// Outcome of [`UserStore::count_request`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CountOutcome {
    /// Counted; under the limit.
    Counted,
    /// The window's limit is reached; the next window starts in `retry_after_ms`.
    Limited {
        /// Until the window ends.
        retry_after_ms: u64,
    },
    /// The user has no item (nothing to count on yet).
    NoItem,
}

/// The fair-use counter a turn is counted on ([`UserStore::begin_turn`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TurnCount {
    /// Turns per window; more are refused ([`BeginTurn::Limited`]).
    pub limit: u32,
    /// The fixed window (ms), e.g. a minute.
    pub window_ms: u64,
    /// The window the caller believes is stored (from an earlier turn):
    /// picks the form of the update that is likely to apply, so the turn
    /// costs one write; a wrong guess costs one more.
    pub stored_window: Option<u64>,
}

/// Outcome of [`UserStore::begin_turn`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BeginTurn {
    /// The turn lease is ours; the item after the write.
    Begun(UserRecord),
    /// Not begun: the item as it is (not ready, no machine, a live lease or
    /// being destroyed); the caller routes on it.
    Refused(UserRecord),
    /// The user's fair-use limit is reached until the window ends.
    Limited {
        /// Until the window ends.
        retry_after_ms: u64,
    },
    /// The user has no item.
    NoItem,
}

/// What a turn leaves for the next one ([`UserStore::end_turn`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TurnEnd {
    /// The terminal to reuse and the parked ones, when the turn used
    /// terminals (`None` leaves them as they are).
    pub terminals: Option<(Option<String>, Vec<String>)>,
    /// The whole hold set, when it changed (`None` leaves it as it is).
    pub holds: Option<Vec<Hold>>,
    /// The turn's `turn_seq`, when it ended with its shell idle (recorded
    /// as `clean_seq`).
    pub clean_seq: Option<u64>,
}

/// An opaque position in a paged query; pass it back to get the next page.
/// Serializable as a string (e.g. to carry it across invocations).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Cursor(String);

impl Cursor {
    /// The cursor as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// A cursor from [`Cursor::as_str`]'s output; validated when used.
    pub fn from_string(s: impl Into<String>) -> Self {
        Self(s.into())
    }
}

/// One page of a query.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Page<T> {
    /// The items of this page, in index order.
    pub items: Vec<T>,
    /// Where the next page starts; `None` when there are no more pages. A
    /// cursor may lead to an empty last page.
    pub cursor: Option<Cursor>,
}

/// The user→machine table's operations. Each is one conditional read or
/// write with a typed outcome (see the module docs for the shared rules).
///
/// Usable as a generic bound (`S: UserStore`); the returned futures are `Send`.
pub trait UserStore: Send + Sync {
    /// The user's item, strongly consistent.
    fn get(&self, user_id: &UserId) -> impl Future<Output = Result<Option<UserRecord>>> + Send;

    /// Items referencing `machine_id` (the `by-machine` index; eventually
    /// consistent). More than one means a bug worth reporting.
    fn find_by_machine(
        &self,
        machine_id: &str,
    ) -> impl Future<Output = Result<Vec<UserRecord>>> + Send;

    /// Create the user's item (`attribute_not_exists(user_id)`) in state
    /// `provisioning`, power `unknown`, with `create_key` (32 lowercase hex)
    /// and the provisioning `lease` (`provision_attempts` 0).
    fn claim(
        &self,
        user_id: &UserId,
        create_key: &str,
        lease: &Lease,
        now_ms: u64,
    ) -> impl Future<Output = Result<ClaimOutcome>> + Send;

    /// Record the created machine's id: only if `create_key` matches and no
    /// other machine id is recorded (the same id again is a successful no-op
    /// write). Refused: [`StoreError::Conflict`].
    fn record_machine_id(
        &self,
        user_id: &UserId,
        create_key: &str,
        machine_id: &str,
        now_ms: u64,
    ) -> impl Future<Output = Result<UserRecord>> + Send;

    /// `provisioning` → `bootstrapping`, by the lease holder, once a machine
    /// id is recorded.
    fn mark_bootstrapping(
        &self,
        user_id: &UserId,
        owner: &str,
        now_ms: u64,
    ) -> impl Future<Output = Result<UserRecord>> + Send;

    /// `provisioning`/`bootstrapping`/`ready` → `ready` with
    /// `bootstrap_version`, by the lease holder. The machine is running, so
    /// this also marks it awake (power, `awake_shard`, `awake_since` if
    /// unset, `last_active_at = now_ms`) and clears `last_error`.
    fn mark_ready(
        &self,
        user_id: &UserId,
        owner: &str,
        bootstrap_version: &str,
        now_ms: u64,
    ) -> impl Future<Output = Result<UserRecord>> + Send;

    /// `provisioning`/`bootstrapping` → `failed` with `error`, by the lease
    /// holder (who still releases the lease).
    fn mark_failed(
        &self,
        user_id: &UserId,
        owner: &str,
        error: &str,
        now_ms: u64,
    ) -> impl Future<Output = Result<UserRecord>> + Send;

    /// Restart a failed or stuck provisioning: only if `generation` is still
    /// `expected_generation`, the state is `failed`, `provisioning` or
    /// `bootstrapping`, and no lease is live. Sets state `provisioning`, the
    /// new `lease`, clears `last_error`, resets `provision_attempts` to 0;
    /// see [`CreateKey`] for the key.
    fn restart_provisioning(
        &self,
        user_id: &UserId,
        expected_generation: u64,
        lease: &Lease,
        create_key: CreateKey,
        now_ms: u64,
    ) -> impl Future<Output = Result<AcquireOutcome>> + Send;

    /// Take the lease for `owner` until `until_ms` if no lease is live at
    /// `now_ms` (plus the purpose's own condition; never on a `destroying`
    /// item). A provisioning lease also adds one to `provision_attempts`.
    fn acquire_lease(
        &self,
        user_id: &UserId,
        owner: &str,
        purpose: LeasePurpose,
        until_ms: u64,
        now_ms: u64,
    ) -> impl Future<Output = Result<AcquireOutcome>> + Send;

    /// Extend `owner`'s lease to `until_ms`. Refused ([`StoreError::Conflict`])
    /// if `owner` no longer holds it.
    fn renew_lease(
        &self,
        user_id: &UserId,
        owner: &str,
        until_ms: u64,
        now_ms: u64,
    ) -> impl Future<Output = Result<UserRecord>> + Send;

    /// Drop `owner`'s lease; a no-op outcome if `owner` does not hold it.
    fn release_lease(
        &self,
        user_id: &UserId,
        owner: &str,
        now_ms: u64,
    ) -> impl Future<Output = Result<ReleaseOutcome>> + Send;

    /// The lease holder woke the machine: power `awake`, `awake_shard` set,
    /// `awake_since` kept if already awake (else `now_ms`), `last_active_at = now_ms`.
    fn mark_awake(
        &self,
        user_id: &UserId,
        owner: &str,
        now_ms: u64,
    ) -> impl Future<Output = Result<UserRecord>> + Send;

    /// The lease holder used the machine: `last_active_at = now_ms`
    /// (`awake_shard` untouched).
    fn touch(
        &self,
        user_id: &UserId,
        owner: &str,
        now_ms: u64,
    ) -> impl Future<Output = Result<UserRecord>> + Send;

    /// The lease holder stores (or clears) the terminal to reuse.
    fn set_terminal(
        &self,
        user_id: &UserId,
        owner: &str,
        terminal_id: Option<&str>,
        now_ms: u64,
    ) -> impl Future<Output = Result<UserRecord>> + Send;

    /// The lease holder stores the terminal to reuse and the other terminals
    /// it keeps (busy with a command left running, or one idle spare).
    fn set_terminals(
        &self,
        user_id: &UserId,
        owner: &str,
        current: Option<&str>,
        parked: &[String],
        now_ms: u64,
    ) -> impl Future<Output = Result<UserRecord>> + Send;

    /// The lease holder keeps the machine awake for a command left running:
    /// `hold` joins the set of holds (replacing one with the same marker;
    /// expired ones are dropped). Every other hold stays: each command left
    /// running holds the machine until its own marker exists.
    fn set_hold(
        &self,
        user_id: &UserId,
        owner: &str,
        hold: &Hold,
        now_ms: u64,
    ) -> impl Future<Output = Result<UserRecord>> + Send;

    /// The lease holder drops the holds of `markers` (those commands
    /// finished); the others stay.
    fn release_holds(
        &self,
        user_id: &UserId,
        owner: &str,
        markers: &[String],
        now_ms: u64,
    ) -> impl Future<Output = Result<UserRecord>> + Send;

    /// The lease holder drops every hold (all markers found, or expired).
    fn clear_hold(
        &self,
        user_id: &UserId,
        owner: &str,
        now_ms: u64,
    ) -> impl Future<Output = Result<UserRecord>> + Send;

    /// The sweep-lease holder put the machine to sleep: power `asleep`,
    /// `awake_shard`/`awake_since`/`sleep_eligible_at` removed,
    /// `awake_ms_total += now_ms − awake_since`. Needs a `sweep` lease held by
    /// `owner`.
    fn mark_asleep(
        &self,
        user_id: &UserId,
        owner: &str,
        now_ms: u64,
    ) -> impl Future<Output = Result<UserRecord>> + Send;

    /// The lease holder records when a refused sleep may be retried.
    fn set_sleep_eligible_at(
        &self,
        user_id: &UserId,
        owner: &str,
        eligible_at_ms: u64,
        now_ms: u64,
    ) -> impl Future<Output = Result<UserRecord>> + Send;

    /// The lease holder found the machine gone (404): state `failed`, power
    /// `unknown`, `last_error` names the machine; `machine_id`, awake fields,
    /// terminal, hold and bootstrap version removed (awake time accrued), so
    /// the next provisioning may use [`CreateKey::Replace`].
    fn mark_lost(
        &self,
        user_id: &UserId,
        owner: &str,
        error: &str,
        now_ms: u64,
    ) -> impl Future<Output = Result<UserRecord>> + Send;

    /// Reconciliation's power correction, based on `current` as read (refused
    /// if `generation` moved). `awake` sets the shard and `awake_since`;
    /// `asleep` removes them and accrues `now_ms − awake_since` (an upper
    /// bound: the platform slept it some time before); `unknown` only sets power.
    fn set_power(
        &self,
        current: &UserRecord,
        power: Power,
        now_ms: u64,
    ) -> impl Future<Output = Result<UserRecord>> + Send;

    /// Account deletion starts: state `destroying`, `awake_shard` removed (the
    /// sweep stops seeing it), new leases refused, and every other write
    /// (except releasing a lease) refused from now on. Idempotent.
    fn mark_destroying(
        &self,
        user_id: &UserId,
        now_ms: u64,
    ) -> impl Future<Output = Result<UserRecord>> + Send;

    /// Delete the item under `guard`; a missing item is [`DeleteOutcome::AlreadyGone`].
    fn delete(
        &self,
        user_id: &UserId,
        guard: DeleteGuard,
    ) -> impl Future<Output = Result<DeleteOutcome>> + Send;

    /// Count one request on the user's `counter` in the fixed window of
    /// `window_ms` containing `now_ms`, unless `limit` requests were already
    /// counted in it. One conditional write (two when a new window starts);
    /// atomic per item, so concurrent instances share the limit. Counter
    /// writes touch only the counter's attributes: no `generation` bump, no
    /// `updated_at` (they change nothing another writer relies on).
    fn count_request(
        &self,
        user_id: &UserId,
        counter: Counter,
        limit: u32,
        window_ms: u64,
        now_ms: u64,
    ) -> impl Future<Output = Result<CountOutcome>> + Send;

    /// Record the awake budget's baseline of the UTC day `day_start`
    /// (`awake_day`, `awake_day_base`) unless one of that day (or a later
    /// one) is recorded: the first write of a day wins. Like the counters,
    /// no `generation` bump. A missing item is [`StoreError::NotFound`].
    fn note_awake_day(
        &self,
        user_id: &UserId,
        day_start: u64,
        base_ms: u64,
    ) -> impl Future<Output = Result<()>> + Send;

    /// One page of awake items of `shard` idle since before `idle_before_ms`
    /// (`awake_shard = shard AND last_active_at < idle_before_ms`, oldest
    /// first) from the `awake` index (eventually consistent). `limit` ≥ 1.
    fn query_awake_idle(
        &self,
        shard: &str,
        idle_before_ms: u64,
        cursor: Option<&Cursor>,
        limit: u32,
    ) -> impl Future<Output = Result<Page<UserRecord>>> + Send;

    /// A chat turn begins, in one conditional write: the item must be
    /// `ready` with a machine and without a live lease; then the turn lease
    /// is `owner`'s until `until_ms`, the machine counts as awake and active
    /// (`last_active_at = now_ms`), `turn_seq` grows by one and, with
    /// `count`, the fair-use counter counts the turn (refused at its limit:
    /// [`BeginTurn::Limited`]). A refusal returns the item as it is, for the
    /// caller to route on.
    fn begin_turn(
        &self,
        user_id: &UserId,
        owner: &str,
        until_ms: u64,
        count: Option<TurnCount>,
        now_ms: u64,
    ) -> impl Future<Output = Result<BeginTurn>> + Send;

    /// The lease holder ends its turn, in one conditional write: the lease
    /// released, `last_active_at = now_ms`, and what `end` carries.
    /// Refused ([`StoreError::Conflict`]) if `owner` no longer holds it.
    fn end_turn(
        &self,
        user_id: &UserId,
        owner: &str,
        end: &TurnEnd,
        now_ms: u64,
    ) -> impl Future<Output = Result<UserRecord>> + Send;

    /// Move an awake item from shard `from` to shard `to` of the `awake`
    /// index (a change of the shard count being migrated), only while it is
    /// still in `from`: `Ok(true)` if moved, `Ok(false)` if the item left
    /// `from` meanwhile (it slept, or a wake put it in the current layout).
    /// Like the counters, no `generation` bump: leases and reads pinned to a
    /// generation are not disturbed by where the index keeps the item.
    fn move_awake_shard(
        &self,
        user_id: &UserId,
        from: &str,
        to: &str,
    ) -> impl Future<Output = Result<bool>> + Send;

    /// Record a pending sleep and/or the user's gap histogram (see
    /// [`SleepPlan`]) — only if the item is as the caller left it:
    /// `last_active_at` unchanged and no live lease (a turn that started
    /// since holds one, and its acquisition removed any pending sleep). A
    /// pending sleep also needs the machine awake. Refused:
    /// [`StoreError::Conflict`].
    fn schedule_sleep(
        &self,
        user_id: &UserId,
        plan: &SleepPlan<'_>,
        now_ms: u64,
    ) -> impl Future<Output = Result<UserRecord>> + Send;

    /// Drop the pending sleep due at `expected_at` (an item that is no
    /// longer awake, or no longer needs it). Refused if another is pending.
    fn clear_pending_sleep(
        &self,
        user_id: &UserId,
        expected_at: u64,
        now_ms: u64,
    ) -> impl Future<Output = Result<UserRecord>> + Send;

    /// One page of items of `shard` with a sleep pending and due by
    /// `due_by_ms` (`sleep_shard = shard AND sleep_at <= due_by_ms`, earliest
    /// first) from the sparse `pending-sleep` index (eventually consistent).
    /// `limit` ≥ 1.
    fn query_pending_sleeps(
        &self,
        shard: &str,
        due_by_ms: u64,
        cursor: Option<&Cursor>,
        limit: u32,
    ) -> impl Future<Output = Result<Page<UserRecord>>> + Send;
}

/// What [`UserStore::schedule_sleep`] writes after a turn or a refused
/// sleep request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SleepPlan<'a> {
    /// `last_active_at` as the caller left or read it.
    pub expected_last_active_at: u64,
    /// A sleep due from this epoch ms, and why.
    pub sleep: Option<(u64, SleepReason)>,
    /// The user's updated gap histogram (adaptive idle).
    pub gap_hist: Option<&'a [u32]>,
}

/// A fresh create key: 32 lowercase hex (UUID v7, so keys sort by time).
pub fn new_create_key() -> String {
    uuid::Uuid::now_v7().simple().to_string()
}
