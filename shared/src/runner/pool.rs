//! The terminals of one machine that a user's turns keep, bounded.
//!
//! A turn reuses the stored terminal if it is ready and idle. One that is
//! busy (a command an earlier turn left running still runs in its shell)
//! cannot take input, so the turn uses another and *parks* the busy one;
//! one that is closed (its shell exited, the machine slept) is deleted.
//! Each time a runner opens, every terminal agenthome knows of is looked
//! at once:
//! - the first ready and idle one (the stored one first) is used;
//! - closed, expired or failed ones are deleted, and gone ones forgotten;
//! - busy ones stay parked until their command ends (deleting them would
//!   kill it);
//! - of the other idle ones, one is kept as a spare (the next turn's choice
//!   when the current one is busy) and the rest are deleted.
//!
//! So a machine has at most the terminal in use, one spare, and one
//! terminal per command still running — never a growing pile across turns.

use super::script;
use super::terminal::TerminalRunner;
use super::{RunnerError, RunnerOptions};
use crate::dedalus::{Client, ExecutionRequest, TerminalStatus};

/// What a known terminal turned out to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Seen {
    /// Ready, no command running: usable.
    Idle,
    /// Ready, a command left running still runs in it.
    Busy,
    /// Closed, expired or failed: to delete.
    Dead,
    /// 404: nothing to do.
    Gone,
    /// Could not tell (an error, still waking): kept for the next look.
    Unknown,
}

impl TerminalRunner {
    /// Opens a runner on `machine_id` over the terminals a turn keeps: the
    /// stored `current` one and the `parked` ones (see the module docs).
    /// [`TerminalRunner::terminal_id`] and [`TerminalRunner::parked`] are
    /// what to store for the next turn.
    pub async fn open_pool(
        client: &Client,
        machine_id: &str,
        current: Option<String>,
        parked: Vec<String>,
        options: RunnerOptions,
    ) -> Result<Self, RunnerError> {
        let mut runner = TerminalRunner::unopened(client, machine_id, options);
        let mut known: Vec<String> = Vec::new();
        for tid in current.into_iter().chain(parked) {
            if !tid.is_empty() && !known.contains(&tid) {
                known.push(tid);
            }
        }
        let seen = runner.survey(&known).await;
        let (mut keep, mut spare, mut delete) = (Vec::new(), None, Vec::new());
        for (tid, state) in seen {
            match state {
                Seen::Idle if !runner.is_open() => {
                    if let Err(e) = runner.attach(&tid).await {
                        tracing::debug!(terminal_id = %tid, error = %e, "terminal not reusable");
                        delete.push(tid);
                    }
                }
                Seen::Idle if spare.is_none() => spare = Some(tid),
                Seen::Idle | Seen::Dead => delete.push(tid),
                Seen::Busy | Seen::Unknown => keep.push(tid),
                Seen::Gone => {}
            }
        }
        if !runner.is_open() {
            runner.open_new().await?;
        }
        keep.extend(spare);
        runner.set_parked(keep);
        runner.delete_terminals(&delete).await;
        Ok(runner)
    }

    /// The state of each of `known`, in order: one status read each (all
    /// at once) and one execution for the busy flags of the ready ones.
    async fn survey(&self, known: &[String]) -> Vec<(String, Seen)> {
        let client = self.client().with_deadline(self.setup_deadline());
        let states = futures_util::future::join_all(
            known
                .iter()
                .map(|tid| terminal_state(&client, self.machine_id(), tid)),
        )
        .await;
        let mut seen: Vec<(String, Seen)> = known.iter().cloned().zip(states).collect();
        let ready: Vec<String> = seen
            .iter()
            .filter(|(_, s)| *s == Seen::Idle)
            .map(|(t, _)| t.clone())
            .collect();
        if ready.is_empty() {
            return seen;
        }
        // A command left running would read whatever we type: check the
        // busy flags the command lines keep in home.
        let check = ExecutionRequest::shell(script::busy_list_script(&ready)).timeout_ms(30_000);
        let busy: Option<Vec<String>> = match client
            .run_and_wait(self.machine_id(), &check, self.setup_deadline())
            .await
        {
            Ok(run) => Some(
                run.output
                    .stdout
                    .lines()
                    .filter_map(|l| l.strip_suffix(" idle").map(str::to_owned))
                    .collect(),
            ),
            Err(e) => {
                tracing::warn!(machine_id = %self.machine_id(), error = %e, "busy check failed; opening a new terminal");
                None
            }
        };
        for (tid, state) in &mut seen {
            if *state == Seen::Idle {
                *state = match &busy {
                    Some(idle) if idle.contains(tid) => Seen::Idle,
                    Some(_) => Seen::Busy,
                    None => Seen::Unknown,
                };
            }
        }
        seen
    }

    /// Deletes terminals agenthome no longer keeps (best effort: a failure
    /// leaves one for the platform to expire).
    pub(super) async fn delete_terminals(&self, ids: &[String]) {
        let client = self.client().with_deadline(self.setup_deadline());
        for tid in ids {
            match client.delete_terminal(self.machine_id(), tid, None).await {
                Ok(_) => tracing::info!(terminal_id = %tid, "terminal deleted"),
                Err(e) if e.is_not_found() => {}
                Err(e) => {
                    tracing::warn!(terminal_id = %tid, error = %e, "could not delete a terminal")
                }
            }
        }
    }
}

/// One terminal's state from its status read.
async fn terminal_state(client: &Client, machine_id: &str, tid: &str) -> Seen {
    match client.get_terminal(machine_id, tid).await {
        Ok(t) => match t.status {
            TerminalStatus::Ready => Seen::Idle,
            TerminalStatus::WakeInProgress | TerminalStatus::Unknown(_) => Seen::Unknown,
            _ => Seen::Dead,
        },
        Err(e) if e.is_not_found() => Seen::Gone,
        Err(e) => {
            tracing::debug!(terminal_id = %tid, error = %e, "terminal status unknown");
            Seen::Unknown
        }
    }
}
