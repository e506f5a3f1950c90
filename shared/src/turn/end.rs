//! After the reply (docs/design.md §5 "Chat turn", "Sleeping early"): once
//! the turn's bookkeeping is done and its lease released,
//!
//! - with `IDLE_POLICY=adaptive`, the gap that preceded this turn joins the
//!   user's gap histogram, and if the history says the user is likely gone
//!   sooner than `IDLE_AFTER`, an adaptive sleep is scheduled for then
//!   (`sweep::adaptive`; one conditional write per turn, refused if another
//!   turn already started);
//! - with `end_conversation`, the machine is put to sleep at once through
//!   the same path as `POST …/machine/sleep` (never under a turn, never
//!   while a held command runs, the hold window honoured and, when it
//!   refuses, the sleep recorded as pending for the sweep). The result's
//!   `sleep` says what happened.

use crate::api::UserId;
use serde::Serialize;
use std::time::Duration;
use tokio::time::Instant;

use super::{millis, TurnError, TurnResult, TurnService};
use crate::agent::AgentStatus;
use crate::clock::now_ms;
use crate::provision::WorkerTrigger;
use crate::store::{SleepPlan, SleepReason, StoreError, UserRecord, UserStore};
use crate::sweep::adaptive::{idle_deadline, observe};
use crate::sweep::{IdlePolicy, SleepNow, SweepSettings};

/// The longest an `end_conversation` sleep call may take after the turn.
const SLEEP_AFTER_TURN: Duration = Duration::from_secs(10);

/// What the after-reply step needs from the start of the turn.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ending {
    /// The user.
    pub user_id: UserId,
    /// `last_active_at` before this turn: when the previous turn ended.
    pub previous_active_at: u64,
    /// When this turn took its lease (epoch ms).
    pub started_at: u64,
    /// The user's gap histogram as read at the start.
    pub gap_hist: Vec<u32>,
    /// The request asked for sleep after the reply.
    pub end_conversation: bool,
}

impl Ending {
    /// From the item as the turn's lease acquisition returned it.
    pub fn new(rec: &UserRecord, started_at: u64, end_conversation: bool) -> Self {
        Self {
            user_id: rec.user_id.clone(),
            previous_active_at: rec.last_active_at,
            started_at,
            gap_hist: rec.gap_hist.clone(),
            end_conversation,
        }
    }

    /// From the item as `begin_turn` returned it: its `last_active_at` is
    /// this turn's start, the activity before it is kept aside.
    pub fn begun(rec: &UserRecord, started_at: u64, end_conversation: bool) -> Self {
        Self {
            previous_active_at: rec.turns.previous_active_at,
            ..Self::new(rec, started_at, end_conversation)
        }
    }
}

/// What `end_conversation` did (the turn result's `sleep`).
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct SleepAfterTurn {
    /// `asleep`, `scheduled` (the hold window refuses it for now; the sweep
    /// carries it out from `sleep_eligible_at_ms`), `held` (a command the
    /// agent left running keeps the machine awake: the hold wins; it sleeps
    /// once the command ends), `awaiting_autosleep` (explicit sleep is
    /// refused for this key), `busy` (another turn started) or `no_machine`
    /// (the machine was lost meanwhile).
    pub status: &'static str,
    /// With `scheduled`: from when the platform accepts the sleep.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sleep_eligible_at_ms: Option<u64>,
    /// In words.
    pub detail: &'static str,
}

impl SleepAfterTurn {
    fn of(outcome: SleepNow, now: u64) -> Self {
        let (status, at, detail) = match outcome {
            SleepNow::Asleep => ("asleep", None, "the machine is asleep"),
            SleepNow::NoMachine => (
                "no_machine",
                None,
                "the user's machine was lost after the reply; the next turn provisions a new one",
            ),
            SleepNow::NotYetEligible { eligible_at_ms } => (
                "scheduled",
                Some(eligible_at_ms),
                "the platform refuses sleep shortly after a wake; the sweep puts the machine to sleep once it may",
            ),
            SleepNow::Failed => (
                "scheduled",
                Some(now),
                "the sleep call did not succeed now; the sweep puts the machine to sleep on its next run",
            ),
            SleepNow::HeldByRunningCommand => (
                "held",
                None,
                "a command the agent left running keeps the machine awake; it is put to sleep when the command ends",
            ),
            SleepNow::AwaitingAutosleep => (
                "awaiting_autosleep",
                None,
                "explicit sleep is unavailable for this API key; the platform's autosleep puts the machine to sleep",
            ),
            SleepNow::Busy => (
                "busy",
                None,
                "another turn started; the machine stays awake for it",
            ),
        };
        Self {
            status,
            sleep_eligible_at_ms: at,
            detail,
        }
    }
}

/// Adaptive idle's part of the after-reply step (the simulation runs it
/// too): count the gap before this turn and schedule the user's earlier
/// idle deadline, if any. `touched_at` is the turn's final `last_active_at`.
/// Nothing is written with `IDLE_POLICY=fixed`.
pub async fn record_turn_end<S: UserStore>(
    store: &S,
    settings: &SweepSettings,
    ending: &Ending,
    touched_at: u64,
    now: u64,
) -> Result<(), StoreError> {
    if settings.idle_policy != IdlePolicy::Adaptive {
        return Ok(());
    }
    let gap = Duration::from_millis(ending.started_at.saturating_sub(ending.previous_active_at));
    let hist = observe(&ending.gap_hist, gap);
    let sleep = match (
        ending.end_conversation,
        idle_deadline(&hist, settings.idle_after),
    ) {
        (false, Some(deadline)) => Some((
            touched_at.saturating_add(millis(deadline)),
            SleepReason::Adaptive,
        )),
        _ => None,
    };
    let plan = SleepPlan {
        expected_last_active_at: touched_at,
        sleep,
        gap_hist: Some(&hist),
    };
    store
        .schedule_sleep(&ending.user_id, &plan, now)
        .await
        .map(|_| ())
}

impl<S, T> TurnService<S, T>
where
    S: UserStore + Clone + 'static,
    T: WorkerTrigger,
{
    /// The after-reply step of a finished turn (see the module docs).
    pub(super) async fn after_turn(
        &self,
        ending: Ending,
        result: Result<TurnResult, TurnError>,
        touched_at: u64,
    ) -> Result<TurnResult, TurnError> {
        let mut result = result?;
        if result.status == AgentStatus::LeaseLost {
            return Ok(result);
        }
        let store = self.provisioner.store();
        match record_turn_end(
            store,
            self.sleeper.settings(),
            &ending,
            touched_at,
            now_ms(),
        )
        .await
        {
            Ok(()) | Err(StoreError::Conflict { .. }) => {}
            Err(e) => {
                tracing::warn!(user_id = %ending.user_id, error = %e, "adaptive idle not recorded")
            }
        }
        if ending.end_conversation {
            let now = now_ms();
            let deadline = Instant::now() + SLEEP_AFTER_TURN;
            let outcome = self.sleeper.sleep_now(&ending.user_id, now, deadline).await;
            tracing::info!(user_id = %ending.user_id, ?outcome, "end of conversation");
            result.sleep = Some(SleepAfterTurn::of(outcome, now));
        }
        Ok(result)
    }
}
