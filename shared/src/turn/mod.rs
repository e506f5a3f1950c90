//! One chat turn (docs/design.md §5 "Chat turn", invariants 2–4), as named
//! steps: **begin** (one conditional table write takes the turn lease,
//! checks the item is ready, records activity and counts fair use; see
//! `begin`) → **reach the machine** (the status read, and on a warm turn
//! the stored terminal's stream at the same time) → wake and wait for
//! `running` if it slept → **after wake** (the toolchain re-check) →
//! **open the shell** (the stored terminal when the previous turn left it
//! idle, else today's checks: holds, the terminal pool) → **recall**
//! (memory, agent mode only) → **run the agent** (lease renewed while it
//! runs, checked before every command — a turn that lost it stops; see
//! `lease`) → **after the reply** (holds for commands left running, the
//! summary appended to `~/.agenthome/turns.jsonl` through the same shell)
//! → **finish** (one conditional table write: release, activity, terminal,
//! holds). See `steps`.

mod begin;
mod end;
mod events;
mod lease;
mod memory;
mod steps;
mod wake_facts;

pub use end::{record_turn_end, Ending, SleepAfterTurn};
pub use events::{MachineStage, NoEvents, StreamSettings, TurnEvent, TurnEvents, TRUNCATED_NOTE};
pub use memory::{read_memory, summary_line, TURNS_FILE};
pub use wake_facts::WakeFacts;

use crate::api::UserId;
use events::EventObserver;
use lease::TurnLease;

use crate::agent::{Agent, AgentError, AgentOutcome, AgentStatus, Usage};
use crate::api::TurnRequest;
use crate::clock::now_ms;
use crate::dedalus::{self, ExecutionRequest, Phase};
use crate::provision::{Ensure, ProvisionError, Provisioner, WorkerTrigger};
use crate::runner::{CommandOutcome, RunnerError, Transport};
use crate::store::{StoreError, TurnEnd, UserRecord, UserStore};
use serde::Serialize;
use std::time::Duration;
use tokio::time::Instant;

/// Tunables of a turn.
#[derive(Debug, Clone)]
pub struct TurnSettings {
    /// Terminal (default) or executions.
    pub transport: Transport,
    /// Most commands per turn.
    pub max_steps: u32,
    /// Default per-command timeout.
    pub command_timeout: Duration,
    /// Longest a command left running holds the machine awake.
    pub max_hold: Duration,
    /// Turn lease length; renewed every third of it while the turn runs.
    pub lease_ttl: Duration,
    /// How long to wait for a sweep's lease (one API call) before giving up.
    pub sweep_wait: Duration,
    /// Time kept after the agent for the bookkeeping (summary, release).
    pub finish_reserve: Duration,
    /// How many recent turn summaries the prompt includes.
    pub memory_lines: usize,
    /// How progress events stream output (coalescing, cap).
    pub stream: StreamSettings,
    /// How the after-reply step sleeps the machine (`end_conversation`) and
    /// the idle policy (`IDLE_POLICY`, `IDLE_AFTER`).
    pub sleep: crate::sweep::SweepSettings,
    /// Bound of the in-machine `post-wake` hook (`HOOK_TIMEOUT`; zero: not run).
    pub hook_timeout: Duration,
}

impl Default for TurnSettings {
    fn default() -> Self {
        TurnSettings {
            transport: Transport::Terminal,
            max_steps: 20,
            command_timeout: Duration::from_secs(120),
            max_hold: Duration::from_secs(3600),
            lease_ttl: Duration::from_secs(60),
            sweep_wait: Duration::from_secs(5),
            finish_reserve: Duration::from_secs(3),
            memory_lines: 5,
            stream: StreamSettings::default(),
            sleep: crate::sweep::SweepSettings::default(),
            hook_timeout: crate::hooks::DEFAULT_TIMEOUT,
        }
    }
}

/// Time spent, as the turn result reports it.
#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
pub struct Timings {
    /// Waking the machine (0 if it was running).
    pub wake_ms: u64,
    /// The whole turn.
    pub total_ms: u64,
}

/// The turn result of docs/design.md §3.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct TurnResult {
    /// This turn's id.
    pub turn_id: String,
    /// The agent's reply.
    pub reply: String,
    /// The user's machine.
    pub machine_id: String,
    /// `completed`, `deadline`, `step_limit` or `lease_lost`.
    pub status: AgentStatus,
    /// Every command run, with truncated output.
    pub steps: Vec<CommandOutcome>,
    /// LLM usage.
    pub usage: Usage,
    /// Timings.
    pub timings: Timings,
    /// Which backend ran the commands.
    pub transport: Transport,
    /// With `end_conversation`: what happened to the machine after the reply.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sleep: Option<SleepAfterTurn>,
}

