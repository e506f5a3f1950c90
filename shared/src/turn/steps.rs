//! The middle of a turn, between the table writes that begin and end it:
//! [`TurnService::drive`] runs the named steps in order and leaves what the
//! next turn needs in a [`TurnEnd`].
//!
//! **The warm path.** When the previous turn ended cleanly (its end write
//! recorded `clean_seq` = its `turn_seq`: every command of it finished in
//! the shell it leaves, and it still held the lease) and no hold is
//! recorded, the stored terminal's shell is idle and set up: the turn
//! connects to its stream while it reads the machine's status (two
//! requests, in parallel), and everything else — the memory read, the
//! command, the summary — travels through that shell. A turn that crashed,
//! lost its lease or left a command running leaves no clean mark, so the
//! next one takes the cautious path: the holds' markers checked, the
//! terminal pool surveyed (status reads, a busy check) and set up. So does
//! a turn that had to wake the machine, and one whose stream is refused.

use crate::api::UserId;
use tokio::time::Instant;

use super::events::EventObserver;
use super::lease::{Leased, TurnLease};
use super::memory::{self, read_memory, summary_line};
use super::{millis, terminals_unavailable, TurnError, TurnResult, TurnService};
use crate::agent::{AgentError, AgentOutcome, ChatMessage, Limits, TurnInput};
use crate::api::TurnRequest;
use crate::clock::now_ms;
use crate::dedalus;
use crate::provision::{BootstrapOutcome, WorkerTrigger};
use crate::runner::{
    read_completion, CommandOutcome, ExecutionsRunner, RunnerOptions, TerminalRunner, Transport,
};
use crate::store::{Hold, StoreError, TurnEnd, UserRecord, UserStore};

/// The shell the turn's commands run in.
enum Shell {
    /// A terminal's persistent shell.
    Terminal(Box<TerminalRunner>),
    /// One execution per command (no terminals, or configured so).
    Executions,
}

/// The machine, reached: whether it had to be woken (and how long that
/// took), and on the warm path the stored terminal, connected.
struct Reached {
    woke: bool,
    wake_ms: u64,
    warm: Option<TerminalRunner>,
}

