//! The agent loop: the model drives the user's machine through one tool,
//! `run_command(command, timeout_s?)`, within a step limit, a per-command
//! timeout and the turn's deadline (docs/design.md §5 "Agent loop").
//!
//! - [`Agent::llm`]: an OpenAI-compatible model ([`LlmClient`]).
//! - [`Agent::shell`] (`AGENT_MODEL=shell`): no model; the user's message is
//!   run as one command and its output is the reply.
//!
//! The deadline is respected everywhere: the model is not called when less
//! than [`AgentOptions::min_llm_time`] remains, a command gets
//! `min(timeout_s or the default, time left)`, and a command still running
//! when its time was cut by the deadline ends the turn with
//! [`AgentStatus::Deadline`] and a reply saying it keeps running.

mod llm;
mod llm_turn;
mod stream;

use llm_turn::{Ending, LlmTurn};

use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::time::Instant;

use crate::runner::{CommandOutcome, CommandRunner, RunnerError};

pub use crate::runner::{NoObserver, Observer};

pub use llm::{
    parse_completion, parse_tool_call, tools_json, Completion, FunctionCall, LlmClient, LlmConfig,
    LlmError, RunCommandArgs, TokenUsage, ToolCall, ToolCallError, WireMessage, RUN_COMMAND,
};

/// `AGENT_MODEL` value selecting the offline shell mode.
pub const SHELL_MODEL: &str = "shell";

/// The system prompt. The last few turn summaries are appended to it.
pub const SYSTEM_PROMPT: &str = "\
You are an assistant with your own persistent Linux machine, dedicated to this user. \
You work on it through the `run_command` tool, which runs a command in a bash shell and \
returns its exit code and output (long output is cut to its beginning and end).

What persists: the home directory (/root, `~`) and everything in it — files, repositories, \
virtual environments, caches and the shell history (~/.bash_history) — survives between \
conversations, as do the working directory and exported variables of your shell. What may \
not persist: anything installed or written outside the home directory (system packages, \
/tmp, /usr/local); if a tool you relied on is missing, reinstall it, and prefer \
installing into the home directory (pip install --user, a venv, npm with a prefix in ~).

How to work:
- Run commands non-interactively (use -y flags; no editors, pagers or prompts; stdin is empty).
- Give long-running commands a timeout_s. A command that outlives it keeps running on the \
machine; you are told where its exit code and output will appear, and can check on it later \
(also in a later conversation). Start servers and long jobs in the background with nohup \
and redirect their output to a file.
- ~/.agenthome/turns.jsonl holds a one-line summary of each previous turn: it is your memory. \
You may also keep your own notes in files under ~ (for example ~/NOTES.md) and read them when \
useful.
- Do not print secrets, and never try to read credentials that are not the user's.
- Hooks: if ~/.agenthome/hooks/pre-sleep exists and is executable, it runs before every \
sleep (save state, stop a server cleanly); ~/.agenthome/hooks/post-wake runs after every \
wake, before your first command (restart a dev server, refresh credentials). Each is any \
executable (e.g. a bash script starting with #!/bin/bash), runs in ~ with no input, is \
stopped after a time limit (30 seconds by default), and its failure never stops a sleep or a turn. You are \
told after a wake how long the machine slept and which commands the sleep interrupted.

Replies: be concise. Say what you did and what came out of it, with the key output or file \
paths; do not paste long outputs.";

/// One message of the chat product's conversation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    /// `user` or `assistant`.
    pub role: String,
    /// Text.
    pub content: String,
}

/// What a turn starts from.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TurnInput {
    /// The user's new message.
    pub message: String,
    /// Recent conversation, oldest first (given to the model before the message).
    pub history: Vec<ChatMessage>,
    /// One-line summaries of the last few turns (from `~/.agenthome/turns.jsonl`).
    pub memory: Vec<String>,
    /// After a wake: what the sleep kept and interrupted, how long it slept.
    pub wake_note: Option<String>,
}

/// Bounds of one turn.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Commands the model may run in this turn.
    pub max_steps: u32,
    /// Timeout of a command whose call gives no `timeout_s`.
    pub command_timeout: Duration,
    /// When the turn must end.
    pub deadline: Instant,
}

/// How a turn ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AgentStatus {
    /// The model answered (or the shell-mode command ran).
    Completed,
    /// The deadline came first.
    Deadline,
    /// The model wanted more commands than the step limit allows.
    StepLimit,
    /// The turn lost its lease on the machine (another turn or the sleep
    /// sweep took over): it stopped before the next command.
    LeaseLost,
}

