//! The sleep sweep and reconciliation (docs/design.md §5 "Sleep sweep", §6
//! invariants 2, 5, 6).
//!
//! [`Sweeper::run`] pages through the sparse `awake` index, shard by shard
//! (index queries only), for items idle since before `now − IDLE_AFTER`, and
//! handles the candidates of each page with bounded concurrency:
//!
//! 1. `sleep_eligible_at` in the future → skipped (hold window).
//! 2. A live lease → skipped (saves a refused write; the lease condition
//!    below is what guarantees it).
//! 3. A hold (a command the agent left running) that has not expired: the
//!    machine's phase is read first (a status read never wakes), and only if
//!    it is `running` is the completion marker checked with one tiny
//!    execution (which cannot wake a running machine). Marker absent → kept
//!    awake. Marker present or hold expired → the hold is cleared under the
//!    sweep lease.
//! 4. The sweep lease: `LeasePurpose::Sweep { expected_last_active_at }`, so
//!    it is taken only if no lease is live *and* no turn touched the item
//!    since the query. A turn cannot start while it is held; it lasts
//!    `SWEEP_LEASE` (30 s), longer than the one sleep call it covers
//!    (`SWEEP_SLEEP_TIMEOUT`, 10 s, one attempt). This is invariant 2.
//! 5. `POST …/sleep` with a deterministic Idempotency-Key ([`key::sleep_key`]):
//!    success → `mark_asleep`; `SLEEP_HOLD_WINDOW_ACTIVE` →
//!    `sleep_eligible_at`; 404 → `mark_lost`; 429/503/timeouts/transport →
//!    left for the next run; 401/403 → explicit sleep is unavailable for the
//!    rest of the run (see below).
//! 6. The lease is always released (a failed release expires on its own).
//!
//! **Sleep unavailable.** Public keys may be refused on `…/sleep` (docs/compatibility.md
//! field reports). Until one sleep call has been answered by the route,
//! sleep calls of a run go out one at a time (a probe); the first 401/403
//! switches the run to reading phases instead: `get_machine` → sleeping or
//! stopping → `mark_asleep` (counted `fixed`), running → left to the
//! machine's platform autosleep (`awaiting_autosleep`). So a run makes at
//! most one refused sleep call.
//!
//! **Reconciliation** ([`Sweeper::reconcile`], every `RECONCILE_EVERY`th
//! scheduled run or when forced) walks `GET /v1/machines` (reads only):
//! machines no item references are orphans: once older than
//! `RECONCILE_ORPHAN_GRACE` they are destroyed (`RECONCILE_DESTROY_ORPHANS`,
//! the default; a deleted user's machine whose worker died between create
//! and record ends here), or else reported (and slept if
//! `RECONCILE_SLEEP_ORPHANS`); an item that says awake for a sleeping
//! machine is fixed with [`UserStore::set_power`]`(Asleep)`, an item that
//! says asleep for a running machine with `set_power(Awake)` (so the next
//! sweep sleeps it). `set_power` is the right operation here (not
//! `mark_asleep`, which needs a sweep lease): it is conditional on the
//! `generation` read, and the order is item read (consistent) → fresh status
//! read → write, so any turn that took a lease after the item read makes
//! the write fail instead of mis-marking a machine the turn woke. Items
//! with a live lease are left alone. Finally, awake items whose machine is
//! not in the list are checked with a status read; a 404 marks them lost
//! (under a sweep lease).
//!
//! Time: `now_ms` is the run's start (a virtual clock in tests); store
//! writes use `now_ms` plus the monotonic time elapsed since.

pub mod adaptive;
mod coordinator;
mod journal;
mod key;
mod pace;
mod pending;
mod report;
mod settings;
mod shards;

use crate::api::UserId;
use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::stream::{self, StreamExt};
use serde_json::Value;
use tokio::time::Instant;

use crate::dedalus::{self, ExecutionRequest, IdempotencyKey, Machine, Phase, RetryPolicy};
use crate::store::{
    AcquireOutcome, Hold, LeasePurpose, Page, Power, ReleaseOutcome, StoreError, UserRecord,
    UserStore,
};

pub use adaptive::IdlePolicy;
pub use coordinator::{
    InvokeError, LambdaWorkers, LocalWorkers, WorkerFuture, WorkerInvoker, WorkerTask,
    WORKER_EVENT_KEY,
};
pub use key::{orphan_sleep_key, sleep_key};
pub use pace::{Deferred, Pacer};
pub use report::{SweepReport, SWEEP_LINE};
pub use settings::SweepSettings;
use shards::ShardWalk;
pub use shards::{migrate, MigrationReport};

/// The journal's reason for a sleep the platform did by itself.
const PLATFORM: crate::journal::Reason = crate::journal::Reason::PlatformAutosleep;

/// Machines per `GET /v1/machines` page during reconciliation.
const LIST_PAGE: u32 = 100;

/// What a hold-window refusal without any hint defers the next try by.
const DEFAULT_HOLD_RETRY: Duration = Duration::from_secs(60);

/// How long a 429 without `Retry-After` pauses a worker's sleep calls.
const DEFAULT_RATE_LIMIT_WAIT: Duration = Duration::from_secs(1);

/// The completion-marker check: exit 0 if the marker exists, 1 if not. The
/// marker is passed as `$1` (never interpolated into the script); relative
/// paths are under the machine's home.
/// Exits 0 when every marker given as an argument exists, 1 when one is
/// missing.
const MARKER_SCRIPT: &str = r#"for m in "$@"; do case "$m" in /*) p="$m" ;; *) p="${HOME:-/root}/$m" ;; esac; test -f "$p" || exit 1; done; exit 0"#;

/// The sleep sweep and reconciliation over a [`UserStore`] and a Dedalus
/// [`dedalus::Client`].
pub struct Sweeper<S> {
    store: Arc<S>,
    reads: dedalus::Client,
    sleeps: dedalus::Client,
    settings: SweepSettings,
    journal: crate::journal::Journal,
    hook_timeout: Duration,
    workers: Option<Arc<dyn WorkerInvoker>>,
}

impl<S> std::fmt::Debug for Sweeper<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sweeper")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

/// Whether explicit sleep works in this run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SleepMode {
    /// No sleep call has been answered by the route yet: calls go one at a time.
    Unprobed,
    /// The route answered (success or a non-auth error): calls go concurrently.
    Available,
    /// Refused with 401/403: no more sleep calls in this run.
    Unavailable,
}