impl<S, T> TurnService<S, T>
where
    S: UserStore + Clone + 'static,
    T: WorkerTrigger,
{
    /// The turn's steps between its two table writes; `end` collects what
    /// the finishing write stores. Kept whole on purpose: each line is one
    /// named step (reach, wake facts, holds, shell, memory, agent, after the
    /// reply), so the turn reads top to bottom in one place.
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn drive(
        &self,
        rec: UserRecord,
        lease: &TurnLease<S>,
        turn_id: &str,
        request: TurnRequest,
        deadline: Instant,
        obs: &EventObserver<'_>,
        end: &mut TurnEnd,
    ) -> Result<TurnResult, TurnError> {
        let machine_id = rec
            .machine_id
            .clone()
            .ok_or_else(|| StoreError::Malformed {
                attribute: "machine_id".into(),
                message: "a ready item has no machine".into(),
            })?;
        let dedalus = self.provisioner.dedalus().with_deadline(deadline);
        // Never run commands on a sleeping machine (invariant 3).
        let reached = self
            .reach_machine(&dedalus, &rec, &machine_id, deadline, obs)
            .await?;
        if reached.woke {
            self.after_wake(&dedalus, &rec, &machine_id, deadline).await;
        }
        // After a wake: the post-wake hook, and what the sleep interrupted.
        let wake_note = super::wake_facts::after_wake(
            self.wake_step(&dedalus, &rec, &machine_id, reached.wake_ms, deadline),
            reached.woke,
            obs,
        )
        .await;
        // Nothing is typed into the machine once the lease is lost.
        if lease.check().await.is_err() {
            return Ok(self.stopped(turn_id, machine_id, reached.wake_ms, obs));
        }
        self.review_holds(&dedalus, &rec, end).await;
        let mut shell = self
            .open_shell(&dedalus, &rec, lease.owner(), reached.warm)
            .await?;
        let memory = self.recall(&dedalus, &machine_id, &mut shell).await;
        let mut input = turn_input(&request, memory);
        input.wake_note = wake_note;
        let limits = Limits {
            max_steps: self.settings.max_steps,
            command_timeout: self.settings.command_timeout,
            deadline: deadline
                .checked_sub(self.settings.finish_reserve)
                .unwrap_or(deadline),
        };
        let outcome = self
            .run_agent(&dedalus, &machine_id, &mut shell, lease, input, limits, obs)
            .await;
        self.after_reply(
            &dedalus, &rec, lease, turn_id, &request, &outcome, &mut shell, end,
        )
        .await;
        let transport = match shell {
            Shell::Terminal(_) => Transport::Terminal,
            Shell::Executions => Transport::Executions,
        };
        Ok(TurnResult::of(
            turn_id,
            machine_id,
            outcome?,
            reached.wake_ms,
            obs.started(),
            transport,
        ))
    }

    /// The stored terminal the warm path may reuse without any check (see
    /// the module docs), if any.
    fn warm_terminal<'r>(&self, rec: &'r UserRecord) -> Option<&'r str> {
        let warm = self.settings.transport == Transport::Terminal
            && rec.turns.previous_ended_clean()
            && rec.all_holds().next().is_none();
        rec.terminal_id.as_deref().filter(|_| warm)
    }

    /// The status read — on the warm path together with the connection to
    /// the stored terminal's stream — then the wake if the machine sleeps.
    async fn reach_machine(
        &self,
        dedalus: &dedalus::Client,
        rec: &UserRecord,
        machine_id: &str,
        deadline: Instant,
        obs: &EventObserver<'_>,
    ) -> Result<Reached, TurnError> {
        let started = Instant::now();
        let status = dedalus.get_machine(machine_id);
        let (machine, warm) = match self.warm_terminal(rec) {
            Some(tid) => {
                let parked = rec.parked_terminals.clone();
                let connect = TerminalRunner::connect_stored(
                    dedalus,
                    machine_id,
                    tid,
                    parked,
                    RunnerOptions::default(),
                );
                let (machine, warm) = tokio::join!(status, connect);
                (machine, Some(warm))
            }
            None => (status.await, None),
        };
        let machine = match machine {
            Ok(m) => m,
            Err(e) if e.is_not_found() => {
                return Err(TurnError::MachineLost {
                    machine_id: machine_id.to_string(),
                })
            }
            Err(e) => return Err(e.into()),
        };
        let woke = self.wake(dedalus, machine, deadline, obs).await?;
        let warm = match warm {
            Some(Ok(runner)) if !woke => Some(runner),
            Some(Ok(_)) => None,
            Some(Err(e)) => {
                tracing::info!(machine_id, error = %e, "the stored terminal's stream was refused; opening the pool");
                None
            }
            None => None,
        };
        let wake_ms = if woke { millis(started.elapsed()) } else { 0 };
        Ok(Reached {
            woke,
            wake_ms,
            warm,
        })
    }

    /// After a wake: the root filesystem may have been reset, so the tools
    /// are checked again (failures are logged; the turn goes on).
    async fn after_wake(
        &self,
        dedalus: &dedalus::Client,
        rec: &UserRecord,
        machine_id: &str,
        deadline: Instant,
    ) {
        let user_id = &rec.user_id;
        let settings = self.provisioner.settings();
        let budget = deadline.min(Instant::now() + settings.bootstrap_timeout);
        match settings.bootstrap.ensure(dedalus, machine_id, budget).await {
            Ok(BootstrapOutcome::Failed { exit_code, tail }) => {
                tracing::warn!(user_id = user_id.as_str(), ?exit_code, %tail, "toolchain re-bootstrap failed; the turn continues");
            }
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(user_id = user_id.as_str(), error = %e, "toolchain check failed; the turn continues")
            }
        }
    }

    /// Commands earlier turns left running: the holds of those that
    /// finished (marker present) or expired are dropped in the finishing
    /// write; the others keep holding the machine.
    async fn review_holds(&self, dedalus: &dedalus::Client, rec: &UserRecord, end: &mut TurnEnd) {
        let Some(machine_id) = rec.machine_id.as_deref() else {
            return;
        };
        let mut kept = Vec::new();
        for hold in rec.all_holds() {
            let done = now_ms() > hold.until
                || matches!(
                    read_completion(dedalus, machine_id, &hold.marker).await,
                    Ok(Some(_))
                );
            if !done {
                kept.push(hold.clone());
            }
        }
        if kept.len() != rec.all_holds().count() || rec.hold.is_some() {
            end.holds = Some(kept);
        }
    }

    /// The shell: the warm terminal as connected, or the terminal pool
    /// (a new terminal is stored at once, so a turn that dies does not
    /// leave it unknown), or executions where the API has no terminals
    /// (404/501 on create: the result says `transport`).
    async fn open_shell(
        &self,
        dedalus: &dedalus::Client,
        rec: &UserRecord,
        owner: &str,
        warm: Option<TerminalRunner>,
    ) -> Result<Shell, TurnError> {
        if self.settings.transport == Transport::Executions {
            return Ok(Shell::Executions);
        }
        if let Some(runner) = warm {
            return Ok(Shell::Terminal(Box::new(runner)));
        }
        let machine_id = rec.machine_id.as_deref().unwrap_or_default();
        let opened = TerminalRunner::open_pool(
            dedalus,
            machine_id,
            rec.terminal_id.clone(),
            rec.parked_terminals.clone(),
            RunnerOptions::default(),
        )
        .await;
        let runner = match opened {
            Ok(runner) => runner,
            Err(e) if terminals_unavailable(&e) => {
                tracing::warn!(user_id = %rec.user_id, machine_id, error = %e, "terminals are not available; using the executions backend");
                return Ok(Shell::Executions);
            }
            Err(e) => return Err(e.into()),
        };
        let stored = (rec.terminal_id.clone(), rec.parked_terminals.clone());
        if terminals_of(&runner) != stored {
            self.store_terminals(&rec.user_id, owner, &runner).await;
        }
        Ok(Shell::Terminal(Box::new(runner)))
    }

    /// Store the terminal to reuse and the parked ones now. A failure (the
    /// lease was lost meanwhile) costs only the reuse.
    async fn store_terminals(&self, user_id: &UserId, owner: &str, runner: &TerminalRunner) {
        let (current, parked) = terminals_of(runner);
        let store = self.provisioner.store();
        if let Err(e) = store
            .set_terminals(user_id, owner, current.as_deref(), &parked, now_ms())
            .await
        {
            tracing::warn!(user_id = user_id.as_str(), terminal_id = runner.terminal_id(), error = %e, "could not store the terminals for reuse");
        }
    }

    /// The last turn summaries for the prompt (agent mode only: the shell
    /// agent never uses them), read through the shell; through an
    /// execution if the shell cannot.
    async fn recall(
        &self,
        dedalus: &dedalus::Client,
        machine_id: &str,
        shell: &mut Shell,
    ) -> Vec<String> {
        let n = self.settings.memory_lines;
        if self.agent.is_shell() || n == 0 {
            return Vec::new();
        }
        if let Shell::Terminal(runner) = shell {
            match memory::read_memory_in(runner, n).await {
                Ok(lines) => return lines,
                Err(e) => {
                    tracing::info!(machine_id, error = %e, "memory not read through the shell; using an execution")
                }
            }
        }
        read_memory(dedalus, machine_id, n).await
    }

    /// The agent, with the lease checked before every command.
    #[allow(clippy::too_many_arguments)]
    async fn run_agent(
        &self,
        dedalus: &dedalus::Client,
        machine_id: &str,
        shell: &mut Shell,
        lease: &TurnLease<S>,
        input: TurnInput,
        limits: Limits,
        obs: &EventObserver<'_>,
    ) -> Result<AgentOutcome, AgentError> {
        match shell {
            Shell::Terminal(runner) => {
                let mut leased = Leased {
                    inner: &mut **runner,
                    lease,
                };
                self.agent
                    .run_observed(input, &mut leased, limits, obs)
                    .await
            }
            Shell::Executions => {
                let mut runner = ExecutionsRunner::new(dedalus, machine_id);
                let mut leased = Leased {
                    inner: &mut runner,
                    lease,
                };
                self.agent
                    .run_observed(input, &mut leased, limits, obs)
                    .await
            }
        }
    }

    /// After the reply, whatever the agent did — unless the turn lost the
    /// machine, then nothing more is sent or written: every command left
    /// running holds the machine, the turn is remembered on the machine,
    /// and `end` gets the terminals and whether the shell is left idle.
    #[allow(clippy::too_many_arguments)]
    async fn after_reply(
        &self,
        dedalus: &dedalus::Client,
        rec: &UserRecord,
        lease: &TurnLease<S>,
        turn_id: &str,
        request: &TurnRequest,
        outcome: &Result<AgentOutcome, AgentError>,
        shell: &mut Shell,
        end: &mut TurnEnd,
    ) {
        let user_id = &rec.user_id;
        if lease.is_lost() {
            tracing::warn!(
                user_id = user_id.as_str(),
                "the turn lost its lease: no hold or summary recorded"
            );
            return;
        }
        let (steps, status, reply) = match outcome {
            Ok(o) => (o.steps.as_slice(), Some(o.status), Some(o.reply.as_str())),
            Err(e) => (e.partial().steps.as_slice(), None, None),
        };
        self.hold_for_running(rec, steps, end);
        self.journal_held(&rec.user_id, steps).await;
        let line = summary_line(turn_id, now_ms(), &request.message, reply, status, steps);
        let machine_id = rec.machine_id.as_deref().unwrap_or_default();
        self.remember(dedalus, machine_id, turn_id, &line, shell)
            .await;
        if let Shell::Terminal(runner) = shell {
            end.terminals = Some(terminals_of(runner));
            if runner.is_idle() && !lease.is_lost() {
                end.clean_seq = Some(rec.turns.seq);
            }
        }
    }

    /// Every command still running keeps the machine awake (up to the
    /// maximum hold) until its completion marker exists: its hold joins the
    /// set the finishing write stores.
    fn hold_for_running(&self, rec: &UserRecord, steps: &[CommandOutcome], end: &mut TurnEnd) {
        let markers: Vec<String> = steps
            .iter()
            .filter(|s| s.still_running)
            .filter_map(|s| s.completion_marker.clone())
            .collect();
        if markers.is_empty() {
            return;
        }
        let mut holds = end
            .holds
            .take()
            .unwrap_or_else(|| rec.all_holds().cloned().collect());
        let until = now_ms() + millis(self.settings.max_hold);
        holds.retain(|h| !markers.contains(&h.marker));
        holds.extend(markers.into_iter().map(|marker| Hold { until, marker }));
        end.holds = Some(holds);
    }

    /// The journal's `held` entry for each command left running.
    async fn journal_held(&self, user_id: &UserId, steps: &[CommandOutcome]) {
        let until = now_ms() + millis(self.settings.max_hold);
        for step in steps.iter().filter(|s| s.still_running) {
            let Some(marker) = step.completion_marker.as_deref() else {
                continue;
            };
            let held = crate::journal::JournalEntry::new(
                now_ms(),
                crate::journal::Event::Held,
                crate::journal::Actor::Turn,
            )
            .held(&step.command, marker, until);
            self.provisioner.journal().record(user_id, held).await;
        }
    }

    /// Append the turn's summary to the memory file: through the shell
    /// when it is idle, else (or if that fails) through an execution; at
    /// most once either way.
    async fn remember(
        &self,
        dedalus: &dedalus::Client,
        machine_id: &str,
        turn_id: &str,
        line: &str,
        shell: &mut Shell,
    ) {
        if let Shell::Terminal(runner) = shell {
            if runner.is_idle() {
                match memory::append_in(runner, turn_id, line).await {
                    Ok(()) => return,
                    Err(e) => {
                        tracing::info!(machine_id, error = %e, "summary not appended through the shell; using an execution")
                    }
                }
            }
        }
        if let Err(e) = memory::append(dedalus, machine_id, turn_id, line).await {
            tracing::warn!(machine_id, error = %e, "could not append the turn summary");
        }
    }
}

/// The terminal in use and the parked ones, as stored.
fn terminals_of(runner: &TerminalRunner) -> (Option<String>, Vec<String>) {
    (
        Some(runner.terminal_id().to_owned()).filter(|t| !t.is_empty()),
        runner.parked().to_vec(),
    )
}

/// The agent's input: the message, the chat history, the memory lines.
fn turn_input(request: &TurnRequest, memory: Vec<String>) -> TurnInput {
    TurnInput {
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
        wake_note: None,
    }
}
