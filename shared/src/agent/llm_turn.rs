//! One model-driven turn as a loop over one step: call the model, run the
//! commands it asked for, and either go on or end with an [`Ending`]. Every
//! way a turn ends is an [`Ending`], turned into the turn's outcome in one
//! place ([`Ending::outcome`]).

use std::time::Duration;

use serde_json::json;
use tokio::time::Instant;

use super::{
    fit_history, parse_tool_call, run_step, still_running_note, tool_result, AgentError,
    AgentOptions, AgentOutcome, AgentStatus, ChatMessage, Completion, LlmClient, LlmError,
    Observer, PartialTurn, ToolCall, TurnInput, Usage, WireMessage,
};
use crate::agent::Limits;
use crate::runner::{CommandOutcome, CommandRunner, RunnerError};

/// How a turn ended.
#[derive(Debug)]
pub(super) enum Ending {
    /// The turn answered with `reply` and `status` as they are (the model's
    /// answer, the shell's output).
    Reply {
        /// The reply.
        reply: String,
        /// How the turn ended.
        status: AgentStatus,
    },
    /// No time was left to call the model or start a command.
    OutOfTime,
    /// A command cut by the deadline keeps running on the machine.
    LeftRunning(Box<CommandOutcome>),
    /// The step limit was reached.
    StepLimit,
    /// The turn lost its lease: nothing more was run.
    LeaseLost,
}

impl Ending {
    /// The turn's outcome: the reply says how it ended, after the model's
    /// last words (`last_text`) when it had any.
    pub(super) fn outcome(
        self,
        last_text: Option<&str>,
        steps: Vec<CommandOutcome>,
        usage: Usage,
    ) -> AgentOutcome {
        let n = steps.len();
        let (tail, status) = match self {
            Ending::Reply { reply, status } => {
                return AgentOutcome {
                    reply,
                    steps,
                    usage,
                    status,
                }
            }
            Ending::OutOfTime => (
                format!("This turn ran out of time after {n} command(s); ask me to continue."),
                AgentStatus::Deadline,
            ),
            Ending::LeftRunning(o) => (
                format!("This turn ran out of time. {}", still_running_note(&o)),
                AgentStatus::Deadline,
            ),
            Ending::StepLimit => (
                format!(
                    "Stopped after {n} commands: the step limit for one turn was reached. \
                     Ask me to continue."
                ),
                AgentStatus::StepLimit,
            ),
            Ending::LeaseLost => (
                format!(
                    "This turn stopped after {n} command(s): it lost its hold on the machine \
                     (another turn or the sleep sweep took over), so nothing more was run. Ask \
                     me to continue."
                ),
                AgentStatus::LeaseLost,
            ),
        };
        let reply = match last_text {
            Some(t) => format!("{t}\n\n{tail}"),
            None => tail,
        };
        AgentOutcome {
            reply,
            steps,
            usage,
            status,
        }
    }
}

/// A tool call's answer to the model, and the turn's end if it ends there.
type CallResult = (String, Option<Ending>);

/// One model-driven turn in progress.
pub(super) struct LlmTurn<'a, R> {
    llm: &'a LlmClient,
    options: &'a AgentOptions,
    runner: &'a mut R,
    limits: Limits,
    observer: &'a dyn Observer,
    messages: Vec<WireMessage>,
    steps: Vec<CommandOutcome>,
    usage: Usage,
    tool_errors: u32,
    /// The model's latest words that came with tool calls.
    last_text: Option<String>,
}

impl<'a, R: CommandRunner> LlmTurn<'a, R> {
    /// A turn about to start: the conversation so far (system prompt, the
    /// history that fits its budget, the user's message).
    pub(super) fn new(
        llm: &'a LlmClient,
        options: &'a AgentOptions,
        system_prompt: String,
        input: &TurnInput,
        runner: &'a mut R,
        limits: Limits,
        observer: &'a dyn Observer,
    ) -> Self {
        let (history, dropped) = fit_history(&input.history, options.history_budget);
        LlmTurn {
            llm,
            options,
            runner,
            limits,
            observer,
            messages: opening_messages(system_prompt, input, history, dropped),
            steps: Vec::new(),
            usage: Usage {
                history_dropped: u32::try_from(dropped).unwrap_or(u32::MAX),
                ..Usage::default()
            },
            tool_errors: 0,
            last_text: None,
        }
    }

    /// Step until the turn ends.
    pub(super) async fn run(mut self) -> Result<AgentOutcome, AgentError> {
        loop {
            if let Some(end) = self.step().await? {
                return Ok(end.outcome(self.last_text.as_deref(), self.steps, self.usage));
            }
        }
    }

    /// One model call and the commands it asked for.
    async fn step(&mut self) -> Result<Option<Ending>, AgentError> {
        if self.time_left() < self.options.min_llm_time {
            return Ok(Some(Ending::OutOfTime));
        }
        let observer = self.observer;
        let on_text = |text: &str| observer.reply_delta(text);
        let completion = match self
            .llm
            .complete_streamed(&self.messages, self.limits.deadline, &on_text)
            .await
        {
            Ok(c) => c,
            Err(LlmError::NoTime) => return Ok(Some(Ending::OutOfTime)),
            Err(source) => return Err(self.llm_failed(source)),
        };
        self.usage.llm_calls += 1;
        self.usage.prompt_tokens += completion.usage.prompt_tokens;
        self.usage.completion_tokens += completion.usage.completion_tokens;
        let text = completion
            .content
            .as_deref()
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .map(str::to_owned);
        if completion.tool_calls.is_empty() {
            let reply = text.unwrap_or_else(|| "(the model gave no reply)".into());
            let status = AgentStatus::Completed;
            return Ok(Some(Ending::Reply { reply, status }));
        }
        if text.is_some() {
            self.last_text = text;
        }
        let calls = self.record_calls(completion);
        self.run_calls(&calls).await
    }