/// Model usage of one turn.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    /// Successful chat-completion calls.
    pub llm_calls: u32,
    /// Sum of `prompt_tokens`.
    pub prompt_tokens: u64,
    /// Sum of `completion_tokens`.
    pub completion_tokens: u64,
    /// Oldest history entries left out to fit the history budget
    /// ([`AgentOptions::history_budget`]); absent when none were.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub history_dropped: u32,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

/// The default [`AgentOptions::history_budget`] (characters).
pub const DEFAULT_HISTORY_BUDGET: usize = 32 * 1024;

/// The newest entries of `history` whose contents fit in `budget`
/// characters together (oldest dropped first), and how many were dropped.
pub fn fit_history(history: &[ChatMessage], budget: usize) -> (&[ChatMessage], usize) {
    let mut used = 0usize;
    let mut keep = 0usize;
    for m in history.iter().rev() {
        used = used.saturating_add(m.content.chars().count());
        if used > budget {
            break;
        }
        keep += 1;
    }
    let dropped = history.len() - keep;
    (&history[dropped..], dropped)
}

/// The result of a turn.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentOutcome {
    /// The reply to the user.
    pub reply: String,
    /// Every command run, in order.
    pub steps: Vec<CommandOutcome>,
    /// Model usage.
    pub usage: Usage,
    /// How the turn ended.
    pub status: AgentStatus,
}

/// What a failed turn had done before failing (the turn reports it).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PartialTurn {
    /// Commands run before the failure.
    pub steps: Vec<CommandOutcome>,
    /// Model usage before the failure.
    pub usage: Usage,
}

/// A failed turn. Each variant carries the steps done so far.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The model could not be used.
    #[error("agent turn failed: {source}")]
    Llm {
        /// The LLM failure.
        #[source]
        source: LlmError,
        /// What was done before it.
        partial: Box<PartialTurn>,
    },
    /// The machine could not run a command.
    #[error("agent turn failed: {source}")]
    Runner {
        /// The runner failure.
        #[source]
        source: RunnerError,
        /// What was done before it.
        partial: Box<PartialTurn>,
    },
}

impl AgentError {
    /// The steps and usage before the failure.
    pub fn partial(&self) -> &PartialTurn {
        match self {
            AgentError::Llm { partial, .. } | AgentError::Runner { partial, .. } => partial,
        }
    }
}

/// Tunables of the loop.
#[derive(Debug, Clone)]
pub struct AgentOptions {
    /// Do not call the model with less time than this left.
    pub min_llm_time: Duration,
    /// Do not start a command with less time than this left.
    pub min_command_time: Duration,
    /// Unusable tool calls answered with a tool error before the turn fails.
    pub tool_error_budget: u32,
    /// Longest memory line kept in the prompt (bytes).
    pub max_memory_line: usize,
    /// Characters of the chat product's history sent to the model per
    /// turn (`MAX_HISTORY_CHARS`); older entries are left out first and the
    /// turn's `usage.history_dropped` says how many. Every LLM call of a
    /// turn re-sends the history, so this bounds what a turn costs.
    pub history_budget: usize,
}

impl Default for AgentOptions {
    fn default() -> Self {
        Self {
            min_llm_time: Duration::from_secs(5),
            min_command_time: Duration::from_secs(1),
            tool_error_budget: 1,
            max_memory_line: 1000,
            history_budget: DEFAULT_HISTORY_BUDGET,
        }
    }
}

#[derive(Debug, Clone)]
enum Mode {
    Shell,
    Llm(Box<LlmClient>),
}

/// Runs chat turns.
#[derive(Debug, Clone)]
pub struct Agent {
    mode: Mode,
    options: AgentOptions,
}

impl Agent {
    /// Offline mode: the message is the command.
    pub fn shell() -> Self {
        Self {
            mode: Mode::Shell,
            options: AgentOptions::default(),
        }
    }

    /// A model-driven agent.
    pub fn llm(client: LlmClient) -> Self {
        Self {
            mode: Mode::Llm(Box::new(client)),
            options: AgentOptions::default(),
        }
    }

    /// From the configuration: `AGENT_MODEL=shell` → shell mode, else an
    /// LLM client for `LLM_BASE_URL` with `LLM_API_KEY` (optional, for
    /// local servers that need none).
    pub fn from_config(config: &crate::config::Config) -> Result<Self, LlmError> {
        if config.agent_model.trim() == SHELL_MODEL {
            return Ok(Self::shell());
        }
        let llm = LlmClient::new(LlmConfig::new(
            config.llm_base_url.clone(),
            config.llm_api_key.clone(),
            config.agent_model.trim(),
        ))?;
        Ok(Self::llm(llm).with_options(AgentOptions {
            history_budget: config.max_history_chars,
            ..AgentOptions::default()
        }))
    }

    /// Replaces the loop's tunables.
    pub fn with_options(mut self, options: AgentOptions) -> Self {
        self.options = options;
        self
    }

