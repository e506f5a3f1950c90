//! The user's machine as the machine routes see it: a status read that never
//! wakes the machine (invariant 5), and destruction for account deletion
//! (machine first, then the mapping; resumable when half done).

use crate::api::UserId;
use crate::clock::now_ms;
use crate::dedalus::{self, Machine, Phase};
use crate::store::{
    DeleteGuard, DeleteOutcome, MachineState, Power, StoreError, UserRecord, UserStore,
};
use serde::Serialize;
use std::time::Duration;
use tokio::time::Instant;

/// What `GET /v1/users/{user_id}/machine` returns.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct MachineStatus {
    /// The user.
    pub user_id: UserId,
    /// The machine, once created.
    pub machine_id: Option<String>,
    /// Provisioning state of the item.
    pub state: MachineState,
    /// Power as the table records it.
    pub power: Power,
    /// The machine's live phase from Dedalus (`None` if not created or the
    /// read failed; see `phase_error`).
    pub phase: Option<String>,
    /// Why the live phase is missing, if a read failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub phase_error: Option<String>,
    /// Last activity (epoch ms).
    pub last_active_at: u64,
    /// Total awake time accrued (ms).
    pub awake_ms_total: u64,
    /// The bootstrap version that succeeded.
    pub bootstrap_version: Option<String>,
    /// The last recorded error.
    pub last_error: Option<String>,
    /// Whether a turn is running now.
    pub turn_running: bool,
    /// Creation time of the item (epoch ms).
    pub created_at: u64,
    /// Since when the machine is awake (epoch ms), while it is.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub awake_since: Option<u64>,
    /// Awake time per UTC day, the last 7 days, oldest first (from the
    /// lifecycle journal; absent without one).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub awake_days: Vec<crate::journal::AwakeDayTotal>,
}

impl MachineStatus {
    /// Combine the item and the live machine read.
    pub fn new(rec: &UserRecord, live: Result<Option<Machine>, String>, now_ms: u64) -> Self {
        let (phase, phase_error) = match live {
            Ok(Some(m)) => (Some(m.phase.as_str().to_string()), None),
            Ok(None) => (None, None),
            Err(e) => (None, Some(e)),
        };
        MachineStatus {
            user_id: rec.user_id.clone(),
            machine_id: rec.machine_id.clone(),
            state: rec.state,
            power: rec.power,
            phase,
            phase_error,
            last_active_at: rec.last_active_at,
            awake_ms_total: rec.awake_ms_total,
            bootstrap_version: rec.bootstrap_version.clone(),
            last_error: rec.last_error.clone(),
            turn_running: rec
                .live_lease(now_ms)
                .is_some_and(|l| l.kind == crate::store::LeaseKind::Turn),
            created_at: rec.created_at,
            awake_since: rec.awake_since,
            awake_days: Vec::new(),
        }
    }
}

/// Read the user's item and the machine's live phase. Only GETs are sent to
/// Dedalus: a status read never wakes a machine.
pub async fn status<S: UserStore>(
    store: &S,
    dedalus: &dedalus::Client,
    user_id: &UserId,
) -> Result<Option<MachineStatus>, StoreError> {
    let Some(rec) = store.get(user_id).await? else {
        return Ok(None);
    };
    let live = match &rec.machine_id {
        None => Ok(None),
        Some(id) => match dedalus.get_machine(id).await {
            Ok(m) => Ok(Some(m)),
            Err(e) if e.is_not_found() => {
                Err("the machine no longer exists on the platform".to_string())
            }
            Err(e) => Err(format!(
                "the live phase could not be read: {}",
                e.code().unwrap_or("unavailable")
            )),
        },
    };
    Ok(Some(MachineStatus::new(&rec, live, now_ms())))
}

/// The user's status from the table alone (no Dedalus call): for status
/// reads above the per-user limit. `phase` is absent and `phase_error`
/// says why; `power` is the table's view.
pub async fn table_status<S: UserStore>(
    store: &S,
    user_id: &UserId,
) -> Result<Option<MachineStatus>, StoreError> {
    let Some(rec) = store.get(user_id).await? else {
        return Ok(None);
    };
    let why = "the live phase was not read: too many status reads for this user in the last minute; `power` is the table's view";
    Ok(Some(MachineStatus::new(
        &rec,
        Err(why.to_string()),
        now_ms(),
    )))
}

/// Outcome of [`destroy`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Destroyed {
    /// The machine (if any) and the item are gone.
    Done,
    /// There was nothing to delete.
    AlreadyGone,
}

/// Errors of [`destroy`].
#[derive(Debug, thiserror::Error)]
pub enum DestroyError {
    /// The table failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Dedalus failed; the item stays `destroying` and a retry resumes.
    #[error("Dedalus API: {0}")]
    Dedalus(#[from] dedalus::Error),
}

impl DestroyError {
    /// Worth retrying.
    pub fn is_retryable(&self) -> bool {
        match self {
            DestroyError::Store(e) => e.is_retryable(),
            DestroyError::Dedalus(e) => e.is_retryable(),
        }
    }
}

/// Destroy the user's machine, then remove the mapping. The item is marked
/// `destroying` first (no new turn or provisioning can start), so a crash
/// anywhere is resumed by calling this again.
pub async fn destroy<S: UserStore>(
    store: &S,
    dedalus: &dedalus::Client,
    user_id: &UserId,
    wait: Duration,
) -> Result<Destroyed, DestroyError> {
    destroy_recorded(
        store,
        dedalus,
        user_id,
        wait,
        &crate::journal::Journal::off(),
    )
    .await
}

/// [`destroy`], recording `destroyed` in `journal` once the item is gone.
pub async fn destroy_recorded<S: UserStore>(
    store: &S,
    dedalus: &dedalus::Client,
    user_id: &UserId,
    wait: Duration,
    journal: &crate::journal::Journal,
) -> Result<Destroyed, DestroyError> {
    let rec = match store.mark_destroying(user_id, now_ms()).await {
        Ok(rec) => rec,
        Err(StoreError::NotFound { .. }) => return Ok(Destroyed::AlreadyGone),
        Err(e) => return Err(e.into()),
    };
    if let Some(machine_id) = &rec.machine_id {
        match dedalus.delete_machine(machine_id, None, None).await {
            Ok(_) => {}
            Err(e) if e.is_not_found() => {}
            Err(e) => return Err(e.into()),
        }
        let deadline = Instant::now() + wait;
        match dedalus
            .wait_until(machine_id, Phase::Destroyed, deadline)
            .await
        {
            Ok(_) => {}
            Err(e) if e.is_not_found() => {}
            Err(e) => return Err(e.into()),
        }
        tracing::info!(user_id = user_id.as_str(), machine_id, "machine destroyed");
    }
    match store.delete(user_id, DeleteGuard::Destroying).await? {
        DeleteOutcome::Deleted(gone) => {
            journal.record(user_id, destroyed_entry(&gone)).await;
            Ok(Destroyed::Done)
        }
        DeleteOutcome::AlreadyGone => Ok(Destroyed::AlreadyGone),
    }
}

/// The journal's `destroyed` entry for the item as it was deleted.
fn destroyed_entry(gone: &UserRecord) -> crate::journal::JournalEntry {
    use crate::journal::{Actor, Event, JournalEntry, Reason};
    let now = now_ms();
    let period = gone.awake_since.map(|s| now.saturating_sub(s));
    JournalEntry::new(now, Event::Destroyed, Actor::Route)
        .reason(Reason::Deleted)
        .machine(gone.machine_id.as_deref())
        .awake(period, gone.awake_ms_total + period.unwrap_or(0))
}