/// One run's context.
struct Run {
    id: String,
    now_ms: u64,
    started: Instant,
    deadline: Instant,
    reads: dedalus::Client,
    sleeps: dedalus::Client,
    mode: tokio::sync::Mutex<SleepMode>,
    unavailable: AtomicBool,
    /// Why this run puts machines to sleep, and who asked (the journal's
    /// reason and actor).
    cause: (crate::journal::Reason, crate::journal::Actor),
    /// This run's share of the key's sleep rate, and any `Retry-After`.
    pacer: Pacer,
}

impl Run {
    /// The run's clock: `now_ms` at the start plus the time elapsed since.
    fn now(&self) -> u64 {
        let elapsed = u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.now_ms.saturating_add(elapsed)
    }

    fn past_deadline(&self) -> bool {
        Instant::now() >= self.deadline
    }

    fn sleep_unavailable(&self) -> bool {
        self.unavailable.load(Ordering::SeqCst)
    }
}

/// Run `work` on every item, at most `concurrency` at once; the results
/// in the order they finish.
pub(super) async fn each_concurrently<I, R, Fut>(
    items: impl IntoIterator<Item = I>,
    concurrency: usize,
    work: impl FnMut(I) -> Fut,
) -> Vec<R>
where
    Fut: std::future::Future<Output = R>,
{
    stream::iter(items)
        .map(work)
        .buffer_unordered(concurrency)
        .collect()
        .await
}

/// What happened to one candidate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Slept,
    SkippedBusy,
    SkippedHold,
    Held,
    Failed,
    Lost,
    Fixed,
    AwaitingAutosleep,
    NotReached,
    /// Pacing would start the sleep too late: left for the next run.
    Deferred,
    /// The sleep call was answered 429 (left for the next run; the pacer
    /// honours its `Retry-After`).
    RateLimited,
}

/// What [`Sweeper::sleep_now`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SleepNow {
    /// The machine is asleep (now, or already).
    Asleep,
    /// A turn holds the machine; nothing was done.
    Busy,
    /// A command the agent left running keeps it awake (the sweep sleeps it
    /// once the command ends).
    HeldByRunningCommand,
    /// The platform's post-wake hold window: the sweep sleeps it from then.
    NotYetEligible {
        /// Epoch ms from which sleep is accepted.
        eligible_at_ms: u64,
    },
    /// Explicit sleep is refused for this key: the platform's autosleep
    /// will sleep it.
    AwaitingAutosleep,
    /// The user has no machine (none yet, or it was lost).
    NoMachine,
    /// A dependency failed; nothing changed.
    Failed,
}

/// What reconciliation did with one machine or item.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reconciled {
    Consistent,
    Orphan,
    OrphanSlept,
    OrphanDestroyed,
    Fixed,
    Lost,
    Busy,
    Failed,
    NotReached,
}

/// The answer of one sleep call (or why none was made).
enum SleepCall {
    Answered(Box<dedalus::Result<Machine>>),
    Unavailable,
}

/// Result of a completion-marker check.
#[derive(Debug)]
enum Marker {
    /// The command finished.
    Present,
    /// Still running.
    Absent,
    /// The machine is not running (checked without waking it).
    NotRunning(Phase),
    /// The machine is gone (404).
    Gone,
    /// Could not tell (error, timeout): keep the machine awake.
    Unknown,
}

fn is_refusal(err: &dedalus::Error) -> bool {
    matches!(err.status().map(|s| s.as_u16()), Some(401 | 403))
}

fn epoch_ms(t: std::time::SystemTime) -> Option<u64> {
    t.duration_since(std::time::UNIX_EPOCH)
        .ok()
        .and_then(|d| u64::try_from(d.as_millis()).ok())
}

/// `details.next_sleep_eligible_at` as epoch ms (RFC 3339 string or number).
fn next_eligible_ms(err: &dedalus::Error) -> Option<u64> {
    match err.details()?.get("next_sleep_eligible_at")? {
        Value::String(s) => humantime::parse_rfc3339_weak(s).ok().and_then(epoch_ms),
        Value::Number(n) => n.as_u64(),
        _ => None,
    }
}