    /// True in shell mode.
    pub fn is_shell(&self) -> bool {
        matches!(self.mode, Mode::Shell)
    }

    /// Runs one turn.
    pub async fn run(
        &self,
        input: TurnInput,
        runner: &mut impl CommandRunner,
        limits: Limits,
    ) -> Result<AgentOutcome, AgentError> {
        self.run_observed(input, runner, limits, &NoObserver).await
    }

    /// Runs one turn; `observer` sees each step start, its output and its end.
    pub async fn run_observed(
        &self,
        input: TurnInput,
        runner: &mut impl CommandRunner,
        limits: Limits,
        observer: &dyn Observer,
    ) -> Result<AgentOutcome, AgentError> {
        match &self.mode {
            Mode::Shell => self.run_shell(input, runner, limits, observer).await,
            Mode::Llm(llm) => self.run_llm(llm, input, runner, limits, observer).await,
        }
    }

    async fn run_shell(
        &self,
        input: TurnInput,
        runner: &mut impl CommandRunner,
        limits: Limits,
        observer: &dyn Observer,
    ) -> Result<AgentOutcome, AgentError> {
        let remaining = limits.deadline.saturating_duration_since(Instant::now());
        if remaining < self.options.min_command_time {
            let reply = "No time was left in this turn to run the command.".into();
            let end = Ending::Reply {
                reply,
                status: AgentStatus::Deadline,
            };
            return Ok(end.outcome(None, Vec::new(), Usage::default()));
        }
        let timeout = limits.command_timeout.min(remaining);
        let capped = limits.command_timeout > remaining;
        let outcome = match run_step(runner, &input.message, timeout, 0, observer).await {
            Ok(o) => o,
            Err(RunnerError::LeaseLost) => return Ok(AgentOutcome::lease_lost()),
            Err(source) => {
                return Err(AgentError::Runner {
                    source,
                    partial: Box::default(),
                })
            }
        };
        let mut reply = if outcome.output.is_empty() {
            "(no output)".to_owned()
        } else {
            outcome.output.clone()
        };
        if let Some(code) = outcome.exit_code.filter(|c| *c != 0) {
            if !reply.ends_with('\n') {
                reply.push('\n');
            }
            reply.push_str(&format!("[exit code {code}]"));
        }
        let status = if outcome.still_running {
            if !reply.ends_with('\n') {
                reply.push('\n');
            }
            reply.push_str(&still_running_note(&outcome));
            if capped {
                AgentStatus::Deadline
            } else {
                AgentStatus::Completed
            }
        } else {
            AgentStatus::Completed
        };
        let end = Ending::Reply { reply, status };
        Ok(end.outcome(None, vec![outcome], Usage::default()))
    }

    fn system_prompt(&self, memory: &[String]) -> String {
        let mut prompt = SYSTEM_PROMPT.to_owned();
        let lines: Vec<String> = memory
            .iter()
            .map(|l| l.trim())
            .filter(|l| !l.is_empty())
            .map(|l| crate::text::cut(l, self.options.max_memory_line))
            .collect();
        if !lines.is_empty() {
            prompt.push_str("\n\nRecent turns (oldest first, from ~/.agenthome/turns.jsonl):\n");
            for line in lines {
                prompt.push_str("- ");
                prompt.push_str(&line);
                prompt.push('\n');
            }
        }
        prompt
    }

    async fn run_llm(
        &self,
        llm: &LlmClient,
        input: TurnInput,
        runner: &mut impl CommandRunner,
        limits: Limits,
        observer: &dyn Observer,
    ) -> Result<AgentOutcome, AgentError> {
        let prompt = self.system_prompt(&input.memory);
        LlmTurn::new(llm, &self.options, prompt, &input, runner, limits, observer)
            .run()
            .await
    }
}

/// Runs one command; a busy shell or a terminal that closed before the
/// command started is replaced once and the command retried. A command that
/// made the shell exit is reported as a step without exit code. `observer`
/// sees step `index` start, its output and its end (not a failed step).
async fn run_step(
    runner: &mut impl CommandRunner,
    command: &str,
    timeout: Duration,
    index: usize,
    observer: &dyn Observer,
) -> Result<CommandOutcome, RunnerError> {
    runner.permit().await?;
    observer.step_started(index, command);
    let outcome = run_step_inner(runner, command, timeout, observer).await?;
    observer.step_finished(index, &outcome);
    Ok(outcome)
}

