//! The sweep's journal entries and its pre-sleep hook: each a single call
//! from the place the transition happens.

use std::time::Duration;

use tokio::time::Instant;

use super::{ms, Run, Sweeper};
use crate::hooks::{self, Hook};
use crate::journal::{Actor, Event, HookOutcome, HookReport, Journal, JournalEntry, Reason};
use crate::store::{UserRecord, UserStore};

impl<S: UserStore + 'static> Sweeper<S> {
    /// Record transitions in `journal` and run the in-machine `pre-sleep`
    /// hook before every sleep, bounded by `hook_timeout` (zero: no hook).
    pub fn with_journal(mut self, journal: Journal, hook_timeout: Duration) -> Self {
        self.journal = journal;
        self.hook_timeout = hook_timeout;
        self
    }

    /// Run the `pre-sleep` hook under the sweep lease (waiting for it no
    /// later than the sleep call needs), then extend the lease by the time
    /// it took. `None`: the lease was lost meanwhile (do
    /// not sleep). Skipped (no hook, lease unchanged) when hooks are off or
    /// explicit sleep is unavailable in this run (agenthome initiates no
    /// sleep then).
    pub(super) async fn pre_sleep(
        &self,
        run: &Run,
        rec: &UserRecord,
        owner: &str,
        lease_until: u64,
    ) -> Option<(u64, Option<HookReport>)> {
        let Some(machine_id) = rec.machine_id.as_deref() else {
            return Some((lease_until, None));
        };
        if self.hook_timeout.is_zero() || run.sleep_unavailable() {
            return Some((lease_until, None));
        }
        // Stop waiting in time for the sleep call (the route's time is
        // short): a hook still running then is cut off by the sleep itself.
        let reserve = self.settings.sleep_call_timeout + Duration::from_secs(1);
        let deadline = run
            .deadline
            .checked_sub(reserve)
            .unwrap_or(run.deadline)
            .min(Instant::now() + self.hook_timeout * 2);
        if deadline <= Instant::now() {
            return Some((lease_until, None));
        }
        let ran = hooks::run(
            &run.reads,
            machine_id,
            Hook::PreSleep,
            self.hook_timeout,
            &[],
            deadline,
        )
        .await;
        if ran.report.outcome != HookOutcome::Absent {
            tracing::info!(run_id = %run.id, user_id = %rec.user_id, machine_id, outcome = ?ran.report.outcome, exit_code = ran.report.exit_code, "pre-sleep hook ran");
        }
        if ran.report.duration_ms == 0 || ran.report.outcome == HookOutcome::Absent {
            return Some((lease_until, Some(ran.report)));
        }
        let now = run.now();
        let until = now.saturating_add(ms(self.settings.lease_ttl));
        match self
            .store
            .renew_lease(&rec.user_id, owner, until, now)
            .await
        {
            Ok(_) => Some((until, Some(ran.report))),
            Err(error) => {
                tracing::warn!(run_id = %run.id, user_id = %rec.user_id, error = %error, "sweep lease lost during the pre-sleep hook; not sleeping");
                None
            }
        }
    }

    /// `slept`: `before` (if known) and `after` the write give the awake
    /// period; an idle sleep records how long the machine was idle.
    pub(super) async fn journal_slept(
        &self,
        run: &Run,
        before: Option<&UserRecord>,
        after: &UserRecord,
        reason: Reason,
        hook: Option<HookReport>,
    ) {
        let now = run.now();
        let actor = if reason == Reason::PlatformAutosleep {
            Actor::Sweep
        } else {
            run.cause.1
        };
        let mut entry = JournalEntry::new(now, Event::Slept, actor)
            .reason(reason)
            .machine(
                after
                    .machine_id
                    .as_deref()
                    .or(before.and_then(|b| b.machine_id.as_deref())),
            )
            .awake(
                before.map(|b| after.awake_ms_total.saturating_sub(b.awake_ms_total)),
                after.awake_ms_total,
            );
        if reason == Reason::Idle {
            entry.idle_ms = before.map(|b| now.saturating_sub(b.last_active_at));
        }
        entry.hook = hook.filter(|h| h.outcome != HookOutcome::Absent);
        self.journal.record(&after.user_id, entry).await;
    }

    /// `sleep_refused`: the platform's hold window, until `eligible_at`.
    pub(super) async fn journal_refused(&self, run: &Run, rec: &UserRecord, eligible_at: u64) {
        let mut entry = JournalEntry::new(run.now(), Event::SleepRefused, run.cause.1)
            .reason(run.cause.0)
            .machine(rec.machine_id.as_deref());
        entry.until_ms = Some(eligible_at);
        self.journal.record(&rec.user_id, entry).await;
    }

    /// `lost`: the machine is gone (404).
    pub(super) async fn journal_lost(&self, run: &Run, machine_id: &str, after: &UserRecord) {
        let entry = JournalEntry::new(run.now(), Event::Lost, Actor::Sweep)
            .reason(Reason::NotFound)
            .machine(Some(machine_id))
            .awake(None, after.awake_ms_total);
        self.journal.record(&after.user_id, entry).await;
    }
}
