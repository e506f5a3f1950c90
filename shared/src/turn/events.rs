//! Progress events of a turn, for chat UIs (the chat-turn function streams
//! them as Server-Sent Events). They come from one place: the turn itself
//! ([`super::TurnService::run_with_events`]); the plain JSON response is the
//! same turn with a sink that drops them.
//!
//! Output is ANSI-stripped, coalesced (one `output` event per step at most
//! every [`StreamSettings::output_interval`]) and capped per step
//! ([`StreamSettings::output_cap`] raw bytes, then a single
//! [`TRUNCATED_NOTE`]); the turn result's own truncation is unaffected.

use super::TurnResult;
use crate::api::Problem;
use crate::runner::{clean, CommandOutcome, Observer};
use serde::Serialize;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;
use tokio::time::Instant;

/// The note sent once when a step's streamed output reaches the cap.
pub const TRUNCATED_NOTE: &str = "\n[output truncated in stream]\n";

/// How a turn's output is streamed.
#[derive(Debug, Clone, Copy)]
pub struct StreamSettings {
    /// Least time between two `output` events of a step.
    pub output_interval: Duration,
    /// Raw output bytes streamed per step before the truncation note.
    pub output_cap: usize,
}

impl Default for StreamSettings {
    fn default() -> Self {
        StreamSettings {
            output_interval: Duration::from_millis(100),
            output_cap: 64 * 1024,
        }
    }
}

/// Where the machine is on its way to running the turn.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum MachineStage {
    /// The user has no ready machine; one is being provisioned.
    Provisioning,
    /// The machine was not running; it is being woken.
    Waking,
    /// The machine runs; commands follow.
    Ready,
    /// After a wake: what happened while it slept (`woke` has the facts).
    Woke,
    /// A first message waits for provisioning: the item is claimed, the
    /// worker has not started yet.
    Claimed,
    /// … the worker creates the machine.
    Creating,
    /// … the machine exists and is booting.
    Booting,
    /// … the machine runs its bootstrap script.
    Bootstrapping,
}

impl From<crate::store::ProvisionStage> for MachineStage {
    fn from(stage: crate::store::ProvisionStage) -> Self {
        use crate::store::ProvisionStage as P;
        match stage {
            P::Claimed => MachineStage::Claimed,
            P::Creating => MachineStage::Creating,
            P::Booting => MachineStage::Booting,
            P::Bootstrapping => MachineStage::Bootstrapping,
        }
    }
}

/// One progress event. Serialized adjacently tagged:
/// `{"type": "<name>", "data": {…}}`; [`TurnEvent::name`] and
/// [`TurnEvent::data`] give the two parts (the SSE `event:` and `data:`).
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "type", content = "data", rename_all = "snake_case")]
pub enum TurnEvent {
    /// The machine's progress before the agent runs.
    Machine {
        /// provisioning · waking · ready.
        stage: MachineStage,
        /// The machine's phase (or, while provisioning, the item's state).
        phase: String,
        /// Since the turn started.
        elapsed_ms: u64,
        /// While provisioning: time spent in this stage so far.
        #[serde(skip_serializing_if = "Option::is_none")]
        stage_elapsed_ms: Option<u64>,
        /// Stage `woke`: how long it slept, the interrupted commands, the
        /// post-wake hook.
        #[serde(skip_serializing_if = "Option::is_none")]
        woke: Option<Box<super::WakeFacts>>,
    },
    /// A command starts.
    StepStarted {
        /// 0-based, in turn order; the same index as in the result's `steps`.
        index: usize,
        /// The command.
        command: String,
    },
    /// Output of the running command (ANSI-stripped, coalesced, capped).
    Output {
        /// The step.
        index: usize,
        /// Text.
        chunk: String,
    },
    /// A command ended (or was left running).
    StepFinished {
        /// The step.
        index: usize,
        /// Its exit code (absent while it runs on).
        exit_code: Option<i32>,
        /// Time waited for it.
        duration_ms: u64,
        /// The step's output in the turn result is truncated.
        truncated: bool,
        /// The streamed output was cut at the cap.
        stream_truncated: bool,
        /// It keeps running on the machine.
        still_running: bool,
    },
    /// A piece of the model's text as it is generated (streamed replies;
    /// text before a command is the model's narration, the `reply` event
    /// that follows is authoritative).
    ReplyDelta {
        /// The new text.
        text: String,
    },
    /// The agent's reply (also in `done`).
    Reply {
        /// The reply.
        text: String,
    },
    /// The turn result, exactly as the JSON response returns it. Last event.
    Done(Box<TurnResult>),
    /// The turn failed: the problem object the JSON response would return.
    /// Last event.
    Error(Problem),
}

