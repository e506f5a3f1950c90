//! One chat turn (docs/design.md §5 "Chat turn", invariants 2–4): load the user's
//! item → take the turn lease (renewed while the turn runs, checked before
//! every command — a turn that lost it stops — always released; see `lease`)
//! → wake the machine and wait for `running` → re-check the toolchain after
//! a wake → reuse or open the shell → run the agent → remember the turn in
//! `~/.agenthome/turns.jsonl` → record activity and holds → reply.

mod end;
mod events;
mod lease;
mod memory;
mod wake_facts;

pub use end::{record_turn_end, Ending, SleepAfterTurn};
pub use events::{MachineStage, NoEvents, StreamSettings, TurnEvent, TurnEvents, TRUNCATED_NOTE};
pub use memory::{read_memory, summary_line, TURNS_FILE};
pub use wake_facts::WakeFacts;

use events::EventObserver;
use lease::{Leased, TurnLease};

use crate::agent::{
    Agent, AgentError, AgentOutcome, AgentStatus, ChatMessage, Limits, TurnInput, Usage,
};
use crate::api::TurnRequest;
use crate::clock::now_ms;
use crate::dedalus::{self, ExecutionRequest, Phase};
use crate::provision::{BootstrapOutcome, Ensure, ProvisionError, Provisioner, WorkerTrigger};
use crate::runner::{
    read_completion, CommandOutcome, ExecutionsRunner, RunnerError, RunnerOptions, TerminalRunner,
    Transport,
};
use crate::store::{
    AcquireOutcome, Hold, LeaseKind, LeasePurpose, MachineState, StoreError, UserRecord, UserStore,
};
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
        }
    }

    /// The provisioning service (and through it the store and client).
    pub fn provisioner(&self) -> &Provisioner<S, T> {
        &self.provisioner
    }

    /// Run one turn for `user_id`, finishing before `deadline`.
    pub async fn run(
        &self,
        user_id: &str,
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
        user_id: &str,
        request: TurnRequest,
        deadline: Instant,
        sink: &dyn TurnEvents,
    ) -> Result<TurnOutcome, TurnError> {
        let started = Instant::now();
        let obs = EventObserver::new(sink, self.settings.stream, started);
        let turn = self.run_observed(user_id, request, deadline, &obs, started);
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

    async fn run_observed(
        &self,
        user_id: &str,
        request: TurnRequest,
        deadline: Instant,
        obs: &EventObserver<'_>,
        started: Instant,
    ) -> Result<TurnOutcome, TurnError> {
        if deadline <= started + self.settings.finish_reserve {
            return Err(TurnError::NoTime);
        }
        let store = self.provisioner.store();
        match store.get(user_id).await? {
            Some(rec) if rec.state == MachineState::Ready => {}
            Some(rec) if rec.state == MachineState::Destroying => {
                return Ok(TurnOutcome::Destroying)
            }
            _ => return self.provisioning(user_id, obs).await,
        }
        let turn_id = uuid::Uuid::now_v7().simple().to_string();
        let owner = format!("turn-{turn_id}");
        let rec = match self.acquire(user_id, &owner).await? {
            Ok(rec) => rec,
            Err(outcome) => return Ok(outcome),
        };
        // The item may have changed between the read and the acquisition
        // (the sweep found the machine lost, a provisioning restarted).
        if rec.state != MachineState::Ready || rec.machine_id.is_none() {
            if let Err(e) = store.release_lease(user_id, &owner, now_ms()).await {
                tracing::warn!(user_id, error = %e, "could not release the turn lease; it expires by itself");
            }
            return match rec.state {
                MachineState::Destroying => Ok(TurnOutcome::Destroying),
                _ => self.provisioning(user_id, obs).await,
            };
        }
        // Renewed while it lives; dropped (the renewer aborted) on every
        // path out of here, a panic or a cancelled turn included.
        let lease = TurnLease::start(
            std::sync::Arc::new(store.clone()),
            user_id,
            &owner,
            rec.lease.as_ref().map_or(0, |l| l.until),
            self.settings.lease_ttl,
        );
        // Boxed and type-erased: the turn's future is large and deep (wake,
        // shell, agent, bookkeeping); callers' futures stay small.
        let ending = end::Ending::new(&rec, now_ms(), request.end_conversation);
        let drive: std::pin::Pin<Box<dyn std::future::Future<Output = _> + Send + '_>> =
            Box::pin(self.drive(rec, &lease, &turn_id, request, deadline, obs));
        let result = drive.await;
        drop(lease);
        // Bookkeeping happens whatever the turn did: activity (or the loss of
        // the machine), then release.
        let now = now_ms();
        let lost = match &result {
            Err(TurnError::MachineLost { machine_id }) => Some(machine_id.clone()),
            _ => None,
        };
        if let Some(machine_id) = &lost {
            tracing::warn!(
                user_id,
                machine_id,
                "the user's machine is gone; provisioning a new one"
            );
            store
                .mark_lost(
                    user_id,
                    &owner,
                    "machine not found when a turn tried to wake it",
                    now,
                )
                .await?;
        } else if let Err(e) = store.touch(user_id, &owner, now).await {
            tracing::warn!(user_id, error = %e, "could not record the turn's activity");
        }
        if let Err(e) = store.release_lease(user_id, &owner, now).await {
            tracing::warn!(user_id, error = %e, "could not release the turn lease; it expires by itself");
        }
        if lost.is_some() {
            // The item is `failed` without a machine: provision a new one.
            return self.provisioning(user_id, obs).await;
        }
        let result = self.after_reply(ending, result, now).await;
        result.map(|r| TurnOutcome::Done(Box::new(r)))
    }

    async fn provisioning(
        &self,
        user_id: &str,
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

    /// Take the turn lease; another turn → Busy; the sweep → wait briefly
    /// (its hold is one API call) and try again.
    async fn acquire(
        &self,
        user_id: &str,
        owner: &str,
    ) -> Result<Result<UserRecord, TurnOutcome>, TurnError> {
        let store = self.provisioner.store();
        let ttl = millis(self.settings.lease_ttl);
        let give_up = Instant::now() + self.settings.sweep_wait;
        // Bounded: a lease that expires between our write and our read makes
        // the next attempt succeed; anything else returns.
        for _ in 0..100 {
            let now = now_ms();
            let current = match store
                .acquire_lease(user_id, owner, LeasePurpose::Turn, now + ttl, now)
                .await?
            {
                AcquireOutcome::Acquired(rec) => return Ok(Ok(rec)),
                AcquireOutcome::Busy(rec) | AcquireOutcome::Changed(rec) => rec,
            };
            if current.state == MachineState::Destroying {
                return Ok(Err(TurnOutcome::Destroying));
            }
            let Some(lease) = current.live_lease(now_ms()).cloned() else {
                continue;
            };
            match lease.kind {
                LeaseKind::Turn => {
                    let left = lease.until.saturating_sub(now_ms());
                    return Ok(Err(TurnOutcome::Busy {
                        retry_after: Duration::from_millis(left.clamp(1000, 30_000)),
                    }));
                }
                LeaseKind::Provision => {
                    return Ok(Err(TurnOutcome::Provisioning {
                        record: Box::new(current),
                        retry_after: Duration::from_secs(5),
                    }))
                }
                LeaseKind::Sweep if Instant::now() < give_up => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                LeaseKind::Sweep => {
                    return Ok(Err(TurnOutcome::Busy {
                        retry_after: Duration::from_secs(1),
                    }))
                }
            }
        }
        Ok(Err(TurnOutcome::Busy {
            retry_after: Duration::from_secs(1),
        }))
    }

    async fn drive(
        &self,
        rec: UserRecord,
        lease: &TurnLease<S>,
        turn_id: &str,
        request: TurnRequest,
        deadline: Instant,
        obs: &EventObserver<'_>,
    ) -> Result<TurnResult, TurnError> {
        let store = self.provisioner.store();
        let owner = lease.owner();
        let user_id = rec.user_id.as_str();
        let machine_id = rec
            .machine_id
            .clone()
            .ok_or_else(|| StoreError::Malformed {
                attribute: "machine_id".into(),
                message: "a ready item has no machine".into(),
            })?;
        let dedalus = self.provisioner.dedalus().with_deadline(deadline);

        // Wake (never run commands on a sleeping machine: invariant 3).
        let wake_started = Instant::now();
        let woke = self.wake(&dedalus, &machine_id, deadline, obs).await?;
        let wake_ms = if woke {
            millis(wake_started.elapsed())
        } else {
            0
        };
        match store.mark_awake(user_id, owner, now_ms()).await {
            Ok(_) => {}
            Err(StoreError::Conflict { .. }) => {
                return Ok(self.stopped(turn_id, machine_id, wake_ms, obs));
            }
            Err(e) => return Err(e.into()),
        }
        if woke {
            // The root filesystem may have been reset: re-check the tools.
            let settings = self.provisioner.settings();
            let budget = deadline.min(Instant::now() + settings.bootstrap_timeout);
            match settings
                .bootstrap
                .ensure(&dedalus, &machine_id, budget)
                .await
            {
                Ok(BootstrapOutcome::Failed { exit_code, tail }) => {
                    tracing::warn!(user_id, ?exit_code, %tail, "toolchain re-bootstrap failed; the turn continues");
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(user_id, error = %e, "toolchain check failed; the turn continues")
                }
            }
        }

        // After a wake: the post-wake hook, and what the sleep interrupted.
        let wake_note = wake_facts::after_wake(
            self.wake_step(&dedalus, &rec, &machine_id, wake_ms, deadline),
            woke,
            obs,
        )
        .await;

        // Nothing is typed into the machine once the lease is lost.
        if lease.check().await.is_err() {
            return Ok(self.stopped(turn_id, machine_id, wake_ms, obs));
        }

        // Commands earlier turns left running: release the holds of those
        // that finished (the others keep holding the machine).
        self.release_finished_holds(&dedalus, &rec, owner).await;

        // The memory read and the shell's set-up are independent round trips
        // to the machine: do them together.
        // (Boxed: the joined futures are large, and a turn runs deep.)
        let (memory, terminal) = tokio::join!(
            Box::pin(read_memory(
                &dedalus,
                &machine_id,
                self.settings.memory_lines
            )),
            Box::pin(async {
                match self.settings.transport {
                    Transport::Executions => None,
                    Transport::Terminal => Some(
                        TerminalRunner::open_pool(
                            &dedalus,
                            &machine_id,
                            rec.terminal_id.clone(),
                            rec.parked_terminals.clone(),
                            RunnerOptions::default(),
                        )
                        .await,
                    ),
                }
            })
        );
        let input = TurnInput {
            message: request.message.clone(),
            history: request
                .history
                .iter()
                .map(|h| ChatMessage {
                    role: match h.role {
                        crate::api::Role::User => "user".into(),
                        crate::api::Role::Assistant => "assistant".into(),
                    },
                    content: h.content.clone(),
                })
                .collect(),
            memory,
            wake_note,
        };
        let limits = Limits {
            max_steps: self.settings.max_steps,
            command_timeout: self.settings.command_timeout,
            deadline: deadline
                .checked_sub(self.settings.finish_reserve)
                .unwrap_or(deadline),
        };
        // Terminals are the default; where the API has none (newer SDKs
        // dropped them: 404/501 on create), the executions backend runs the
        // turn and the result says so (`transport`).
        let mut transport = self.settings.transport;
        let terminal = match terminal {
            None => None,
            Some(Ok(opened)) => Some(opened),
            Some(Err(e)) if terminals_unavailable(&e) => {
                tracing::warn!(user_id, machine_id, error = %e, "terminals are not available; using the executions backend");
                transport = Transport::Executions;
                None
            }
            Some(Err(e)) => return Err(e.into()),
        };
        let outcome = match terminal {
            Some(mut runner) => {
                let stored = (rec.terminal_id.clone(), rec.parked_terminals.clone());
                let stored = self.store_terminals(user_id, owner, &runner, stored).await;
                let mut leased = Leased {
                    inner: &mut runner,
                    lease,
                };
                let outcome = self
                    .agent
                    .run_observed(input, &mut leased, limits, obs)
                    .await;
                self.store_terminals(user_id, owner, &runner, stored).await;
                outcome
            }
            None => {
                let mut runner = ExecutionsRunner::new(&dedalus, &machine_id);
                let mut leased = Leased {
                    inner: &mut runner,
                    lease,
                };
                self.agent
                    .run_observed(input, &mut leased, limits, obs)
                    .await
            }
        };

        // Remember the turn on the machine, whatever the agent did — unless
        // the turn lost the machine: then nothing more is sent to it.
        let (steps, status, reply) = match &outcome {
            Ok(o) => (o.steps.as_slice(), Some(o.status), Some(o.reply.as_str())),
            Err(e) => (e.partial().steps.as_slice(), None, None),
        };
        if lease.is_lost() {
            tracing::warn!(
                user_id,
                "the turn lost its lease: no hold or summary recorded"
            );
        } else {
            self.hold_for_running(user_id, owner, steps).await;
            let line = summary_line(turn_id, now_ms(), &request.message, reply, status, steps);
            if let Err(e) = memory::append(&dedalus, &machine_id, &line).await {
                tracing::warn!(user_id, error = %e, "could not append the turn summary");
            }
        }
        Ok(TurnResult::of(
            turn_id,
            machine_id,
            outcome?,
            wake_ms,
            obs.started(),
            transport,
        ))
    }

    /// Make sure the machine runs; true if it had to be woken. If the wake
    /// route is refused for this key (docs/compatibility.md), a no-op
    /// execution wakes it instead.
    async fn wake(
        &self,
        dedalus: &dedalus::Client,
        machine_id: &str,
        deadline: Instant,
        obs: &EventObserver<'_>,
    ) -> Result<bool, TurnError> {
        let lost = || TurnError::MachineLost {
            machine_id: machine_id.to_string(),
        };
        let machine = match dedalus.get_machine(machine_id).await {
            Ok(m) => m,
            Err(e) if e.is_not_found() => return Err(lost()),
            Err(e) => return Err(e.into()),
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

    /// Store the terminal to reuse next time and the parked ones, if they
    /// differ from `stored`; returns what is stored now. A failure (the
    /// lease was lost meanwhile) costs only the reuse: the turn and its
    /// result go on.
    async fn store_terminals(
        &self,
        user_id: &str,
        owner: &str,
        runner: &TerminalRunner,
        stored: (Option<String>, Vec<String>),
    ) -> (Option<String>, Vec<String>) {
        let now = (
            Some(runner.terminal_id().to_owned()),
            runner.parked().to_vec(),
        );
        if now == stored {
            return stored;
        }
        match self
            .provisioner
            .store()
            .set_terminals(user_id, owner, now.0.as_deref(), &now.1, now_ms())
            .await
        {
            Ok(_) => now,
            Err(e) => {
                tracing::warn!(user_id, terminal_id = runner.terminal_id(), error = %e, "could not store the terminals for reuse");
                stored
            }
        }
    }

    /// Drops the holds whose command finished (marker present) or expired.
    async fn release_finished_holds(
        &self,
        dedalus: &dedalus::Client,
        rec: &UserRecord,
        owner: &str,
    ) {
        let Some(machine_id) = rec.machine_id.as_deref() else {
            return;
        };
        let mut finished = Vec::new();
        for hold in rec.all_holds() {
            let done = now_ms() > hold.until
                || matches!(
                    read_completion(dedalus, machine_id, &hold.marker).await,
                    Ok(Some(_))
                );
            if done {
                finished.push(hold.marker.clone());
            }
        }
        if finished.is_empty() {
            return;
        }
        let user_id = rec.user_id.as_str();
        if let Err(e) = self
            .provisioner
            .store()
            .release_holds(user_id, owner, &finished, now_ms())
            .await
        {
            tracing::warn!(user_id, error = %e, "could not release the holds of finished commands");
        }
    }

    /// Every command still running keeps the machine awake (up to the
    /// maximum hold) until its completion marker exists.
    async fn hold_for_running(&self, user_id: &str, owner: &str, steps: &[CommandOutcome]) {
        let running = steps
            .iter()
            .filter(|s| s.still_running)
            .filter_map(|s| Some((s.completion_marker.clone()?, s.command.as_str())));
        for (marker, command) in running {
            let now = now_ms();
            let hold = Hold {
                until: now + millis(self.settings.max_hold),
                marker,
            };
            let held = crate::journal::JournalEntry::new(
                now,
                crate::journal::Event::Held,
                crate::journal::Actor::Turn,
            )
            .held(command, &hold.marker, hold.until);
            let (stored, ()) = tokio::join!(
                self.provisioner
                    .store()
                    .set_hold(user_id, owner, &hold, now),
                self.provisioner.journal().record(user_id, held)
            );
            if let Err(e) = stored {
                tracing::warn!(user_id, error = %e, "could not record the hold for a running command");
            }
        }
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