async fn run_step_inner(
    runner: &mut impl CommandRunner,
    command: &str,
    timeout: Duration,
    observer: &dyn Observer,
) -> Result<CommandOutcome, RunnerError> {
    let started = Instant::now();
    match runner.run_observed(command, timeout, observer).await {
        Ok(o) => Ok(o),
        Err(RunnerError::Busy { .. } | RunnerError::TerminalClosed { started: false }) => {
            runner.reopen().await?;
            let left = timeout
                .saturating_sub(started.elapsed())
                .max(Duration::from_secs(1));
            runner.run_observed(command, left, observer).await
        }
        Err(RunnerError::TerminalClosed { started: true }) => {
            runner.reopen().await?;
            Ok(CommandOutcome {
                command: command.to_owned(),
                exit_code: None,
                output: "[the shell exited during this command; a new shell was opened \
                         (cwd and exported variables restored)]"
                    .into(),
                output_bytes: 0,
                truncated: false,
                duration_ms: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
                still_running: false,
                completion_marker: None,
            })
        }
        Err(e) => Err(e),
    }
}

/// The tool result the model gets for a command.
fn tool_result(o: &CommandOutcome) -> String {
    let mut v = json!({
        "exit_code": o.exit_code,
        "output": o.output,
        "output_bytes": o.output_bytes,
        "truncated": o.truncated,
        "duration_ms": o.duration_ms,
        "still_running": o.still_running,
    });
    if o.still_running {
        v["note"] = json!(still_running_note(o));
    }
    v.to_string()
}

fn still_running_note(o: &CommandOutcome) -> String {
    match &o.completion_marker {
        Some(marker) => format!(
            "The command `{}` is still running on the machine. When it finishes, its exit code \
             will be in ~/{marker} and its output in ~/{}.",
            crate::text::cut(&o.command, 200),
            marker.trim_end_matches(".done").to_owned() + ".log"
        ),
        None => format!(
            "The command `{}` is still running on the machine.",
            crate::text::cut(&o.command, 200)
        ),
    }
}

impl AgentOutcome {
    /// A turn that lost its lease before the agent ran: nothing was run.
    pub fn lease_lost() -> Self {
        Ending::LeaseLost.outcome(None, Vec::new(), Usage::default())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(n: usize, len: usize) -> ChatMessage {
        ChatMessage {
            role: if n % 2 == 0 { "user" } else { "assistant" }.into(),
            content: format!("{n}").repeat(len),
        }
    }

    #[test]
    fn history_is_trimmed_oldest_first_to_the_budget() {
        let history: Vec<ChatMessage> = (0..10).map(|n| msg(n, 1000)).collect();
        let (kept, dropped) = fit_history(&history, 3500);
        assert_eq!(dropped, 7);
        assert_eq!(kept, &history[7..], "the newest three");
        assert_eq!(fit_history(&history, 10_000), (&history[..], 0));
        assert_eq!(fit_history(&history, 999).1, 10, "not even the newest fits");
        assert_eq!(fit_history(&[], 0).1, 0);
    }

    #[test]
    fn usage_states_dropped_history_only_when_there_was_some() {
        let v = serde_json::to_value(Usage::default()).expect("json");
        assert!(v.get("history_dropped").is_none(), "{v}");
        let v = serde_json::to_value(Usage {
            history_dropped: 7,
            ..Usage::default()
        })
        .expect("json");
        assert_eq!(v["history_dropped"], 7);
    }

    #[test]
    fn status_serializes_lowercase() {
        assert_eq!(
            serde_json::to_value(AgentStatus::StepLimit).expect("json"),
            "step_limit"
        );
        assert_eq!(
            serde_json::to_value(AgentStatus::Completed).expect("json"),
            "completed"
        );
        assert_eq!(
            serde_json::to_value(AgentStatus::Deadline).expect("json"),
            "deadline"
        );
    }

    #[test]
    fn memory_goes_into_the_system_prompt() {
        let agent = Agent::shell();
        let p = agent.system_prompt(&["installed numpy".into(), "  ".into()]);
        assert!(p.starts_with(SYSTEM_PROMPT));
        assert!(p.contains("Recent turns"));
        assert!(p.contains("- installed numpy\n"));
        assert_eq!(agent.system_prompt(&[]), SYSTEM_PROMPT);
    }

    #[test]
    fn tool_result_is_json_with_the_outcome() {
        let o = CommandOutcome {
            command: "sleep 100".into(),
            exit_code: None,
            output: "x".into(),
            output_bytes: 1,
            truncated: false,
            duration_ms: 3,
            still_running: true,
            completion_marker: Some(".agenthome/run/abc.done".into()),
        };
        let v: serde_json::Value = serde_json::from_str(&tool_result(&o)).expect("json");
        assert_eq!(v["exit_code"], serde_json::Value::Null);
        assert_eq!(v["still_running"], true);
        assert!(v["note"]
            .as_str()
            .is_some_and(|n| n.contains("~/.agenthome/run/abc.done") && n.contains("abc.log")));
    }
}