impl TurnResult {
    /// The result of the agent's `outcome` on `machine_id`, timed from
    /// `started`.
    fn of(
        turn_id: &str,
        machine_id: String,
        outcome: AgentOutcome,
        wake_ms: u64,
        started: Instant,
        transport: Transport,
    ) -> Self {
        let AgentOutcome {
            reply,
            steps,
            usage,
            status,
        } = outcome;
        TurnResult {
            turn_id: turn_id.to_string(),
            reply,
            machine_id,
            status,
            steps,
            usage,
            timings: Timings {
                wake_ms,
                total_ms: millis(started.elapsed()),
            },
            transport,
            sleep: None,
        }
    }
}

/// What a turn request led to.
#[derive(Debug, Clone, PartialEq)]
pub enum TurnOutcome {
    /// The turn ran.
    Done(Box<TurnResult>),
    /// The machine is being provisioned (this request may have started it).
    Provisioning {
        /// The item.
        record: Box<UserRecord>,
        /// A rough estimate of when to retry.
        retry_after: Duration,
    },
    /// Another turn for this user is running.
    Busy {
        /// When its lease ends at the latest.
        retry_after: Duration,
    },
    /// The user's machine is being destroyed.
    Destroying,
    /// The user's fair-use limit (`MAX_TURNS_PER_MINUTE`) is reached.
    RateLimited {
        /// The limit (turns per minute).
        limit: u32,
        /// Until the counting window ends.
        retry_after: Duration,
    },
}