impl TurnEvent {
    /// The event's name (SSE `event:`).
    pub fn name(&self) -> &'static str {
        match self {
            TurnEvent::Machine { .. } => "machine",
            TurnEvent::StepStarted { .. } => "step_started",
            TurnEvent::Output { .. } => "output",
            TurnEvent::StepFinished { .. } => "step_finished",
            TurnEvent::ReplyDelta { .. } => "reply_delta",
            TurnEvent::Reply { .. } => "reply",
            TurnEvent::Done(_) => "done",
            TurnEvent::Error(_) => "error",
        }
    }

    /// The event's payload as JSON (SSE `data:`).
    pub fn data(&self) -> serde_json::Value {
        match serde_json::to_value(self) {
            Ok(serde_json::Value::Object(mut m)) => {
                m.remove("data").unwrap_or(serde_json::Value::Null)
            }
            _ => serde_json::Value::Null,
        }
    }
}

/// Receives a turn's events. Sending must not block and never fails the
/// turn: a sink whose reader went away drops the events.
pub trait TurnEvents: Send + Sync {
    /// One event.
    fn emit(&self, event: TurnEvent);
}

/// The sink that drops everything (the plain JSON response).
#[derive(Debug, Clone, Copy, Default)]
pub struct NoEvents;

impl TurnEvents for NoEvents {
    fn emit(&self, _event: TurnEvent) {}
}

impl TurnEvents for tokio::sync::mpsc::UnboundedSender<TurnEvent> {
    fn emit(&self, event: TurnEvent) {
        // The reader left (client disconnected): the turn goes on.
        let _ = self.send(event);
    }
}

/// The step being streamed.
#[derive(Debug)]
struct StepState {
    index: usize,
    active: bool,
    pending: Vec<u8>,
    /// Raw bytes accepted for streaming (sent or pending).
    accepted: usize,
    capped: bool,
    noted: bool,
    last_flush: Instant,
}

/// Turns the agent's observations into events: coalesces and caps output.
pub(super) struct EventObserver<'a> {
    sink: &'a dyn TurnEvents,
    settings: StreamSettings,
    started: Instant,
    step: Mutex<StepState>,
}

impl<'a> EventObserver<'a> {
    pub(super) fn new(
        sink: &'a dyn TurnEvents,
        settings: StreamSettings,
        started: Instant,
    ) -> Self {
        EventObserver {
            sink,
            settings,
            started,
            step: Mutex::new(StepState {
                index: 0,
                active: false,
                pending: Vec::new(),
                accepted: 0,
                capped: false,
                noted: false,
                last_flush: started,
            }),
        }
    }

    /// When the turn started.
    pub(super) fn started(&self) -> Instant {
        self.started
    }

    pub(super) fn emit(&self, event: TurnEvent) {
        self.sink.emit(event);
    }

    /// A `machine` event.
    pub(super) fn machine(&self, stage: MachineStage, phase: &str) {
        self.emit(TurnEvent::Machine {
            stage,
            phase: phase.to_string(),
            elapsed_ms: super::millis(self.started.elapsed()),
            stage_elapsed_ms: None,
            woke: None,
        });
    }

    /// The `machine` event of stage `woke`, with the wake's facts.
    pub(super) fn woke(&self, facts: super::WakeFacts) {
        self.emit(TurnEvent::Machine {
            stage: MachineStage::Woke,
            phase: "running".to_string(),
            elapsed_ms: super::millis(self.started.elapsed()),
            stage_elapsed_ms: None,
            woke: Some(Box::new(facts)),
        });
    }

    fn lock(&self) -> MutexGuard<'_, StepState> {
        self.step
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Called periodically: sends output that waited long enough.
    pub(super) fn tick(&self) {
        let mut step = self.lock();
        if step.active && step.last_flush.elapsed() >= self.settings.output_interval {
            self.flush(&mut step, false);
        }
    }

    /// Sends the pending output (all of it when `last`, else without an
    /// incomplete escape sequence or UTF-8 character at its end).
    fn flush(&self, step: &mut StepState, last: bool) {
        if !step.pending.is_empty() {
            let keep_from = if last {
                step.pending.len()
            } else {
                incomplete_tail(&step.pending)
            };
            let rest = step.pending.split_off(keep_from);
            let ready = std::mem::replace(&mut step.pending, rest);
            let text = clean(&ready);
            if !text.is_empty() {
                self.emit(TurnEvent::Output {
                    index: step.index,
                    chunk: text,
                });
            }
            step.last_flush = Instant::now();
        }
        if step.capped && !step.noted && step.pending.is_empty() {
            step.noted = true;
            self.emit(TurnEvent::Output {
                index: step.index,
                chunk: TRUNCATED_NOTE.to_string(),
            });
        }
    }
}

