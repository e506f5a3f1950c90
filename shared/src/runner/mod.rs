//! Running the agent's commands on a user's machine.
//!
//! One interface, [`CommandRunner`], with two backends (docs/compatibility.md: the newest
//! Python SDK dropped terminals, so both must work):
//! - [`TerminalRunner`] (default): one persistent bash on a terminal
//!   WebSocket. Each command is one line that `eval`s it in that shell (so
//!   `cd` and `export` persist) and prints start and end markers carrying
//!   the exit code and a per-command secret nonce — completion never
//!   depends on prompt regexes, and a machine process cannot forge it. A
//!   long command is written to a file first (an execution), so the typed
//!   line stays short. The terminals a user's turns keep are bounded
//!   (`pool`: closed ones deleted, busy ones parked, one idle spare).
//! - [`ExecutionsRunner`] (`AGENT_TRANSPORT=executions`): one execution per
//!   command, with cwd and exported variables carried between commands in
//!   files under `~/.agenthome/shell/`.
//!
//! Both keep `~/.bash_history`, write a completion marker
//! (`~/.agenthome/run/<id>.done`, holding the exit code) and a log
//! (`~/.agenthome/run/<id>.log`) for every command, so a command that
//! outlives its timeout keeps running and can be checked later
//! ([`read_completion`]). Output is ANSI-stripped and truncated to a
//! head and a tail within a fixed memory budget ([`OutputCollector`]).

mod executions;
mod output;
mod pool;
pub mod script;
mod sentinel;
mod terminal;

use std::future::Future;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::dedalus::{self, Client, ExecutionRequest};

pub use executions::ExecutionsRunner;
pub use output::{clean, Collected, OutputCollector, DEFAULT_OUTPUT_LIMIT};
pub use sentinel::{Scan, SentinelScanner, END_TAG, START_TAG};
pub use terminal::{TerminalRunner, TERMINAL_HEIGHT, TERMINAL_WIDTH};

/// Which backend runs the commands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    /// A persistent shell on a terminal WebSocket.
    Terminal,
    /// One execution per command.
    Executions,
}

impl Transport {
    /// Parses `AGENT_TRANSPORT` (`terminal` or `executions`; empty = terminal).
    pub fn parse(value: &str) -> Option<Transport> {
        match value.trim().to_ascii_lowercase().as_str() {
            "" | "terminal" | "terminals" => Some(Transport::Terminal),
            "executions" | "execution" => Some(Transport::Executions),
            _ => None,
        }
    }
}

/// What running one command produced. Serialized into the turn result's
/// `steps` (docs/design.md §3).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommandOutcome {
    /// The command as given.
    pub command: String,
    /// Its exit code; absent while it is still running (or when it was
    /// killed without one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    /// Combined stdout and stderr, ANSI-stripped, head and tail kept.
    pub output: String,
    /// Size of the output before truncation, in bytes.
    pub output_bytes: u64,
    /// True when `output` omits part of it.
    pub truncated: bool,
    /// Wall time spent waiting for it.
    pub duration_ms: u64,
    /// True when it outlived its timeout and keeps running on the machine.
    pub still_running: bool,
    /// For a command still running: its completion marker, a path relative
    /// to the home directory that appears (holding the exit code) when it
    /// finishes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completion_marker: Option<String>,
}

/// Failures of a runner. None of them carries secrets.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RunnerError {
    /// The shell still runs an earlier command that outlived its timeout;
    /// no new command is sent into it. Call [`CommandRunner::reopen`] (a
    /// new terminal) and retry.
    #[error("the shell is still running command {command_id}; open a new one")]
    Busy {
        /// The id of the command still running.
        command_id: String,
    },
    /// The terminal closed (its shell exited, it was deleted, or the
    /// machine slept). `started`: whether the command had started (if not,
    /// it is safe to retry it in a new terminal).
    #[error("the terminal closed (command started: {started})")]
    TerminalClosed {
        /// The command had started before the terminal closed.
        started: bool,
    },
    /// The WebSocket dropped and reconnecting failed.
    #[error("lost the terminal connection after {attempts} reconnect attempt(s)")]
    Disconnected {
        /// Reconnect attempts made.
        attempts: u32,
        /// The last connect error.
        #[source]
        source: Option<Box<dedalus::Error>>,
    },
    /// The machine refused or failed a request.
    #[error("machine API call failed")]
    Api(#[from] dedalus::Error),
    /// Something the runner could not make sense of.
    #[error("runner protocol error: {0}")]
    Protocol(String),
    /// The turn no longer holds the machine (its lease was lost): no
    /// command may be sent.
    #[error("the turn lost its lease on the machine; nothing more is run")]
    LeaseLost,
}

/// Tunables shared by both backends.
#[derive(Debug, Clone)]
pub struct RunnerOptions {
    /// Raw output bytes kept per command (head + tail).
    pub output_limit: usize,
    /// Reconnect attempts after a recoverable WebSocket drop (per command).
    pub reconnect_attempts: u32,
    /// Executions backend: how long a command may run in total (the API
    /// kills it after this); commands are waited for only up to their own
    /// timeout and otherwise left running.
    pub detached_timeout: Duration,
    /// Upper bound for setting up a shell and for API calls of the runner.
    pub setup_timeout: Duration,
}

