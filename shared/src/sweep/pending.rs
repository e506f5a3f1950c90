//! Pending sleeps (docs/design.md §5 "Sleep sweep"): a sleep the chat
//! product asked for inside the platform's hold window (`POST
//! …/machine/sleep`, or a turn with `end_conversation`), or an adaptive idle
//! deadline (`IDLE_POLICY=adaptive`), is recorded on the item with the time
//! it is due (`sleep_at`) and a shard (`sleep_shard`) that only pending
//! items carry — the sparse `pending-sleep` index. Each run first walks that
//! index for sleeps due by now (index queries only: its cost grows with
//! pending sleeps, not users or awake machines) and carries them out
//! through the same per-candidate path as idle machines, regardless of
//! `IDLE_AFTER`: never under a live lease, never while a held command
//! runs, the hold window honoured, and only if no turn touched the item
//! since the index read (the sweep lease's `last_active_at` condition).
//!
//! A turn cancels a pending sleep: its lease acquisition removes the three
//! attributes in the same write (so the item leaves the index), and the
//! sweep re-checks, under its own lease, that the pending sleep it found is
//! still the one on the item.

use super::{tally, Outcome, Run, Sweeper};
use crate::store::table::all_shards;
use crate::store::{Cursor, Power, SleepPlan, SleepReason, StoreError, UserRecord, UserStore};

impl<S: UserStore + 'static> Sweeper<S> {
    /// The pending-sleep phase of a run: every sleep due by the run's start.
    pub(super) async fn pending_phase(&self, run: &Run, report: &mut super::SweepReport) {
        let concurrency = self.settings.concurrency.max(1);
        'shards: for shard in all_shards() {
            let mut cursor: Option<Cursor> = None;
            loop {
                if run.past_deadline() {
                    report.remaining = true;
                    break 'shards;
                }
                let page = match self
                    .store
                    .query_pending_sleeps(
                        &shard,
                        run.now_ms,
                        cursor.as_ref(),
                        self.settings.page_size,
                    )
                    .await
                {
                    Ok(page) => page,
                    Err(error) => {
                        tracing::error!(run_id = %run.id, shard, error = %error, "pending-sleep index query failed; shard left for the next run");
                        report.remaining = true;
                        report.index_errors += 1;
                        continue 'shards;
                    }
                };
                report.pending_candidates += page.items.len() as u64;
                for o in super::each_concurrently(page.items, concurrency, |c| {
                    self.pending_candidate(run, c)
                })
                .await
                {
                    tally(report, o);
                }
                match page.cursor {
                    Some(next) => cursor = Some(next),
                    None => break,
                }
            }
        }
    }

    /// One due pending sleep: an item no longer awake only drops it; an
    /// awake one goes through the sweep's candidate path.
    async fn pending_candidate(&self, run: &Run, c: UserRecord) -> Outcome {
        let Some(pending) = c.pending_sleep.clone() else {
            return Outcome::SkippedBusy;
        };
        if c.power == Power::Awake && c.awake_shard.is_some() && c.machine_id.is_some() {
            let outcome = self.candidate(run, c).await;
            if outcome == Outcome::Slept {
                tracing::info!(run_id = %run.id, reason = pending.reason.as_str(), due_at = pending.at, "pending sleep carried out");
            }
            return outcome;
        }
        let user_id = &c.user_id;
        match self
            .store
            .clear_pending_sleep(user_id, pending.at, run.now())
            .await
        {
            Ok(_) | Err(StoreError::Conflict { .. } | StoreError::NotFound { .. }) => {}
            Err(error) => {
                tracing::warn!(run_id = %run.id, user_id = user_id.as_str(), error = %error, "stale pending sleep not cleared");
            }
        }
        Outcome::SkippedBusy
    }

    /// Record a requested sleep the platform (or a held command) refused
    /// for now, due from `at_ms`: unless the item moved since `seen` was
    /// read (a turn started), the first run from then on carries it out.
    pub(super) async fn record_request(&self, seen: &UserRecord, at_ms: u64, now_ms: u64) {
        let plan = SleepPlan {
            expected_last_active_at: seen.last_active_at,
            sleep: Some((at_ms, SleepReason::Requested)),
            gap_hist: None,
        };
        let user_id = &seen.user_id;
        match self.store.schedule_sleep(user_id, &plan, now_ms).await {
            Ok(_) => {
                tracing::info!(
                    user_id = user_id.as_str(),
                    sleep_at = at_ms,
                    "requested sleep pending"
                );
            }
            Err(StoreError::Conflict { .. }) => {
                tracing::info!(
                    user_id = user_id.as_str(),
                    "requested sleep not recorded: the item changed (a turn started)"
                );
            }
            Err(error) => {
                tracing::warn!(user_id = user_id.as_str(), error = %error, "requested sleep not recorded");
            }
        }
    }
}