impl<S: UserStore + 'static> Sweeper<S> {
    /// A sweeper. `client` is the shared Dedalus client (built once per cold
    /// start); the sweeper derives from it a read client (a couple of quick
    /// retries within `SWEEP_READ_TIMEOUT`) and a sleep client (one attempt
    /// within `SWEEP_SLEEP_TIMEOUT`: a failed sleep waits for the next run,
    /// never a retry storm).
    pub fn new(store: Arc<S>, client: &dedalus::Client, settings: SweepSettings) -> Self {
        let base = client.config().retry.clone();
        let reads = client.with_retry(RetryPolicy {
            max_attempts: base.max_attempts.clamp(1, 3),
            call_deadline: settings.read_call_timeout,
            max_server_delay: base.max_server_delay.min(Duration::from_secs(2)),
            ..base.clone()
        });
        let sleeps = client.with_retry(RetryPolicy {
            max_attempts: 1,
            call_deadline: settings.sleep_call_timeout,
            max_server_delay: Duration::ZERO,
            ..base
        });
        Self {
            store,
            reads,
            sleeps,
            settings,
            journal: crate::journal::Journal::off(),
            hook_timeout: Duration::ZERO,
            workers: None,
        }
    }

    /// The same sweeper, able to fan a scheduled run out to parallel
    /// workers through `workers` (see [`Sweeper::run_scheduled`]).
    pub fn with_workers(mut self, workers: Arc<dyn WorkerInvoker>) -> Self {
        self.workers = Some(workers);
        self
    }

    /// The settings in force.
    pub fn settings(&self) -> &SweepSettings {
        &self.settings
    }

    fn start(&self, now_ms: u64, deadline: Instant) -> Run {
        self.start_paced(now_ms, deadline, Some(f64::from(self.settings.sleep_rate)))
    }

    /// A run whose sleep calls go out at most `sleep_rate` a second.
    fn start_paced(&self, now_ms: u64, deadline: Instant, sleep_rate: Option<f64>) -> Run {
        Run {
            id: uuid::Uuid::now_v7().simple().to_string(),
            now_ms,
            started: Instant::now(),
            deadline,
            reads: self.reads.with_deadline(deadline),
            sleeps: self.sleeps.with_deadline(deadline),
            mode: tokio::sync::Mutex::new(SleepMode::Unprobed),
            unavailable: AtomicBool::new(false),
            cause: (crate::journal::Reason::Idle, crate::journal::Actor::Sweep),
            pacer: Pacer::new(sleep_rate),
        }
    }

    /// Sleep one user's machine now (`POST …/machine/sleep`: the
    /// conversation ended), through the same per-candidate path as the sweep
    /// — so the same conditions hold: never under a live turn lease, never
    /// while a command the agent left running is still running, the hold
    /// window honoured.
    pub async fn sleep_now(&self, user_id: &UserId, now_ms: u64, deadline: Instant) -> SleepNow {
        self.sleep_now_because(user_id, now_ms, deadline, crate::journal::Reason::Explicit)
            .await
    }

    /// [`Sweeper::sleep_now`] for `reason` (the journal's: `explicit`,
    /// `end_conversation`, `adaptive`, `budget`).
    pub async fn sleep_now_because(
        &self,
        user_id: &UserId,
        now_ms: u64,
        deadline: Instant,
        reason: crate::journal::Reason,
    ) -> SleepNow {
        let rec = match self.store.get(user_id).await {
            Ok(Some(rec)) => rec,
            Ok(None) => return SleepNow::NoMachine,
            Err(error) => {
                tracing::warn!(user_id = user_id.as_str(), error = %error, "sleep now: item not read");
                return SleepNow::Failed;
            }
        };
        if rec.machine_id.is_none() {
            return SleepNow::NoMachine;
        }
        if rec.power == Power::Asleep {
            return SleepNow::Asleep;
        }
        let mut run = self.start(now_ms, deadline);
        run.cause = (reason, crate::journal::Actor::Route);
        let eligible_at = rec.sleep_eligible_at;
        let seen = rec.clone();
        // Boxed: the candidate's future is the sweep's deepest; inline, a
        // turn's end and the awake budget would carry it.
        match Box::pin(self.candidate(&run, rec)).await {
            Outcome::Slept | Outcome::Fixed => SleepNow::Asleep,
            Outcome::AwaitingAutosleep => SleepNow::AwaitingAutosleep,
            Outcome::SkippedBusy => SleepNow::Busy,
            Outcome::Held => {
                self.record_request(&seen, run.now(), run.now()).await;
                SleepNow::HeldByRunningCommand
            }
            Outcome::SkippedHold => {
                let at = match self.store.get(user_id).await {
                    Ok(Some(r)) => r.sleep_eligible_at,
                    _ => eligible_at,
                };
                let eligible_at_ms = at.unwrap_or(now_ms);
                self.record_request(&seen, eligible_at_ms, run.now()).await;
                SleepNow::NotYetEligible { eligible_at_ms }
            }
            Outcome::Lost => SleepNow::NoMachine,
            Outcome::Failed | Outcome::NotReached | Outcome::Deferred | Outcome::RateLimited => {
                self.record_request(&seen, run.now(), run.now()).await;
                SleepNow::Failed
            }
        }
    }

    /// One sweep: put idle awake machines to sleep (see the module docs).
    /// Stops when `deadline` comes (`remaining: true`).
    pub async fn run(&self, now_ms: u64, deadline: Instant) -> SweepReport {
        let run = self.start(now_ms, deadline);
        let mut report = SweepReport::default();
        self.pending_phase(&run, &mut report).await;
        let shards = self.settings.shards.read_shards();
        self.sweep(&run, &mut report, shards, None).await;
        self.finish(&run, report)
    }

    /// One worker's part of a fanned-out run: the sweep of `task.shards`
    /// only, at `task.sleep_rate`, stopping at `deadline` (the earlier of
    /// the task's and the worker's own). Leases, holds, the hold window and
    /// the one-probe rule apply exactly as in a whole run.
    pub async fn run_worker(&self, task: &WorkerTask, deadline: Instant) -> SweepReport {
        let run = self.start_paced(task.now_ms, deadline, Some(task.sleep_rate));
        let mut report = SweepReport::default();
        self.sweep(&run, &mut report, task.shards.clone(), None)
            .await;
        let report = self.finish(&run, report);
        tracing::info!(
            run_id = task.run_id,
            worker_run_id = %run.id,
            worker = task.worker,
            workers = task.workers,
            shards = ?task.shards,
            candidates = report.candidates,
            slept = report.slept,
            deferred = report.deferred,
            rate_limited = report.rate_limited,
            index_errors = report.index_errors,
            duration_ms = report.duration_ms,
            "sweep worker finished"
        );
        report
    }

    /// One reconciliation with the machine list (see the module docs).
    pub async fn reconcile(&self, now_ms: u64, deadline: Instant) -> SweepReport {
        let run = self.start(now_ms, deadline);
        let mut report = SweepReport::default();
        self.reconcile_in(&run, &mut report).await;
        self.finish(&run, report)
    }

    /// A scheduled run: the sweep, then reconciliation if `force_reconcile`
    /// or [`SweepSettings::reconcile_due`] for `event_time_ms`. One report.
    pub async fn run_scheduled(
        &self,
        event_time_ms: u64,
        now_ms: u64,
        deadline: Instant,
        force_reconcile: bool,
    ) -> SweepReport {
        let run = self.start(now_ms, deadline);
        let mut report = SweepReport::default();
        self.pending_phase(&run, &mut report).await;
        let reconcile = force_reconcile || self.settings.reconcile_due(event_time_ms);
        match self.plan(&run).await {
            coordinator::Plan::Alone(first) => {
                let shards = self.settings.shards.read_shards();
                self.sweep(&run, &mut report, shards, first).await;
                if reconcile {
                    if run.past_deadline() {
                        report.remaining = true;
                    } else {
                        self.reconcile_in(&run, &mut report).await;
                    }
                }
            }
            coordinator::Plan::FanOut(workers) => {
                let mut reconciled = SweepReport::default();
                let (fanned, ()) = tokio::join!(self.fan_out(&run, &*workers), async {
                    if reconcile {
                        self.reconcile_in(&run, &mut reconciled).await;
                    }
                });
                report.merge(&fanned);
                report.merge(&reconciled);
            }
        }
        self.finish(&run, report)
    }

    fn finish(&self, run: &Run, mut report: SweepReport) -> SweepReport {
        report.sleep_unavailable |= run.sleep_unavailable();
        report.duration_ms = u64::try_from(run.started.elapsed().as_millis()).unwrap_or(u64::MAX);
        tracing::info!(
            run_id = %run.id,
            candidates = report.candidates,
            slept = report.slept,
            skipped_busy = report.skipped_busy,
            skipped_hold = report.skipped_hold,
            held_by_running_command = report.held_by_running_command,
            failed = report.failed,
            lost = report.lost,
            orphans = report.orphans,
            fixed = report.fixed,
            sleep_unavailable = report.sleep_unavailable,
            remaining = report.remaining,
            reconciled = report.reconciled,
            deferred = report.deferred,
            rate_limited = report.rate_limited,
            workers = report.workers,
            workers_failed = report.workers_failed,
            index_errors = report.index_errors,
            duration_ms = report.duration_ms,
            "sweep run finished"
        );
        report
    }

    // -----------------------------------------------------------------
    // Sweep
    // -----------------------------------------------------------------

    /// Sweep `shards` (one walk over the awake index); `first` is a page of
    /// the first shard already read.
    async fn sweep(
        &self,
        run: &Run,
        report: &mut SweepReport,
        shards: Vec<String>,
        first: Option<Page<UserRecord>>,
    ) {
        let idle_after = u64::try_from(self.settings.idle_after.as_millis()).unwrap_or(u64::MAX);
        let idle_before = run.now_ms.saturating_sub(idle_after);
        let concurrency = self.settings.concurrency.max(1);
        let mut walk = ShardWalk::new(
            &*self.store,
            shards,
            idle_before,
            self.settings.page_size,
            run.deadline,
        );
        if let Some(page) = first {
            walk = walk.with_first_page(page);
        }
        while let Some(items) = walk.next_page(&run.id).await {
            report.candidates += items.len() as u64;
            for o in each_concurrently(items, concurrency, |c| self.candidate(run, c)).await {
                tally(report, o);
            }
        }
        report.remaining |= walk.incomplete;
        report.index_errors += walk.errors;
    }

    /// One awake item the index listed: skipped, held, or put to sleep
    /// under the sweep lease (taken and released here).
    async fn candidate(&self, run: &Run, c: UserRecord) -> Outcome {
        if run.past_deadline() {
            return Outcome::NotReached;
        }
        let user_id = &c.user_id;
        let Some(machine_id) = c.machine_id.clone() else {
            tracing::warn!(run_id = %run.id, user_id = user_id.as_str(), "awake item without a machine id; skipped");
            return Outcome::Failed;
        };
        // One `now` for the whole decision, as the index listed the item.
        let now = run.now();
        if let Some(skipped) = self.not_now(run, &c, now).await {
            return skipped;
        }
        if let Some(held) = self.held(run, &c, &machine_id, now).await {
            return held;
        }
        let (acquired, owner, until) = match self.sweep_lease(run, &c, &machine_id, now).await {
            Ok(taken) => taken,
            Err(outcome) => return outcome,
        };
        let outcome = self
            .under_lease(run, &c, &acquired, &owner, &machine_id, until)
            .await;
        match self.store.release_lease(user_id, &owner, run.now()).await {
            Ok(ReleaseOutcome::Released(_) | ReleaseOutcome::NotHeld(_)) => {}
            Err(error) => {
                tracing::warn!(run_id = %run.id, user_id = user_id.as_str(), machine_id, error = %error, "sweep lease not released; it expires on its own")
            }
        }
        outcome
    }

    /// Why `c` is not slept now, before anything is held: a hold window
    /// not yet over, a live lease, or no room left in the sleep pacing.
    async fn not_now(&self, run: &Run, c: &UserRecord, now: u64) -> Option<Outcome> {
        if c.sleep_eligible_at.is_some_and(|at| at > now) {
            return Some(Outcome::SkippedHold);
        }
        if c.live_lease(now).is_some() {
            return Some(Outcome::SkippedBusy);
        }
        // Pacing before the lease: nothing is held while a sleep waits its turn.
        if !run.sleep_unavailable() {
            let latest = run
                .deadline
                .checked_sub(Duration::from_secs(1))
                .unwrap_or(run.deadline);
            if run.pacer.admit(latest).await.is_err() {
                return Some(Outcome::Deferred);
            }
        }
        None
    }

    /// Whether a command left running keeps `c` awake: every live hold
    /// counts until its completion marker exists (or the machine no longer
    /// runs).
    async fn held(&self, run: &Run, c: &UserRecord, machine_id: &str, now: u64) -> Option<Outcome> {
        let live: Vec<&Hold> = c.all_holds().filter(|h| now < h.until).collect();
        let hold_until = live.iter().map(|h| h.until).max()?;
        let user_id = c.user_id.as_str();
        match self.check_marker(run, machine_id, &live).await {
            Marker::Absent => {
                tracing::info!(run_id = %run.id, user_id, machine_id, action = "held", hold_until, holds = live.len(), "command still running; machine kept awake");
                Some(Outcome::Held)
            }
            Marker::Unknown => Some(Outcome::Failed),
            Marker::NotRunning(phase) => {
                tracing::debug!(run_id = %run.id, user_id, machine_id, phase = %phase, "held machine is not running; the hold no longer applies");
                None
            }
            Marker::Present | Marker::Gone => None,
        }
    }

    /// Take the sweep lease on `c` (only if its `last_active_at` is still
    /// the one the index listed): the item, the owner and the lease's end.
    async fn sweep_lease(
        &self,
        run: &Run,
        c: &UserRecord,
        machine_id: &str,
        now: u64,
    ) -> Result<(UserRecord, String, u64), Outcome> {
        let user_id = &c.user_id;
        let owner = format!("sweep-{}-{}", run.id, user_id);
        let until = now.saturating_add(ms(self.settings.lease_ttl));
        let purpose = LeasePurpose::Sweep {
            expected_last_active_at: c.last_active_at,
        };
        match self
            .store
            .acquire_lease(user_id, &owner, purpose, until, now)
            .await
        {
            Ok(AcquireOutcome::Acquired(rec)) => Ok((rec, owner, until)),
            Ok(AcquireOutcome::Busy(_) | AcquireOutcome::Changed(_)) => {
                tracing::debug!(run_id = %run.id, user_id = user_id.as_str(), machine_id, "lease busy or item changed; skipped");
                Err(Outcome::SkippedBusy)
            }
            Err(StoreError::NotFound { .. }) => Err(Outcome::SkippedBusy),
            Err(error) => {
                tracing::warn!(run_id = %run.id, user_id = user_id.as_str(), machine_id, error = %error, "sweep lease not taken");
                Err(Outcome::Failed)
            }
        }
    }

    /// Everything done while holding the sweep lease: check the item is as
    /// listed, clear finished holds, run the pre-sleep hook, then sleep the
    /// machine (or decide by its phase when sleep calls are unavailable).
    async fn under_lease(
        &self,
        run: &Run,
        seen: &UserRecord,
        rec: &UserRecord,
        owner: &str,
        machine_id: &str,
        lease_until: u64,
    ) -> Outcome {
        let user_id = &rec.user_id;
        // The index read may be stale, and a hold may have appeared without
        // a touch (a crashed turn): decide only on what was checked.
        if rec.machine_id.as_deref() != Some(machine_id)
            || rec.power != Power::Awake
            || rec.hold != seen.hold
            || rec.holds != seen.holds
            || rec.pending_sleep != seen.pending_sleep
        {
            return Outcome::SkippedBusy;
        }
        if rec.all_holds().next().is_some() {
            if let Err(error) = self.store.clear_hold(user_id, owner, run.now()).await {
                tracing::warn!(run_id = %run.id, user_id = user_id.as_str(), machine_id, error = %error, "hold not cleared");
                return Outcome::Failed;
            }
            tracing::info!(run_id = %run.id, user_id = user_id.as_str(), machine_id, action = "hold_cleared", "held command finished or hold expired");
        }
        let Some((lease_until, hook)) = self.pre_sleep(run, rec, owner, lease_until).await else {
            return Outcome::SkippedBusy;
        };
        // Never start a sleep the lease might not outlive.
        if run
            .now()
            .saturating_add(ms(self.settings.sleep_call_timeout))
            >= lease_until
        {
            return Outcome::SkippedBusy;
        }
        if run.sleep_unavailable() {
            return self.by_phase(run, user_id, owner, machine_id).await;
        }
        let key = sleep_key(machine_id, rec.awake_since, rec.last_active_at);
        match self.call_sleep(run, machine_id, &key).await {
            SleepCall::Unavailable => self.by_phase(run, user_id, owner, machine_id).await,
            SleepCall::Answered(answer) => {
                self.sleep_answered(run, rec, owner, hook, *answer).await
            }
        }
    }

    /// Act on the platform's answer to the sleep call made under the lease.
    async fn sleep_answered(
        &self,
        run: &Run,
        rec: &UserRecord,
        owner: &str,
        hook: Option<crate::journal::HookReport>,
        answer: dedalus::Result<Machine>,
    ) -> Outcome {
        let user_id = &rec.user_id;
        let machine_id = rec.machine_id.as_deref().unwrap_or_default();
        match answer {
            Ok(machine) => match self.store.mark_asleep(user_id, owner, run.now()).await {
                Ok(after) => {
                    self.journal_slept(run, Some(rec), &after, run.cause.0, hook)
                        .await;
                    tracing::info!(run_id = %run.id, user_id = user_id.as_str(), machine_id, action = "slept", phase = %machine.phase, "machine put to sleep");
                    Outcome::Slept
                }
                Err(error) => {
                    // The machine sleeps; the next run replays the same key
                    // and marks the item.
                    tracing::warn!(run_id = %run.id, user_id = user_id.as_str(), machine_id, error = %error, "machine slept but the item was not marked");
                    Outcome::Failed
                }
            },
            Err(err) if err.code() == Some(dedalus::codes::SLEEP_HOLD_WINDOW_ACTIVE) => {
                self.in_hold_window(run, rec, owner, &err).await
            }
            Err(err) if err.is_not_found() => self.lost(run, user_id, owner, machine_id).await,
            Err(err) if is_refusal(&err) => self.by_phase(run, user_id, owner, machine_id).await,
            Err(err) if err.status().map(|s| s.as_u16()) == Some(429) => {
                let wait = err.retry_after().unwrap_or(DEFAULT_RATE_LIMIT_WAIT);
                run.pacer.back_off(wait);
                tracing::warn!(run_id = %run.id, user_id = user_id.as_str(), machine_id, retry_after_ms = ms(wait), code = err.code(), "sleep rate-limited; no sleep call before Retry-After, this one left for the next run");
                Outcome::RateLimited
            }
            Err(err) => {
                tracing::warn!(run_id = %run.id, user_id = user_id.as_str(), machine_id, error = %err, status = err.status().map(|s| s.as_u16()), code = err.code(), "sleep failed; left for the next run");
                Outcome::Failed
            }
        }
    }

    /// The platform refused the sleep inside its hold window: record when
    /// it may be retried (the journal too).
    async fn in_hold_window(
        &self,
        run: &Run,
        rec: &UserRecord,
        owner: &str,
        err: &dedalus::Error,
    ) -> Outcome {
        let user_id = &rec.user_id;
        let machine_id = rec.machine_id.as_deref().unwrap_or_default();
        let now = run.now();
        let at = next_eligible_ms(err)
            .or_else(|| err.retry_after().map(|d| now.saturating_add(ms(d))))
            .unwrap_or_else(|| now.saturating_add(ms(DEFAULT_HOLD_RETRY)));
        if let Err(error) = self
            .store
            .set_sleep_eligible_at(user_id, owner, at, now)
            .await
        {
            tracing::warn!(run_id = %run.id, user_id = user_id.as_str(), machine_id, error = %error, "sleep_eligible_at not stored");
        }
        self.journal_refused(run, rec, at).await;
        tracing::info!(run_id = %run.id, user_id = user_id.as_str(), machine_id, action = "hold_window", sleep_eligible_at = at, "sleep refused within the hold window");
        Outcome::SkippedHold
    }

    /// One sleep call through the run's gate (see the module docs).
    async fn call_sleep(&self, run: &Run, machine_id: &str, key: &IdempotencyKey) -> SleepCall {
        let mut mode = run.mode.lock().await;
        match *mode {
            SleepMode::Unavailable => SleepCall::Unavailable,
            SleepMode::Available => {
                drop(mode);
                let answer = run.sleeps.sleep_machine(machine_id, None, Some(key)).await;
                if let Err(err) = &answer {
                    if is_refusal(err) {
                        self.refused(run, machine_id, err);
                        *run.mode.lock().await = SleepMode::Unavailable;
                    }
                }
                SleepCall::Answered(Box::new(answer))
            }
            SleepMode::Unprobed => {
                // Hold the gate across the call: one probe at a time.
                let answer = run.sleeps.sleep_machine(machine_id, None, Some(key)).await;
                *mode = match &answer {
                    Ok(_) => SleepMode::Available,
                    Err(err) if is_refusal(err) => {
                        self.refused(run, machine_id, err);
                        SleepMode::Unavailable
                    }
                    Err(err) => match err.status().map(|s| s.as_u16()) {
                        // Answered by the route itself (404, 409, other 4xx).
                        Some(s) if (400..500).contains(&s) && s != 408 && s != 429 => {
                            SleepMode::Available
                        }
                        _ => SleepMode::Unprobed,
                    },
                };
                SleepCall::Answered(Box::new(answer))
            }
        }
    }

    fn refused(&self, run: &Run, machine_id: &str, err: &dedalus::Error) {
        if !run.unavailable.swap(true, Ordering::SeqCst) {
            tracing::warn!(
                run_id = %run.id,
                machine_id,
                status = err.status().map(|s| s.as_u16()),
                code = err.code(),
                error = %err,
                "explicit sleep refused for this key: no more sleep calls in this run; relying on platform autosleep and reading phases"
            );
        }
    }

    /// Sleep unavailable: keep the item true by reading the phase.
    async fn by_phase(
        &self,
        run: &Run,
        user_id: &UserId,
        owner: &str,
        machine_id: &str,
    ) -> Outcome {
        match run.reads.get_machine(machine_id).await {
            Ok(m) => match m.phase {
                Phase::Sleeping | Phase::Stopping => {
                    match self.store.mark_asleep(user_id, owner, run.now()).await {
                        Ok(after) => {
                            self.journal_slept(run, None, &after, PLATFORM, None).await;
                            tracing::info!(run_id = %run.id, user_id = user_id.as_str(), machine_id, action = "marked_asleep", phase = %m.phase, "machine slept on its own; item updated");
                            Outcome::Fixed
                        }
                        Err(error) => {
                            tracing::warn!(run_id = %run.id, user_id = user_id.as_str(), machine_id, error = %error, "item not marked asleep");
                            Outcome::Failed
                        }
                    }
                }
                Phase::Destroyed => self.lost(run, user_id, owner, machine_id).await,
                _ => Outcome::AwaitingAutosleep,
            },
            Err(err) if err.is_not_found() => self.lost(run, user_id, owner, machine_id).await,
            Err(err) => {
                tracing::warn!(run_id = %run.id, user_id = user_id.as_str(), machine_id, error = %err, "status read failed");
                Outcome::Failed
            }
        }
    }

    async fn lost(&self, run: &Run, user_id: &UserId, owner: &str, machine_id: &str) -> Outcome {
        tracing::warn!(run_id = %run.id, user_id = user_id.as_str(), machine_id, action = "lost", "machine not found; item marked lost");
        match self
            .store
            .mark_lost(user_id, owner, "machine not found (404)", run.now())
            .await
        {
            Ok(after) => {
                self.journal_lost(run, machine_id, &after).await;
                Outcome::Lost
            }
            Err(error) => {
                tracing::warn!(run_id = %run.id, user_id = user_id.as_str(), machine_id, error = %error, "item not marked lost");
                Outcome::Failed
            }
        }
    }

    /// Whether a held command finished, without ever waking the machine.
    /// Whether the commands of `holds` finished: [`Marker::Present`] only
    /// when every marker exists.
    async fn check_marker(&self, run: &Run, machine_id: &str, holds: &[&Hold]) -> Marker {
        match run.reads.get_machine(machine_id).await {
            Ok(m) if m.phase == Phase::Running => {}
            Ok(m) => return Marker::NotRunning(m.phase),
            Err(err) if err.is_not_found() => return Marker::Gone,
            Err(err) => {
                tracing::warn!(run_id = %run.id, machine_id, error = %err, "status read for the hold check failed");
                return Marker::Unknown;
            }
        }
        let budget = self.settings.marker_check_timeout;
        let deadline = (Instant::now() + budget).min(run.deadline);
        let args = ["/bin/sh", "-c", MARKER_SCRIPT, "agenthome-marker-check"]
            .into_iter()
            .chain(holds.iter().map(|h| h.marker.as_str()));
        let request = ExecutionRequest::new(args)
            .cwd("/root")
            .timeout_ms(ms(budget).max(1));
        match run.reads.run_and_wait(machine_id, &request, deadline).await {
            Ok(result) => match result.exit_code() {
                Some(0) => Marker::Present,
                Some(1) => Marker::Absent,
                other => {
                    tracing::warn!(run_id = %run.id, machine_id, exit_code = other, status = %result.execution.status, "marker check inconclusive");
                    Marker::Unknown
                }
            },
            Err(err) => {
                tracing::warn!(run_id = %run.id, machine_id, error = %err, "marker check failed");
                Marker::Unknown
            }
        }
    }

    // -----------------------------------------------------------------
    // Reconciliation
    // -----------------------------------------------------------------

    /// Reconciliation: every listed machine against its item, then (once
    /// the whole list was read) every awake item whose machine is not in it.
    async fn reconcile_in(&self, run: &Run, report: &mut SweepReport) {
        report.reconciled = true;
        if let Some(listed) = self.reconcile_listed(run, report).await {
            self.reconcile_missing(run, report, &listed).await;
        }
    }

    /// Page through the platform's machine list, reconciling each page;
    /// the ids listed, or `None` when the list was not read to its end.
    async fn reconcile_listed(
        &self,
        run: &Run,
        report: &mut SweepReport,
    ) -> Option<HashSet<String>> {
        let concurrency = self.settings.concurrency.max(1);
        let mut listed: HashSet<String> = HashSet::new();
        let mut cursor: Option<String> = None;
        loop {
            if run.past_deadline() {
                report.remaining = true;
                return None;
            }
            let page = match run
                .reads
                .list_machines(cursor.as_deref(), Some(LIST_PAGE))
                .await
            {
                Ok(page) => page,
                Err(err) => {
                    tracing::error!(run_id = %run.id, error = %err, "machine list failed; reconciliation left for a later run");
                    report.failed += 1;
                    report.remaining = true;
                    return None;
                }
            };
            report.machines_listed += page.items.len() as u64;
            report.machines_running += page
                .items
                .iter()
                .filter(|m| m.phase == Phase::Running)
                .count() as u64;
            listed.extend(page.items.iter().map(|m| m.machine_id.clone()));
            for r in
                each_concurrently(page.items, concurrency, |m| self.reconcile_machine(run, m)).await
            {
                tally_reconciled(report, r);
            }
            match page.next_cursor {
                Some(next) if Some(&next) != cursor.as_ref() => cursor = Some(next),
                _ => return Some(listed),
            }
        }
    }

    /// Awake items whose machine the list does not have (destroyed, or
    /// never there): a status read tells; 404 → lost.
    async fn reconcile_missing(
        &self,
        run: &Run,
        report: &mut SweepReport,
        listed: &HashSet<String>,
    ) {
        let concurrency = self.settings.concurrency.max(1);
        let mut walk = ShardWalk::new(
            &*self.store,
            self.settings.shards.read_shards(),
            u64::MAX,
            self.settings.page_size,
            run.deadline,
        );
        while let Some(items) = walk.next_page(&run.id).await {
            let missing: Vec<UserRecord> = items
                .into_iter()
                .filter(|r| r.machine_id.as_ref().is_some_and(|id| !listed.contains(id)))
                .collect();
            for r in
                each_concurrently(missing, concurrency, |r| self.reconcile_unlisted(run, r)).await
            {
                tally_reconciled(report, r);
            }
        }
        report.remaining |= walk.incomplete;
        report.index_errors += walk.errors;
    }

    async fn reconcile_machine(&self, run: &Run, machine: Machine) -> Reconciled {
        if run.past_deadline() {
            return Reconciled::NotReached;
        }
        let machine_id = machine.machine_id.as_str();
        let items = match self.store.find_by_machine(machine_id).await {
            Ok(items) => items,
            Err(error) => {
                tracing::warn!(run_id = %run.id, machine_id, error = %error, "by-machine lookup failed");
                return Reconciled::Failed;
            }
        };
        if items.is_empty() {
            return self.orphan(run, &machine).await;
        }
        if items.len() > 1 {
            let users: Vec<&str> = items.iter().map(|r| r.user_id.as_str()).collect();
            tracing::error!(run_id = %run.id, machine_id, ?users, "machine referenced by more than one item");
        }
        let mut result = Reconciled::Consistent;
        for item in items {
            let r = self.reconcile_item(run, &item.user_id, &machine).await;
            if r != Reconciled::Consistent {
                result = r;
            }
        }
        result
    }

    async fn orphan(&self, run: &Run, machine: &Machine) -> Reconciled {
        let machine_id = machine.machine_id.as_str();
        if matches!(
            machine.phase,
            Phase::Destroying | Phase::Destroyed | Phase::Failed
        ) {
            return Reconciled::Consistent;
        }
        let grace = ms(self.settings.orphan_grace);
        let created = machine
            .created_at
            .as_deref()
            .and_then(|s| humantime::parse_rfc3339_weak(s).ok())
            .and_then(epoch_ms);
        if created.is_some_and(|at| at.saturating_add(grace) > run.now()) {
            // Young: its provisioning may not have recorded it yet.
            return Reconciled::Consistent;
        }
        tracing::warn!(run_id = %run.id, machine_id, phase = %machine.phase, action = "orphan", "machine referenced by no item");
        if self.settings.reconcile_destroy_orphans {
            return self.destroy_orphan(run, machine_id).await;
        }
        if !self.settings.reconcile_sleep_orphans || machine.phase != Phase::Running {
            return Reconciled::Orphan;
        }
        let revision = machine.revision.as_deref().unwrap_or_default();
        let key = orphan_sleep_key(machine_id, revision);
        let answer = match self.call_sleep(run, machine_id, &key).await {
            SleepCall::Answered(answer) => *answer,
            SleepCall::Unavailable => return Reconciled::Orphan,
        };
        match answer {
            Ok(_) => {
                tracing::info!(run_id = %run.id, machine_id, action = "orphan_slept", "orphan machine put to sleep");
                Reconciled::OrphanSlept
            }
            Err(err) => {
                tracing::warn!(run_id = %run.id, machine_id, error = %err, "orphan not slept");
                Reconciled::Orphan
            }
        }
    }

    /// Destroy an orphan older than the grace period. Its id is looked up
    /// again first, so a machine an item came to reference since the list
    /// read is kept.
    async fn destroy_orphan(&self, run: &Run, machine_id: &str) -> Reconciled {
        match self.store.find_by_machine(machine_id).await {
            Ok(items) if items.is_empty() => {}
            Ok(_) => return Reconciled::Consistent,
            Err(error) => {
                tracing::warn!(run_id = %run.id, machine_id, error = %error, "by-machine lookup failed; orphan kept");
                return Reconciled::Failed;
            }
        }
        match run.sleeps.delete_machine(machine_id, None, None).await {
            Ok(_) => {
                tracing::warn!(run_id = %run.id, machine_id, action = "orphan_destroyed", "orphan machine destroyed");
                Reconciled::OrphanDestroyed
            }
            Err(err) if err.is_not_found() => Reconciled::Consistent,
            Err(err) => {
                tracing::warn!(run_id = %run.id, machine_id, error = %err, "orphan not destroyed; the next reconciliation retries");
                Reconciled::Orphan
            }
        }
    }

    /// Make one item agree with its machine's real phase.
    async fn reconcile_item(&self, run: &Run, user_id: &UserId, listed: &Machine) -> Reconciled {
        let machine_id = listed.machine_id.as_str();
        // Consistent read first; the status read comes after it.
        let rec = match self.store.get(user_id).await {
            Ok(Some(rec)) => rec,
            Ok(None) => return Reconciled::Consistent,
            Err(error) => {
                tracing::warn!(run_id = %run.id, user_id = user_id.as_str(), machine_id, error = %error, "item read failed");
                return Reconciled::Failed;
            }
        };
        if rec.machine_id.as_deref() != Some(machine_id)
            || rec.state == crate::store::MachineState::Destroying
        {
            return Reconciled::Consistent;
        }
        let listed_sleeping = matches!(listed.phase, Phase::Sleeping | Phase::Stopping);
        let wants = match (rec.power, &listed.phase) {
            (Power::Awake, _) if listed_sleeping => Power::Asleep,
            (Power::Asleep | Power::Unknown, Phase::Running)
                if rec.state == crate::store::MachineState::Ready =>
            {
                Power::Awake
            }
            (_, Phase::Destroyed) => return self.reconcile_gone(run, &rec, machine_id).await,
            _ => return Reconciled::Consistent,
        };
        if rec.live_lease(run.now()).is_some() {
            return Reconciled::Busy;
        }
        self.correct_power(run, &rec, wants, machine_id).await
    }

    /// Set the item's power to `wants` if a fresh status read (after the
    /// item's) agrees; a machine gone meanwhile is handled as lost.
    async fn correct_power(
        &self,
        run: &Run,
        rec: &UserRecord,
        wants: Power,
        machine_id: &str,
    ) -> Reconciled {
        let user_id = rec.user_id.as_str();
        let fresh = match run.reads.get_machine(machine_id).await {
            Ok(m) => m,
            Err(err) if err.is_not_found() => {
                return self.reconcile_gone(run, rec, machine_id).await
            }
            Err(err) => {
                tracing::warn!(run_id = %run.id, user_id, machine_id, error = %err, "status read failed");
                return Reconciled::Failed;
            }
        };
        let agrees = match wants {
            Power::Asleep => matches!(fresh.phase, Phase::Sleeping | Phase::Stopping),
            _ => fresh.phase == Phase::Running,
        };
        if !agrees {
            return Reconciled::Consistent;
        }
        match self.store.set_power(rec, wants, run.now()).await {
            Ok(after) => {
                if wants == Power::Asleep {
                    self.journal_slept(run, Some(rec), &after, PLATFORM, None)
                        .await;
                }
                tracing::info!(run_id = %run.id, user_id, machine_id, action = "power_fixed", power = wants.as_str(), phase = %fresh.phase, "item power corrected to the machine's phase");
                Reconciled::Fixed
            }
            Err(StoreError::Conflict { .. }) => Reconciled::Busy,
            Err(error) => {
                tracing::warn!(run_id = %run.id, user_id, machine_id, error = %error, "power not corrected");
                Reconciled::Failed
            }
        }
    }

    /// An awake item whose machine is not in the list.
    async fn reconcile_unlisted(&self, run: &Run, rec: UserRecord) -> Reconciled {
        if run.past_deadline() {
            return Reconciled::NotReached;
        }
        let Some(machine_id) = rec.machine_id.clone() else {
            return Reconciled::Consistent;
        };
        match run.reads.get_machine(&machine_id).await {
            Ok(m) if m.phase == Phase::Destroyed => {
                self.reconcile_gone(run, &rec, &machine_id).await
            }
            Ok(m) => self.reconcile_item(run, &rec.user_id, &m).await,
            Err(err) if err.is_not_found() => self.reconcile_gone(run, &rec, &machine_id).await,
            Err(err) => {
                tracing::warn!(run_id = %run.id, user_id = rec.user_id.as_str(), machine_id, error = %err, "status read failed");
                Reconciled::Failed
            }
        }
    }

    /// The item's machine is gone: mark it lost under a sweep lease.
    async fn reconcile_gone(&self, run: &Run, rec: &UserRecord, machine_id: &str) -> Reconciled {
        let user_id = &rec.user_id;
        if rec.state == crate::store::MachineState::Destroying {
            return Reconciled::Consistent;
        }
        let now = run.now();
        let owner = format!("reconcile-{}-{}", run.id, user_id);
        let until = now.saturating_add(ms(self.settings.lease_ttl));
        let purpose = LeasePurpose::Sweep {
            expected_last_active_at: rec.last_active_at,
        };
        match self
            .store
            .acquire_lease(user_id, &owner, purpose, until, now)
            .await
        {
            Ok(AcquireOutcome::Acquired(now_rec))
                if now_rec.machine_id.as_deref() == Some(machine_id) => {}
            Ok(AcquireOutcome::Acquired(_)) => {
                let _ = self.store.release_lease(user_id, &owner, run.now()).await;
                return Reconciled::Consistent;
            }
            Ok(_) | Err(StoreError::NotFound { .. }) => return Reconciled::Busy,
            Err(error) => {
                tracing::warn!(run_id = %run.id, user_id = user_id.as_str(), machine_id, error = %error, "lease for mark_lost not taken");
                return Reconciled::Failed;
            }
        }
        let result = match self.lost(run, user_id, &owner, machine_id).await {
            Outcome::Lost => Reconciled::Lost,
            _ => Reconciled::Failed,
        };
        if let Err(error) = self.store.release_lease(user_id, &owner, run.now()).await {
            tracing::warn!(run_id = %run.id, user_id = user_id.as_str(), machine_id, error = %error, "lease not released; it expires on its own");
        }
        result
    }
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