impl Observer for EventObserver<'_> {
    fn step_started(&self, index: usize, command: &str) {
        let mut step = self.lock();
        *step = StepState {
            index,
            active: true,
            pending: Vec::new(),
            accepted: 0,
            capped: false,
            noted: false,
            last_flush: Instant::now(),
        };
        drop(step);
        self.emit(TurnEvent::StepStarted {
            index,
            command: command.to_string(),
        });
    }

    fn output(&self, chunk: &[u8]) {
        let mut step = self.lock();
        if !step.active || step.capped {
            return;
        }
        let room = self.settings.output_cap.saturating_sub(step.accepted);
        let take = room.min(chunk.len());
        step.pending.extend_from_slice(&chunk[..take]);
        step.accepted += take;
        if take < chunk.len() {
            step.capped = true;
        }
        if step.capped || step.last_flush.elapsed() >= self.settings.output_interval {
            let last = step.capped;
            self.flush(&mut step, last);
        }
    }

    fn step_finished(&self, index: usize, outcome: &CommandOutcome) {
        let mut step = self.lock();
        self.flush(&mut step, true);
        step.active = false;
        let stream_truncated = step.capped;
        drop(step);
        self.emit(TurnEvent::StepFinished {
            index,
            exit_code: outcome.exit_code,
            duration_ms: outcome.duration_ms,
            truncated: outcome.truncated,
            stream_truncated,
            still_running: outcome.still_running,
        });
    }

    fn reply_delta(&self, text: &str) {
        self.emit(TurnEvent::ReplyDelta {
            text: text.to_string(),
        });
    }
}

/// Where an incomplete ANSI escape sequence or UTF-8 character at the end of
/// `b` starts (`b.len()` if there is none): that part waits for more bytes.
fn incomplete_tail(b: &[u8]) -> usize {
    let mut end = b.len();
    // An escape sequence begun in the last few bytes and not yet finished.
    if let Some(esc) = b.iter().rposition(|&c| c == 0x1b) {
        if b.len() - esc <= 256 {
            let rest = &b[esc + 1..];
            let complete = match rest.first() {
                None => false,
                Some(b'[') => rest[1..].iter().any(|c| (0x40..=0x7e).contains(c)),
                Some(b']') => rest.contains(&0x07),
                Some(_) => true,
            };
            if !complete {
                end = esc;
            }
        }
    }
    // A multi-byte character cut at the end.
    let head = &b[..end];
    for back in 1..=3.min(head.len()) {
        let c = head[head.len() - back];
        if c & 0xC0 == 0x80 {
            continue; // a continuation byte: look further back
        }
        let need = match c {
            0xC0..=0xDF => 2,
            0xE0..=0xEF => 3,
            0xF0..=0xF7 => 4,
            _ => 1,
        };
        if need > back {
            end = head.len() - back;
        }
        break;
    }
    end
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex as StdMutex;

    #[derive(Default)]
    struct Collect(StdMutex<Vec<TurnEvent>>);
    impl TurnEvents for Collect {
        fn emit(&self, event: TurnEvent) {
            self.0.lock().expect("lock").push(event);
        }
    }

    fn outcome() -> CommandOutcome {
        CommandOutcome {
            command: "x".into(),
            exit_code: Some(0),
            output: String::new(),
            output_bytes: 0,
            truncated: false,
            duration_ms: 1,
            still_running: false,
            completion_marker: None,
        }
    }

    #[test]
    fn incomplete_tails_wait() {
        assert_eq!(incomplete_tail(b"abc"), 3);
        assert_eq!(incomplete_tail(b"ab\x1b[3"), 2);
        assert_eq!(incomplete_tail(b"ab\x1b[31m"), 7);
        assert_eq!(incomplete_tail(b"ab\x1b"), 2);
        assert_eq!(incomplete_tail("aé".as_bytes()), 3);
        assert_eq!(incomplete_tail(&"aé".as_bytes()[..2]), 1);
        assert_eq!(incomplete_tail(&"a€".as_bytes()[..3]), 1);
    }

    #[tokio::test]
    async fn output_is_stripped_capped_and_noted_once() {
        let sink = Collect::default();
        let obs = EventObserver::new(
            &sink,
            StreamSettings {
                output_interval: Duration::from_secs(3600),
                output_cap: 10,
            },
            Instant::now(),
        );
        obs.step_started(0, "x");
        obs.output(b"\x1b[31mred\x1b[0m");
        obs.output(b"0123456789");
        obs.output(b"more");
        obs.step_finished(0, &outcome());
        let events = sink.0.lock().expect("lock").clone();
        let names: Vec<_> = events.iter().map(TurnEvent::name).collect();
        assert_eq!(
            names,
            ["step_started", "output", "output", "step_finished"],
            "{events:?}"
        );
        assert_eq!(
            events[1],
            TurnEvent::Output {
                index: 0,
                chunk: "red".into()
            }
        );
        assert_eq!(
            events[2],
            TurnEvent::Output {
                index: 0,
                chunk: TRUNCATED_NOTE.into()
            }
        );
        assert!(matches!(
            events[3],
            TurnEvent::StepFinished {
                stream_truncated: true,
                ..
            }
        ));
    }

    #[test]
    fn event_json_shape() {
        let e = TurnEvent::StepStarted {
            index: 2,
            command: "ls".into(),
        };
        assert_eq!(e.name(), "step_started");
        assert_eq!(e.data(), serde_json::json!({"index": 2, "command": "ls"}));
    }
}