    /// Name unnamed calls and add the assistant's message to the
    /// conversation; the calls to run.
    fn record_calls(&mut self, completion: Completion) -> Vec<ToolCall> {
        let mut calls = completion.tool_calls;
        for (i, call) in calls.iter_mut().enumerate() {
            if call.id.is_empty() {
                call.id = format!("call_{}_{i}", self.usage.llm_calls);
            }
        }
        self.messages.push(WireMessage {
            role: "assistant".into(),
            content: completion.content,
            tool_calls: calls.clone(),
            tool_call_id: None,
        });
        calls
    }

    /// Answer every call in order; once one ends the turn, the rest are
    /// answered "not run".
    async fn run_calls(&mut self, calls: &[ToolCall]) -> Result<Option<Ending>, AgentError> {
        let mut end = None;
        for call in calls {
            let answer = match end {
                Some(_) => not_run("the turn ended"),
                None => {
                    let (answer, ends) = self.call(call).await?;
                    end = ends;
                    answer
                }
            };
            self.messages.push(WireMessage::tool(&call.id, answer));
        }
        Ok(end)
    }

    /// One tool call: run its command if the turn's limits allow it.
    async fn call(&mut self, call: &ToolCall) -> Result<CallResult, AgentError> {
        let args = match parse_tool_call(call) {
            Ok(a) => a,
            Err(e) => {
                return self
                    .unusable_call(e.to_string())
                    .map(|answer| (answer, None))
            }
        };
        if self.steps.len() >= self.limits.max_steps as usize {
            return Ok((not_run("step limit reached"), Some(Ending::StepLimit)));
        }
        let remaining = self.time_left();
        if remaining < self.options.min_command_time {
            return Ok((
                not_run("no time left in this turn"),
                Some(Ending::OutOfTime),
            ));
        }
        let requested = args
            .timeout_s
            .map(Duration::from_secs)
            .unwrap_or(self.limits.command_timeout);
        let capped = requested >= remaining;
        let index = self.steps.len();
        let timeout = requested.min(remaining);
        let outcome =
            match run_step(self.runner, &args.command, timeout, index, self.observer).await {
                Ok(o) => o,
                Err(RunnerError::LeaseLost) => {
                    return Ok((not_run("the turn ended"), Some(Ending::LeaseLost)))
                }
                Err(source) => return Err(self.runner_failed(source)),
            };
        let answer = tool_result(&outcome);
        let end = (outcome.still_running && capped)
            .then(|| Ending::LeftRunning(Box::new(outcome.clone())));
        self.steps.push(outcome);
        Ok((answer, end))
    }

    /// A tool call that cannot be run: the model is told, within the
    /// turn's budget of such calls; past it the turn fails.
    fn unusable_call(&mut self, error: String) -> Result<String, AgentError> {
        self.tool_errors += 1;
        if self.tool_errors > self.options.tool_error_budget {
            return Err(self.llm_failed(LlmError::MalformedToolCall(error)));
        }
        tracing::info!(%error, "unusable tool call; told the model");
        Ok(json!({ "error": error }).to_string())
    }

    fn time_left(&self) -> Duration {
        self.limits
            .deadline
            .saturating_duration_since(Instant::now())
    }

    fn partial(&self) -> Box<PartialTurn> {
        Box::new(PartialTurn {
            steps: self.steps.clone(),
            usage: self.usage,
        })
    }

    fn llm_failed(&self, source: LlmError) -> AgentError {
        AgentError::Llm {
            source,
            partial: self.partial(),
        }
    }

    fn runner_failed(&self, source: RunnerError) -> AgentError {
        AgentError::Runner {
            source,
            partial: self.partial(),
        }
    }
}

/// The tool result of a call that was not run.
fn not_run(why: &str) -> String {
    json!({ "error": format!("not run: {why}") }).to_string()
}

/// The conversation before the model's first call: the system prompt, the
/// note on the wake (if any), the history that fits and the user's message.
fn opening_messages(
    system_prompt: String,
    input: &TurnInput,
    history: &[ChatMessage],
    dropped: usize,
) -> Vec<WireMessage> {
    let mut messages = vec![WireMessage::text("system", system_prompt)];
    if let Some(note) = &input.wake_note {
        messages.push(WireMessage::text("system", note.clone()));
    }
    if dropped > 0 {
        messages.push(WireMessage::text(
            "system",
            format!(
                "{dropped} older message(s) of the conversation were left out to fit the history budget."
            ),
        ));
    }
    for m in history {
        let role = if m.role == "assistant" {
            "assistant"
        } else {
            "user"
        };
        messages.push(WireMessage::text(role, m.content.clone()));
    }
    messages.push(WireMessage::text("user", input.message.clone()));
    messages
}