impl Default for RunnerOptions {
    fn default() -> Self {
        Self {
            output_limit: DEFAULT_OUTPUT_LIMIT,
            reconnect_attempts: 5,
            detached_timeout: Duration::from_secs(2 * 3600),
            setup_timeout: Duration::from_secs(60),
        }
    }
}

/// Sees a turn's commands as they run (the chat-turn function streams them
/// to chat UIs). Every method defaults to doing nothing; implementations must
/// be cheap and never block (they are called from the read loop).
pub trait Observer: Send + Sync {
    /// Step `index` (0-based, in turn order) starts running `command`.
    fn step_started(&self, _index: usize, _command: &str) {}
    /// Raw output of the step running now, as it arrives (the terminal
    /// backend) or all at once at its end (the executions backend).
    fn output(&self, _chunk: &[u8]) {}
    /// Step `index` ended (or was left running) with `outcome`.
    fn step_finished(&self, _index: usize, _outcome: &CommandOutcome) {}
    /// A piece of the model's text as it is generated (streamed replies).
    fn reply_delta(&self, _text: &str) {}
}

/// The observer that ignores everything.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoObserver;

impl Observer for NoObserver {}

/// Runs shell commands on one machine, keeping shell context between them.
pub trait CommandRunner: Send {
    /// Runs `command`, waiting at most `timeout`. A command that outlives it
    /// keeps running: the outcome says `still_running` and names its
    /// completion marker.
    fn run(
        &mut self,
        command: &str,
        timeout: Duration,
    ) -> impl Future<Output = Result<CommandOutcome, RunnerError>> + Send;

    /// [`CommandRunner::run`], telling `observer` the output. By default
    /// the output is reported once, when the command has ended (as the
    /// outcome holds it); backends that see output as it arrives override it.
    fn run_observed(
        &mut self,
        command: &str,
        timeout: Duration,
        observer: &dyn Observer,
    ) -> impl Future<Output = Result<CommandOutcome, RunnerError>> + Send {
        async move {
            let outcome = self.run(command, timeout).await?;
            observer.output(outcome.output.as_bytes());
            Ok(outcome)
        }
    }

    /// Whether a command may be sent now; called before each step. The
    /// default always allows it; a turn's wrapper checks its lease
    /// ([`RunnerError::LeaseLost`]).
    fn permit(&mut self) -> impl Future<Output = Result<(), RunnerError>> + Send {
        async { Ok(()) }
    }

    /// Which backend this is.
    fn transport(&self) -> Transport;

    /// Replaces the shell session (a new terminal; a no-op for executions)
    /// after [`RunnerError::Busy`] or [`RunnerError::TerminalClosed`]. The
    /// new shell restores the saved cwd and exported variables.
    fn reopen(&mut self) -> impl Future<Output = Result<(), RunnerError>> + Send;
}

/// Reads a completion marker (a path relative to home, as in
/// [`CommandOutcome::completion_marker`]) through a tiny execution: the
/// exit code once the command finished, `None` while it runs (or if the
/// marker never existed).
pub async fn read_completion(
    client: &Client,
    machine_id: &str,
    marker: &str,
) -> Result<Option<i32>, RunnerError> {
    if marker.starts_with('/') || marker.split('/').any(|part| part == "..") {
        return Err(RunnerError::Protocol(format!(
            "completion marker must be relative to home: {marker:?}"
        )));
    }
    let deadline = tokio::time::Instant::now() + RunnerOptions::default().setup_timeout;
    let request = ExecutionRequest::shell(script::read_marker_script(marker)).timeout_ms(30_000);
    let run = client.run_and_wait(machine_id, &request, deadline).await?;
    Ok(parse_marker(&run.output.stdout))
}

/// The exit code in a marker file's text.
fn parse_marker(text: &str) -> Option<i32> {
    let text = text.trim();
    if text.is_empty() {
        return None;
    }
    text.lines().next()?.trim().parse().ok()
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transport_parsing() {
        assert_eq!(Transport::parse(""), Some(Transport::Terminal));
        assert_eq!(Transport::parse("Executions"), Some(Transport::Executions));
        assert_eq!(Transport::parse("ssh"), None);
    }

    #[test]
    fn marker_parsing() {
        assert_eq!(parse_marker("0\n"), Some(0));
        assert_eq!(parse_marker(" 137 \n"), Some(137));
        assert_eq!(parse_marker(""), None);
        assert_eq!(parse_marker("x"), None);
    }

    #[test]
    fn outcome_json_shape() {
        let o = CommandOutcome {
            command: "ls".into(),
            exit_code: None,
            output: String::new(),
            output_bytes: 0,
            truncated: false,
            duration_ms: 5,
            still_running: true,
            completion_marker: Some(".agenthome/run/x.done".into()),
        };
        let v = serde_json::to_value(&o).expect("json");
        assert!(v.get("exit_code").is_none());
        assert_eq!(v["still_running"], true);
        assert_eq!(v["completion_marker"], ".agenthome/run/x.done");
        assert_eq!(
            serde_json::to_value(Transport::Executions).expect("json"),
            "executions"
        );
    }
}