fn tally(report: &mut SweepReport, o: Outcome) {
    match o {
        Outcome::Slept => report.slept += 1,
        Outcome::SkippedBusy => report.skipped_busy += 1,
        Outcome::SkippedHold => report.skipped_hold += 1,
        Outcome::Held => report.held_by_running_command += 1,
        Outcome::Failed => report.failed += 1,
        Outcome::Lost => report.lost += 1,
        Outcome::Fixed => report.fixed += 1,
        Outcome::AwaitingAutosleep => report.awaiting_autosleep += 1,
        Outcome::NotReached => {
            report.not_reached += 1;
            report.remaining = true;
        }
        Outcome::Deferred => {
            report.deferred += 1;
            report.remaining = true;
        }
        Outcome::RateLimited => {
            report.failed += 1;
            report.rate_limited += 1;
        }
    }
}

fn tally_reconciled(report: &mut SweepReport, r: Reconciled) {
    match r {
        Reconciled::Consistent | Reconciled::Busy => {}
        Reconciled::Orphan => report.orphans += 1,
        Reconciled::OrphanSlept => {
            report.orphans += 1;
            report.orphans_slept += 1;
        }
        Reconciled::OrphanDestroyed => {
            report.orphans += 1;
            report.orphans_destroyed += 1;
        }
        Reconciled::Fixed => report.fixed += 1,
        Reconciled::Lost => report.lost += 1,
        Reconciled::Failed => report.failed += 1,
        Reconciled::NotReached => report.remaining = true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn given_a_hold_window_error_when_parsed_then_the_next_eligible_time_is_read() {
        let api = dedalus::ApiError::from_response(
            "machines.sleep",
            http::StatusCode::CONFLICT,
            &http::HeaderMap::new(),
            br#"{"error_code":"SLEEP_HOLD_WINDOW_ACTIVE","message":"m","retryable":true,
                 "retry_after_ms":1000,"details":{"next_sleep_eligible_at":"2023-11-14T22:13:20Z"}}"#,
        );
        let err = dedalus::Error::from(api);
        assert_eq!(next_eligible_ms(&err), Some(1_700_000_000_000));
        assert!(!is_refusal(&err));
        let api = dedalus::ApiError::from_response(
            "machines.sleep",
            http::StatusCode::UNAUTHORIZED,
            &http::HeaderMap::new(),
            br#"{"error_code":"AUTH_INVALID","message":"missing internal route signature"}"#,
        );
        let err = dedalus::Error::from(api);
        assert!(is_refusal(&err));
        assert_eq!(next_eligible_ms(&err), None);
    }
}