/// Why a turn failed. Every variant leaves the lease released.
#[derive(Debug, thiserror::Error)]
pub enum TurnError {
    /// The table failed.
    #[error("table: {0}")]
    Store(#[from] StoreError),
    /// Provisioning could not start.
    #[error(transparent)]
    Provision(#[from] ProvisionError),
    /// The Dedalus API failed.
    #[error("Dedalus API: {0}")]
    Dedalus(#[from] dedalus::Error),
    /// The machine did not reach `running` before the deadline.
    #[error("the machine did not wake before the turn's deadline")]
    WakeTimeout,
    /// The shell could not be set up.
    #[error("the shell could not be opened: {0}")]
    Runner(#[from] RunnerError),
    /// The agent failed (LLM or runner); `partial` holds the steps done.
    #[error("the agent failed: {0}")]
    Agent(#[from] AgentError),
    /// The turn has no time left at all.
    #[error("no time left for the turn")]
    NoTime,
    /// The item's machine no longer exists (404, or destroyed outside
    /// agenthome). [`TurnService::run`] marks the item lost and starts
    /// provisioning again instead of returning this.
    #[error("machine {machine_id} no longer exists")]
    MachineLost {
        /// The machine the item referenced.
        machine_id: String,
    },
}

impl TurnError {
    /// Worth retrying the turn soon.
    pub fn is_retryable(&self) -> bool {
        match self {
            TurnError::Store(e) => e.is_retryable(),
            TurnError::Provision(e) => e.is_retryable(),
            TurnError::Dedalus(e) => e.is_retryable(),
            TurnError::WakeTimeout | TurnError::NoTime | TurnError::MachineLost { .. } => true,
            TurnError::Runner(_) | TurnError::Agent(_) => false,
        }
    }
}

/// Runs chat turns.
pub struct TurnService<S, T> {
    provisioner: Provisioner<S, T>,
    agent: Agent,
    settings: TurnSettings,
    sleeper: crate::sweep::Sweeper<S>,
    windows: begin::RateWindows,
}

impl<S, T> TurnService<S, T>
where
    S: UserStore + Clone + 'static,
    T: WorkerTrigger,
{
    /// Assemble (clients built once by the caller).
    pub fn new(provisioner: Provisioner<S, T>, agent: Agent, settings: TurnSettings) -> Self {
        let sleeper = crate::sweep::Sweeper::new(
            std::sync::Arc::new(provisioner.store().clone()),
            provisioner.dedalus(),
            settings.sleep.clone(),
        );
        TurnService {
            provisioner,
            agent,
            settings,
            sleeper,
            windows: begin::RateWindows::default(),
        }
    }

    /// The provisioning service (and through it the store and client).
    pub fn provisioner(&self) -> &Provisioner<S, T> {
        &self.provisioner
    }

    /// Run one turn for `user_id`, finishing before `deadline`.
    pub async fn run(
        &self,
        user_id: &UserId,
        request: TurnRequest,
        deadline: Instant,
    ) -> Result<TurnOutcome, TurnError> {
        self.run_with_events(user_id, request, deadline, &NoEvents)
            .await
    }

    /// [`TurnService::run`], telling `sink` the turn's progress
    /// ([`TurnEvent`]): `machine`, then per command `step_started`,
    /// `output`…, `step_finished`, and for a turn that ran `reply` and
    /// `done` (the result itself). Failures and the other outcomes are
    /// returned as by `run` (no `error` event: the caller maps them). The
    /// sink never affects the turn: its bookkeeping runs to the end whether
    /// or not anyone reads the events.
    pub async fn run_with_events(
        &self,
        user_id: &UserId,
        request: TurnRequest,
        deadline: Instant,
        sink: &dyn TurnEvents,
    ) -> Result<TurnOutcome, TurnError> {
        self.run_counted(user_id, request, deadline, sink, 0).await
    }

    /// [`TurnService::run_with_events`], counting the turn on the user's
    /// fair-use counter (`MAX_TURNS_PER_MINUTE` = `turns_per_minute`; 0 =
    /// no limit) in the write that begins it: above the limit the outcome is
    /// [`TurnOutcome::RateLimited`] and nothing else happens.
    pub async fn run_counted(
        &self,
        user_id: &UserId,
        request: TurnRequest,
        deadline: Instant,
        sink: &dyn TurnEvents,
        turns_per_minute: u32,
    ) -> Result<TurnOutcome, TurnError> {
        let started = Instant::now();
        let obs = EventObserver::new(sink, self.settings.stream, started);
        let turn = self.run_observed(user_id, request, deadline, &obs, turns_per_minute);
        tokio::pin!(turn);
        // Coalesced output goes out on a timer, not only when more arrives.
        let period = self
            .settings
            .stream
            .output_interval
            .max(Duration::from_millis(10));
        let mut tick = tokio::time::interval_at(started + period, period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let outcome = loop {
            tokio::select! {
                outcome = &mut turn => break outcome,
                _ = tick.tick() => obs.tick(),
            }
        };
        if let Ok(TurnOutcome::Done(result)) = &outcome {
            obs.emit(TurnEvent::Reply {
                text: result.reply.clone(),
            });
            obs.emit(TurnEvent::Done(result.clone()));
        }
        outcome
    }

    /// The turn as a sequence of named steps: [`TurnService::begin`] (one
    /// table write), [`TurnService::drive`] (the machine, the shell, the
    /// agent, what is left for the next turn) and [`TurnService::finish`]
    /// (one table write).
    async fn run_observed(
        &self,
        user_id: &UserId,
        request: TurnRequest,
        deadline: Instant,
        obs: &EventObserver<'_>,
        turn_limit: u32,
    ) -> Result<TurnOutcome, TurnError> {
        if deadline <= obs.started() + self.settings.finish_reserve {
            return Err(TurnError::NoTime);
        }
        let turn_id = uuid::Uuid::now_v7().simple().to_string();
        let owner = format!("turn-{turn_id}");
        let rec = match self.begin(user_id, &owner, turn_limit, obs).await? {
            Ok(rec) => rec,
            Err(outcome) => return Ok(outcome),
        };
        // Renewed while it lives; dropped (the renewer aborted) on every
        // path out of here, a panic or a cancelled turn included.
        let lease = TurnLease::start(
            std::sync::Arc::new(self.provisioner.store().clone()),
            user_id,
            &owner,
            rec.lease.as_ref().map_or(0, |l| l.until),
            self.settings.lease_ttl,
        );
        let mut end = TurnEnd::default();
        // Boxed and type-erased: the turn's future is large and deep (wake,
        // shell, agent, bookkeeping); callers' futures stay small.
        let ending = end::Ending::begun(&rec, now_ms(), request.end_conversation);
        let drive: std::pin::Pin<Box<dyn std::future::Future<Output = _> + Send + '_>> =
            Box::pin(self.drive(rec, &lease, &turn_id, request, deadline, obs, &mut end));
        let result = drive.await;
        drop(lease);
        self.finish(user_id, &owner, result, &end, ending, obs)
            .await
    }

    /// Bookkeeping whatever the turn did, in one write: release, activity
    /// and what the turn leaves for the next one (`end`) — or, when the
    /// machine turned out lost, the item marked so and a new provisioning.
    async fn finish(
        &self,
        user_id: &UserId,
        owner: &str,
        result: Result<TurnResult, TurnError>,
        end: &TurnEnd,
        ending: end::Ending,
        obs: &EventObserver<'_>,
    ) -> Result<TurnOutcome, TurnError> {
        let store = self.provisioner.store();
        let now = now_ms();
        if let Err(TurnError::MachineLost { machine_id }) = &result {
            tracing::warn!(
                user_id = user_id.as_str(),
                machine_id,
                "the user's machine is gone; provisioning a new one"
            );
            let error = "machine not found when a turn tried to wake it";
            store.mark_lost(user_id, owner, error, now).await?;
            if let Err(e) = store.release_lease(user_id, owner, now).await {
                tracing::warn!(user_id = user_id.as_str(), error = %e, "could not release the turn lease; it expires by itself");
            }
            // The item is `failed` without a machine: provision a new one.
            return self.provisioning(user_id, obs).await;
        }
        if let Err(e) = store.end_turn(user_id, owner, end, now).await {
            tracing::warn!(user_id = user_id.as_str(), error = %e, "could not end the turn in the table; the lease expires by itself");
        }
        // Needs the lease released and `last_active_at` as `end_turn` left it.
        let result = self.after_turn(ending, result, now).await;
        result.map(|r| TurnOutcome::Done(Box::new(r)))
    }

    async fn provisioning(
        &self,
        user_id: &UserId,
        obs: &EventObserver<'_>,
    ) -> Result<TurnOutcome, TurnError> {
        let ensure = self.provisioner.ensure(user_id).await?;
        if let Ensure::Ready(rec) | Ensure::Started(rec) | Ensure::InProgress(rec) = &ensure {
            obs.machine(MachineStage::Provisioning, rec.state.as_str());
        }
        let retry_after = ensure.retry_after().max(Duration::from_secs(1));
        Ok(match ensure {
            Ensure::Destroying(_) => TurnOutcome::Destroying,
            // Ready between our read and ensure: the caller retries at once.
            Ensure::Ready(rec) | Ensure::Started(rec) | Ensure::InProgress(rec) => {
                TurnOutcome::Provisioning {
                    record: Box::new(rec),
                    retry_after,
                }
            }
        })
    }

    /// Make sure the machine (`machine`, as just read) runs; true if it had
    /// to be woken. If the wake route is refused for this key
    /// (docs/compatibility.md), a no-op execution wakes it instead.
    async fn wake(
        &self,
        dedalus: &dedalus::Client,
        machine: dedalus::Machine,
        deadline: Instant,
        obs: &EventObserver<'_>,
    ) -> Result<bool, TurnError> {
        let machine_id = machine.machine_id.as_str();
        let lost = || TurnError::MachineLost {
            machine_id: machine_id.to_string(),
        };
        match machine.phase {
            Phase::Running => {
                obs.machine(MachineStage::Ready, machine.phase.as_str());
                return Ok(false);
            }
            Phase::Destroying | Phase::Destroyed => return Err(lost()),
            _ => {}
        }
        obs.machine(MachineStage::Waking, machine.phase.as_str());
        match dedalus.wake_machine(machine_id, None, None).await {
            Ok(_) => {}
            Err(e) if e.is_not_found() => return Err(lost()),
            Err(e) if matches!(e.status().map(|s| s.as_u16()), Some(401 | 403)) => {
                tracing::warn!(
                    machine_id,
                    code = e.code().unwrap_or(""),
                    "wake refused; waking through a no-op execution"
                );
                dedalus
                    .create_execution(machine_id, &ExecutionRequest::new(["/bin/true"]), None)
                    .await?;
            }
            Err(e) => return Err(e.into()),
        }
        match dedalus
            .wait_until(machine_id, Phase::Running, deadline)
            .await
        {
            Ok(m) => {
                obs.machine(MachineStage::Ready, m.phase.as_str());
                Ok(true)
            }
            Err(e) if e.is_deadline_exceeded() => Err(TurnError::WakeTimeout),
            Err(e) => Err(e.into()),
        }
    }

    /// What the wake step needs (see `wake_facts`).
    fn wake_step<'a>(
        &'a self,
        dedalus: &'a dedalus::Client,
        rec: &'a UserRecord,
        machine_id: &'a str,
        wake_ms: u64,
        deadline: Instant,
    ) -> wake_facts::WakeStep<'a> {
        wake_facts::WakeStep {
            journal: self.provisioner.journal(),
            hook_timeout: self.settings.hook_timeout,
            dedalus,
            rec,
            machine_id,
            wake_ms,
            deadline,
        }
    }

    /// The result of a turn that lost its lease before the agent ran.
    fn stopped(
        &self,
        turn_id: &str,
        machine_id: String,
        wake_ms: u64,
        obs: &EventObserver<'_>,
    ) -> TurnResult {
        tracing::warn!(
            machine_id,
            "the turn lost its lease before running anything"
        );
        TurnResult::of(
            turn_id,
            machine_id,
            AgentOutcome::lease_lost(),
            wake_ms,
            obs.started(),
            self.settings.transport,
        )
    }
}

/// The API has no terminals (newer SDKs dropped them): 404 or 501 on create.
fn terminals_unavailable(e: &RunnerError) -> bool {
    match e {
        RunnerError::Api(err) => matches!(err.status().map(|s| s.as_u16()), Some(404 | 501)),
        _ => false,
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}
